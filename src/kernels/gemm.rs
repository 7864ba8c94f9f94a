//! CPU matrix multiplication: an AVX-512 outer-product GEMM (f32 FMA, and bf16 pairs through
//! `vdpbf16ps` with f32 accumulation, or, on AVX-512 CPUs without AVX512-BF16, the same bf16
//! pairs widened to f32 in registers and multiplied with FMAs), chosen at run time by CPU feature
//! detection, with a portable fallback (the `gemm` crate through candle, or plain loops).
//!
//! C[m×n] = A[m×k]·B[k×n]. A is read element by element with any strides (so Aᵀ costs nothing);
//! B is read 32 columns at a time, either from rows contiguous along n or from panels packed once
//! (weights, at load time): `[⌈n/32⌉][k][32]` for f32 and `[⌈n/32⌉][k/2][32]` bf16 pairs for bf16.
//! The work is split over rayon's threads by (column panel, row chunk).

use half::bf16;
use rayon::prelude::*;

/// Columns of a panel (two 16-lane registers).
pub const NR: usize = 32;
/// Rows of a micro-tile (28 accumulators + 2 B registers + 1 broadcast = 31 of 32 registers).
pub const MR: usize = 14;
/// Depth of a cache block: a 32 KB panel block stays in L1 while the rows stream through.
const KC: usize = 256;
/// Rows per parallel task.
const MC: usize = 8 * MR;
/// Below this many multiply-adds a GEMM runs on the calling thread (it is then usually one of
/// many small GEMMs that are themselves run in parallel, e.g. per attention head).
const PARALLEL_MIN_MACS: usize = 4 << 20;

/// Runs `f` over the (column panel, row chunk) tiles, in parallel when the problem is large.
fn for_tiles(m: usize, n: usize, k: usize, f: impl Fn(usize, usize) + Sync) {
    let panels = n.div_ceil(NR);
    let chunks = m.div_ceil(MC);
    if m * n * k < PARALLEL_MIN_MACS {
        for jp in 0..panels {
            for mc in 0..chunks {
                f(jp, mc);
            }
        }
    } else {
        (0..panels * chunks)
            .into_par_iter()
            .for_each(|t| f(t / chunks, t % chunks));
    }
}

/// CPU features the kernels use, detected once.
#[derive(Debug, Clone, Copy)]
pub struct CpuFeatures {
    pub avx512f: bool,
    pub avx512bf16: bool,
}

/// The features of this CPU (`LLADA_NO_AVX512=1` turns the AVX-512 paths off, for testing the
/// fallbacks).
pub fn cpu_features() -> CpuFeatures {
    static F: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        let off = std::env::var_os("LLADA_NO_AVX512").is_some_and(|v| v != "0");
        #[cfg(target_arch = "x86_64")]
        {
            // the kernels compile their AVX-512 paths with these together (see `simd_fn!`)
            let f = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
                && !off;
            CpuFeatures {
                avx512f: f,
                avx512bf16: f && std::arch::is_x86_feature_detected!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = off;
            CpuFeatures {
                avx512f: false,
                avx512bf16: false,
            }
        }
    })
}

/// f32 weights packed into 32-column panels: `[⌈n/32⌉][k][32]`, zero-padded.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    pub n: usize,
    pub k: usize,
    pub data: Vec<f32>,
}

/// bf16 weights packed into 32-column panels of k-pairs: `[⌈n/32⌉][⌈k/2⌉][32]` u32, each the pair
/// (b[2p][j] low half, b[2p+1][j] high half), zero-padded.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    pub n: usize,
    pub k: usize,
    pub data: Vec<u32>,
}

impl PackedF32 {
    /// Packs W [n, k] (row-major, PyTorch `nn.Linear` layout) as the B = Wᵀ operand.
    pub fn from_weight(w: &[f32], n: usize, k: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(jp, panel)| {
                for jj in 0..NR.min(n - jp * NR) {
                    let row = &w[(jp * NR + jj) * k..(jp * NR + jj + 1) * k];
                    for (p, &v) in row.iter().enumerate() {
                        panel[p * NR + jj] = v;
                    }
                }
            });
        PackedF32 { n, k, data }
    }

    /// Packs W given by strides: W[j][p] = w[j·j_stride + p·p_stride].
    pub fn from_strided(w: &[f32], n: usize, k: usize, j_stride: usize, p_stride: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(jp, panel)| {
                let cols = NR.min(n - jp * NR);
                if j_stride == 1 {
                    // rows of the panel are contiguous runs in w
                    for p in 0..k {
                        let src = &w[p * p_stride + jp * NR..p * p_stride + jp * NR + cols];
                        panel[p * NR..p * NR + cols].copy_from_slice(src);
                    }
                } else {
                    for jj in 0..cols {
                        let base = (jp * NR + jj) * j_stride;
                        for p in 0..k {
                            panel[p * NR + jj] = w[base + p * p_stride];
                        }
                    }
                }
            });
        PackedF32 { n, k, data }
    }

    /// Unpacks into W [n, k].
    pub fn to_weight(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for j in 0..n {
            for p in 0..k {
                w[j * k + p] = self.data[(j / NR) * k * NR + p * NR + j % NR];
            }
        }
        w
    }
}

