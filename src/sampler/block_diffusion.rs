//! Block diffusion (LLaDA2.0 and LLaDA2.1's official `generate()`): the canvas is cut into blocks
//! of `block_length` positions counted from absolute position 0 (the prompt's last block is
//! shared with the answer), attention is causal between blocks and bidirectional inside one
//! ([`Visibility::Blocks`]), and the blocks are decoded one after the other, each over the window
//! of the canvas up to its end.
//!
//! The rules, as the official code runs them (golden `llada2-moe`, `cases/README.md`):
//!
//! - **Schedule**: `steps = min(steps, gen_length / minimal_topk)` steps per block; step s may
//!   transfer `k_s` positions, `B / steps` each, the first `B % steps` one more, counted over the
//!   whole block length even for the shared first block (which therefore ends sooner); steps past
//!   `B` get 0.
//! - **Commit** (LLaDA2.0): at temperature 0, x0 = argmax and p = its softmax probability; if at
//!   least `k_s` masked positions have p > `threshold` (strict, in f32) exactly those are
//!   transferred, otherwise the `min(k_s, masked)` most confident. `threshold ≥ 1` is the pure
//!   schedule, 0 decodes a block in one step.
//! - **Stops** (LLaDA2.0): with `eos_early_stop`, after a step that transferred an EOS, the run
//!   returns at once when every position from the answer's start to the window's first EOS is
//!   decoded (the official code searches the whole window, prompt included, and then returns the
//!   prompt too: `returned_early`); after every block, whatever `eos_early_stop` says, the run
//!   stops if the answer holds an EOS. The answer is cut after its first EOS, and at
//!   `gen_length`.
//! - **Token editing** (LLaDA2.1, [`Editing`]): a block loops until a step that starts without
//!   masks edits nothing, or until more than `max_post_steps` such steps; a step transfers the
//!   masked positions with p > `threshold` when there are at least `num_to_transfer` of them, else
//!   the `min(num_to_transfer, masked)` most confident, and overwrites every already decoded
//!   answer position of the block whose prediction differs with p > `editing_threshold`. Its
//!   attention mask is the official 0/1 one (`Visibility::Blocks` with (1, 0): nothing is
//!   masked); with `eos_early_stop` the run stops after a block whose answer has no mask and an
//!   EOS.
//!
//! **Cache** (LLaDA2.0 only): under block-causal attention a finished block's keys and values
//! never change, so `cache: prefix` or `dual` (the same here) keeps them: the first step of a
//! block recomputes the previous block (its last tokens) and this one, later steps this block
//! only. The outputs equal the uncached run's up to float rounding.

use std::ops::ControlFlow;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::predict::{self, PredictOpts};
use super::{CacheMode, Commit, Committed, Generation, MaskPredictor, PromptBatch, StepEvent};
use crate::error::{Error, Result};
use crate::model::Visibility;
use crate::rng::Rng;
use crate::tokenizer::SpecialTokens;

/// LLaDA2.1's token editing: the settings of its `generate()`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Editing {
    /// A decoded position is overwritten when its prediction differs with probability above it.
    pub editing_threshold: f64,
    /// Steps a block may take after its last mask is decoded.
    pub max_post_steps: usize,
    /// Positions a step transfers when fewer than that many pass the threshold.
    pub num_to_transfer: usize,
}

/// Block diffusion settings beyond the shared ones (`gen_length`, `block_length`, `steps`, the
/// threshold from [`Commit::Threshold`], `temperature`, `cache`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockDiffusion {
    /// Steps are at most `gen_length / minimal_topk` per block.
    pub minimal_topk: usize,
    /// Return as soon as the answer up to its first EOS is decoded.
    pub eos_early_stop: bool,
    /// LLaDA2.1's token editing (and its 0/1 attention mask); `None` = LLaDA2.0's sampler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub editing: Option<Editing>,
}

impl Default for BlockDiffusion {
    /// The official defaults (`minimal_topk` 1, no EOS early stop, LLaDA2.0's sampler).
    fn default() -> Self {
        BlockDiffusion {
            minimal_topk: 1,
            eos_early_stop: false,
            editing: None,
        }
    }
}

