//! Glue between candle CPU tensors and the kernels of this module: zero-copy access to a tensor's
//! data, linear layers on packed weights, batched attention matmuls.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemm::{self, AOperand, BOperand, PackedBf16, PackedF32};
use super::math::silu;

/// Runs `f` on the data of a contiguous CPU tensor (after its start offset).
pub fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let cpu: &CpuStorage = match &*storage {
        Storage::Cpu(c) => c,
        _ => candle_core::bail!("expected a CPU tensor"),
    };
    let all = cpu.as_slice::<T>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
    Ok(f(&all[a..b]))
}

/// x [N, K] (f32, CPU) · Wᵀ with W packed → [N, n].
pub fn linear_f32(x: &Tensor, w: &PackedF32) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    if k != w.k {
        candle_core::bail!("linear: input has {k} features, weight expects {}", w.k);
    }
    let mut out = vec![0f32; rows * w.n];
    with_slice::<f32, _>(x, |a| {
        gemm::sgemm(
            rows,
            w.n,
            k,
            AOperand {
                data: a,
                rs: k,
                cs: 1,
            },
            BOperand::Packed(w),
            &mut out,
            w.n,
            false,
        )
    })?;
    Tensor::from_vec(out, (rows, w.n), &Device::Cpu)
}

super::simd_fn! {
    /// o ← bf16(i), round to nearest even.
    pub fn f32_to_bf16(o: &mut [bf16], i: &[f32]) {
        for (o, &x) in o.iter_mut().zip(i) {
            *o = super::math::to_bf16(x);
        }
    }
}

super::simd_fn! {
    /// o ← f32(i).
    pub fn bf16_to_f32(o: &mut [f32], i: &[bf16]) {
        for (o, &x) in o.iter_mut().zip(i) {
            *o = x.to_f32();
        }
    }
}

fn to_bf16_vec(v: Vec<f32>) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    out.par_chunks_mut(8192)
        .zip(v.par_chunks(8192))
        .for_each(|(o, i)| f32_to_bf16(o, i));
    out
}

/// Checks x [N, K] against a packed weight's depth; returns N.
fn linear_rows(x: &Tensor, k_w: usize) -> Result<usize> {
    let (rows, k) = x.dims2()?;
    if k != k_w {
        candle_core::bail!("linear: input has {k} features, weight expects {k_w}");
    }
    Ok(rows)
}

/// x [N, K] (bf16, CPU) · Wᵀ with W packed bf16 → [N, n] bf16 (f32 accumulation, one rounding).
pub fn linear_bf16(x: &Tensor, w: &PackedBf16) -> Result<Tensor> {
    let rows = linear_rows(x, w.k)?;
    let out = with_slice::<bf16, _>(x, |a| {
        gemm::bf16gemm_vec(rows, a, w.k, w, gemm::Bf16New::Bf16)
    })?;
    Tensor::from_vec(out, (rows, w.n), &Device::Cpu)
}

/// Like [`linear_bf16`] with the f32 accumulator returned unrounded.
pub fn linear_bf16_f32(x: &Tensor, w: &PackedBf16) -> Result<Tensor> {
    let rows = linear_rows(x, w.k)?;
    let mut out = vec![0f32; rows * w.n];
    with_slice::<bf16, _>(x, |a| gemm::bf16gemm(rows, a, w.k, w, &mut out, w.n))?;
    Tensor::from_vec(out, (rows, w.n), &Device::Cpu)
}

/// res + x·Wᵀ for bf16 (the product rounded to bf16, then the sum): a linear layer and the
/// residual connection after it in one pass. `None` unless `res` is a bf16 CPU tensor [N, n].
pub fn linear_add_bf16(x: &Tensor, w: &PackedBf16, res: &Tensor) -> Option<Result<Tensor>> {
    if !elementwise_ok(&[res]) || res.dtype() != DType::BF16 {
        return None;
    }
    Some((|| {
        let rows = linear_rows(x, w.k)?;
        if res.dims() != [rows, w.n] {
            candle_core::bail!("linear: residual {:?} is not [{rows}, {}]", res.dims(), w.n);
        }
        let out = with_slice::<bf16, _>(x, |a| {
            with_slice::<bf16, _>(res, |r| {
                gemm::bf16gemm_vec(rows, a, w.k, w, gemm::Bf16New::AddBf16(r))
            })
        })??;
        Tensor::from_vec(out, (rows, w.n), &Device::Cpu)
    })())
}

