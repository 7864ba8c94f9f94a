//! `config.json` of a LLaDA-MoE checkpoint (`LLaDAMoEModelLM`, inclusionAI/LLaDA-MoE-7B-A1B):
//! [`LladaMoeConfig`] mirrors the keys of the official `configuration_lladamoe.py` (`LLaDAConfig`,
//! which also says `model_type: "llada"`: `architectures` tells the two apart) and
//! [`LladaMoeConfig::resolve`] turns it into the plain [`ModelConfig`].
//!
//! What the official forward does with each key, and so what llada does:
//! - implemented: sizes, `moe_layer_freq` (0 = dense layer of `dense_intermediate_size`),
//!   `qk_layernorm`, `rope_theta`, `rms_norm_eps`, `tie_word_embeddings`,
//!   `shared_expert_intermediate_size`, `moe_router_enable_expert_bias` (the bias is added to the
//!   softmax probabilities before top-k, and the biased values weight the experts),
//!   `router_aux_loss_coef` (training);
//! - read but **ignored, as the official code ignores them**: `norm_topk_prob` (the MoE block
//!   hard-codes `False`: the top-k weights are not renormalised), `moe_router_score_function`
//!   (softmax is hard-coded), `routed_scaling_factor`, `router_num_group`, `router_topk_group`,
//!   `max_position_embeddings` (informative), `attention_dropout`, `use_cache`,
//!   `output_router_logits`;
//! - refused with an error naming the key: values the official code would compute differently
//!   and llada does not implement (`attention_bias: true`, `clip_qkv`, `rope_scaling`,
//!   `partial_rotary_factor` ≠ 1, `hidden_act` ≠ silu).
//!
//! The official forward **ignores `attention_mask`** (padding is an ordinary token); llada does
//! the same unless the llada extension key `mask_padding: true` asks for key-padding masking.
//! The real config names no mask id (156895 in the real tokenizer): it comes from the tokenizer
//! (`<|mdm_mask|>`), or from the llada extension key `mask_token_id`.

use serde::{Deserialize, Serialize};

use super::{check_eps_and_theta, ModelConfig, MoeSpec, NormKind};
use crate::error::{Error, Result};
use crate::model::Architecture;

/// `config.json` of LLaDA-MoE, key for key (the official defaults where a key may be absent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LladaMoeConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_map: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_intermediate_size: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_intermediate_size: Option<i64>,
    pub hidden_act: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<i64>,
    pub initializer_range: f64,
    pub max_position_embeddings: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub moe_layer_freq: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_router_enable_expert_bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_router_score_function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    pub output_router_logits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qk_layernorm: Option<bool>,
    pub rms_norm_eps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_scaling_factor: Option<serde_json::Value>,
    pub router_aux_loss_coef: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_num_group: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_topk_group: Option<serde_json::Value>,
    pub shared_expert_intermediate_size: Option<i64>,
    pub tie_word_embeddings: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    pub use_cache: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<i64>,
    /// llada extension (absent from published checkpoints): the mask id, for a folder without a
    /// tokenizer (the official samplers hard-code it: 156895 for the real model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_token_id: Option<u32>,
    /// llada extension: honour key-padding masks (the official forward ignores them: pads attend
    /// and are attended to). Off by default, as the official code.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mask_padding: bool,
    /// Keys this engine does not model, kept as they are when the config is written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LladaMoeConfig {
    /// The defaults of the official `LLaDAConfig.__init__` where they are usable; its `-1`
    /// placeholders are `None` here (the key is then required).
    fn default() -> Self {
        LladaMoeConfig {
            architectures: Some(vec!["LLaDAMoEModelLM".into()]),
            attention_bias: false,
            attention_dropout: 0.0,
            auto_map: None,
            clip_qkv: None,
            dense_intermediate_size: None,
            // the official defaults (eos 50279, pad 1) are OLMoE's placeholders: a config that
            // names no special ids leaves them to the tokenizer
            eos_token_id: None,
            expert_intermediate_size: None,
            hidden_act: "silu".into(),
            hidden_size: None,
            initializer_range: 0.02,
            max_position_embeddings: 4096,
            model_type: Some("llada".into()),
            moe_layer_freq: Vec::new(),
            moe_router_enable_expert_bias: None,
            moe_router_score_function: None,
            norm_topk_prob: None,
            num_attention_heads: None,
            num_experts: None,
            num_experts_per_tok: None,
            num_hidden_layers: None,
            num_key_value_heads: None,
            output_router_logits: false,
            pad_token_id: None,
            partial_rotary_factor: None,
            qk_layernorm: None,
            rms_norm_eps: 1e-5,
            rope_scaling: None,
            rope_theta: None,
            routed_scaling_factor: None,
            router_aux_loss_coef: 0.01,
            router_num_group: None,
            router_topk_group: None,
            shared_expert_intermediate_size: None,
            tie_word_embeddings: false,
            torch_dtype: None,
            transformers_version: None,
            use_cache: false,
            vocab_size: None,
            mask_token_id: None,
            mask_padding: false,
            extra: serde_json::Map::new(),
        }
    }
}

