//! `config.json` of a LLaDA checkpoint: [`LladaConfig`] mirrors the file's keys verbatim (reference
//! §2.1); [`LladaConfig::resolve`] checks it and turns it into the plain [`ModelConfig`] the model is
//! built from. Unknown keys are tolerated (Hugging Face adds many); values that would change the
//! model's semantics and that this engine does not implement are rejected, naming the key.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};
use crate::model::Architecture;

pub mod dream;
pub mod llada2;
pub mod llada_moe;

pub use dream::DreamConfig;
pub use llada2::Llada2Config;
pub use llada_moe::LladaMoeConfig;

/// `config.json` as written by Hugging Face for GSAI-ML/LLaDA-8B-Base/-Instruct. Every key of
/// reference §2.1; `None` where the file may hold `null` or omit the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LladaConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub auto_map: Option<serde_json::Value>,
    /// Hidden size D.
    pub d_model: usize,
    pub n_layers: usize,
    /// Query heads H; head_dim = d_model / n_heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when smaller than `n_heads`); `None` means `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// If true: one KV head (must not conflict with `n_kv_heads`).
    pub multi_query_attention: Option<bool>,
    /// FFN inner size F; takes precedence over `mlp_ratio`.
    pub mlp_hidden_size: Option<usize>,
    pub mlp_ratio: usize,
    pub activation_type: String,
    pub block_type: String,
    pub block_group_size: usize,
    pub rope: bool,
    pub rope_theta: f64,
    pub rope_full_precision: bool,
    pub alibi: bool,
    pub alibi_bias_max: f64,
    pub max_sequence_length: usize,
    pub layer_norm_type: String,
    pub layer_norm_with_affine: bool,
    pub bias_for_layer_norm: Option<bool>,
    pub rms_norm_eps: f64,
    pub attention_layer_norm: bool,
    pub attention_layer_norm_with_affine: bool,
    pub include_bias: bool,
    pub include_qkv_bias: Option<bool>,
    pub input_emb_norm: bool,
    pub scale_logits: bool,
    pub weight_tying: bool,
    pub vocab_size: usize,
    /// Rows of the embedding and of the output head; `None` means `vocab_size`.
    pub embedding_size: Option<usize>,
    pub mask_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub attention_dropout: f64,
    pub residual_dropout: f64,
    pub embedding_dropout: f64,
    pub flash_attention: bool,
    pub init_device: Option<String>,
    pub init_fn: Option<String>,
    pub init_std: f64,
    pub init_cutoff_factor: Option<f64>,
    pub precision: Option<String>,
    pub use_cache: bool,
    pub transformers_version: Option<String>,
    /// llada extension (absent from published checkpoints): a causal attention mask, which turns
    /// the mask predictor into its autoregressive twin (next-token prediction).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub causal_attention: bool,
}

impl Default for LladaConfig {
    /// The LLaDA-8B values of reference §2.1.
    fn default() -> Self {
        LladaConfig {
            model_type: Some("llada".into()),
            architectures: Some(vec!["LLaDAModelLM".into()]),
            auto_map: None,
            d_model: 4096,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: None,
            multi_query_attention: None,
            mlp_hidden_size: None,
            mlp_ratio: 4,
            activation_type: "silu".into(),
            block_type: "llama".into(),
            block_group_size: 1,
            rope: true,
            rope_theta: 500000.0,
            rope_full_precision: true,
            alibi: false,
            alibi_bias_max: 8.0,
            max_sequence_length: 4096,
            layer_norm_type: "rms".into(),
            layer_norm_with_affine: true,
            bias_for_layer_norm: None,
            rms_norm_eps: 1e-5,
            attention_layer_norm: false,
            attention_layer_norm_with_affine: true,
            include_bias: false,
            include_qkv_bias: None,
            input_emb_norm: false,
            scale_logits: false,
            weight_tying: false,
            vocab_size: 126464,
            embedding_size: None,
            mask_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            attention_dropout: 0.0,
            residual_dropout: 0.0,
            embedding_dropout: 0.0,
            flash_attention: false,
            init_device: None,
            init_fn: None,
            init_std: 0.02,
            init_cutoff_factor: None,
            precision: None,
            use_cache: false,
            transformers_version: None,
            causal_attention: false,
        }
    }
}

