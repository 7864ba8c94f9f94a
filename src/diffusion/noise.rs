//! The forward process: each token is replaced by the mask independently with probability
//! p_mask = (1 − ε)·t + ε, t ~ U[0, 1) per sequence (reference §3.2); for SFT the prompt is then
//! restored (§3.3).

use crate::rng::Rng;

/// ε of the reference: p_mask ∈ [ε, 1).
pub const EPS: f32 = 1e-3;

/// p_mask = (1 − ε)·t + ε, in f32 as the reference computes it.
pub fn p_mask(t: f32, eps: f32) -> f32 {
    t * (1.0 - eps) + eps
}

/// A noised batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Noised {
    /// Per sequence: t.
    pub t: Vec<f32>,
    /// Per sequence: p_mask.
    pub p_mask: Vec<f32>,
    /// [b][L]: which positions are masked.
    pub masked: Vec<Vec<bool>>,
    /// [b][L]: the model input (x₀ with the mask id where masked).
    pub noisy: Vec<Vec<u32>>,
}

impl Noised {
    /// Applies given masks (and times) to clean tokens.
    pub fn from_masks(
        x0: &[Vec<u32>],
        t: &[f32],
        masked: Vec<Vec<bool>>,
        mask_id: u32,
        eps: f32,
    ) -> Self {
        let noisy = x0
            .iter()
            .zip(&masked)
            .map(|(row, m)| {
                row.iter()
                    .zip(m)
                    .map(|(&x, &mk)| if mk { mask_id } else { x })
                    .collect()
            })
            .collect();
        Noised {
            t: t.to_vec(),
            p_mask: t.iter().map(|&t| p_mask(t, eps)).collect(),
            masked,
            noisy,
        }
    }

    /// Number of masked positions.
    pub fn num_masked(&self) -> usize {
        self.masked.iter().flatten().filter(|&&m| m).count()
    }
}

/// How the per-sequence times t of a batch are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSampling {
    /// Independent uniform draws (the reference).
    #[default]
    Iid,
    /// One uniform offset u per batch, t_i = (i + u)/b in a random row order: still uniform for
    /// every row, but the batch covers [0, 1) evenly, which lowers the variance of the 1/t-weighted
    /// loss (the low-discrepancy sampler of MDLM). Not the reference: opt in.
    Stratified,
}

/// Draws the times of a batch of `b` sequences.
pub fn draw_times(b: usize, sampling: TimeSampling, rng: &mut Rng) -> Vec<f32> {
    match sampling {
        TimeSampling::Iid => (0..b).map(|_| rng.uniform_f32()).collect(),
        TimeSampling::Stratified => {
            let u = rng.uniform();
            let order = rng.permutation(b);
            order
                .into_iter()
                .map(|i| ((i as f64 + u) / b as f64) as f32)
                .collect()
        }
    }
}

/// Draws t ~ U[0, 1) per sequence, then masks each position independently with probability
/// p_mask. `prompt_lengths` (SFT) restores the first positions of each row: the prompt is never
/// masked.
pub fn forward_process(
    x0: &[Vec<u32>],
    prompt_lengths: Option<&[usize]>,
    mask_id: u32,
    eps: f32,
    rng: &mut Rng,
) -> Noised {
    forward_process_with(x0, prompt_lengths, mask_id, eps, TimeSampling::Iid, rng)
}

/// [`forward_process`] with a choice of time sampling.
pub fn forward_process_with(
    x0: &[Vec<u32>],
    prompt_lengths: Option<&[usize]>,
    mask_id: u32,
    eps: f32,
    sampling: TimeSampling,
    rng: &mut Rng,
) -> Noised {
    let t = draw_times(x0.len(), sampling, rng);
    let masked = x0
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let p = p_mask(t[r], eps);
            let keep = prompt_lengths.map(|pl| pl[r]).unwrap_or(0);
            (0..row.len())
                .map(|i| {
                    let m = rng.uniform_f32() < p;
                    m && i >= keep
                })
                .collect()
        })
        .collect();
    Noised::from_masks(x0, &t, masked, mask_id, eps)
}

/// The reference's random-length rule: with probability `prob` (one coin per batch) the whole
/// batch is cut to a length drawn uniformly from 1..=len. Returns the length to use.
pub fn random_length(len: usize, prob: f64, rng: &mut Rng) -> usize {
    if rng.uniform() < prob {
        rng.int_inclusive(1, len)
    } else {
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_fraction_tracks_t_and_prompt_is_kept() {
        let x0 = vec![vec![7u32; 4000]; 64];
        let pl = vec![100usize; 64];
        let n = forward_process(&x0, Some(&pl), 9, EPS, &mut Rng::new(4));
        for (r, m) in n.masked.iter().enumerate() {
            assert!(m[..100].iter().all(|&x| !x), "prompt masked");
            let frac = m[100..].iter().filter(|&&x| x).count() as f64 / 3900.0;
            let p = n.p_mask[r] as f64;
            let se = (p * (1.0 - p) / 3900.0).sqrt();
            assert!((frac - p).abs() < 5.0 * se + 1e-9, "row {r}: {frac} vs {p}");
            for (i, &mk) in m.iter().enumerate() {
                assert_eq!(n.noisy[r][i] == 9, mk);
            }
        }
        assert!(n.p_mask.iter().all(|&p| (EPS..1.0).contains(&p)));
    }

    #[test]
    fn random_length_rule() {
        let mut rng = Rng::new(1);
        let cuts = (0..20000)
            .filter(|_| random_length(64, 0.01, &mut rng) != 64)
            .count();
        assert!((100..300).contains(&cuts), "{cuts}");
    }
}