impl PackedBf16 {
    /// Packs W [n, k] (bf16 bits, row-major) as the B = Wᵀ operand.
    pub fn from_weight(w: &[bf16], n: usize, k: usize) -> Self {
        let k2 = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k2 * NR];
        data.par_chunks_mut(k2 * NR)
            .enumerate()
            .for_each(|(jp, panel)| {
                for jj in 0..NR.min(n - jp * NR) {
                    let row = &w[(jp * NR + jj) * k..(jp * NR + jj + 1) * k];
                    for p in 0..k2 {
                        let lo = row[2 * p].to_bits() as u32;
                        let hi = row.get(2 * p + 1).map(|v| v.to_bits() as u32).unwrap_or(0);
                        panel[p * NR + jj] = lo | (hi << 16);
                    }
                }
            });
        PackedBf16 { n, k, data }
    }

    /// Packs B [k, n] given as rows contiguous along n (b(p, j) = b[p·n + j]).
    pub fn from_rows(b: &[bf16], k: usize, n: usize) -> Self {
        let k2 = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k2 * NR];
        for (jp, panel) in data.chunks_mut(k2 * NR).enumerate() {
            for p in 0..k2 {
                for jj in 0..NR.min(n - jp * NR) {
                    let j = jp * NR + jj;
                    let lo = b[2 * p * n + j].to_bits() as u32;
                    let hi = if 2 * p + 1 < k {
                        b[(2 * p + 1) * n + j].to_bits() as u32
                    } else {
                        0
                    };
                    panel[p * NR + jj] = lo | (hi << 16);
                }
            }
        }
        PackedBf16 { n, k, data }
    }

    /// Gate and up weights (each [f, k], packed) interleaved for [`Bf16New::Glu`]: panel q holds
    /// gate rows 16q.. in lanes 0..16 and the same up rows in lanes 16..32 (n = 2f).
    pub fn glu(gate: &PackedBf16, up: &PackedBf16) -> Self {
        assert_eq!((gate.n, gate.k), (up.n, up.k), "gate and up shapes differ");
        let (f, k) = (gate.n, gate.k);
        let k2 = k.div_ceil(2);
        let half = NR / 2;
        let mut data = vec![0u32; f.div_ceil(half) * k2 * NR];
        data.par_chunks_mut(k2 * NR)
            .enumerate()
            .for_each(|(q, panel)| {
                let j = q * half;
                let w = half.min(f - j);
                let src = (j / NR) * k2 * NR + j % NR;
                for p in 0..k2 {
                    let s = src + p * NR;
                    panel[p * NR..p * NR + w].copy_from_slice(&gate.data[s..s + w]);
                    panel[p * NR + half..p * NR + half + w].copy_from_slice(&up.data[s..s + w]);
                }
            });
        PackedBf16 { n: 2 * f, k, data }
    }

    /// The gate (`up` false) or up weight [f, k] of a [`PackedBf16::glu`] packing.
    pub fn glu_half(&self, up: bool) -> Vec<bf16> {
        let (f, k) = (self.n / 2, self.k);
        let k2 = k.div_ceil(2);
        let half = NR / 2;
        let lane0 = if up { half } else { 0 };
        let mut w = vec![bf16::ZERO; f * k];
        for j in 0..f {
            for p in 0..k {
                let pair = self.data[(j / half) * k2 * NR + (p / 2) * NR + lane0 + j % half];
                let bits = if p % 2 == 0 {
                    pair & 0xFFFF
                } else {
                    pair >> 16
                };
                w[j * k + p] = bf16::from_bits(bits as u16);
            }
        }
        w
    }

    /// Unpacks into W [n, k].
    pub fn to_weight(&self) -> Vec<bf16> {
        let (n, k) = (self.n, self.k);
        let k2 = k.div_ceil(2);
        let mut w = vec![bf16::ZERO; n * k];
        for j in 0..n {
            for p in 0..k {
                let pair = self.data[(j / NR) * k2 * NR + (p / 2) * NR + j % NR];
                let bits = if p % 2 == 0 {
                    pair & 0xFFFF
                } else {
                    pair >> 16
                };
                w[j * k + p] = bf16::from_bits(bits as u16);
            }
        }
        w
    }
}