/// silu(x·Gᵀ) ⊙ (x·Uᵀ) for bf16 with the gate G and up U weights packed together by
/// [`PackedBf16::glu`], the reference's roundings (each product, the silu, the product).
pub fn glu_bf16(x: &Tensor, glu: &PackedBf16) -> Result<Tensor> {
    let rows = linear_rows(x, glu.k)?;
    let f = glu.n / 2;
    let out = with_slice::<bf16, _>(&x.to_dtype(DType::BF16)?, |a| {
        gemm::bf16gemm_vec(rows, a, glu.k, glu, gemm::Bf16New::Glu)
    })?;
    Tensor::from_vec(out, (rows, f), &Device::Cpu)
}

/// Batched a·bᵀ (transpose_b) or a·b over the last two dims of rank-3/4 CPU tensors with equal
/// batch dims, in f32 or bf16 (f32 accumulation). `None` when no fast kernel applies.
pub fn batched_matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Option<Result<Tensor>> {
    let f = gemm::cpu_features();
    if !matches!(a.device(), Device::Cpu) || a.dtype() != b.dtype() || a.rank() < 2 {
        return None;
    }
    match a.dtype() {
        DType::F32 if f.avx512f => Some(batched_f32(a, b, transpose_b)),
        DType::BF16 if f.avx512f => Some(batched_bf16(a, b, transpose_b)),
        _ => None,
    }
}

fn batch_dims(
    a: &Tensor,
    b: &Tensor,
    transpose_b: bool,
) -> Result<(Vec<usize>, usize, usize, usize)> {
    let ad = a.dims();
    let bd = b.dims();
    let r = ad.len();
    if bd.len() != r || ad[..r - 2] != bd[..r - 2] {
        candle_core::bail!("batched matmul: shapes {ad:?} and {bd:?}");
    }
    let (m, k) = (ad[r - 2], ad[r - 1]);
    let (kb, n) = if transpose_b {
        (bd[r - 1], bd[r - 2])
    } else {
        (bd[r - 2], bd[r - 1])
    };
    if k != kb {
        candle_core::bail!("batched matmul: inner dims {k} and {kb}");
    }
    let mut out = ad[..r - 2].to_vec();
    out.push(m);
    out.push(n);
    Ok((out, m, n, k))
}

fn batched_f32(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    let (shape, m, n, k) = batch_dims(a, b, transpose_b)?;
    let batch: usize = shape[..shape.len() - 2].iter().product();
    let mut out = vec![0f32; batch * m * n];
    with_slice::<f32, _>(a, |av| {
        with_slice::<f32, _>(b, |bv| {
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
                let ai = &av[i * m * k..(i + 1) * m * k];
                let bi = &bv[i * k * n..(i + 1) * k * n];
                let ao = AOperand {
                    data: ai,
                    rs: k,
                    cs: 1,
                };
                if transpose_b {
                    let pk = PackedF32::from_weight(bi, n, k);
                    gemm::sgemm(m, n, k, ao, BOperand::Packed(&pk), c, n, false);
                } else {
                    gemm::sgemm(m, n, k, ao, BOperand::Rows { data: bi, ld: n }, c, n, false);
                }
            })
        })
    })??;
    Tensor::from_vec(out, shape, &Device::Cpu)
}

