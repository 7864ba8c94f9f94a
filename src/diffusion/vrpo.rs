//! VRPO (LLaDA 1.5): preference optimisation for masked diffusion. DPO's log-likelihoods are
//! replaced by the ELBO of each answer given its prompt,
//!
//! B(y | x) = E_t E_{y_t ~ q(·|t, y)} [ 1/p_mask(t) · Σ_{i masked} log p(y_i | x, y_t) ],
//!
//! estimated with a budget of n = n_t × n_yt noised copies per answer (n_t timesteps, n_yt masks
//! each), and
//!
//! L = −log σ( β·[(B_π(y_w) − B_ref(y_w)) − (B_π(y_l) − B_ref(y_l))] )
//!
//! averaged over the pairs. Variance reduction as LLaDA 1.5 does it: the whole budget on
//! timesteps by default (n_yt = 1), and antithetic sampling: the policy's and the reference's
//! estimates of the same answer share the same timesteps and masks, so the noise common to both
//! cancels in their difference.
//!
//! This file holds the estimator's sampling ([`elbo_samples`]) and the loss ([`dpo_loss`],
//! [`elbo_per_answer`]); the trainer runs the models.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::noise::{self, TimeSampling};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Settings of a VRPO run (`[vrpo]` of a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VrpoSettings {
    /// DPO's β: the strength of the pull towards the reference.
    pub beta: f64,
    /// n_t: timesteps per answer and step.
    pub timesteps: usize,
    /// n_yt: masks per timestep. The budget n = timesteps × masks noised copies of every answer,
    /// each one forward pass of the policy (with its backward) and of the reference.
    pub masks: usize,
    /// Policy and reference share timesteps and masks (LLaDA 1.5's antithetic sampling).
    pub antithetic: bool,
    /// Train every weight (the reference is then a frozen copy of the starting model: twice the
    /// weights in memory). By default VRPO trains a LoRA adapter and the reference is the base.
    pub full_weights: bool,
    /// λ of an added SFT term on the chosen answers, λ·mean over pairs of −B_π(y_w)/|y_w| (the
    /// SFT loss of the chosen answer, from the same samples). 0, LLaDA 1.5's objective, by
    /// default; DPO alone lowers the likelihood of chosen answers that share most tokens with
    /// the rejected ones, which this term holds up (as RPO does for autoregressive models).
    pub sft_weight: f64,
}

impl Default for VrpoSettings {
    fn default() -> Self {
        VrpoSettings {
            beta: 0.1,
            timesteps: 8,
            masks: 1,
            antithetic: true,
            full_weights: false,
            sft_weight: 0.0,
        }
    }
}

impl VrpoSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::setting(
                "vrpo beta",
                self.beta,
                "must be a positive number",
            ));
        }
        for (name, v) in [
            ("vrpo timesteps", self.timesteps),
            ("vrpo masks", self.masks),
        ] {
            if v == 0 {
                return Err(Error::setting(name, v, "must be at least 1"));
            }
        }
        if !(self.sft_weight.is_finite() && self.sft_weight >= 0.0) {
            return Err(Error::setting(
                "vrpo sft_weight",
                self.sft_weight,
                "must be a number ≥ 0",
            ));
        }
        if self.timesteps.saturating_mul(self.masks) > 256 {
            return Err(Error::setting(
                "vrpo budget",
                format!("{}×{}", self.timesteps, self.masks),
                "timesteps × masks must be at most 256 (each is one forward and backward pass of every answer)",
            ));
        }
        Ok(())
    }

    /// The budget n = n_t × n_yt.
    pub fn budget(&self) -> usize {
        self.timesteps * self.masks
    }

    /// The defaults (a run config leaves the section out then).
    pub fn is_default(&self) -> bool {
        *self == VrpoSettings::default()
    }
}

/// Noised copies of a batch of answers for the ELBO estimate: `budget` rows per answer (answer
/// a's rows are a·budget .. (a+1)·budget), each with its masked positions and their weights
/// 1/p_mask/budget (so that the weighted sum of log-probabilities over an answer's rows is the
/// Monte Carlo mean of its ELBO).
#[derive(Debug, Clone, PartialEq)]
pub struct ElboSamples {
    /// [answers·budget][L]: the model inputs.
    pub noisy: Vec<Vec<u32>>,
    /// Flat indices into [rows·L] of the masked positions.
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// The answer each masked position belongs to.
    pub answer: Vec<u32>,
    pub answers: usize,
}

impl ElboSamples {
    /// The model inputs [rows, L] and the flat masked positions, on `device`.
    pub fn inputs(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (b, l) = (self.noisy.len(), self.noisy.first().map_or(0, Vec::len));
        let ids = Tensor::from_vec(self.noisy.concat(), (b, l), device)?;
        let pos = Tensor::from_slice(&self.positions, self.positions.len(), device)?;
        Ok((ids, pos))
    }
}

