//! A checkpoint folder in Hugging Face form (config.json, safetensors, tokenizer files) loaded into
//! a ready model, and written back.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::config::{ModelConfig, RawConfig};
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
    // the slow Qwen2-style tokenizer of Dream's repositories
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    // sampler defaults next to the weights (Dream's from_pretrained requires the file)
    "generation_config.json",
];

/// Shard size used when writing checkpoints (Hugging Face's default is 5 GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// A loaded checkpoint: config, model and (when present) tokenizer.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub raw: RawConfig,
    pub config: ModelConfig,
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub special: SpecialTokens,
    /// Dtype(s) the weights are stored in, e.g. `bf16` or `f32`.
    pub stored_dtype: String,
    pub files: Vec<PathBuf>,
    /// The LoRA adapter merged into the weights at load, if any.
    pub adapter: Option<PathBuf>,
}

/// Reads and checks `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<(RawConfig, ModelConfig)> {
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
    let raw = RawConfig::from_file(&path)?;
    let cfg = raw.resolve()?;
    Ok((raw, cfg))
}

impl Checkpoint {
    /// Loads the checkpoint in `dir` onto `device` in `dtype` (`None`: f32 on CPU, bf16 on CUDA).
    /// A LoRA adapter folder (PEFT's `adapter_config.json`, e.g. a LoRA run's checkpoint) loads
    /// as its base model (`base_model_name_or_path`) with the adapter merged.
    pub fn load(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
        Self::load_with_adapter(dir, dtype, device, None)
    }

    /// [`Checkpoint::load`] with the LoRA adapter in `adapter` (a PEFT folder) merged into the
    /// weights as they load: W + s·B·A, rounded once to the run dtype; the model then runs at
    /// the base model's speed.
    pub fn load_with_adapter(
        dir: &Path,
        dtype: Option<DType>,
        device: &Device,
        adapter: Option<&Path>,
    ) -> Result<Self> {
        use crate::model::lora::{AdaptedWeights, Adapter, ADAPTER_CONFIG};
        if !dir.join("config.json").exists() && dir.join(ADAPTER_CONFIG).is_file() {
            if let Some(other) = adapter {
                return Err(Error::setting(
                    "adapter",
                    other.display(),
                    format!(
                        "{} is itself an adapter: give its base model and --adapter {}, or it alone",
                        dir.display(),
                        dir.display()
                    ),
                ));
            }
            let peft: crate::model::lora::PeftConfig =
                crate::error::read_json(&dir.join(ADAPTER_CONFIG))?;
            let Some(base) = peft.base_model_name_or_path.as_deref() else {
                return Err(Error::Checkpoint {
                    path: dir.join(ADAPTER_CONFIG),
                    reason:
                        "field base_model_name_or_path is absent: give the base model and --adapter"
                            .into(),
                });
            };
            let base = crate::hub::resolve(Some(base)).map_err(|e| Error::Checkpoint {
                path: dir.join(ADAPTER_CONFIG),
                reason: format!("its base model (base_model_name_or_path) cannot be found: {e}"),
            })?;
            return Self::load_with_adapter(&base, dtype, device, Some(dir));
        }
        let (raw, config) = read_config(dir)?;
        let files = SafetensorsFiles::open(dir)?;
        let dtype = dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        });
        let arch = Architecture::from_name(&raw.architecture()?)?;
        let src = FileWeights {
            files: &files,
            dtype,
            device,
        };
        let model = match adapter {
            None => arch.load(&config, &src, WeightLayout::PackedForInference)?,
            Some(a) => {
                let ad = Adapter::load(a, device)?;
                let adapted = AdaptedWeights::new(&src, &ad, dtype);
                let m = arch.load(&config, &adapted, WeightLayout::PackedForInference)?;
                adapted.finish()?;
                m
            }
        };
        let mut stored: Vec<&str> = files
            .names()
            .filter_map(|n| files.stored_dtype(n))
            .map(dtype_name)
            .collect();
        stored.sort();
        stored.dedup();
        let tokenizer = if crate::tokenizer::present(dir) {
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
            adapter: adapter.map(Path::to_path_buf),
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
            adapter: self.adapter.clone(),
            architecture: self.raw.architecture().unwrap_or_default(),
            parameters: params,
            active_parameters: self.config.active_parameter_count(),
            experts: self.config.moe.as_ref().map(|m| ExpertInfo {
                num_experts: m.num_experts,
                top_k: m.top_k,
                expert_size: m.expert_size,
                moe_layers: m.layers.iter().filter(|&&x| x).count(),
                shared_expert_size: m.shared_expert_size,
            }),
            qk_norm: self.config.qk_norm,
            qkv_bias: self.config.qkv_bias,
            logits_shift: self.config.logits_shift,
            mask_padding: self.config.mask_padding,
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

/// The mixture-of-experts shape of a model.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertInfo {
    pub num_experts: usize,
    pub top_k: usize,
    pub expert_size: usize,
    /// Layers that are mixtures of experts (the others are dense).
    pub moe_layers: usize,
    pub shared_expert_size: Option<usize>,
}