/// The B operand of [`sgemm`].
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    /// b(p, j) = data[p·ld + j]: rows contiguous along n.
    Rows { data: &'a [f32], ld: usize },
    /// Packed panels.
    Packed(&'a PackedF32),
}

/// A raw pointer that may cross threads (each task writes a disjoint tile of C).
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

/// The A operand: a(i, p) = data[i·rs + p·cs].
#[derive(Clone, Copy)]
pub struct AOperand<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// C = A·B (or C += A·B with `accumulate`), f32. C is row-major with leading dimension `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: AOperand<'_, f32>,
    b: BOperand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "C too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx512f {
        let cp = SendPtr(c.as_mut_ptr());
        for_tiles(m, n, k, |jp, mc| {
            // SAFETY: tiles (jp, mc) are disjoint; bounds were checked above and by the operands.
            unsafe { avx512::sgemm_tile(m, n, k, a, b, cp.get(), ldc, accumulate, jp, mc) };
        });
        return;
    }
    sgemm_portable(m, n, k, a, b, c, ldc, accumulate);
}

#[allow(clippy::too_many_arguments)]
fn sgemm_portable(
    m: usize,
    n: usize,
    k: usize,
    a: AOperand<'_, f32>,
    b: BOperand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let bv = |p: usize, j: usize| -> f32 {
        match b {
            BOperand::Rows { data, ld } => data[p * ld + j],
            BOperand::Packed(pk) => pk.data[(j / NR) * pk.k * NR + p * NR + j % NR],
        }
    };
    c.par_chunks_mut(ldc)
        .take(m)
        .enumerate()
        .for_each(|(i, row)| {
            let mut acc = vec![0f32; n];
            for p in 0..k {
                let av = a.data[i * a.rs + p * a.cs];
                for (j, x) in acc.iter_mut().enumerate() {
                    *x += av * bv(p, j);
                }
            }
            for (j, x) in acc.into_iter().enumerate() {
                row[j] = if accumulate { row[j] + x } else { x };
            }
        });
}

/// Where the tiles put each finished f32 accumulator of C = A·B (each writes a disjoint block).
#[derive(Clone, Copy)]
enum Sink {
    F32(SendPtr<f32>, usize),
    Bf16(SendPtr<u16>),
    AddBf16(SendPtr<u16>, SendPtr<u16>),
    Glu(SendPtr<u16>),
}

/// SwiGLU of one gate/up accumulator pair with the reference's bf16 roundings.
#[inline(always)]
fn glu_bf16(g: f32, u: f32) -> u16 {
    use super::math::{bf16_bits, round_bf16, silu};
    let s = round_bf16(silu(round_bf16(g)));
    bf16_bits(s * round_bf16(u))
}

/// Residual add after a bf16 linear layer: bf16(res + bf16(acc)).
#[inline(always)]
fn add_bf16(acc: f32, res: u16) -> u16 {
    use super::math::{bf16_bits, round_bf16};
    bf16_bits(f32::from_bits((res as u32) << 16) + round_bf16(acc))
}

/// Writes the first `cols` of one row of finished accumulators (columns j0.. of row i) into the
/// sink; `n` is B's column count, `row` a whole panel's width for GLU.
#[inline(always)]
fn sink_row(sink: Sink, n: usize, i: usize, j0: usize, row: &[f32], cols: usize) {
    let acc = &row[..cols];
    // finished values go through a local buffer and are copied out with a raw copy: the output
    // may be a vector's uninitialised spare capacity ([`bf16gemm_vec`])
    let mut buf = [0u16; NR];
    // SAFETY (all arms): callers pass in-bounds (i, j0, cols) of an output they own; the
    // residual is initialised memory of the same shape.
    unsafe {
        match sink {
            Sink::F32(c, ldc) => {
                std::ptr::copy_nonoverlapping(acc.as_ptr(), c.get().add(i * ldc + j0), acc.len())
            }
            Sink::Bf16(c) => {
                for (o, &x) in buf.iter_mut().zip(acc) {
                    *o = super::math::bf16_bits(x);
                }
                std::ptr::copy_nonoverlapping(buf.as_ptr(), c.get().add(i * n + j0), cols);
            }
            Sink::AddBf16(c, r) => {
                let r = std::slice::from_raw_parts(r.get().add(i * n + j0), cols);
                for ((o, &x), &r) in buf.iter_mut().zip(acc).zip(r) {
                    *o = add_bf16(x, r);
                }
                std::ptr::copy_nonoverlapping(buf.as_ptr(), c.get().add(i * n + j0), cols);
            }
            Sink::Glu(c) => {
                // a panel holds w ≤ 16 gate columns in lanes 0.., the same up columns in 16..
                let half = NR / 2;
                let w = cols / 2;
                let (g, u) = (&row[..w], &row[half..half + w]);
                for ((o, &g), &u) in buf.iter_mut().zip(g).zip(u) {
                    *o = glu_bf16(g, u);
                }
                std::ptr::copy_nonoverlapping(buf.as_ptr(), c.get().add(i * (n / 2) + j0 / 2), w);
            }
        }
    }
}

