//! The mask predictor, behind one seam.
//!
//! - [`MaskPredictor`]: the only trait the sampler, the scorer, the server and the bench use to
//!   reach a model: logits of chosen canvas positions, with the cache modes ([`CacheMode`]).
//! - [`Architecture`]: config.json `architectures[0]` → the model that implements it, decided
//!   here and nowhere else. An architecture is one file ([`llada`], LLaDA-8B's; [`llada_moe`],
//!   LLaDA-MoE's; [`dream`], Dream's; [`llada2`], LLaDA2's) with its weights loaded through [`WeightSource`] and one [`MaskPredictor`]
//!   implementation (the LLaDA family shares [`llada::Llada`]'s forward and caches).
//! - The parts the architectures share: [`attention`] (RoPE, attention, the attention-bias
//!   builders), [`layers`] (linear maps over any weight format, RMSNorm, SwiGLU), [`moe`] (the
//!   mixture-of-experts layer, its expert-grouped kernel and load-balancing loss), [`cache`]
//!   (keys/values kept across denoising steps).

pub mod attention;
pub mod cache;
pub mod dream;
pub mod layers;
pub mod llada;
pub mod llada2;
pub mod llada_moe;
pub mod lora;
pub mod moe;

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::SafetensorsFiles;

pub use attention::{Attention, Rope, Visibility};
pub use cache::KvCache;
pub use layers::{Linear, LinearWeight, Mlp, RmsNorm};
pub use llada::{
    initial_tensor, random_tensor, tensor_specs, Block, Llada, LladaPredictor, PREFIX,
};

/// The model seam: logits of a canvas. Implemented once per architecture (with its cache modes)
/// and by test fakes.
pub trait MaskPredictor {
    /// Logits [B, |rows|, V] (f32) of the increasing canvas positions `rows` of `x` [B, L] (u32),
    /// with an optional key-padding mask [B, L] (1 = token, 0 = padding). A predictor may skip
    /// the work of the other rows (the last block's MLP, the output head).
    fn logits_at(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor>;

    /// Logits [B, hi − lo, V] of the positions `rows` = lo..hi: [`MaskPredictor::logits_at`]
    /// over the whole window.
    fn logits(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: Range<usize>,
    ) -> Result<Tensor> {
        let rows: Vec<usize> = rows.collect();
        self.logits_at(x, key_mask, &rows)
    }

    /// The device the canvas must be on.
    fn device(&self) -> Device;

    /// The longest canvas the model supports.
    fn max_sequence_length(&self) -> usize {
        usize::MAX
    }

    /// Called when the sampler starts a block (positions `block`): a caching predictor refreshes
    /// its keys/values on the next call and then recomputes only what `mode` says. Predictors
    /// without caches accept only [`CacheMode::None`].
    /// Block diffusion: the keys each query sees from now on (block-causal attention), for
    /// windows of a canvas of at most `len` positions (a caching predictor sizes its cache to
    /// it). Predictors with only bidirectional attention accept only [`Visibility::All`].
    fn set_visibility(&mut self, visibility: Visibility, len: usize) -> Result<()> {
        let _ = len;
        if visibility == Visibility::All {
            return Ok(());
        }
        Err(Error::setting(
            "attention",
            format!("{visibility:?}"),
            "this mask predictor has only bidirectional attention",
        ))
    }

    fn begin_block(&mut self, block: Range<usize>, mode: CacheMode) -> Result<()> {
        let _ = block;
        match mode {
            CacheMode::None => Ok(()),
            other => Err(Error::setting(
                "cache",
                other,
                "this mask predictor has no key/value cache",
            )),
        }
    }
}

impl<P: MaskPredictor + ?Sized> MaskPredictor for Box<P> {
    fn logits_at(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        (**self).logits_at(x, key_mask, rows)
    }
    fn logits(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: Range<usize>,
    ) -> Result<Tensor> {
        (**self).logits(x, key_mask, rows)
    }
    fn device(&self) -> Device {
        (**self).device()
    }
    fn max_sequence_length(&self) -> usize {
        (**self).max_sequence_length()
    }
    fn begin_block(&mut self, block: Range<usize>, mode: CacheMode) -> Result<()> {
        (**self).begin_block(block, mode)
    }
    fn set_visibility(&mut self, visibility: Visibility, len: usize) -> Result<()> {
        (**self).set_visibility(visibility, len)
    }
}

/// Which keys/values are reused between the steps of a block (Fast-dLLM, reference §6.4). The
/// names (`none`, `prefix`, `dual`) are the same for serde and clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum CacheMode {
    /// Every step is a full forward (the reference LLaDA sampler).
    #[default]
    None,
    /// Cache the prefix (prompt and finished blocks) once per block; recompute block + suffix.
    Prefix,
    /// Cache prefix and suffix once per block; recompute only the block.
    Dual,
}

impl CacheMode {
    /// The canvas positions a step after the block's first recomputes, for `block` of a canvas of
    /// `len` positions.
    pub fn recomputed(self, block: Range<usize>, len: usize) -> Range<usize> {
        match self {
            CacheMode::None => 0..len,
            CacheMode::Prefix => block.start..len,
            CacheMode::Dual => block,
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| Error::setting("cache", s, "must be none, prefix or dual"))
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = clap::ValueEnum::to_possible_value(self);
        f.write_str(v.as_ref().map_or("", |v| v.get_name()))
    }
}

/// Where a model's tensors come from.
pub trait WeightSource {
    /// The tensor `name` with exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// [`WeightSource::get`] in `dtype`, converted from what is stored where the source can
    /// (an adapter is merged into the stored values, not into values already rounded).
    fn get_in(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(self.get(name, shape)?.to_dtype(dtype)?)
    }
}