/// The official `generate()` defaults that are shared settings: block 32, 32 steps per block,
/// threshold 0.95.
pub const DEFAULT_BLOCK_LENGTH: usize = 32;
/// Steps per block by default.
pub const DEFAULT_STEPS: usize = 32;
/// The default confidence threshold.
pub const DEFAULT_THRESHOLD: f64 = 0.95;

/// LLaDA2.1's defaults for editing (`editing_threshold` 0.9, `max_post_steps` 16,
/// `num_to_transfer` 1).
pub const DEFAULT_EDITING: Editing = Editing {
    editing_threshold: 0.9,
    max_post_steps: 16,
    num_to_transfer: 1,
};

/// A decoded position overwritten by LLaDA2.1's editing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Edit {
    /// Model call (0-based, over the run).
    pub step: usize,
    /// Canvas position.
    pub position: usize,
    pub from: u32,
    pub to: u32,
}

/// One prompt's block-diffusion run, with what the official code records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockRun {
    /// The answer as the official code returns it: after the prompt, up to and including its
    /// first EOS, cut at `gen_length` except by the mid-block EOS return (which can reach into
    /// the last block's positions past it; [`generate`] cuts there).
    pub generated_ids: Vec<u32>,
    /// The whole canvas at the end (blocks never reached still masked).
    pub canvas: Vec<u32>,
    /// Per canvas position after the prompt: the model call that decoded it first.
    pub unmask_step: Vec<Option<usize>>,
    /// Model calls.
    pub nfe: usize,
    /// Calls per processed block.
    pub steps_per_block: Vec<usize>,
    /// LLaDA2.1's overwrites.
    pub edits: Vec<Edit>,
    /// LLaDA2.0's mid-block EOS return fired (the official return then holds the prompt).
    pub returned_early: bool,
}

/// The settings of a run, checked.
struct Plan {
    p: usize,
    gen: usize,
    b: usize,
    steps: usize,
    threshold: f32,
    num_blocks: usize,
}

/// Checks the settings for a prompt of `p` tokens.
fn plan(cfg: &super::SamplerConfig, bd: &BlockDiffusion, p: usize) -> Result<Plan> {
    let threshold = match cfg.commit {
        Commit::Threshold { tau } => tau,
        Commit::TopK => 1.0,
        other => {
            return Err(Error::setting(
                "commit",
                format!("{other:?}"),
                "block diffusion commits by a threshold (with the schedule's count as a floor) or by the schedule alone",
            ))
        }
    };
    if !(threshold.is_finite() && threshold >= 0.0) {
        return Err(Error::setting(
            "threshold",
            threshold,
            "must be a finite number >= 0",
        ));
    }
    let gen = cfg.gen_length;
    let b = cfg.block_length;
    if gen == 0 || b == 0 || cfg.steps == 0 || bd.minimal_topk == 0 {
        let (name, v) = [
            ("gen_length", gen),
            ("block_length", b),
            ("steps", cfg.steps),
            ("minimal_topk", bd.minimal_topk),
        ]
        .into_iter()
        .find(|x| x.1 == 0)
        .unwrap_or(("gen_length", gen));
        return Err(Error::setting(name, v, "must be at least 1"));
    }
    let steps = cfg.steps.min(gen / bd.minimal_topk);
    if steps == 0 {
        return Err(Error::setting(
            "minimal_topk",
            bd.minimal_topk,
            format!("leaves no step: steps are at most gen_length={gen} / minimal_topk"),
        ));
    }
    if cfg.cfg_scale != 0.0 || cfg.early_stop || cfg.schedule != super::Schedule::Linear {
        let (name, v) = if cfg.cfg_scale != 0.0 {
            ("cfg_scale", cfg.cfg_scale.to_string())
        } else if cfg.early_stop {
            ("early_stop", "true".into())
        } else {
            ("alg", format!("{:?}", cfg.schedule))
        };
        return Err(Error::setting(
            name,
            v,
            "is not a block-diffusion setting (LLaDA2 stops at EOS with eos_early_stop)",
        ));
    }
    if cfg.remasking != super::Remasking::LowConfidence || cfg.confidence_eos_eot_inf {
        let (name, v) = if cfg.confidence_eos_eot_inf {
            ("confidence_eos_eot_inf", "true".to_string())
        } else {
            ("remasking", format!("{:?}", cfg.remasking))
        };
        return Err(Error::setting(
            name,
            v,
            "is not a block-diffusion setting (LLaDA2 ranks by the chosen token's probability)",
        ));
    }
    if let Some(e) = bd.editing {
        if !(e.editing_threshold.is_finite() && e.editing_threshold >= 0.0) {
            return Err(Error::setting(
                "editing_threshold",
                e.editing_threshold,
                "must be a finite number >= 0",
            ));
        }
        if e.num_to_transfer == 0 {
            return Err(Error::setting(
                "num_to_transfer",
                0,
                "must be at least 1 (a step must decode a mask)",
            ));
        }
        if cfg.cache != CacheMode::None {
            return Err(Error::setting(
                "cache",
                cfg.cache,
                "LLaDA2.1's 0/1 attention mask lets earlier blocks see later ones: its outputs cannot be cached (use cache none)",
            ));
        }
    }
    Ok(Plan {
        p,
        gen,
        b,
        steps,
        threshold: threshold as f32,
        num_blocks: (p + gen).div_ceil(b),
    })
}

