//! The checks of a prompt, written once: the CLI, the server and the sampler all call
//! [`PromptRules::check`] (the sampler without the vocabulary, which a mask predictor does not
//! expose) and [`check_length`].

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// What a prompt is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptRules {
    /// The mask token: a prompt must not contain it (prompt positions are the non-mask ones).
    pub mask_id: u32,
    /// Token ids must be below it (the model's `embedding_size`); `None`: not checked.
    pub vocab_size: Option<usize>,
    /// Prompt + answer must fit in it; `None`: not checked.
    pub max_sequence_length: Option<usize>,
}

impl PromptRules {
    /// Every rule of a model: its vocabulary and context, and the mask id.
    pub fn for_model(cfg: &ModelConfig, mask_id: u32) -> Self {
        PromptRules {
            mask_id,
            vocab_size: Some(cfg.embedding_size),
            max_sequence_length: Some(cfg.max_sequence_length),
        }
    }

    /// Only the mask rule (and non-emptiness, which every check has).
    pub fn mask_only(mask_id: u32) -> Self {
        PromptRules {
            mask_id,
            vocab_size: None,
            max_sequence_length: None,
        }
    }

    /// Checks one prompt that is to get an answer of `gen_length` tokens: not empty, no mask id,
    /// every id inside the vocabulary, prompt + answer inside the context.
    pub fn check(&self, prompt: &[u32], gen_length: usize) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::setting(
                "prompt",
                "empty",
                "needs at least one token",
            ));
        }
        if let Some(i) = prompt.iter().position(|&t| t == self.mask_id) {
            return Err(Error::setting(
                "prompt",
                format!("mask id {} at index {i}", self.mask_id),
                "a prompt must not contain the mask token (prompt positions are the non-mask ones)",
            ));
        }
        if let Some(v) = self.vocab_size {
            if let Some(i) = prompt.iter().position(|&t| t as usize >= v) {
                return Err(Error::setting(
                    "prompt",
                    format!("token {} at index {i}", prompt[i]),
                    format!("token ids must be inside the vocabulary (below embedding_size={v})"),
                ));
            }
        }
        if let Some(max) = self.max_sequence_length {
            check_length(prompt.len(), gen_length, max)?;
        }
        Ok(())
    }
}

/// A canvas of `prompt` + `answer` tokens must fit the model's `max` positions
/// ([`Error::TooLong`] otherwise). The one length check of a canvas: every caller runs it before
/// allocating anything of that length, and the sum cannot overflow.
pub fn check_length(prompt: usize, answer: usize, max: usize) -> Result<()> {
    if prompt.checked_add(answer).is_none_or(|total| total > max) {
        return Err(Error::TooLong {
            prompt,
            answer,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: PromptRules = PromptRules {
        mask_id: 9,
        vocab_size: Some(10),
        max_sequence_length: Some(8),
    };

    fn err(prompt: &[u32], gen: usize) -> String {
        RULES.check(prompt, gen).unwrap_err().to_string()
    }

    #[test]
    fn each_rule_names_the_value() {
        assert!(RULES.check(&[1, 2, 3], 5).is_ok());
        assert_eq!(
            err(&[], 4),
            "invalid setting prompt=empty: needs at least one token"
        );
        assert!(err(&[1, 9, 2], 4).contains("mask id 9 at index 1"));
        assert!(err(&[1, 2, 10], 4).contains("token 10 at index 2"));
        assert!(err(&[1, 2, 10], 4).contains("embedding_size=10"));
        assert_eq!(
            err(&[1, 2, 3], 6),
            "invalid setting gen_length=6: prompt (3 tokens) + answer (6) = 9 exceeds the model's max_sequence_length=8"
        );
        assert!(matches!(
            RULES.check(&[1, 2, 3], 6),
            Err(Error::TooLong {
                prompt: 3,
                answer: 6,
                max: 8
            })
        ));
    }

    #[test]
    fn lengths_near_usize_max_are_too_long_not_an_overflow() {
        let e = check_length(3, usize::MAX, 8).unwrap_err();
        assert!(matches!(
            e,
            Error::TooLong {
                prompt: 3,
                answer: usize::MAX,
                max: 8
            }
        ));
        // the message shows the true sum, not a wrapped one
        assert_eq!(
            e.to_string(),
            "invalid setting gen_length=18446744073709551615: prompt (3 tokens) + answer (18446744073709551615) = 18446744073709551618 exceeds the model's max_sequence_length=8"
        );
        assert!(check_length(usize::MAX, usize::MAX, usize::MAX).is_err());
        assert!(check_length(usize::MAX, 0, usize::MAX).is_ok());
    }

    #[test]
    fn unchecked_rules_are_skipped() {
        let r = PromptRules::mask_only(9);
        assert!(r.check(&[1, 200], usize::MAX).is_ok());
        assert!(r.check(&[9], 1).is_err());
        assert!(r.check(&[], 1).is_err());
    }
}
