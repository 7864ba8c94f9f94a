//! Scalar math for the hot loops: a vectorisable exp for non-positive arguments.

/// e^x for x ≤ 0 (softmax terms after subtracting the row max), relative error ≈ 2e-7; arguments
/// below −87 (−∞ included) give ≈ 1e-38, i.e. nothing next to the row's maximum term 1. Written
/// without branches so the compiler vectorises loops over it.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting rounds to nearest
    let x = x.clamp(-87.0, 0.0);
    let t = x * LOG2E + ROUND;
    // round(x·log2 e), an integer in [−126, 0]
    let k = t - ROUND;
    // the same integer read from t's bits (no float→int cast: Rust's saturating `as` does not
    // vectorise)
    let ki = t.to_bits() as i32 - ROUND.to_bits() as i32;
    // |r| ≤ ln2/2
    let r = x - k * LN2_HI - k * LN2_LO;
    // e^r on [−ln2/2, ln2/2]: degree-6 Taylor/minimax polynomial (Cephes coefficients)
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((ki + 127) as u32) << 23);
    p * scale
}

/// silu(x) = x·σ(x) with e = exp(−|x|) ≤ 1 (vectorisable, no overflow).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp_nonpos(-x.abs());
    let num = if x >= 0.0 { x } else { x * e };
    num / (1.0 + e)
}

/// The bits of `x` rounded to bf16, to nearest even (NaN stays a quiet NaN): the same value as
/// `half::bf16::from_f32`, written without branches so loops over it vectorise.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

/// `x` rounded to bf16 (see [`bf16_bits`]).
#[inline(always)]
pub fn to_bf16(x: f32) -> half::bf16 {
    half::bf16::from_bits(bf16_bits(x))
}

/// `x` rounded to bf16 and widened back to f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

const LANES: usize = 16;

/// Largest element (−∞ for an empty slice); 16 lanes so the compiler vectorises it.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for &v in tail {
        if v > m {
            m = v;
        }
    }
    m
}

/// x ← e^(x − m) in place, returning the sum (f32 lanes, pairwise-summed at the end).
#[inline(always)]
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_nonpos(c[i] - m);
            acc[i] += c[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_nonpos(*v - m);
        s += *v;
    }
    s
}

/// Σ e^(x − m) without writing (f32 lanes).
#[inline(always)]
pub fn sum_exp_sub(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp_nonpos(c[i] - m);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in tail {
        s += exp_nonpos(v - m);
    }
    s
}

super::simd_fn! {
    /// Largest element of a row (−∞ if empty or all NaN), vectorised.
    pub fn row_max(x: &[f32]) -> f32 {
        max(x)
    }
}

super::simd_fn! {
    /// Σ e^(x − m) over a row, f32 lanes (vectorised).
    pub fn row_sum_exp(x: &[f32], m: f32) -> f32 {
        sum_exp_sub(x, m)
    }
}

super::simd_fn! {
    /// Index of the first element equal to `v`, if any.
    pub fn first_equal(x: &[f32], v: f32) -> Option<usize> {
        let mut chunks = x.chunks_exact(LANES);
        let mut base = 0;
        for c in &mut chunks {
            if c.iter().fold(false, |hit, &e| hit | (e == v)) {
                return c.iter().position(|&e| e == v).map(|i| base + i);
            }
            base += LANES;
        }
        chunks.remainder().iter().position(|&e| e == v).map(|i| base + i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_exp() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (a, b) = (exp_nonpos(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "x={x}: {a} vs {b}");
            x -= 0.0137;
        }
        assert!(exp_nonpos(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp_nonpos(0.0), 1.0);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = crate::rng::Rng::new(3);
        let mut xs = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x3F80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3F81_8000), // a tie, rounds to even (up)
            f32::from_bits(0x7F7F_FFFF), // rounds to infinity
            f32::from_bits(0x0000_8001), // subnormal
        ];
        xs.extend((0..10_000).map(|_| (rng.normal() * 100.0) as f32));
        xs.extend((0..10_000).map(|_| f32::from_bits((rng.next_seed() >> 32) as u32)));
        for x in xs {
            assert_eq!(
                bf16_bits(x),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn reductions() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        assert_eq!(max(&v), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let want: f32 = v.iter().map(|x| (x - 5.0).exp()).sum();
        assert!((sum_exp_sub(&v, 5.0) - want).abs() < 1e-5);
        let mut w = v.clone();
        assert!((exp_sub_sum(&mut w, 5.0) - want).abs() < 1e-5);
        assert!((w[3] - (v[3] - 5.0).exp()).abs() < 1e-6);
    }
}
