//! Fused CPU attention for inference: RoPE (f32), q·kᵀ, scaled masked softmax (f32) and p·v with
//! the AVX-512 GEMM, reading q/k/v in the projections' row layout `[B·L, heads·hd]` and writing
//! the output in the same layout, so heads are never split or merged by copies.
//!
//! Rotated keys and the values live in a [`KvStore`], packed per (sequence, KV head) for the GEMM;
//! rows can be rewritten, which is what the Fast-dLLM caches need (reference §6.4).

use half::bf16;
use rayon::prelude::*;

use super::gemm::{self, AOperand, BOperand, PackedBf16, PackedF32, NR};

/// Rows of queries per parallel task (bounds the score scratch to QC × Lk).
const QC: usize = 64;

/// Element types the fused attention handles.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// cos/sin tables [positions][hd/2] in f32.
pub struct RopeTables<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub half: usize,
}

/// Packed keys and values of `batch` sequences × `kv_heads` heads, `len` positions each.
pub enum KvStore {
    F32 {
        /// Per (b, g): K as the B operand of q·kᵀ, `[⌈len/32⌉][hd][32]`.
        k: Vec<PackedF32>,
        /// Per (b, g): V rows `[len][hd]`.
        v: Vec<Vec<f32>>,
    },
    Bf16 {
        /// Per (b, g): K packed in dim pairs, `[⌈len/32⌉][hd/2][32]`.
        k: Vec<PackedBf16>,
        /// Per (b, g): V as the B operand of p·v, packed in key pairs `[⌈hd/32⌉][⌈len/2⌉][32]`.
        v: Vec<PackedBf16>,
    },
}

/// Shape of a [`KvStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub len: usize,
}

impl KvStore {
    /// An empty store (all zeros) for f32 or bf16 elements.
    pub fn new(shape: KvShape, bf16: bool) -> Self {
        let n = shape.batch * shape.kv_heads;
        let (l, hd) = (shape.len, shape.head_dim);
        if bf16 {
            KvStore::Bf16 {
                k: (0..n)
                    .map(|_| PackedBf16 {
                        n: l,
                        k: hd,
                        data: vec![0; l.div_ceil(NR) * hd.div_ceil(2) * NR],
                    })
                    .collect(),
                v: (0..n)
                    .map(|_| PackedBf16 {
                        n: hd,
                        k: l,
                        data: vec![0; hd.div_ceil(NR) * l.div_ceil(2) * NR],
                    })
                    .collect(),
            }
        } else {
            KvStore::F32 {
                k: (0..n)
                    .map(|_| PackedF32 {
                        n: l,
                        k: hd,
                        data: vec![0.0; l.div_ceil(NR) * hd * NR],
                    })
                    .collect(),
                v: (0..n).map(|_| vec![0.0; l * hd]).collect(),
            }
        }
    }

