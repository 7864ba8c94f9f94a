//! Command-line interface: one file per command group; each parses flags into library settings,
//! calls the library and prints.

mod bench_cmds;
mod experiment_cmd;
mod model_cmds;
mod sample_cmds;
mod score_cmds;
mod serve_cmd;
mod train_cmds;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use llada::candle_core::Device;
use llada::{Checkpoint, RunDType};

#[derive(Parser, Debug)]
#[command(
    name = "llada",
    version,
    about = "Run, score, train and serve LLaDA masked diffusion language models"
)]
pub struct Cli {
    /// More logging (-v info, -vv debug); also RUST_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, display_order = 1000)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a checkpoint: architecture, parameters, dtype, memory, special tokens.
    Info(model_cmds::InfoArgs),
    /// Write a randomly initialised checkpoint in Hugging Face form.
    Init(model_cmds::InitArgs),
    /// Run one forward pass and write or print the logits.
    Forward(model_cmds::ForwardArgs),
    /// Re-write a checkpoint in Hugging Face form with another stored dtype (e.g. bf16).
    Export(model_cmds::ExportArgs),
    /// Generate an answer to a prompt by unmasking it step by step.
    Generate(sample_cmds::GenerateArgs),
    /// Multi-turn console chat with the chat template.
    Chat(sample_cmds::ChatArgs),
    /// Fill masked spans (`<mask:N>`) of a text using context on both sides.
    Infill(sample_cmds::InfillArgs),
    /// Time generation or a forward pass: warm-up, N runs, mean ± std.
    Bench(bench_cmds::BenchArgs),
    /// Estimate log p(answer | prompt) with the Monte Carlo likelihood bound.
    Score(score_cmds::ScoreCmdArgs),
    /// Likelihood bound per token (perplexity bound) of a text file.
    Ppl(score_cmds::PplArgs),
    /// Multiple-choice evaluation of a JSONL task file.
    Eval(score_cmds::EvalArgs),
    /// Exact-match evaluation of generated chat answers (JSONL with expected answers).
    EvalChat(score_cmds::EvalChatArgs),
    /// Pretrain or fine-tune (SFT) with the masked-diffusion bound; resumable.
    Train(train_cmds::TrainArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(train_cmds::TokenizerCmd),
    /// Training-data tools.
    #[command(subcommand)]
    Data(train_cmds::DataCmd),
    /// Plot the loss and learning-rate curves of a training run (PNG).
    Plot(train_cmds::PlotArgs),
    /// OpenAI-compatible HTTP server with streaming and a live denoising page.
    Serve(serve_cmd::ServeArgs),
    /// LoRA adapter tools (merge an adapter into its model).
    #[command(subcommand)]
    Lora(model_cmds::LoraCmd),
    /// Reproducible experiments.
    #[command(subcommand)]
    Experiment(experiment_cmd::ExperimentCmd),
    /// The paper's reversal poem protocol on any checkpoint (meaningful with LLaDA-8B-Instruct).
    EvalReversal(experiment_cmd::EvalReversalArgs),
}

/// The model a command runs: a checkpoint folder, a hub id in the local Hugging Face cache, or
/// (when omitted) $LLADA_MODEL or the small model shipped in `models/`.
#[derive(Args, Debug, Clone)]
pub struct ModelArg {
    /// Checkpoint folder or hub id (owner/name, from the local HF cache); default: $LLADA_MODEL,
    /// else the shipped model.
    pub model: Option<String>,
}

impl ModelArg {
    pub fn resolve(&self) -> Result<PathBuf> {
        Ok(llada::hub::resolve(self.model.as_deref())?)
    }
}

/// Where and how a model runs.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// CPU threads (default: all cores; at most 4 per available core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A LoRA adapter folder (Hugging Face PEFT format: adapter_config.json and
    /// adapter_model.safetensors, e.g. a `llada train --lora-rank` checkpoint) merged into the
    /// model's weights as they load.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl RuntimeArgs {
    pub fn setup(&self) -> Result<(Device, RunDType)> {
        if let Some(n) = self.threads {
            llada::device::set_threads(n)?;
        }
        let device = llada::device::parse_device(&self.device)?;
        let dtype = match &self.dtype {
            Some(s) => s.parse::<RunDType>()?,
            None => RunDType::default_for(&device),
        };
        Ok((device, dtype))
    }

    pub fn load(&self, dir: &std::path::Path) -> Result<Checkpoint> {
        let (device, dtype) = self.setup()?;
        // a training run's folder stands for its last checkpoint
        let adapter = self
            .adapter
            .as_ref()
            .map(|a| llada::train::trainer::run_checkpoint(a).unwrap_or_else(|| a.clone()));
        let adapter = adapter.as_deref();
        crate::while_loading(|| {
            Checkpoint::load_with_adapter(dir, Some(dtype.dtype()), &device, adapter)
        })
        .with_context(|| match adapter {
            Some(a) => format!("loading {} with the adapter {}", dir.display(), a.display()),
            None => format!("loading {}", dir.display()),
        })
    }
}

pub fn init_logging(verbose: u8) {
    // the server's access log (one line per request) shows unless RUST_LOG says otherwise
    let default = match verbose {
        0 => "warn,llada::access=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => model_cmds::info(a),
        Command::Init(a) => model_cmds::init(a),
        Command::Forward(a) => model_cmds::forward(a),
        Command::Export(a) => model_cmds::export(a),
        Command::Generate(a) => sample_cmds::generate(a),
        Command::Chat(a) => sample_cmds::chat(a),
        Command::Infill(a) => sample_cmds::infill(a),
        Command::Bench(a) => bench_cmds::bench(a),
        Command::Score(a) => score_cmds::score_cmd(a),
        Command::Ppl(a) => score_cmds::ppl_cmd(a),
        Command::Eval(a) => score_cmds::eval_cmd(a),
        Command::EvalChat(a) => score_cmds::eval_chat_cmd(a),
        Command::Train(a) => train_cmds::train(a),
        Command::Tokenizer(c) => train_cmds::tokenizer(c),
        Command::Data(c) => train_cmds::data_cmd(c),
        Command::Plot(a) => train_cmds::plot(a),
        Command::Serve(a) => serve_cmd::serve(a),
        Command::Lora(c) => model_cmds::lora(c),
        Command::Experiment(c) => experiment_cmd::run(c),
        Command::EvalReversal(a) => experiment_cmd::eval_reversal(a),
    }
}

/// Parses "3,17,42" into ids.
pub fn parse_ids(s: &str, what: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("invalid {what}: {t:?} is not a non-negative integer"))
        })
        .collect()
}

/// Prints a value as one JSON line.
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every command says what it does (`--help` is the user's manual).
    #[test]
    fn every_flag_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "llada", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