/// Which normalisation the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// x / rms(x) · w
    Rms,
    /// x / rms(x) · (1 + w)
    GemmaRms,
}

/// The mixture-of-experts part of a configuration (LLaDA-MoE).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Inner size of each expert's SwiGLU.
    pub expert_size: usize,
    /// Per layer: true = mixture of experts, false = a dense SwiGLU of `mlp_hidden_size`.
    pub layers: Vec<bool>,
    /// Inner size of the shared expert every token also goes through, if any.
    pub shared_expert_size: Option<usize>,
    /// A per-expert bias added to the router probabilities (`mlp.expert_bias` tensors).
    pub expert_bias: bool,
    /// Weight of the load-balancing loss in training (`router_aux_loss_coef`).
    pub aux_loss_coef: f64,
    /// How the router turns its logits into experts and weights.
    pub router: Router,
}

/// A mixture-of-experts router's rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Router {
    /// LLaDA-MoE: softmax in f32, the expert bias added to the probabilities, the top-k biased
    /// probabilities weight the experts (not renormalised).
    Softmax,
    /// LLaDA2 (DeepSeek-V3-style): s = sigmoid(logits) in f32; the biased scores s + bias choose:
    /// the experts are split into `n_group` contiguous groups scored by the sum of their two best
    /// biased scores, the `topk_group` best groups are kept, and the top-k biased scores among
    /// their experts are chosen; the weights are the chosen experts' unbiased s, divided by their
    /// sum (+1e-20) and multiplied by `scaling` (`routed_scaling_factor`).
    SigmoidGrouped {
        n_group: usize,
        topk_group: usize,
        scaling: f64,
    },
}

/// The checked, resolved model configuration (no `Option`s where the model needs a value).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which model file implements it.
    pub architecture: Architecture,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dims of each query/key head that RoPE rotates (the first ones, rotate-half within them;
    /// LLaDA2's partial rotary); `head_dim` for the other architectures.
    pub rotary_dim: usize,
    pub mlp_hidden_size: usize,
    /// Real token ids (0..vocab_size).
    pub vocab_size: usize,
    /// Rows of `wte` and of the output head (the logit width V).
    pub embedding_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub norm: NormKind,
    pub weight_tying: bool,
    pub max_sequence_length: usize,
    pub mask_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub init_std: f64,
    pub causal: bool,
    /// RMSNorm over each query and key head (one `[head_dim]` weight shared by the heads) before
    /// RoPE (LLaDA-MoE's `qk_layernorm`).
    pub qk_norm: bool,
    /// Biases on the query, key and value projections (Dream's Qwen2 blocks).
    pub qkv_bias: bool,
    /// The output at position i predicts position i + 1 (Dream, adapted from an autoregressive
    /// model): the mask predictor reads position i's logits from output i − 1 (position 0 from
    /// its own), as Dream's sampler shifts them. The raw forward is not shifted.
    pub logits_shift: bool,
    /// Whether a key-padding mask is honoured. LLaDA-8B's forward does; LLaDA-MoE's official one
    /// ignores it (pads are ordinary tokens), so there it is an opt-in.
    pub mask_padding: bool,
    /// Mixture-of-experts layers (LLaDA-MoE); `None` for dense models.
    pub moe: Option<MoeSpec>,
}

impl ModelConfig {
    /// Number of parameters (embedding, blocks, final norm, untied head); `u64::MAX` for a
    /// config too large to count (computed in u128, so no size of a resolved config overflows).
    pub fn parameter_count(&self) -> u64 {
        self.count(false)
    }

    /// Parameters one token's forward multiplies with: the blocks with only `top_k` experts per
    /// mixture-of-experts layer, the final norm and the head (the embedding is a lookup). For a
    /// dense model: every parameter but the embedding.
    pub fn active_parameter_count(&self) -> u64 {
        self.count(true)
    }

    fn count(&self, active: bool) -> u64 {
        let (d, v) = (self.d_model as u128, self.embedding_size as u128);
        let blocks: u128 = (0..self.n_layers)
            .map(|i| self.attention_params() + self.ffn_params(i, active) + 2 * d)
            .sum();
        let head = if self.weight_tying && !active {
            0
        } else {
            v * d
        };
        let embedding = if active { 0 } else { v * d };
        u64::try_from(embedding + blocks + d + head).unwrap_or(u64::MAX)
    }