    /// Writes positions `start..start+rows` of every sequence from the projections `k`, `v`
    /// (`[batch·rows, kv_heads·hd]`, row-major); keys are rotated at their absolute positions.
    pub fn write<T: Elem>(
        &mut self,
        shape: KvShape,
        start: usize,
        rows: usize,
        k: &[T],
        v: &[T],
        rope: &RopeTables<'_>,
    ) {
        let (hkv, hd) = (shape.kv_heads, shape.head_dim);
        let width = hkv * hd;
        let l = shape.len;
        // rotated keys and values of one (sequence, head), in f32, rounded through T as the
        // reference casts after RoPE
        let gather = |b: usize, g: usize| -> (Vec<f32>, Vec<f32>) {
            let mut kr = vec![0f32; rows * hd];
            let mut vr = vec![0f32; rows * hd];
            let mut x = vec![0f32; hd];
            for i in 0..rows {
                let src = (b * rows + i) * width + g * hd;
                for d in 0..hd {
                    x[d] = k[src + d].to_f32();
                    vr[i * hd + d] = v[src + d].to_f32();
                }
                rotate_row(
                    &x,
                    &mut kr[i * hd..(i + 1) * hd],
                    rope.cos,
                    rope.sin,
                    start + i,
                    rope.half,
                );
            }
            for x in kr.iter_mut() {
                *x = T::from_f32(*x).to_f32();
            }
            (kr, vr)
        };
        match self {
            KvStore::F32 { k: ks, v: vs } => {
                ks.par_iter_mut()
                    .zip(vs.par_iter_mut())
                    .enumerate()
                    .for_each(|(bg, (kp, vdst))| {
                        let (kr, vr) = gather(bg / hkv, bg % hkv);
                        for i in 0..rows {
                            let pos = start + i;
                            let base = (pos / NR) * hd * NR + pos % NR;
                            for d in 0..hd {
                                kp.data[base + d * NR] = kr[i * hd + d];
                            }
                        }
                        vdst[start * hd..(start + rows) * hd].copy_from_slice(&vr);
                    });
            }
            KvStore::Bf16 { k: ks, v: vs } => {
                let hd2 = hd.div_ceil(2);
                let l2 = l.div_ceil(2);
                let bits = |x: f32| bf16::from_f32(x).to_bits() as u32;
                ks.par_iter_mut()
                    .zip(vs.par_iter_mut())
                    .enumerate()
                    .for_each(|(bg, (kp, vp))| {
                        let (kr, vr) = gather(bg / hkv, bg % hkv);
                        for i in 0..rows {
                            let pos = start + i;
                            let base = (pos / NR) * hd2 * NR + pos % NR;
                            let row = &kr[i * hd..(i + 1) * hd];
                            for e in 0..hd / 2 {
                                kp.data[base + e * NR] =
                                    bits(row[2 * e]) | (bits(row[2 * e + 1]) << 16);
                            }
                            if hd % 2 == 1 {
                                kp.data[base + (hd / 2) * NR] = bits(row[hd - 1]);
                            }
                        }
                        // values: pairs of consecutive keys share a u32
                        for i in 0..rows {
                            let pos = start + i;
                            let row = &vr[i * hd..(i + 1) * hd];
                            for (d, &x) in row.iter().enumerate() {
                                let vi = (d / NR) * l2 * NR + (pos / 2) * NR + d % NR;
                                set_half(&mut vp.data[vi], pos % 2, bits(x));
                            }
                        }
                    });
            }
        }
    }
}

super::simd_fn! {
    /// Rotate-half RoPE of one head vector at position `pos` (f32).
    fn rotate_row(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], pos: usize, half: usize) {
        let (c, s) = (&cos[pos * half..pos * half + half], &sin[pos * half..pos * half + half]);
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        for i in 0..half {
            o1[i] = x1[i] * c[i] - x2[i] * s[i];
            o2[i] = x2[i] * c[i] + x1[i] * s[i];
        }
    }
}

#[inline(always)]
fn set_half(slot: &mut u32, high: usize, bits: u32) {
    if high == 1 {
        *slot = (*slot & 0x0000_FFFF) | (bits << 16);
    } else {
        *slot = (*slot & 0xFFFF_0000) | bits;
    }
}

/// Which keys a query may see.
pub struct KeyMask<'a> {
    /// Per sequence and key position: false for padding (`[batch][len]`), or `None`.
    pub valid: Option<&'a [Vec<bool>]>,
    /// Causal: a query at position p sees keys ≤ p.
    pub causal: bool,
}

