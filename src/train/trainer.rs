//! The training loop: pretraining or SFT with the masked-diffusion bound, AdamW, gradient
//! accumulation and clipping, a learning-rate schedule, periodic held-out evaluation, metrics, and
//! atomic checkpoints from which a run resumes exactly.
//!
//! A run folder holds `train_config.json` (written before step 0), `metrics.jsonl`,
//! `checkpoints/step-NNNNNN/` (Hugging Face weights loadable by `generate`, tokenizer files,
//! `optimizer.safetensors`, `trainer_state.json`) and `checkpoints/latest` naming the last
//! complete checkpoint. A checkpoint is written into a temporary folder and renamed, then
//! `latest` is replaced atomically: a kill at any point leaves the previous checkpoint intact.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{Cursor, DataKind, Dataset, Reader};
use super::optim::{all_finite, clip_grad_norm, AdamW, AdamWConfig, Schedule};
use super::params::Trainable;
use crate::checkpoint::{other_process_running, read_config, read_tokenizer_files, write_config};
use crate::config::RawConfig;
use crate::diffusion::vrpo::{self, PreferenceStats, VrpoSettings};
use crate::diffusion::{self, noise, LossWeights, Objective};
use crate::error::{read_json, Error, Result};
use crate::model::lora::LoraSettings;
use crate::model::Llada;
use crate::rng::Rng;
use crate::weights::{atomic_write, safetensors_bytes, save_safetensors, SafetensorsFiles};

/// Settings of a training run (TOML or JSON; every field has a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// pretrain, sft or preference (`vrpo`: preference optimisation); must match the dataset.
    pub mode: DataKind,
    /// diffusion (the masked-diffusion bound) or autoregressive (next-token loss; the model's
    /// config must say `causal_attention: true`), for the autoregressive twin.
    pub objective: ObjectiveKind,
    /// Start from this checkpoint folder…
    pub init_from: Option<PathBuf>,
    /// …or from random weights for this config.json (seeded by `seed`).
    pub model_config: Option<PathBuf>,
    /// Folder whose tokenizer files go into every checkpoint (default: `init_from`).
    pub tokenizer: Option<PathBuf>,
    /// Prepared dataset folder (`llada data prepare`).
    pub data: PathBuf,
    /// Run folder.
    pub out: PathBuf,
    pub seq_len: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    pub optimizer: AdamWConfig,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Pretraining: probability that a batch is cut to a random length (reference: 0.01).
    pub random_length_prob: f64,
    /// How each batch's times t are drawn: iid (the reference) or stratified.
    pub t_sampling: noise::TimeSampling,
    /// Evaluate the held-out bound every N steps (0 = never).
    pub eval_every: usize,
    pub eval_batches: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Keep this many most recent checkpoints (0 = all).
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// What a step whose loss or gradient norm is not finite (NaN, ±∞) does: `stop` the run with
    /// an error naming the step and the value (the default), or `skip` it (no update; its batch
    /// is consumed; a warning is logged and its metrics line says `"skipped": true`). An update
    /// that would make the weights or optimizer moments non-finite always stops the run. A
    /// non-finite state is never saved, so earlier checkpoints stay as they are.
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip"`: stop once this many steps in a row were skipped (0 = never).
    pub max_consecutive_skips: usize,
    /// LoRA: train a low-rank adapter over the frozen `init_from` model instead of every weight
    /// (checkpoints hold the adapter, in PEFT's format).
    pub lora: Option<LoraSettings>,
    /// Keep only each block's input during the forward pass and recompute the block in the
    /// backward pass: the same loss and gradients, less memory, about one more forward's time.
    pub checkpoint_activations: bool,
    /// f32, or bf16 mixed precision: bf16 matrix products with f32 master weights, f32 norms,
    /// softmax, reductions and loss (as PyTorch's autocast); with LoRA the frozen linear
    /// weights are held in bf16.
    pub precision: Precision,
    /// VRPO's settings (mode `preference`): β, the estimator's budget, antithetic sampling.
    #[serde(skip_serializing_if = "VrpoSettings::is_default")]
    pub vrpo: VrpoSettings,
}

/// The arithmetic of a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 matrix products, everything else f32.
    Bf16,
}

impl Precision {
    /// The autocast dtype of the training forward.
    pub fn autocast(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(DType::BF16),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::setting(
                "precision",
                other,
                "must be f32 or bf16 (bf16 mixed precision)",
            )),
        }
    }
}

/// What a training step with a non-finite loss or gradient norm does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run with [`Error::NonFinite`].
    #[default]
    Stop,
    /// Skip the step (no update) and go on.
    Skip,
}

impl std::str::FromStr for OnNonFinite {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stop" => Ok(OnNonFinite::Stop),
            "skip" => Ok(OnNonFinite::Skip),
            other => Err(Error::setting(
                "on_nonfinite",
                other,
                "must be stop or skip",
            )),
        }
    }
}

/// Which loss a run minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    #[default]
    Diffusion,
    Autoregressive,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            mode: DataKind::Pretrain,
            objective: ObjectiveKind::Diffusion,
            init_from: None,
            model_config: None,
            tokenizer: None,
            data: PathBuf::new(),
            out: PathBuf::from("runs/llada"),
            seq_len: 256,
            batch_size: 8,
            grad_accum: 1,
            steps: 1000,
            lr: 4e-4,
            schedule: Schedule::default(),
            optimizer: AdamWConfig::default(),
            grad_clip: 1.0,
            random_length_prob: 0.01,
            t_sampling: noise::TimeSampling::Iid,
            eval_every: 100,
            eval_batches: 8,
            save_every: 200,
            keep_checkpoints: 3,
            seed: 0,
            on_nonfinite: OnNonFinite::Stop,
            max_consecutive_skips: 10,
            lora: None,
            checkpoint_activations: false,
            precision: Precision::F32,
            vrpo: VrpoSettings::default(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML (or, by extension, JSON) file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::error::read_to_string(path)?;
        if path.extension().is_some_and(|e| e == "json") {
            return serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            });
        }
        toml::from_str(&text).map_err(|e| Error::Config {
            key: path.display().to_string(),
            value: "TOML".into(),
            reason: e.to_string(),
        })
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("seq_len", self.seq_len),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("steps", self.steps),
        ] {
            if v == 0 {
                return Err(Error::setting(name, v, "must be at least 1"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::setting("lr", self.lr, "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&self.random_length_prob) {
            return Err(Error::setting(
                "random_length_prob",
                self.random_length_prob,
                "must be in [0, 1]",
            ));
        }
        if self.init_from.is_none() == self.model_config.is_none() {
            return Err(Error::setting(
                "init_from/model_config",
                "both or neither",
                "give exactly one starting point: a checkpoint (init_from) or a config.json (model_config)",
            ));
        }
        if let Some(l) = &self.lora {
            l.validate()?;
            if self.init_from.is_none() {
                return Err(Error::setting(
                    "lora",
                    format!("rank {}", l.rank),
                    "adapts a trained model: give its checkpoint (init_from / --init-from)",
                ));
            }
            if self.objective != ObjectiveKind::Diffusion {
                return Err(Error::setting(
                    "lora",
                    format!("rank {}", l.rank),
                    "is implemented for the diffusion objective",
                ));
            }
        }
        if self.mode == DataKind::Preference {
            self.vrpo.validate()?;
            if self.init_from.is_none() {
                return Err(Error::setting(
                    "mode",
                    "vrpo",
                    "aligns a trained model: give its checkpoint (init_from / --init-from)",
                ));
            }
            if self.objective != ObjectiveKind::Diffusion {
                return Err(Error::setting(
                    "objective",
                    "autoregressive",
                    "VRPO estimates the diffusion bound: use the diffusion objective",
                ));
            }
            if self.lora.is_some() && self.vrpo.full_weights {
                return Err(Error::setting(
                    "vrpo full_weights",
                    true,
                    "trains every weight: leave out the LoRA settings (--lora-rank), or full_weights",
                ));
            }
        }
        self.schedule.validate()
    }

    /// Rows the model processes per sequence of a batch: 2·budget per pair for VRPO.
    fn rows_per_unit(&self) -> usize {
        if self.mode == DataKind::Preference {
            2 * self.vrpo.budget()
        } else {
            1
        }
    }

    /// The dtype the frozen linear weights of a LoRA run are held in.
    fn base_dtype(&self) -> DType {
        match (&self.lora, self.precision) {
            (Some(_), Precision::Bf16) => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The model a LoRA run adapts (`init_from`, a run folder standing for its last checkpoint),
    /// as an absolute path.
    fn base_model(&self) -> Option<PathBuf> {
        // resolved to an absolute checkpoint folder when the run started
        self.init_from.clone()
    }
}

/// The state saved with every checkpoint, besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    pub adam_t: u64,
    pub rng: Rng,
    pub cursor: Cursor,
    pub tokens_seen: u64,
    pub elapsed_seconds: f64,
    pub config: TrainConfig,
    /// Steps skipped for a non-finite loss or gradient (`on_nonfinite = "skip"`).
    #[serde(default)]
    pub skipped_steps: usize,
}

/// What `on_step` sees.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_seconds: f64,
    /// Held-out bound, when evaluated at this step.
    pub eval_loss: Option<f64>,
    /// Checkpoint written at this step.
    pub checkpoint: Option<PathBuf>,
    /// The step was skipped (non-finite loss or gradient; `on_nonfinite = "skip"`): no update.
    pub skipped: bool,
    /// A mixture-of-experts model's load-balancing loss (unweighted); the step minimised
    /// `loss + router_aux_loss_coef · aux_loss`. `loss` is the masked-diffusion loss alone,
    /// comparable with `eval_loss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// VRPO: the implicit rewards of the step's pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewards: Option<PreferenceStats>,
    /// VRPO: the implicit rewards of the held-out pairs, when evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_rewards: Option<PreferenceStats>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The masked-diffusion loss (without the load-balancing term).
    pub loss: f64,
    /// The load-balancing loss of a mixture-of-experts model (unweighted).
    pub aux_loss: Option<f64>,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: u64,
    /// Skipped for a non-finite loss or gradient norm (no update).
    pub skipped: bool,
    /// VRPO: the implicit rewards of the step's pairs.
    pub rewards: Option<PreferenceStats>,
}

/// A training run.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub raw_config: RawConfig,
    pub trainable: Trainable,
    pub opt: AdamW,
    pub state: TrainerState,
    data: Dataset,
    /// The tokenizer files written into every checkpoint, read once at the start (so that every
    /// checkpoint is complete whatever happens to the folder they came from).
    tokenizer_files: Vec<(String, Vec<u8>)>,
    /// The checkpoint this run resumed from (`None` for a new run).
    pub resumed_from: Option<PathBuf>,
    consecutive_skips: usize,
    device: Device,
    /// VRPO with every weight trained: the frozen reference model (with LoRA the reference is
    /// the adapted model with its adapters off).
    reference: Option<Llada>,
}

const CHECKPOINTS: &str = "checkpoints";
const LATEST: &str = "latest";
const RUN_CONFIG: &str = "train_config.json";
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS).join(format!("step-{step:07}"))
}

