//! Likelihood: the Monte Carlo estimate of the masked-diffusion bound on log p(answer | prompt)
//! with the reference's low-variance forward process (reference §5.1); multiple-choice evaluation
//! ([`choice`]) and perplexity bounds ([`ppl`]) build on it.

pub mod choice;
pub mod exact;
pub mod ppl;

use std::ops::ControlFlow;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sampler::guidance;
use crate::sampler::MaskPredictor;

/// Reference default of `mc_num`.
pub const DEFAULT_MC_NUM: usize = 128;
/// Reference default mini-batch size.
pub const DEFAULT_BATCH: usize = 16;

/// Settings of the estimator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreConfig {
    /// Monte Carlo samples (rows) in all.
    pub mc_num: usize,
    /// Rows per forward pass; must divide `mc_num`.
    pub batch: usize,
    /// Unsupervised CFG scale (0 = off).
    pub cfg_scale: f64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            mc_num: DEFAULT_MC_NUM,
            batch: DEFAULT_BATCH,
            cfg_scale: 0.0,
        }
    }
}

impl ScoreConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::setting("batch", self.batch, "must be at least 1"));
        }
        if self.mc_num == 0 || !self.mc_num.is_multiple_of(self.batch) {
            return Err(Error::setting(
                "mc_num",
                self.mc_num,
                format!(
                    "must be a positive multiple of the batch size={}",
                    self.batch
                ),
            ));
        }
        if !self.cfg_scale.is_finite() || self.cfg_scale < 0.0 {
            return Err(Error::setting(
                "cfg_scale",
                self.cfg_scale,
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }
}

/// Default of [`ScoreLimits::max_mc_num`].
pub const DEFAULT_MAX_MC_NUM: usize = 1024;
/// Default of [`ScoreLimits::max_batch_tokens`].
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16384;

/// Bounds on the work and memory of one estimate, checked before it runs (the server's
/// per-request bounds). One forward pass holds `rows × (prompt + answer)` tokens of activations
/// and `rows × answer × vocabulary` logits, so the tokens of a pass bound its memory; `mc_num`
/// bounds the number of passes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreLimits {
    /// Most Monte Carlo samples in all.
    pub max_mc_num: usize,
    /// Most tokens in one forward pass: rows × (prompt + answer), the rows doubled with
    /// classifier-free guidance.
    pub max_batch_tokens: usize,
}

impl Default for ScoreLimits {
    fn default() -> Self {
        ScoreLimits {
            max_mc_num: DEFAULT_MAX_MC_NUM,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
        }
    }
}

impl ScoreLimits {
    /// Tokens in one forward pass of [`log_likelihood`] with `cfg` on this pair.
    pub fn batch_tokens(cfg: &ScoreConfig, prompt_len: usize, answer_len: usize) -> usize {
        let rows = if answer_len == 1 { 1 } else { cfg.batch };
        let rows = if cfg.cfg_scale > 0.0 {
            rows.saturating_mul(2)
        } else {
            rows
        };
        rows.saturating_mul(prompt_len.saturating_add(answer_len))
    }

