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

/// The block loop rule: how many model calls a block gets.
///
/// The reference LLaDA loop (top-k, no cache) runs exactly `steps_per_block` calls per block;
/// the Fast-dLLM loops (parallel commit rules or caches) stop as soon as the block has no masks,
/// capped in case the model keeps committing the mask id itself. Fast-dLLM's cached loops
/// (24cc59e, the golden cases' version) test for completion only after their first cached
/// forward: a block completed by its block-start step still costs one more (no-op) forward.
#[derive(Debug, Clone, Copy)]
pub struct BlockLoop {
    /// Stops when the block has no masks left (Fast-dLLM).
    fast: bool,
    /// A cached loop (the extra forward after the block-start step).
    cached: bool,
    max_steps: usize,
}

impl BlockLoop {
    pub fn new(cfg: &super::SamplerConfig, blocks: &Blocks) -> Self {
        let fast = cfg.commit != super::Commit::TopK || cfg.cache != super::CacheMode::None;
        BlockLoop {
            fast,
            cached: cfg.cache != super::CacheMode::None,
            max_steps: if fast {
                8 * blocks.block_length
            } else {
                blocks.steps_per_block
            },
        }
    }

    /// Whether step `i` of the block runs, given whether the block still has masks.
    pub fn runs(&self, i: usize, has_masks: bool) -> bool {
        let reference_extra = self.cached && i == 1;
        i < self.max_steps && (!self.fast || reference_extra || has_masks)
    }

    /// Whether the loop ends when the block is complete (rather than after a fixed count).
    pub fn stops_early(&self) -> bool {
        self.fast
    }

    /// The most steps a block gets.
    pub fn max_steps(&self) -> usize {
        self.max_steps
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