    /// Parameters of one attention (projections and QK norms).
    fn attention_params(&self) -> u128 {
        let d = self.d_model as u128;
        let q = self.n_heads as u128 * self.head_dim as u128;
        let kv = self.n_kv_heads as u128 * self.head_dim as u128;
        let norms = if self.qk_norm {
            2 * self.head_dim as u128
        } else {
            0
        };
        let biases = if self.qkv_bias { q + 2 * kv } else { 0 };
        2 * d * q + 2 * d * kv + norms + biases
    }

    /// Parameters of layer `i`'s feed-forward part (with `active`: the ones a token uses).
    fn ffn_params(&self, i: usize, active: bool) -> u128 {
        let d = self.d_model as u128;
        let swiglu = |f: usize| 3 * d * f as u128;
        match &self.moe {
            Some(m) if m.layers.get(i).copied().unwrap_or(false) => {
                let e = m.num_experts as u128;
                let used = if active { m.top_k as u128 } else { e };
                let bias = if m.expert_bias { e } else { 0 };
                e * d + bias + used * swiglu(m.expert_size) + m.shared_expert_size.map_or(0, swiglu)
            }
            _ => swiglu(self.mlp_hidden_size),
        }
    }

    /// Multiply-accumulate FLOPs (2 per MAC) of one forward pass over `batch` sequences of `len`
    /// tokens: linear layers, attention scores and values, output head.
    pub fn forward_flops(&self, batch: usize, len: usize) -> f64 {
        self.chunk_flops(batch, len, len, len)
    }

    /// Matrix-product FLOPs of an inference forward that recomputes `chunk` positions of a canvas
    /// of `total` (the others' keys and values cached) and reads the logits of `rows` of them:
    /// the last block's feed-forward part and the head run only on those rows, as the engine
    /// does. Mixture-of-experts layers count the experts a token uses.
    pub fn chunk_flops(&self, batch: usize, chunk: usize, total: usize, rows: usize) -> f64 {
        let (d, v) = (self.d_model as f64, self.embedding_size as f64);
        let q = (self.n_heads * self.head_dim) as f64;
        let kv = (self.n_kv_heads * self.head_dim) as f64;
        let b = batch as f64;
        let (n, r) = (chunk as f64, rows.min(chunk) as f64);
        let attn =
            2.0 * b * n * (2.0 * d * q + 2.0 * d * kv) + 2.0 * 2.0 * b * n * total as f64 * q;
        let ffn = |i: usize, tokens: f64| 2.0 * b * tokens * self.ffn_params(i, true) as f64;
        let last = self.n_layers.saturating_sub(1);
        let layers: f64 = (0..self.n_layers)
            .map(|i| attn + ffn(i, if i == last { r } else { n }))
            .sum();
        layers + 2.0 * b * r * d * v
    }
}

/// A `config.json` of any architecture this engine implements, as the file says it (written back
/// as read: keys this engine does not model are not kept).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RawConfig {
    /// LLaDA-8B-Base/-Instruct, LLaDA 1.5.
    Llada(LladaConfig),
    /// LLaDA-MoE-7B-A1B.
    LladaMoe(LladaMoeConfig),
    /// Dream-v0-7B.
    Dream(DreamConfig),
    /// LLaDA2.0/2.1 (mini, flash).
    Llada2(Llada2Config),
}

impl From<LladaConfig> for RawConfig {
    fn from(c: LladaConfig) -> Self {
        RawConfig::Llada(c)
    }
}

