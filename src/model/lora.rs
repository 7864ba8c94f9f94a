//! LoRA adapters (Hu et al., 2021) in Hugging Face PEFT's format: a frozen weight W [out, in]
//! plus a low-rank update, `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with A [r, in], B [out, r] and s = α/r
//! (α/√r with rsLoRA).
//!
//! On disk an adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`
//! whose tensors are named as PEFT names them on the official model:
//! `base_model.model.<module>.lora_A.weight` / `….lora_B.weight`, where `<module>` is the
//! checkpoint name of the weight without `.weight` (`model.transformer.blocks.3.q_proj`). A
//! PyTorch user loads it with `PeftModel.from_pretrained(model, dir)`; llada loads PEFT's own
//! adapters of the same models.
//!
//! Three uses: [`Lora`] is the unmerged weight (training; inference of a model being trained);
//! [`AdaptedWeights`] merges an adapter into the weights as they are loaded (every inference
//! command's `--adapter`: the model then runs at the base model's speed); [`merge`] writes the
//! merged checkpoint (`llada lora merge`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result as CResult, Tensor};
use serde::{Deserialize, Serialize};

use super::layers::{diff_matmul_t, Linear, LinearWeight};
use super::WeightSource;
use crate::error::{read_json, Error, Result};
use crate::weights::{atomic_write, safetensors_bytes, SafetensorsFiles};

/// PEFT's adapter settings file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter tensors file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The linear maps of a LLaDA block an adapter may target (their checkpoint names).
pub const TARGETS: &[&str] = &[
    "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out",
];

/// The training settings of a LoRA run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    /// The rank r of every update.
    pub rank: usize,
    /// α: the update is scaled by α/r.
    pub alpha: f64,
    /// Which linear maps of every block get an adapter ([`TARGETS`]).
    pub targets: Vec<String>,
}

