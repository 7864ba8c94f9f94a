//! The reverse process: start from a fully masked answer and unmask it over a number of steps,
//! block by block (reference §4; Fast-dLLM commit rules §6).
//!
//! A strategy is data on independent axes, each dispatched by one `match` in its own file:
//! [`Remasking`] (how confidence is scored: LLaDA's and Dream's), [`Commit`] (how many positions
//! a step unmasks), [`Schedule`] (how a block's masks are spread over its steps: LLaDA's linear
//! one, Dream's timesteps), [`LogitFilter`] (top-p/top-k), [`Guidance`] (CFG), [`CacheMode`].
//! Dream's `diffusion_generate` is one point of these axes (see [`settings::Alg`]). The model is reached only through its seam,
//! [`crate::model::MaskPredictor`]. Progress and cancellation go through an `on_step` callback.

pub mod ar;
pub mod block_diffusion;
mod canvas;
pub mod commit;
pub mod filter;
pub mod guidance;
pub mod gumbel;
pub mod predict;
pub mod prompt;
pub mod remask;
pub mod schedule;
pub mod settings;

use std::ops::ControlFlow;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use crate::model::{CacheMode, MaskPredictor};
pub use commit::{Commit, Quota};
pub use filter::LogitFilter;
pub use guidance::Guidance;
pub use prompt::PromptRules;
pub use remask::Remasking;
pub use schedule::{num_transfer_tokens, BlockLoop, Blocks, Schedule};
pub use settings::SamplerSettings;

use canvas::Canvas;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tokenizer::SpecialTokens;

/// Reference default of `steps`, `gen_length` and `block_length` (generate.py).
pub const DEFAULT_GEN_LENGTH: usize = 128;
/// Reference default number of steps.
pub const DEFAULT_STEPS: usize = 128;
/// Reference default block length (= gen_length: pure diffusion).
pub const DEFAULT_BLOCK_LENGTH: usize = 128;

/// The most steps per answer token Dream's schedule accepts (its steps may outnumber the tokens,
/// revealing nothing).
pub const MAX_STEPS_PER_TOKEN: usize = 16;

/// Settings of the reverse process. Defaults are the reference's (`generate.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// Answer length: positions appended to the prompt, all starting masked.
    pub gen_length: usize,
    /// Total denoising steps over all blocks (model calls with the top-k rule).
    pub steps: usize,
    /// Semi-autoregressive block size; `gen_length` = pure diffusion.
    pub block_length: usize,
    /// Gumbel-max temperature; 0 = greedy.
    pub temperature: f64,
    /// How confidence is scored.
    pub remasking: Remasking,
    /// How many positions a step commits.
    pub commit: Commit,
    /// Unsupervised classifier-free guidance scale (0 = off).
    pub cfg_scale: f64,
    /// EOS logit set to −∞ before sampling: EOS is never generated.
    pub logits_eos_inf: bool,
    /// EOS/EOT get confidence 0, with the reference's real behaviour (§4.8).
    pub confidence_eos_eot_inf: bool,
    /// Key/value reuse between the steps of a block (Fast-dLLM).
    pub cache: CacheMode,
    /// Stop a row as soon as its answer is final: an EOS/EOT is committed and every position
    /// before it is committed; the rest is filled with EOS. The decoded answer (cut at the first
    /// EOS/EOT) is the same as without it at any temperature; only ids after it may differ.
    pub early_stop: bool,
    /// How a block's masks are spread over its steps.
    pub schedule: Schedule,
    /// Top-p / top-k filtering of the logits before a token is chosen (keys `top_p`, `top_k`).
    #[serde(flatten)]
    pub filter: LogitFilter,
    /// Block diffusion (LLaDA2's `generate()`: blocks from absolute position 0, block-causal
    /// attention; see [`block_diffusion`]); `None` for LLaDA's and Dream's samplers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_diffusion: Option<block_diffusion::BlockDiffusion>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            gen_length: DEFAULT_GEN_LENGTH,
            steps: DEFAULT_STEPS,
            block_length: DEFAULT_BLOCK_LENGTH,
            temperature: 0.0,
            remasking: Remasking::LowConfidence,
            commit: Commit::TopK,
            cfg_scale: 0.0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            cache: CacheMode::None,
            early_stop: false,
            schedule: Schedule::Linear,
            filter: LogitFilter::default(),
            block_diffusion: None,
        }
    }
}

