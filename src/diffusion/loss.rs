//! The masked-diffusion training bound: cross-entropy on masked positions weighted by 1/p_mask and
//! normalised as the reference (GUIDELINES.md): pretraining by b × L, SFT by each sequence's
//! answer length (EOS padding included) and then b.

use candle_core::{DType, Device, Tensor, D};

use super::noise::Noised;
use crate::error::{Error, Result};

/// The training objective.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// Σ CE/p_mask ÷ (b·L).
    Pretrain,
    /// Σ CE/p_mask/answer_len ÷ b, answer_len = L − prompt_length per sequence.
    Sft { prompt_lengths: Vec<usize> },
    /// The autoregressive twin's next-token loss: Σ CE(x_{i+1} | x_≤i) ÷ (b·(L−1)), no masking.
    NextToken,
}

/// The masked positions of a batch (flattened indices into [b·L]), their targets and weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossWeights {
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

impl LossWeights {
    /// Next-token prediction: position i predicts token i+1 (the input is the clean batch).
    pub fn next_token(x0: &[Vec<u32>]) -> Self {
        let b = x0.len();
        let l = x0.first().map(Vec::len).unwrap_or(0);
        let mut out = LossWeights::default();
        if l < 2 {
            return out;
        }
        let w = 1.0 / (b * (l - 1)) as f32;
        for (r, row) in x0.iter().enumerate() {
            for i in 0..l - 1 {
                out.positions.push((r * l + i) as u32);
                out.targets.push(row[i + 1]);
                out.weights.push(w);
            }
        }
        out
    }

    /// Weights of `noised` (built from clean tokens `x0`) under `objective`.
    pub fn new(x0: &[Vec<u32>], noised: &Noised, objective: &Objective) -> Result<Self> {
        let b = x0.len();
        let l = x0.first().map(Vec::len).unwrap_or(0);
        let mut out = LossWeights::default();
        for (r, row) in x0.iter().enumerate() {
            let norm = match objective {
                Objective::Pretrain => (b * l) as f32,
                Objective::NextToken => return Ok(LossWeights::next_token(x0)),
                Objective::Sft { prompt_lengths } => {
                    let pl = *prompt_lengths.get(r).ok_or_else(|| {
                        Error::setting(
                            "prompt_lengths",
                            prompt_lengths.len(),
                            format!("needs one per sequence ({b})"),
                        )
                    })?;
                    if pl >= l {
                        return Err(Error::setting(
                            "prompt_length",
                            pl,
                            format!("must be shorter than the sequence ({l}): an SFT example needs an answer"),
                        ));
                    }
                    ((l - pl) * b) as f32
                }
            };
            for (i, (&m, &tok)) in noised.masked[r].iter().zip(row).enumerate() {
                if m {
                    out.positions.push((r * l + i) as u32);
                    out.targets.push(tok);
                    out.weights.push(1.0 / noised.p_mask[r] / norm);
                }
            }
        }
        Ok(out)
    }
}

/// Σ_i w_i · CE(logits_i, target_i) for logits [N, V] of the masked positions (differentiable;
/// log-softmax in f32).
pub fn masked_diffusion_loss(logits: &Tensor, w: &LossWeights) -> Result<Tensor> {
    let device = logits.device();
    let n = w.targets.len();
    if n == 0 {
        return Ok(Tensor::zeros((), DType::F32, device)?);
    }
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?; // [N, V]
    let targets = Tensor::from_slice(&w.targets, (n, 1), device)?;
    let picked = lp.gather(&targets, 1)?.squeeze(1)?; // [N]
    let weights = Tensor::from_slice(&w.weights, n, device)?;
    Ok((picked * weights)?.sum_all()?.neg()?)
}

/// Σ CE over masked positions, unweighted, from logits [N, V] (for reporting).
pub fn token_ce_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    if targets.is_empty() {
        return Ok(0.0);
    }
    let lse = logits.to_dtype(DType::F32)?.log_sum_exp(D::Minus1)?;
    let t = Tensor::from_slice(targets, (targets.len(), 1), &Device::Cpu)?
        .to_device(logits.device())?;
    let picked = logits.to_dtype(DType::F32)?.gather(&t, 1)?.squeeze(1)?;
    Ok((lse - picked)?.sum_all()?.to_scalar::<f32>()? as f64)
}
