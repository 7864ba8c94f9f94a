//! Timed runs behind `llada bench`: warm-up, then N measured runs after a device sync, reported as
//! mean ± std with the settings, the device, the dtype, model FLOPs and peak memory.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::model::{CacheMode, MaskPredictor, Model};
use crate::rng::Rng;
use crate::sampler::{self, PromptBatch, SamplerConfig, StepEvent};
use crate::tokenizer::SpecialTokens;

/// Mean and (sample) standard deviation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
}

impl Stat {
    pub fn of(xs: &[f64]) -> Stat {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Stat {
            mean,
            std: var.sqrt(),
        }
    }
}

/// A seeded random prompt of `len` tokens, avoiding the mask and EOS ids (as the peer's bench).
pub fn random_prompt(len: usize, vocab: usize, special: &SpecialTokens, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let hi = vocab.min(special.mask as usize).max(2);
    (0..len)
        .map(|_| {
            let t = rng.below(hi - 1) as u32;
            if t == special.eos || t == special.pad {
                0
            } else {
                t
            }
        })
        .collect()
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts a new peak-memory window: resets `VmHWM` to the current resident size (Linux
/// `/proc/self/clear_refs`). False where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Current resident memory (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What a benchmark measures once its model is loaded and before the timed runs, in this order:
/// the load's memory, then (in a new peak-memory window) the weights' size, the threads and this
/// CPU's peak rate.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// Peak resident memory up to here (loading included).
    pub load_peak_rss_bytes: Option<u64>,
    pub rss_after_load_bytes: Option<u64>,
    /// Whether a new peak-memory window started, so that later peaks are the benchmark's own
    /// (otherwise they are the process's).
    pub peak_rss_is_run_only: bool,
    pub weights_bytes: u64,
    pub threads: usize,
    /// This CPU's measured limit (GFLOP/s) for the kernels' instruction at the model's dtype, to
    /// put the run's rate against; `None` off the CPU.
    pub peak_gflops: Option<f64>,
}

impl Baseline {
    pub fn measure(model: &Model) -> Baseline {
        let load_peak_rss_bytes = peak_rss_bytes();
        let rss_after_load_bytes = rss_bytes();
        let peak_rss_is_run_only = reset_peak_rss();
        let weights_bytes = model.weights_bytes();
        let threads = candle_core::utils::get_num_threads();
        let peak_gflops = match model.device() {
            candle_core::Device::Cpu => crate::kernels::peak::peak_gflops(model.dtype(), 300),
            _ => None,
        };
        Baseline {
            load_peak_rss_bytes,
            rss_after_load_bytes,
            peak_rss_is_run_only,
            weights_bytes,
            threads,
            peak_gflops,
        }
    }

    /// A run's rate as a share of the measured peak (`None` without one).
    pub fn peak_fraction(&self, gflops: f64) -> Option<f64> {
        self.peak_gflops.filter(|p| *p > 0.0).map(|p| gflops / p)
    }
}

/// Result of a generation benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub runs: usize,
    pub warmup: usize,
    pub batch: usize,
    pub prompt_len: usize,
    pub seconds: Stat,
    pub tokens_per_s: Stat,
    pub ms_per_step: Stat,
    /// Mean time of the forward passes alone, per step.
    pub ms_per_forward: Stat,
    /// Share of a step spent outside the model (sampling, selection, bookkeeping).
    pub sampling_overhead: f64,
    pub nfe: usize,
    pub steps: usize,
    /// Generated (canvas) tokens per forward pass: gen_length × batch / nfe.
    pub tokens_per_forward: f64,
    /// Tokens of the answers before their first EOS/EOT (the last timed run); the rest of the
    /// canvas is padding. Prompt tokens never count as throughput.
    pub answer_tokens: usize,
    /// `answer_tokens` per second (mean over the timed runs).
    pub answer_tokens_per_s: f64,
    /// Matrix-product FLOPs per second over the whole generation, counting the work done: the
    /// recomputed chunks of a cached forward, the last MLP and the head only on the rows read.
    pub gflops: f64,
}