/// The step of a checkpoint folder name `step-NNNNNNN`.
fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")
        .filter(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
}

/// The checkpoint folders of a run, by step (ascending).
fn step_dirs(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out.join(CHECKPOINTS))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| Some((step_of(&e.file_name().to_string_lossy())?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The last complete checkpoint of a run, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    // a pointer of a few bytes: a FIFO or a huge file there is not one
    let name = crate::error::read_regular_file(&out.join(CHECKPOINTS).join(LATEST), 4096).ok()?;
    let name = String::from_utf8(name).ok()?;
    let name = name.trim();
    step_of(name)?;
    let p = out.join(CHECKPOINTS).join(name);
    p.is_dir().then_some(p)
}

/// The checkpoint a run folder stands for when it is given as a model (`llada generate runs/pre`):
/// for a run folder, its `checkpoints/` folder or its `checkpoints/latest` pointer, the last
/// complete checkpoint (the highest `step-*`, the one `--resume` takes). `None` for anything
/// else (a checkpoint folder itself among them).
pub fn run_checkpoint(p: &Path) -> Option<PathBuf> {
    let p = std::fs::canonicalize(p).ok()?;
    let run = if p.is_file() && p.file_name() == Some(LATEST.as_ref()) {
        p.parent()?.parent()?.to_path_buf()
    } else if p.is_dir()
        && !p.join("config.json").exists()
        && !p.join(crate::model::lora::ADAPTER_CONFIG).exists()
    {
        if p.file_name() == Some(CHECKPOINTS.as_ref()) && !p.join(CHECKPOINTS).exists() {
            p.parent()?.to_path_buf()
        } else {
            p.clone()
        }
    } else {
        return None;
    };
    step_dirs(&run).pop().map(|(_, d)| d)
}

/// The writer's process id in the name of a leftover of an interrupted save, `None` for any
/// other name: `.tmp-step-NNNNNNN-PID` and `.step-NNNNNNN.{new,old}-PID-N` folders in
/// `checkpoints/` (`dir` true), `.latest.PID.tmp` there and `.train_config.json.PID.tmp` in the
/// run folder (`dir` false; `in_checkpoints` says which folder).
fn leftover_pid(name: &str, dir: bool, in_checkpoints: bool) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let pid = |s: &str| digits(s).then(|| s.parse().ok()).flatten();
    match (dir, in_checkpoints) {
        (true, true) => {
            if let Some(rest) = name.strip_prefix(".tmp-step-") {
                let (step, p) = rest.split_once('-')?;
                return digits(step).then(|| pid(p)).flatten();
            }
            let rest = name.strip_prefix(".step-")?;
            let (step, tail) = rest.split_once('.')?;
            let tail = tail
                .strip_prefix("new-")
                .or_else(|| tail.strip_prefix("old-"))?;
            let (p, n) = tail.split_once('-')?;
            (digits(step) && digits(n)).then(|| pid(p)).flatten()
        }
        (false, true) => pid(name
            .strip_prefix(&format!(".{LATEST}."))?
            .strip_suffix(".tmp")?),
        (false, false) => pid(name
            .strip_prefix(&format!(".{RUN_CONFIG}."))?
            .strip_suffix(".tmp")?),
        (true, false) => None,
    }
}

/// Removes what saves killed mid-write left in the run folder `out`: `checkpoints/.tmp-step-*`
/// folders, `.step-*.{new,old}-*` folders of a replaced checkpoint, and the temporary files of
/// atomic writes (`checkpoints/.latest.*.tmp`, `.train_config.json.*.tmp`). Only these names
/// are touched, and only those of processes no longer running (a trainer writing into the folder
/// now keeps its own). Returns what was removed.
/// `step-N` for a set-aside name `.step-N.old-PID-N`.
fn set_aside_step(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('.')?;
    let (step, tag) = rest.split_once('.')?;
    (tag.starts_with("old-") && step_of(step).is_some()).then_some(step)
}

pub fn clean_interrupted_saves(out: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let ck = out.join(CHECKPOINTS);
    let leftovers = |dir: &Path, in_checkpoints: bool| -> Vec<(PathBuf, bool)> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let is_dir = e.file_type().ok()?.is_dir();
                        let pid =
                            leftover_pid(&e.file_name().to_string_lossy(), is_dir, in_checkpoints)?;
                        (!other_process_running(pid)).then(|| (e.path(), is_dir))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for (path, is_dir) in leftovers(&ck, true)
        .into_iter()
        .chain(leftovers(out, false))
    {
        // `.step-N.old-PID-N` is a complete earlier `step-N` set aside just before the new one
        // was renamed in: when the kill came between the two, no `step-N` is there, and the old
        // one goes back instead of being removed
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        if let Some(step) = name.as_deref().and_then(set_aside_step) {
            let back = ck.join(step);
            if is_dir && !back.exists() && std::fs::rename(&path, &back).is_ok() {
                tracing::warn!(
                    "{}: put back as {} (a save was interrupted while replacing it)",
                    path.display(),
                    back.display()
                );
                continue;
            }
        }
        let r = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match r {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!("{}: could not remove ({e})", path.display()),
        }
    }
    if !removed.is_empty() {
        tracing::warn!(
            "removed {} leftover(s) of interrupted saves in {}",
            removed.len(),
            out.display()
        );
    }
    removed
}