/// What `llada info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub path: PathBuf,
    /// The LoRA adapter merged into the weights at load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    pub architecture: String,
    pub parameters: u64,
    /// Parameters one token's forward multiplies with (the routed experts only; no embedding).
    pub active_parameters: u64,
    pub experts: Option<ExpertInfo>,
    /// RMSNorm of each query and key head before RoPE.
    pub qk_norm: bool,
    /// Biases on the query/key/value projections (Dream).
    pub qkv_bias: bool,
    /// Position i's prediction is read from output i − 1 (Dream).
    pub logits_shift: bool,
    /// Whether key-padding masks are honoured (LLaDA-MoE: off, as its official forward).
    pub mask_padding: bool,
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
    /// A missing or empty folder, or one holding a llada checkpoint (see
    /// [`is_checkpoint_folder`]), which is replaced (`llada export`, [`save_model`]).
    ReplaceCheckpoint,
    /// Any folder (`--force`).
    Any,
}

/// Writes `model` into `dir` in Hugging Face form: `config.json` (from `raw`) and safetensors in
/// the model's dtype (sharded above [`DEFAULT_SHARD_BYTES`]), through [`write_checkpoint_folder`]
/// (an existing checkpoint in `dir` is replaced; a folder of other files is refused).
pub fn save_model(dir: &Path, raw: &RawConfig, model: &Model) -> Result<()> {
    save_model_sharded(dir, raw, model, DEFAULT_SHARD_BYTES)
}

/// [`save_model`] with a chosen shard size.
pub fn save_model_sharded(
    dir: &Path,
    raw: &RawConfig,
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
    raw: &RawConfig,
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

/// Whether `dir` holds a llada checkpoint: a `config.json` that parses as a model config naming a
/// supported architecture, and `model.safetensors` or its index. (Another model's Hugging Face
/// folder, e.g. a BERT, is not one.)
pub fn is_checkpoint_folder(dir: &Path) -> bool {
    (dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file())
        && dir.join("config.json").is_file()
        && read_config(dir).is_ok_and(|(raw, _)| {
            raw.architecture()
                .is_ok_and(|a| Architecture::from_name(&a).is_ok())
        })
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
    // the temporary folders of an earlier (killed) write do not make a folder non-empty
    let empty = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok())
        .all(|e| temp_folder_pid(&e.file_name().to_string_lossy()).is_some());
    if empty {
        return Ok(true);
    }
    // a write killed while it moved files leaves a mixed folder and its `.llada-old-*` folder:
    // still a checkpoint (being replaced), so the next write may finish the job
    let interrupted = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.starts_with(OLD_PREFIX)
                && temp_folder_pid(&name).is_some_and(|p| !other_process_running(p))
        });
    let checkpoint = interrupted || is_checkpoint_folder(out);
    let kept = "its other files are kept; config.json, weights and tokenizer files are replaced";
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
                "is not empty and holds no llada checkpoint (config.json naming a supported architecture, and {SINGLE_FILE} or {INDEX_FILE}); refusing to write into it without --force ({kept})"
            ),
        )),
    }
}

