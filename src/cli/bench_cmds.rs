//! `llada bench`: speed figures a user can trust (warm-up, N runs, mean ± std, settings).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use llada::bench::{self, Stat};
use llada::device::{device_name, dtype_name};
use llada::model::{Architecture, Model};
use llada::sampler::SamplerConfig;
use llada::{LladaConfig, SpecialTokens};

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
    /// What to time: generate (the sampler), forward (one forward pass), score (the likelihood
    /// estimator) or train (pretraining steps: loss, backward, AdamW; --batch, --len = seq len).
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
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

/// The run's rate as a share of the measured peak (`None` without one).
fn peak_fraction(gflops: f64, peak: Option<f64>) -> Option<f64> {
    peak.filter(|p| *p > 0.0).map(|p| gflops / p)
}

/// "700.1 · 88% of this CPU's measured peak (795 GFLOP/s, bf16 dot products)".
fn rate(gflops: f64, peak: Option<f64>, dtype: llada::candle_core::DType) -> String {
    match peak_fraction(gflops, peak) {
        Some(f) => format!(
            "{gflops:.1} · {:.0}% of this CPU's measured peak ({:.0} GFLOP/s of {} on these threads)",
            100.0 * f,
            peak.unwrap_or(0.0),
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
fn print_peak(peak: Option<u64>, load: Option<u64>, windowed: bool, weights: u64) {
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

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("invalid setting runs=0: must be at least 1");
    }
    if a.batch == 0 {
        bail!("invalid setting batch=0: must be at least 1");
    }
    // The peer's bench defaults: gen 128, steps 128, block 32.
    let base = SamplerConfig {
        gen_length: 128,
        steps: 128,
        block_length: 32,
        ..Default::default()
    };
    let cfg = a.sampler.config(base)?;
    let (device, dtype) = a.rt.setup()?;
    let (model, special, source): (Model, SpecialTokens, String) = match &a.random_weights {
        Some(path) => {
            let raw = LladaConfig::from_file(path)?;
            let mc = raw.resolve()?;
            let arch = Architecture::from_name(&raw.architecture()?)?;
            let m = arch.init_random(&mc, 0, dtype.dtype(), &device)?;
            let sp = SpecialTokens::from_config(&mc)?;
            (m, sp, format!("random weights from {}", path.display()))
        }
        None => {
            let dir = a.model.resolve()?;
            let ck = a.rt.load(&dir)?;
            (ck.model, ck.special, dir.display().to_string())
        }
    };
    let mc = model.config().clone();
    // peak memory: of loading, then (a new window) of the benchmark itself
    let load_peak = bench::peak_rss_bytes();
    let loaded_rss = bench::rss_bytes();
    let windowed = bench::reset_peak_rss();
    let weights_bytes = model.weights_bytes();
    let threads = llada::candle_core::utils::get_num_threads();
    // this CPU's measured limit for the kernels' instruction, to put the run's rate against
    let peak = match model.device() {
        llada::candle_core::Device::Cpu => llada::kernels::peak::peak_gflops(model.dtype(), 300),
        _ => None,
    };
    let header = serde_json::json!({
        "peak_gflops": peak,
        "model": source,
        "parameters": mc.parameter_count(),
        "weights_bytes": weights_bytes,
        "load_peak_rss_bytes": load_peak,
        "rss_after_load_bytes": loaded_rss,
        "peak_rss_is_run_only": windowed,
        "device": device_name(model.device()),
        "dtype": dtype_name(model.dtype()),
        "threads": threads,
        "llada": env!("CARGO_PKG_VERSION"),
    });
    let title = |mode: &str| {
        println!(
            "llada bench · {mode} · {source} · {} params · {} {} · {threads} threads",
            mc.parameter_count(),
            device_name(model.device()),
            dtype_name(model.dtype()),
        )
    };
    match a.mode.as_str() {
        "generate" => {
            let r = bench::bench_generate(
                &model,
                &special,
                &cfg,
                a.prompt_len,
                a.batch,
                a.warmup,
                a.runs,
                a.sampler.seed,
            )?;
            let peak_rss = bench::peak_rss_bytes();
            if a.json {
                let mut v = header;
                v["mode"] = "generate".into();
                v["settings"] = serde_json::to_value(&cfg)?;
                v["report"] = serde_json::to_value(&r)?;
                v["tokens_per_s"] = r.tokens_per_s.mean.into();
                v["ms_per_step"] = r.ms_per_step.mean.into();
                v["ms_per_forward"] = r.ms_per_forward.mean.into();
                v["nfe"] = r.nfe.into();
                v["seconds"] = r.seconds.mean.into();
                v["tokens_per_forward"] = r.tokens_per_forward.into();
                v["gflops"] = r.gflops.into();
                v["peak_fraction"] = peak_fraction(r.gflops, peak).into();
                v["peak_rss_bytes"] = peak_rss.into();
                return print_json(&v);
            }
            title("generate");
            println!(
                "settings        batch {} · prompt {} · gen {} · steps {} · block {} · T {} · cfg {} · {:?} · {} · cache {}{}",
                a.batch, a.prompt_len, cfg.gen_length, cfg.steps, cfg.block_length, cfg.temperature,
                cfg.cfg_scale, cfg.commit, cfg.remasking, cfg.cache,
                if cfg.early_stop { " · early stop" } else { "" }
            );
            println!(
                "runs            {} timed after {} warm-up",
                r.runs, r.warmup
            );
            println!("tokens/s        {}", pm(r.tokens_per_s, 2));
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
            println!("model GFLOP/s   {}", rate(r.gflops, peak, model.dtype()));
            print_peak(peak_rss, load_peak, windowed, weights_bytes);
        }
        "forward" => {
            let len = a.len.unwrap_or(a.prompt_len + cfg.gen_length);
            let r = bench::bench_forward(
                &model,
                &special,
                a.batch,
                len,
                a.warmup,
                a.runs,
                a.sampler.seed,
            )?;
            let peak_rss = bench::peak_rss_bytes();
            if a.json {
                let mut v = header;
                v["mode"] = "forward".into();
                v["report"] = serde_json::to_value(&r)?;
                v["ms"] = r.ms.mean.into();
                v["gflops"] = r.gflops.into();
                v["peak_fraction"] = peak_fraction(r.gflops, peak).into();
                v["peak_rss_bytes"] = peak_rss.into();
                return print_json(&v);
            }
            title("forward");
            println!(
                "shape           batch {} × {} tokens · {:.2} GFLOP per forward",
                a.batch,
                len,
                mc.forward_flops(a.batch, len) / 1e9
            );
            println!("ms per forward  {}", pm(r.ms, 2));
            println!("GFLOP/s         {}", rate(r.gflops, peak, model.dtype()));
            print_peak(peak_rss, load_peak, windowed, weights_bytes);
        }
        "score" => {
            let sc = llada::score::ScoreConfig {
                mc_num: a.mc_num,
                batch: a.mc_batch,
                cfg_scale: cfg.cfg_scale,
            };
            sc.validate()?;
            let r = bench::bench_score(
                &model,
                &special,
                &sc,
                a.prompt_len,
                a.answer_len,
                a.warmup,
                a.runs,
                a.sampler.seed,
            )?;
            if a.json {
                let mut v = header;
                v["mode"] = "score".into();
                v["report"] = serde_json::to_value(&r)?;
                v["answers_per_s"] = r.answers_per_s.mean.into();
                v["seconds"] = r.seconds_per_answer.mean.into();
                v["nfe"] = r.nfe.into();
                return print_json(&v);
            }
            title("score");
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
        }
        "train" => {
            let seq_len = a.len.unwrap_or(256);
            let r = bench::bench_train(
                model.as_llada()?,
                a.batch,
                seq_len,
                a.warmup,
                a.runs,
                a.sampler.seed,
            )?;
            let peak_rss = bench::peak_rss_bytes();
            if a.json {
                let mut v = header;
                v["mode"] = "train".into();
                v["report"] = serde_json::to_value(&r)?;
                v["tokens_per_s"] = r.tokens_per_s.mean.into();
                v["seconds"] = r.seconds_per_step.mean.into();
                v["gflops"] = r.gflops.into();
                v["peak_fraction"] = peak_fraction(r.gflops, peak).into();
                v["peak_rss_bytes"] = peak_rss.into();
                return print_json(&v);
            }
            title("train");
            println!(
                "settings        batch {} × {} tokens · {} timed steps after {} warm-up",
                r.batch, r.seq_len, r.steps, a.warmup
            );
            println!("tokens/s        {}", pm(r.tokens_per_s, 1));
            println!("s per step      {}", pm(r.seconds_per_step, 3));
            println!(
                "model GFLOP/s   {} (6·N·tokens)",
                rate(r.gflops, peak, model.dtype())
            );
            print_peak(peak_rss, load_peak, windowed, weights_bytes);
        }
        other => bail!("invalid setting mode={other}: must be generate, forward, score or train"),
    }
    Ok(())
}