impl Default for LoraSettings {
    /// Rank 16, α = 32, every target.
    fn default() -> Self {
        LoraSettings {
            rank: 16,
            alpha: 32.0,
            targets: TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraSettings {
    /// Checks the rank, α and the target names.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::setting("lora rank", self.rank, "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::setting(
                "lora alpha",
                self.alpha,
                "must be a positive number",
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::setting(
                "lora targets",
                "none",
                format!("name at least one of {}", TARGETS.join(",")),
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(t) {
                return Err(Error::setting(
                    "lora targets",
                    t,
                    "is named twice: name each linear map once",
                ));
            }
            if !TARGETS.contains(&t.as_str()) {
                return Err(Error::setting(
                    "lora targets",
                    t,
                    format!("each target must be one of {}", TARGETS.join(",")),
                ));
            }
        }
        Ok(())
    }

    /// s = α/r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// PEFT's `adapter_config.json`: the fields llada reads, the others kept as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    /// A list of module names (suffix match) or a regular expression (full match).
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

impl PeftConfig {
    /// The file PEFT writes for an adapter trained with `s` on the model in `base`.
    pub fn for_training(s: &LoraSettings, base: &str) -> Self {
        let targets = s.targets.join("|");
        let mut other = serde_json::Map::new();
        for (k, v) in [
            ("task_type", serde_json::Value::Null),
            ("inference_mode", serde_json::Value::Bool(true)),
            ("init_lora_weights", serde_json::Value::Bool(true)),
            ("layers_to_transform", serde_json::Value::Null),
            ("layers_pattern", serde_json::Value::Null),
            ("revision", serde_json::Value::Null),
        ] {
            other.insert(k.into(), v);
        }
        PeftConfig {
            peft_type: "LORA".into(),
            r: s.rank,
            lora_alpha: s.alpha,
            // a regular expression (PEFT full-matches it): the block's maps only, never the
            // output head `model.transformer.ff_out`, which the name `ff_out` alone would match
            target_modules: serde_json::Value::String(format!(r".*\.blocks\.\d+\.({targets})")),
            lora_dropout: 0.0,
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            modules_to_save: None,
            base_model_name_or_path: Some(base.to_string()),
            other,
        }
    }

    /// The scale of an update of rank `r` (a module's rank may differ from `r` through
    /// `rank_pattern`; its tensors say which).
    fn scale(&self, r: usize) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (r as f64).sqrt()
        } else {
            self.lora_alpha / r as f64
        }
    }

    /// Refuses what llada does not implement, naming the field.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(bad(format!(
                "field peft_type = {:?}: llada loads LORA adapters only",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(bad("field r = 0: must be at least 1".into()));
        }
        if !self.lora_alpha.is_finite() {
            return Err(bad(format!(
                "field lora_alpha = {} must be a number",
                self.lora_alpha
            )));
        }
        if self.use_dora {
            return Err(bad(
                "field use_dora = true: DoRA adapters are not supported".into(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(bad(
                "field fan_in_fan_out = true: only nn.Linear layouts (false) are supported".into(),
            ));
        }
        if self.bias != "none" {
            return Err(bad(format!(
                "field bias = {:?}: only adapters without bias terms (\"none\") are supported",
                self.bias
            )));
        }
        if !self.alpha_pattern.is_empty() {
            return Err(bad(
                "field alpha_pattern is not empty: per-module α is not supported".into(),
            ));
        }
        if self
            .other
            .get("layer_replication")
            .is_some_and(|v| !v.is_null())
        {
            return Err(bad(
                "field layer_replication is set: adapters that replicate layers are not supported"
                    .into(),
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad(
                "field modules_to_save is not empty: adapters that replace whole modules are not supported"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// PEFT's tensor name of `which` ("A" or "B") for the checkpoint weight `weight`
/// (`model.transformer.blocks.0.q_proj.weight`).
pub fn peft_name(weight: &str, which: &str) -> String {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// The checkpoint weight and the factor ("A"/"B") of a PEFT tensor name; `None` for names that
/// are not LoRA factors.
fn weight_of(peft: &str) -> Option<(String, &'static str)> {
    let rest = peft.strip_prefix("base_model.model.").unwrap_or(peft);
    for (suffix, which) in [(".lora_A.weight", "A"), (".lora_B.weight", "B")] {
        if let Some(module) = rest.strip_suffix(suffix) {
            // an adapter saved with its name in the key (`….lora_A.default.weight`) is not
            // PEFT's saved form; plain keys only
            return Some((format!("{module}.weight"), which));
        }
    }
    None
}

/// One weight's update: A [r, in], B [out, r] (f32) and its scale.
#[derive(Debug, Clone)]
pub struct Update {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Update {
    /// s·B·A [out, in] in f32.
    pub fn delta(&self) -> CResult<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// An adapter read from a PEFT folder.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: PeftConfig,
    /// Checkpoint weight name → its update.
    pub updates: BTreeMap<String, Update>,
}

impl Adapter {
    /// Reads and checks the adapter in `dir` (f32 on `device`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        if !cfg_path.is_file() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "not an adapter folder: {ADAPTER_CONFIG} not found (an adapter is a PEFT folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
                ),
            });
        }
        let config: PeftConfig = read_json(&cfg_path)?;
        config.check(&cfg_path)?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        if !wpath.is_file() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!("{ADAPTER_WEIGHTS} not found (adapter_model.bin, PyTorch's pickle format, is not read: save with safe_serialization=True)"),
            });
        }
        let files = SafetensorsFiles::open_file(&wpath)?;
        let mut halves: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
        for name in files.names() {
            let Some((weight, which)) = weight_of(name) else {
                return Err(Error::Checkpoint {
                    path: wpath.clone(),
                    reason: format!(
                        "tensor {name} is not a LoRA factor (…lora_A.weight / …lora_B.weight)"
                    ),
                });
            };
            let e = halves.entry(weight).or_default();
            if which == "A" {
                e.0 = Some(name.to_string());
            } else {
                e.1 = Some(name.to_string());
            }
        }
        if halves.is_empty() {
            return Err(Error::Checkpoint {
                path: wpath,
                reason: "holds no LoRA factors".into(),
            });
        }
        let mut updates = BTreeMap::new();
        for (weight, (a, b)) in halves {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Checkpoint {
                    path: wpath.clone(),
                    reason: format!("the update of {weight} lacks its lora_A or lora_B factor"),
                });
            };
            let shape = |n: &str| files.shape(n).map(<[usize]>::to_vec).unwrap_or_default();
            let (sa, sb) = (shape(&a), shape(&b));
            if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] || sa[0] == 0 {
                return Err(Error::Checkpoint {
                    path: wpath.clone(),
                    reason: format!(
                        "the factors of {weight} have shapes {sa:?} (A) and {sb:?} (B): expected [r, in] and [out, r]"
                    ),
                });
            }
            if config.rank_pattern.is_empty() && sa[0] != config.r {
                return Err(Error::Checkpoint {
                    path: wpath.clone(),
                    reason: format!(
                        "the update of {weight} has rank {} but adapter_config.json says r = {} (and no rank_pattern)",
                        sa[0], config.r
                    ),
                });
            }
            let a = files.load(&a, &sa, DType::F32, device)?;
            let b = files.load(&b, &sb, DType::F32, device)?;
            let scale = config.scale(sa[0]);
            updates.insert(weight, Update { a, b, scale });
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            updates,
        })
    }

    /// The base model the adapter was trained on, as its config names it.
    pub fn base_model(&self) -> Option<&str> {
        self.config.base_model_name_or_path.as_deref()
    }
}