/// Whether the process `pid` (not this one) is running. This process's own id counts as not
/// running: a leftover under its id is from an earlier process that had the same id (a container
/// restarted), since writers clean up before they return. Where it cannot be told (not unix),
/// every other process counts as running, so nothing of theirs is removed.
pub(crate) fn other_process_running(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    #[cfg(unix)]
    {
        match libc::pid_t::try_from(pid) {
            // 0 or negative would name a process group
            Ok(p) if p > 0 => {
                // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
                let r = unsafe { libc::kill(p, 0) };
                r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
            }
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// The temporary folders a write into an existing folder makes there: `.llada-new-PID-N` (the
/// checkpoint being written) and `.llada-old-PID-N` (the entries it supersedes, until removed).
const NEW_PREFIX: &str = ".llada-new-";
const OLD_PREFIX: &str = ".llada-old-";

/// The writer's process id in a temporary folder name `.llada-{new,old}-PID-N`.
fn temp_folder_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(NEW_PREFIX)
        .or_else(|| name.strip_prefix(OLD_PREFIX))?;
    let (pid, n) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    (digits(pid) && digits(n)).then(|| pid.parse().ok())?
}

/// A name `PREFIX-PID-N` (or, for a sibling, `.NAME.TAG-PID-N`) in `dir` that does not exist yet.
fn fresh_name(dir: &Path, stem: &str) -> Result<PathBuf> {
    for n in 0..10_000 {
        let p = dir.join(format!("{stem}{}-{n}", std::process::id()));
        if std::fs::symlink_metadata(&p).is_err() {
            return Ok(p);
        }
    }
    Err(output_error(
        dir,
        format!("no free temporary name {stem}* in it"),
    ))
}

/// Removes a temporary folder this writer made: its plain files and symbolic links (never
/// followed), then the folder. A subfolder (which a writer never makes) is left, and so is the
/// folder then, with a warning.
fn remove_temp_folder(dir: &Path) {
    let mut ok = true;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            ok &= !is_dir && std::fs::remove_file(e.path()).is_ok();
        }
    }
    if !ok || std::fs::remove_dir(dir).is_err() {
        tracing::warn!(
            "{}: a temporary folder of a checkpoint write could not be removed; delete it by hand",
            dir.display()
        );
    }
}

/// Removes the temporary folders of writes into `out` by processes no longer running, whose
/// name starts with `prefix` (`.llada-new-`/`.llada-old-`).
fn clean_stale_temp_folders(out: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(out) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        let stale = name.starts_with(prefix)
            && temp_folder_pid(&name).is_some_and(|pid| !other_process_running(pid));
        if stale && e.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::warn!(
                "removing {} (left by an interrupted write)",
                e.path().display()
            );
            remove_temp_folder(&e.path());
        }
    }
}

/// Removes the hidden siblings `.NAME.new-PID-N` that writes of a not-yet-existing `out` killed
/// mid-write left, by processes no longer running.
fn clean_stale_siblings(out: &Path) {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let stem = format!(".{}.new-", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let entry = e.file_name().to_string_lossy().to_string();
        let Some(rest) = entry.strip_prefix(&stem) else {
            continue;
        };
        let pid = rest
            .split_once('-')
            .filter(|(p, n)| {
                [p, n]
                    .iter()
                    .all(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            })
            .and_then(|(p, _)| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !other_process_running(p)) && e.file_type().is_ok_and(|t| t.is_dir())
        {
            tracing::warn!(
                "removing {} (left by an interrupted write)",
                e.path().display()
            );
            remove_temp_folder(&e.path());
        }
    }
}

/// `std::fs::rename`; in unit tests, it can be made to fail from the N-th call on.
fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::rename_fails() {
        return Err(std::io::Error::other("injected rename failure"));
    }
    std::fs::rename(from, to)
}

