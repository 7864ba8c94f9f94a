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
    /// dst ← src widened to f32 (vectorised).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// dst ← src rounded to this type (vectorised).
    fn narrow(src: &[f32], dst: &mut [Self]);
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
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        super::math::to_bf16(x)
    }
    fn widen(src: &[bf16], dst: &mut [f32]) {
        super::cpu::bf16_to_f32(dst, src)
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        super::cpu::f32_to_bf16(dst, src)
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
        // rotated keys [rows, hd] of one (sequence, head) in f32, rounded through T as the
        // reference casts after RoPE
        let keys = |b: usize, g: usize| -> Vec<f32> {
            let mut x = vec![0f32; rows * hd];
            for i in 0..rows {
                let src = (b * rows + i) * width + g * hd;
                T::widen(&k[src..src + hd], &mut x[i * hd..(i + 1) * hd]);
            }
            let mut kr = vec![0f32; rows * hd];
            rope_rows(&x, &mut kr, hd, rope.cos, rope.sin, start, rope.half);
            let mut t = vec![T::from_f32(0.0); rows * hd];
            T::narrow(&kr, &mut t);
            T::widen(&t, &mut kr);
            kr
        };
        match self {
            KvStore::F32 { k: ks, v: vs } => {
                ks.par_iter_mut()
                    .zip(vs.par_iter_mut())
                    .enumerate()
                    .for_each(|(bg, (kp, vdst))| {
                        let (b, g) = (bg / hkv, bg % hkv);
                        let kr = keys(b, g);
                        for i in 0..rows {
                            let pos = start + i;
                            let base = (pos / NR) * hd * NR + pos % NR;
                            for d in 0..hd {
                                kp.data[base + d * NR] = kr[i * hd + d];
                            }
                            let src = (b * rows + i) * width + g * hd;
                            T::widen(&v[src..src + hd], &mut vdst[pos * hd..(pos + 1) * hd]);
                        }
                    });
            }
            KvStore::Bf16 { k: ks, v: vs } => {
                let hd2 = hd.div_ceil(2);
                let l2 = l.div_ceil(2);
                let bits = |x: f32| super::math::bf16_bits(x) as u32;
                ks.par_iter_mut()
                    .zip(vs.par_iter_mut())
                    .enumerate()
                    .for_each(|(bg, (kp, vp))| {
                        let (b, g) = (bg / hkv, bg % hkv);
                        let kr = keys(b, g);
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
                        // values: keys 2p and 2p+1 share the u32s of pair p, per 32 dims
                        let mut vf = vec![0f32; rows * hd];
                        for i in 0..rows {
                            let src = (b * rows + i) * width + g * hd;
                            T::widen(&v[src..src + hd], &mut vf[i * hd..(i + 1) * hd]);
                        }
                        let vb: Vec<u32> = vf.iter().map(|&x| bits(x)).collect();
                        let vrow = |i: usize| &vb[i * hd..(i + 1) * hd];
                        let mut i = 0;
                        while i < rows {
                            let pos = start + i;
                            let lo = vrow(i);
                            if pos.is_multiple_of(2) && i + 1 < rows {
                                // a whole pair: write both halves at once
                                let hi = vrow(i + 1);
                                for d0 in (0..hd).step_by(NR) {
                                    let w = NR.min(hd - d0);
                                    let dst = (d0 / NR) * l2 * NR + (pos / 2) * NR;
                                    for d in 0..w {
                                        vp.data[dst + d] = lo[d0 + d] | (hi[d0 + d] << 16);
                                    }
                                }
                                i += 2;
                            } else {
                                for (d, &x) in lo.iter().enumerate() {
                                    let vi = (d / NR) * l2 * NR + (pos / 2) * NR + d % NR;
                                    set_half(&mut vp.data[vi], pos % 2, x);
                                }
                                i += 1;
                            }
                        }
                    });
            }
        }
    }
}