impl RawConfig {
    /// Reads `config.json`, choosing its schema from `architectures[0]` (see
    /// [`Architecture::from_name`], the one place that decides), without checking it (see
    /// [`RawConfig::resolve`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(read_json(path)?, path)
    }

    /// [`RawConfig::from_file`] of JSON read from `path`.
    pub fn from_value(v: serde_json::Value, path: &Path) -> Result<Self> {
        let parse_err = |source: serde_json::Error| Error::Json {
            path: path.to_path_buf(),
            source,
        };
        let arch = match v.get("architectures").and_then(|a| a.get(0)) {
            Some(serde_json::Value::String(n)) => Some(Architecture::from_name(n)?),
            _ => None,
        };
        Ok(match arch {
            Some(Architecture::LladaMoe) => {
                RawConfig::LladaMoe(serde_json::from_value(v).map_err(parse_err)?)
            }
            Some(Architecture::Dream) => {
                RawConfig::Dream(serde_json::from_value(v).map_err(parse_err)?)
            }
            Some(Architecture::Llada2) => {
                RawConfig::Llada2(serde_json::from_value(v).map_err(parse_err)?)
            }
            Some(Architecture::Llada) | None => {
                RawConfig::Llada(serde_json::from_value(v).map_err(parse_err)?)
            }
        })
    }

    /// The architecture name the file gives (`architectures[0]`).
    pub fn architecture(&self) -> Result<String> {
        match self {
            RawConfig::Llada(c) => c.architecture(),
            RawConfig::LladaMoe(c) => Ok(c
                .architectures
                .as_ref()
                .and_then(|a| a.first().cloned())
                .unwrap_or_else(|| "LLaDAMoEModelLM".into())),
            RawConfig::Dream(c) => Ok(c.architecture()),
            RawConfig::Llada2(c) => Ok(c.architecture()),
        }
    }

    /// Checks every key that changes semantics and resolves defaults.
    pub fn resolve(&self) -> Result<ModelConfig> {
        match self {
            RawConfig::Llada(c) => c.resolve(),
            RawConfig::LladaMoe(c) => c.resolve(),
            RawConfig::Dream(c) => c.resolve(),
            RawConfig::Llada2(c) => c.resolve(),
        }
    }

    /// The LLaDA-8B config inside (what only that architecture's tools take).
    pub fn as_llada(&self) -> Option<&LladaConfig> {
        match self {
            RawConfig::Llada(c) => Some(c),
            RawConfig::LladaMoe(_) | RawConfig::Dream(_) | RawConfig::Llada2(_) => None,
        }
    }
}

/// Refuses a configuration whose f32 weights cannot be addressed on this machine (`key`=`value`
/// is named in the error). The sizes multiply to the parameter count (saturating at u64::MAX):
/// one that does not fit can be neither loaded nor initialised, and is refused before anything
/// sizes an allocation from it (`llada init`, training from a config).
pub(crate) fn check_addressable(cfg: &ModelConfig, key: &str, value: usize) -> Result<()> {
    let count = cfg.parameter_count();
    if count
        .checked_mul(4)
        .is_none_or(|bytes| usize::try_from(bytes).is_err())
    {
        let shown = if count == u64::MAX {
            format!("at least {count}")
        } else {
            count.to_string()
        };
        return Err(Error::config(
            key,
            value,
            format!(
                "with n_layers={}, mlp_hidden_size={} and embedding_size={} the model has {shown} parameters, whose f32 bytes exceed this machine's address space ({} bits)",
                cfg.n_layers,
                cfg.mlp_hidden_size,
                cfg.embedding_size,
                usize::BITS
            ),
        ));
    }
    Ok(())
}

/// A size key of a Hugging Face config that must be at least `min` (named in the error).
pub(crate) fn size_key(key: &str, v: i64, min: i64) -> Result<usize> {
    if v < min {
        return Err(Error::config(key, v, format!("must be at least {min}")));
    }
    usize::try_from(v).map_err(|_| Error::config(key, v, "too large"))
}

/// The special ids a config names (`mask_token_id`, `eos_token_id`, `pad_token_id`) must be
/// tokens of the vocabulary.
pub(crate) fn check_special_ids(
    vocab: usize,
    mask: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
) -> Result<()> {
    for (key, id) in [
        ("mask_token_id", mask),
        ("eos_token_id", eos),
        ("pad_token_id", pad),
    ] {
        if let Some(id) = id.filter(|&id| id as usize >= vocab) {
            return Err(Error::config(
                key,
                id,
                format!("must be < vocab_size={vocab}"),
            ));
        }
    }
    Ok(())
}