/// Draws the noised copies of every row of `x0` (all of length L): `n_t` timesteps per answer
/// (drawn as `sampling` says), `n_yt` masks per timestep, each answer position (from
/// `prompt_lengths[a]` on) masked with probability p_mask(t). The prompt is never masked.
pub fn elbo_samples(
    x0: &[Vec<u32>],
    prompt_lengths: &[usize],
    settings: &VrpoSettings,
    mask_id: u32,
    sampling: TimeSampling,
    rng: &mut Rng,
) -> Result<ElboSamples> {
    if prompt_lengths.len() != x0.len() {
        return Err(Error::setting(
            "prompt_lengths",
            prompt_lengths.len(),
            format!("needs one per answer ({})", x0.len()),
        ));
    }
    let l = x0.first().map(Vec::len).unwrap_or(0);
    let n = settings.budget();
    let mut out = ElboSamples {
        noisy: Vec::with_capacity(x0.len() * n),
        positions: Vec::new(),
        targets: Vec::new(),
        weights: Vec::new(),
        answer: Vec::new(),
        answers: x0.len(),
    };
    for (a, (row, &pl)) in x0.iter().zip(prompt_lengths).enumerate() {
        if row.len() != l || pl >= l {
            return Err(Error::setting(
                "prompt_length",
                pl,
                format!(
                    "must be shorter than the sequence ({}) and every sequence {l} long",
                    row.len()
                ),
            ));
        }
        let times = noise::draw_times(settings.timesteps, sampling, rng);
        for &t in &times {
            let p = noise::p_mask(t, noise::EPS);
            let w = 1.0 / p / n as f32;
            for _ in 0..settings.masks {
                let r = out.noisy.len();
                let mut noisy = row.clone();
                for (i, tok) in noisy.iter_mut().enumerate().skip(pl) {
                    if rng.uniform_f32() < p {
                        out.positions.push((r * l + i) as u32);
                        out.targets.push(*tok);
                        out.weights.push(w);
                        out.answer.push(a as u32);
                        *tok = mask_id;
                    }
                }
                out.noisy.push(noisy);
            }
        }
    }
    Ok(out)
}

/// The log-probabilities (f32) of `targets` under `logits` [N, V] (differentiable).
pub fn target_log_probs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let t = Tensor::from_slice(targets, (n, 1), logits.device())?;
    Ok(lp.gather(&t, 1)?.squeeze(1)?)
}

/// Each answer's ELBO estimate [answers] from the logits [N, V] of the samples' masked positions
/// (differentiable): Σ over its positions of weight · log p(target).
pub fn elbo_per_answer(logits: &Tensor, s: &ElboSamples) -> Result<Tensor> {
    let device = logits.device();
    let zeros = Tensor::zeros(s.answers, DType::F32, device)?;
    if s.targets.is_empty() {
        return Ok(zeros);
    }
    let lp = target_log_probs(logits, &s.targets)?;
    let w = Tensor::from_slice(&s.weights, s.weights.len(), device)?;
    let idx = Tensor::from_slice(&s.answer, s.answer.len(), device)?;
    Ok(zeros.index_add(&idx, &(lp * w)?, 0)?)
}

/// What a batch of pairs says besides the loss: the implicit rewards β·(B_π − B_ref).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PreferenceStats {
    /// Mean reward of the chosen answers.
    pub reward_chosen: f64,
    /// Mean reward of the rejected answers.
    pub reward_rejected: f64,
    /// Mean of reward_chosen − reward_rejected per pair.
    pub reward_margin: f64,
    /// Share of pairs whose chosen answer has the higher reward.
    pub reward_accuracy: f64,
    /// Pairs seen.
    pub pairs: usize,
}

impl PreferenceStats {
    /// The weighted mean of two batches' statistics.
    pub fn merge(self, o: PreferenceStats) -> PreferenceStats {
        let n = (self.pairs + o.pairs).max(1) as f64;
        let (a, b) = (self.pairs as f64 / n, o.pairs as f64 / n);
        PreferenceStats {
            reward_chosen: a * self.reward_chosen + b * o.reward_chosen,
            reward_rejected: a * self.reward_rejected + b * o.reward_rejected,
            reward_margin: a * self.reward_margin + b * o.reward_margin,
            reward_accuracy: a * self.reward_accuracy + b * o.reward_accuracy,
            pairs: self.pairs + o.pairs,
        }
    }
}

