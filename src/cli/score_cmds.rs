//! `llada score`, `llada ppl`, `llada eval`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use llada::score::{self, choice, ppl, ScoreConfig};
use llada::Rng;

use super::{parse_ids, print_json, ModelArg, RuntimeArgs};

/// Estimator flags (defaults: the reference's).
#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Monte Carlo samples.
    #[arg(long, default_value_t = score::DEFAULT_MC_NUM)]
    pub mc_num: usize,
    /// Samples per forward pass (must divide --mc-num).
    #[arg(long, default_value_t = score::DEFAULT_BATCH)]
    pub batch: usize,
    /// Unsupervised classifier-free guidance scale.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub cfg_scale: f64,
    /// Random seed of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl ScoreArgs {
    fn config(&self) -> Result<ScoreConfig> {
        let c = ScoreConfig {
            mc_num: self.mc_num,
            batch: self.batch,
            cfg_scale: self.cfg_scale,
        };
        c.validate()?;
        Ok(c)
    }
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

#[derive(Args, Debug)]
pub struct ScoreCmdArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Prompt (context) text.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Answer (continuation) text.
    #[arg(long, conflicts_with = "answer_ids")]
    pub answer: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// Answer token ids, comma-separated.
    #[arg(long)]
    pub answer_ids: Option<String>,
    #[command(flatten)]
    pub score: ScoreArgs,
    /// Print {"log_likelihood": x, "stderr": s}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn score_cmd(a: ScoreCmdArgs) -> Result<()> {
    let cfg = a.score.config()?;
    let ck = a.rt.load(&a.model.resolve()?)?;
    let (prompt, answer) = match (&a.prompt_ids, &a.answer_ids, &a.prompt, &a.answer) {
        (Some(p), Some(ans), _, _) => (
            parse_ids(p, "--prompt-ids")?,
            parse_ids(ans, "--answer-ids")?,
        ),
        (None, None, Some(p), Some(ans)) => choice::encode_pair(ck.tokenizer()?, p, ans)?,
        _ => bail!("give --prompt and --answer (or --prompt-ids and --answer-ids)"),
    };
    let v = ck.config.embedding_size as u32;
    if let Some(bad) = prompt.iter().chain(&answer).find(|&&t| t >= v) {
        bail!("invalid ids: token {bad} is outside the vocabulary (embedding_size {v})");
    }
    let mut m = ck.model.predictor();
    // a progress bar over the Monte Carlo mini-batches (drawn on a terminal only)
    let pb = bar(cfg.mc_num.div_ceil(cfg.batch.max(1)), "scoring");
    let mut tick = || {
        pb.inc(1);
        std::ops::ControlFlow::Continue(())
    };
    let e = score::log_likelihood_until(
        &mut m,
        &prompt,
        &answer,
        &cfg,
        ck.special.mask,
        &mut Rng::new(a.score.seed),
        &mut tick,
    )?;
    pb.finish_and_clear();
    if a.json {
        return print_json(&serde_json::json!({
            "log_likelihood": e.log_likelihood, "stderr": e.stderr,
            "answer_tokens": answer.len(), "nfe": e.nfe,
        }));
    }
    println!(
        "log p(answer | prompt) ≥ {:.4} ± {:.4}  ({} answer tokens, {:.4} per token, {} forward passes)",
        e.log_likelihood,
        e.stderr,
        answer.len(),
        e.log_likelihood / answer.len() as f64,
        e.nfe
    );
    Ok(())
}

/// `[MODEL] FILE`: the last positional is the file, a first one the model.
fn model_and_file(pos: &[String]) -> Result<(ModelArg, PathBuf)> {
    match pos {
        [file] => Ok((ModelArg { model: None }, PathBuf::from(file))),
        [model, file] => Ok((
            ModelArg {
                model: Some(model.clone()),
            },
            PathBuf::from(file),
        )),
        _ => bail!("expected [MODEL] FILE"),
    }
}