/// Query and key/value heads of a Hugging Face config: the KV heads divide the query heads
/// (GQA), and `hidden_size` splits into even heads unless `head_dim` is given.
pub(crate) fn hf_heads(d: usize, n_heads: usize, n_kv_heads: usize) -> Result<usize> {
    if !n_heads.is_multiple_of(n_kv_heads) {
        return Err(Error::config(
            "num_key_value_heads",
            n_kv_heads,
            format!("must divide num_attention_heads={n_heads}"),
        ));
    }
    if !d.is_multiple_of(n_heads) {
        return Err(Error::config(
            "hidden_size",
            d,
            format!("must be divisible by num_attention_heads={n_heads}"),
        ));
    }
    let head_dim = d / n_heads;
    if !head_dim.is_multiple_of(2) {
        return Err(Error::config(
            "hidden_size",
            d,
            format!("head dim hidden_size/num_attention_heads={head_dim} must be even for RoPE"),
        ));
    }
    Ok(head_dim)
}

/// A RoPE base and a norm epsilon the model can compute with: impossible values are errors,
/// suspicious ones a warning (see [`RMS_NORM_EPS_MAX`], [`RMS_NORM_EPS_SUSPICIOUS`]). `usual`
/// completes the RoPE error (e.g. "LLaDA uses 500000").
pub(crate) fn check_eps_and_theta(eps: f64, rope_theta: f64, usual: &str) -> Result<()> {
    // The base is used in f32: θ^(2j/hd) with θ ≤ 1 gives frequencies ≥ 1 (no positional
    // resolution, and 0 or underflow gives infinities); past f32's range it is infinite.
    let theta32 = rope_theta as f32;
    if !(rope_theta.is_finite() && theta32.is_finite() && rope_theta > 1.0) {
        return Err(Error::config(
            "rope_theta",
            rope_theta,
            format!("must be a finite number > 1 that fits f32 (the RoPE base; {usual})"),
        ));
    }
    if !(eps.is_finite() && (0.0..=RMS_NORM_EPS_MAX).contains(&eps)) {
        return Err(Error::config(
            "rms_norm_eps",
            eps,
            format!("must be a finite number in [0, {RMS_NORM_EPS_MAX}] (LLaDA uses 1e-5)"),
        ));
    }
    if eps > RMS_NORM_EPS_SUSPICIOUS {
        tracing::warn!(
            "config.json: rms_norm_eps={eps} is unusually large (models use about 1e-6..1e-5): it dominates the mean square of small activations and flattens the normalisation"
        );
    }
    if rope_theta < ROPE_THETA_SUSPICIOUS {
        tracing::warn!(
            "config.json: rope_theta={rope_theta} is unusually small (models use 1e4..1e6): positions far apart get near-identical rotations"
        );
    }
    Ok(())
}

impl LladaConfig {
    /// Reads and parses `config.json` (without checking it; see [`LladaConfig::resolve`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// The architecture named by the file (`architectures[0]`), or `LLaDAModelLM` when the file
    /// names none but says `model_type: llada`.
    pub fn architecture(&self) -> Result<String> {
        match self.architectures.as_deref() {
            Some([first, ..]) => Ok(first.clone()),
            _ => match self.model_type.as_deref() {
                Some("llada") => Ok("LLaDAModelLM".into()),
                other => Err(Error::config(
                    "architectures",
                    format!("absent (model_type={other:?})"),
                    "a LLaDA checkpoint names its architecture, e.g. [\"LLaDAModelLM\"]",
                )),
            },
        }
    }

    /// Checks every key that changes semantics and resolves defaults.
    pub fn resolve(&self) -> Result<ModelConfig> {
        self.check_architecture()?;
        let norm = self.check_semantic_keys()?;
        self.check_positive_sizes()?;
        let (n_kv_heads, head_dim) = self.resolve_heads()?;
        let (mlp_hidden_size, embedding_size) = self.resolve_sizes()?;
        self.check_token_ids(embedding_size)?;
        self.check_numerics()?;
        let cfg = ModelConfig {
            architecture: Architecture::Llada,
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads,
            head_dim,
            rotary_dim: head_dim,
            mlp_hidden_size,
            vocab_size: self.vocab_size,
            embedding_size,
            rope_theta: self.rope_theta as f32,
            rms_norm_eps: self.rms_norm_eps,
            norm,
            weight_tying: self.weight_tying,
            max_sequence_length: self.max_sequence_length,
            mask_token_id: self.mask_token_id,
            eos_token_id: self.eos_token_id,
            pad_token_id: self.pad_token_id,
            init_std: self.init_std,
            causal: self.causal_attention,
            qk_norm: false,
            qkv_bias: false,
            logits_shift: false,
            mask_padding: true,
            moe: None,
        };
        check_addressable(&cfg, "d_model", self.d_model)?;
        Ok(cfg)
    }

