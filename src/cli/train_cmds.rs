//! `llada train`, `llada tokenizer train`, `llada data prepare`, `llada plot`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use llada::train::data::{self, DataKind, PrepareOptions};
use llada::train::trainer::{StepReport, TrainConfig, Trainer};
use llada::Tokenizer;

use super::{print_json, RuntimeArgs};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run settings (TOML, or JSON by extension); flags below override them.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (exactly).
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// pretrain, sft, or vrpo (preference optimisation on data prepared with --kind preference).
    #[arg(long)]
    pub mode: Option<String>,
    /// Start from this checkpoint folder.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Or from random weights of this shape: a config.json, or a preset (tiny, small,
    /// bench-135m; see the README). The vocabulary size and the special ids a config leaves out
    /// are taken from --tokenizer.
    #[arg(long, value_name = "FILE|PRESET")]
    pub model_config: Option<PathBuf>,
    /// Tokenizer folder: the vocabulary and special ids of a new model, copied into checkpoints.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prepared dataset folder.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run folder: checkpoints, metrics.jsonl, the run's settings [default: runs/llada].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer steps of the run (with --resume: the new total) [default: 1000].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Tokens per training sequence [default: 256].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed into one step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate [default: 4e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up steps of the learning rate [default: 100, or a tenth of a shorter run].
    #[arg(long, conflicts_with = "resume")]
    pub warmup: Option<usize>,
    /// Steps between evaluations of the bound on the validation split [default: 100].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Steps between checkpoints [default: 200].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Random seed of the run [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// A step whose loss or gradient norm is NaN/∞: stop (the default: an error naming the step
    /// and the value) or skip (no update, a warning; stops after max_consecutive_skips in a row).
    /// A non-finite state is never saved.
    #[arg(long, value_parser = ["stop", "skip"])]
    pub on_nonfinite: Option<String>,
    /// Start a new run in a --out that holds an earlier run's checkpoints: they (step-*, latest)
    /// and its metrics.jsonl are removed first; other files are kept. Without it such a folder is
    /// refused (continue it with --resume).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// LoRA: train a rank-R adapter over the frozen --init-from model instead of every weight
    /// (checkpoints hold the adapter in Hugging Face PEFT's format; load it with --adapter).
    #[arg(long, value_name = "R")]
    pub lora_rank: Option<usize>,
    /// LoRA scale α (the update is scaled by α/R) [default: 2·R].
    #[arg(long, value_name = "A")]
    pub lora_alpha: Option<f64>,
    /// The linear maps of every block that get an adapter, comma-separated [default: all:
    /// q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out].
    #[arg(long, value_name = "LIST")]
    pub lora_targets: Option<String>,
    /// Recompute each block's activations in the backward pass instead of keeping them: the
    /// same loss and gradients, less memory, about a third more time.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// f32, or bf16 mixed precision (bf16 matrix products, f32 master weights, norms and loss)
    /// [default: f32].
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub precision: Option<String>,
    /// VRPO: DPO's β [default: 0.1].
    #[arg(long)]
    pub beta: Option<f64>,
    /// VRPO: timesteps n_t per answer and step [default: 8]. The estimator's budget is
    /// n = n_t × n_yt noised copies of every answer.
    #[arg(long, value_name = "N_T")]
    pub vrpo_timesteps: Option<usize>,
    /// VRPO: masks n_yt per timestep [default: 1].
    #[arg(long, value_name = "N_YT")]
    pub vrpo_masks: Option<usize>,
    /// VRPO: draw the reference's noise apart from the policy's (by default they share it:
    /// LLaDA 1.5's antithetic sampling); for measuring what sharing gains.
    #[arg(long)]
    pub no_antithetic: bool,
    /// VRPO: weight λ of an added SFT loss on the chosen answers [default: 0, LLaDA 1.5's
    /// objective]; holds their likelihood up when chosen and rejected answers share most tokens.
    #[arg(long, value_name = "λ")]
    pub vrpo_sft_weight: Option<f64>,
    /// VRPO: train every weight (the reference is then a frozen copy of the starting model)
    /// instead of a LoRA adapter (rank 16 unless --lora-rank).
    #[arg(long)]
    pub full_weights: bool,
    /// One JSON line per step on stdout instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// When stderr is not a terminal (a log file, CI), print a progress line every N steps
    /// (loss, bound, tokens/s, lr, ETA).
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None => TrainConfig::default(),
        };
        if let Some(m) = &self.mode {
            c.mode = match m.as_str() {
                "pretrain" => DataKind::Pretrain,
                "sft" => DataKind::Sft,
                "vrpo" | "preference" => DataKind::Preference,
                other => bail!("invalid setting mode={other}: must be pretrain, sft or vrpo"),
            };
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        set!(data, out, steps, seq_len, batch_size, grad_accum, lr, eval_every, save_every, seed);
        if self.init_from.is_some() {
            c.init_from = self.init_from.clone();
            c.model_config = None;
        }
        if self.model_config.is_some() {
            c.model_config = self.model_config.clone();
            c.init_from = None;
        }
        if self.tokenizer.is_some() {
            c.tokenizer = self.tokenizer.clone();
        }
        if let Some(o) = &self.on_nonfinite {
            c.on_nonfinite = o.parse()?;
        }
        // LoRA: the flags over the config's `[lora]` (if any) over the defaults
        if self.lora_rank.is_some() || self.lora_alpha.is_some() || self.lora_targets.is_some() {
            let from_config = c.lora.clone();
            let Some(rank) = self.lora_rank.or(from_config.as_ref().map(|l| l.rank)) else {
                bail!("--lora-alpha and --lora-targets set up a LoRA run: give its rank too (--lora-rank R)");
            };
            let targets = match &self.lora_targets {
                Some(t) => t
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                None => from_config.as_ref().map_or_else(
                    || {
                        llada::model::lora::TARGETS
                            .iter()
                            .map(|s| s.to_string())
                            .collect()
                    },
                    |l| l.targets.clone(),
                ),
            };
            // α: given, the config's when the rank is the config's, else 2·R
            let alpha = self.lora_alpha.unwrap_or(match &from_config {
                Some(l) if l.rank == rank => l.alpha,
                _ => 2.0 * rank as f64,
            });
            c.lora = Some(llada::model::lora::LoraSettings {
                rank,
                alpha,
                targets,
            });
        }
        if self.checkpoint_activations {
            c.checkpoint_activations = true;
        }
        if let Some(b) = self.beta {
            c.vrpo.beta = b;
        }
        if let Some(n) = self.vrpo_timesteps {
            c.vrpo.timesteps = n;
        }
        if let Some(n) = self.vrpo_masks {
            c.vrpo.masks = n;
        }
        if self.no_antithetic {
            c.vrpo.antithetic = false;
        }
        if let Some(w) = self.vrpo_sft_weight {
            c.vrpo.sft_weight = w;
        }
        if self.full_weights {
            c.vrpo.full_weights = true;
        }
        let vrpo_flags = self.beta.is_some()
            || self.vrpo_timesteps.is_some()
            || self.vrpo_masks.is_some()
            || self.vrpo_sft_weight.is_some()
            || self.no_antithetic
            || self.full_weights;
        if vrpo_flags && c.mode != DataKind::Preference {
            bail!(
                "--beta, --vrpo-timesteps, --vrpo-masks, --no-antithetic and --full-weights set up preference optimisation: add --mode vrpo (this run's mode is {})",
                c.mode.name()
            );
        }
        if let Some(p) = &self.precision {
            c.precision = p.parse()?;
        }
        // the warm-up: given, the run config's, or by default scaled to a short run
        if let Some(w) = self.warmup {
            c.schedule = c.schedule.with_warmup(w);
        } else if self.config.is_none() {
            c.schedule = c
                .schedule
                .with_warmup(llada::train::optim::default_warmup(c.steps));
        }
        if c.data.as_os_str().is_empty() {
            bail!(
                "no data: give --data DIR (made by `llada data prepare`) or `data` in the config"
            );
        }
        Ok(c)
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    if let Some(ad) = &a.rt.adapter {
        bail!(
            "--adapter {} does not apply to train: train an adapter with --init-from MODEL --lora-rank R, continue one with --resume RUN",
            ad.display()
        );
    }
    if let Some(d) = &a.rt.dtype {
        bail!("--dtype {d} does not apply to train: the weights train in f32; --precision bf16 selects bf16 mixed precision");
    }
    if a.resume.is_some()
        && (a.lora_rank.is_some()
            || a.lora_alpha.is_some()
            || a.lora_targets.is_some()
            || a.precision.is_some()
            || a.checkpoint_activations
            || a.beta.is_some()
            || a.vrpo_timesteps.is_some()
            || a.vrpo_masks.is_some()
            || a.vrpo_sft_weight.is_some()
            || a.no_antithetic
            || a.full_weights)
    {
        bail!("--resume continues a run with its own settings: --lora-rank, --precision, --checkpoint-activations and the VRPO settings are set when it starts");
    }
    let (device, _) = a.rt.setup()?;
    let mut trainer = match &a.resume {
        Some(dir) => Trainer::resume(dir, a.steps, &device)
            .with_context(|| format!("resuming {}", dir.display()))?,
        None => Trainer::start(a.config()?, &device, a.force)?,
    };
    if let (Some(_), Some(o)) = (&a.resume, &a.on_nonfinite) {
        // the one setting a resumed run may change besides --steps
        trainer.cfg.on_nonfinite = o.parse()?;
        trainer.state.config.on_nonfinite = trainer.cfg.on_nonfinite;
    }
    let steps = trainer.cfg.steps;
    let start = trainer.state.step;
    let what = match &trainer.cfg.lora {
        Some(l) => format!(
            "a LoRA adapter (rank {}, α {}, {}) of {} parameters",
            l.rank,
            l.alpha,
            l.targets.join(","),
            trainer.trainable.parameter_count()
        ),
        None => format!("{} parameters", trainer.trainable.parameter_count()),
    };
    let mut extras = Vec::new();
    if trainer.cfg.precision == llada::train::trainer::Precision::Bf16 {
        extras.push(" · bf16 mixed precision".to_string());
    }
    if trainer.cfg.checkpoint_activations {
        extras.push(" · activation checkpointing".to_string());
    }
    if trainer.cfg.mode == DataKind::Preference {
        let v = &trainer.cfg.vrpo;
        extras.push(format!(
            " · VRPO β {} · budget {}×{}{}{}",
            v.beta,
            v.timesteps,
            v.masks,
            if v.antithetic {
                " antithetic"
            } else {
                " independent noise"
            },
            if v.sft_weight > 0.0 {
                format!(" · SFT term λ {}", v.sft_weight)
            } else {
                String::new()
            }
        ));
    }
    eprintln!(
        "training {what}{} · {} · {} → {} steps · batch {}×{}×{} tokens · run folder {}",
        extras.concat(),
        trainer.cfg.mode.name(),
        start,
        steps,
        trainer.cfg.batch_size,
        trainer.cfg.grad_accum,
        trainer.cfg.seq_len,
        trainer.cfg.out.display()
    );
    let tty = std::io::stderr().is_terminal();
    let pb = if a.json || !tty {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(steps as u64);
        pb.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_position(start as u64);
        pb
    };
    let mut last_eval: Option<f64> = None;
    let json = a.json;
    let log_every = a.log_every.max(1);
    // the ETA counts the steps done by this process only (a resumed run's earlier steps took
    // place in another one)
    let t0 = std::time::Instant::now();
    let mut on_step = |r: &StepReport| {
        if r.eval_loss.is_some() {
            last_eval = r.eval_loss;
        }
        if json {
            let _ = print_json(r);
            return;
        }
        let eta = eta_seconds(r.step - start, steps - r.step, t0.elapsed().as_secs_f64());
        let rewards = r.rewards.map_or_else(String::new, |w| {
            format!(
                " · margin {:.3} · reward acc {:.2}",
                w.reward_margin, w.reward_accuracy
            )
        });
        let msg = format!(
            "loss {:.3}{rewards} · {} {} · {:.0} tok/s · lr {:.2e} · ETA {}",
            r.loss,
            if r.rewards.is_some() {
                "held-out"
            } else {
                "bound"
            },
            last_eval
                .map(|e| format!("{e:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.tokens_per_s,
            r.lr,
            eta.map_or_else(|| "-".to_string(), clock)
        );
        let mut notes = Vec::new();
        if r.skipped {
            notes.push(format!(
                "step {}: skipped (loss {}, gradient norm {})",
                r.step, r.loss, r.grad_norm
            ));
        }
        if let Some(c) = &r.checkpoint {
            notes.push(format!("step {}: checkpoint {}", r.step, c.display()));
        }
        if tty {
            pb.set_position(r.step as u64);
            pb.set_message(msg);
            for n in notes {
                pb.println(n);
            }
        } else {
            if r.step.is_multiple_of(log_every) || r.step == steps || r.eval_loss.is_some() {
                eprintln!("step {}/{steps} · {msg}", r.step);
            }
            for n in notes {
                eprintln!("{n}");
            }
        }
    };
    let last = trainer.run(&mut on_step)?;
    pb.finish();
    eprintln!(
        "done: {} (load it with `llada generate {}`)",
        last.display(),
        last.display()
    );
    Ok(())
}

/// Seconds left at the rate of this process's steps (`None` before its first step).
fn eta_seconds(done_here: usize, remaining: usize, elapsed: f64) -> Option<f64> {
    (done_here > 0).then(|| elapsed / done_here as f64 * remaining as f64)
}

/// `h:mm:ss` (or `m:ss` under an hour).
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE with the LLaDA special tokens and chat template.
    Train(TokenizerTrainArgs),
}

#[derive(Args, Debug)]
pub struct TokenizerTrainArgs {
    /// Vocabulary size, special tokens included.
    #[arg(long)]
    pub vocab_size: usize,
    /// Output folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Text files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn tokenizer(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train(a) => {
            let ids = llada::train::tokenizer::train_tokenizer(&a.files, a.vocab_size, &a.out)?;
            println!(
                "wrote {} ({} tokens; bos {}, eos {}, mask {}, eot {})",
                a.out.display(),
                ids.vocab_size,
                ids.bos,
                ids.eos,
                ids.mask,
                ids.eot
            );
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Tokenise text or chat files into a training dataset folder.
    Prepare(PrepareArgs),
    /// Write seeded synthetic instruction tasks (arithmetic, list reversal, copying, QA) as chat
    /// JSONL for SFT and exact-match evaluation.
    SynthSft(SynthArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of examples.
    #[arg(long, default_value_t = 10000)]
    pub n: usize,
    /// Seed of the generated examples (the same seed writes the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the plain text of every message here (e.g. for tokenizer training).
    #[arg(long)]
    pub text_out: Option<PathBuf>,
    /// Add verse-continuation examples drawn from the lines of this text file…
    #[arg(long)]
    pub continuations: Option<PathBuf>,
    /// …this many of them.
    #[arg(long, default_value_t = 0)]
    pub n_continuations: usize,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Tokenizer (a checkpoint or tokenizer folder).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// pretrain (plain text or {"text"} JSONL), sft (chat JSONL: {"messages": [...]}) or
    /// preference (JSONL: {"prompt" | "messages", "chosen", "rejected"}; for --mode vrpo).
    #[arg(long, default_value = "pretrain")]
    pub kind: String,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Plain text: one document per line (default: blank-line-separated paragraphs).
    #[arg(long)]
    pub doc_per_line: bool,
    /// Share held out for validation.
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// Seed of the shuffle and of the validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// SFT: drop longer examples.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Input files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn data_cmd(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::SynthSft(a) => {
            let mut text = String::new();
            let mut plain = String::new();
            let mut examples = llada::synth::tasks(a.n, a.seed);
            if let Some(p) = &a.continuations {
                let text = llada::error::read_to_string(p)?;
                let lines: Vec<&str> = text.lines().collect();
                examples.extend(llada::synth::continuations(
                    &lines,
                    a.n_continuations,
                    a.seed,
                ));
            }
            for ex in examples {
                text += &serde_json::json!({"task": ex.task.name(), "messages": ex.messages})
                    .to_string();
                text.push('\n');
                for m in &ex.messages {
                    plain += &m.content;
                    plain.push('\n');
                }
            }
            llada::weights::atomic_write(&a.out, text.as_bytes())?;
            if let Some(t) = &a.text_out {
                llada::weights::atomic_write(t, plain.as_bytes())?;
            }
            println!(
                "wrote {} ({} task examples + {} continuations, seed {})",
                a.out.display(),
                a.n,
                if a.continuations.is_some() {
                    a.n_continuations
                } else {
                    0
                },
                a.seed
            );
            Ok(())
        }
        DataCmd::Prepare(a) => {
            let tok = Tokenizer::open(&a.tokenizer)?;
            let kind = match a.kind.as_str() {
                "pretrain" => DataKind::Pretrain,
                "sft" => DataKind::Sft,
                "preference" => DataKind::Preference,
                other => {
                    bail!("invalid setting kind={other}: must be pretrain, sft or preference")
                }
            };
            let h = data::prepare(
                &a.files,
                &tok,
                &a.out,
                &PrepareOptions {
                    kind,
                    doc_per_line: a.doc_per_line,
                    val_fraction: a.val_fraction,
                    seed: a.seed,
                    max_len: a.max_len,
                },
            )?;
            println!(
                "wrote {}: train {} tokens / {} items, val {} tokens / {} items",
                a.out.display(),
                h.train.tokens,
                h.train.examples,
                h.val.tokens,
                h.val.examples
            );
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folder (with metrics.jsonl).
    pub run: PathBuf,
    /// Output PNG (default: RUN/curves.png; with --compare, RUN/compare.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Another run to draw on the same chart (training loss EMA and held-out bound of each;
    /// repeatable), e.g. an f32 and a bf16 run of the same data.
    #[arg(long, value_name = "RUN")]
    pub compare: Vec<PathBuf>,
}

pub fn plot(a: PlotArgs) -> Result<()> {
    if !a.compare.is_empty() {
        let out = a.out.unwrap_or_else(|| a.run.join("compare.png"));
        let runs: Vec<&std::path::Path> = std::iter::once(a.run.as_path())
            .chain(a.compare.iter().map(|p| p.as_path()))
            .collect();
        llada::train::plot::plot_compare(&runs, &out)?;
        println!("wrote {}", out.display());
        return Ok(());
    }
    let out = a.out.unwrap_or_else(|| a.run.join("curves.png"));
    llada::train::plot::plot_run(&a.run, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ETA is the rate of this process's steps times the steps left: after a resume at step
    /// 90 of 100, 3 steps in 3 s leave 7 steps, 7 s (not 10/93 of the time).
    #[test]
    fn the_eta_counts_this_process_steps_only() {
        assert_eq!(eta_seconds(0, 10, 5.0), None);
        assert_eq!(eta_seconds(3, 7, 3.0), Some(7.0));
        assert_eq!(clock(7.0), "0:07");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
