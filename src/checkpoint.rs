//! A checkpoint folder in Hugging Face form (config.json, safetensors, tokenizer files) loaded into
//! a ready model, and written back.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::config::{LladaConfig, ModelConfig};
use crate::device::dtype_name;
use crate::error::{Error, Result};
use crate::model::{Architecture, FileWeights, Model, WeightLayout};
use crate::tokenizer::{SpecialTokens, Tokenizer};
use crate::weights::{atomic_write, save_safetensors, SafetensorsFiles};

/// Files copied along with the weights when a checkpoint is re-written.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Shard size used when writing checkpoints (Hugging Face's default is 5 GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// A loaded checkpoint: config, model and (when present) tokenizer.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub raw: LladaConfig,
    pub config: ModelConfig,
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub special: SpecialTokens,
    /// Dtype(s) the weights are stored in, e.g. `bf16` or `f32`.
    pub stored_dtype: String,
    pub files: Vec<PathBuf>,
}

/// Reads and checks `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<(LladaConfig, ModelConfig)> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "not a folder (a checkpoint is a folder with config.json and safetensors)"
                .into(),
        });
    }
    if !path.exists() {
        return Err(Error::Checkpoint {
            path,
            reason: "config.json not found".into(),
        });
    }
    let raw = LladaConfig::from_file(&path)?;
    let cfg = raw.resolve()?;
    Ok((raw, cfg))
}

impl Checkpoint {
    /// Loads the checkpoint in `dir` onto `device` in `dtype` (`None`: f32 on CPU, bf16 on CUDA).
    pub fn load(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let (raw, config) = read_config(dir)?;
        let files = SafetensorsFiles::open(dir)?;
        let dtype = dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        });
        let arch = Architecture::from_name(&raw.architecture()?)?;
        let model = arch.load(
            &config,
            &FileWeights {
                files: &files,
                dtype,
                device,
            },
            WeightLayout::PackedForInference,
        )?;
        let mut stored: Vec<&str> = files
            .names()
            .filter_map(|n| files.stored_dtype(n))
            .map(dtype_name)
            .collect();
        stored.sort();
        stored.dedup();
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Tokenizer::from_dir(dir, &config)?)
        } else {
            None
        };
        let special = match &tokenizer {
            Some(t) => *t.special(),
            None => SpecialTokens::from_config(&config)?,
        };
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            raw,
            config,
            model,
            tokenizer,
            special,
            stored_dtype: stored.join("+"),
            files: files.paths().into_iter().map(Path::to_path_buf).collect(),
        })
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer.json (pass token ids instead)",
                self.dir.display()
            ))
        })
    }

    /// A summary for `llada info`.
    pub fn info(&self) -> Info {
        let tok = self.tokenizer.as_ref();
        let name = |id: Option<u32>| -> Option<SpecialInfo> {
            id.map(|id| SpecialInfo {
                id,
                token: tok.and_then(|t| t.id_to_token(id)),
            })
        };
        let s = &self.special;
        let params = self.config.parameter_count();
        Info {
            path: self.dir.clone(),
            architecture: self.raw.architecture().unwrap_or_default(),
            parameters: params,
            stored_dtype: self.stored_dtype.clone(),
            run_dtype: dtype_name(self.model.dtype()).to_string(),
            device: crate::device::device_name(self.model.device()),
            memory_bytes: self.model.weights_bytes(),
            d_model: self.config.d_model,
            n_layers: self.config.n_layers,
            n_heads: self.config.n_heads,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            mlp_hidden_size: self.config.mlp_hidden_size,
            vocab_size: self.config.vocab_size,
            embedding_size: self.config.embedding_size,
            max_sequence_length: self.config.max_sequence_length,
            rope_theta: self.config.rope_theta,
            weight_tying: self.config.weight_tying,
            causal: self.config.causal,
            files: self.files.clone(),
            tokenizer_vocab: tok.map(|t| t.vocab_size()),
            chat_template: tok.map(|t| t.chat_template().is_some()).unwrap_or(false),
            special_tokens: SpecialSet {
                mask: name(Some(s.mask)),
                bos: name(s.bos),
                eos: name(Some(s.eos)),
                pad: name(Some(s.pad)),
                eot: name(s.eot),
                start_header: name(s.start_header),
                end_header: name(s.end_header),
            },
        }
    }
}

/// A special token: id and its string.
#[derive(Debug, Clone, Serialize)]
pub struct SpecialInfo {
    pub id: u32,
    pub token: Option<String>,
}

/// The special tokens of a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct SpecialSet {
    pub mask: Option<SpecialInfo>,
    pub bos: Option<SpecialInfo>,
    pub eos: Option<SpecialInfo>,
    pub pad: Option<SpecialInfo>,
    pub eot: Option<SpecialInfo>,
    pub start_header: Option<SpecialInfo>,
    pub end_header: Option<SpecialInfo>,
}

/// What `llada info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub path: PathBuf,
    pub architecture: String,
    pub parameters: u64,
    pub stored_dtype: String,
    pub run_dtype: String,
    pub device: String,
    pub memory_bytes: u64,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub mlp_hidden_size: usize,
    pub vocab_size: usize,
    pub embedding_size: usize,
    pub max_sequence_length: usize,
    pub rope_theta: f32,
    pub weight_tying: bool,
    pub causal: bool,
    pub files: Vec<PathBuf>,
    pub tokenizer_vocab: Option<usize>,
    pub chat_template: bool,
    pub special_tokens: SpecialSet,
}

/// Writes `model` into `dir` in Hugging Face form: `config.json` (from `raw`) and safetensors in
/// the model's dtype (sharded above [`DEFAULT_SHARD_BYTES`]). Every file is written atomically.
pub fn save_model(dir: &Path, raw: &LladaConfig, model: &Model) -> Result<()> {
    save_model_sharded(dir, raw, model, DEFAULT_SHARD_BYTES)
}

/// [`save_model`] with a chosen shard size.
pub fn save_model_sharded(
    dir: &Path,
    raw: &LladaConfig,
    model: &Model,
    max_shard_bytes: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    save_safetensors(dir, &model.named_tensors()?, max_shard_bytes)?;
    write_config(dir, raw)
}

/// Writes `config.json` atomically.
pub fn write_config(dir: &Path, raw: &LladaConfig) -> Result<()> {
    let text = serde_json::to_string_pretty(raw).map_err(|e| Error::Checkpoint {
        path: dir.join("config.json"),
        reason: e.to_string(),
    })?;
    atomic_write(&dir.join("config.json"), text.as_bytes())
}

/// Copies the tokenizer files that exist in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            atomic_write(&to.join(f), &bytes)?;
        }
    }
    Ok(())
}