#[derive(Args, Debug)]
pub struct PplArgs {
    /// [MODEL] FILE: checkpoint (optional, default model otherwise) and the text file to measure.
    #[arg(num_args = 1..=2, required = true, value_name = "[MODEL] FILE")]
    pub positional: Vec<String>,
    /// Window length in tokens (default: the model's max_sequence_length).
    #[arg(long)]
    pub context: Option<usize>,
    /// Only the first N windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    #[command(flatten)]
    pub score: ScoreArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn ppl_cmd(a: PplArgs) -> Result<()> {
    let cfg = a.score.config()?;
    let (model, file) = model_and_file(&a.positional)?;
    let text = llada::error::read_to_string(&file)?;
    let ck = a.rt.load(&model.resolve()?)?;
    let mut ids = ck.tokenizer()?.encode(&text)?;
    let context = a.context.unwrap_or(ck.config.max_sequence_length);
    if let Some(w) = a.max_windows {
        ids.truncate(w.saturating_mul(context));
    }
    let pb = bar(ids.len().div_ceil(context.max(1)), "windows");
    let mut m = ck.model.predictor();
    let r = ppl::perplexity(
        &mut m,
        &ids,
        context,
        &cfg,
        ck.special.mask,
        a.score.seed,
        &mut |i, _| pb.set_position(i as u64),
    )?;
    pb.finish_and_clear();
    if a.json {
        return print_json(&r);
    }
    println!(
        "{} tokens in {} windows of ≤ {context}: NLL ≤ {:.4} ± {:.4} nats/token · perplexity ≤ {:.2}",
        r.tokens, r.windows, r.nll_per_token, r.stderr, r.perplexity_bound
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// [MODEL] TASKS.jsonl: checkpoint (optional) and the tasks, one JSON object per line:
    /// {"context": str, "choices": [str, ...], "answer": index}.
    #[arg(num_args = 1..=2, required = true, value_name = "[MODEL] TASKS")]
    pub positional: Vec<String>,
    /// Few-shot examples (other lines, seeded choice) before each question.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Only the first N tasks.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub score: ScoreArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let cfg = a.score.config()?;
    let (model, path) = model_and_file(&a.positional)?;
    let mut tasks = choice::load_tasks(&path)?;
    if let Some(n) = a.limit {
        tasks.truncate(n);
    }
    let ck = a.rt.load(&model.resolve()?)?;
    let tok = ck.tokenizer()?;
    let pb = bar(tasks.len(), "tasks");
    let mut m = ck.model.predictor();
    let t0 = std::time::Instant::now();
    let (results, sum) = choice::evaluate(
        &mut m,
        tok,
        &tasks,
        a.shots,
        &cfg,
        a.score.seed,
        &mut |i, _| pb.set_position(i as u64),
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let acc = &sum.acc;
    if a.json {
        return print_json(&serde_json::json!({
            "accuracy": acc.accuracy, "ci95": [acc.ci95.0, acc.ci95.1], "n": acc.n,
            "correct": acc.correct, "accuracy_norm": sum.acc_norm.accuracy,
            "ci95_norm": [sum.acc_norm.ci95.0, sum.acc_norm.ci95.1],
            "shots": a.shots, "seconds": seconds, "forwards": sum.forwards,
            "results": results,
        }));
    }
    for (label, acc) in [
        ("accuracy     ", &sum.acc),
        ("accuracy_norm", &sum.acc_norm),
    ] {
        println!(
            "{label} {:.1}% ({}/{}) · 95% CI [{:.1}%, {:.1}%]",
            100.0 * acc.accuracy,
            acc.correct,
            acc.n,
            100.0 * acc.ci95.0,
            100.0 * acc.ci95.1,
        );
    }
    println!(
        "({} tasks, {} shots; accuracy_norm divides each choice's score by its length in bytes)",
        acc.n, a.shots
    );
    println!(
        "{seconds:.1} s · {} forward passes · {:.1} forward passes/s",
        sum.forwards,
        sum.forwards as f64 / seconds.max(1e-9)
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalChatArgs {
    /// [MODEL] CASES.jsonl: checkpoint (optional) and chat examples whose last message is the
    /// expected assistant answer ({"task"?: str, "messages": [...]}).
    #[arg(num_args = 1..=2, required = true, value_name = "[MODEL] CASES")]
    pub positional: Vec<String>,
    /// Only the first N cases.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[command(flatten)]
    pub sampler: super::sample_cmds::SamplerArgs,
    /// Print JSON (with every answer).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn eval_chat_cmd(a: EvalChatArgs) -> Result<()> {
    let base = llada::sampler::SamplerConfig {
        gen_length: 32,
        steps: 32,
        block_length: 32,
        ..Default::default()
    };
    let cfg = a.sampler.config(base, llada::sampler::Preset::Reference)?;
    let (model, path) = model_and_file(&a.positional)?;
    let mut cases = llada::score::exact::load_cases(&path)?;
    if let Some(n) = a.limit {
        cases.truncate(n);
    }
    let ck = a.rt.load(&model.resolve()?)?;
    let tok = ck.tokenizer()?;
    let pb = bar(cases.len(), "cases");
    let mut m = ck.model.predictor();
    let t0 = std::time::Instant::now();
    let ev = llada::score::exact::evaluate(&mut m, tok, &cases, &cfg, a.batch, &mut |i, _| {
        pb.set_position(i as u64)
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let (acc, per) = (&ev.accuracy, &ev.per_task);
    // generated tokens only: the answers before their EOS/EOT, not the prompts or the padding
    let rate = ev.answer_tokens as f64 / seconds.max(1e-9);
    if a.json {
        return print_json(&serde_json::json!({
            "accuracy": acc.accuracy, "ci95": [acc.ci95.0, acc.ci95.1], "n": acc.n,
            "seconds": seconds, "forwards": ev.forwards, "answer_tokens": ev.answer_tokens,
            "tokens_per_s": rate,
            "tokens_per_forward": ev.answer_tokens as f64 / ev.forwards.max(1) as f64,
            "per_task": per, "results": ev.results,
        }));
    }
    println!(
        "exact match {:.1}% ({}/{}) · 95% CI [{:.1}%, {:.1}%] · {:.1} s · {} forward passes · {} answer tokens, {:.1}/s",
        100.0 * acc.accuracy,
        acc.correct,
        acc.n,
        100.0 * acc.ci95.0,
        100.0 * acc.ci95.1,
        seconds,
        ev.forwards,
        ev.answer_tokens,
        rate
    );
    for (task, t) in per {
        println!(
            "  {task:<12} {:5.1}% ({}/{})",
            100.0 * t.accuracy,
            t.correct,
            t.n
        );
    }
    Ok(())
}