fn batched_bf16(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    let (shape, m, n, k) = batch_dims(a, b, transpose_b)?;
    let batch: usize = shape[..shape.len() - 2].iter().product();
    let mut out = vec![0f32; batch * m * n];
    with_slice::<bf16, _>(a, |av| {
        with_slice::<bf16, _>(b, |bv| {
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
                let ai = &av[i * m * k..(i + 1) * m * k];
                let bi = &bv[i * k * n..(i + 1) * k * n];
                let pk = if transpose_b {
                    PackedBf16::from_weight(bi, n, k)
                } else {
                    PackedBf16::from_rows(bi, k, n)
                };
                if k % 2 == 0 {
                    gemm::bf16gemm(m, ai, k, &pk, c, n);
                } else {
                    // odd depth: widen to f32 (rare: head dims are even)
                    let af: Vec<f32> = ai.iter().map(|x| x.to_f32()).collect();
                    let w: Vec<f32> = pk.to_weight().iter().map(|x| x.to_f32()).collect();
                    let pf = PackedF32::from_weight(&w, n, k);
                    gemm::sgemm(
                        m,
                        n,
                        k,
                        AOperand {
                            data: &af,
                            rs: k,
                            cs: 1,
                        },
                        BOperand::Packed(&pf),
                        c,
                        n,
                        false,
                    );
                }
            })
        })
    })??;
    Tensor::from_vec(to_bf16_vec(out), shape, &Device::Cpu)
}

/// Rows per rayon task in the element-wise kernels.
const ROWS_PER_TASK: usize = 8;
/// Elements per rayon task in the element-wise kernels.
const ELEMS_PER_TASK: usize = 8192;

fn elementwise_ok(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.is_contiguous())
        && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
        && matches!(ts[0].dtype(), DType::F32 | DType::BF16)
}

super::simd_fn! {
    fn rms_rows_f32(o: &mut [f32], i: &[f32], w: &[f32], d: usize, eps: f32) {
        for (or, ir) in o.chunks_mut(d).zip(i.chunks(d)) {
            let mut acc = [0f32; 16];
            let mut ch = ir.chunks_exact(16);
            for c in &mut ch {
                for l in 0..16 {
                    acc[l] += c[l] * c[l];
                }
            }
            let mut ss: f32 = acc.iter().sum();
            for &v in ch.remainder() {
                ss += v * v;
            }
            let r = 1.0 / (ss / d as f32 + eps).sqrt();
            for ((o, &v), &wv) in or.iter_mut().zip(ir).zip(w) {
                *o = v * r * wv;
            }
        }
    }
}

super::simd_fn! {
    fn rms_rows_bf16(o: &mut [bf16], i: &[bf16], w: &[f32], d: usize, eps: f32) {
        for (or, ir) in o.chunks_mut(d).zip(i.chunks(d)) {
            let mut acc = [0f32; 16];
            let mut ch = ir.chunks_exact(16);
            for c in &mut ch {
                for l in 0..16 {
                    let v = c[l].to_f32();
                    acc[l] += v * v;
                }
            }
            let mut ss: f32 = acc.iter().sum();
            for v in ch.remainder() {
                ss += v.to_f32() * v.to_f32();
            }
            let r = 1.0 / (ss / d as f32 + eps).sqrt();
            for ((o, &v), &wv) in or.iter_mut().zip(ir).zip(w) {
                // reference rounding: x/rms cast to bf16, then the bf16 product with the weight
                let normed = super::math::round_bf16(v.to_f32() * r);
                *o = super::math::to_bf16(normed * wv);
            }
        }
    }
}