/// Whether an error from resuming from the checkpoint `ck` is about what that checkpoint holds
/// (a file missing, truncated or corrupt, non-finite values, an invalid trainer state): then an
/// older checkpoint may be used. Any other error (an I/O error such as EIO, EACCES or EMFILE,
/// out of memory, a dataset or setting problem) is not the checkpoint's and is passed up.
fn is_content_error(e: &Error, ck: &Path) -> bool {
    match e {
        Error::Io { path, source } => {
            source.kind() == std::io::ErrorKind::NotFound && path.starts_with(ck)
        }
        Error::Json { path, .. }
        | Error::Checkpoint { path, .. }
        | Error::MissingTensor { path, .. }
        | Error::TensorShape { path, .. } => path.starts_with(ck),
        // from the checkpoint's config.json (the run's settings are checked as the state's)
        Error::Config { .. } | Error::UnsupportedArchitecture { .. } => true,
        _ => false,
    }
}

/// Renames a checkpoint that resume passed over to `step-NNNNNNN.unusable` (or `.unusable-N`),
/// which no step listing counts, so that it is kept for inspection and never overwritten.
fn set_aside_unusable(ck: &Path) -> Option<PathBuf> {
    let name = ck.file_name()?.to_string_lossy().to_string();
    let parent = ck.parent()?;
    let target = (0..1000)
        .map(|n| {
            parent.join(if n == 0 {
                format!("{name}.unusable")
            } else {
                format!("{name}.unusable-{n}")
            })
        })
        .find(|p| std::fs::symlink_metadata(p).is_err())?;
    match std::fs::rename(ck, &target) {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!("{}: could not set it aside ({e})", ck.display());
            None
        }
    }
}

/// Whether the run folder `out` holds an earlier run's checkpoints (`checkpoints/latest` or a
/// `step-*` folder).
pub fn has_checkpoints(out: &Path) -> bool {
    std::fs::symlink_metadata(out.join(CHECKPOINTS).join(LATEST)).is_ok()
        || !step_dirs(out).is_empty()
}

/// Removes an earlier run's checkpoints (`step-*` folders, `latest`) and `metrics.jsonl` from the
/// run folder `out`, for a new run that replaces it. Nothing else is touched.
fn remove_earlier_run(out: &Path) -> Result<()> {
    for (_, p) in step_dirs(out) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    for p in [
        out.join(CHECKPOINTS).join(LATEST),
        out.join("metrics.jsonl"),
    ] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&p, e)),
            _ => {}
        }
    }
    Ok(())
}

fn load_dense(dir: &Path, linear: DType, device: &Device) -> Result<(RawConfig, Llada)> {
    if !dir.join("config.json").exists() && dir.join(crate::model::lora::ADAPTER_CONFIG).exists() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "is a LoRA adapter, not a model: merge it into its base first (llada lora merge BASE ADAPTER --out DIR) and start from DIR, or continue its run with --resume".into(),
        });
    }
    let (raw, cfg) = read_config(dir)?;
    let files = SafetensorsFiles::open(dir)?;
    let m = Llada::load(
        &cfg,
        &LoraBaseWeights {
            files: &files,
            linear,
            device,
        },
    )?;
    Ok((raw, m))
}

/// The checkpoint folder a run starts from: a run folder stands for its last checkpoint, a hub
/// id for its snapshot in the local cache; absolute.
fn resolve_init(d: &Path) -> Result<PathBuf> {
    let p = if d.exists() {
        run_checkpoint(d).unwrap_or_else(|| d.to_path_buf())
    } else {
        crate::hub::resolve(Some(&d.to_string_lossy()))?
    };
    Ok(std::fs::canonicalize(&p).unwrap_or(p))
}

/// A LoRA base's tensors: the linear maps (rank 2, the embedding excepted) in `linear`, the
/// embedding and norms in f32 (the residual stream stays f32), each read straight in its dtype.
struct LoraBaseWeights<'a> {
    files: &'a SafetensorsFiles,
    linear: DType,
    device: &'a Device,
}

impl crate::model::WeightSource for LoraBaseWeights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dt = if shape.len() == 2 && !name.ends_with(".wte.weight") {
            self.linear
        } else {
            DType::F32
        };
        self.files.load(name, shape, dt, self.device)
    }
}

/// VRPO training every weight: the frozen reference, loaded from the run's starting model.
fn reference_model(cfg: &TrainConfig, device: &Device) -> Result<Option<Llada>> {
    if cfg.mode != DataKind::Preference || cfg.lora.is_some() {
        return Ok(None);
    }
    let base = cfg.base_model().unwrap_or_default();
    Ok(Some(load_dense(&base, DType::F32, device)?.1))
}

/// The trainable form of `model` for the run `cfg`: every weight, or a LoRA adapter.
fn trainable_for(cfg: &TrainConfig, model: &Llada) -> Result<Trainable> {
    match &cfg.lora {
        Some(l) => Trainable::with_lora(model, l, cfg.base_dtype(), cfg.seed),
        None => Trainable::from_llada(model),
    }
}

impl Trainer {
    /// A new run: checks the settings, data and model against each other, creates the run folder
    /// and writes the run config before step 0. A run folder that holds an earlier run's
    /// checkpoints is refused (see [`Trainer::start`]).
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self> {
        Self::start(cfg, device, false)
    }

    /// [`Trainer::new`]; with `replace_earlier_run`, a run folder holding an earlier run's
    /// checkpoints is accepted and those checkpoints (`step-*`, `latest`) and its `metrics.jsonl`
    /// are removed before the new run's first step (its other files are kept). Without it such a
    /// folder is an error naming it, `--resume` and `--force`.
    pub fn start(mut cfg: TrainConfig, device: &Device, replace_earlier_run: bool) -> Result<Self> {
        if cfg.mode == DataKind::Preference && cfg.lora.is_none() && !cfg.vrpo.full_weights {
            // VRPO trains an adapter unless told otherwise: the reference is then the base
            cfg.lora = Some(LoraSettings::default());
            tracing::info!(
                "vrpo: training a LoRA adapter (rank {}; set --lora-rank, or vrpo.full_weights / --full-weights to train every weight)",
                LoraSettings::default().rank
            );
        }
        cfg.validate()?;
        if cfg.schedule.warmup() > cfg.steps {
            tracing::warn!(
                "the warm-up ({} steps) is as long as the run ({} steps): the learning rate never reaches its peak {} (set a shorter warm-up: --warmup, or schedule.warmup in the run's config)",
                cfg.schedule.warmup(),
                cfg.steps,
                cfg.lr
            );
        }
        if !replace_earlier_run && has_checkpoints(&cfg.out) {
            return Err(Error::OutputFolder {
                path: cfg.out.clone(),
                reason: "holds an earlier run's checkpoints; continue it with --resume, or replace it with --force (its checkpoints and metrics.jsonl are removed)".into(),
            });
        }
        // a run folder given as the starting point stands for its last checkpoint; a hub id for
        // its snapshot in the local cache
        let init_from = cfg
            .init_from
            .as_ref()
            .map(|d| resolve_init(d))
            .transpose()?;
        if cfg.lora.is_some() || cfg.mode == DataKind::Preference {
            // an adapter (and VRPO's reference) is bound to one base: its absolute path, decided once (a run folder
            // given as the base later gaining checkpoints, or another working folder at resume,
            // must not change it)
            cfg.init_from = init_from.clone();
        }
        if replace_earlier_run && has_checkpoints(&cfg.out) {
            // --force removes the earlier run's checkpoints: never the one this run starts from
            if let Some(dir) = &init_from {
                let inside = |p: &Path| std::fs::canonicalize(p).ok();
                if let (Some(from), Some(ck)) = (inside(dir), inside(&cfg.out.join(CHECKPOINTS))) {
                    if from.starts_with(&ck) {
                        return Err(Error::OutputFolder {
                            path: cfg.out.clone(),
                            reason: format!(
                                "--force would remove the earlier run's checkpoints, and init_from {} is one of them: copy it elsewhere first, or continue the run with --resume",
                                dir.display()
                            ),
                        });
                    }
                }
            }
        }
        let data = Dataset::open(&cfg.data)?;
        let (raw, model, tokenizer_dir) = if let Some(dir) = &init_from {
            let (raw, m) = load_dense(dir, cfg.base_dtype(), device)?;
            (raw, m, cfg.tokenizer.clone().or(Some(dir.clone())))
        } else {
            // validate() guarantees a model_config when there is no init_from
            let path = cfg.model_config.clone().unwrap_or_default();
            // a file or a preset, completed from the tokenizer (vocabulary size, special ids)
            let raw = super::presets::model_config_for_run(&path, cfg.tokenizer.as_deref())?;
            let mc = raw.resolve()?;
            let m = Llada::init_random(&mc, cfg.seed, DType::F32, device)?;
            (raw, m, cfg.tokenizer.clone())
        };
        check_compat(&cfg, &data, &model)?;
        // everything that can refuse the model before the run folder is touched (--force
        // removes an earlier run's checkpoints)
        check_memory_settings(&cfg, &model)?;
        let trainable = trainable_for(&cfg, &model)?;
        drop(model);
        let reference = reference_model(&cfg, device)?;
        let tokenizer_files = read_tokenizer_files(
            &tokenizer_dir
                .iter()
                .map(|p| p.as_path())
                .collect::<Vec<_>>(),
        )?;
        std::fs::create_dir_all(cfg.out.join(CHECKPOINTS)).map_err(|e| Error::io(&cfg.out, e))?;
        clean_interrupted_saves(&cfg.out);
        if replace_earlier_run && has_checkpoints(&cfg.out) {
            remove_earlier_run(&cfg.out)?;
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Json {
            path: cfg.out.join(RUN_CONFIG),
            source: e,
        })?;
        atomic_write(&cfg.out.join(RUN_CONFIG), text.as_bytes())?;
        let opt = AdamW::new(cfg.optimizer, &trainable.vars)?;
        let state = TrainerState {
            step: 0,
            adam_t: 0,
            rng: Rng::new(cfg.seed ^ 0x7A11_5EED),
            cursor: Cursor::default(),
            tokens_seen: 0,
            elapsed_seconds: 0.0,
            config: cfg.clone(),
            skipped_steps: 0,
        };
        Ok(Trainer {
            cfg,
            raw_config: raw,
            trainable,
            opt,
            state,
            data,
            tokenizer_files,
            resumed_from: None,
            consecutive_skips: 0,
            device: device.clone(),
            reference,
        })
    }