/// A predictor wrapper that times its forward passes and counts the matrix-product FLOPs of the
/// work they do: a block's first forward covers the whole canvas, later ones the chunk the cache
/// mode recomputes; the last MLP and the head run only on the rows read.
struct Timed<'a> {
    inner: Box<dyn MaskPredictor + 'a>,
    cfg: &'a crate::config::ModelConfig,
    device: candle_core::Device,
    forward_seconds: f64,
    flops: f64,
    mode: CacheMode,
    block: std::ops::Range<usize>,
    block_start: bool,
    /// Block diffusion with the exact block cache: where the last block started (a block's
    /// first step recomputes from there).
    exact_from: Option<usize>,
}

impl<'a> Timed<'a> {
    fn new(model: &'a Model) -> Self {
        Timed {
            inner: model.predictor(),
            cfg: model.config(),
            device: model.device().clone(),
            forward_seconds: 0.0,
            flops: 0.0,
            mode: CacheMode::None,
            block: 0..0,
            block_start: true,
            exact_from: None,
        }
    }
}

impl MaskPredictor for Timed<'_> {
    fn logits_at(
        &mut self,
        x: &candle_core::Tensor,
        key_mask: Option<&candle_core::Tensor>,
        rows: &[usize],
    ) -> Result<candle_core::Tensor> {
        let (b, l) = x.dims2()?;
        let chunk = match (self.exact_from, self.block_start) {
            _ if self.mode == CacheMode::None => l,
            (Some(from), true) => l - from.min(l),
            (Some(_), false) => l - self.block.start.min(l),
            (None, true) => l,
            (None, false) => self.mode.recomputed(self.block.clone(), l).len(),
        };
        self.block_start = false;
        self.flops += self.cfg.chunk_flops(b, chunk, l, rows.len());
        let t = Instant::now();
        let y = self.inner.logits_at(x, key_mask, rows)?;
        crate::device::sync(&self.device)?;
        self.forward_seconds += t.elapsed().as_secs_f64();
        Ok(y)
    }
    fn begin_block(&mut self, block: std::ops::Range<usize>, mode: CacheMode) -> Result<()> {
        if let Some(from) = self.exact_from.as_mut() {
            if mode == CacheMode::None {
                *from = 0;
            } else if !self.block.is_empty() {
                *from = self.block.start;
            }
        }
        self.mode = mode;
        self.block = block.clone();
        self.block_start = true;
        self.inner.begin_block(block, mode)
    }
    fn set_visibility(&mut self, visibility: crate::model::Visibility, len: usize) -> Result<()> {
        self.exact_from = matches!(visibility, crate::model::Visibility::Blocks { blocked, .. } if blocked == f32::NEG_INFINITY)
            .then_some(0);
        self.block = 0..0;
        self.inner.set_visibility(visibility, len)
    }
    fn device(&self) -> candle_core::Device {
        self.device.clone()
    }
    fn max_sequence_length(&self) -> usize {
        self.inner.max_sequence_length()
    }
}

/// A benchmark's canvas must fit the model ([`crate::sampler::prompt::check_length`]) and its
/// batch must be countable, before anything of that size is allocated.
fn check_shape(model: &Model, batch: usize, prompt_len: usize, answer_len: usize) -> Result<()> {
    crate::sampler::prompt::check_length(
        prompt_len,
        answer_len,
        model.config().max_sequence_length,
    )?;
    check_batch(batch, prompt_len + answer_len)
}

/// `batch` rows of `len` tokens must be countable in memory.
fn check_batch(batch: usize, len: usize) -> Result<()> {
    match batch.checked_mul(len.max(1)) {
        Some(n) if n <= isize::MAX as usize / 64 => Ok(()),
        _ => Err(crate::error::Error::setting(
            "batch",
            batch,
            format!("{batch} rows of {len} tokens do not fit in memory"),
        )),
    }
}