/// The most experts a layer may have (a sanity bound: each is a separate set of weights).
pub const MAX_EXPERTS: usize = 1 << 14;

/// A size key that must be present and at least `min`.
fn size(key: &str, v: Option<i64>, min: i64) -> Result<usize> {
    match v {
        None => Err(Error::config(
            key,
            "absent",
            "a LLaDA-MoE config.json must give it",
        )),
        Some(n) if n < min => Err(Error::config(key, n, format!("must be at least {min}"))),
        Some(n) => usize::try_from(n).map_err(|_| Error::config(key, n, "too large")),
    }
}

impl LladaMoeConfig {
    /// Checks every key the official forward reads and resolves the model configuration.
    pub fn resolve(&self) -> Result<ModelConfig> {
        self.check_unimplemented()?;
        let d = size("hidden_size", self.hidden_size, 1)?;
        let n_layers = size("num_hidden_layers", self.num_hidden_layers, 1)?;
        let n_heads = size("num_attention_heads", self.num_attention_heads, 1)?;
        let n_kv_heads = match self.num_key_value_heads {
            None => n_heads,
            v => size("num_key_value_heads", v, 1)?,
        };
        let head_dim = super::hf_heads(d, n_heads, n_kv_heads)?;
        let vocab = size("vocab_size", self.vocab_size, 1)?;
        let layers = self.moe_layers(n_layers)?;
        let num_experts = size("num_experts", self.num_experts, 1)?;
        if num_experts > MAX_EXPERTS {
            return Err(Error::config(
                "num_experts",
                num_experts,
                format!("must be at most {MAX_EXPERTS} (LLaDA-MoE-7B-A1B has 64)"),
            ));
        }
        let top_k = size("num_experts_per_tok", self.num_experts_per_tok, 1)?;
        if top_k > num_experts {
            return Err(Error::config(
                "num_experts_per_tok",
                top_k,
                format!("must be at most num_experts={num_experts}"),
            ));
        }
        let expert_size = size("expert_intermediate_size", self.expert_intermediate_size, 1)?;
        // the dense size matters only where a layer is dense
        let dense_size = if layers.iter().all(|&m| m) {
            match self.dense_intermediate_size {
                Some(n) if n >= 1 => n as usize,
                _ => 0,
            }
        } else {
            size("dense_intermediate_size", self.dense_intermediate_size, 1)?
        };
        let shared_expert_size = match self.shared_expert_intermediate_size {
            None => None,
            v => Some(size("shared_expert_intermediate_size", v, 1)?),
        };
        let rope_theta = self.rope_theta.ok_or_else(|| {
            Error::config(
                "rope_theta",
                "absent",
                "a LLaDA-MoE config.json must give it",
            )
        })?;
        check_eps_and_theta(self.rms_norm_eps, rope_theta, "LLaDA-MoE uses 50000")?;
        if !(self.router_aux_loss_coef.is_finite() && self.router_aux_loss_coef >= 0.0) {
            return Err(Error::config(
                "router_aux_loss_coef",
                self.router_aux_loss_coef,
                "must be a finite number >= 0",
            ));
        }
        super::check_special_ids(
            vocab,
            self.mask_token_id,
            self.eos_token_id,
            self.pad_token_id,
        )?;
        self.warn_ignored();
        let cfg = ModelConfig {
            architecture: Architecture::LladaMoe,
            d_model: d,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rotary_dim: head_dim,
            mlp_hidden_size: dense_size,
            vocab_size: vocab,
            embedding_size: vocab,
            rope_theta: rope_theta as f32,
            rms_norm_eps: self.rms_norm_eps,
            norm: NormKind::Rms,
            weight_tying: self.tie_word_embeddings,
            max_sequence_length: self.max_position_embeddings.max(1),
            mask_token_id: self.mask_token_id,
            eos_token_id: self.eos_token_id,
            pad_token_id: self.pad_token_id,
            init_std: self.initializer_range,
            causal: false,
            qk_norm: self.qk_layernorm.unwrap_or(false),
            qkv_bias: false,
            logits_shift: false,
            mask_padding: self.mask_padding,
            moe: Some(MoeSpec {
                num_experts,
                top_k,
                expert_size,
                layers,
                shared_expert_size,
                expert_bias: self.moe_router_enable_expert_bias.unwrap_or(false),
                aux_loss_coef: self.router_aux_loss_coef,
                router: super::Router::Softmax,
            }),
        };
        super::check_addressable(&cfg, "hidden_size", d)?;
        Ok(cfg)
    }

