//! `llada info`, `llada init`, `llada forward`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use llada::candle_core::{DType, Device, Tensor};
use llada::checkpoint::{
    check_output_folder, copy_tokenizer_files, save_model_into, write_checkpoint_folder, Existing,
    DEFAULT_SHARD_BYTES,
};
use llada::RawConfig;

use super::{parse_ids, print_json, ModelArg, RuntimeArgs};

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

fn human_count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2}M", f / 1e6)
    } else {
        format!("{:.1}K", f / 1e3)
    }
}

pub fn info(a: InfoArgs) -> Result<()> {
    let ck = a.rt.load(&a.model.resolve()?)?;
    let i = ck.info();
    if a.json {
        return print_json(&i);
    }
    println!("checkpoint      {}", i.path.display());
    if let Some(a) = &i.adapter {
        println!("adapter         {} (LoRA, merged at load)", a.display());
    }
    println!(
        "architecture    {}{}",
        i.architecture,
        if i.causal {
            " (causal: autoregressive twin)"
        } else if i.architecture == "LLaDA2MoeModelLM" {
            " (block diffusion: bidirectional within a block, causal between blocks)"
        } else {
            " (bidirectional mask predictor)"
        }
    );
    println!(
        "parameters      {} ({})",
        i.parameters,
        human_count(i.parameters)
    );
    println!(
        "shape           d_model {} · layers {} · heads {} (kv {}, head dim {}) · mlp {} · vocab {} (logits {})",
        i.d_model, i.n_layers, i.n_heads, i.n_kv_heads, i.head_dim, i.mlp_hidden_size, i.vocab_size, i.embedding_size
    );
    if let Some(e) = &i.experts {
        println!(
            "experts         {} per layer, top {} · expert size {} · {} of {} layers{}{} · {} active parameters ({})",
            e.num_experts,
            e.top_k,
            e.expert_size,
            e.moe_layers,
            i.n_layers,
            e.shared_expert_size
                .map(|f| format!(" · shared expert {f}"))
                .unwrap_or_default(),
            if i.qk_norm { " · QK norm" } else { "" },
            i.active_parameters,
            human_count(i.active_parameters)
        );
    }
    println!(
        "context         {} tokens · rope θ {} · tied head {}{}",
        i.max_sequence_length,
        i.rope_theta,
        i.weight_tying,
        if i.mask_padding {
            ""
        } else {
            " · padding not masked (as the official forward)"
        }
    );
    println!("stored dtype    {}", i.stored_dtype);
    println!(
        "run             {} on {} · {} in memory",
        i.run_dtype,
        i.device,
        human_bytes(i.memory_bytes)
    );
    let files: Vec<String> = i
        .files
        .iter()
        .map(|p| {
            p.file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default()
        })
        .collect();
    println!("weights         {}", files.join(", "));
    match i.tokenizer_vocab {
        Some(v) => println!(
            "tokenizer       {v} tokens · chat template: {}",
            if i.chat_template { "yes" } else { "no" }
        ),
        None => println!("tokenizer       none (token ids only)"),
    }
    let s = &i.special_tokens;
    println!("special tokens");
    for (label, t) in [
        ("mask", &s.mask),
        ("bos", &s.bos),
        ("eos", &s.eos),
        ("pad", &s.pad),
        ("eot", &s.eot),
        ("start_header", &s.start_header),
        ("end_header", &s.end_header),
    ] {
        match t {
            Some(t) => println!(
                "  {label:<13} {:>7}  {}",
                t.id,
                t.token.as_deref().unwrap_or("")
            ),
            None => println!("  {label:<13}       -"),
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// A config.json to build the model from (LLaDA keys; unknown keys are kept out).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stored dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Copy tokenizer files (tokenizer.json, tokenizer_config.json, …) from this folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Shard the safetensors above this many bytes (default 5e9, as Hugging Face).
    #[arg(long)]
    pub max_shard_bytes: Option<u64>,
    /// Write into a non-empty --out (an existing checkpoint is replaced; its other files are
    /// kept; nothing outside --out is touched).
    #[arg(long)]
    pub force: bool,
}

pub fn init(a: InitArgs) -> Result<()> {
    let raw = RawConfig::from_file(&a.config)?;
    let cfg = raw.resolve()?;
    let dtype: llada::RunDType = a.dtype.parse()?;
    let existing = if a.force {
        Existing::Any
    } else {
        Existing::Refuse
    };
    check_output_folder(&a.out, existing)?;
    eprintln!(
        "initialising {} parameters (N(0, {}²), seed {})…",
        cfg.parameter_count(),
        cfg.init_std,
        a.seed
    );
    // tensor by tensor, shard by shard: an 8B-shaped checkpoint never sits in memory whole
    let specs: Vec<(String, Vec<usize>, DType)> = llada::model::tensor_specs(&cfg)
        .into_iter()
        .map(|(n, s)| (n, s, dtype.dtype()))
        .collect();
    let mut rng = llada::Rng::new(a.seed);
    write_checkpoint_folder(&a.out, existing, |tmp| {
        llada::weights::save_safetensors_with(
            tmp,
            &specs,
            a.max_shard_bytes.unwrap_or(DEFAULT_SHARD_BYTES),
            &mut |name, shape| {
                llada::model::initial_tensor(
                    &cfg,
                    name,
                    shape,
                    dtype.dtype(),
                    &Device::Cpu,
                    &mut rng,
                )
            },
        )?;
        llada::checkpoint::write_config(tmp, &raw)?;
        match &a.tokenizer {
            Some(t) => copy_tokenizer_files(t, tmp),
            None => Ok(()),
        }
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} ({} parameters, {})",
        a.out.display(),
        cfg.parameter_count(),
        dtype
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Token ids, comma-separated; several sequences of equal length separated by ';'.
    #[arg(long)]
    pub ids: String,
    /// Key-padding mask (1 = token, 0 = padding), same layout as --ids.
    #[arg(long)]
    pub attention_mask: Option<String>,
    /// Write the logits [B, L, V] (f32) to this safetensors file under the name "logits".
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print {"logits": [[…]]} (first sequence) as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

fn parse_rows(s: &str, what: &str) -> Result<Vec<Vec<u32>>> {
    let rows: Vec<Vec<u32>> = s
        .split(';')
        .map(|r| parse_ids(r, what))
        .collect::<Result<_>>()?;
    let len = rows.first().map(|r| r.len()).unwrap_or(0);
    if len == 0 || rows.iter().any(|r| r.len() != len) {
        bail!("invalid {what}: every sequence must be non-empty and of the same length");
    }
    Ok(rows)
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    if a.out.is_none() && !a.json {
        bail!("say where the logits go: --out FILE.safetensors or --json");
    }
    let ck = a.rt.load(&a.model.resolve()?)?;
    let rows = parse_rows(&a.ids, "--ids")?;
    let (b, l) = (rows.len(), rows[0].len());
    let v = ck.config.embedding_size as u32;
    if let Some(bad) = rows.iter().flatten().find(|&&t| t >= v) {
        bail!("invalid --ids: token {bad} is outside the vocabulary (embedding_size {v})");
    }
    let device = ck.model.device().clone();
    let ids = Tensor::from_vec(rows.concat(), (b, l), &device)?;
    let mask = match &a.attention_mask {
        Some(m) => {
            let m = parse_rows(m, "--attention-mask")?;
            if m.len() != b || m[0].len() != l {
                bail!("--attention-mask must have the shape of --ids ({b}x{l})");
            }
            if let Some(bad) = m.iter().flatten().find(|&&x| x > 1) {
                bail!("invalid --attention-mask: {bad} (values are 0 or 1)");
            }
            Some(Tensor::from_vec(m.concat(), (b, l), &device)?)
        }
        None => None,
    };
    let logits = ck
        .model
        .forward(&ids, mask.as_ref())?
        .to_dtype(DType::F32)?;
    if let Some(out) = &a.out {
        let bytes = llada::weights::safetensors_bytes(&[("logits".to_string(), logits.clone())])?;
        llada::weights::atomic_write(out, &bytes)?;
        eprintln!("wrote logits {:?} to {}", logits.dims(), out.display());
    }
    if a.json {
        let first: Vec<Vec<f32>> = logits.get(0)?.to_vec2()?;
        print_json(&serde_json::json!({ "logits": first }))?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint folder to export (default: as for every command).
    #[command(flatten)]
    pub model: ModelArg,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Shard the safetensors above this many bytes.
    #[arg(long)]
    pub max_shard_bytes: Option<u64>,
    /// Write into a non-empty --out that holds no llada checkpoint (its files are kept, except
    /// config.json and weights; nothing outside --out is touched). An existing checkpoint in
    /// --out is replaced without it.
    #[arg(long)]
    pub force: bool,
}

/// Re-writes a checkpoint (e.g. a training checkpoint) in Hugging Face form with the chosen
/// stored dtype, tokenizer files included.
pub fn export(a: ExportArgs) -> Result<()> {
    let dtype: llada::RunDType = a.dtype.parse()?;
    let src = a.model.resolve()?;
    let (raw, cfg) = llada::checkpoint::read_config(&src)?;
    let files = llada::weights::SafetensorsFiles::open(&src)?;
    let model = llada::model::Architecture::from_name(&raw.architecture()?)?.load(
        &cfg,
        &llada::model::FileWeights {
            files: &files,
            dtype: dtype.dtype(),
            device: &Device::Cpu,
        },
        llada::model::WeightLayout::Dense,
    )?;
    save_model_into(
        &a.out,
        &raw,
        &model,
        a.max_shard_bytes.unwrap_or(DEFAULT_SHARD_BYTES),
        Some(&src),
        if a.force {
            Existing::Any
        } else {
            Existing::ReplaceCheckpoint
        },
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} ({}, {} parameters)",
        a.out.display(),
        dtype,
        cfg.parameter_count()
    );
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum LoraCmd {
    /// Merge a LoRA adapter into its model: W + (α/r)·B·A for every adapted weight, written as
    /// a full checkpoint in the model's stored dtypes (tokenizer files included).
    Merge(LoraMergeArgs),
}

#[derive(Args, Debug)]
pub struct LoraMergeArgs {
    /// The base model: checkpoint folder or hub id.
    pub model: String,
    /// The adapter folder (PEFT format: adapter_config.json, adapter_model.safetensors), or a
    /// LoRA training run (its last checkpoint).
    pub adapter: PathBuf,
    /// Output folder (new or empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn lora(c: LoraCmd) -> Result<()> {
    match c {
        LoraCmd::Merge(a) => {
            let model = llada::hub::resolve(Some(&a.model))?;
            let adapter = llada::train::trainer::run_checkpoint(&a.adapter)
                .unwrap_or_else(|| a.adapter.clone());
            let out = llada::model::lora::merge(&model, &adapter, &a.out).with_context(|| {
                format!("merging {} into {}", a.adapter.display(), model.display())
            })?;
            println!(
                "wrote {} ({} with {} merged)",
                out.display(),
                model.display(),
                a.adapter.display()
            );
            Ok(())
        }
    }
}