    /// Resumes the run in `out` from its newest complete checkpoint (the highest `step-*`, which
    /// is the one `latest` names unless a kill came between the two). `steps` may extend the run.
    ///
    /// Leftovers of interrupted saves are removed first. When the newest checkpoint is unusable
    /// (a file missing, truncated or corrupt, non-finite weights or moments, an invalid trainer
    /// state), the run resumes from the newest usable one, with a warning naming each one passed
    /// over and why; those are renamed `step-NNNNNNN.unusable` (kept, never overwritten). With
    /// none usable the error lists each checkpoint and its reason, and nothing is renamed. Any
    /// other error (I/O, memory, the dataset) stops the resume as it is.
    pub fn resume(out: &Path, steps: Option<usize>, device: &Device) -> Result<Self> {
        clean_interrupted_saves(out);
        let candidates: Vec<PathBuf> = step_dirs(out).into_iter().rev().map(|(_, p)| p).collect();
        if let (Some(latest), Some(newest)) = (latest_checkpoint(out), candidates.first()) {
            if &latest != newest {
                tracing::warn!(
                    "{} is newer than the one checkpoints/latest names ({}): resuming from it",
                    newest.display(),
                    latest.display()
                );
            }
        }
        if candidates.is_empty() {
            return Err(Error::Checkpoint {
                path: out.join(CHECKPOINTS),
                reason: "no complete checkpoint to resume from".into(),
            });
        }
        let mut failed: Vec<(&PathBuf, String)> = Vec::new();
        for ck in &candidates {
            match Self::resume_from(ck, out, steps, device) {
                Ok(t) => {
                    for (bad, why) in &failed {
                        let aside = set_aside_unusable(bad);
                        tracing::warn!(
                            "checkpoint {} is unusable ({why}); {}",
                            bad.display(),
                            match aside {
                                Some(p) => format!("renamed to {}", p.display()),
                                None => "left as it is".into(),
                            }
                        );
                    }
                    if !failed.is_empty() {
                        tracing::warn!(
                            "resuming from {}, the newest usable checkpoint",
                            ck.display()
                        );
                    }
                    return Ok(t);
                }
                Err(e) if is_content_error(&e, ck) => {
                    tracing::warn!("checkpoint {} is unusable: {e}", ck.display());
                    failed.push((ck, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        let list: Vec<String> = failed
            .iter()
            .map(|(p, e)| {
                let name = p.file_name().map(|n| n.to_string_lossy().to_string());
                format!("{} ({e})", name.unwrap_or_default())
            })
            .collect();
        Err(Error::Checkpoint {
            path: out.join(CHECKPOINTS),
            reason: format!("no usable checkpoint to resume from: {}", list.join("; ")),
        })
    }

    /// Resumes from the checkpoint folder `ck` of the run `out`, checking everything in it.
    fn resume_from(ck: &Path, out: &Path, steps: Option<usize>, device: &Device) -> Result<Self> {
        let state_path = ck.join(STATE);
        let state: TrainerState = read_json(&state_path)?;
        let bad_state = |reason: String| Error::Checkpoint {
            path: state_path.clone(),
            reason,
        };
        if state.adam_t > state.step as u64 {
            return Err(bad_state(format!(
                "field adam_t = {} exceeds field step = {} (corrupt)",
                state.adam_t, state.step
            )));
        }
        if state.skipped_steps > state.step {
            return Err(bad_state(format!(
                "field skipped_steps = {} exceeds field step = {} (corrupt)",
                state.skipped_steps, state.step
            )));
        }
        if !(state.elapsed_seconds.is_finite() && state.elapsed_seconds >= 0.0) {
            return Err(bad_state(format!(
                "field elapsed_seconds = {} must be a non-negative number",
                state.elapsed_seconds
            )));
        }
        let mut cfg = state.config.clone();
        cfg.out = out.to_path_buf();
        cfg.validate()
            .map_err(|e| bad_state(format!("field config: {e}")))?;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        cfg.validate()?;
        // what `step` sequences of batch × grad_accum sequences of seq_len can have consumed
        // (checked: the step comes from the file, and a wrapped product would pass the check)
        let sequences = (state.step as u128)
            .checked_mul(cfg.batch_size as u128)
            .and_then(|n| n.checked_mul(cfg.grad_accum as u128));
        let tokens = sequences
            .and_then(|n| n.checked_mul(cfg.seq_len as u128))
            .and_then(|n| n.checked_mul(cfg.rows_per_unit() as u128));
        let (Some(sequences), Some(tokens)) = (sequences, tokens) else {
            return Err(bad_state(format!(
                "field step = {} is not a step count any run can reach (corrupt)",
                state.step
            )));
        };
        if state.tokens_seen as u128 > tokens {
            return Err(bad_state(format!(
                "field tokens_seen = {} exceeds what {} steps of {}×{}×{}×{} tokens can have seen (corrupt)",
                state.tokens_seen, state.step, cfg.batch_size, cfg.grad_accum, cfg.seq_len, cfg.rows_per_unit()
            )));
        }
        if state.cursor.epoch as u128 > sequences {
            return Err(bad_state(format!(
                "field cursor.epoch = {} exceeds the {sequences} sequences {} steps read (corrupt)",
                state.cursor.epoch, state.step
            )));
        }
        let data = Dataset::open(&cfg.data)?;
        // the data cursor must point into the training split
        // (named against the dataset, not the checkpoint: a dataset rebuilt smaller makes every
        // checkpoint's cursor fall outside it, and resume must then stop, not fall back to an
        // older checkpoint whose cursor happens to fit)
        Reader::new(&data, &data.train, cfg.seq_len, cfg.seed, state.cursor).map_err(|e| {
            Error::Checkpoint {
                path: cfg.data.clone(),
                reason: format!(
                    "field cursor of {} does not fit this dataset ({e}): the dataset changed since the checkpoint, or the state is corrupt",
                    state_path.display()
                ),
            }
        })?;
        let (raw, model, trainable) = match &cfg.lora {
            None => {
                let (raw, model) = load_dense(ck, DType::F32, device)?;
                check_compat(&cfg, &data, &model)?;
                let t = Trainable::from_llada(&model)?;
                (raw, model, t)
            }
            Some(_) => {
                // the frozen base, then the adapter's factors from the checkpoint
                let base = cfg.base_model().unwrap_or_default();
                let (raw, model) = load_dense(&base, cfg.base_dtype(), device)?;
                check_compat(&cfg, &data, &model)?;
                let t = trainable_for(&cfg, &model)?;
                let path = ck.join(crate::model::lora::ADAPTER_WEIGHTS);
                let files = SafetensorsFiles::open_file(&path)?;
                for (name, v) in &t.vars {
                    v.set(&files.load(name, v.dims(), DType::F32, device)?)?;
                }
                (raw, model, t)
            }
        };
        check_memory_settings(&cfg, &model)?;
        drop(model);
        let reference = reference_model(&cfg, device)?;
        if let Some(name) = first_nonfinite(
            &trainable
                .vars
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_tensor()))
                .collect::<Vec<_>>(),
        )? {
            return Err(Error::Checkpoint {
                path: ck.to_path_buf(),
                reason: format!("weight {name} holds non-finite values (NaN or ±∞)"),
            });
        }
        let mut opt = AdamW::new(cfg.optimizer, &trainable.vars)?;
        let opt_path = ck.join(OPTIMIZER);
        let moments = SafetensorsFiles::open_file(&opt_path)?;
        for (i, (name, v)) in trainable.vars.iter().enumerate() {
            opt.m[i] = moments.load(&format!("m.{name}"), v.dims(), DType::F32, device)?;
            opt.v[i] = moments.load(&format!("v.{name}"), v.dims(), DType::F32, device)?;
            if !all_finite(&[&opt.m[i], &opt.v[i]])? {
                return Err(Error::Checkpoint {
                    path: opt_path,
                    reason: format!("the moments of {name} hold non-finite values (NaN or ±∞)"),
                });
            }
        }
        opt.t = state.adam_t;
        // the checkpoint's own tokenizer files; the run's sources for checkpoints without them
        let sources: Vec<&Path> = [Some(ck), cfg.tokenizer.as_deref(), cfg.init_from.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let tokenizer_files = read_tokenizer_files(&sources)?;
        Ok(Trainer {
            state: TrainerState {
                config: cfg.clone(),
                ..state
            },
            cfg,
            raw_config: raw,
            trainable,
            opt,
            data,
            tokenizer_files,
            resumed_from: Some(ck.to_path_buf()),
            consecutive_skips: 0,
            device: device.clone(),
            reference,
        })
    }

    fn objective(&self, batch: &super::data::Batch) -> Objective {
        if self.cfg.objective == ObjectiveKind::Autoregressive {
            return Objective::NextToken;
        }
        match &batch.prompt_lengths {
            Some(pl) => Objective::Sft {
                prompt_lengths: pl.clone(),
            },
            None => Objective::Pretrain,
        }
    }

    /// The weight of a mixture-of-experts model's load-balancing loss (`router_aux_loss_coef`;
    /// 0 for dense models).
    fn aux_coef(&self) -> f64 {
        let moe = self.trainable.model.config().moe.as_ref();
        moe.map_or(0.0, |m| m.aux_loss_coef)
    }

    /// The loss of one (noised) batch: Σ w·CE over its masked positions; with `aux`, plus a
    /// mixture-of-experts model's load-balancing loss × `router_aux_loss_coef` (training steps;
    /// the held-out bound leaves it out).
    ///
    /// With `grads` (activation checkpointing: `(1/grad_accum, out)`), the loss returned is
    /// already divided by grad_accum and its gradients are put in `out`.
    fn batch_loss(
        &self,
        x0: &[Vec<u32>],
        objective: &Objective,
        rng: &mut Rng,
        aux: bool,
        grads: Option<(f64, &mut Option<Vec<Tensor>>)>,
    ) -> Result<(Tensor, usize, Option<f64>)> {
        let mask_id = self.trainable.model.config().mask_token_id.unwrap_or(0);
        let pl = match objective {
            Objective::Sft { prompt_lengths } => Some(prompt_lengths.as_slice()),
            _ => None,
        };
        let (input, w) = if *objective == Objective::NextToken {
            (x0.to_vec(), LossWeights::next_token(x0))
        } else {
            let noised =
                noise::forward_process_with(x0, pl, mask_id, noise::EPS, self.cfg.t_sampling, rng);
            let w = LossWeights::new(x0, &noised, objective)?;
            (noised.noisy, w)
        };
        let (b, l) = (x0.len(), x0[0].len());
        if w.positions.is_empty() {
            if let Some((_, out)) = grads {
                *out = Some(
                    self.trainable
                        .gradients_from(&std::collections::HashMap::new())?,
                );
            }
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0, None));
        }
        let ids = Tensor::from_vec(input.concat(), (b, l), &self.device)?;
        let pos = Tensor::from_slice(&w.positions, w.positions.len(), &self.device)?;
        if let Some((accum, grads)) = grads {
            // activation checkpointing: the loss and its gradients in one go
            let (loss, g) = self.trainable.model.train_checkpointed(
                &ids,
                &pos,
                &self.trainable.var_ids(),
                &|logits| Ok((diffusion::masked_diffusion_loss(logits, &w)? / accum)?),
            )?;
            *grads = Some(self.trainable.gradients_from(&g)?);
            return Ok((loss, b * l, None));
        }
        let (logits, balance) = self.trainable.model.forward_train_aux(&ids, &pos)?;
        let loss = diffusion::masked_diffusion_loss(&logits, &w)?;
        let coef = self.aux_coef();
        match balance {
            Some(bl) if aux => {
                let value = bl.to_scalar::<f32>()? as f64;
                let loss = if coef > 0.0 {
                    (loss + (bl * coef)?)?
                } else {
                    loss
                };
                Ok((loss, b * l, Some(value)))
            }
            _ => Ok((loss, b * l, None)),
        }
    }

    /// The reference's ELBO estimates of the answers of `samples` (no gradient): the frozen
    /// copy, or the adapted model with its adapters off.
    /// `ids`, `pos`: the samples' inputs ([`vrpo::ElboSamples::inputs`]).
    fn reference_elbo(
        &self,
        samples: &vrpo::ElboSamples,
        ids: &Tensor,
        pos: &Tensor,
    ) -> Result<Vec<f32>> {
        if samples.positions.is_empty() {
            return Ok(vec![0.0; samples.answers]);
        }
        let logits = match &self.reference {
            Some(m) => m.forward_train_positions(ids, pos)?,
            None => {
                let _off = crate::model::lora::without_adapters();
                self.trainable.model.forward_train_positions(ids, pos)?
            }
        };
        vrpo::elbo_values(&logits, samples)
    }

    /// VRPO's loss on a batch of pairs (rows 2k chosen, 2k+1 rejected): the ELBO samples of every
    /// answer, the reference's estimates on the same samples (antithetic) or on their own, the
    /// policy's, and DPO's loss on them. `grads` as in [`Trainer::batch_loss`]. Returns the loss,
    /// the tokens the policy processed and the rewards.
    fn preference_loss(
        &self,
        x0: &[Vec<u32>],
        prompt_lengths: &[usize],
        rng: &mut Rng,
        grads: Option<(f64, &mut Option<Vec<Tensor>>)>,
    ) -> Result<(Tensor, usize, PreferenceStats)> {
        if x0.is_empty() {
            return Err(Error::setting("pairs", 0, "needs at least one pair"));
        }
        let mask_id = self.trainable.model.config().mask_token_id.unwrap_or(0);
        let set = &self.cfg.vrpo;
        let samples =
            vrpo::elbo_samples(x0, prompt_lengths, set, mask_id, self.cfg.t_sampling, rng)?;
        let (ids, pos) = samples.inputs(&self.device)?;
        let reference = if set.antithetic {
            self.reference_elbo(&samples, &ids, &pos)?
        } else {
            let own =
                vrpo::elbo_samples(x0, prompt_lengths, set, mask_id, self.cfg.t_sampling, rng)?;
            let (own_ids, own_pos) = own.inputs(&self.device)?;
            self.reference_elbo(&own, &own_ids, &own_pos)?
        };
        let (b, l) = (samples.noisy.len(), x0[0].len());
        let stats = std::cell::Cell::new(PreferenceStats::default());
        let chosen_lengths: Vec<usize> = prompt_lengths.iter().step_by(2).map(|&p| l - p).collect();
        let loss_of = |logits: &Tensor, accum: f64| -> Result<Tensor> {
            let policy = vrpo::elbo_per_answer(logits, &samples)?;
            let (loss, st) = vrpo::dpo_loss(&policy, &reference, set.beta)?;
            stats.set(st);
            let loss = if set.sft_weight > 0.0 {
                (loss + (vrpo::chosen_nll(&policy, &chosen_lengths)? * set.sft_weight)?)?
            } else {
                loss
            };
            Ok((loss / accum)?)
        };
        if samples.positions.is_empty() {
            // nothing masked anywhere: the policy's estimates are 0 and there is no gradient
            let zeros = Tensor::zeros(samples.answers, DType::F32, &self.device)?;
            let (loss, st) = vrpo::dpo_loss(&zeros, &reference, set.beta)?;
            if let Some((accum, out)) = grads {
                *out = Some(
                    self.trainable
                        .gradients_from(&std::collections::HashMap::new())?,
                );
                return Ok(((loss / accum)?, b * l, st));
            }
            return Ok((loss, b * l, st));
        }
        if let Some((accum, out)) = grads {
            let (loss, g) = self.trainable.model.train_checkpointed(
                &ids,
                &pos,
                &self.trainable.var_ids(),
                &|logits| loss_of(logits, accum),
            )?;
            *out = Some(self.trainable.gradients_from(&g)?);
            return Ok((loss, b * l, stats.get()));
        }
        let logits = self.trainable.model.forward_train_positions(&ids, &pos)?;
        let loss = loss_of(&logits, 1.0)?;
        Ok((loss, b * l, stats.get()))
    }

    /// One estimate of VRPO's loss and rewards on a batch of pairs (rows 2k chosen, 2k+1
    /// rejected; no update), with the noise drawn from `rng`: for measuring the estimator (its
    /// variance over seeds, with and without antithetic sampling).
    pub fn vrpo_estimate(
        &self,
        x0: &[Vec<u32>],
        prompt_lengths: &[usize],
        rng: &mut Rng,
    ) -> Result<(f64, PreferenceStats)> {
        let _autocast = crate::model::layers::autocast(self.cfg.precision.autocast());
        let (loss, _, stats) = self.preference_loss(x0, prompt_lengths, rng, None)?;
        Ok((loss.to_scalar::<f32>()? as f64, stats))
    }

    /// The first `pairs` pairs of the validation split (or of the training split without one),
    /// as a batch: rows 2k chosen, 2k+1 rejected, and their prompt lengths.
    pub fn preference_pairs(&self, pairs: usize) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
        if self.cfg.mode != DataKind::Preference {
            return Err(Error::setting(
                "mode",
                self.cfg.mode.name(),
                "holds no preference pairs (mode vrpo)",
            ));
        }
        let split = if self.data.val.n_examples > 0 {
            &self.data.val
        } else {
            &self.data.train
        };
        let mut reader = Reader::new(
            &self.data,
            split,
            self.cfg.seq_len,
            0xE7A1,
            Cursor::default(),
        )?;
        let b = reader.next_batch(pairs);
        Ok((b.x0, b.prompt_lengths.unwrap_or_default()))
    }

    /// VRPO's held-out loss and rewards on `eval_batches` batches of validation pairs, with fixed
    /// noise.
    fn evaluate_preferences(&self, reader: &mut Reader) -> Result<(f64, PreferenceStats)> {
        let mut rng = Rng::new(0xE7A1_5EED);
        let mut total = 0.0;
        let mut stats = PreferenceStats::default();
        for _ in 0..self.cfg.eval_batches {
            let batch = reader.next_batch(self.cfg.batch_size);
            let pl = batch.prompt_lengths.clone().unwrap_or_default();
            let (loss, _, st) = self.preference_loss(&batch.x0, &pl, &mut rng, None)?;
            total += loss.to_scalar::<f32>()? as f64;
            stats = stats.merge(st);
        }
        Ok((total / self.cfg.eval_batches as f64, stats))
    }

    /// The held-out bound: the objective on `eval_batches` batches of the validation split, with
    /// fixed data and noise (the same at every evaluation). `None` without validation data.
    pub fn evaluate(&self) -> Result<Option<f64>> {
        Ok(self.evaluate_with_rewards()?.map(|e| e.0))
    }

    /// [`Trainer::evaluate`], with VRPO's held-out rewards.
    pub fn evaluate_with_rewards(&self) -> Result<Option<(f64, Option<PreferenceStats>)>> {
        if self.cfg.eval_batches == 0 {
            return Ok(None);
        }
        let mut reader = match Reader::new(
            &self.data,
            &self.data.val,
            self.cfg.seq_len,
            0xE7A1,
            Cursor::default(),
        ) {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        let mut rng = Rng::new(0xE7A1_5EED);
        let _autocast = crate::model::layers::autocast(self.cfg.precision.autocast());
        if self.cfg.mode == DataKind::Preference {
            let (loss, stats) = self.evaluate_preferences(&mut reader)?;
            return Ok(Some((loss, Some(stats))));
        }
        let mut total = 0.0;
        for _ in 0..self.cfg.eval_batches {
            let batch = reader.next_batch(self.cfg.batch_size);
            let obj = self.objective(&batch);
            let (loss, _, _) = self.batch_loss(&batch.x0, &obj, &mut rng, false, None)?;
            total += loss.to_scalar::<f32>()? as f64;
        }
        Ok(Some((total / self.cfg.eval_batches as f64, None)))
    }

    /// One optimizer step (with gradient accumulation). A non-finite loss or gradient norm stops
    /// with [`Error::NonFinite`] or skips the step, as `on_nonfinite` says; an update that makes
    /// the weights or moments non-finite is always an error.
    pub fn step(&mut self) -> Result<StepStats> {
        let mut rng = self.state.rng.clone();
        let mut reader = Reader::new(
            &self.data,
            &self.data.train,
            self.cfg.seq_len,
            self.cfg.seed,
            self.state.cursor,
        )?;
        let mut grads: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let mut aux_sum: Option<f64> = None;
        let coef = self.aux_coef();
        let mut tokens = 0u64;
        let mut rewards: Option<PreferenceStats> = None;
        let _autocast = crate::model::layers::autocast(self.cfg.precision.autocast());
        for _ in 0..self.cfg.grad_accum {
            let mut batch = reader.next_batch(self.cfg.batch_size);
            if self.cfg.mode == DataKind::Preference {
                let accum = self.cfg.grad_accum as f64;
                let pl = batch.prompt_lengths.clone().unwrap_or_default();
                let mut checkpointed = None;
                let (loss, n, st) = if self.cfg.checkpoint_activations {
                    self.preference_loss(
                        &batch.x0,
                        &pl,
                        &mut rng,
                        Some((accum, &mut checkpointed)),
                    )?
                } else {
                    let (loss, n, st) = self.preference_loss(&batch.x0, &pl, &mut rng, None)?;
                    ((loss / accum)?, n, st)
                };
                loss_sum += loss.to_scalar::<f32>()? as f64;
                tokens += n as u64;
                rewards = Some(rewards.map_or(st, |r| r.merge(st)));
                let g = match checkpointed {
                    Some(g) => g,
                    None => self.trainable.gradients(&loss)?,
                };
                grads = Some(accumulate(grads, g)?);
                continue;
            }
            if batch.prompt_lengths.is_none() {
                let len =
                    noise::random_length(self.cfg.seq_len, self.cfg.random_length_prob, &mut rng);
                for row in &mut batch.x0 {
                    row.truncate(len);
                }
            }
            let obj = self.objective(&batch);
            let accum = self.cfg.grad_accum as f64;
            let mut checkpointed = None;
            let (loss, n, balance) = if self.cfg.checkpoint_activations {
                let (loss, n, b) = self.batch_loss(
                    &batch.x0,
                    &obj,
                    &mut rng,
                    true,
                    Some((accum, &mut checkpointed)),
                )?;
                (loss, n, b)
            } else {
                let (loss, n, b) = self.batch_loss(&batch.x0, &obj, &mut rng, true, None)?;
                ((loss / accum)?, n, b)
            };
            // the logged loss is the masked-diffusion part; the balance term is logged apart
            let total = loss.to_scalar::<f32>()? as f64;
            match balance {
                Some(bl) => {
                    loss_sum += total - coef * bl / accum;
                    *aux_sum.get_or_insert(0.0) += bl / accum;
                }
                None => loss_sum += total,
            }
            tokens += n as u64;
            let g = match checkpointed {
                Some(g) => g,
                None => self.trainable.gradients(&loss)?,
            };
            grads = Some(accumulate(grads, g)?);
        }
        let cursor = reader.cursor;
        drop(reader);
        let grads = grads.unwrap_or_default();
        let (norm, grads) = clip_grad_norm(&grads, self.cfg.grad_clip)?;
        let lr = self.cfg.lr * self.cfg.schedule.factor(self.state.step, self.cfg.steps);
        let step = self
            .state
            .step
            .checked_add(1)
            .ok_or_else(|| Error::Checkpoint {
                path: self.cfg.out.clone(),
                reason: format!("the step count {} cannot grow", self.state.step),
            })?;
        let whole = loss_sum + coef * aux_sum.unwrap_or(0.0);
        let bad = if !whole.is_finite() {
            Some(("the loss", whole))
        } else if !norm.is_finite() {
            Some(("the gradient norm", norm))
        } else {
            None
        };
        let skipped = match bad {
            Some((what, value)) => {
                self.nonfinite(step, what, value, lr)?;
                true
            }
            None => {
                self.consecutive_skips = 0;
                if let Some(i) = self.opt.step(&self.trainable.vars, &grads, lr)? {
                    let name = &self.trainable.vars[i].0;
                    return Err(Error::NonFinite {
                        step,
                        what: format!(
                            "parameter {name} (or its optimizer moments) after the update"
                        ),
                        value: "not finite".into(),
                        advice: format!("lr {lr:e}: lower it"),
                    });
                }
                false
            }
        };
        self.state.step = step;
        self.state.adam_t = self.opt.t;
        self.state.rng = rng;
        self.state.cursor = cursor;
        self.state.tokens_seen = self.state.tokens_seen.saturating_add(tokens);
        Ok(StepStats {
            loss: loss_sum,
            aux_loss: aux_sum,
            grad_norm: norm,
            lr,
            tokens,
            skipped,
            rewards,
        })
    }

    /// A non-finite `what` at `step`: the error (`stop`), or a warning and a skip (`skip`, until
    /// `max_consecutive_skips` in a row).
    fn nonfinite(&mut self, step: usize, what: &str, value: f64, lr: f64) -> Result<()> {
        if self.cfg.on_nonfinite == OnNonFinite::Stop {
            return Err(Error::NonFinite {
                step,
                what: what.into(),
                value: value.to_string(),
                advice: format!(
                    "lr {lr:e}: lower it, or set on_nonfinite = \"skip\" to skip such steps"
                ),
            });
        }
        self.consecutive_skips += 1;
        self.state.skipped_steps += 1;
        let max = self.cfg.max_consecutive_skips;
        if max > 0 && self.consecutive_skips >= max {
            return Err(Error::NonFinite {
                step,
                what: format!("{what} for {max} steps in a row"),
                value: value.to_string(),
                advice: format!(
                    "on_nonfinite = \"skip\" stops after max_consecutive_skips = {max}; lr {lr:e}"
                ),
            });
        }
        tracing::warn!("step {step}: {what} is {value}: step skipped (no update)");
        Ok(())
    }

    /// The current model (dense f32), e.g. to sample from it.
    pub fn model(&self) -> &Llada {
        &self.trainable.model
    }

    /// Writes a checkpoint of the current state (atomically) and returns its folder.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let out = &self.cfg.out;
        let final_dir = step_dir(out, self.state.step);
        let tmp = out.join(CHECKPOINTS).join(format!(
            ".tmp-step-{:07}-{}",
            self.state.step,
            std::process::id()
        ));
        // never save a diverged state (step() refuses to make one; this guards every caller)
        let lora = self.trainable.lora_updates();
        let named = if lora.is_empty() {
            self.trainable.model.named_tensors()?
        } else {
            self.trainable
                .vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect()
        };
        let mut all: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        for (i, (name, _)) in self.trainable.vars.iter().enumerate() {
            all.push((format!("optimizer moment m.{name}"), &self.opt.m[i]));
            all.push((format!("optimizer moment v.{name}"), &self.opt.v[i]));
        }
        let refs: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        if let Some(name) = first_nonfinite(&refs)? {
            return Err(Error::NonFinite {
                step: self.state.step,
                what: name.to_string(),
                value: "not finite".into(),
                advice: "not saving it".into(),
            });
        }
        let _ = std::fs::remove_dir_all(&tmp);
        let write = || -> Result<()> {
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            match &self.cfg.lora {
                // the adapter alone, in PEFT's format, naming its base model
                Some(settings) => {
                    let base = self.cfg.base_model().unwrap_or_default();
                    let config = crate::model::lora::PeftConfig::for_training(
                        settings,
                        &base.to_string_lossy(),
                    );
                    crate::model::lora::save(&tmp, &config, &lora)?;
                }
                None => {
                    save_safetensors(&tmp, &named, u64::MAX)?;
                    write_config(&tmp, &self.raw_config)?;
                }
            }
            for (name, bytes) in &self.tokenizer_files {
                atomic_write(&tmp.join(name), bytes)?;
            }
            let mut moments = Vec::new();
            for (i, (name, _)) in self.trainable.vars.iter().enumerate() {
                moments.push((format!("m.{name}"), self.opt.m[i].clone()));
                moments.push((format!("v.{name}"), self.opt.v[i].clone()));
            }
            atomic_write(&tmp.join(OPTIMIZER), &safetensors_bytes(&moments)?)?;
            let text = serde_json::to_string_pretty(&self.state).map_err(|e| Error::Json {
                path: tmp.join(STATE),
                source: e,
            })?;
            atomic_write(&tmp.join(STATE), text.as_bytes())?;
            install_step(&tmp, &final_dir)?;
            let name = final_dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            atomic_write(&out.join(CHECKPOINTS).join(LATEST), name.as_bytes())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        self.prune_checkpoints();
        Ok(final_dir)
    }

    /// Keeps the `keep_checkpoints` newest checkpoints up to the current step; checkpoints of
    /// later steps (a run resumed from an earlier one, past a corrupt one) are not counted, so the
    /// one just written and those before it survive.
    fn prune_checkpoints(&self) {
        if self.cfg.keep_checkpoints == 0 {
            return;
        }
        let steps: Vec<PathBuf> = step_dirs(&self.cfg.out)
            .into_iter()
            .filter(|(s, _)| *s <= self.state.step)
            .map(|(_, p)| p)
            .collect();
        let n = steps.len();
        for p in steps
            .into_iter()
            .take(n.saturating_sub(self.cfg.keep_checkpoints))
        {
            let _ = std::fs::remove_dir_all(p);
        }
    }

    fn append_metrics(&self, v: &serde_json::Value) -> Result<()> {
        let path = self.cfg.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(&path, e))
    }

    /// Runs until `steps`, evaluating, logging and checkpointing as configured; `on_step` sees
    /// every step. Returns the final checkpoint.
    pub fn run(&mut self, on_step: &mut dyn FnMut(&StepReport)) -> Result<PathBuf> {
        let t0 = Instant::now();
        let base_elapsed = self.state.elapsed_seconds;
        if self.state.step == 0 && self.cfg.eval_every > 0 {
            if let Some((e, rewards)) = self.evaluate_with_rewards()? {
                let mut line = serde_json::json!({"step": 0, "eval_loss": e});
                if let Some(r) = rewards {
                    line["eval_rewards"] = serde_json::to_value(r).unwrap_or_default();
                }
                self.append_metrics(&line)?;
            }
        }
        let mut last = None;
        while self.state.step < self.cfg.steps {
            let ts = Instant::now();
            let StepStats {
                loss,
                aux_loss,
                grad_norm: norm,
                lr,
                tokens,
                skipped,
                rewards,
            } = self.step()?;
            let dt = ts.elapsed().as_secs_f64();
            let step = self.state.step;
            self.state.elapsed_seconds = base_elapsed + t0.elapsed().as_secs_f64();
            let evaluated = if self.cfg.eval_every > 0
                && (step.is_multiple_of(self.cfg.eval_every) || step == self.cfg.steps)
            {
                self.evaluate_with_rewards()?
            } else {
                None
            };
            let (eval_loss, eval_rewards) = match evaluated {
                Some((l, r)) => (Some(l), r),
                None => (None, None),
            };
            let checkpoint = if (self.cfg.save_every > 0
                && step.is_multiple_of(self.cfg.save_every))
                || step == self.cfg.steps
            {
                let p = self.save_checkpoint()?;
                last = Some(p.clone());
                Some(p)
            } else {
                None
            };
            let report = StepReport {
                step,
                steps: self.cfg.steps,
                loss,
                lr,
                grad_norm: norm,
                tokens: self.state.tokens_seen,
                tokens_per_s: tokens as f64 / dt,
                elapsed_seconds: self.state.elapsed_seconds,
                eval_loss,
                checkpoint,
                skipped,
                aux_loss,
                rewards,
                eval_rewards,
            };
            self.append_metrics(&serde_json::to_value(&report).map_err(|e| Error::Json {
                path: self.cfg.out.join("metrics.jsonl"),
                source: e,
            })?)?;
            on_step(&report);
        }
        match last.or_else(|| latest_checkpoint(&self.cfg.out)) {
            Some(p) => Ok(p),
            None => self.save_checkpoint(),
        }
    }
}

/// Renames the complete checkpoint folder `tmp` to `final_dir`. A folder already there (which
/// only a second trainer in the same run folder makes) is moved aside to
/// `.step-NNNNNNN.old-PID-0` first and removed after.
fn install_step(tmp: &Path, final_dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(final_dir).is_err() {
        return std::fs::rename(tmp, final_dir).map_err(|e| Error::io(final_dir, e));
    }
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let old = final_dir.with_file_name(format!(".{name}.old-{}-0", std::process::id()));
    let _ = std::fs::remove_dir_all(&old);
    std::fs::rename(final_dir, &old).map_err(|e| Error::io(final_dir, e))?;
    if let Err(e) = std::fs::rename(tmp, final_dir) {
        let _ = std::fs::rename(&old, final_dir);
        return Err(Error::io(final_dir, e));
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// `g` added to the gradients accumulated so far (gradient accumulation).
fn accumulate(acc: Option<Vec<Tensor>>, g: Vec<Tensor>) -> Result<Vec<Tensor>> {
    Ok(match acc {
        None => g,
        Some(acc) => acc
            .iter()
            .zip(&g)
            .map(|(a, b)| a + b)
            .collect::<candle_core::Result<_>>()?,
    })
}

/// The first of `tensors` holding a non-finite value, with its name.
fn first_nonfinite<'a>(tensors: &[(&'a str, &Tensor)]) -> Result<Option<&'a str>> {
    for (name, t) in tensors {
        if !all_finite(&[t])? {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Settings the model must allow: activation checkpointing of dense blocks only.
fn check_memory_settings(cfg: &TrainConfig, model: &Llada) -> Result<()> {
    if cfg.checkpoint_activations && model.config().moe.is_some() {
        return Err(Error::setting(
            "checkpoint_activations",
            true,
            "is implemented for dense models (a mixture of experts' balancing loss spans every layer)",
        ));
    }
    Ok(())
}

/// Examples must keep an answer within `seq_len`: a prompt as long as `seq_len` is an error for
/// preference pairs (nothing of either answer would remain: chosen and rejected would be the same
/// row); answers cut short are counted and warned about (SFT and preference data).
fn check_answers_fit(cfg: &TrainConfig, data: &Dataset) -> Result<()> {
    if !cfg.mode.has_examples() {
        return Ok(());
    }
    let mut cut = 0usize;
    for split in [&data.train, &data.val] {
        for i in 0..split.n_examples {
            let (len, pl) = split.example_lengths(i);
            if cfg.mode == DataKind::Preference && pl >= cfg.seq_len {
                return Err(Error::setting(
                    "seq_len",
                    cfg.seq_len,
                    format!(
                        "pair {} of {} has a prompt of {pl} tokens: seq_len must exceed every prompt so that the answers remain (raise --seq-len, or leave such pairs out with `llada data prepare --max-len`)",
                        i / 2,
                        data.dir.display()
                    ),
                ));
            }
            if len > cfg.seq_len {
                cut += 1;
            }
        }
    }
    if cut > 0 {
        tracing::warn!(
            "{cut} examples of {} are longer than seq_len={}: their answers are cut short (and lose their end-of-turn token); raise --seq-len or prepare the data with --max-len",
            data.dir.display(),
            cfg.seq_len
        );
    }
    Ok(())
}

/// Data and model must agree: vocabulary, sequence length, mode.
fn check_compat(cfg: &TrainConfig, data: &Dataset, model: &Llada) -> Result<()> {
    let mc = model.config();
    if data.header.kind != cfg.mode {
        return Err(Error::setting(
            "mode",
            cfg.mode.name(),
            format!(
                "the dataset {} holds {} data (prepare it with `llada data prepare --kind {}`)",
                data.dir.display(),
                data.header.kind.name(),
                cfg.mode.name()
            ),
        ));
    }
    if cfg.mode == DataKind::Preference && mc.moe.is_some() {
        return Err(Error::setting(
            "mode",
            "vrpo",
            "is implemented for dense models (a mixture of experts' balancing loss is not part of VRPO's objective yet)",
        ));
    }
    check_answers_fit(cfg, data)?;
    if data.header.vocab_size > mc.embedding_size {
        return Err(Error::setting(
            "data",
            data.dir.display(),
            format!(
                "vocabulary mismatch: the data's tokenizer has {} tokens, the model's embedding only {}",
                data.header.vocab_size, mc.embedding_size
            ),
        ));
    }
    if cfg.seq_len > mc.max_sequence_length {
        return Err(Error::setting(
            "seq_len",
            cfg.seq_len,
            format!(
                "exceeds the model's max_sequence_length={}",
                mc.max_sequence_length
            ),
        ));
    }
    let causal_objective = cfg.objective == ObjectiveKind::Autoregressive;
    if causal_objective != mc.causal {
        return Err(Error::setting(
            "objective",
            format!("{:?}", cfg.objective).to_lowercase(),
            format!(
                "the model's config.json says causal_attention={}: the autoregressive objective needs a causal model and the diffusion objective a bidirectional one",
                mc.causal
            ),
        ));
    }
    if mc.mask_token_id.is_none() {
        return Err(Error::config(
            "mask_token_id",
            "absent",
            "training needs the mask id: give the run a tokenizer (--tokenizer DIR) to take it from, or add \"mask_token_id\" to config.json (LLaDA-MoE's and LLaDA2's name none: 156895 for their real tokenizers)",
        ));
    }
    Ok(())
}

/// A VRPO run's rewards: (step, reward margin, reward accuracy) of training steps and of
/// held-out evaluations.
pub type RewardCurves = (Vec<(f64, f64, f64)>, Vec<(f64, f64, f64)>);

/// The lines of a run folder's `metrics.jsonl`.
fn metrics_lines(out: &Path) -> Result<Vec<serde_json::Value>> {
    let rows: Vec<(usize, serde_json::Value)> =
        crate::error::read_jsonl(&out.join("metrics.jsonl"), "one JSON object per line")?;
    Ok(rows.into_iter().map(|(_, v)| v).collect())
}

/// The reward curves of a VRPO run folder (empty for other runs).
pub fn read_rewards(out: &Path) -> Result<RewardCurves> {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for v in metrics_lines(out)? {
        let step = v["step"].as_f64().unwrap_or(0.0);
        for (key, to) in [("rewards", &mut train), ("eval_rewards", &mut eval)] {
            let r = &v[key];
            if let (Some(m), Some(a)) = (r["reward_margin"].as_f64(), r["reward_accuracy"].as_f64())
            {
                to.push((step, m, a));
            }
        }
    }
    Ok((train, eval))
}

/// Reads `metrics.jsonl` of a run: (step, loss, lr) of training steps and (step, eval_loss).
pub type Curves = (Vec<(f64, f64, f64)>, Vec<(f64, f64)>);

/// The training and evaluation curves of a run folder.
pub fn read_metrics(out: &Path) -> Result<Curves> {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for v in metrics_lines(out)? {
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let (Some(l), Some(lr)) = (v["loss"].as_f64(), v["lr"].as_f64()) {
            train.push((step, l, lr));
        }
        if let Some(e) = v["eval_loss"].as_f64() {
            eval.push((step, e));
        }
    }
    Ok((train, eval))
}