impl SamplerConfig {
    /// The reference defaults of a model's own sampler: LLaDA2's `generate()` for a
    /// block-diffusion model, LLaDA's `generate.py` otherwise.
    pub fn for_model(cfg: &crate::config::ModelConfig) -> Self {
        if cfg.architecture == crate::model::Architecture::Llada2 {
            Self::block_diffusion_default()
        } else {
            Self::default()
        }
    }

    /// The official LLaDA2 `generate()` defaults, with llada's answer length: block 32, 32 steps
    /// per block, threshold 0.95, greedy, LLaDA2.0's sampler.
    pub fn block_diffusion_default() -> Self {
        SamplerConfig {
            gen_length: DEFAULT_GEN_LENGTH,
            steps: block_diffusion::DEFAULT_STEPS,
            block_length: block_diffusion::DEFAULT_BLOCK_LENGTH,
            commit: Commit::Threshold {
                tau: block_diffusion::DEFAULT_THRESHOLD,
            },
            block_diffusion: Some(block_diffusion::BlockDiffusion::default()),
            ..Default::default()
        }
    }
}

/// The fast preset's commit threshold (Fast-dLLM's 0.9).
pub const FAST_THRESHOLD: f64 = 0.9;
/// The fast preset's block length (chat.py's and Fast-dLLM's 32).
pub const FAST_BLOCK_LENGTH: usize = 32;

/// The two starting points of every sampling front end (the CLI's `--sampler`, the server's
/// defaults): flags and request fields apply over one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Preset {
    /// Parallel decoding: Fast-dLLM's threshold 0.9 over blocks of 32 with the dual cache, and
    /// the early stop (the answer is unchanged by it); for a block-diffusion model (LLaDA2) its
    /// official sampler with the exact block cache and the EOS return.
    #[default]
    Fast,
    /// The official sampler's own defaults, exactly (LLaDA's `generate.py` / `chat.py`, LLaDA2's
    /// `generate()`): one token per step, no cache, no early stop.
    Reference,
}

impl Preset {
    /// This preset over a command's reference defaults (`reference`: what the official code does
    /// for that command). `Reference` returns them unchanged; `Fast` keeps the answer length
    /// and sets the fast rules: blocks of [`FAST_BLOCK_LENGTH`] where they divide the answer
    /// (a block length of 0, infilling's whole region, stays), [`FAST_THRESHOLD`], the dual
    /// cache and the early stop where the command can use them (`cache: false`: infilling).
    pub fn apply(self, reference: SamplerConfig, cache: bool) -> SamplerConfig {
        let mut c = reference;
        if self == Preset::Reference {
            return c;
        }
        if let Some(bd) = c.block_diffusion.as_mut() {
            bd.eos_early_stop = true;
            if cache {
                c.cache = CacheMode::Dual;
            }
            return c;
        }
        if c.block_length != 0 && c.gen_length.is_multiple_of(FAST_BLOCK_LENGTH) {
            c.block_length = FAST_BLOCK_LENGTH;
        }
        c.commit = Commit::Threshold {
            tau: FAST_THRESHOLD,
        };
        if cache {
            c.cache = CacheMode::Dual;
            c.early_stop = true;
        }
        c
    }

    /// The preset's name as the CLI and the server's `/v1/models` write it.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Fast => "fast",
            Preset::Reference => "reference",
        }
    }
}

impl SamplerConfig {
    /// The settings in one line for people: `gen 128 · steps 128 · block 32 · threshold 0.9 ·
    /// dual cache · early stop` (greedy unless a temperature is set; CFG, filters and
    /// block diffusion when on).
    pub fn describe(&self) -> String {
        let mut parts = vec![
            format!("gen {}", self.gen_length),
            format!("steps {}", self.steps),
            format!("block {}", self.block_length),
            self.commit.to_string(),
        ];
        if self.remasking != Remasking::LowConfidence {
            parts.push(self.remasking.to_string());
        }
        if self.temperature > 0.0 {
            parts.push(format!("temperature {}", self.temperature));
        } else {
            parts.push("greedy".into());
        }
        if self.cfg_scale > 0.0 {
            parts.push(format!("cfg {}", self.cfg_scale));
        }
        if let Some(p) = self.filter.top_p {
            parts.push(format!("top-p {p}"));
        }
        if let Some(k) = self.filter.top_k {
            parts.push(format!("top-k {k} tokens"));
        }
        parts.push(match self.cache {
            CacheMode::None => "no cache".to_string(),
            m => format!("{m} cache"),
        });
        if self.early_stop {
            parts.push("early stop".into());
        }
        if let Some(bd) = &self.block_diffusion {
            parts.push(if bd.editing.is_some() {
                "block diffusion (LLaDA2.1 editing)".into()
            } else {
                "block diffusion".into()
            });
            if bd.eos_early_stop {
                parts.push("EOS return".into());
            }
        }
        parts.join(" · ")
    }
}