/// Checks block-diffusion settings (those that do not depend on the prompt).
pub fn check(cfg: &super::SamplerConfig, bd: &BlockDiffusion) -> Result<()> {
    plan(cfg, bd, 1).map(|_| ())
}

/// LLaDA2's transfer schedule of a block: `base = B / steps`, the first `B % steps` steps one
/// more (steps past B get 0).
pub fn transfer_schedule(block: usize, steps: usize) -> Vec<usize> {
    let (base, rem) = (block / steps, block % steps);
    (0..steps).map(|s| base + usize::from(s < rem)).collect()
}

/// Runs block diffusion on every prompt of `prompts` (one after the other: each row has its own
/// block alignment) and gathers them into one [`Generation`].
pub fn generate(
    model: &mut dyn MaskPredictor,
    prompts: &PromptBatch,
    cfg: &super::SamplerConfig,
    bd: &BlockDiffusion,
    special: &SpecialTokens,
    rng: &mut Rng,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut out = Generation {
        output_ids: Vec::new(),
        generated_ids: Vec::new(),
        unmask_step: Vec::new(),
        nfe: 0,
        steps: 0,
    };
    let n = prompts.ids.len();
    // every row's settings and length are checked before anything is allocated
    for (r, row) in prompts.ids.iter().enumerate() {
        let len = prompts
            .key_mask
            .as_ref()
            .map_or(row.len(), |m| m[r].iter().filter(|&&k| k != 0).count());
        let pl = plan(cfg, bd, len.max(1))?;
        super::prompt::check_length(
            len,
            pl.num_blocks * pl.b - len.min(pl.num_blocks * pl.b),
            model.max_sequence_length(),
        )?;
    }
    // what `on_step` sees is the whole batch: rows not started yet are masked, finished rows
    // show their answers
    let mut answers: Vec<Vec<u32>> = vec![vec![special.mask; cfg.gen_length]; n];
    for (r, row) in prompts.ids.iter().enumerate() {
        // a left-padded batch: this row's own tokens
        let prompt: Vec<u32> = match &prompts.key_mask {
            Some(m) => row
                .iter()
                .zip(&m[r])
                .filter(|(_, &k)| k != 0)
                .map(|(&t, _)| t)
                .collect(),
            None => row.clone(),
        };
        let run = {
            let done = &answers;
            let mut row_step = |e: &StepEvent| -> ControlFlow<()> {
                let mut committed = vec![Vec::new(); n];
                committed[r] = e.committed.first().cloned().unwrap_or_default();
                let canvas: Vec<&[u32]> = (0..n)
                    .map(|i| {
                        if i == r {
                            e.canvas[0]
                        } else {
                            done[i].as_slice()
                        }
                    })
                    .collect();
                on_step(&StepEvent {
                    canvas,
                    committed: &committed,
                    ..e.clone()
                })
            };
            generate_one(model, &prompt, cfg, bd, special, rng, &mut row_step)?
        };
        let mut shown = run.generated_ids.clone();
        shown.resize(cfg.gen_length, special.eos);
        answers[r] = shown;
        // the official mid-block EOS return may reach into the last block past gen_length: the
        // answer a user gets is cut there
        let mut run = run;
        run.generated_ids.truncate(cfg.gen_length);
        let mut full = prompt.clone();
        full.extend(&run.generated_ids);
        out.output_ids.push(full);
        out.unmask_step
            .push(run.unmask_step[..cfg.gen_length.min(run.unmask_step.len())].to_vec());
        out.generated_ids.push(run.generated_ids);
        out.nfe += run.nfe;
        out.steps += run.nfe;
    }
    Ok(out)
}

