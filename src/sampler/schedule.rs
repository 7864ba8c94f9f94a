//! The linear transfer schedule and the semi-autoregressive blocks (reference §4.2–4.3).

use crate::error::{Error, Result};

/// Tokens to reveal at each of `steps` steps when `masked` positions are masked: ⌊M/S⌋ each, the
/// first M mod S steps one more (the remainder is front-loaded, as the reference does).
pub fn num_transfer_tokens(masked: usize, steps: usize) -> Vec<usize> {
    if steps == 0 {
        return Vec::new();
    }
    let (base, rem) = (masked / steps, masked % steps);
    (0..steps).map(|i| base + usize::from(i < rem)).collect()
}

/// Block layout of a generation: `gen_length` split into blocks of `block_length`, `steps`
/// shared equally between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    pub num_blocks: usize,
    pub block_length: usize,
    pub steps_per_block: usize,
}

impl Blocks {
    /// Checks the reference's preconditions (gen_length divisible by block_length, steps divisible
    /// by the number of blocks) and that there is something to do at every step.
    pub fn new(gen_length: usize, block_length: usize, steps: usize) -> Result<Self> {
        if gen_length == 0 {
            return Err(Error::setting(
                "gen_length",
                gen_length,
                "must be at least 1",
            ));
        }
        if block_length == 0 {
            return Err(Error::setting(
                "block_length",
                block_length,
                "must be at least 1",
            ));
        }
        if !gen_length.is_multiple_of(block_length) {
            return Err(Error::setting(
                "gen_length",
                gen_length,
                format!("must be a multiple of block_length={block_length}"),
            ));
        }
        let num_blocks = gen_length / block_length;
        if steps == 0 {
            return Err(Error::setting("steps", steps, "must be at least 1"));
        }
        if !steps.is_multiple_of(num_blocks) {
            return Err(Error::setting(
                "steps",
                steps,
                format!(
                    "must be divisible by the number of blocks={num_blocks} (gen_length={gen_length} / block_length={block_length})"
                ),
            ));
        }
        if steps > gen_length {
            return Err(Error::setting(
                "steps",
                steps,
                format!("must not exceed the {gen_length} tokens to reveal (gen_length)"),
            ));
        }
        Ok(Blocks {
            num_blocks,
            block_length,
            steps_per_block: steps / num_blocks,
        })
    }

    /// Absolute bounds [lo, hi) of block `b` in a canvas whose answer starts at `prompt_len`.
    pub fn bounds(&self, prompt_len: usize, b: usize) -> (usize, usize) {
        let lo = prompt_len + b * self.block_length;
        (lo, lo + self.block_length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_examples() {
        assert_eq!(num_transfer_tokens(32, 32), vec![1; 32]);
        assert_eq!(num_transfer_tokens(32, 5), vec![7, 7, 6, 6, 6]);
        let mut v = vec![1; 10];
        v.extend([0; 6]);
        assert_eq!(num_transfer_tokens(10, 16), v);
        let b = Blocks::new(128, 32, 128).unwrap();
        assert_eq!((b.num_blocks, b.steps_per_block), (4, 32));
    }

    #[test]
    fn schedule_sums_to_masked_count() {
        for m in 0..80 {
            for s in 1..40 {
                let v = num_transfer_tokens(m, s);
                assert_eq!(v.len(), s);
                assert_eq!(v.iter().sum::<usize>(), m);
                assert!(v.windows(2).all(|w| w[0] >= w[1]));
                assert!(v[0] - v[s - 1] <= 1);
            }
        }
    }

    #[test]
    fn invalid_layouts_name_the_values() {
        let e = Blocks::new(30, 8, 8).unwrap_err().to_string();
        assert!(
            e.contains("gen_length=30") && e.contains("block_length=8"),
            "{e}"
        );
        let e = Blocks::new(32, 8, 10).unwrap_err().to_string();
        assert!(e.contains("steps=10") && e.contains("blocks=4"), "{e}");
        assert!(Blocks::new(32, 8, 0)
            .unwrap_err()
            .to_string()
            .contains("steps=0"));
        assert!(Blocks::new(32, 32, 64)
            .unwrap_err()
            .to_string()
            .contains("steps=64"));
        assert!(Blocks::new(0, 8, 8).is_err());
        assert!(Blocks::new(32, 0, 8).is_err());
    }
}