/// C = A·B, A bf16 row-major with rows of `k` values at stride `lda` (even), B packed bf16; f32
/// accumulation and output. AVX-512 kernels (with `vdpbf16ps` where the CPU has AVX512-BF16, f32
/// FMAs on the widened pairs otherwise, see [`cpu_features`]); portable code elsewhere.
pub fn bf16gemm(m: usize, a: &[bf16], lda: usize, b: &PackedBf16, c: &mut [f32], ldc: usize) {
    let n = b.n;
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + b.k, "A too small");
    assert!(c.len() >= (m - 1) * ldc + n, "C too small");
    bf16gemm_sink(m, a, lda, b, Sink::F32(SendPtr(c.as_mut_ptr()), ldc));
}

/// What [`bf16gemm_vec`] makes of the product C = A·B while its accumulators are in registers.
pub enum Bf16New<'a> {
    /// C rounded to bf16 ([m, n]).
    Bf16,
    /// bf16(res + bf16(C)) ([m, n]): a bf16 linear layer followed by a residual connection, with
    /// the reference's two roundings.
    AddBf16(&'a [bf16]),
    /// B packed by [`PackedBf16::glu`] from gate and up weights of n/2 rows each:
    /// bf16(bf16(silu(bf16(g))) · bf16(u)) with g, u the gate and up outputs of each column
    /// ([m, n/2]), the reference's SwiGLU roundings.
    Glu,
}

/// C = A·B as [`bf16gemm`], finished as `what` says, into a new vector (not zero-filled first:
/// every element is written).
pub fn bf16gemm_vec(
    m: usize,
    a: &[bf16],
    lda: usize,
    b: &PackedBf16,
    what: Bf16New<'_>,
) -> Vec<bf16> {
    let n = b.n;
    let len = match what {
        Bf16New::Glu => {
            assert!(n.is_multiple_of(2), "GLU packing with an odd width");
            m * (n / 2)
        }
        _ => m * n,
    };
    let mut out: Vec<bf16> = Vec::with_capacity(len);
    if m == 0 || n == 0 {
        return out;
    }
    assert!(a.len() >= (m - 1) * lda + b.k, "A too small");
    let c = SendPtr(out.spare_capacity_mut().as_mut_ptr() as *mut u16);
    let sink = match what {
        Bf16New::Bf16 => Sink::Bf16(c),
        Bf16New::AddBf16(res) => {
            assert!(res.len() >= m * n, "residual too small");
            Sink::AddBf16(c, SendPtr(res.as_ptr() as *mut u16))
        }
        Bf16New::Glu => Sink::Glu(c),
    };
    bf16gemm_sink(m, a, lda, b, sink);
    // SAFETY: the tiles cover every (row, column) of the m × len/m output and each wrote it.
    unsafe { out.set_len(len) };
    out
}

/// Runs the tiles of C = A·B into `sink` (bounds checked by the callers).
fn bf16gemm_sink(m: usize, a: &[bf16], lda: usize, b: &PackedBf16, sink: Sink) {
    bf16gemm_sink_with(m, a, lda, b, sink, cpu_features().avx512bf16)
}

