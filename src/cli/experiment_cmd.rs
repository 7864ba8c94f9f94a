//! `llada experiment reversal`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use llada::experiment::{self, ReversalConfig};

use super::print_json;

#[derive(Subcommand, Debug)]
pub enum ExperimentCmd {
    /// The reversal curse at small scale: a diffusion model and its autoregressive twin.
    Reversal(ReversalArgs),
}

#[derive(Args, Debug)]
pub struct ReversalArgs {
    /// The quick version (a few minutes on 2 cores) instead of the full one.
    #[arg(long)]
    pub quick: bool,
    /// Work folder (data, models, chart).
    #[arg(long, default_value = "runs/reversal")]
    pub out: PathBuf,
    /// Seed of the experiment (data, initial weights, masks).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override the training steps of both models.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Print {"diffusion": {"forward", "reversal"}, "autoregressive": {...}} (accuracies in [0, 1]).
    #[arg(long)]
    pub json: bool,
    /// CPU threads (default: all cores; at most 4 per available core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(cmd: ExperimentCmd) -> Result<()> {
    match cmd {
        ExperimentCmd::Reversal(a) => {
            if let Some(n) = a.threads {
                llada::device::set_threads(n)?;
            }
            let mut cfg = if a.quick {
                ReversalConfig::quick()
            } else {
                ReversalConfig::full()
            };
            cfg.seed = a.seed;
            if let Some(s) = a.steps {
                cfg.steps = s;
            }
            let threads = format!("{} threads", llada::candle_core::utils::get_num_threads());
            let json = a.json;
            let r = experiment::run(&cfg, &a.out, &threads, &mut |m| eprintln!("{m}"))?;
            let chart = a.out.join("reversal.png");
            experiment::plot(&r, &chart)?;
            let report = serde_json::to_string_pretty(&r)?;
            llada::weights::atomic_write(&a.out.join("report.json"), report.as_bytes())?;
            if json {
                return print_json(&serde_json::json!({
                    "diffusion": {
                        "forward": r.diffusion.forward.accuracy,
                        "reversal": r.diffusion.reversal.accuracy,
                        "reversal_prompt": r.diffusion.reversal_prompt.as_ref().map(|a| a.accuracy),
                    },
                    "autoregressive": {"forward": r.autoregressive.forward.accuracy, "reversal": r.autoregressive.reversal.accuracy},
                }));
            }
            println!(
                "reversal curse, {} test pairs, {} parameters per model, {:.0} s",
                cfg.test_pairs, r.parameters, r.seconds
            );
            println!("| model          | forward               | reversal              |");
            println!("|----------------|-----------------------|-----------------------|");
            for (name, s) in [
                ("diffusion", &r.diffusion),
                ("autoregressive", &r.autoregressive),
            ] {
                let f = |a: &llada::score::choice::Accuracy| {
                    format!(
                        "{:5.1}% [{:4.1}, {:4.1}]",
                        100.0 * a.accuracy,
                        100.0 * a.ci95.0,
                        100.0 * a.ci95.1
                    )
                };
                println!(
                    "| {name:<14} | {:<21} | {:<21} |",
                    f(&s.forward),
                    f(&s.reversal)
                );
            }
            if let Some(a) = &r.diffusion.reversal_prompt {
                println!(
                    "diffusion reversal asked with the twin's reversed template (`B :`): {:.1}%",
                    100.0 * a.accuracy
                );
            }
            println!(
                "(exact match, 95% Wilson intervals; diffusion reversal: the first line masked and filled, `[masks] ; B .`; autoregressive reversal: `B :` continued) · chart {}",
                chart.display()
            );
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalReversalArgs {
    /// [MODEL] POEMS.json: checkpoint (optional) and the paper's poem set
    /// (../shared/data/poem_data.json: a list of {"first", "second", "source"}).
    #[arg(num_args = 1..=2, required = true, value_name = "[MODEL] POEMS")]
    pub positional: Vec<String>,
    /// Only the first N pairs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// steps = gen_length = block_length.
    #[arg(long, default_value_t = 28)]
    pub gen_length: usize,
    /// Classifier-free guidance scale; 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub cfg_scale: f64,
    /// Turn off the EOS suppression the documented commands use (--eos_inf).
    #[arg(long)]
    pub no_eos_inf: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: super::RuntimeArgs,
}

pub fn eval_reversal(a: EvalReversalArgs) -> Result<()> {
    let (model, path) = match a.positional.as_slice() {
        [f] => (super::ModelArg { model: None }, PathBuf::from(f)),
        [m, f] => (
            super::ModelArg {
                model: Some(m.clone()),
            },
            PathBuf::from(f),
        ),
        _ => anyhow::bail!("expected [MODEL] POEMS.json"),
    };
    let mut poems = experiment::load_poems(&path)?;
    if let Some(n) = a.limit {
        poems.truncate(n);
    }
    let ck = a.rt.load(&model.resolve()?)?;
    let cfg = experiment::PoemConfig {
        gen_length: a.gen_length,
        cfg_scale: a.cfg_scale,
        logits_eos_inf: !a.no_eos_inf,
    };
    let mut res = Vec::new();
    for reversal in [false, true] {
        let acc = experiment::poem_accuracy(&ck, &poems, reversal, &cfg, &mut |i, n| {
            if i % 20 == 0 || i == n {
                eprint!(
                    "\r{} {i}/{n}",
                    if reversal { "reversal" } else { "forward " }
                );
            }
        })?;
        eprintln!();
        res.push(acc);
    }
    if a.json {
        return print_json(
            &serde_json::json!({"forward": res[0].accuracy, "reversal": res[1].accuracy, "n": res[0].n}),
        );
    }
    println!("poem completion ({} pairs): forward {:.1}% · reversal {:.1}%  (paper, LLaDA-8B-Instruct: 51.8 / 45.6)", res[0].n, 100.0 * res[0].accuracy, 100.0 * res[1].accuracy);
    Ok(())
}