/// DPO's loss, mean over pairs of −log σ(β·[(π_w − ref_w) − (π_l − ref_l)]), from the policy's
/// ELBO estimates [2·pairs] (chosen at even, rejected at odd indices; differentiable) and the
/// reference's (constants). Returns the loss (a scalar tensor) and the rewards' statistics.
pub fn dpo_loss(
    policy: &Tensor,
    reference: &[f32],
    beta: f64,
) -> Result<(Tensor, PreferenceStats)> {
    let device = policy.device();
    let answers = policy.dims1()?;
    if answers != reference.len() || !answers.is_multiple_of(2) || answers == 0 {
        return Err(Error::setting(
            "answers",
            answers,
            format!(
                "needs chosen/rejected pairs and one reference value each ({})",
                reference.len()
            ),
        ));
    }
    let pairs = answers / 2;
    let r = Tensor::from_slice(reference, answers, device)?;
    let ratio = (policy - r)?; // B_π − B_ref per answer
    let ratio = ratio.reshape((pairs, 2))?;
    let chosen = ratio.narrow(1, 0, 1)?.squeeze(1)?;
    let rejected = ratio.narrow(1, 1, 1)?.squeeze(1)?;
    let z = ((chosen - rejected)? * beta)?; // [pairs]
                                            // −log σ(z) = log(1 + e^{−z}) = logsumexp(0, −z), stable for any z
    let both = Tensor::stack(&[&Tensor::zeros(pairs, DType::F32, device)?, &z.neg()?], 1)?;
    let loss = both.log_sum_exp(1)?.mean_all()?;
    let stats = {
        let v: Vec<f32> = ratio.detach().flatten_all()?.to_vec1()?;
        let mut s = PreferenceStats {
            pairs,
            ..Default::default()
        };
        for p in 0..pairs {
            let (c, rj) = (beta * v[2 * p] as f64, beta * v[2 * p + 1] as f64);
            s.reward_chosen += c / pairs as f64;
            s.reward_rejected += rj / pairs as f64;
            s.reward_margin += (c - rj) / pairs as f64;
            if c > rj {
                s.reward_accuracy += 1.0 / pairs as f64;
            }
        }
        s
    };
    Ok((loss, stats))
}

/// The SFT loss of the chosen answers from the policy's ELBO estimates [2·pairs] (chosen at even
/// indices): mean over pairs of −B_π(y_w)/`answer_lengths[k]` (differentiable).
pub fn chosen_nll(policy: &Tensor, answer_lengths: &[usize]) -> Result<Tensor> {
    let pairs = answer_lengths.len();
    let chosen = policy.reshape((pairs, 2))?.narrow(1, 0, 1)?.squeeze(1)?;
    let inv: Vec<f32> = answer_lengths
        .iter()
        .map(|&n| -1.0 / (n.max(1) * pairs) as f32)
        .collect();
    let inv = Tensor::from_slice(&inv, pairs, policy.device())?;
    Ok((chosen * inv)?.sum_all()?)
}

