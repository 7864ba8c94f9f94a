//! A differentiable matrix product for training on CPU: candle's `CustomOp2` whose forward runs
//! the AVX-512 GEMM on any strided operands (transposed views included) and whose backward is two
//! more products with the same op, so training never goes through the slower generic GEMM.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{self, AOperand, BOperand, PackedF32};

struct MatMul;

/// Offsets of each batch matrix for the leading dims of a layout.
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let r = dims.len();
    let mut offs = vec![l.start_offset()];
    for d in 0..r - 2 {
        let mut next = Vec::with_capacity(offs.len() * dims[d]);
        for &o in &offs {
            for i in 0..dims[d] {
                next.push(o + i * strides[d]);
            }
        }
        offs = next;
    }
    offs
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "llada-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => (a.as_slice(), b.as_slice()),
            _ => candle_core::bail!("llada-matmul: f32 only"),
        };
        let (ad, bd) = (l1.dims(), l2.dims());
        let r = ad.len();
        if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
            candle_core::bail!("llada-matmul: shapes {ad:?} · {bd:?}");
        }
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let (sa, sb) = (l1.stride(), l2.stride());
        let (a_rs, a_cs) = (sa[r - 2], sa[r - 1]);
        let (b_rs, b_cs) = (sb[r - 2], sb[r - 1]);
        let ao = batch_offsets(l1);
        let bo = batch_offsets(l2);
        let mut out = vec![0f32; ao.len() * m * n];
        out.par_chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, c)| {
                let a_op = AOperand {
                    data: &a[ao[i]..],
                    rs: a_rs,
                    cs: a_cs,
                };
                if b_cs == 1 || n == 1 {
                    let ld = if n == 1 { b_rs.max(1) } else { b_rs };
                    gemm::sgemm(
                        m,
                        n,
                        k,
                        a_op,
                        BOperand::Rows {
                            data: &b[bo[i]..],
                            ld,
                        },
                        c,
                        n,
                        false,
                    );
                } else {
                    // b(p, j) = b[p·b_rs + j·b_cs]: pack the columns as panels
                    let pk = PackedF32::from_strided(&b[bo[i]..], n, k, b_cs, b_rs);
                    gemm::sgemm(m, n, k, a_op, BOperand::Packed(&pk), c, n, false);
                }
            });
        let mut shape = ad[..r - 2].to_vec();
        shape.extend([m, n]);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = a.rank();
        let da = matmul(grad, &b.transpose(r - 2, r - 1)?)?;
        let db = matmul(&a.transpose(r - 2, r - 1)?, grad)?;
        Ok((Some(da), Some(db)))
    }
}

/// a·b over the last two dims (same batch dims), differentiable; the AVX-512 GEMM on f32 CPU
/// tensors, candle's matmul otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if matches!(a.device(), Device::Cpu)
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && gemm::cpu_features().avx512f
        && a.rank() >= 2
    {
        return a.apply_op2(b, MatMul);
    }
    a.matmul(b)
}

/// x·Wᵀ for a frozen W (a LoRA base, a frozen head): differentiable in x only. candle's matmul
/// backward computes the gradient of both operands, so a frozen weight would cost a full weight
/// gradient (memory and a third of the backward's products) that nothing reads.
struct FrozenRight {
    /// Wᵀ [in, out] (a view).
    wt: Tensor,
}

/// The CPU tensor of a contiguous storage and layout (a copy).
fn cpu_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("llada-frozen-matmul: strided input".into()))?;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.dims(), &Device::Cpu),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], l.dims(), &Device::Cpu),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], l.dims(), &Device::Cpu),
        _ => candle_core::bail!("llada-frozen-matmul: f32, bf16 or f16 only"),
    }
}

impl candle_core::CustomOp1 for FrozenRight {
    fn name(&self) -> &'static str {
        "llada-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(s, l)?;
        let y = matmul(&x, &self.wt)?.contiguous()?;
        let shape = y.shape().clone();
        let (st, yl) = y.storage_and_layout();
        let (start, end) = yl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("llada-frozen-matmul: output".into()))?;
        let out = match &*st {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
                CpuStorage::F32(v[start..end].to_vec())
            }
            candle_core::Storage::Cpu(CpuStorage::BF16(v)) => {
                CpuStorage::BF16(v[start..end].to_vec())
            }
            candle_core::Storage::Cpu(CpuStorage::F16(v)) => {
                CpuStorage::F16(v[start..end].to_vec())
            }
            _ => candle_core::bail!("llada-frozen-matmul: unexpected output storage"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let r = self.wt.rank();
        Ok(Some(matmul(grad, &self.wt.transpose(r - 2, r - 1)?)?))
    }
}

/// x·Wᵀ (`w` [out, in]) for training, differentiable in x; in W too unless W is frozen (neither
/// a variable nor computed from one), whose gradient is then never computed (CPU; elsewhere
/// candle's matmul, which computes it and drops it).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let wt = w.t()?;
    if w.track_op() || !x.track_op() || !matches!(x.device(), Device::Cpu) || x.rank() != 2 {
        return matmul(x, &wt);
    }
    x.contiguous()?.apply_op1(FrozenRight { wt })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// max |a − b| (in f32).
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn forward_and_gradients_match_candle() {
        let dev = Device::Cpu;
        for (shape_a, shape_b, ta, tb) in [
            (vec![5usize, 7], vec![7usize, 3], false, false),
            (vec![7, 5], vec![3, 7], true, true),
            (vec![2, 3, 33, 20], vec![2, 3, 20, 35], false, false),
            (vec![2, 3, 20, 33], vec![2, 3, 20, 35], true, false),
        ] {
            let a0 = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape_a.as_slice(), &dev).unwrap())
                .unwrap();
            let b0 = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape_b.as_slice(), &dev).unwrap())
                .unwrap();
            let r = shape_a.len();
            let a = if ta {
                a0.as_tensor().transpose(r - 2, r - 1).unwrap()
            } else {
                a0.as_tensor().clone()
            };
            let b = if tb {
                b0.as_tensor().transpose(r - 2, r - 1).unwrap()
            } else {
                b0.as_tensor().clone()
            };
            let w = Tensor::randn(0f32, 1.0, a.matmul(&b).unwrap().shape(), &dev).unwrap();
            let ours = matmul(&a, &b).unwrap();
            let theirs = a.matmul(&b).unwrap();
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "forward {d}");
            let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&a0, &b0] {
                let x = g1.get(v.as_tensor()).unwrap();
                let y = g2.get(v.as_tensor()).unwrap();
                let d = max_abs_diff(x, y);
                assert!(d < 1e-4, "gradient {d}");
            }
        }
    }

    /// A frozen weight: the same product and input gradient as the plain product, and no
    /// gradient computed for the weight.
    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (9, 20), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let w = Tensor::randn(0f32, 1.0, (13, 20), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let r = Tensor::randn(0f32, 1.0, (9, 13), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let y = matmul_t(x.as_tensor(), &w).unwrap();
            let y0 = matmul(x.as_tensor(), &w.t().unwrap()).unwrap();
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(bits(&y), bits(&y0));
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g0 = (y0 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (gx, gx0) = (
                g.get(x.as_tensor()).unwrap(),
                g0.get(x.as_tensor()).unwrap(),
            );
            let err = max_abs_diff(gx, gx0);
            assert!(err <= 1e-2, "{dt:?}: input gradient differs by {err}");
            assert!(g.get(&w).is_none(), "a frozen weight got a gradient");
            // candle's product computes one (for the transposed view): the waste avoided
            assert!(g0.get_ids().count() > g.get_ids().count());
        }
    }
}