/// Writes a checkpoint folder `out`: `write` fills a fresh, empty folder it is given, whose
/// entries then take their place in `out`.
///
/// - `out` does not exist: the checkpoint is written into a hidden sibling `.NAME.new-PID-N`,
///   renamed to `out` when complete (a kill leaves no `out`; the sibling is removed by the next
///   write of `out`).
/// - `out` exists (empty, a checkpoint, or anything with [`Existing::Any`]): `out` itself is
///   never renamed (it may be a mount point or the working folder). The checkpoint is written into
///   `out/.llada-new-PID-N`; the entries of `out` it supersedes (`config.json`, weight files,
///   temporary files of `atomic_write`s there, and names the new checkpoint has) are moved into
///   `out/.llada-old-PID-N`, the new entries are moved in, and both temporary folders are removed.
///   The user's other files never move. A failure moves everything back; if even that fails, both
///   temporary folders are left as they are (nothing is deleted) and the error says so. The next
///   write into `out` removes the temporary folders of writes by processes no longer running.
///
/// Nothing outside `out` is read for deletion or deleted: whatever an old index names, only
/// entries of `out` itself are moved, symbolic links are moved or removed, never followed, and a
/// folder is never removed with what is in it.
pub fn write_checkpoint_folder(
    out: &Path,
    existing: Existing,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let out = resolve_output(out)?;
    if check_output(&out, existing)? {
        return install_in_place(&out, write);
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    clean_stale_siblings(&out);
    let stem = format!(
        ".{}.new-",
        out.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    );
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let new = fresh_name(parent, &stem)?;
    std::fs::create_dir(&new).map_err(|e| Error::io(&new, e))?;
    let written = write(&new).and_then(|()| rename(&new, &out).map_err(|e| Error::io(&out, e)));
    if written.is_err() {
        // it holds only what `write` wrote
        remove_temp_folder(&new);
    }
    written
}

/// The part of [`write_checkpoint_folder`] for an existing `out`.
fn install_in_place(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    clean_stale_temp_folders(out, NEW_PREFIX);
    let new = fresh_name(out, NEW_PREFIX)?;
    std::fs::create_dir(&new).map_err(|e| Error::io(&new, e))?;
    let names = |dir: &Path| -> Result<Vec<std::ffi::OsString>> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        Ok(rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
    };
    let prepared = write(&new).and_then(|()| {
        let incoming = names(&new)?;
        let aside: Vec<std::ffi::OsString> = names(out)?
            .into_iter()
            .filter(|n| temp_folder_pid(&n.to_string_lossy()).is_none())
            .filter(|n| superseded(n, &incoming))
            .collect();
        // a folder is never moved aside (to be removed): it cannot be a file the writer supersedes
        if let Some(d) = aside
            .iter()
            .find(|n| std::fs::symlink_metadata(out.join(n)).is_ok_and(|m| m.is_dir()))
        {
            return Err(output_error(
                out,
                format!(
                    "holds a folder named {} where the checkpoint has a file; move it away",
                    d.to_string_lossy()
                ),
            ));
        }
        Ok((incoming, aside))
    });
    let (incoming, aside) = match prepared {
        Ok(p) => p,
        Err(e) => {
            remove_temp_folder(&new);
            return Err(e);
        }
    };
    let old = match fresh_name(out, OLD_PREFIX).and_then(|p| {
        std::fs::create_dir(&p)
            .map(|()| p.clone())
            .map_err(|e| Error::io(&p, e))
    }) {
        Ok(p) => p,
        Err(e) => {
            remove_temp_folder(&new);
            return Err(e);
        }
    };
    let mut moved_aside = Vec::new();
    let mut moved_in = Vec::new();
    let mut swap = || -> Result<()> {
        for n in &aside {
            rename(&out.join(n), &old.join(n)).map_err(|e| Error::io(out.join(n), e))?;
            moved_aside.push(n);
        }
        for n in &incoming {
            rename(&new.join(n), &out.join(n)).map_err(|e| Error::io(out.join(n), e))?;
            moved_in.push(n);
        }
        Ok(())
    };
    if let Err(e) = swap() {
        let mut undone = true;
        for n in moved_in.iter().rev() {
            undone &= rename(&out.join(n), &new.join(n)).is_ok();
        }
        for n in moved_aside.iter().rev() {
            undone &= rename(&old.join(n), &out.join(n)).is_ok();
        }
        if !undone {
            return Err(output_error(
                out,
                format!(
                    "installing the checkpoint failed ({e}) and could not be undone: the files it replaced are in {}, the new ones in {} and {}; nothing was deleted",
                    old.display(),
                    new.display(),
                    out.display()
                ),
            ));
        }
        remove_temp_folder(&new);
        remove_temp_folder(&old);
        return Err(e);
    }
    remove_temp_folder(&new);
    remove_temp_folder(&old);
    clean_stale_temp_folders(out, OLD_PREFIX);
    if let Ok(d) = std::fs::File::open(out) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether an entry of an existing folder is replaced by a checkpoint written into it (moved
/// aside and removed): `config.json`, weight files, the temporary files of an `atomic_write` of
/// these or of tokenizer files (`.NAME.PID.tmp`), and names the new checkpoint has.
fn superseded(name: &std::ffi::OsStr, incoming: &[std::ffi::OsString]) -> bool {
    let s = name.to_string_lossy();
    let own =
        |f: &str| f == "config.json" || is_weight_file_name(f) || TOKENIZER_FILES.contains(&f);
    let atomic_temp = s
        .strip_prefix('.')
        .and_then(|r| r.strip_suffix(".tmp"))
        .and_then(|r| r.rsplit_once('.'))
        .is_some_and(|(f, pid)| {
            own(f) && !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit())
        });
    s == "config.json"
        || is_weight_file_name(&s)
        || atomic_temp
        || incoming.iter().any(|n| n == name)
}

/// Writes `config.json` atomically.
pub fn write_config(dir: &Path, raw: &RawConfig) -> Result<()> {
    let text = serde_json::to_string_pretty(raw).map_err(|e| Error::Checkpoint {
        path: dir.join("config.json"),
        reason: e.to_string(),
    })?;
    atomic_write(&dir.join("config.json"), text.as_bytes())
}

/// The tokenizer files ([`TOKENIZER_FILES`]) of the first of `dirs` that has a tokenizer
/// ([`crate::tokenizer::present`]), read into memory (name, bytes); none when no folder has one.
pub fn read_tokenizer_files(dirs: &[&Path]) -> Result<Vec<(String, Vec<u8>)>> {
    let Some(dir) = dirs.iter().find(|d| crate::tokenizer::present(d)) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for f in TOKENIZER_FILES {
        let p = dir.join(f);
        if p.exists() {
            files.push((
                f.to_string(),
                crate::error::read_regular_file(&p, crate::error::TOKENIZER_FILE_LIMIT)?,
            ));
        }
    }
    Ok(files)
}

/// Copies the tokenizer files that exist in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for (name, bytes) in read_tokenizer_files(&[from])? {
        atomic_write(&to.join(name), &bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::BTreeMap;

    thread_local! {
        /// (the index of the first rename that fails, whether every later one fails too)
        static FAIL: Cell<Option<(usize, bool)>> = const { Cell::new(None) };
        static CALLS: Cell<usize> = const { Cell::new(0) };
    }

    /// A FIFO among the tokenizer files a checkpoint carries is an error at once (reading it
    /// blocked until a writer came, hanging a training run at its start).
    #[cfg(unix)]
    #[test]
    fn a_fifo_tokenizer_file_is_refused_not_waited_for() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("tokenizer.json"), "{}").unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(t.path().join("tokenizer_config.json"))
            .status()
            .unwrap();
        assert!(made.success());
        // should the read block again, a writer comes after 10 s: the test then fails, not hangs
        let fifo = t.path().join("tokenizer_config.json");
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(10));
            let _ = std::fs::OpenOptions::new().write(true).open(fifo);
        });
        let e = read_tokenizer_files(&[t.path()]).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }

    pub(super) fn rename_fails() -> bool {
        let n = CALLS.with(|c| {
            let n = c.get();
            c.set(n + 1);
            n
        });
        FAIL.with(|f| f.get())
            .is_some_and(|(at, after)| n == at || (after && n > at))
    }

    fn inject(fail: Option<(usize, bool)>) {
        CALLS.with(|c| c.set(0));
        FAIL.with(|f| f.set(fail));
    }

    /// Every file under `dir` (relative path → content).
    fn tree(dir: &Path) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if e.file_type().unwrap().is_dir() {
                for (k, v) in tree(&e.path()) {
                    m.insert(format!("{name}/{k}"), v);
                }
            } else {
                m.insert(name, std::fs::read_to_string(e.path()).unwrap());
            }
        }
        m
    }

    const NEW: &[(&str, &str)] = &[
        ("config.json", "new config"),
        ("model-00001-of-00002.safetensors", "new 1"),
        ("model-00002-of-00002.safetensors", "new 2"),
        ("model.safetensors.index.json", "new index"),
        ("tokenizer.json", "new tokenizer"),
    ];

    fn write_new(dir: &Path) -> Result<()> {
        for (n, c) in NEW {
            atomic_write(&dir.join(n), c.as_bytes())?;
        }
        Ok(())
    }

    fn old_checkpoint(root: &Path) -> PathBuf {
        let out = root.join("out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        for (n, c) in [
            ("config.json", "old config"),
            ("model.safetensors", "old weights"),
            ("README.md", "mine"),
            ("sub/data.txt", "keep"),
            (".notes.tmp", "a user's temporary file"),
            (".model.safetensors.123.tmp", "an interrupted atomic write"),
        ] {
            std::fs::write(out.join(n), c).unwrap();
        }
        out
    }

    #[test]
    fn a_failed_install_is_undone_and_a_failed_undo_deletes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = old_checkpoint(d.path());
        let before = tree(&out);
        // 3 entries superseded (config, weights, the atomic write's temporary file) + 5 new ones
        let renames = 3 + NEW.len();
        for at in 0..renames {
            inject(Some((at, false)));
            let e = write_checkpoint_folder(&out, Existing::Any, write_new);
            inject(None);
            assert!(e.is_err(), "rename {at}");
            assert_eq!(tree(&out), before, "undone after a failure at rename {at}");
        }
        let mut expect: BTreeMap<String, String> = NEW
            .iter()
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect();
        for k in ["README.md", "sub/data.txt", ".notes.tmp"] {
            expect.insert(k.into(), before[k].clone());
        }
        for at in 0..renames {
            let d = tempfile::tempdir().unwrap();
            let out = old_checkpoint(d.path());
            inject(Some((at, true)));
            let e = write_checkpoint_folder(&out, Existing::Any, write_new)
                .unwrap_err()
                .to_string();
            inject(None);
            let now = tree(&out);
            if at > 0 {
                assert!(e.contains("nothing was deleted"), "{e}");
            }
            // every old file is still there, in place or in the temporary folder
            for (k, v) in &before {
                let name = k.rsplit('/').next().unwrap();
                assert!(
                    now.iter().any(|(k2, v2)| v2 == v && k2.ends_with(name)),
                    "{k} lost after a failed undo at rename {at}: {now:?}"
                );
            }
            assert_eq!(now["README.md"], "mine");
            assert_eq!(now["sub/data.txt"], "keep");
            // the next write (this process's id counts as gone) installs and cleans the leftovers
            write_checkpoint_folder(&out, Existing::Any, write_new).unwrap();
            assert_eq!(tree(&out), expect, "after a failed undo at rename {at}");
        }
    }

    #[test]
    fn a_folder_where_the_checkpoint_has_a_file_is_refused_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let out = old_checkpoint(d.path());
        std::fs::create_dir_all(out.join("tokenizer.json")).unwrap();
        std::fs::write(out.join("tokenizer.json/x"), "user").unwrap();
        let before = tree(&out);
        let e = write_checkpoint_folder(&out, Existing::Any, write_new)
            .unwrap_err()
            .to_string();
        assert!(e.contains("folder named tokenizer.json"), "{e}");
        assert_eq!(tree(&out), before);
    }

    #[test]
    fn temporary_names_and_superseded_entries() {
        assert_eq!(temp_folder_pid(".llada-new-123-0"), Some(123));
        assert_eq!(temp_folder_pid(".llada-old-7-12"), Some(7));
        for n in [
            ".llada-new-",
            ".llada-new-12",
            ".llada-new-x-1",
            ".llada-newer-1-1",
            "x",
        ] {
            assert_eq!(temp_folder_pid(n), None, "{n}");
        }
        let none: &[std::ffi::OsString] = &[];
        let s = |n: &str| superseded(std::ffi::OsStr::new(n), none);
        for n in [
            "config.json",
            "model.safetensors",
            "model-00003-of-00009.safetensors",
            ".config.json.42.tmp",
            ".tokenizer.json.1.tmp",
        ] {
            assert!(s(n), "{n}");
        }
        for n in [
            "notes.tmp",
            ".notes.tmp",
            ".config.json.tmp",
            ".x.1.tmp",
            "README.md",
        ] {
            assert!(!s(n), "{n}");
        }
        assert!(other_process_running(1) || cfg!(not(unix)));
        assert!(!other_process_running(std::process::id()));
        assert!(!other_process_running(0));
    }
}