/// Writes an adapter in PEFT's format into `dir` (atomically, file by file): `updates` are
/// (checkpoint weight name, A, B).
pub fn save(dir: &Path, config: &PeftConfig, updates: &[(String, Tensor, Tensor)]) -> Result<()> {
    let mut tensors = Vec::with_capacity(updates.len() * 2);
    for (w, a, b) in updates {
        tensors.push((peft_name(w, "A"), a.to_dtype(DType::F32)?));
        tensors.push((peft_name(w, "B"), b.to_dtype(DType::F32)?));
    }
    atomic_write(&dir.join(ADAPTER_WEIGHTS), &safetensors_bytes(&tensors)?)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Json {
        path: dir.join(ADAPTER_CONFIG),
        source: e,
    })?;
    atomic_write(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

/// A weight source with an adapter merged into the weights it names: W + s·B·A, computed in
/// f32 and rounded once to the weight's dtype. [`AdaptedWeights::finish`] checks that every
/// update found its weight.
pub struct AdaptedWeights<'a> {
    pub inner: &'a dyn WeightSource,
    pub adapter: &'a Adapter,
    /// The dtype the merged weights are rounded to (the run dtype).
    pub dtype: DType,
    used: RefCell<BTreeSet<String>>,
}

impl<'a> AdaptedWeights<'a> {
    pub fn new(inner: &'a dyn WeightSource, adapter: &'a Adapter, dtype: DType) -> Self {
        AdaptedWeights {
            inner,
            adapter,
            dtype,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// An error naming the first update no weight of the model took.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        if let Some(name) = self.adapter.updates.keys().find(|n| !used.contains(*n)) {
            return Err(Error::Checkpoint {
                path: self.adapter.dir.clone(),
                reason: format!(
                    "the adapter updates {name}, which this model does not have (an adapter of another model?)"
                ),
            });
        }
        Ok(())
    }
}

impl WeightSource for AdaptedWeights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(u) = self.adapter.updates.get(name) else {
            return self.inner.get(name, shape);
        };
        // the stored weight in f32, the update added, one rounding to the run dtype
        let w = self.inner.get_in(name, shape, DType::F32)?;
        let merged = merge_one(name, &w, u, &self.adapter.dir)?.to_dtype(self.dtype)?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(merged)
    }
}

/// W + s·B·A in W's dtype, after checking the shapes.
fn merge_one(name: &str, w: &Tensor, u: &Update, dir: &Path) -> Result<Tensor> {
    let (out, inp) = match w.dims() {
        [o, i] => (*o, *i),
        d => {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "the adapter updates {name}, a tensor of shape {d:?}, not a matrix"
                ),
            })
        }
    };
    let (a, b) = (u.a.dims2()?, u.b.dims2()?);
    if a.1 != inp || b.0 != out || a.0 != b.1 {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "the update of {name} has A [{}, {}] and B [{}, {}]; the weight is [{out}, {inp}]: expected A [r, {inp}] and B [{out}, r]", a.0, a.1, b.0, b.1
            ),
        });
    }
    let d = u.delta()?.to_device(w.device())?;
    Ok((w.to_dtype(DType::F32)? + d)?.to_dtype(w.dtype())?)
}