super::simd_fn! {
    /// Rotate-half RoPE of rows of `hd` values (`x` [n, hd] → `out`), row i at position
    /// `pos0 + i` (f32).
    fn rope_rows(x: &[f32], out: &mut [f32], hd: usize, cos: &[f32], sin: &[f32], pos0: usize,
                 half: usize) {
        for (i, (xr, or)) in x.chunks(hd).zip(out.chunks_mut(hd)).enumerate() {
            let pos = pos0 + i;
            let (c, s) = (&cos[pos * half..pos * half + half], &sin[pos * half..pos * half + half]);
            let (x1, x2) = xr.split_at(half);
            let (o1, o2) = or.split_at_mut(half);
            for j in 0..half {
                o1[j] = x1[j] * c[j] - x2[j] * s[j];
                o2[j] = x2[j] * c[j] + x1[j] * s[j];
            }
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

/// Which keys a query sees, besides padding (the attention mask's shape).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Visibility {
    /// Every key (bidirectional: the diffusion models).
    #[default]
    All,
    /// Keys up to the query's own position (the autoregressive twin; LLaDA2 with a 2-D padding
    /// mask, as its official forward).
    Causal,
    /// Block diffusion (LLaDA2): blocks of `block` positions counted from absolute position 0;
    /// keys in the query's block and the blocks before it get `allowed` added to their scaled
    /// scores, keys in later blocks `blocked` (−∞: not seen). LLaDA2.0's mask is (0, −∞);
    /// LLaDA2.1's official 0/1 mask is (1, 0), which masks nothing.
    Blocks {
        block: usize,
        allowed: f32,
        blocked: f32,
    },
}

impl Visibility {
    /// For a query at `pos` over `lk` keys: how many keys it sees at all (a prefix), and the
    /// additive split (keys before `end` get `a`, the others `b`) when there is one.
    #[inline(always)]
    fn of(self, pos: usize, lk: usize) -> (usize, Option<(usize, f32, f32)>) {
        match self {
            Visibility::All => (lk, None),
            Visibility::Causal => ((pos + 1).min(lk), None),
            Visibility::Blocks {
                block,
                allowed,
                blocked,
            } => {
                let end = ((pos / block.max(1)) + 1)
                    .saturating_mul(block.max(1))
                    .min(lk);
                if blocked == f32::NEG_INFINITY {
                    (end, (allowed != 0.0).then_some((end, allowed, 0.0)))
                } else {
                    (lk, Some((end, allowed, blocked)))
                }
            }
        }
    }
}

/// Which keys a query may see.
pub struct KeyMask<'a> {
    /// Per sequence and key position: false for padding (`[batch][len]`), or `None`.
    pub valid: Option<&'a [Vec<bool>]>,
    /// The mask's shape (bidirectional, causal, block-causal).
    pub visibility: Visibility,
}

/// row[..visible] ← softmax(row·scale + bias (+ the split's additions)), row[visible..] ← 0. A
/// row that sees no key at all (every visible key padded) gets uniform weights over its visible
/// keys, as PyTorch's CPU attention gives a row whose mask is all `finfo.min`: its output is
/// meaningless but finite.
#[inline(always)]
fn softmax_row(
    row: &mut [f32],
    visible: usize,
    scale: f32,
    bias: Option<&[f32]>,
    split: Option<(usize, f32, f32)>,
) {
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
    if let Some((end, a, b)) = split {
        for (j, x) in vis.iter_mut().enumerate() {
            *x += if j < end { a } else { b };
        }
    }
    let m = super::math::max(vis);
    if m == f32::NEG_INFINITY {
        let u = 1.0 / vis.len().max(1) as f32;
        vis.fill(u);
        hidden.fill(0.0);
        return;
    }
    let z = super::math::exp_sub_sum(vis, m);
    let inv = 1.0 / z;
    for x in vis.iter_mut() {
        *x *= inv;
    }
    hidden.fill(0.0);
}

super::simd_fn! {
    /// Softmax of each row of scores `s` [n, lk] (see [`softmax_row`]); row i is the query at
    /// position `pos0 + i`, which sees the keys `visibility` says.
    fn softmax_rows(s: &mut [f32], lk: usize, pos0: usize, visibility: Visibility, scale: f32,
                    bias: Option<&[f32]>) {
        for (i, row) in s.chunks_mut(lk).enumerate() {
            let (visible, split) = visibility.of(pos0 + i, lk);
            softmax_row(row, visible, scale, bias, split);
        }
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
        let mut x = vec![0f32; n * hd];
        for i in 0..n {
            let src = (b * rows + i0 + i) * width + h * hd;
            T::widen(&q[src..src + hd], &mut x[i * hd..(i + 1) * hd]);
        }
        let mut qr = vec![0f32; n * hd];
        rope_rows(&x, &mut qr, hd, rope.cos, rope.sin, q_start + i0, rope.half);
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
                let mut qb = vec![bf16::ZERO; n * hd];
                bf16::narrow(&qr, &mut qb);
                gemm::bf16gemm(n, &qb, hd, &k[bg], &mut s, lk);
            }
        }
        // scaled, masked softmax in f32 over the keys each query sees
        let bias = key_bias.as_ref().map(|kb| kb[b].as_slice());
        softmax_rows(&mut s, lk, q_start + i0, mask.visibility, scale, bias);
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
                let mut pb = vec![bf16::ZERO; n * lk];
                bf16::narrow(&s, &mut pb);
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
            // SAFETY: each task writes its own (rows, head) block of `out`.
            let row = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(dst), hd) };
            T::narrow(&o[i * hd..(i + 1) * hd], row);
        }
    });
    out
}