    /// `moe_layer_freq[i]` for each layer: true = mixture of experts, false = dense (the official
    /// code indexes the list by layer, so it must cover every layer).
    fn moe_layers(&self, n_layers: usize) -> Result<Vec<bool>> {
        if self.moe_layer_freq.len() < n_layers {
            return Err(Error::config(
                "moe_layer_freq",
                format!("{:?}", self.moe_layer_freq),
                format!(
                    "must give one entry per layer (num_hidden_layers={n_layers}; 0 = dense, 1 = mixture of experts)"
                ),
            ));
        }
        Ok(self.moe_layer_freq[..n_layers]
            .iter()
            .map(|&f| f != 0)
            .collect())
    }

    /// Values the official forward would compute and llada does not implement.
    fn check_unimplemented(&self) -> Result<()> {
        let unsupported = |key: &str, v: &dyn std::fmt::Debug, ok: &str| {
            Error::config(
                key,
                format!("{v:?}"),
                format!("not supported by this engine (supported: {ok})"),
            )
        };
        if self.hidden_act != "silu" {
            return Err(unsupported("hidden_act", &self.hidden_act, "\"silu\""));
        }
        if self.attention_bias {
            return Err(unsupported("attention_bias", &true, "false"));
        }
        if let Some(c) = self.clip_qkv {
            return Err(unsupported("clip_qkv", &c, "null"));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return Err(unsupported("rope_scaling", s, "null"));
        }
        if let Some(f) = self.partial_rotary_factor {
            if f != 1.0 {
                return Err(unsupported("partial_rotary_factor", &f, "1.0"));
            }
        }
        Ok(())
    }

