//! The remasking axis: how a step scores the confidence of each masked position's prediction
//! (reference §4.4; Dream's `alg` confidences). Positions not committed stay masked: "remasking"
//! is not committing.

use serde::{Deserialize, Serialize};

/// How confidence is scored. The names (`low_confidence`, `random`: LLaDA's reference;
/// `maskgit_plus`, `topk_margin`, `entropy`: Dream's `alg`) are the same for serde and clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Remasking {
    /// LLaDA: the probability (softmax at temperature 1) of the chosen token.
    #[default]
    LowConfidence,
    /// A uniform random number per position: a random subset is committed.
    Random,
    /// Dream's `maskgit_plus`: the probability of the chosen token under the distribution it was
    /// drawn from (softmax of the tempered, filtered logits).
    MaskgitPlus,
    /// Dream's `topk_margin`: top-1 minus top-2 probability of that distribution.
    TopkMargin,
    /// Dream's `entropy`: the negative entropy Σ p·ln(p + 1e-10) of that distribution (≤ 0).
    Entropy,
}

impl Remasking {
    /// Dream's confidences, computed from the distribution the token is drawn from (Dream's
    /// `sample_tokens`), not from the raw logits.
    pub fn is_dream(self) -> bool {
        matches!(
            self,
            Remasking::MaskgitPlus | Remasking::TopkMargin | Remasking::Entropy
        )
    }
}

impl std::str::FromStr for Remasking {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false).map_err(|_| {
            crate::Error::setting(
                "remasking",
                s,
                "must be low_confidence, random, maskgit_plus, topk_margin or entropy",
            )
        })
    }
}

impl std::fmt::Display for Remasking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = clap::ValueEnum::to_possible_value(self);
        f.write_str(v.as_ref().map_or("", |v| v.get_name()))
    }
}