/// Writes the checkpoint `model` with `adapter` merged into `out` (config, tokenizer files,
/// safetensors in the model's stored dtypes). `out` must not exist or be empty.
pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Result<PathBuf> {
    let (raw, _) = crate::checkpoint::read_config(model)?;
    let files = SafetensorsFiles::open(model)?;
    let ad = Adapter::load(adapter, &Device::Cpu)?;
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::OutputFolder {
            path: out.to_path_buf(),
            reason: "exists and is not empty: give a new folder".into(),
        });
    }
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    for n in ad.updates.keys() {
        if !names.contains(n) {
            return Err(Error::Checkpoint {
                path: adapter.to_path_buf(),
                reason: format!(
                    "the adapter updates {n}, which {} does not have (an adapter of another model?)",
                    model.display()
                ),
            });
        }
    }
    let specs: Vec<(String, Vec<usize>, DType)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                files.shape(n).map(<[usize]>::to_vec).unwrap_or_default(),
                files.stored_dtype(n).unwrap_or(DType::F32),
            )
        })
        .collect();
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = || -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut i = 0;
        crate::weights::save_safetensors_with(
            &tmp,
            &specs,
            crate::checkpoint::DEFAULT_SHARD_BYTES,
            &mut |name, shape| {
                let dt = specs[i].2;
                i += 1;
                let w = files.load(name, shape, dt, &Device::Cpu)?;
                match ad.updates.get(name) {
                    Some(u) => merge_one(name, &w, u, adapter),
                    None => Ok(w),
                }
            },
        )?;
        crate::checkpoint::write_config(&tmp, &raw)?;
        for f in crate::checkpoint::TOKENIZER_FILES {
            let p = model.join(f);
            if p.is_file() {
                let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
                atomic_write(&tmp.join(f), &bytes)?;
            }
        }
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(out.to_path_buf())
}

thread_local! {
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the guard lives, every unmerged [`Lora`] weight on this thread computes with its frozen
/// base alone: the model being trained *is* its reference model (VRPO's reference terms need
/// no second copy of the weights). Forward passes only: [`LinearWeight::to_tensor`] still gives
/// the merged weight.
pub fn without_adapters() -> AdaptersOffGuard {
    AdaptersOffGuard(ADAPTERS_OFF.with(|c| c.replace(true)))
}

/// Restores the previous state when dropped.
#[must_use = "the adapters are off only while the guard lives"]
pub struct AdaptersOffGuard(bool);

impl Drop for AdaptersOffGuard {
    fn drop(&mut self) {
        ADAPTERS_OFF.with(|c| c.set(self.0));
    }
}

fn adapters_off() -> bool {
    ADAPTERS_OFF.with(|c| c.get())
}

/// A weight with an unmerged low-rank update: `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`. W is frozen; A and B may be
/// trainable variables (their products are differentiable).
#[derive(Debug)]
pub struct Lora {
    pub base: Linear,
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
}

impl Lora {
    /// The update of `x` [N, in] → [N, out] in `dtype` (inference).
    fn update(&self, x: &Tensor, dtype: DType) -> CResult<Tensor> {
        let xa = crate::kernels::plain_matmul(&x.to_dtype(self.a.dtype())?, &self.a.t()?)?;
        let d = (crate::kernels::plain_matmul(&xa, &self.b.t()?)? * self.scale)?;
        d.to_dtype(dtype)
    }
}

impl LinearWeight for Lora {
    fn dims(&self) -> (usize, usize) {
        self.base.dims()
    }
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let y = self.base.forward(x)?;
        if adapters_off() {
            return Ok(y);
        }
        let d = self.update(x, y.dtype())?;
        y + d
    }
    fn forward_add(&self, x: &Tensor, res: &Tensor) -> CResult<Tensor> {
        let y = self.base.forward_add(x, res)?;
        if adapters_off() {
            return Ok(y);
        }
        let d = self.update(x, y.dtype())?;
        y + d
    }
    fn forward_f32(&self, x: &Tensor) -> CResult<Tensor> {
        let y = self.base.forward_f32(x)?;
        if adapters_off() {
            return Ok(y);
        }
        y + self.update(x, DType::F32)?
    }
    fn to_tensor(&self) -> CResult<Tensor> {
        let w = self.base.tensor()?;
        let d = ((self.b.matmul(&self.a)? * self.scale)?).to_device(w.device())?;
        (w.to_dtype(DType::F32)? + d)?.to_dtype(w.dtype())
    }
    /// PEFT's order: base(x) + B(A(x))·s.
    fn forward_diff(&self, x: &Tensor) -> CResult<Tensor> {
        let y = self.base.forward_diff(x)?;
        if adapters_off() {
            return Ok(y);
        }
        let xa = diff_matmul_t(x, &self.a)?;
        let d = (diff_matmul_t(&xa, &self.b)? * self.scale)?;
        let d = d.to_dtype(y.dtype())?;
        y + d
    }
}
