//! `llada bench`: speed figures a user can trust (warm-up, N runs, mean ± std, settings).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use llada::bench::{self, Baseline, Stat};
use llada::candle_core::Device;
use llada::device::{device_name, dtype_name};
use llada::model::{Architecture, Model};
use llada::sampler::SamplerConfig;
use llada::{RawConfig, RunDType, SpecialTokens};

use super::sample_cmds::SamplerArgs;
use super::{print_json, ModelArg, RuntimeArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Build a model with random weights from this config.json instead of loading one (directly
    /// on the device: an 8B-shaped benchmark needs no 16 GB file).
    #[arg(long, conflicts_with = "model")]
    pub random_weights: Option<PathBuf>,
    /// What to time: generate (the sampler), forward (one forward pass), step (one cached
    /// denoising step of the answer's first block: --cache, default dual; the block-start forward
    /// untimed), score (the likelihood estimator) or train (pretraining steps: loss, backward,
    /// AdamW; --batch, --len = seq len).
    #[arg(long, default_value = "generate")]
    pub mode: String,
    /// Length of the seeded random prompt.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Forward mode: tokens per sequence (default: prompt + answer length).
    #[arg(long)]
    pub len: Option<usize>,
    /// Score mode: answer length in tokens.
    #[arg(long, default_value_t = 32)]
    pub answer_len: usize,
    /// Score mode: Monte Carlo samples.
    #[arg(long, default_value_t = llada::score::DEFAULT_MC_NUM)]
    pub mc_num: usize,
    /// Score mode: samples per forward pass.
    #[arg(long, default_value_t = llada::score::DEFAULT_BATCH)]
    pub mc_batch: usize,
    /// Train mode: f32, or bf16 mixed precision (bf16 products, f32 master weights).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub precision: String,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

/// "700.1 · 88% of this CPU's measured peak (795 GFLOP/s, bf16 dot products)".
fn rate(gflops: f64, base: &Baseline, dtype: llada::candle_core::DType) -> String {
    match base.peak_fraction(gflops) {
        Some(f) => format!(
            "{gflops:.1} · {:.0}% of this CPU's measured peak ({:.0} GFLOP/s of {} on these threads)",
            100.0 * f,
            base.peak_gflops.unwrap_or(0.0),
            if dtype == llada::candle_core::DType::BF16 {
                "bf16 pair dot products"
            } else {
                "f32 FMAs"
            }
        ),
        None => format!("{gflops:.1}"),
    }
}

/// Peak memory lines: the run's (or the process's, where the window could not be reset), the
/// load's, against the weights' size.
fn print_peak(peak: Option<u64>, base: &Baseline) {
    let (load, windowed, weights) = (
        base.load_peak_rss_bytes,
        base.peak_rss_is_run_only,
        base.weights_bytes,
    );
    if let Some(p) = peak {
        println!(
            "peak RSS        {:.1} MB {} ({:.2}× the weights' {:.1} MB)",
            p as f64 / 1e6,
            if windowed {
                "while running"
            } else {
                "(process)"
            },
            p as f64 / weights as f64,
            weights as f64 / 1e6
        );
    }
    if let (Some(l), true) = (load, windowed) {
        println!("peak RSS load   {:.1} MB", l as f64 / 1e6);
    }
}

fn pm(s: Stat, digits: usize) -> String {
    format!("{:.*} ± {:.*}", digits, s.mean, digits, s.std)
}

/// The model under test, where it came from, and what was measured once it was loaded.
struct Subject {
    model: Model,
    special: SpecialTokens,
    source: String,
    base: Baseline,
}

impl Subject {
    /// Loads the checkpoint, or builds random weights from a config.json on the device, then
    /// measures the [`Baseline`].
    fn load(a: &BenchArgs, device: &Device, dtype: RunDType) -> Result<Subject> {
        let (model, special, source): (Model, SpecialTokens, String) = match &a.random_weights {
            Some(path) => {
                let raw = RawConfig::from_file(path)?;
                let mc = raw.resolve()?;
                let arch = Architecture::from_name(&raw.architecture()?)?;
                let m = arch.init_random(&mc, 0, dtype.dtype(), device)?;
                let sp = SpecialTokens::from_config(&mc)?;
                (m, sp, format!("random weights from {}", path.display()))
            }
            None => {
                let dir = a.model.resolve()?;
                let ck = a.rt.load(&dir)?;
                (ck.model, ck.special, dir.display().to_string())
            }
        };
        // peak memory: of loading, then (a new window) of the benchmark itself
        let base = Baseline::measure(&model);
        Ok(Subject {
            model,
            special,
            source,
            base,
        })
    }

    /// The JSON fields every mode shares.
    fn header(&self) -> serde_json::Value {
        let b = &self.base;
        serde_json::json!({
            "peak_gflops": b.peak_gflops,
            "model": self.source,
            "parameters": self.model.config().parameter_count(),
            "weights_bytes": b.weights_bytes,
            "load_peak_rss_bytes": b.load_peak_rss_bytes,
            "rss_after_load_bytes": b.rss_after_load_bytes,
            "peak_rss_is_run_only": b.peak_rss_is_run_only,
            "device": device_name(self.model.device()),
            "dtype": dtype_name(self.model.dtype()),
            "threads": b.threads,
            "llada": env!("CARGO_PKG_VERSION"),
        })
    }

    /// A mode's JSON: the shared fields, the mode and its report.
    fn json(&self, mode: &str, report: &impl serde::Serialize) -> Result<serde_json::Value> {
        let mut v = self.header();
        v["mode"] = mode.into();
        v["report"] = serde_json::to_value(report)?;
        Ok(v)
    }

    /// The rate fields of a mode's JSON: GFLOP/s, its fraction of the CPU's peak, peak memory.
    fn rates(&self, v: &mut serde_json::Value, gflops: f64, peak_rss: Option<u64>) {
        v["gflops"] = gflops.into();
        v["peak_fraction"] = self.base.peak_fraction(gflops).into();
        v["peak_rss_bytes"] = peak_rss.into();
    }

    /// The first line of the text report.
    fn title(&self, mode: &str) {
        println!(
            "llada bench · {mode} · {} · {} params · {} {} · {} threads",
            self.source,
            self.model.config().parameter_count(),
            device_name(self.model.device()),
            dtype_name(self.model.dtype()),
            self.base.threads,
        )
    }

    /// "model GFLOP/s" and the like: the rate against this CPU's peak.
    fn rate(&self, gflops: f64) -> String {
        rate(gflops, &self.base, self.model.dtype())
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.precision != "f32" && a.mode != "train" {
        bail!(
            "--precision {} applies to --mode train only (inference runs in --dtype)",
            a.precision
        );
    }
    if a.random_weights.is_some() {
        if let Some(ad) = &a.rt.adapter {
            bail!(
                "--adapter {} needs a model to adapt: give a checkpoint, not --random-weights",
                ad.display()
            );
        }
    }
    if a.runs == 0 {
        bail!("invalid setting runs=0: must be at least 1");
    }
    if a.batch == 0 {
        bail!("invalid setting batch=0: must be at least 1");
    }
    // The peer's bench defaults: gen 128, steps 128, block 32.
    let defaults = SamplerConfig {
        gen_length: 128,
        steps: 128,
        block_length: 32,
        ..Default::default()
    };
    let (device, dtype) = a.rt.setup()?;
    let s = Subject::load(&a, &device, dtype)?;
    // a block-diffusion model (LLaDA2) is benchmarked with its own sampler
    let defaults = if s.model.architecture() == Architecture::Llada2 {
        SamplerConfig::for_model(s.model.config())
    } else {
        defaults
    };
    let cfg = a
        .sampler
        .config(defaults, llada::sampler::Preset::Reference)?;
    match a.mode.as_str() {
        "generate" => run_generate(&a, &s, &cfg),
        "forward" => run_forward(&a, &s, &cfg),
        "step" => run_step(&a, &s, &cfg),
        "score" => run_score(&a, &s, &cfg),
        "train" => run_train(&a, &s),
        other => {
            bail!("invalid setting mode={other}: must be generate, forward, step, score or train")
        }
    }
}

/// `--mode generate`: the sampler on seeded random prompts.
fn run_generate(a: &BenchArgs, s: &Subject, cfg: &SamplerConfig) -> Result<()> {
    let r = bench::bench_generate(
        &s.model,
        &s.special,
        cfg,
        a.prompt_len,
        a.batch,
        a.warmup,
        a.runs,
        a.sampler.seed,
    )?;
    let peak_rss = bench::peak_rss_bytes();
    if a.json {
        let mut v = s.json("generate", &r)?;
        v["settings"] = serde_json::to_value(cfg)?;
        v["tokens_per_s"] = r.tokens_per_s.mean.into();
        v["ms_per_step"] = r.ms_per_step.mean.into();
        v["ms_per_forward"] = r.ms_per_forward.mean.into();
        v["nfe"] = r.nfe.into();
        v["seconds"] = r.seconds.mean.into();
        v["tokens_per_forward"] = r.tokens_per_forward.into();
        v["answer_tokens"] = r.answer_tokens.into();
        v["answer_tokens_per_s"] = r.answer_tokens_per_s.into();
        s.rates(&mut v, r.gflops, peak_rss);
        return print_json(&v);
    }
    s.title("generate");
    println!(
        "settings        batch {} · prompt {} · {}",
        a.batch,
        a.prompt_len,
        cfg.describe()
    );
    println!(
        "runs            {} timed after {} warm-up",
        r.runs, r.warmup
    );
    println!(
        "tokens/s        {}  (generated canvas tokens; prompts not counted)",
        pm(r.tokens_per_s, 2)
    );
    println!(
        "answer tokens   {} before EOS/EOT · {:.2}/s",
        r.answer_tokens, r.answer_tokens_per_s
    );
    println!("seconds         {}", pm(r.seconds, 3));
    println!("ms per step     {}", pm(r.ms_per_step, 1));
    println!(
        "ms per forward  {}  (sampling overhead {:.1}% of a step)",
        pm(r.ms_per_forward, 1),
        100.0 * r.sampling_overhead
    );
    println!(
        "forward evals   {} · {:.2} tokens per forward",
        r.nfe, r.tokens_per_forward
    );
    println!("model GFLOP/s   {}", s.rate(r.gflops));
    print_peak(peak_rss, &s.base);
    Ok(())
}

/// `--mode forward`: one forward pass over `--batch` × `--len` random tokens.
fn run_forward(a: &BenchArgs, s: &Subject, cfg: &SamplerConfig) -> Result<()> {
    let len = a.len.unwrap_or(a.prompt_len.saturating_add(cfg.gen_length));
    let r = bench::bench_forward(
        &s.model,
        &s.special,
        a.batch,
        len,
        a.warmup,
        a.runs,
        a.sampler.seed,
    )?;
    let peak_rss = bench::peak_rss_bytes();
    if a.json {
        let mut v = s.json("forward", &r)?;
        v["ms"] = r.ms.mean.into();
        s.rates(&mut v, r.gflops, peak_rss);
        return print_json(&v);
    }
    s.title("forward");
    println!(
        "shape           batch {} × {} tokens · {:.2} GFLOP per forward",
        a.batch,
        len,
        s.model.config().forward_flops(a.batch, len) / 1e9
    );
    println!("ms per forward  {}", pm(r.ms, 2));
    println!("GFLOP/s         {}", s.rate(r.gflops));
    print_peak(peak_rss, &s.base);
    Ok(())
}

/// `--mode step`: one cached denoising step (`--cache`, default dual) of the answer's first
/// block (`--block-length`) on a canvas of `--prompt-len` + `--gen-length` random tokens.
fn run_step(a: &BenchArgs, s: &Subject, cfg: &SamplerConfig) -> Result<()> {
    let len = a.prompt_len.saturating_add(cfg.gen_length);
    let block = a.prompt_len..a.prompt_len.saturating_add(cfg.block_length);
    let mode = a.sampler.cache.unwrap_or(llada::sampler::CacheMode::Dual);
    let r = bench::bench_step(
        &s.model,
        &s.special,
        a.batch,
        len,
        block.clone(),
        mode,
        a.warmup,
        a.runs,
        a.sampler.seed,
    )?;
    let peak_rss = bench::peak_rss_bytes();
    if a.json {
        let mut v = s.json("step", &r)?;
        v["ms"] = r.ms.mean.into();
        v["cache"] = mode.to_string().into();
        v["block"] = serde_json::json!([block.start, block.end]);
        s.rates(&mut v, r.gflops, peak_rss);
        return print_json(&v);
    }
    s.title("step");
    println!(
        "shape           batch {} × {} tokens · block {}..{} · cache {}",
        a.batch, len, block.start, block.end, mode
    );
    println!("ms per step     {}", pm(r.ms, 2));
    println!("GFLOP/s         {}", s.rate(r.gflops));
    print_peak(peak_rss, &s.base);
    Ok(())
}

/// `--mode score`: the likelihood estimator on a seeded random (prompt, answer).
fn run_score(a: &BenchArgs, s: &Subject, cfg: &SamplerConfig) -> Result<()> {
    let sc = llada::score::ScoreConfig {
        mc_num: a.mc_num,
        batch: a.mc_batch,
        cfg_scale: cfg.cfg_scale,
    };
    sc.validate()?;
    let r = bench::bench_score(
        &s.model,
        &s.special,
        &sc,
        a.prompt_len,
        a.answer_len,
        a.warmup,
        a.runs,
        a.sampler.seed,
    )?;
    if a.json {
        let mut v = s.json("score", &r)?;
        v["answers_per_s"] = r.answers_per_s.mean.into();
        v["seconds"] = r.seconds_per_answer.mean.into();
        v["nfe"] = r.nfe.into();
        return print_json(&v);
    }
    s.title("score");
    println!(
        "settings        prompt {} · answer {} · mc_num {} · batch {} · cfg {}",
        r.prompt_len, r.answer_len, r.mc_num, r.batch, sc.cfg_scale
    );
    println!("answers/s       {}", pm(r.answers_per_s, 3));
    println!(
        "s per answer    {}  ({} forward passes)",
        pm(r.seconds_per_answer, 2),
        r.nfe
    );
    Ok(())
}

/// `--mode train`: pretraining steps (loss, backward, AdamW) on `--batch` × `--len` tokens.
fn run_train(a: &BenchArgs, s: &Subject) -> Result<()> {
    let seq_len = a.len.unwrap_or(256);
    let r = bench::bench_train(
        s.model.as_llada()?,
        a.batch,
        seq_len,
        a.warmup,
        a.runs,
        a.sampler.seed,
        a.precision.parse()?,
    )?;
    let peak_rss = bench::peak_rss_bytes();
    if a.json {
        let mut v = s.json("train", &r)?;
        v["precision"] = a.precision.clone().into();
        v["tokens_per_s"] = r.tokens_per_s.mean.into();
        v["seconds"] = r.seconds_per_step.mean.into();
        s.rates(&mut v, r.gflops, peak_rss);
        return print_json(&v);
    }
    s.title("train");
    println!(
        "settings        batch {} × {} tokens · {} timed steps after {} warm-up · precision {}",
        r.batch, r.seq_len, r.steps, a.warmup, a.precision
    );
    println!("tokens/s        {}", pm(r.tokens_per_s, 1));
    println!("s per step      {}", pm(r.seconds_per_step, 3));
    println!("model GFLOP/s   {} (6·N·tokens)", s.rate(r.gflops));
    print_peak(peak_rss, &s.base);
    Ok(())
}