/// Tensors read from checkpoint files, converted to a dtype and placed on a device.
pub struct FileWeights<'a> {
    pub files: &'a SafetensorsFiles,
    pub dtype: DType,
    pub device: &'a Device,
}

impl WeightSource for FileWeights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.files.load(name, shape, self.dtype, self.device)
    }
    fn get_in(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.files.load(name, shape, dtype, self.device)
    }
}

/// Seeded random weights made on demand, tensor by tensor (benchmarks: an 8B-shaped model is
/// never held twice, and is packed as a loaded checkpoint would be). On the CPU each tensor's
/// stream is seeded by `seed` and its name, so the values do not depend on the order the loader
/// asks; on a GPU they come from the device's seeded generator.
pub struct RandomWeights<'a> {
    pub cfg: &'a ModelConfig,
    pub seed: u64,
    pub dtype: DType,
    pub device: &'a Device,
}

impl WeightSource for RandomWeights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        // FNV-1a of the name
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = crate::rng::Rng::new(self.seed ^ h);
        initial_tensor(self.cfg, name, shape, self.dtype, self.device, &mut rng)
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: "<memory>".into(),
        })?;
        if t.dims() != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: "<memory>".into(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }
}

/// How linear weights are held: dense tensors (training, GPUs) or packed for the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    Dense,
    /// Packed for inference where the CPU has a kernel for the dtype (dense otherwise).
    PackedForInference,
}

impl WeightLayout {
    /// The linear map of weight `w` [out, in] in this layout.
    pub fn linear(self, w: Tensor) -> Result<Linear> {
        Ok(match self {
            WeightLayout::Dense => Linear::dense(w),
            WeightLayout::PackedForInference => Linear::packed(w)?,
        })
    }
}

/// The architectures this engine implements, by config.json `architectures[0]`: adding one is a
/// model file, a variant here and a line in [`ARCHITECTURES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// LLaDA-8B-Base/-Instruct, LLaDA 1.5 ([`llada`]).
    Llada,
    /// LLaDA-MoE-7B-A1B-Base/-Instruct ([`llada_moe`]).
    LladaMoe,
    /// Dream-v0-Base/-Instruct-7B and its code family ([`dream`]).
    Dream,
    /// LLaDA2.0-mini/-flash, LLaDA2.1-mini: block diffusion with a mixture of experts
    /// ([`llada2`]).
    Llada2,
}

/// config.json `architectures[0]` → architecture. The one place that decides.
pub const ARCHITECTURES: &[(&str, Architecture)] = &[
    ("LLaDAModelLM", Architecture::Llada),
    ("LLaDAMoEModelLM", Architecture::LladaMoe),
    // the name llama.cpp's converter also registers for it
    ("LLaDAMoEModel", Architecture::LladaMoe),
    ("DreamModel", Architecture::Dream),
    ("LLaDA2MoeModelLM", Architecture::Llada2),
];

impl Architecture {
    /// The architecture named `name` (config.json `architectures[0]`).
    pub fn from_name(name: &str) -> Result<Self> {
        if let Some((_, a)) = ARCHITECTURES.iter().find(|(n, _)| *n == name) {
            return Ok(*a);
        }
        Err(Error::UnsupportedArchitecture {
            found: name.to_string(),
            supported: ARCHITECTURES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Loads this architecture's model from `src`.
    pub fn load(
        self,
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        layout: WeightLayout,
    ) -> Result<Model> {
        Ok(match self {
            Architecture::Llada
            | Architecture::LladaMoe
            | Architecture::Dream
            | Architecture::Llada2 => Model::Llada(Llada::load_with(cfg, src, layout)?),
        })
    }

    /// This architecture's model with seeded random weights for inference (benchmarks): made
    /// tensor by tensor ([`RandomWeights`]) and packed as a loaded checkpoint's.
    pub fn init_random(
        self,
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Model> {
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let src = RandomWeights {
            cfg,
            seed,
            dtype,
            device,
        };
        self.load(cfg, &src, WeightLayout::PackedForInference)
    }
}

/// A loaded model of any architecture.
#[derive(Debug, Clone)]
pub enum Model {
    /// The LLaDA family: LLaDA-8B, LLaDA-MoE and Dream (see [`Llada`]).
    Llada(Llada),
}

/// Runs `$e` with `$m` bound to the model inside `$model`, whatever its architecture.
macro_rules! each_model {
    ($model:expr, $m:ident => $e:expr) => {
        match $model {
            Model::Llada($m) => $e,
        }
    };
}

impl Model {
    /// The mask predictor for the sampler, the scorer, the server and the bench.
    pub fn predictor(&self) -> Box<dyn MaskPredictor + '_> {
        each_model!(self, m => Box::new(m.predictor()))
    }

    /// The architecture.
    pub fn architecture(&self) -> Architecture {
        self.config().architecture
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        each_model!(self, m => m.config())
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        each_model!(self, m => m.dtype())
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        each_model!(self, m => m.device())
    }

    /// Bytes the weights take in the compute dtype.
    pub fn weights_bytes(&self) -> u64 {
        each_model!(self, m => m.weights_bytes())
    }

    /// Every tensor with its checkpoint name (packed weights unpacked).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        each_model!(self, m => m.named_tensors())
    }

    /// Logits [B, L, V] (f32) of every position of `ids` [B, L], with an optional key-padding
    /// mask [B, L].
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        each_model!(self, m => m.forward(ids, key_mask))
    }

    /// The LLaDA-family model inside, for what only that family implements so far (training,
    /// the per-layer profile); an error naming the architecture otherwise.
    pub fn as_llada(&self) -> Result<&Llada> {
        match self {
            Model::Llada(m) => Ok(m),
        }
    }
}
