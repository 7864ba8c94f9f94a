//! The remasking axis: how a step scores the confidence of each masked position's prediction
//! (reference §4.4). Positions not committed stay masked: "remasking" is not committing.

use serde::{Deserialize, Serialize};

/// How confidence is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
        match s {
            "low_confidence" => Ok(Remasking::LowConfidence),
            "random" => Ok(Remasking::Random),
            _ => Err(crate::Error::setting(
                "remasking",
                s,
                "must be low_confidence or random",
            )),
        }
    }
}

impl std::fmt::Display for Remasking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Remasking::LowConfidence => "low_confidence",
            Remasking::Random => "random",
        })
    }
}
