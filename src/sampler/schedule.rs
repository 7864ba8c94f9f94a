//! The transfer schedules (how many positions each step of a block may reveal: LLaDA's linear
//! one, reference §4.2, and Dream's) and the semi-autoregressive blocks (reference §4.3).

use serde::{Deserialize, Serialize};

use super::commit::Quota;
use crate::error::{Error, Result};

/// How a block's masks are spread over its steps.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// LLaDA: the block's masks split evenly over its steps when the block starts, the
    /// remainder on the first steps ([`num_transfer_tokens`]).
    #[default]
    Linear,
    /// Dream's `diffusion_generate`: timesteps t = linspace(1, eps, S + 1) in f32; step i reveals
    /// ⌊n · (1 − t_{i+1}/t_i)⌋ of the n masks left (the batch's average), every mask at the last
    /// step; `origin` reveals each mask with probability 1 − t_{i+1}/t_i. A step may reveal
    /// nothing, and steps may outnumber the masks.
    Dream { eps: f64 },
}

/// `torch.linspace(start, end, n)` in f32 as PyTorch's CPU kernel computes it: the first half
/// counts up from `start`, the second half down from `end`.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// One block's schedule, fixed when the block starts.
#[derive(Debug, Clone)]
pub struct BlockPlan {
    steps: usize,
    /// Linear: per row, the count of every step.
    per_row: Vec<Vec<usize>>,
    /// Dream: the S + 1 timesteps.
    timesteps: Vec<f32>,
}

impl Schedule {
    /// The plan of a block of `steps` steps whose rows start with `masked` masks each.
    pub fn plan(self, masked: &[usize], steps: usize) -> BlockPlan {
        match self {
            Schedule::Linear => BlockPlan {
                steps,
                per_row: masked
                    .iter()
                    .map(|&m| num_transfer_tokens(m, steps))
                    .collect(),
                timesteps: Vec::new(),
            },
            Schedule::Dream { eps } => BlockPlan {
                steps,
                per_row: Vec::new(),
                timesteps: linspace_f32(1.0, eps as f32, steps + 1),
            },
        }
    }
}

impl BlockPlan {
    /// The quota of every row at step `i` of the block, whose rows have `masked` masks left;
    /// `active` says which rows count for Dream's batch average (rows an early stop finished keep
    /// their masks and do not). Steps past the schedule (the until-complete loops of the
    /// threshold and factor rules, or of a cache) get the last step's quota.
    pub fn quotas(&self, i: usize, masked: &[usize], active: &[bool]) -> Vec<Quota> {
        if self.timesteps.is_empty() {
            return self
                .per_row
                .iter()
                .map(|s| Quota {
                    k: s.get(i).copied().unwrap_or(0),
                    reveal_p: 1.0,
                })
                .collect();
        }
        let last = i + 1 >= self.steps;
        let i = i.min(self.steps.saturating_sub(1));
        let (t, s) = (self.timesteps[i], self.timesteps[i + 1]);
        // f32 tensor arithmetic as the reference: mask_index.sum() / B, then n · (1 − s/t)
        let counted: Vec<usize> = masked
            .iter()
            .zip(active)
            .filter(|(_, &a)| a)
            .map(|(&m, _)| m)
            .collect();
        let n = counted.iter().sum::<usize>() as f32 / counted.len().max(1) as f32;
        let ratio = 1.0f32 - s / t;
        let k = if last { n } else { n * ratio } as usize;
        let reveal_p = if last { 1.0 } else { ratio as f64 };
        vec![Quota { k, reveal_p }; masked.len()]
    }
}

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
        let b = Self::with_idle_steps(gen_length, block_length, steps)?;
        if steps > gen_length {
            return Err(Error::setting(
                "steps",
                steps,
                format!("must not exceed the {gen_length} tokens to reveal (gen_length)"),
            ));
        }
        Ok(b)
    }

    /// [`Blocks::new`] where steps may outnumber the tokens (Dream's schedule, whose steps may
    /// reveal nothing).
    pub fn with_idle_steps(gen_length: usize, block_length: usize, steps: usize) -> Result<Self> {
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
        let fast = !cfg.commit.is_scheduled() || cfg.cache != super::CacheMode::None;
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

    /// The reference's transfer counts (golden `transfer_counts`, cases/README.md §2.5).
    #[test]
    fn dream_schedule_reference_counts() {
        let counts = |g: usize, s: usize| -> Vec<usize> {
            let plan = Schedule::Dream { eps: 1e-3 }.plan(&[g], s);
            let mut left = g;
            (0..s)
                .map(|i| {
                    let k = plan.quotas(i, &[left], &[true])[0].k.min(left);
                    left -= k;
                    k
                })
                .collect()
        };
        let mut l32s32 = vec![0];
        l32s32.extend([1; 30]);
        l32s32.push(2);
        assert_eq!(counts(32, 32), l32s32);
        let mut l32s16 = vec![1];
        l32s16.extend([2; 14]);
        l32s16.push(3);
        assert_eq!(counts(32, 16), l32s16);
        let mut l32s10 = vec![3; 9];
        l32s10.push(5);
        assert_eq!(counts(32, 10), l32s10);
        let mut l16s24 = vec![0; 9];
        l16s24.extend([1; 14]);
        l16s24.push(2);
        assert_eq!(counts(16, 24), l16s24);
        // linspace's two halves
        let t = linspace_f32(1.0, 1e-3, 33);
        assert_eq!((t[0], t[32]), (1.0, 1e-3));
        // past the schedule: everything left; finished rows leave the average
        let plan = Schedule::Dream { eps: 1e-3 }.plan(&[8, 8], 4);
        assert_eq!(plan.quotas(9, &[5, 3], &[true, true])[0].k, 4);
        assert_eq!(plan.quotas(3, &[5, 3], &[true, false])[0].k, 5);
        assert_eq!(
            plan.quotas(0, &[8, 2], &[true, false])[0].k,
            plan.quotas(0, &[8, 8], &[true, true])[0].k
        );
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
