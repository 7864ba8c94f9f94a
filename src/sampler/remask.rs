//! The remasking axis: how a step scores the confidence of each masked position's prediction
//! (reference §4.4). Positions not committed stay masked: "remasking" is not committing.

use serde::{Deserialize, Serialize};

/// How confidence is scored. The names (`low_confidence`, `random`) are the reference's, the same
/// for serde and clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Remasking {
    /// The probability (softmax at temperature 1) of the chosen token.
    #[default]
    LowConfidence,
    /// A uniform random number per position: a random subset is committed.
    Random,
}

impl std::str::FromStr for Remasking {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| crate::Error::setting("remasking", s, "must be low_confidence or random"))
    }
}

impl std::fmt::Display for Remasking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = clap::ValueEnum::to_possible_value(self);
        f.write_str(v.as_ref().map_or("", |v| v.get_name()))
    }
}