/// The reference's ELBO estimates of every answer of `s` from its logits (no gradient).
pub fn elbo_values(logits: &Tensor, s: &ElboSamples) -> Result<Vec<f32>> {
    Ok(elbo_per_answer(&logits.detach(), s)?
        .to_device(&Device::Cpu)?
        .to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln_sigmoid(z: f64) -> f64 {
        -(1.0 + (-z).exp()).ln()
    }

    /// The loss on fixed masks against the formula computed by hand in f64.
    #[test]
    fn dpo_loss_matches_a_hand_computation() {
        // one pair, vocabulary 3, sequences of 3 tokens after a 1-token prompt; budget 2
        let s = ElboSamples {
            noisy: vec![vec![0; 4]; 4],
            // chosen: row 0 masks positions 1, 2 (t → w 1/0.5/2), row 1 masks 3 (w 1/0.25/2)
            // rejected: row 2 masks 2 (w 1/0.5/2), row 3 masks nothing
            positions: vec![1, 2, 7, 10],
            targets: vec![0, 2, 1, 1],
            weights: vec![1.0, 1.0, 2.0, 1.0],
            answer: vec![0, 0, 0, 1],
            answers: 2,
        };
        let logits_rows: [[f32; 3]; 4] = [
            [1.0, 0.0, -1.0],
            [0.5, 0.2, 0.1],
            [-0.3, 0.8, 0.0],
            [2.0, -1.0, 0.5],
        ];
        let logits = Tensor::new(&logits_rows, &Device::Cpu).unwrap();
        let lsm = |row: &[f32; 3], k: usize| {
            let m: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
            row[k] as f64 - m.ln()
        };
        let b_chosen =
            lsm(&logits_rows[0], 0) + lsm(&logits_rows[1], 2) + 2.0 * lsm(&logits_rows[2], 1);
        let b_rejected = lsm(&logits_rows[3], 1);
        let elbo: Vec<f32> = elbo_per_answer(&logits, &s).unwrap().to_vec1().unwrap();
        assert!(
            (elbo[0] as f64 - b_chosen).abs() < 1e-5,
            "{elbo:?} vs {b_chosen}"
        );
        assert!((elbo[1] as f64 - b_rejected).abs() < 1e-5);
        let reference = [-3.0f32, -1.5];
        let beta = 0.5;
        let (loss, stats) = dpo_loss(
            &Tensor::new(&elbo[..], &Device::Cpu).unwrap(),
            &reference,
            beta,
        )
        .unwrap();
        let z = beta * ((b_chosen + 3.0) - (b_rejected + 1.5));
        let want = -ln_sigmoid(z);
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!((stats.reward_margin - z).abs() < 1e-5);
        assert_eq!(stats.reward_accuracy, if z > 0.0 { 1.0 } else { 0.0 });
        // a large margin stays finite (no overflow in the stable form)
        let (big, _) = dpo_loss(
            &Tensor::new(&[0f32, 1e4][..], &Device::Cpu).unwrap(),
            &[0.0, 0.0],
            1.0,
        )
        .unwrap();
        assert!((big.to_scalar::<f32>().unwrap() - 1e4).abs() < 1.0);
    }

    /// The gradient of the loss with respect to the policy's ELBO values: ∂L/∂π_w = −β·σ(−z),
    /// ∂L/∂π_l = +β·σ(−z).
    #[test]
    fn dpo_gradient_matches_the_formula() {
        let v = candle_core::Var::new(&[-2.0f32, -2.5][..], &Device::Cpu).unwrap();
        let (loss, _) = dpo_loss(v.as_tensor(), &[-2.2, -2.1], 0.3).unwrap();
        let g = loss.backward().unwrap();
        let g: Vec<f32> = g.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        let z = 0.3 * ((-2.0 + 2.2) - (-2.5 + 2.1f64));
        let s = 1.0 / (1.0 + z.exp());
        assert!((g[0] as f64 + 0.3 * s).abs() < 1e-6, "{g:?}");
        assert!((g[1] as f64 - 0.3 * s).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn the_sft_term_is_the_chosen_answers_mean_loss() {
        let p = Tensor::new(&[-6f32, -1.0, -2.0, -9.0][..], &Device::Cpu).unwrap();
        let v = chosen_nll(&p, &[3, 4]).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - (6.0 / 3.0 + 2.0 / 4.0) / 2.0).abs() < 1e-6, "{v}");
        assert!(VrpoSettings {
            sft_weight: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn samples_mask_answers_only_with_the_budget() {
        let x0 = vec![vec![5u32; 400], vec![6u32; 400]];
        let set = VrpoSettings {
            timesteps: 3,
            masks: 2,
            ..Default::default()
        };
        let s = elbo_samples(
            &x0,
            &[100, 50],
            &set,
            9,
            TimeSampling::Iid,
            &mut Rng::new(1),
        )
        .unwrap();
        assert_eq!(s.noisy.len(), 12);
        for (k, &p) in s.positions.iter().enumerate() {
            let (r, i) = (p as usize / 400, p as usize % 400);
            let a = s.answer[k] as usize;
            assert_eq!(r / 6, a);
            assert!(i >= [100, 50][a]);
            assert_eq!(s.noisy[r][i], 9);
        }
        // rows of one timestep share its weight; the weights are 1/p/n
        for r in 0..12 {
            let ws: Vec<f32> = (0..s.positions.len())
                .filter(|&k| s.positions[k] as usize / 400 == r)
                .map(|k| s.weights[k])
                .collect();
            assert!(ws.windows(2).all(|w| w[0] == w[1]));
            if let Some(&w) = ws.first() {
                let p = 1.0 / (w as f64 * 6.0);
                let masked = ws.len() as f64 / (400.0 - [100.0, 50.0][r / 6]);
                assert!((masked - p).abs() < 0.15, "row {r}: {masked} vs {p}");
            }
        }
        assert!(VrpoSettings {
            beta: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(VrpoSettings {
            masks: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(VrpoSettings {
            timesteps: 64,
            masks: 8,
            ..Default::default()
        }
        .validate()
        .is_err());
        // the weights are exactly 1/p_mask(t)/n for the times drawn first for each answer
        let mut rng = Rng::new(1);
        let times = noise::draw_times(3, TimeSampling::Iid, &mut rng.clone());
        let s = elbo_samples(&x0, &[100, 50], &set, 9, TimeSampling::Iid, &mut rng).unwrap();
        for (k, &p) in s.positions.iter().enumerate() {
            let r = p as usize / 400;
            if r < 6 {
                let want = 1.0 / noise::p_mask(times[r / 2], noise::EPS) / 6.0;
                assert_eq!(s.weights[k].to_bits(), want.to_bits(), "row {r}");
            }
        }
    }
}