    /// Checks the limits themselves (each at least 1).
    pub fn validate(&self) -> Result<()> {
        if self.max_mc_num == 0 {
            return Err(Error::setting(
                "score-max-mc-num",
                self.max_mc_num,
                "must be at least 1",
            ));
        }
        if self.max_batch_tokens == 0 {
            return Err(Error::setting(
                "score-max-batch-tokens",
                self.max_batch_tokens,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Checks an estimate's settings and sizes against the limits, naming the setting to lower
    /// and the rule.
    pub fn check(&self, cfg: &ScoreConfig, prompt_len: usize, answer_len: usize) -> Result<()> {
        cfg.validate()?;
        if cfg.mc_num > self.max_mc_num {
            return Err(Error::setting(
                "mc_num",
                cfg.mc_num,
                format!("must be at most {} (this server's limit)", self.max_mc_num),
            ));
        }
        let tokens = Self::batch_tokens(cfg, prompt_len, answer_len);
        if tokens > self.max_batch_tokens {
            let len = prompt_len + answer_len;
            return Err(Error::setting(
                "batch",
                cfg.batch,
                format!(
                    "one forward pass would hold {tokens} tokens ({} rows{} × {len} prompt + answer tokens), more than this server's limit of {} tokens per pass: lower batch",
                    tokens / len.max(1),
                    if cfg.cfg_scale > 0.0 { ", doubled for cfg_scale," } else { "" },
                    self.max_batch_tokens
                ),
            ));
        }
        Ok(())
    }
}

/// Round half to even (torch.round).
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Mask counts of the low-variance forward process for `rows` rows over an answer of `t` tokens
/// and offset `k` ∈ [1, t]: round(linspace(k, k + (rows − 1)·t/rows, rows)), wrapped into [1, t].
pub fn mask_counts(t: usize, rows: usize, k: usize) -> Vec<usize> {
    (0..rows)
        .map(|r| {
            let v = k as f64 + r as f64 * t as f64 / rows as f64;
            let n = round_half_even(v) as i64;
            (((n - 1).rem_euclid(t as i64)) + 1) as usize
        })
        .collect()
}

/// One draw of the low-variance forward process: `rows` rows over an answer of `t` tokens; row r
/// masks exactly counts[r] answer positions chosen by a random permutation. Returns the masks.
pub fn low_variance_masks(t: usize, rows: usize, rng: &mut Rng) -> Vec<Vec<bool>> {
    let k = rng.int_inclusive(1, t);
    mask_counts(t, rows, k)
        .into_iter()
        .map(|n| {
            let perm = rng.permutation(t);
            let mut m = vec![false; t];
            for &i in &perm[..n] {
                m[i] = true;
            }
            m
        })
        .collect()
}

/// The terms of one mini-batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchTerms {
    /// Per row: Σ over its masked positions of CE / p_mask, p_mask = (masked count) / T.
    pub row_terms: Vec<f64>,
    /// Per row: the unweighted cross-entropy of each masked position, in position order.
    pub token_ce: Vec<Vec<f64>>,
    /// Σ_r row_terms / rows.
    pub batch_loss: f64,
}

/// A likelihood estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// The estimated bound on log p(answer | prompt), summed over answer tokens.
    pub log_likelihood: f64,
    /// Its standard error (from the spread of the mini-batch losses).
    pub stderr: f64,
    /// Forward passes used.
    pub nfe: usize,
    pub batches: Vec<BatchTerms>,
}

/// Per-row cross-entropies of the masked answer positions of one noisy mini-batch.
fn batch_terms(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    answer: &[u32],
    masks: &[Vec<bool>],
    cfg_scale: f64,
    mask_id: u32,
) -> Result<BatchTerms> {
    let (lp, t) = (prompt.len(), answer.len());
    let l = lp + t;
    let rows = masks.len();
    let device = model.device();
    let mut flat: Vec<u32> = Vec::with_capacity(2 * rows * l);
    for m in masks {
        flat.extend_from_slice(prompt);
        flat.extend(
            answer
                .iter()
                .zip(m)
                .map(|(&a, &mk)| if mk { mask_id } else { a }),
        );
    }
    let guided = cfg_scale > 0.0;
    if guided {
        let is_prompt: Vec<bool> = (0..l).map(|i| i < lp).collect();
        let cond = flat.clone();
        for row in cond.chunks(l) {
            flat.extend(guidance::unconditional(row, &is_prompt, mask_id));
        }
    }
    let n = flat.len() / l;
    let x = Tensor::from_vec(flat, (n, l), &device)?;
    let logits = model.logits(&x, None, lp..l)?.to_dtype(DType::F32)?; // [n, T, V]
    let logits = if guided {
        let c = logits.narrow(0, 0, rows)?;
        let u = logits.narrow(0, rows, rows)?;
        guidance::combine(&c, &u, cfg_scale)?
    } else {
        logits
    };
    // CE = logsumexp(ℓ) − ℓ[target], for every answer position.
    let lse = logits.log_sum_exp(D::Minus1)?; // [rows, T]
    let targets: Vec<u32> = (0..rows).flat_map(|_| answer.iter().copied()).collect();
    let targets = Tensor::from_vec(targets, (rows, t, 1), &device)?;
    let picked = logits.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?; // [rows, T]
    let ce: Vec<Vec<f32>> = (lse - picked)?.to_vec2()?;
    let mut row_terms = Vec::with_capacity(rows);
    let mut token_ce = Vec::with_capacity(rows);
    for (r, m) in masks.iter().enumerate() {
        let masked: Vec<f64> = (0..t).filter(|&i| m[i]).map(|i| ce[r][i] as f64).collect();
        let count = masked.len();
        let term = if count == 0 {
            0.0
        } else {
            masked.iter().sum::<f64>() * t as f64 / count as f64
        };
        row_terms.push(term);
        token_ce.push(masked);
    }
    let batch_loss = row_terms.iter().sum::<f64>() / rows as f64;
    Ok(BatchTerms {
        row_terms,
        token_ce,
        batch_loss,
    })
}

fn check_pair(prompt: &[u32], answer: &[u32], mask_id: u32, max_len: usize) -> Result<()> {
    if answer.is_empty() {
        return Err(Error::setting(
            "answer",
            "empty",
            "needs at least one token",
        ));
    }
    if prompt.iter().chain(answer).any(|&t| t == mask_id) {
        return Err(Error::setting(
            "prompt/answer",
            format!("contains the mask id {mask_id}"),
            "the texts scored must not contain the mask token",
        ));
    }
    let l = prompt.len() + answer.len();
    if l > max_len {
        return Err(Error::setting(
            "answer",
            format!("{} + {} tokens", prompt.len(), answer.len()),
            format!("prompt + answer must fit the model's max_sequence_length={max_len}"),
        ));
    }
    Ok(())
}

fn finish(batches: Vec<BatchTerms>, nfe: usize) -> Estimate {
    let losses: Vec<f64> = batches.iter().map(|b| b.batch_loss).collect();
    let n = losses.len() as f64;
    let mean = losses.iter().sum::<f64>() / n;
    let stderr = if losses.len() > 1 {
        (losses.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt()
    } else {
        // One mini-batch: the spread of its (stratified) rows, an approximation.
        let rows = &batches[0].row_terms;
        let m = rows.len() as f64;
        if rows.len() > 1 {
            (rows.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0) / m).sqrt()
        } else {
            0.0
        }
    };
    Estimate {
        log_likelihood: -mean,
        stderr,
        nfe,
        batches,
    }
}

/// Estimates the bound on log p(answer | prompt): `mc_num / batch` mini-batches of the
/// low-variance forward process drawn from `rng`. When the answer is a single token the estimate
/// is exact with one sample (reference §5.2), so one row is used whatever `mc_num` says.
pub fn log_likelihood(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    answer: &[u32],
    cfg: &ScoreConfig,
    mask_id: u32,
    rng: &mut Rng,
) -> Result<Estimate> {
    log_likelihood_until(model, prompt, answer, cfg, mask_id, rng, &mut || {
        ControlFlow::Continue(())
    })
}

/// [`log_likelihood`] that asks `go_on` before every mini-batch: a `Break` stops the estimate
/// with [`Error::Cancelled`] (a client that went away, a deadline that passed).
pub fn log_likelihood_until(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    answer: &[u32],
    cfg: &ScoreConfig,
    mask_id: u32,
    rng: &mut Rng,
    go_on: &mut dyn FnMut() -> ControlFlow<()>,
) -> Result<Estimate> {
    cfg.validate()?;
    check_pair(prompt, answer, mask_id, model.max_sequence_length())?;
    if answer.len() == 1 {
        if go_on().is_break() {
            return Err(Error::Cancelled);
        }
        let terms = batch_terms(model, prompt, answer, &[vec![true]], cfg.cfg_scale, mask_id)?;
        return Ok(finish(vec![terms], 1));
    }
    let iters = cfg.mc_num / cfg.batch;
    let mut batches = Vec::with_capacity(iters);
    for _ in 0..iters {
        if go_on().is_break() {
            return Err(Error::Cancelled);
        }
        let masks = low_variance_masks(answer.len(), cfg.batch, rng);
        batches.push(batch_terms(
            model,
            prompt,
            answer,
            &masks,
            cfg.cfg_scale,
            mask_id,
        )?);
    }
    Ok(finish(batches, iters))
}

/// The deterministic entry point: the estimate for given mask patterns (one `Vec` of rows per
/// mini-batch, each row a mask over the answer positions).
pub fn log_likelihood_with_masks(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    answer: &[u32],
    masks: &[Vec<Vec<bool>>],
    cfg_scale: f64,
    mask_id: u32,
) -> Result<Estimate> {
    check_pair(prompt, answer, mask_id, model.max_sequence_length())?;
    if masks.is_empty() {
        return Err(Error::setting(
            "masks",
            "none",
            "give at least one mini-batch",
        ));
    }
    let mut batches = Vec::with_capacity(masks.len());
    for m in masks {
        if m.is_empty() || m.iter().any(|r| r.len() != answer.len()) {
            return Err(Error::setting(
                "masks",
                "wrong shape",
                format!(
                    "each row must have one entry per answer token ({})",
                    answer.len()
                ),
            ));
        }
        batches.push(batch_terms(model, prompt, answer, m, cfg_scale, mask_id)?);
    }
    let n = batches.len();
    Ok(finish(batches, n))
}

/// Log-likelihoods of several single-token candidates after one prompt, from one forward pass:
/// every candidate sees the same input (the prompt and one mask), so this is exact.
pub fn single_token_candidates(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    candidates: &[u32],
    cfg_scale: f64,
    mask_id: u32,
) -> Result<Vec<f64>> {
    check_pair(prompt, &[0], mask_id, model.max_sequence_length())?;
    let l = prompt.len() + 1;
    let device = model.device();
    let mut flat: Vec<u32> = prompt.to_vec();
    flat.push(mask_id);
    if cfg_scale > 0.0 {
        flat.extend(std::iter::repeat_n(mask_id, l));
    }
    let n = flat.len() / l;
    let x = Tensor::from_vec(flat, (n, l), &device)?;
    let logits = model
        .logits(&x, None, prompt.len()..l)?
        .to_dtype(DType::F32)?; // [n, 1, V]
    let logits = if cfg_scale > 0.0 {
        guidance::combine(
            &logits.narrow(0, 0, 1)?,
            &logits.narrow(0, 1, 1)?,
            cfg_scale,
        )?
    } else {
        logits
    };
    // log p = ℓ[c] − logsumexp(ℓ), rounded as the estimator's one-token path rounds it (the same
    // f32 operations), so that scoring a candidate alone (`/v1/score`) gives the same number
    let lse: f32 = logits
        .log_sum_exp(D::Minus1)?
        .flatten_all()?
        .to_vec1::<f32>()?[0];
    let l: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    candidates
        .iter()
        .map(|&c| {
            l.get(c as usize)
                .map(|&v| -((lse - v) as f64))
                .ok_or_else(|| Error::setting("candidate", c, "token id outside the vocabulary"))
        })
        .collect()
}

/// The estimates of several one-token answers to one prompt from one forward pass
/// ([`single_token_candidates`]): each equal, to the bit, to [`log_likelihood`] of that answer
/// alone (the server scores the candidates of a question that wait together this way).
pub fn single_token_estimates(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    candidates: &[u32],
    cfg_scale: f64,
    mask_id: u32,
) -> Result<Vec<Estimate>> {
    let scores = single_token_candidates(model, prompt, candidates, cfg_scale, mask_id)?;
    Ok(scores
        .into_iter()
        .map(|s| {
            let ce = -s;
            finish(
                vec![BatchTerms {
                    row_terms: vec![ce],
                    token_ce: vec![vec![ce]],
                    batch_loss: ce,
                }],
                1,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_count_examples() {
        assert_eq!(mask_counts(10, 4, 3), vec![3, 6, 8, 10]);
        assert_eq!(mask_counts(10, 4, 9), vec![9, 2, 4, 6]);
        assert_eq!(mask_counts(20, 8, 5), vec![5, 8, 10, 12, 15, 18, 20, 2]);
    }

    #[test]
    fn masks_have_the_drawn_counts() {
        let mut rng = Rng::new(1);
        for t in 1..30 {
            for rows in [1, 3, 8, 16] {
                let m = low_variance_masks(t, rows, &mut rng);
                assert_eq!(m.len(), rows);
                for row in &m {
                    let c = row.iter().filter(|&&x| x).count();
                    assert!((1..=t).contains(&c));
                }
            }
        }
    }

    #[test]
    fn config_rules() {
        assert!(ScoreConfig {
            mc_num: 100,
            batch: 16,
            cfg_scale: 0.0
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("mc_num=100"));
        assert!(ScoreConfig {
            mc_num: 16,
            batch: 0,
            cfg_scale: 0.0
        }
        .validate()
        .is_err());
        assert!(ScoreConfig::default().validate().is_ok());
    }

    #[test]
    fn limits_bound_each_pass_and_the_samples() {
        let l = ScoreLimits {
            max_mc_num: 256,
            max_batch_tokens: 1000,
        };
        let cfg = |mc_num, batch, cfg_scale| ScoreConfig {
            mc_num,
            batch,
            cfg_scale,
        };
        assert!(l.check(&cfg(128, 16, 0.0), 30, 30).is_ok()); // 16 × 60 = 960 tokens
        let e = l.check(&cfg(128, 16, 1.0), 30, 30).unwrap_err(); // × 2 rows with guidance
        assert!(
            matches!(&e, Error::InvalidSetting { name, .. } if name == "batch"),
            "{e}"
        );
        assert!(e.to_string().contains("1920 tokens"), "{e}");
        let e = l.check(&cfg(512, 16, 0.0), 1, 1).unwrap_err();
        assert!(e.to_string().contains("mc_num=512"), "{e}");
        // a one-token answer runs one row whatever the batch
        assert_eq!(ScoreLimits::batch_tokens(&cfg(256, 256, 0.0), 99, 1), 100);
        assert!(ScoreLimits {
            max_mc_num: 0,
            max_batch_tokens: 1
        }
        .validate()
        .is_err());
    }
}