    /// The architecture, if this engine implements it: which model implements the file is
    /// decided in one place, `model::ARCHITECTURES`.
    fn check_architecture(&self) -> Result<()> {
        let name = self.architecture()?;
        match Architecture::from_name(&name)? {
            Architecture::Llada => Ok(()),
            other => Err(Error::config(
                "architectures",
                format!("[{name:?}]"),
                format!(
                    "names {other:?}, whose config.json has other keys: read it with RawConfig"
                ),
            )),
        }
    }

    /// Rejects the values of semantic keys this engine does not implement (the block's keys, then
    /// the normalisation's, then the biases and extra norms: the first offender is the one named);
    /// returns the normalisation.
    fn check_semantic_keys(&self) -> Result<NormKind> {
        self.check_block_keys()?;
        let norm = self.norm_kind()?;
        self.check_bias_and_extra_norm_keys()?;
        Ok(norm)
    }

    /// The block: a Llama block of SiLU, one per group, RoPE without ALiBi.
    fn check_block_keys(&self) -> Result<()> {
        if self.block_type != "llama" {
            return Err(unsupported("block_type", &self.block_type, "\"llama\""));
        }
        if self.activation_type != "silu" {
            return Err(unsupported(
                "activation_type",
                &self.activation_type,
                "\"silu\"",
            ));
        }
        if self.block_group_size != 1 {
            return Err(unsupported("block_group_size", &self.block_group_size, "1"));
        }
        if !self.rope {
            return Err(unsupported("rope", &self.rope, "true"));
        }
        if self.alibi {
            return Err(unsupported("alibi", &self.alibi, "false"));
        }
        Ok(())
    }

    /// The blocks' normalisation (`layer_norm_type`), which must have its weights.
    fn norm_kind(&self) -> Result<NormKind> {
        let norm = match self.layer_norm_type.as_str() {
            "rms" => NormKind::Rms,
            "gemma_rms" => NormKind::GemmaRms,
            _ => {
                return Err(unsupported(
                    "layer_norm_type",
                    &self.layer_norm_type,
                    "\"rms\", \"gemma_rms\"",
                ))
            }
        };
        if !self.layer_norm_with_affine {
            return Err(unsupported(
                "layer_norm_with_affine",
                &self.layer_norm_with_affine,
                "true",
            ));
        }
        Ok(norm)
    }

    /// No biases, no extra norms (attention, input embedding), no logit scaling.
    fn check_bias_and_extra_norm_keys(&self) -> Result<()> {
        if self.include_bias {
            return Err(unsupported("include_bias", &self.include_bias, "false"));
        }
        if self.bias_for_layer_norm.unwrap_or(false) {
            return Err(unsupported(
                "bias_for_layer_norm",
                &self.bias_for_layer_norm,
                "false",
            ));
        }
        if self.include_qkv_bias.unwrap_or(false) {
            return Err(unsupported(
                "include_qkv_bias",
                &self.include_qkv_bias,
                "false",
            ));
        }
        if self.attention_layer_norm {
            return Err(unsupported(
                "attention_layer_norm",
                &self.attention_layer_norm,
                "false",
            ));
        }
        if self.input_emb_norm {
            return Err(unsupported("input_emb_norm", &self.input_emb_norm, "false"));
        }
        if self.scale_logits {
            return Err(unsupported("scale_logits", &self.scale_logits, "false"));
        }
        Ok(())
    }