super::simd_fn! {
    /// row[..visible] ← softmax(row·scale + bias), row[visible..] ← 0.
    fn softmax_row(row: &mut [f32], visible: usize, scale: f32, bias: Option<&[f32]>) {
        let (vis, hidden) = row.split_at_mut(visible);
        match bias {
            Some(bv) => {
                for (x, &bb) in vis.iter_mut().zip(bv) {
                    *x = *x * scale + bb;
                }
            }
            None => {
                for x in vis.iter_mut() {
                    *x *= scale;
                }
            }
        }
        let m = super::math::max(vis);
        let z = super::math::exp_sub_sum(vis, m);
        let inv = 1.0 / z;
        for x in vis.iter_mut() {
            *x *= inv;
        }
        hidden.fill(0.0);
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Attention of queries `q` (`[batch·rows, heads·hd]`, positions `q_start..q_start+rows`, not yet
/// rotated) over every key of `kv`; returns `[batch·rows, heads·hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Elem>(
    q: &[T],
    shape: KvShape,
    heads: usize,
    q_start: usize,
    rows: usize,
    kv: &KvStore,
    mask: &KeyMask<'_>,
    rope: &RopeTables<'_>,
) -> Vec<T> {
    let (b_n, hkv, hd, lk) = (shape.batch, shape.kv_heads, shape.head_dim, shape.len);
    let rep = heads / hkv;
    let width = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![T::from_f32(0.0); b_n * rows * width];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let chunks = rows.div_ceil(QC);
    // padded keys: an additive −∞ per (sequence, key); their weight underflows to 0
    let key_bias: Option<Vec<Vec<f32>>> = mask.valid.map(|v| {
        v.iter()
            .map(|r| {
                r.iter()
                    .map(|&ok| if ok { 0.0 } else { f32::NEG_INFINITY })
                    .collect()
            })
            .collect()
    });
    let tasks: Vec<(usize, usize, usize)> = (0..b_n)
        .flat_map(|b| (0..heads).flat_map(move |h| (0..chunks).map(move |c| (b, h, c))))
        .collect();
    tasks.par_iter().for_each(|&(b, h, c)| {
        let g = h / rep;
        let (i0, i1) = (c * QC, ((c + 1) * QC).min(rows));
        let n = i1 - i0;
        // rotated queries of the chunk, [n, hd]
        let mut qr = vec![0f32; n * hd];
        let mut x = vec![0f32; hd];
        for i in 0..n {
            let src = (b * rows + i0 + i) * width + h * hd;
            for d in 0..hd {
                x[d] = q[src + d].to_f32();
            }
            rotate_row(
                &x,
                &mut qr[i * hd..(i + 1) * hd],
                rope.cos,
                rope.sin,
                q_start + i0 + i,
                rope.half,
            );
        }
        // scores [n, lk]
        let mut s = vec![0f32; n * lk];
        let bg = b * hkv + g;
        match kv {
            KvStore::F32 { k, .. } => {
                gemm::sgemm(
                    n,
                    lk,
                    hd,
                    AOperand {
                        data: &qr,
                        rs: hd,
                        cs: 1,
                    },
                    BOperand::Packed(&k[bg]),
                    &mut s,
                    lk,
                    false,
                );
            }
            KvStore::Bf16 { k, .. } => {
                let qb: Vec<bf16> = qr.iter().map(|&v| bf16::from_f32(v)).collect();
                gemm::bf16gemm(n, &qb, hd, &k[bg], &mut s, lk);
            }
        }
        // scaled, masked softmax in f32 over the keys each query sees
        let bias = key_bias.as_ref().map(|kb| kb[b].as_slice());
        for i in 0..n {
            let row = &mut s[i * lk..(i + 1) * lk];
            let visible = if mask.causal {
                (q_start + i0 + i + 1).min(lk)
            } else {
                lk
            };
            softmax_row(row, visible, scale, bias);
        }
        // o = p·v, written into the output rows of this head
        let mut o = vec![0f32; n * hd];
        match kv {
            KvStore::F32 { v, .. } => {
                gemm::sgemm(
                    n,
                    hd,
                    lk,
                    AOperand {
                        data: &s,
                        rs: lk,
                        cs: 1,
                    },
                    BOperand::Rows {
                        data: &v[bg],
                        ld: hd,
                    },
                    &mut o,
                    hd,
                    false,
                );
            }
            KvStore::Bf16 { v, .. } => {
                let pb: Vec<bf16> = s.iter().map(|&x| bf16::from_f32(x)).collect();
                if lk % 2 == 0 {
                    gemm::bf16gemm(n, &pb, lk, &v[bg], &mut o, hd);
                } else {
                    let mut padded = vec![bf16::ZERO; n * (lk + 1)];
                    for i in 0..n {
                        padded[i * (lk + 1)..i * (lk + 1) + lk]
                            .copy_from_slice(&pb[i * lk..(i + 1) * lk]);
                    }
                    let vp = PackedBf16 {
                        n: v[bg].n,
                        k: lk + 1,
                        data: v[bg].data.clone(),
                    };
                    gemm::bf16gemm(n, &padded, lk + 1, &vp, &mut o, hd);
                }
            }
        }
        for i in 0..n {
            let dst = (b * rows + i0 + i) * width + h * hd;
            for d in 0..hd {
                // SAFETY: each task writes its own (rows, head) block of `out`.
                unsafe { *out_ptr.get().add(dst + d) = T::from_f32(o[i * hd + d]) };
            }
        }
    });
    out
}