impl SamplerConfig {
    /// Checks every setting, returning the block layout.
    pub fn validate(&self) -> Result<Blocks> {
        if let Some(bd) = &self.block_diffusion {
            // block diffusion's own rules (its blocks need not divide the answer); the layout
            // returned is the answer as one block, unused by its sampler
            block_diffusion::check(self, bd)?;
            return Blocks::with_idle_steps(self.gen_length, self.gen_length, 1);
        }
        let blocks = match self.schedule {
            Schedule::Linear => Blocks::new(self.gen_length, self.block_length, self.steps)?,
            Schedule::Dream { eps } => {
                if !(eps > 0.0 && eps < 1.0) {
                    return Err(Error::setting(
                        "eps",
                        eps,
                        "must be in (0, 1) (the last timestep of Dream's schedule; Dream uses 1e-3)",
                    ));
                }
                // steps past this many reveal nothing: a bound that keeps a request's schedule
                // small
                let most = MAX_STEPS_PER_TOKEN.saturating_mul(self.gen_length);
                if self.steps > most {
                    return Err(Error::setting(
                        "steps",
                        self.steps,
                        format!("must not exceed {MAX_STEPS_PER_TOKEN} per token to reveal ({most} for gen_length={})", self.gen_length),
                    ));
                }
                Blocks::with_idle_steps(self.gen_length, self.block_length, self.steps)?
            }
        };
        self.filter.validate()?;
        if self.remasking.is_dream() && self.confidence_eos_eot_inf {
            return Err(Error::setting(
                "confidence_eos_eot_inf",
                true,
                format!(
                    "applies to LLaDA's confidences (low_confidence), not to remasking={}",
                    self.remasking
                ),
            ));
        }
        if self.remasking == Remasking::Entropy
            && matches!(
                self.commit,
                Commit::Threshold { .. } | Commit::Factor { .. }
            )
        {
            return Err(Error::setting(
                "remasking",
                self.remasking,
                "gives negative confidences (−entropy), which the threshold and factor rules cannot compare with a probability: use maskgit_plus or topk_margin",
            ));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::setting(
                "temperature",
                self.temperature,
                "must be a finite number >= 0",
            ));
        }
        if !self.cfg_scale.is_finite() || self.cfg_scale < 0.0 {
            return Err(Error::setting(
                "cfg_scale",
                self.cfg_scale,
                "must be a finite number >= 0",
            ));
        }
        if self.cache != CacheMode::None && self.cfg_scale > 0.0 {
            return Err(Error::setting(
                "cache",
                self.cache,
                format!("cannot be combined with classifier-free guidance (cfg_scale={}): the reference caches support neither, and the unconditional rows would need their own cache", self.cfg_scale),
            ));
        }
        match self.commit {
            Commit::TopK => {}
            Commit::Threshold { tau } => {
                if !(tau > 0.0 && tau <= 1.0) {
                    return Err(Error::setting("threshold", tau, "must be in (0, 1]"));
                }
            }
            Commit::Factor { f } => {
                if !(f.is_finite() && f > 0.0) {
                    return Err(Error::setting("factor", f, "must be a finite number > 0"));
                }
            }
            Commit::Sampled { temp } => {
                if !(temp.is_finite() && temp > 0.0) {
                    return Err(Error::setting(
                        "alg_temp",
                        temp,
                        "must be a finite number > 0",
                    ));
                }
            }
            Commit::Origin => {
                if !matches!(self.schedule, Schedule::Dream { .. }) {
                    return Err(Error::setting(
                        "alg",
                        "origin",
                        "reveals with the probabilities of Dream's schedule: it needs schedule dream",
                    ));
                }
            }
        }
        Ok(blocks)
    }

    /// The guidance axis of these settings.
    pub fn guidance(&self) -> Guidance {
        Guidance::from_scale(self.cfg_scale)
    }
}

/// Prompts of one generation batch: equal-length rows, left-padded, with their key-padding mask
/// when padded (1 = token, 0 = padding).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptBatch {
    pub ids: Vec<Vec<u32>>,
    pub key_mask: Option<Vec<Vec<u32>>>,
}

