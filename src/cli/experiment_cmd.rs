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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override the training steps of both models.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Print {"diffusion": {"forward", "reversal"}, "autoregressive": {...}} (accuracies in [0, 1]).
    #[arg(long)]
    pub json: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(cmd: ExperimentCmd) -> Result<()> {
    match cmd {
        ExperimentCmd::Reversal(a) => {
            if let Some(n) = a.threads {
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
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
                    "diffusion": {"forward": r.diffusion.forward.accuracy, "reversal": r.diffusion.reversal.accuracy},
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
            println!(
                "(exact match, 95% Wilson intervals) · chart {}",
                chart.display()
            );
            Ok(())
        }
    }
}