/// Times `generate` on seeded random prompts: `warmup` untimed runs, then `runs` timed ones.
#[allow(clippy::too_many_arguments)]
pub fn bench_generate(
    model: &Model,
    special: &SpecialTokens,
    cfg: &SamplerConfig,
    prompt_len: usize,
    batch: usize,
    warmup: usize,
    runs: usize,
    seed: u64,
) -> Result<GenerateReport> {
    check_shape(model, batch, prompt_len, cfg.gen_length)?;
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| random_prompt(prompt_len, vocab, special, seed + i as u64))
        .collect();
    let batch_prompts = PromptBatch {
        ids: prompts,
        key_mask: None,
    };
    let mut secs = Vec::new();
    let mut fwd = Vec::new();
    let (mut nfe, mut steps, mut flops, mut answer_tokens) = (0, 0, 0.0, 0);
    for r in 0..warmup + runs {
        let mut timed = Timed::new(model);
        let mut rng = Rng::new(seed);
        let mut cont = |_: &StepEvent| ControlFlow::Continue(());
        crate::device::sync(model.device())?;
        let t0 = Instant::now();
        let g = sampler::generate(
            &mut timed,
            &batch_prompts,
            cfg,
            special,
            &mut rng,
            &mut cont,
        )?;
        crate::device::sync(model.device())?;
        let dt = t0.elapsed().as_secs_f64();
        if r >= warmup {
            secs.push(dt);
            fwd.push(timed.forward_seconds);
            nfe = g.nfe;
            steps = g.steps;
            flops = timed.flops;
            answer_tokens = g
                .generated_ids
                .iter()
                .map(|r| special.answer_end(r).unwrap_or(r.len()))
                .sum();
        }
    }
    let tokens = (cfg.gen_length * batch) as f64;
    let per_step: Vec<f64> = secs.iter().map(|s| s * 1e3 / steps.max(1) as f64).collect();
    let per_fwd: Vec<f64> = fwd.iter().map(|s| s * 1e3 / nfe.max(1) as f64).collect();
    let seconds = Stat::of(&secs);
    Ok(GenerateReport {
        runs,
        warmup,
        batch,
        prompt_len,
        tokens_per_s: Stat::of(&secs.iter().map(|s| tokens / s).collect::<Vec<_>>()),
        ms_per_step: Stat::of(&per_step),
        ms_per_forward: Stat::of(&per_fwd),
        sampling_overhead: 1.0 - fwd.iter().sum::<f64>() / secs.iter().sum::<f64>().max(1e-12),
        gflops: flops / seconds.mean / 1e9,
        seconds,
        nfe,
        steps,
        tokens_per_forward: tokens / nfe.max(1) as f64,
        answer_tokens,
        answer_tokens_per_s: answer_tokens as f64 / seconds.mean.max(1e-12),
    })
}

/// Result of a forward-pass benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardReport {
    pub runs: usize,
    pub batch: usize,
    pub len: usize,
    pub ms: Stat,
    pub gflops: f64,
}