impl PromptBatch {
    /// One unpadded prompt.
    pub fn single(ids: Vec<u32>) -> Self {
        PromptBatch {
            ids: vec![ids],
            key_mask: None,
        }
    }

    /// Several prompts, left-padded with `pad`; the mask is kept only if some row is padded.
    pub fn left_padded(prompts: &[Vec<u32>], pad: u32) -> Self {
        let (ids, mask) = crate::tokenizer::left_pad(prompts, pad);
        let padded = mask.iter().flatten().any(|&m| m == 0);
        PromptBatch {
            ids,
            key_mask: padded.then_some(mask),
        }
    }

    fn validate(&self, mask_id: u32) -> Result<usize> {
        let rules = PromptRules::mask_only(mask_id);
        let first = self.ids.first().map(Vec::as_slice).unwrap_or_default();
        rules.check(first, 0)?;
        let p = first.len();
        if self.ids.iter().any(|r| r.len() != p) {
            return Err(Error::setting(
                "prompt",
                "rows of different lengths",
                "batched prompts must be left-padded to one length",
            ));
        }
        if let Some(m) = &self.key_mask {
            if m.len() != self.ids.len() || m.iter().any(|r| r.len() != p) {
                return Err(Error::setting(
                    "attention_mask",
                    "wrong shape",
                    "must have the prompt's shape",
                ));
            }
        }
        for row in self.ids.iter().skip(1) {
            rules.check(row, 0)?;
        }
        Ok(p)
    }
}

/// One committed position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Committed {
    /// Index in the answer (0-based, from the end of the prompt).
    pub index: usize,
    pub token: u32,
    pub confidence: f64,
}

/// What `on_step` sees after each denoising step.
#[derive(Debug, Clone)]
pub struct StepEvent<'a> {
    /// Block index.
    pub block: usize,
    /// Step index within the block.
    pub step_in_block: usize,
    /// Global step index (0-based, over all blocks).
    pub step: usize,
    /// Total steps planned (with the top-k rule; parallel rules may finish early).
    pub total_steps: usize,
    /// The answer region of every row (masked positions hold the mask id).
    pub canvas: Vec<&'a [u32]>,
    /// Positions committed this step, per row.
    pub committed: &'a [Vec<Committed>],
    /// Model calls so far.
    pub nfe: usize,
    /// The mask id (to tell masked positions).
    pub mask_id: u32,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// Prompt + answer, per row.
    pub output_ids: Vec<Vec<u32>>,
    /// The answer only, per row.
    pub generated_ids: Vec<Vec<u32>>,
    /// Global step at which each answer position was committed (`None`: never, e.g. when the
    /// model committed the mask id itself).
    pub unmask_step: Vec<Vec<Option<usize>>>,
    /// Number of model calls (a CFG call runs conditional and unconditional rows together).
    pub nfe: usize,
    /// Denoising steps performed.
    pub steps: usize,
}

/// Runs the reverse process on `prompts`: `gen_length` masked positions are appended to every
/// prompt and unmasked block by block. `rng` (owned by the caller) feeds temperature sampling and
/// random remasking; `on_step` sees every step and may stop the run (`ControlFlow::Break`), which
/// returns [`Error::Cancelled`].
pub fn generate(
    model: &mut dyn MaskPredictor,
    prompts: &PromptBatch,
    cfg: &SamplerConfig,
    special: &SpecialTokens,
    rng: &mut Rng,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    if let Some(bd) = &cfg.block_diffusion {
        return block_diffusion::generate(model, prompts, cfg, bd, special, rng, on_step);
    }
    let blocks = cfg.validate()?;
    let mask_id = special.mask;
    let p = prompts.validate(mask_id)?;
    let g = cfg.gen_length;
    // before the canvas of p + g positions is allocated
    prompt::check_length(p, g, model.max_sequence_length())?;
    let x: Vec<Vec<u32>> = prompts
        .ids
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(mask_id, g))
                .collect()
        })
        .collect();
    let key_mask = prompts.key_mask.as_ref().map(|m| {
        m.iter()
            .map(|r| r.iter().copied().chain(std::iter::repeat_n(1, g)).collect())
            .collect()
    });
    denoise(
        model, x, key_mask, p, blocks, cfg, special, rng, None, on_step,
    )
}

/// What each step of a recorded run revealed: `[step][row]` → answer indices.
pub type Reveals = [Vec<Vec<usize>>];

