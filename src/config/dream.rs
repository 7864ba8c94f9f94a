//! `config.json` of a Dream checkpoint (`DreamModel`, Dream-org/Dream-v0-Base/-Instruct-7B and its
//! code family): [`DreamConfig`] mirrors the keys of the official `configuration_dream.py` (a
//! Qwen2 config) and [`DreamConfig::resolve`] turns it into the plain [`ModelConfig`].
//!
//! What the official `modeling_dream.py` does with each key, and so what llada does:
//! - implemented: sizes (`hidden_size`, `intermediate_size`, `num_hidden_layers`,
//!   `num_attention_heads`, `num_key_value_heads`: GQA), `rms_norm_eps`, `rope_theta`,
//!   `tie_word_embeddings`, `mask_token_id` (the sampler's mask), `eos_token_id`/`pad_token_id`;
//!   the q/k/v projections always have biases (Qwen2), `o_proj` and the MLP none;
//! - read and without effect on the forward: `max_position_embeddings` (the context llada
//!   accepts), `max_window_layers` and `sliding_window` (only with `use_sliding_window`),
//!   `attention_dropout` (inference), `initializer_range` (`llada init`), `use_cache`,
//!   `bos_token_id`, `torch_dtype`;
//! - refused with an error naming the key: values llada does not implement
//!   (`use_sliding_window: true`, `use_mrope: true`, `rope_scaling` other than null or the default
//!   type, `hidden_act` ≠ silu).
//!
//! Two properties of the architecture that are not config keys: the model's output at position i
//! predicts position i + 1 (`ModelConfig::logits_shift`; the sampler's shift of
//! `generation_utils.py` is applied by the mask predictor), and padded rows get positions
//! `cumsum(mask) − 1` (see [`crate::model::dream`]).

use serde::{Deserialize, Serialize};

use super::{check_eps_and_theta, ModelConfig, NormKind};
use crate::error::{Error, Result};
use crate::model::Architecture;

/// `config.json` of Dream, key for key (the official defaults where a key may be absent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DreamConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub attention_dropout: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_map: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    pub hidden_act: String,
    pub hidden_size: i64,
    pub initializer_range: f64,
    pub intermediate_size: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_token_id: Option<u32>,
    pub max_position_embeddings: i64,
    pub max_window_layers: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub num_attention_heads: i64,
    pub num_hidden_layers: i64,
    /// `None` (or null) means `num_attention_heads`, as in Qwen2.
    pub num_key_value_heads: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    pub rms_norm_eps: f64,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_theta: f64,
    pub sliding_window: Option<i64>,
    pub tie_word_embeddings: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    pub use_cache: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_mrope: Option<bool>,
    pub use_sliding_window: bool,
    pub vocab_size: i64,
    /// Keys this engine does not model (`_name_or_path`, …), kept when the config is written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for DreamConfig {
    /// The defaults of the official `DreamConfig.__init__`.
    fn default() -> Self {
        DreamConfig {
            architectures: Some(vec!["DreamModel".into()]),
            attention_dropout: 0.0,
            auto_map: None,
            bos_token_id: None,
            eos_token_id: None,
            hidden_act: "silu".into(),
            hidden_size: 4096,
            initializer_range: 0.02,
            intermediate_size: 22016,
            mask_token_id: Some(151666),
            max_position_embeddings: 32768,
            max_window_layers: 28,
            model_type: Some("Dream".into()),
            num_attention_heads: 32,
            num_hidden_layers: 32,
            num_key_value_heads: Some(32),
            pad_token_id: Some(151643),
            rms_norm_eps: 1e-6,
            rope_scaling: None,
            rope_theta: 10000.0,
            sliding_window: Some(4096),
            tie_word_embeddings: false,
            torch_dtype: None,
            transformers_version: None,
            use_cache: false,
            use_mrope: None,
            use_sliding_window: false,
            vocab_size: 151936,
            extra: serde_json::Map::new(),
        }
    }
}

use super::size_key as size;