/// RMSNorm over the last dim, reference rounding: statistics in f32, x/rms cast to the dtype,
/// then multiplied by the weight in the dtype. `None` if not a contiguous f32/bf16 CPU tensor.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    if !elementwise_ok(&[x, w]) || x.rank() < 1 {
        return None;
    }
    Some((|| {
        let d = w.dim(0)?;
        let shape = x.shape().clone();
        let eps = eps as f32;
        match x.dtype() {
            DType::F32 => {
                let out = with_slice::<f32, _>(x, |xs| {
                    with_slice::<f32, _>(w, |ws| {
                        let mut out = vec![0f32; xs.len()];
                        out.par_chunks_mut(d * ROWS_PER_TASK)
                            .zip(xs.par_chunks(d * ROWS_PER_TASK))
                            .for_each(|(o, i)| rms_rows_f32(o, i, ws, d, eps));
                        out
                    })
                })??;
                Tensor::from_vec(out, shape, &Device::Cpu)
            }
            _ => {
                let out = with_slice::<bf16, _>(x, |xs| {
                    with_slice::<bf16, _>(w, |ws| {
                        let wf: Vec<f32> = ws.iter().map(|v| v.to_f32()).collect();
                        let mut out = vec![bf16::ZERO; xs.len()];
                        out.par_chunks_mut(d * ROWS_PER_TASK)
                            .zip(xs.par_chunks(d * ROWS_PER_TASK))
                            .for_each(|(o, i)| rms_rows_bf16(o, i, &wf, d, eps));
                        out
                    })
                })??;
                Tensor::from_vec(out, shape, &Device::Cpu)
            }
        }
    })())
}

super::simd_fn! {
    fn silu_mul_f32(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    }
}

super::simd_fn! {
    fn silu_mul_bf16(o: &mut [bf16], g: &[bf16], u: &[bf16]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            // two bf16 ops as the reference: silu rounded, then the product rounded
            let s = super::math::round_bf16(silu(g.to_f32()));
            *o = super::math::to_bf16(s * u.to_f32());
        }
    }
}

super::simd_fn! {
    fn add_f32(o: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

super::simd_fn! {
    fn add_bf16(o: &mut [bf16], a: &[bf16], b: &[bf16]) {
        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
            *o = super::math::to_bf16(x.to_f32() + y.to_f32());
        }
    }
}

/// An element-wise binary kernel over two contiguous CPU tensors of one dtype.
fn binary(
    a: &Tensor,
    b: &Tensor,
    f32_fn: fn(&mut [f32], &[f32], &[f32]),
    bf16_fn: fn(&mut [bf16], &[bf16], &[bf16]),
) -> Option<Result<Tensor>> {
    if !elementwise_ok(&[a, b]) || a.shape() != b.shape() {
        return None;
    }
    Some((|| {
        let shape = a.shape().clone();
        match a.dtype() {
            DType::F32 => {
                let out = with_slice::<f32, _>(a, |x| {
                    with_slice::<f32, _>(b, |y| {
                        let mut out = vec![0f32; x.len()];
                        out.par_chunks_mut(ELEMS_PER_TASK)
                            .zip(
                                x.par_chunks(ELEMS_PER_TASK)
                                    .zip(y.par_chunks(ELEMS_PER_TASK)),
                            )
                            .for_each(|(o, (x, y))| f32_fn(o, x, y));
                        out
                    })
                })??;
                Tensor::from_vec(out, shape, &Device::Cpu)
            }
            _ => {
                let out = with_slice::<bf16, _>(a, |x| {
                    with_slice::<bf16, _>(b, |y| {
                        let mut out = vec![bf16::ZERO; x.len()];
                        out.par_chunks_mut(ELEMS_PER_TASK)
                            .zip(
                                x.par_chunks(ELEMS_PER_TASK)
                                    .zip(y.par_chunks(ELEMS_PER_TASK)),
                            )
                            .for_each(|(o, (x, y))| bf16_fn(o, x, y));
                        out
                    })
                })??;
                Tensor::from_vec(out, shape, &Device::Cpu)
            }
        }
    })())
}

/// silu(g) ⊙ u (bf16: silu rounded to bf16, then the product rounded, as two bf16 ops).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Option<Result<Tensor>> {
    binary(g, u, silu_mul_f32, silu_mul_bf16)
}

/// a + b (same shape), with one rounding for bf16.
pub fn add(a: &Tensor, b: &Tensor) -> Option<Result<Tensor>> {
    binary(a, b, add_f32, add_bf16)
}