/// Block diffusion of one prompt (see the module docs).
pub fn generate_one(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    cfg: &super::SamplerConfig,
    bd: &BlockDiffusion,
    special: &SpecialTokens,
    rng: &mut Rng,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<BlockRun> {
    let mask = special.mask;
    let eos = special.eos;
    if prompt.is_empty() {
        return Err(Error::setting(
            "prompt",
            "empty",
            "needs at least one token",
        ));
    }
    if let Some(i) = prompt.iter().position(|&t| t == mask) {
        return Err(Error::setting(
            "prompt",
            format!("mask id at {i}"),
            "a block-diffusion prompt cannot hold the mask id",
        ));
    }
    let pl = plan(cfg, bd, prompt.len())?;
    let (p, b) = (pl.p, pl.b);
    let total = pl.num_blocks * b;
    super::prompt::check_length(p, total - p, model.max_sequence_length())?;
    let device = model.device();
    let visibility = match bd.editing {
        None => Visibility::Blocks {
            block: b,
            allowed: 0.0,
            blocked: f32::NEG_INFINITY,
        },
        Some(_) => Visibility::Blocks {
            block: b,
            allowed: 1.0,
            blocked: 0.0,
        },
    };
    model.set_visibility(visibility, total)?;
    let mut x: Vec<u32> = prompt.to_vec();
    x.resize(total, mask);
    let mut unmask_step: Vec<Option<usize>> = vec![None; total - p];
    let schedule = transfer_schedule(b, pl.steps);
    let opts = PredictOpts {
        temperature: cfg.temperature,
        // at T > 0 the token is drawn from the tempered, filtered distribution and its
        // probability there is its confidence (the official rule; Dream's maskgit_plus is the
        // same); at T = 0 the argmax and its softmax probability
        remasking: if cfg.temperature > 0.0 {
            super::Remasking::MaskgitPlus
        } else {
            super::Remasking::LowConfidence
        },
        suppress_logit: cfg.logits_eos_inf.then_some(eos),
        suppress_conf: Vec::new(),
        filter: cfg.filter,
    };
    let (mut nfe, mut steps_per_block, mut edits) = (0usize, Vec::new(), Vec::new());
    let gen_end = p + pl.gen;
    let first_eos = |x: &[u32], from: usize, to: usize| x[from..to].iter().position(|&t| t == eos);
    for blk in p / b..pl.num_blocks {
        let (lo, end) = (blk * b, (blk + 1) * b);
        model.begin_block(lo..end, cfg.cache)?;
        let rows: Vec<usize> = (lo..end).collect();
        let mut calls = 0usize;
        let mut post_steps = 0usize;
        let mut step_in_block = 0usize;
        loop {
            let masked: Vec<usize> = (lo.max(p)..end).filter(|&i| x[i] == mask).collect();
            match bd.editing {
                None => {
                    if masked.is_empty() || step_in_block >= pl.steps {
                        break;
                    }
                }
                Some(e) => {
                    if masked.is_empty() {
                        post_steps += 1;
                    }
                    if post_steps > e.max_post_steps {
                        break;
                    }
                }
            }
            let window = Tensor::from_vec(x[..end].to_vec(), (1, end), &device)?;
            let logits = model.logits_at(&window, None, &rows)?; // [1, B, V]
            nfe += 1;
            calls += 1;
            let step = nfe - 1;
            // predictions at every answer position of the block (editing reads the decoded ones)
            let wanted: Vec<usize> = (lo.max(p)..end).map(|i| i - lo).collect();
            let preds = predict::predict(&logits, None, &[wanted], &opts, rng)?;
            let pred_at = |i: usize| preds[0].iter().find(|q| q.offset == i - lo);
            let mut cands: Vec<(usize, f64)> = masked
                .iter()
                .filter_map(|&i| pred_at(i).map(|q| (i, q.confidence as f32 as f64)))
                .collect();
            let k = match bd.editing {
                None => schedule.get(step_in_block).copied().unwrap_or(0),
                Some(e) => e.num_to_transfer,
            };
            let above = cands.iter().filter(|c| c.1 as f32 > pl.threshold).count();
            let transfer: Vec<usize> = if masked.is_empty() {
                Vec::new()
            } else if above >= k {
                cands
                    .iter()
                    .filter(|c| c.1 as f32 > pl.threshold)
                    .map(|c| c.0)
                    .collect()
            } else {
                super::commit::order(&mut cands);
                cands.iter().take(k.min(cands.len())).map(|c| c.0).collect()
            };
            let mut committed = Vec::with_capacity(transfer.len());
            let mut eos_now = false;
            for &i in &transfer {
                if let Some(q) = pred_at(i) {
                    x[i] = q.token;
                    unmask_step[i - p].get_or_insert(step);
                    eos_now |= q.token == eos;
                    committed.push(Committed {
                        index: i - p,
                        token: q.token,
                        confidence: q.confidence,
                    });
                }
            }
            let mut edited = false;
            if let Some(e) = bd.editing {
                let et = e.editing_threshold as f32;
                let start = lo.max(p);
                for (i, xi) in x.iter_mut().enumerate().take(end).skip(start) {
                    if masked.contains(&i) {
                        continue;
                    }
                    if let Some(q) = pred_at(i) {
                        if q.confidence as f32 > et && q.token != *xi {
                            edits.push(Edit {
                                step,
                                position: i,
                                from: *xi,
                                to: q.token,
                            });
                            *xi = q.token;
                            edited = true;
                        }
                    }
                }
            }
            let answer = &x[p..gen_end.min(total)];
            let event = StepEvent {
                block: blk,
                step_in_block,
                step,
                total_steps: pl.steps * (pl.num_blocks - p / b),
                canvas: vec![answer],
                committed: std::slice::from_ref(&committed),
                nfe,
                mask_id: mask,
            };
            if on_step(&event).is_break() {
                return Err(Error::Cancelled);
            }
            step_in_block += 1;
            if bd.editing.is_none() && bd.eos_early_stop && eos_now {
                if let Some(e) = first_eos(&x, 0, end) {
                    if (p..e).all(|i| x[i] != mask) {
                        steps_per_block.push(calls);
                        let generated = if e < p { Vec::new() } else { x[p..=e].to_vec() };
                        return Ok(BlockRun {
                            generated_ids: generated,
                            canvas: x,
                            unmask_step,
                            nfe,
                            steps_per_block,
                            edits,
                            returned_early: true,
                        });
                    }
                }
            }
            if bd.editing.is_some() && masked.is_empty() && !edited {
                break;
            }
        }
        steps_per_block.push(calls);
        let stop = match bd.editing {
            None => first_eos(&x, p, end).is_some(),
            Some(_) => {
                bd.eos_early_stop && !x[p..end].contains(&mask) && first_eos(&x, p, end).is_some()
            }
        };
        if stop {
            break;
        }
    }
    let cut = gen_end.min(total);
    let generated = match first_eos(&x, p, cut) {
        Some(e) => x[p..=p + e].to_vec(),
        None => x[p..cut].to_vec(),
    };
    Ok(BlockRun {
        generated_ids: generated,
        canvas: x,
        unmask_step,
        nfe,
        steps_per_block,
        edits,
        returned_early: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spans_the_block() {
        assert_eq!(transfer_schedule(8, 8), vec![1; 8]);
        assert_eq!(transfer_schedule(8, 3), vec![3, 3, 2]);
        assert_eq!(transfer_schedule(4, 6), vec![1, 1, 1, 1, 0, 0]);
    }
}
