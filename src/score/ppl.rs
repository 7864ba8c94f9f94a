//! Perplexity bounds: the likelihood bound per token of a text, window by window.

use serde::Serialize;

use super::{log_likelihood, ScoreConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sampler::MaskPredictor;

/// The bound over a token stream.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityBound {
    pub tokens: usize,
    pub windows: usize,
    /// Upper bound on the negative log-likelihood per token (nats).
    pub nll_per_token: f64,
    /// Its standard error.
    pub stderr: f64,
    /// exp(nll_per_token): an upper bound on the perplexity.
    pub perplexity_bound: f64,
}

/// Splits `ids` into windows of `context` tokens (the last may be shorter) and bounds the NLL of
/// each with the Monte Carlo estimator (an empty prompt: every token is scored). Windows are
/// scored independently (no context carried across).
pub fn perplexity(
    model: &mut dyn MaskPredictor,
    ids: &[u32],
    context: usize,
    cfg: &ScoreConfig,
    mask_id: u32,
    seed: u64,
    on_window: &mut dyn FnMut(usize, usize),
) -> Result<PerplexityBound> {
    if ids.is_empty() {
        return Err(Error::setting("text", "empty", "needs at least one token"));
    }
    if context == 0 {
        return Err(Error::setting("context", context, "must be at least 1"));
    }
    let max = model.max_sequence_length();
    if context > max {
        return Err(Error::setting(
            "context",
            context,
            format!("must not exceed the model's max_sequence_length={max}"),
        ));
    }
    let mut rng = Rng::new(seed);
    let windows: Vec<&[u32]> = ids.chunks(context).collect();
    let (mut nll, mut var) = (0.0, 0.0);
    for (i, w) in windows.iter().enumerate() {
        let e = log_likelihood(model, &[], w, cfg, mask_id, &mut rng)?;
        nll -= e.log_likelihood;
        var += e.stderr * e.stderr;
        on_window(i + 1, windows.len());
    }
    let n = ids.len() as f64;
    Ok(PerplexityBound {
        tokens: ids.len(),
        windows: windows.len(),
        nll_per_token: nll / n,
        stderr: var.sqrt() / n,
        perplexity_bound: (nll / n).exp(),
    })
}