impl DreamConfig {
    /// Checks every key the official forward reads and resolves the model configuration.
    pub fn resolve(&self) -> Result<ModelConfig> {
        self.check_unimplemented()?;
        let d = size("hidden_size", self.hidden_size, 1)?;
        let n_layers = size("num_hidden_layers", self.num_hidden_layers, 1)?;
        let n_heads = size("num_attention_heads", self.num_attention_heads, 1)?;
        let n_kv_heads = match self.num_key_value_heads {
            None => n_heads,
            Some(v) => size("num_key_value_heads", v, 1)?,
        };
        let head_dim = super::hf_heads(d, n_heads, n_kv_heads)?;
        let f = size("intermediate_size", self.intermediate_size, 1)?;
        let vocab = size("vocab_size", self.vocab_size, 1)?;
        let max_len = size("max_position_embeddings", self.max_position_embeddings, 1)?;
        check_eps_and_theta(self.rms_norm_eps, self.rope_theta, "Dream uses 1000000")?;
        super::check_special_ids(
            vocab,
            self.mask_token_id,
            self.eos_token_id,
            self.pad_token_id,
        )?;
        let cfg = ModelConfig {
            architecture: Architecture::Dream,
            d_model: d,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rotary_dim: head_dim,
            mlp_hidden_size: f,
            vocab_size: vocab,
            embedding_size: vocab,
            rope_theta: self.rope_theta as f32,
            rms_norm_eps: self.rms_norm_eps,
            norm: NormKind::Rms,
            weight_tying: self.tie_word_embeddings,
            max_sequence_length: max_len,
            mask_token_id: self.mask_token_id,
            eos_token_id: self.eos_token_id,
            pad_token_id: self.pad_token_id,
            init_std: self.initializer_range,
            causal: false,
            qk_norm: false,
            qkv_bias: true,
            logits_shift: true,
            // the official sampler turns a padding mask into a 4-D attention mask
            mask_padding: true,
            moe: None,
        };
        super::check_addressable(&cfg, "hidden_size", d)?;
        Ok(cfg)
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
        if self.use_sliding_window {
            return Err(unsupported(
                "use_sliding_window",
                &true,
                "false: every layer attends to the whole canvas",
            ));
        }
        if self.use_mrope == Some(true) {
            return Err(unsupported(
                "use_mrope",
                &true,
                "false: multimodal RoPE is not implemented",
            ));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            let default = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|t| t.as_str())
                == Some("default");
            if !default {
                return Err(unsupported(
                    "rope_scaling",
                    s,
                    "null or {\"rope_type\": \"default\"}",
                ));
            }
        }
        Ok(())
    }

    /// The architecture name the file gives (`architectures[0]`).
    pub fn architecture(&self) -> String {
        self.architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_else(|| "DreamModel".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden tiny Dream config (shared/golden/dream/config.json).
    fn tiny() -> serde_json::Value {
        serde_json::json!({
            "_name_or_path": "Dream-org/Dream-v0-Instruct-7B", "architectures": ["DreamModel"],
            "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                         "AutoModel": "modeling_dream.DreamModel"},
            "bos_token_id": 507, "eos_token_id": 507, "hidden_act": "silu", "hidden_size": 64,
            "initializer_range": 0.02, "intermediate_size": 176, "mask_token_id": 508,
            "max_position_embeddings": 131072, "max_window_layers": 2, "model_type": "Dream",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "pad_token_id": 507, "rms_norm_eps": 1e-06, "rope_scaling": null,
            "rope_theta": 1000000.0, "sliding_window": null, "tie_word_embeddings": false,
            "torch_dtype": "float32", "transformers_version": "4.46.2", "use_cache": true,
            "use_mrope": false, "use_sliding_window": false, "vocab_size": 512
        })
    }

    fn parse(v: serde_json::Value) -> DreamConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn tiny_resolves() {
        let c = parse(tiny()).resolve().unwrap();
        assert_eq!(c.architecture, Architecture::Dream);
        assert_eq!(
            (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads),
            (64, 2, 4, 2)
        );
        assert_eq!(
            (c.head_dim, c.mlp_hidden_size, c.embedding_size),
            (16, 176, 512)
        );
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.qkv_bias && c.logits_shift && c.mask_padding && !c.weight_tying);
        assert_eq!(c.mask_token_id, Some(508));
        assert_eq!(c.max_sequence_length, 131072);
        // the golden README's parameter count
        assert_eq!(c.parameter_count(), 158_272);
    }

    #[test]
    fn written_back_with_unknown_keys_kept() {
        let raw = parse(tiny());
        let back = serde_json::to_value(&raw).unwrap();
        assert_eq!(back, tiny());
    }

    #[test]
    fn unimplemented_values_are_errors_naming_the_key() {
        for (key, value) in [
            ("use_sliding_window", serde_json::json!(true)),
            ("use_mrope", serde_json::json!(true)),
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            ),
            ("hidden_act", serde_json::json!("gelu")),
            ("num_key_value_heads", serde_json::json!(3)),
            ("hidden_size", serde_json::json!(66)),
            ("mask_token_id", serde_json::json!(512)),
            ("rope_theta", serde_json::json!(0.5)),
            ("intermediate_size", serde_json::json!(0)),
        ] {
            let mut v = tiny();
            v[key] = value.clone();
            let e = parse(v).resolve().unwrap_err().to_string();
            assert!(e.contains(key), "{key}={value}: {e}");
        }
        // the default rope type and an explicit null are fine
        let mut v = tiny();
        v["rope_scaling"] = serde_json::json!({"rope_type": "default"});
        parse(v).resolve().unwrap();
    }
}
