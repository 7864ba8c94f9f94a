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
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO; // |r| ≤ ln2/2
                                         // e^r on [−ln2/2, ln2/2]: degree-6 Taylor/minimax polynomial (Cephes coefficients)
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * scale
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
}