    /// Keys the official forward reads but whose values it ignores: said once at load when they
    /// ask for something it does not do.
    fn warn_ignored(&self) {
        if self.norm_topk_prob == Some(true) {
            tracing::warn!(
                "config.json: norm_topk_prob=true is ignored, as by the official LLaDA-MoE code (its MoE block hard-codes False: top-k weights are not renormalised)"
            );
        }
        if let Some(f) = self.moe_router_score_function.as_deref() {
            if f != "softmax" {
                tracing::warn!(
                    "config.json: moe_router_score_function={f:?} is ignored, as by the official LLaDA-MoE code (softmax is hard-coded)"
                );
            }
        }
        let number = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_f64());
        if let Some(f) = number(&self.routed_scaling_factor).filter(|&f| f != 1.0) {
            tracing::warn!(
                "config.json: routed_scaling_factor={f} is ignored, as by the official LLaDA-MoE code (the expert weights are not scaled)"
            );
        }
        for (key, v) in [
            ("router_num_group", &self.router_num_group),
            ("router_topk_group", &self.router_topk_group),
        ] {
            if let Some(g) = number(v).filter(|&g| g > 0.0) {
                tracing::warn!(
                    "config.json: {key}={g} is ignored, as by the official LLaDA-MoE code (no group-limited routing)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden tiny LLaDA-MoE config (shared/golden/llada-moe/config.json).
    fn tiny() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LLaDAMoEModelLM"], "attention_bias": false,
            "attention_dropout": 0.0, "clip_qkv": null, "dense_intermediate_size": 128,
            "eos_token_id": 507, "expert_intermediate_size": 32, "hidden_act": "silu",
            "hidden_size": 64, "initializer_range": 0.02, "max_position_embeddings": 256,
            "model_type": "llada", "moe_layer_freq": [1, 1],
            "moe_router_enable_expert_bias": false, "moe_router_score_function": "softmax",
            "norm_topk_prob": false, "num_attention_heads": 4, "num_experts": 8,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 4,
            "output_router_logits": false, "pad_token_id": 507, "partial_rotary_factor": 1.0,
            "qk_layernorm": true, "rms_norm_eps": 1e-05, "rope_scaling": null,
            "rope_theta": 50000, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01,
            "router_num_group": null, "router_topk_group": null,
            "shared_expert_intermediate_size": null, "tie_word_embeddings": false,
            "torch_dtype": "float32", "transformers_version": "4.46.2", "use_cache": false,
            "vocab_size": 512
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelConfig> {
        serde_json::from_value::<LladaMoeConfig>(v)
            .unwrap()
            .resolve()
    }

    #[test]
    fn resolves_the_golden_config() {
        let c = parse(tiny()).unwrap();
        assert_eq!(c.architecture, Architecture::LladaMoe);
        assert_eq!((c.head_dim, c.n_kv_heads, c.vocab_size), (16, 4, 512));
        assert!(c.qk_norm && !c.mask_padding && !c.weight_tying);
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_size), (8, 2, 32));
        assert_eq!(m.layers, vec![true, true]);
        // the golden checkpoint's 69 tensors hold 198,016 parameters (its README)
        assert_eq!(c.parameter_count(), 198_016);
        // active per token: attention + router + 2 of 8 experts per layer, norms, head (the
        // embedding is a lookup)
        let attn = 4 * 64 * 64 + 2 * 16;
        let ffn = 8 * 64 + 2 * 3 * 64 * 32;
        assert_eq!(
            c.active_parameter_count(),
            (512 * 64 + 64 + 2 * (attn + ffn + 2 * 64)) as u64
        );
    }

    #[test]
    fn the_real_7b_a1b_sizes_count_7b_parameters_1b_active() {
        let mut v = tiny();
        for (k, x) in [
            ("hidden_size", 2048),
            ("num_hidden_layers", 16),
            ("num_attention_heads", 16),
            ("num_key_value_heads", 16),
            ("expert_intermediate_size", 1024),
            ("dense_intermediate_size", 8192),
            ("num_experts", 64),
            ("num_experts_per_tok", 8),
            ("vocab_size", 157184),
        ] {
            v[k] = serde_json::json!(x);
        }
        v["moe_layer_freq"] = serde_json::json!(vec![1; 16]);
        let c = parse(v).unwrap();
        let (total, active) = (c.parameter_count(), c.active_parameter_count());
        assert!((7.2e9..7.4e9).contains(&(total as f64)), "{total}");
        assert!((1.3e9..1.5e9).contains(&(active as f64)), "{active}");
    }

    #[test]
    fn unimplemented_values_are_errors_naming_the_key() {
        for (key, value) in [
            ("attention_bias", serde_json::json!(true)),
            ("clip_qkv", serde_json::json!(8.0)),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 2.0}),
            ),
            ("partial_rotary_factor", serde_json::json!(0.5)),
            ("hidden_act", serde_json::json!("gelu")),
            ("moe_layer_freq", serde_json::json!([1])),
            ("num_experts_per_tok", serde_json::json!(9)),
            ("num_key_value_heads", serde_json::json!(3)),
            ("hidden_size", serde_json::json!(-1)),
            ("rope_theta", serde_json::json!(0.5)),
            ("eos_token_id", serde_json::json!(512)),
        ] {
            let mut v = tiny();
            v[key] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        // a dense layer needs its size
        let mut v = tiny();
        v["moe_layer_freq"] = serde_json::json!([0, 1]);
        v.as_object_mut().unwrap().remove("dense_intermediate_size");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("dense_intermediate_size"), "{err}");
    }

    #[test]
    fn keys_the_official_code_ignores_are_ignored() {
        let mut v = tiny();
        v["norm_topk_prob"] = serde_json::json!(true);
        v["moe_router_score_function"] = serde_json::json!("sigmoid");
        v["routed_scaling_factor"] = serde_json::json!(2.5);
        v["router_num_group"] = serde_json::json!(4);
        assert_eq!(parse(v).unwrap(), parse(tiny()).unwrap());
    }
}