/// [`bf16gemm_sink`] with the bf16 dot-product instruction allowed (`dp`, where the CPU has it)
/// or not (the f32-FMA kernel on any AVX-512 CPU: tests run it everywhere).
fn bf16gemm_sink_with(m: usize, a: &[bf16], lda: usize, b: &PackedBf16, sink: Sink, dp: bool) {
    let dp = dp && cpu_features().avx512bf16;
    let (n, k) = (b.n, b.k);
    #[cfg(target_arch = "x86_64")]
    // (k = 0 goes the portable way, which writes the zeros: the tiles would write nothing)
    if cpu_features().avx512f && k > 0 && k.is_multiple_of(2) && lda.is_multiple_of(2) {
        for_tiles(m, n, k, |jp, mc| {
            // SAFETY: disjoint tiles; A and C bounds asserted above; k and lda even; each tile
            // function needs only the features checked here.
            unsafe {
                if dp {
                    avx512::bf16gemm_tile(m, a, lda, b, sink, jp, mc)
                } else {
                    avx512::bf16gemm_tile_fma(m, a, lda, b, sink, jp, mc)
                }
            };
        });
        return;
    }
    let k2 = k.div_ceil(2);
    (0..m).into_par_iter().for_each(|i| {
        let mut row = vec![0f32; NR];
        for jp in 0..n.div_ceil(NR) {
            let cols = NR.min(n - jp * NR);
            // every lane of the (zero-padded) panel: a GLU panel's up half starts at lane 16
            for (jj, out) in row.iter_mut().enumerate() {
                let j = jp * NR + jj;
                let mut s = 0f32;
                for p in 0..k {
                    let pair = b.data[jp * k2 * NR + (p / 2) * NR + j % NR];
                    let bits = if p % 2 == 0 {
                        pair & 0xFFFF
                    } else {
                        pair >> 16
                    };
                    s += a[i * lda + p].to_f32() * bf16::from_bits(bits as u16).to_f32();
                }
                *out = s;
            }
            sink_row(sink, n, i, jp * NR, &row, cols);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{AOperand, BOperand, PackedBf16, Sink, KC, MC, MR, NR};
    use half::bf16;
    use std::arch::x86_64::{
        __m512, __m512bh, _mm512_add_ps, _mm512_and_si512, _mm512_castsi512_ps, _mm512_dpbf16_ps,
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_sllv_epi32, _mm512_storeu_ps, _mm_prefetch, _MM_HINT_T0,
    };

    /// Prefetch distance of the weight stream, in k steps (pairs for bf16).
    const PF: usize = 64;

    /// Lane masks of a (possibly partial) 32-column panel.
    #[inline(always)]
    fn masks(cols: usize) -> (u16, u16) {
        let m0 = if cols >= 16 {
            0xFFFF
        } else {
            (1u32 << cols) as u16 - 1
        };
        let m1 = if cols >= 32 {
            0xFFFF
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        (m0, m1)
    }

    /// R rows × 32 columns of C (+)= Σ_p a(i, p)·b(p, ·), f32.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_f32<const R: usize>(
        kl: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        (m0, m1): (u16, u16),
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..kl {
            let bp = b.add(p * b_rs);
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * b_rs) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * b_rs + 16) as *const i8);
            let b0 = _mm512_maskz_loadu_ps(m0, bp);
            let b1 = _mm512_maskz_loadu_ps(m1, bp.add(16));
            let ap = a.add(p * a_cs);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i * a_rs));
                acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
                acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
            }
        }
        store::<R>(&acc, c, ldc, (m0, m1), load_c);
    }

    #[inline(always)]
    unsafe fn store<const R: usize>(
        acc: &[[__m512; 2]; R],
        c: *mut f32,
        ldc: usize,
        (m0, m1): (u16, u16),
        load_c: bool,
    ) {
        for (i, acc_i) in acc.iter().enumerate() {
            let cp = c.add(i * ldc);
            let (mut o0, mut o1) = (acc_i[0], acc_i[1]);
            if load_c {
                o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, cp));
                o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(m1, cp.add(16)));
            }
            _mm512_mask_storeu_ps(cp, m0, o0);
            _mm512_mask_storeu_ps(cp.add(16), m1, o1);
        }
    }

    macro_rules! dispatch_rows {
        ($r:expr, $f:ident, $($arg:expr),*) => {
            match $r {
                1 => $f::<1>($($arg),*), 2 => $f::<2>($($arg),*), 3 => $f::<3>($($arg),*),
                4 => $f::<4>($($arg),*), 5 => $f::<5>($($arg),*), 6 => $f::<6>($($arg),*),
                7 => $f::<7>($($arg),*), 8 => $f::<8>($($arg),*), 9 => $f::<9>($($arg),*),
                10 => $f::<10>($($arg),*), 11 => $f::<11>($($arg),*), 12 => $f::<12>($($arg),*),
                13 => $f::<13>($($arg),*), _ => $f::<14>($($arg),*),
            }
        };
    }

    /// One task: column panel `jp`, rows of chunk `mc`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm_tile(
        m: usize,
        n: usize,
        k: usize,
        a: AOperand<'_, f32>,
        b: BOperand<'_>,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        jp: usize,
        mc: usize,
    ) {
        let j0 = jp * NR;
        let cols = NR.min(n - j0);
        let ms = masks(cols);
        let (i0, i1) = (mc * MC, (mc * MC + MC).min(m));
        let mut kb = 0;
        while kb < k {
            let kl = KC.min(k - kb);
            let (bp, b_rs) = match b {
                BOperand::Rows { data, ld } => (data.as_ptr().add(kb * ld + j0), ld),
                BOperand::Packed(pk) => (pk.data.as_ptr().add(jp * pk.k * NR + kb * NR), NR),
            };
            let load_c = accumulate || kb > 0;
            let mut i = i0;
            while i < i1 {
                let r = MR.min(i1 - i);
                let ap = a.data.as_ptr().add(i * a.rs + kb * a.cs);
                let cp = c.add(i * ldc + j0);
                dispatch_rows!(r, kernel_f32, kl, ap, a.rs, a.cs, bp, b_rs, ms, cp, ldc, load_c);
                i += r;
            }
            kb += kl;
        }
    }

    /// R rows × 32 columns of Σ_p a-pairs · b-pairs, bf16 with f32 accumulation, plus the
    /// partial sums at `prev` (rows of 32, when given); written as partial sums to `partial`
    /// (rows of 32) or, finished, through the sink at rows i0.. of C.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_bf16<const R: usize>(
        kl2: usize,
        a: *const u16,
        lda: usize,
        b: *const u32,
        prev: Option<*const f32>,
        partial: Option<*mut f32>,
        (sink, n, i0, j0, cols): (Sink, usize, usize, usize, usize),
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..kl2 {
            let bp = b.add(p * NR);
            // weights stream from memory once per row chunk: fetch ahead of the first pass
            // (a prefetch never faults, past the panel's end included)
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * NR) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * NR + 16) as *const i8);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
            let ap = a.add(2 * p);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let pair = (ap.add(i * lda) as *const u32).read_unaligned();
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                acc_i[0] = _mm512_dpbf16_ps(acc_i[0], ai, b0);
                acc_i[1] = _mm512_dpbf16_ps(acc_i[1], ai, b1);
            }
        }
        finish_bf16::<R>(&acc, prev, partial, (sink, n, i0, j0, cols));
    }

    /// The end of a bf16 micro-tile: the partial sums at `prev` added, then written as partial
    /// sums to `partial` or, finished, through the sink.
    #[inline(always)]
    unsafe fn finish_bf16<const R: usize>(
        acc: &[[__m512; 2]; R],
        prev: Option<*const f32>,
        partial: Option<*mut f32>,
        (sink, n, i0, j0, cols): (Sink, usize, usize, usize, usize),
    ) {
        let mut row = [0f32; NR];
        for (i, acc_i) in acc.iter().enumerate() {
            let (mut o0, mut o1) = (acc_i[0], acc_i[1]);
            if let Some(pv) = prev {
                o0 = _mm512_add_ps(o0, _mm512_loadu_ps(pv.add(i * NR)));
                o1 = _mm512_add_ps(o1, _mm512_loadu_ps(pv.add(i * NR + 16)));
            }
            match partial {
                Some(pt) => {
                    _mm512_storeu_ps(pt.add(i * NR), o0);
                    _mm512_storeu_ps(pt.add(i * NR + 16), o1);
                }
                None => {
                    _mm512_storeu_ps(row.as_mut_ptr(), o0);
                    _mm512_storeu_ps(row.as_mut_ptr().add(16), o1);
                    super::sink_row(sink, n, i0 + i, j0, &row, cols);
                }
            }
        }
    }

    /// [`kernel_bf16`] for CPUs with AVX-512F but not AVX512-BF16: each 32-bit lane of a panel
    /// holds a bf16 pair (even k low, odd k high); the low half shifted up and the high half
    /// masked are those values in f32 (exactly), so each pair is two FMA steps. A comes widened
    /// to f32 (`af`, rows at stride `afs`, by the tile), so its broadcasts are loads, not shuffles
    /// that would take the FMA ports. Same products (exact in f32), f32 accumulation; the weights
    /// stay bf16 in memory. (Measured, one thread, Ice Lake: about 80% of the f32 kernel's rate
    /// at the model's shapes; a loop over pairs with both halves in one body spilled the
    /// accumulators and ran at 40%.)
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_bf16_fma<const R: usize>(
        kl2: usize,
        af: *const f32,
        afs: usize,
        b: *const u32,
        prev: Option<*const f32>,
        partial: Option<*mut f32>,
        to: (Sink, usize, usize, usize, usize),
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // k step q of a pair: even q = the low halves shifted up, odd q = the high halves
        // masked; one uniform loop over the k steps (as the f32 kernel's), so the compiler keeps
        // the accumulators in registers
        let shift = [_mm512_set1_epi32(16), _mm512_set1_epi32(0)];
        let keep = [
            _mm512_set1_epi32(-1),
            _mm512_set1_epi32(0xFFFF_0000u32 as i32),
        ];
        for q in 0..2 * kl2 {
            let bp = b.add((q / 2) * NR);
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * NR) as *const i8);
            let (sh, kp) = (shift[q & 1], keep[q & 1]);
            let b0 = _mm512_loadu_si512(bp as *const _);
            let b1 = _mm512_loadu_si512(bp.add(16) as *const _);
            let b0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_sllv_epi32(b0, sh), kp));
            let b1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_sllv_epi32(b1, sh), kp));
            let ap = af.add(q);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i * afs));
                acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
                acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
            }
        }
        finish_bf16::<R>(&acc, prev, partial, to);
    }

    /// One task of a bf16 GEMM: column panel `jp`, rows of chunk `mc` (AVX512-BF16).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn bf16gemm_tile(
        m: usize,
        a: &[bf16],
        lda: usize,
        b: &PackedBf16,
        sink: Sink,
        jp: usize,
        mc: usize,
    ) {
        let (n, k) = (b.n, b.k);
        let k2 = k / 2;
        let j0 = jp * NR;
        let cols = NR.min(n - j0);
        let (i0, i1) = (mc * MC, (mc * MC + MC).min(m));
        let a16 = a.as_ptr() as *const u16;
        // partial sums of this tile's rows between depth blocks
        let mut scratch = [0f32; MC * NR];
        let sp = scratch.as_mut_ptr();
        let mut kb = 0;
        while kb < k2 {
            let kl = KC.min(k2 - kb);
            let last = kb + kl == k2;
            let bp = b.data.as_ptr().add(jp * k2 * NR + kb * NR);
            let mut i = i0;
            while i < i1 {
                let r = MR.min(i1 - i);
                let ap = a16.add(i * lda + 2 * kb);
                let here = sp.add((i - i0) * NR);
                let prev = (kb > 0).then_some(here as *const f32);
                let partial = (!last).then_some(here);
                let to = (sink, n, i, j0, cols);
                dispatch_rows!(r, kernel_bf16, kl, ap, lda, bp, prev, partial, to);
                i += r;
            }
            kb += kl;
        }
    }

    /// [`bf16gemm_tile`] for AVX-512 CPUs without AVX512-BF16: each depth block of the chunk's A
    /// rows is widened to f32 once, then every micro-tile multiplies with [`kernel_bf16_fma`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn bf16gemm_tile_fma(
        m: usize,
        a: &[bf16],
        lda: usize,
        b: &PackedBf16,
        sink: Sink,
        jp: usize,
        mc: usize,
    ) {
        let (n, k) = (b.n, b.k);
        let k2 = k / 2;
        let j0 = jp * NR;
        let cols = NR.min(n - j0);
        let (i0, i1) = (mc * MC, (mc * MC + MC).min(m));
        let mut scratch = [0f32; MC * NR];
        let sp = scratch.as_mut_ptr();
        // the chunk's A rows of one depth block, in f32: [rows][2·KC], in a buffer each thread
        // keeps (a fresh allocation per tile would fault its pages in every time)
        thread_local! {
            static AF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let afs = 2 * KC;
        AF.with(|buf| {
            let mut af = buf.borrow_mut();
            if af.len() < (i1 - i0) * afs {
                af.resize((i1 - i0) * afs, 0.0);
            }
            let mut kb = 0;
            while kb < k2 {
                let kl = KC.min(k2 - kb);
                let last = kb + kl == k2;
                for (r, dst) in af[..(i1 - i0) * afs].chunks_mut(afs).enumerate() {
                    let src = &a[(i0 + r) * lda + 2 * kb..(i0 + r) * lda + 2 * (kb + kl)];
                    for (d, x) in dst.iter_mut().zip(src) {
                        *d = f32::from_bits((x.to_bits() as u32) << 16);
                    }
                }
                let bp = b.data.as_ptr().add(jp * k2 * NR + kb * NR);
                let mut i = i0;
                while i < i1 {
                    let r = MR.min(i1 - i);
                    let ap = af.as_ptr().add((i - i0) * afs);
                    let here = sp.add((i - i0) * NR);
                    let prev = (kb > 0).then_some(here as *const f32);
                    let partial = (!last).then_some(here);
                    let to = (sink, n, i, j0, cols);
                    dispatch_rows!(r, kernel_bf16_fma, kl, ap, afs, bp, prev, partial, to);
                    i += r;
                }
                kb += kl;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &dyn Fn(usize, usize) -> f32,
        b: &dyn Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) as f64 * b(p, j) as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    fn check(got: &[f32], want: &[f32], tol: f32, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: [{i}] {g} vs {w}"
            );
        }
    }

    #[test]
    fn sgemm_matches_naive_on_edges_and_strides() {
        let mut rng = Rng::new(1);
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 31, 7),
            (15, 33, 300),
            (29, 64, 257),
            (112, 40, 16),
            (120, 97, 513),
        ] {
            let a = rand(m * k, &mut rng);
            let w = rand(n * k, &mut rng); // W [n, k]
            let bt = rand(k * n, &mut rng); // B [k, n]
                                            // A row-major, B = Wᵀ packed
            let want = naive(m, n, k, &|i, p| a[i * k + p], &|p, j| w[j * k + p]);
            let pk = PackedF32::from_weight(&w, n, k);
            assert_eq!(pk.to_weight(), w);
            let mut c = vec![0f32; m * n];
            sgemm(
                m,
                n,
                k,
                AOperand {
                    data: &a,
                    rs: k,
                    cs: 1,
                },
                BOperand::Packed(&pk),
                &mut c,
                n,
                false,
            );
            check(&c, &want, 1e-4, "packed");
            // A transposed (a(i,p) = at[p][i]), B rows
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let want = naive(m, n, k, &|i, p| a[i * k + p], &|p, j| bt[p * n + j]);
            let mut c = vec![1f32; m * n];
            sgemm(
                m,
                n,
                k,
                AOperand {
                    data: &at,
                    rs: 1,
                    cs: m,
                },
                BOperand::Rows { data: &bt, ld: n },
                &mut c,
                n,
                false,
            );
            check(&c, &want, 1e-4, "rows");
            // accumulate
            let mut c2 = c.clone();
            sgemm(
                m,
                n,
                k,
                AOperand {
                    data: &at,
                    rs: 1,
                    cs: m,
                },
                BOperand::Rows { data: &bt, ld: n },
                &mut c2,
                n,
                true,
            );
            let twice: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
            check(&c2, &twice, 1e-4, "accumulate");
        }
    }

    #[test]
    fn bf16gemm_epilogues_equal_the_separate_ops() {
        use crate::kernels::math::{round_bf16, to_bf16};
        let mut rng = Rng::new(4);
        let bf = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
        for &(m, f, k) in &[(1, 1, 2), (13, 20, 8), (29, 33, 514), (120, 64, 768)] {
            let a = bf(rand(m * k, &mut rng));
            let (wg, wu) = (bf(rand(f * k, &mut rng)), bf(rand(f * k, &mut rng)));
            let (pg, pu) = (
                PackedBf16::from_weight(&wg, f, k),
                PackedBf16::from_weight(&wu, f, k),
            );
            let mut g = vec![0f32; m * f];
            let mut u = vec![0f32; m * f];
            bf16gemm(m, &a, k, &pg, &mut g, f);
            bf16gemm(m, &a, k, &pu, &mut u, f);
            // rounded output
            let c = bf16gemm_vec(m, &a, k, &pg, Bf16New::Bf16);
            assert!(c.iter().zip(&g).all(|(c, g)| *c == bf16::from_f32(*g)));
            // residual add: bf16(res + bf16(acc))
            let res = bf(rand(m * f, &mut rng));
            let c = bf16gemm_vec(m, &a, k, &pg, Bf16New::AddBf16(&res));
            for ((c, g), r) in c.iter().zip(&g).zip(&res) {
                assert_eq!(*c, bf16::from_f32(r.to_f32() + round_bf16(*g)));
            }
            // SwiGLU: the packing round-trips and the fused result equals the separate ops
            let glu = PackedBf16::glu(&pg, &pu);
            assert_eq!(glu.glu_half(false), wg);
            assert_eq!(glu.glu_half(true), wu);
            let c = bf16gemm_vec(m, &a, k, &glu, Bf16New::Glu);
            for ((c, g), u) in c.iter().zip(&g).zip(&u) {
                let (g, u) = (round_bf16(*g), round_bf16(*u));
                let s = round_bf16(g / (1.0 + (-g as f64).exp() as f32));
                let want = to_bf16(s * u);
                // the kernel's exp differs from libm's in the last bits (one bf16 ulp at most)
                // and stops at e^−87 (silu of g < −87 is ~1e-38 instead of a subnormal)
                let (c, want) = (c.to_f32(), want.to_f32());
                assert!(
                    (c - want).abs() <= want.abs() / 128.0 + 1e-30,
                    "{c} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bf16gemm_of_zero_depth_is_zero() {
        let b = PackedBf16 {
            n: 40,
            k: 0,
            data: vec![],
        };
        assert!(bf16gemm_vec(3, &[], 0, &b, Bf16New::Bf16)
            .iter()
            .all(|x| *x == bf16::ZERO));
        let mut c = vec![1f32; 3 * 40];
        bf16gemm(3, &[], 0, &b, &mut c, 40);
        assert!(c.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn bf16gemm_matches_naive() {
        let mut rng = Rng::new(2);
        for &(m, n, k) in &[
            (1, 1, 2),
            (13, 31, 8),
            (15, 33, 300),
            (29, 64, 514),
            (120, 97, 64),
        ] {
            let a: Vec<bf16> = rand(m * k, &mut rng)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let w: Vec<bf16> = rand(n * k, &mut rng)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let want = naive(m, n, k, &|i, p| a[i * k + p].to_f32(), &|p, j| {
                w[j * k + p].to_f32()
            });
            let pk = PackedBf16::from_weight(&w, n, k);
            assert_eq!(pk.to_weight(), w);
            let mut c = vec![0f32; m * n];
            bf16gemm(m, &a, k, &pk, &mut c, n);
            check(&c, &want, 1e-4, "bf16");
            // the f32-FMA kernel of CPUs without AVX512-BF16, on any CPU
            let mut c = vec![0f32; m * n];
            bf16gemm_sink_with(m, &a, k, &pk, Sink::F32(SendPtr(c.as_mut_ptr()), n), false);
            check(&c, &want, 1e-4, "bf16 via f32 FMAs");
        }
    }
}