/// Times one forward pass over `batch` × `len` random tokens.
pub fn bench_forward(
    model: &Model,
    special: &SpecialTokens,
    batch: usize,
    len: usize,
    warmup: usize,
    runs: usize,
    seed: u64,
) -> Result<ForwardReport> {
    check_shape(model, batch, len, 0)?;
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = (0..batch)
        .flat_map(|i| random_prompt(len, vocab, special, seed + i as u64))
        .collect();
    let x = candle_core::Tensor::from_vec(ids, (batch, len), model.device())?;
    let mut ms = Vec::new();
    for r in 0..warmup + runs {
        crate::device::sync(model.device())?;
        let t0 = Instant::now();
        let y = model.forward(&x, None)?;
        crate::device::sync(model.device())?;
        drop(y);
        if r >= warmup {
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = Stat::of(&ms);
    Ok(ForwardReport {
        runs,
        batch,
        len,
        gflops: model.config().forward_flops(batch, len) / (ms.mean / 1e3) / 1e9,
        ms,
    })
}

/// Times one cached denoising step: a canvas of `batch` × `len` random tokens whose block
/// `block` is being denoised with cache `mode`. The block-start forward (which fills the caches)
/// runs once, untimed; each timed run is one later step of the block (logits of the block's
/// rows, recomputing only what the mode says).
#[allow(clippy::too_many_arguments)]
pub fn bench_step(
    model: &Model,
    special: &SpecialTokens,
    batch: usize,
    len: usize,
    block: std::ops::Range<usize>,
    mode: crate::model::CacheMode,
    warmup: usize,
    runs: usize,
    seed: u64,
) -> Result<ForwardReport> {
    check_shape(model, batch, len, 0)?;
    if block.is_empty() || block.end > len {
        return Err(crate::error::Error::setting(
            "block",
            format!("{}..{}", block.start, block.end),
            format!("must be a non-empty range of the {len}-token canvas"),
        ));
    }
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = (0..batch)
        .flat_map(|i| random_prompt(len, vocab, special, seed + i as u64))
        .collect();
    let x = candle_core::Tensor::from_vec(ids, (batch, len), model.device())?;
    let llada2 = model.architecture() == crate::model::Architecture::Llada2;
    if llada2 && !block.start.is_multiple_of(block.len()) {
        return Err(crate::error::Error::setting(
            "prompt_len",
            block.start,
            format!(
                "must be a multiple of the block length {} for block diffusion (blocks start at position 0)",
                block.len()
            ),
        ));
    }
    // block diffusion's window ends with the block
    let len = if llada2 { block.end } else { len };
    let x = if llada2 { x.narrow(1, 0, len)? } else { x };
    let mut p = model.predictor();
    if llada2 {
        // block diffusion: block-causal attention over blocks of the step's block length (the
        // canvas then ends with the block; with a cache only the block is recomputed, exactly)
        p.set_visibility(
            crate::model::Visibility::Blocks {
                block: block.len(),
                allowed: 0.0,
                blocked: f32::NEG_INFINITY,
            },
            len,
        )?;
    }
    p.begin_block(block.clone(), mode)?;
    drop(p.logits(&x, None, block.clone())?);
    let mut ms = Vec::new();
    for r in 0..warmup + runs {
        crate::device::sync(model.device())?;
        let t0 = Instant::now();
        let y = p.logits(&x, None, block.clone())?;
        crate::device::sync(model.device())?;
        drop(y);
        if r >= warmup {
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = Stat::of(&ms);
    let chunk = mode.recomputed(block.clone(), len);
    let flops = model
        .config()
        .chunk_flops(batch, chunk.len(), len, block.len());
    Ok(ForwardReport {
        runs,
        batch,
        len,
        gflops: flops / (ms.mean / 1e3) / 1e9,
        ms,
    })
}

/// Result of a scoring benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub runs: usize,
    pub prompt_len: usize,
    pub answer_len: usize,
    pub mc_num: usize,
    pub batch: usize,
    pub seconds_per_answer: Stat,
    pub answers_per_s: Stat,
    pub nfe: usize,
}

/// Times [`crate::score::log_likelihood`] on a seeded random (prompt, answer).
#[allow(clippy::too_many_arguments)]
pub fn bench_score(
    model: &Model,
    special: &SpecialTokens,
    cfg: &crate::score::ScoreConfig,
    prompt_len: usize,
    answer_len: usize,
    warmup: usize,
    runs: usize,
    seed: u64,
) -> Result<ScoreReport> {
    check_shape(model, 1, prompt_len, answer_len)?;
    let vocab = model.config().vocab_size;
    let prompt = random_prompt(prompt_len, vocab, special, seed);
    let answer = random_prompt(answer_len, vocab, special, seed + 1);
    let mut secs = Vec::new();
    let mut nfe = 0;
    for r in 0..warmup + runs {
        let mut m = model.predictor();
        let mut rng = Rng::new(seed);
        crate::device::sync(model.device())?;
        let t0 = Instant::now();
        let e =
            crate::score::log_likelihood(&mut *m, &prompt, &answer, cfg, special.mask, &mut rng)?;
        crate::device::sync(model.device())?;
        if r >= warmup {
            secs.push(t0.elapsed().as_secs_f64());
            nfe = e.nfe;
        }
    }
    Ok(ScoreReport {
        runs,
        prompt_len,
        answer_len,
        mc_num: cfg.mc_num,
        batch: cfg.batch,
        answers_per_s: Stat::of(&secs.iter().map(|s| 1.0 / s).collect::<Vec<_>>()),
        seconds_per_answer: Stat::of(&secs),
        nfe,
    })
}

/// Result of a training benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub seconds_per_step: Stat,
    pub tokens_per_s: Stat,
    /// 6·N·tokens (N = non-embedding parameters + the output head) per second.
    pub gflops: f64,
}

/// Times pretraining steps (the reference loss, backward, AdamW) on seeded random batches, as the
/// peer's `train-bench` does.
pub fn bench_train(
    model: &crate::model::Llada,
    batch: usize,
    seq_len: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    precision: crate::train::trainer::Precision,
) -> Result<TrainReport> {
    use crate::diffusion::{self, noise, LossWeights, Objective};
    use crate::train::optim::{AdamW, AdamWConfig};
    let tr = crate::train::Trainable::from_llada(model)?;
    // bf16 mixed precision: bf16 products, f32 master weights (as `llada train --precision`)
    let _autocast = crate::model::layers::autocast(precision.autocast());
    let mut opt = AdamW::new(AdamWConfig::default(), &tr.vars)?;
    let cfg = model.config();
    crate::sampler::prompt::check_length(seq_len, 0, cfg.max_sequence_length)?;
    check_batch(batch, seq_len)?;
    let mask = cfg.mask_token_id.unwrap_or(0);
    let hi = cfg.vocab_size.min(mask as usize).max(2);
    let mut rng = Rng::new(seed);
    let mut secs = Vec::new();
    for s in 0..warmup + steps {
        let x0: Vec<Vec<u32>> = (0..batch)
            .map(|_| (0..seq_len).map(|_| rng.below(hi - 1) as u32).collect())
            .collect();
        crate::device::sync(model.device())?;
        let t0 = Instant::now();
        let noised = noise::forward_process(&x0, None, mask, noise::EPS, &mut rng);
        let w = LossWeights::new(&x0, &noised, &Objective::Pretrain)?;
        let ids =
            candle_core::Tensor::from_vec(noised.noisy.concat(), (batch, seq_len), model.device())?;
        let pos = candle_core::Tensor::from_slice(&w.positions, w.positions.len(), model.device())?;
        let logits = tr.model.forward_train_positions(&ids, &pos)?;
        let loss = diffusion::masked_diffusion_loss(&logits, &w)?;
        let grads = tr.gradients(&loss)?;
        let (_, grads) = crate::train::optim::clip_grad_norm(&grads, 1.0)?;
        opt.step(&tr.vars, &grads, 1e-4)?;
        crate::device::sync(model.device())?;
        if s >= warmup {
            secs.push(t0.elapsed().as_secs_f64());
        }
    }
    let tokens = (batch * seq_len) as f64;
    // the parameters a token's forward multiplies with (a mixture's routed experts only)
    let n = cfg.active_parameter_count() as f64;
    let st = Stat::of(&secs);
    Ok(TrainReport {
        steps,
        batch,
        seq_len,
        tokens_per_s: Stat::of(&secs.iter().map(|s| tokens / s).collect::<Vec<_>>()),
        gflops: 6.0 * n * tokens / st.mean / 1e9,
        seconds_per_step: st,
    })
}