    /// The sizes that must be at least 1.
    fn check_positive_sizes(&self) -> Result<()> {
        for (key, v) in [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("vocab_size", self.vocab_size),
            ("max_sequence_length", self.max_sequence_length),
        ] {
            if v == 0 {
                return Err(Error::config(key, v, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// `(n_kv_heads, head_dim)`: the key/value heads (from `n_kv_heads` or
    /// `multi_query_attention`, dividing `n_heads`) and the even head dimension.
    fn resolve_heads(&self) -> Result<(usize, usize)> {
        let n_kv_heads = match (self.multi_query_attention, self.n_kv_heads) {
            (Some(true), Some(n)) if n != 1 => {
                return Err(Error::config(
                    "n_kv_heads",
                    n,
                    "conflicts with multi_query_attention=true (which means 1 KV head)",
                ))
            }
            (Some(true), _) => 1,
            (_, Some(n)) => n,
            (_, None) => self.n_heads,
        };
        if n_kv_heads == 0 || !self.n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::config(
                "n_kv_heads",
                n_kv_heads,
                format!("must divide n_heads={}", self.n_heads),
            ));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "d_model",
                self.d_model,
                format!("must be divisible by n_heads={}", self.n_heads),
            ));
        }
        let head_dim = self.d_model / self.n_heads;
        if !head_dim.is_multiple_of(2) {
            return Err(Error::config(
                "d_model",
                self.d_model,
                format!("head dim d_model/n_heads={head_dim} must be even for RoPE"),
            ));
        }
        Ok((n_kv_heads, head_dim))
    }

    /// `(mlp_hidden_size, embedding_size)` with their defaults: `mlp_ratio · d_model` and
    /// `vocab_size`.
    fn resolve_sizes(&self) -> Result<(usize, usize)> {
        let mlp_hidden_size = match self.mlp_hidden_size {
            Some(n) => n,
            None => self.mlp_ratio.checked_mul(self.d_model).ok_or_else(|| {
                Error::config(
                    "mlp_ratio",
                    self.mlp_ratio,
                    format!(
                        "mlp_ratio · d_model (d_model={}) overflows the size of a tensor dimension",
                        self.d_model
                    ),
                )
            })?,
        };
        if mlp_hidden_size == 0 {
            return Err(Error::config(
                "mlp_hidden_size",
                mlp_hidden_size,
                "must be at least 1",
            ));
        }
        let embedding_size = self.embedding_size.unwrap_or(self.vocab_size);
        if embedding_size < self.vocab_size {
            return Err(Error::config(
                "embedding_size",
                embedding_size,
                format!("must be >= vocab_size={}", self.vocab_size),
            ));
        }
        Ok((mlp_hidden_size, embedding_size))
    }

    /// The special token ids given must be rows of the embedding.
    fn check_token_ids(&self, embedding_size: usize) -> Result<()> {
        for (key, id) in [
            ("mask_token_id", self.mask_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= embedding_size {
                    return Err(Error::config(
                        key,
                        id,
                        format!("must be < embedding_size={embedding_size}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A RoPE base and a norm epsilon the model can compute with: impossible values are errors,
    /// suspicious ones a warning (see [`RMS_NORM_EPS_MAX`], [`RMS_NORM_EPS_SUSPICIOUS`]).
    fn check_numerics(&self) -> Result<()> {
        check_eps_and_theta(self.rms_norm_eps, self.rope_theta, "LLaDA uses 500000")
    }
}

/// The largest `rms_norm_eps` accepted: an epsilon of 1 already outweighs the mean square of
/// unit-scale activations; larger ones (1e308 overflows f32 to ∞) zero the network's signal.
pub const RMS_NORM_EPS_MAX: f64 = 1.0;
/// `rms_norm_eps` above this loads with a warning.
pub const RMS_NORM_EPS_SUSPICIOUS: f64 = 1e-2;
/// `rope_theta` below this loads with a warning.
pub const ROPE_THETA_SUSPICIOUS: f64 = 100.0;

/// The error for a semantic key whose value this engine does not implement.
fn unsupported(key: &str, value: &dyn std::fmt::Debug, expected: &str) -> Error {
    Error::config(
        key,
        format!("{value:?}"),
        format!("not supported by this engine (supported: {expected})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 64, "n_heads": 4,
            "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 176, "vocab_size": 512,
            "embedding_size": 512, "mask_token_id": 508, "eos_token_id": 507,
            "some_future_key": {"nested": true}
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelConfig> {
        serde_json::from_value::<LladaConfig>(v).unwrap().resolve()
    }

    #[test]
    fn resolves_defaults_and_tolerates_unknown_keys() {
        let c = parse(tiny()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.n_kv_heads, 4);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.norm, NormKind::Rms);
        assert_eq!(c.parameter_count(), 166_208);
    }

    #[test]
    fn a_parameter_count_past_the_address_space_is_refused() {
        // it saturated at u64::MAX and `llada init` sized tensors from it
        let mut v = tiny();
        v["d_model"] = serde_json::json!(1u64 << 40);
        v["mlp_hidden_size"] = serde_json::json!(1u64 << 40);
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.starts_with("config.json: d_model=1099511627776:")
                && e.contains("at least 18446744073709551615 parameters")
                && e.contains("address space"),
            "{e}"
        );
    }

    #[test]
    fn llada_8b_parameter_count() {
        let c = LladaConfig {
            mlp_hidden_size: Some(12288),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.parameter_count(), 8_015_581_184);
    }

    #[test]
    fn rejects_semantic_keys_naming_them() {
        for (key, value) in [
            ("alibi", serde_json::json!(true)),
            ("rope", serde_json::json!(false)),
            ("block_group_size", serde_json::json!(2)),
            ("layer_norm_type", serde_json::json!("default")),
            ("include_bias", serde_json::json!(true)),
            ("include_qkv_bias", serde_json::json!(true)),
            ("bias_for_layer_norm", serde_json::json!(true)),
            ("scale_logits", serde_json::json!(true)),
            ("input_emb_norm", serde_json::json!(true)),
            ("attention_layer_norm", serde_json::json!(true)),
            ("block_type", serde_json::json!("sequential")),
        ] {
            let mut v = tiny();
            v[key] = value.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn dispatches_on_architectures() {
        let mut v = tiny();
        v["architectures"] = serde_json::json!(["LLaDAMoEModelLM"]);
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("LLaDAMoEModelLM"), "{err}");
    }

    #[test]
    fn impossible_numerics_are_errors_naming_the_key() {
        for (key, value) in [
            ("rope_theta", serde_json::json!(1e-300)),
            ("rope_theta", serde_json::json!(0.5)),
            ("rope_theta", serde_json::json!(1.0)),
            ("rope_theta", serde_json::json!(-10000.0)),
            ("rope_theta", serde_json::json!(1e300)),
            ("rms_norm_eps", serde_json::json!(1e308)),
            ("rms_norm_eps", serde_json::json!(2.0)),
            ("rms_norm_eps", serde_json::json!(-1e-5)),
        ] {
            let mut v = tiny();
            v[key] = value.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("config.json: {key}=")),
                "{key}={value}: {err}"
            );
        }
        // the edges that are accepted
        for (key, value) in [
            ("rope_theta", serde_json::json!(10.0)),
            ("rms_norm_eps", serde_json::json!(0.0)),
            ("rms_norm_eps", serde_json::json!(0.5)),
        ] {
            let mut v = tiny();
            v[key] = value.clone();
            assert!(parse(v).is_ok(), "{key}={value}");
        }
    }

    #[test]
    fn mlp_ratio_overflow_is_an_error_not_a_wrap() {
        let mut v = tiny();
        v["mlp_hidden_size"] = serde_json::Value::Null;
        v["mlp_ratio"] = serde_json::json!((1u64 << 58) + 3);
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.starts_with("config.json: mlp_ratio=288230376151711747: ")
                && err.contains("d_model=64")
                && err.contains("overflows"),
            "{err}"
        );
        let mut v = tiny();
        v["mlp_hidden_size"] = serde_json::Value::Null;
        v["mlp_ratio"] = serde_json::json!(3);
        assert_eq!(parse(v).unwrap().mlp_hidden_size, 192);
        // sizes whose parameters cannot be counted in u64 saturate (and `resolve` refuses them:
        // a_parameter_count_past_the_address_space_is_refused)
        let mut c = parse(tiny()).unwrap();
        c.d_model = 1 << 40;
        c.mlp_hidden_size = 1 << 40;
        assert_eq!(c.parameter_count(), u64::MAX);
    }

    #[test]
    fn gqa_and_mqa() {
        let mut v = tiny();
        v["n_kv_heads"] = serde_json::json!(2);
        assert_eq!(parse(v).unwrap().n_kv_heads, 2);
        let mut v = tiny();
        v["n_kv_heads"] = serde_json::json!(3);
        assert!(parse(v).unwrap_err().to_string().contains("n_kv_heads"));
        let mut v = tiny();
        v["multi_query_attention"] = serde_json::json!(true);
        v["n_kv_heads"] = serde_json::Value::Null;
        assert_eq!(parse(v).unwrap().n_kv_heads, 1);
        let mut v = tiny();
        v["multi_query_attention"] = serde_json::json!(true);
        assert!(parse(v).unwrap_err().to_string().contains("multi_query"));
    }
}
