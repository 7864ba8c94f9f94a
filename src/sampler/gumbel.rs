//! Temperature sampling by Gumbel-max in f64 (reference §4.5): x0 = argmax_v ℓ_v + T·G_v with
//! G_v = −ln(−ln u_v), u_v uniform. This is the log form of the reference's exp(ℓ)/(−ln u)^T
//! (same distribution, no overflow). T = 0 bypasses the noise: a plain argmax of the logits.

use crate::rng::Rng;

/// The index of the largest logit (first among equal maxima, as `argmax` in the reference);
/// `skip` entries are treated as −∞ (the first other entry if every logit is −∞).
pub fn argmax(row: &[f32], skip: Option<u32>) -> u32 {
    use crate::kernels::math::{first_equal, row_max};
    let s = skip.map(|s| s as usize).filter(|&s| s < row.len());
    let (a, b) = match s {
        Some(s) => (&row[..s], &row[(s + 1).min(row.len())..]),
        None => (row, &row[..0]),
    };
    let m = row_max(a).max(row_max(b));
    let after = s.map_or(0, |s| s + 1);
    let found = if m == f32::NEG_INFINITY {
        None
    } else {
        first_equal(a, m).or_else(|| first_equal(b, m).map(|i| after + i))
    };
    let first_other = if s == Some(0) && row.len() > 1 { 1 } else { 0 };
    found.unwrap_or(first_other) as u32
}

/// A sample from softmax(row / T) by Gumbel-max in f64; `skip` entries are never chosen.
pub fn sample(row: &[f32], temperature: f64, skip: Option<u32>, rng: &mut Rng) -> u32 {
    let mut best = 0usize;
    let mut best_v = f64::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        let g = rng.gumbel(); // drawn for every entry, so the stream does not depend on values
        if Some(i as u32) == skip || v == f32::NEG_INFINITY {
            continue;
        }
        let s = v as f64 + temperature * g;
        if s > best_v {
            best = i;
            best_v = s;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_of_ties_and_skip() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0], None), 1);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0], Some(1)), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY], None), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY], Some(0)), 1);
        assert_eq!(argmax(&[9.0, 1.0, 2.0], Some(0)), 2);
        // long rows (vectorised path): ties resolved to the first, skip honoured
        let mut row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32).collect();
        let first = row.iter().position(|&v| v == 100.0).unwrap();
        assert_eq!(argmax(&row, None), first as u32);
        let second = first + 1 + row[first + 1..].iter().position(|&v| v == 100.0).unwrap();
        assert_eq!(argmax(&row, Some(first as u32)), second as u32);
        row[999] = 1000.0;
        assert_eq!(argmax(&row, None), 999);
        assert_eq!(argmax(&row, Some(999)), first as u32);
    }

    /// Sampling frequencies follow softmax(ℓ/T): within 4 standard errors per token.
    #[test]
    fn gumbel_max_follows_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        for &t in &[0.5f64, 1.0, 2.0] {
            let mut rng = Rng::new(11);
            let n = 40_000;
            let mut counts = [0usize; 5];
            for _ in 0..n {
                counts[sample(&logits, t, None, &mut rng) as usize] += 1;
            }
            let z: f64 = logits.iter().map(|&l| (l as f64 / t).exp()).sum();
            for (i, &c) in counts.iter().enumerate() {
                let p = (logits[i] as f64 / t).exp() / z;
                let se = (p * (1.0 - p) / n as f64).sqrt();
                let f = c as f64 / n as f64;
                assert!((f - p).abs() < 4.0 * se, "T={t} token {i}: {f} vs {p}");
            }
        }
    }

    #[test]
    fn skipped_entry_never_sampled() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert_ne!(sample(&[5.0, 0.0, 0.0], 1.0, Some(0), &mut rng), 0);
        }
    }
}
