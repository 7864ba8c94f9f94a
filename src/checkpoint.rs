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
use crate::weights::{
    atomic_write, is_weight_file_name, save_safetensors, SafetensorsFiles, INDEX_FILE, SINGLE_FILE,
};

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

/// What a checkpoint writer may find in its output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Only a missing or empty folder (`llada init` without `--force`).
    Refuse,
    /// A missing or empty folder, or one holding a llada checkpoint (`config.json` and
    /// `model.safetensors` or its index), which is replaced (`llada export`, [`save_model`]).
    ReplaceCheckpoint,
    /// Any folder (`--force`).
    Any,
}

/// Writes `model` into `dir` in Hugging Face form: `config.json` (from `raw`) and safetensors in
/// the model's dtype (sharded above [`DEFAULT_SHARD_BYTES`]), through [`write_checkpoint_folder`]
/// (an existing checkpoint in `dir` is replaced; a folder of other files is refused).
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
    save_model_into(
        dir,
        raw,
        model,
        max_shard_bytes,
        None,
        Existing::ReplaceCheckpoint,
    )
}

/// [`save_model`] with every choice: shard size, a folder whose tokenizer files go along, and
/// what may already be in `dir`.
pub fn save_model_into(
    dir: &Path,
    raw: &LladaConfig,
    model: &Model,
    max_shard_bytes: u64,
    tokenizer_from: Option<&Path>,
    existing: Existing,
) -> Result<()> {
    write_checkpoint_folder(dir, existing, |tmp| {
        save_safetensors(tmp, &model.named_tensors()?, max_shard_bytes)?;
        write_config(tmp, raw)?;
        match tokenizer_from {
            Some(t) => copy_tokenizer_files(t, tmp),
            None => Ok(()),
        }
    })
}

fn output_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::OutputFolder {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether `dir` holds a llada checkpoint: `config.json` and `model.safetensors` or its index.
pub fn is_checkpoint_folder(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && (dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file())
}

/// The folder a writer targets: `out` itself, or, when `out` is a symbolic link to a folder, that
/// folder (so the link stays and the checkpoint lands where it points).
fn resolve_output(out: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(out) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(out).map_err(|e| Error::io(out, e))
        }
        Ok(_) if out.file_name().is_none() => {
            std::fs::canonicalize(out).map_err(|e| Error::io(out, e))
        }
        _ => {
            if out.file_name().is_none() {
                return Err(output_error(out, "has no folder name"));
            }
            Ok(out.to_path_buf())
        }
    }
}

/// Checks `out` against `existing` (what [`write_checkpoint_folder`] checks first, for a caller
/// that wants to refuse before long work); returns whether it exists (as a folder).
pub fn check_output_folder(out: &Path, existing: Existing) -> Result<bool> {
    check_output(&resolve_output(out)?, existing)
}

fn check_output(out: &Path, existing: Existing) -> Result<bool> {
    let meta = match std::fs::metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(out, e)),
    };
    if !meta.is_dir() {
        return Err(output_error(out, "is a file, not a folder"));
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_none() {
        return Ok(true);
    }
    let checkpoint = is_checkpoint_folder(out);
    let kept = "its other files are kept; config.json and weights are replaced";
    match existing {
        Existing::Any => Ok(true),
        Existing::ReplaceCheckpoint if checkpoint => Ok(true),
        Existing::Refuse if checkpoint => Err(output_error(
            out,
            format!("already holds a checkpoint; refusing to replace it without --force ({kept})"),
        )),
        _ => Err(output_error(
            out,
            format!(
                "is not empty and holds no llada checkpoint (config.json and {SINGLE_FILE} or {INDEX_FILE}); refusing to write into it without --force ({kept})"
            ),
        )),
    }
}

/// A sibling of `path` named `.NAME.TAG-PID-N` that does not exist yet.
fn fresh_sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    for n in 0..10_000 {
        let p = parent.join(format!(".{name}.{tag}-{}-{n}", std::process::id()));
        if std::fs::symlink_metadata(&p).is_err() {
            return Ok(p);
        }
    }
    Err(output_error(path, "no free temporary name next to it"))
}

/// Writes a checkpoint folder `out`: `write` fills a fresh, empty folder it is given, which then
/// takes the place of `out`.
///
/// 1. The new checkpoint is written into a hidden sibling `.NAME.new-PID-N`.
/// 2. An existing `out` (allowed by `existing`) is renamed aside to `.NAME.old-PID-N`; those of
///    its entries the new checkpoint does not supersede are moved into the new folder (superseded:
///    `config.json`, weight files, temporary files of an interrupted write, and names the new
///    checkpoint has), and the new folder is renamed to `out`.
/// 3. The old folder, holding only superseded files, is removed.
///
/// Nothing outside `out` is read for deletion or deleted: whatever an old index names, only
/// entries of `out` itself are removed, and symbolic links are moved or removed, never followed.
/// A failure puts `out` back as it was and removes the new folder; a kill during step 2 leaves
/// both folders under those names, with nothing deleted.
pub fn write_checkpoint_folder(
    out: &Path,
    existing: Existing,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let out = resolve_output(out)?;
    let exists = check_output(&out, existing)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let new = fresh_sibling(&out, "new")?;
    std::fs::create_dir(&new).map_err(|e| Error::io(&new, e))?;
    if let Err(e) = write(&new) {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e);
    }
    let installed = if exists {
        install_folder(&new, &out, true)
    } else {
        std::fs::rename(&new, &out).map_err(|e| Error::io(&out, e))
    };
    if installed.is_err() {
        let _ = std::fs::remove_dir_all(&new);
    }
    installed
}

/// Puts the complete folder `new` in the place of the existing folder `out` (see
/// [`write_checkpoint_folder`]); with `carry_over`, entries of `out` that `new` does not supersede
/// move into it. On failure `out` is as it was and `new` is left to the caller.
pub(crate) fn install_folder(new: &Path, out: &Path, carry_over: bool) -> Result<()> {
    let old = fresh_sibling(out, "old")?;
    std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    let mut moved: Vec<std::ffi::OsString> = Vec::new();
    let undo = |moved: &[std::ffi::OsString]| {
        for name in moved {
            let _ = std::fs::rename(new.join(name), old.join(name));
        }
        let _ = std::fs::rename(&old, out);
    };
    if carry_over {
        let entries = match std::fs::read_dir(&old) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
            Err(e) => {
                undo(&moved);
                return Err(Error::io(&old, e));
            }
        };
        let entries: Vec<std::ffi::OsString> = entries;
        for name in entries {
            if superseded(&name, new) {
                continue;
            }
            if let Err(e) = std::fs::rename(old.join(&name), new.join(&name)) {
                undo(&moved);
                return Err(Error::io(old.join(&name), e));
            }
            moved.push(name);
        }
    }
    if let Err(e) = std::fs::rename(new, out) {
        undo(&moved);
        return Err(Error::io(out, e));
    }
    if let Err(e) = std::fs::remove_dir_all(&old) {
        tracing::warn!(
            "{}: the replaced checkpoint could not be removed ({e}); delete it by hand",
            old.display()
        );
    }
    Ok(())
}

/// Whether an entry of a replaced folder goes with it (instead of moving into the new folder).
fn superseded(name: &std::ffi::OsStr, new: &Path) -> bool {
    let s = name.to_string_lossy();
    s == "config.json"
        || is_weight_file_name(&s)
        || (s.starts_with('.') && s.ends_with(".tmp"))
        || std::fs::symlink_metadata(new.join(name)).is_ok()
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