/// [`generate`] with the positions each step commits taken from a recorded run (`reveals`)
/// instead of drawn: reproduces a random run of another engine (Dream's `origin` and
/// `alg_temp` > 0 draw from torch's generator) to check everything but the draws. Each recorded
/// set must be masked candidates of the step, and for the counting rules exactly the schedule's
/// count; otherwise an error names the step and row.
pub fn generate_replayed(
    model: &mut dyn MaskPredictor,
    prompts: &PromptBatch,
    cfg: &SamplerConfig,
    special: &SpecialTokens,
    reveals: &Reveals,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let blocks = cfg.validate()?;
    let p = prompts.validate(special.mask)?;
    let x = prompts
        .ids
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(special.mask, cfg.gen_length))
                .collect()
        })
        .collect();
    let key_mask = prompts.key_mask.as_ref().map(|m| {
        m.iter()
            .map(|r| {
                r.iter()
                    .copied()
                    .chain(std::iter::repeat_n(1, cfg.gen_length))
                    .collect()
            })
            .collect()
    });
    let mut rng = Rng::new(0);
    denoise(
        model,
        x,
        key_mask,
        p,
        blocks,
        cfg,
        special,
        &mut rng,
        Some(reveals),
        on_step,
    )
}

/// Fills the masked positions of `canvas` (a text with mask tokens anywhere) using the context on
/// both sides. The answer region runs from the first mask to the end of the canvas; `cfg`'s
/// `gen_length` is ignored, `block_length` 0 (or longer than the region) means the whole region
/// (pure diffusion), and `steps` must divide into the blocks and not exceed the number of masks.
pub fn infill(
    model: &mut dyn MaskPredictor,
    canvas: &[u32],
    cfg: &SamplerConfig,
    special: &SpecialTokens,
    rng: &mut Rng,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let mask_id = special.mask;
    let first = canvas.iter().position(|&t| t == mask_id).ok_or_else(|| {
        Error::setting(
            "text",
            "no masked span",
            "an infill text needs at least one mask span",
        )
    })?;
    let masks = canvas.iter().filter(|&&t| t == mask_id).count();
    let region = canvas.len() - first;
    prompt::check_length(first, region, model.max_sequence_length())?;
    let mut eff = cfg.clone();
    eff.gen_length = region;
    if eff.block_length == 0 || eff.block_length > region {
        eff.block_length = region;
    }
    if cfg.steps > masks && cfg.schedule == Schedule::Linear {
        return Err(Error::setting(
            "steps",
            cfg.steps,
            format!("must not exceed the {masks} masked tokens to fill"),
        ));
    }
    let blocks = eff.validate().map_err(|e| match e {
        Error::InvalidSetting { name, value, rule } => Error::InvalidSetting {
            name,
            value,
            rule: format!(
                "{rule} (the infill region, from the first mask to the end, is {region} tokens)"
            ),
        },
        other => other,
    })?;
    denoise(
        model,
        vec![canvas.to_vec()],
        None,
        first,
        blocks,
        &eff,
        special,
        rng,
        None,
        on_step,
    )
}

