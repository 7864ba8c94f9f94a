//! The machine's peak arithmetic rate, measured rather than looked up: every thread of the pool
//! runs independent chains of the GEMM's instruction (f32 FMA or bf16 pair dot products) on
//! registers only, so `llada bench` can say what fraction of this CPU's limit a run reaches
//! (clock speeds under load are not known in advance, least of all in a VM).

use candle_core::DType;
use std::time::{Duration, Instant};

/// Peak GFLOP/s of the CPU kernels' instruction for `dtype` on all of rayon's threads, over about
/// `ms` milliseconds; `None` where the kernels have no SIMD path (no AVX-512). On AVX-512 CPUs
/// without AVX512-BF16 the bf16 kernels multiply with f32 FMAs: their peak is f32's.
pub fn peak_gflops(dtype: DType, ms: u64) -> Option<f64> {
    let f = super::gemm::cpu_features();
    let dtype = match dtype {
        DType::F32 if f.avx512f => DType::F32,
        DType::BF16 if f.avx512bf16 => DType::BF16,
        DType::BF16 if f.avx512f => DType::F32,
        _ => return None,
    };
    let budget = Duration::from_millis(ms);
    let rates: Vec<f64> = rayon::broadcast(|_| {
        let t0 = Instant::now();
        let mut flops = 0f64;
        let mut sink = 0f32;
        while t0.elapsed() < budget {
            let (f, s) = burst(dtype);
            flops += f;
            sink += s;
        }
        std::hint::black_box(sink);
        flops / t0.elapsed().as_secs_f64()
    });
    Some(rates.iter().sum::<f64>() / 1e9)
}

/// One burst of independent multiply-adds: (FLOPs done, a value that keeps them alive).
fn burst(dtype: DType) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        const ITERS: usize = 100_000;
        // SAFETY: `peak_gflops` checked the CPU features for the dtype.
        unsafe {
            match dtype {
                DType::BF16 => (
                    (ITERS * avx512::CHAINS * 32 * 2) as f64,
                    avx512::dpbf16_chains(ITERS),
                ),
                _ => (
                    (ITERS * avx512::CHAINS * 16 * 2) as f64,
                    avx512::fma_chains(ITERS),
                ),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        (0.0, 0.0)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, __m512bh, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps,
        _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
    };

    /// Independent accumulator chains: enough to cover the latency of two pipes.
    pub const CHAINS: usize = 16;

    /// The sum of every lane of every chain (keeps the chains alive).
    #[target_feature(enable = "avx512f")]
    unsafe fn sum(acc: [__m512; CHAINS]) -> f32 {
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_chains(iters: usize) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        sum(acc)
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16_chains(iters: usize) -> f32 {
        // bf16 pairs (1/64, 1/64): small products, no overflow
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3C80_3C80));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, a);
            }
        }
        sum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_positive_where_measured() {
        for dt in [DType::F32, DType::BF16] {
            if let Some(p) = peak_gflops(dt, 20) {
                assert!(p > 1.0 && p.is_finite(), "{dt:?}: {p}");
            }
        }
        assert!(peak_gflops(DType::F64, 20).is_none());
    }
}