/// The reverse process on a canvas whose answer region starts at `p` (positions before it are
/// the prompt; masked positions anywhere in the region are filled): block by block, each step
/// predicts the masked rows it needs ([`Canvas::wanted`]), guides ([`Guidance::apply`]),
/// predicts x0 and confidences, commits ([`Canvas::commit`]) and reports; [`BlockLoop`] says how
/// many steps a block gets.
#[allow(clippy::too_many_arguments)]
fn denoise(
    model: &mut dyn MaskPredictor,
    x: Vec<Vec<u32>>,
    key_mask: Option<Vec<Vec<u32>>>,
    p: usize,
    blocks: Blocks,
    cfg: &SamplerConfig,
    special: &SpecialTokens,
    rng: &mut Rng,
    reveals: Option<&Reveals>,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let mask_id = special.mask;
    let mut canvas = Canvas::new(x, p, mask_id);
    let (b, l) = (canvas.batch(), canvas.len());
    let device = model.device();
    let guidance = cfg.guidance();
    let key_mask = match key_mask {
        Some(m) => Some(guidance.key_mask(&Tensor::from_vec(m.concat(), (b, l), &device)?)?),
        None => None,
    };
    let opts = predict::PredictOpts::of(cfg, special);
    let rule = BlockLoop::new(cfg, &blocks);
    let (mut nfe, mut step) = (0usize, 0usize);
    'blocks: for blk in 0..blocks.num_blocks {
        let (lo, hi) = blocks.bounds(p, blk);
        model.begin_block(lo..hi, cfg.cache)?;
        // Rows whose predictions can be committed: with a cache only the block's (the reference
        // cached loops predict only the block); otherwise everything up to the block's end.
        let window = if cfg.cache == CacheMode::None {
            p..hi
        } else {
            lo..hi
        };
        let plan = cfg
            .schedule
            .plan(&canvas.masked_in(lo..hi), blocks.steps_per_block);
        let mut i = 0;
        while rule.runs(i, canvas.has_masks(lo..hi)) {
            let (wanted, columns) = canvas.wanted(&window);
            // [B or 2B, L] on the device: the few bytes of the canvas go up each step.
            let input = guidance.input_rows(&canvas.x, &canvas.is_prompt, mask_id);
            let xt = Tensor::from_vec(input, (guidance.rows(b), l), &device)?;
            let rows: Vec<usize> = columns.iter().map(|&o| window.start + o).collect();
            let logits = model.logits_at(&xt, key_mask.as_ref(), &rows)?; // [B(×2), |rows|, V]
            nfe += 1;
            let logits = guidance.apply(&logits, b)?; // [B, |rows|, V]
            let preds = predict::predict(&logits, Some(&columns), &wanted, &opts, rng)?;
            let quotas = plan.quotas(i, &canvas.masked_in(lo..hi), &canvas.active());
            let mut replay_error = None;
            let committed = canvas.commit(
                &preds,
                window.start,
                |r, cands| match reveals {
                    None => cfg.commit.select_with(cands, quotas[r], rng),
                    Some(rec) => {
                        replayed(rec, step, r, cands, quotas[r], cfg.commit, p, window.start)
                            .unwrap_or_else(|e| {
                                replay_error.get_or_insert(e);
                                Vec::new()
                            })
                    }
                },
                step,
            );
            if let Some(e) = replay_error {
                return Err(e);
            }
            let event = StepEvent {
                block: blk,
                step_in_block: i,
                step,
                total_steps: cfg.steps,
                canvas: canvas.answers(),
                committed: &committed,
                nfe,
                mask_id,
            };
            if on_step(&event).is_break() {
                return Err(Error::Cancelled);
            }
            step += 1;
            i += 1;
            if cfg.early_stop && canvas.finish_rows(special) {
                break 'blocks;
            }
        }
        if rule.stops_early() && canvas.has_masks(lo..hi) {
            tracing::warn!(
                "block {blk}: masks remain after {} steps (the model keeps predicting the mask id)",
                rule.max_steps()
            );
        }
    }
    if cfg.early_stop {
        canvas.pad_finished(special.eos);
    }
    Ok(canvas.into_generation(nfe, step))
}

/// The recorded reveal set of `row` at global `step` as window offsets, checked against the
/// step's candidates and, for the counting rules, the schedule's count.
#[allow(clippy::too_many_arguments)]
fn replayed(
    rec: &Reveals,
    step: usize,
    row: usize,
    cands: &[(usize, f64)],
    quota: Quota,
    rule: Commit,
    p: usize,
    window_start: usize,
) -> Result<Vec<usize>> {
    let bad = |why: String| Error::setting("reveals", format!("step {step} row {row}"), why);
    let set = rec
        .get(step)
        .and_then(|s| s.get(row))
        .ok_or_else(|| bad("the recording has no such step or row".into()))?;
    let mut offs = Vec::with_capacity(set.len());
    for &i in set {
        match (p + i).checked_sub(window_start) {
            Some(o) if cands.iter().any(|c| c.0 == o) => offs.push(o),
            _ => return Err(bad(format!("answer index {i} is not masked in the window"))),
        }
    }
    if matches!(rule, Commit::TopK | Commit::Sampled { .. })
        && offs.len() != quota.k.min(cands.len())
    {
        return Err(bad(format!(
            "reveals {} positions where the schedule allows {}",
            offs.len(),
            quota.k.min(cands.len())
        )));
    }
    Ok(offs)
}

/// Whether an answer is final: some EOS/EOT is committed and nothing before the first one is
/// masked (later steps cannot change what precedes it, and the answer is cut there).
pub fn answer_is_final(answer: &[u32], special: &SpecialTokens) -> bool {
    special.answer_is_final(answer)
}

/// An `on_step` callback that does nothing.
pub fn no_progress(_: &StepEvent) -> ControlFlow<()> {
    ControlFlow::Continue(())
}
