//! `config.json` of a LLaDA2.x checkpoint (`LLaDA2MoeModelLM`, inclusionAI/LLaDA2.0-mini,
//! LLaDA2.0-flash, LLaDA2.1-mini; BailingMoeV2-derived): [`Llada2Config`] mirrors the keys of the
//! official `configuration_llada2_moe.py` and [`Llada2Config::resolve`] turns it into the plain
//! [`ModelConfig`].
//!
//! What the official `modeling_llada2_moe.py` does with each key, and so what llada does:
//! - implemented: sizes (`hidden_size`, `num_hidden_layers`, `num_attention_heads`,
//!   `num_key_value_heads`: GQA, `head_dim`), `intermediate_size` (the dense layers),
//!   `first_k_dense_replace` (layers below it are dense, the others mixtures of experts),
//!   `moe_intermediate_size`, `num_experts`, `num_experts_per_tok`, `num_shared_experts` (one
//!   shared SwiGLU of `moe_intermediate_size · num_shared_experts`), `n_group`/`topk_group`
//!   (group-limited routing), `routed_scaling_factor`, `partial_rotary_factor` (RoPE on the first
//!   `head_dim · factor` dims of each head), `rope_theta`, `rms_norm_eps`, `use_qk_norm` (absent
//!   from the real files: the class default `true`), `tie_word_embeddings`, `pad_token_id`;
//! - read and **ignored, as the official code ignores them**: `norm_topk_prob` (the top-k weights
//!   are always renormalised), `score_function` (always sigmoid), `moe_router_enable_expert_bias`
//!   (the `expert_bias` buffer is always added), `router_dtype` (the router is always f32),
//!   `rotary_dim` (the code uses `head_dim · partial_rotary_factor`), `use_rmsnorm`, `norm_head`,
//!   `norm_softmax`, `max_window_layers`, `sliding_window`/`use_sliding_window`,
//!   `max_position_embeddings` (the context llada accepts), dropouts, `use_cache`,
//!   `output_router_logits`, `initializer_range` (`llada init` only);
//! - refused with an error naming the key: values llada does not implement (`use_bias`,
//!   `use_qkv_bias`: biases on the attention projections; `rope_scaling` other than null;
//!   `hidden_act` ≠ silu; a `partial_rotary_factor` that does not give an even rotary width).
//!
//! The mask id (156895 `<|mask|>` in the real tokenizer) and the EOS id are not config keys: they
//! are arguments of the official `generate()`; llada takes them from the tokenizer (or the llada
//! extension key `mask_token_id`).

use serde::{Deserialize, Serialize};

use super::{check_eps_and_theta, ModelConfig, MoeSpec, NormKind, Router};
use crate::error::{Error, Result};
use crate::model::Architecture;

/// `config.json` of LLaDA2.x, key for key (the official defaults where a key may be absent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Llada2Config {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub attention_dropout: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_map: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    pub embedding_dropout: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    pub first_k_dense_replace: i64,
    pub head_dim: Option<i64>,
    pub hidden_act: String,
    pub hidden_size: i64,
    pub initializer_range: f64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub moe_intermediate_size: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_router_enable_expert_bias: Option<bool>,
    pub n_group: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_head: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_softmax: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    pub num_attention_heads: i64,
    pub num_experts: i64,
    pub num_experts_per_tok: i64,
    pub num_hidden_layers: i64,
    pub num_key_value_heads: Option<i64>,
    pub num_shared_experts: i64,
    pub output_dropout: f64,
    pub output_router_logits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    pub partial_rotary_factor: f64,
    pub rms_norm_eps: f64,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_theta: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotary_dim: Option<i64>,
    pub routed_scaling_factor: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<i64>,
    pub tie_word_embeddings: bool,
    pub topk_group: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    pub use_bias: bool,
    pub use_cache: bool,
    /// Absent from the real files; the configuration class defaults it to true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_qk_norm: Option<bool>,
    pub use_qkv_bias: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_rmsnorm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    pub vocab_size: i64,
    /// llada extension (absent from published checkpoints): the mask id, for a folder without a
    /// tokenizer (the official `generate()` takes it as an argument: 156895 for the real model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_token_id: Option<u32>,
    /// Keys this engine does not model, kept as they are when the config is written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for Llada2Config {
    /// LLaDA2.0-mini's values (the keys a file may leave out take the configuration class's
    /// defaults).
    fn default() -> Self {
        Llada2Config {
            architectures: Some(vec!["LLaDA2MoeModelLM".into()]),
            attention_dropout: 0.0,
            auto_map: None,
            dtype: None,
            embedding_dropout: 0.0,
            eos_token_id: None,
            first_k_dense_replace: 1,
            head_dim: Some(128),
            hidden_act: "silu".into(),
            hidden_size: 2048,
            initializer_range: 0.02,
            intermediate_size: 5120,
            max_position_embeddings: 32768,
            max_window_layers: None,
            model_type: Some("llada2_moe".into()),
            moe_intermediate_size: 512,
            moe_router_enable_expert_bias: None,
            n_group: 8,
            norm_head: None,
            norm_softmax: None,
            norm_topk_prob: None,
            num_attention_heads: 16,
            num_experts: 256,
            num_experts_per_tok: 8,
            num_hidden_layers: 20,
            num_key_value_heads: Some(4),
            num_shared_experts: 1,
            output_dropout: 0.0,
            output_router_logits: false,
            pad_token_id: Some(156892),
            partial_rotary_factor: 0.5,
            rms_norm_eps: 1e-6,
            rope_scaling: None,
            rope_theta: 600000.0,
            rotary_dim: None,
            routed_scaling_factor: 2.5,
            router_dtype: None,
            score_function: None,
            sliding_window: None,
            tie_word_embeddings: false,
            topk_group: 4,
            torch_dtype: None,
            transformers_version: None,
            use_bias: false,
            use_cache: false,
            use_qk_norm: None,
            use_qkv_bias: false,
            use_rmsnorm: None,
            use_sliding_window: None,
            vocab_size: 157184,
            mask_token_id: None,
            extra: serde_json::Map::new(),
        }
    }
}

use super::size_key as size;

impl Llada2Config {
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
        if !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::config(
                "num_key_value_heads",
                n_kv_heads,
                format!("must divide num_attention_heads={n_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(h) if h.rem_euclid(2) != 0 => {
                return Err(Error::config(
                    "head_dim",
                    h,
                    "must be even (RoPE rotates pairs)",
                ))
            }
            Some(h) => size("head_dim", h, 2)?,
            None => {
                if !d.is_multiple_of(n_heads) {
                    return Err(Error::config(
                        "hidden_size",
                        d,
                        format!("must be divisible by num_attention_heads={n_heads}"),
                    ));
                }
                d / n_heads
            }
        };
        let f = self.partial_rotary_factor;
        let rot = head_dim as f64 * f;
        if !(f > 0.0 && f <= 1.0) || rot.fract() != 0.0 || !(rot as usize).is_multiple_of(2) {
            return Err(Error::config(
                "partial_rotary_factor",
                f,
                format!("must be in (0, 1] with head_dim={head_dim} · factor an even integer (the rotated dims of each head; LLaDA2 uses 0.5)"),
            ));
        }
        let rotary_dim = rot as usize;
        let vocab = size("vocab_size", self.vocab_size, 1)?;
        let dense = size("first_k_dense_replace", self.first_k_dense_replace, 0)?;
        let num_experts = size("num_experts", self.num_experts, 1)?;
        if num_experts > super::llada_moe::MAX_EXPERTS {
            return Err(Error::config(
                "num_experts",
                num_experts,
                format!(
                    "must be at most {} (LLaDA2.0-mini has 256)",
                    super::llada_moe::MAX_EXPERTS
                ),
            ));
        }
        let top_k = size("num_experts_per_tok", self.num_experts_per_tok, 1)?;
        let n_group = size("n_group", self.n_group, 1)?;
        let topk_group = size("topk_group", self.topk_group, 1)?;
        if !num_experts.is_multiple_of(n_group) {
            return Err(Error::config(
                "n_group",
                n_group,
                format!(
                    "must divide num_experts={num_experts} (experts are split into equal groups)"
                ),
            ));
        }
        if topk_group > n_group {
            return Err(Error::config(
                "topk_group",
                topk_group,
                format!("must be at most n_group={n_group}"),
            ));
        }
        if num_experts / n_group < 2 {
            return Err(Error::config(
                "n_group",
                n_group,
                format!("leaves fewer than 2 experts per group (num_experts={num_experts}): a group's score is the sum of its two best"),
            ));
        }
        if top_k > topk_group * (num_experts / n_group) {
            return Err(Error::config(
                "num_experts_per_tok",
                top_k,
                format!(
                    "must be at most topk_group · experts per group = {} (the experts of the kept groups)",
                    topk_group * (num_experts / n_group)
                ),
            ));
        }
        let scaling = self.routed_scaling_factor;
        if !(scaling.is_finite() && scaling > 0.0) {
            return Err(Error::config(
                "routed_scaling_factor",
                scaling,
                "must be a finite number > 0",
            ));
        }
        let expert_size = size("moe_intermediate_size", self.moe_intermediate_size, 1)?;
        let shared = size("num_shared_experts", self.num_shared_experts, 0)?;
        let mlp_hidden_size = if dense > 0 {
            size("intermediate_size", self.intermediate_size, 1)?
        } else {
            self.intermediate_size.max(0) as usize
        };
        let max_len = size("max_position_embeddings", self.max_position_embeddings, 1)?;
        check_eps_and_theta(self.rms_norm_eps, self.rope_theta, "LLaDA2 uses 600000")?;
        super::check_special_ids(
            vocab,
            self.mask_token_id,
            self.eos_token_id,
            self.pad_token_id,
        )?;
        self.warn_ignored();
        let cfg = ModelConfig {
            architecture: Architecture::Llada2,
            d_model: d,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
            mlp_hidden_size,
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
            qk_norm: self.use_qk_norm.unwrap_or(true),
            qkv_bias: false,
            logits_shift: false,
            // a 2-D padding mask turns the official attention causal (see model::llada2)
            mask_padding: true,
            moe: Some(MoeSpec {
                num_experts,
                top_k,
                expert_size,
                layers: (0..n_layers).map(|i| i >= dense).collect(),
                shared_expert_size: (shared > 0).then_some(expert_size * shared),
                expert_bias: true,
                aux_loss_coef: 0.0,
                router: Router::SigmoidGrouped {
                    n_group,
                    topk_group,
                    scaling,
                },
            }),
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
        if self.use_bias {
            return Err(unsupported("use_bias", &true, "false"));
        }
        if self.use_qkv_bias {
            return Err(unsupported("use_qkv_bias", &true, "false"));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return Err(unsupported("rope_scaling", s, "null"));
        }
        Ok(())
    }

    /// Keys whose values the official code ignores: said once at load when they ask for
    /// something it does not do.
    fn warn_ignored(&self) {
        if self.norm_topk_prob == Some(false) && self.num_experts_per_tok > 1 {
            tracing::warn!("config.json: norm_topk_prob=false is ignored, as by the official LLaDA2 code (the top-k weights are always renormalised)");
        }
        if let Some(s) = self.score_function.as_deref().filter(|s| *s != "sigmoid") {
            tracing::warn!("config.json: score_function={s:?} is ignored, as by the official LLaDA2 code (the router is always a sigmoid)");
        }
        if self.moe_router_enable_expert_bias == Some(false) {
            tracing::warn!("config.json: moe_router_enable_expert_bias=false is ignored, as by the official LLaDA2 code (the expert_bias buffer is always added)");
        }
        if self.use_sliding_window == Some(true) {
            tracing::warn!("config.json: use_sliding_window=true is ignored, as by the official LLaDA2 code (the window is passed to the attention and unused)");
        }
    }

    /// The architecture name the file gives (`architectures[0]`).
    pub fn architecture(&self) -> String {
        self.architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_else(|| "LLaDA2MoeModelLM".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden tiny LLaDA2 config (shared/golden/llada2-moe/config.json), its meaningful keys.
    fn tiny() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LLaDA2MoeModelLM"], "first_k_dense_replace": 1, "head_dim": 16,
            "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 160,
            "moe_intermediate_size": 32, "n_group": 2, "num_attention_heads": 4, "num_experts": 8,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "num_shared_experts": 1, "pad_token_id": 507, "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-6, "rope_theta": 600000, "rotary_dim": 8,
            "routed_scaling_factor": 2.5, "topk_group": 1, "vocab_size": 512,
            "norm_topk_prob": true, "score_function": "sigmoid", "use_rmsnorm": true
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelConfig> {
        serde_json::from_value::<Llada2Config>(v).unwrap().resolve()
    }

    #[test]
    fn resolves_the_golden_config() {
        let c = parse(tiny()).unwrap();
        assert_eq!(c.architecture, Architecture::Llada2);
        assert_eq!((c.head_dim, c.rotary_dim, c.n_kv_heads), (16, 8, 2));
        assert!(c.qk_norm);
        let m = c.moe.as_ref().unwrap();
        assert_eq!(m.layers, vec![false, true]);
        assert_eq!(m.shared_expert_size, Some(32));
        assert_eq!(
            m.router,
            Router::SigmoidGrouped {
                n_group: 2,
                topk_group: 1,
                scaling: 2.5
            }
        );
        // 47 tensors: 177,024 parameters + the 8 expert_bias values (golden README)
        assert_eq!(c.parameter_count(), 177_024 + 8);
    }

    #[test]
    fn the_real_mini_sizes_count_16b_parameters_1b_active() {
        let c = Llada2Config::default().resolve().unwrap();
        let (all, active) = (c.parameter_count(), c.active_parameter_count());
        assert!((16.0e9..16.5e9).contains(&(all as f64)), "{all}");
        // 1.4 B with the embedding, which a token only looks up
        assert!((1.0e9..1.2e9).contains(&(active as f64)), "{active}");
    }

    #[test]
    fn unimplemented_values_are_errors_naming_the_key() {
        for (key, value) in [
            ("use_qkv_bias", serde_json::json!(true)),
            ("use_bias", serde_json::json!(true)),
            ("hidden_act", serde_json::json!("gelu")),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 2.0}),
            ),
            ("partial_rotary_factor", serde_json::json!(0.3)),
            ("n_group", serde_json::json!(3)),
            ("topk_group", serde_json::json!(3)),
            ("routed_scaling_factor", serde_json::json!(0.0)),
        ] {
            let mut v = tiny();
            v[key] = value;
            let e = parse(v).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn written_back_with_unknown_keys_kept() {
        let mut v = tiny();
        v["some_future_key"] = serde_json::json!([1, 2]);
        let c: Llada2Config = serde_json::from_value(v).unwrap();
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["some_future_key"], serde_json::json!([1, 2]));
        assert_eq!(back["rotary_dim"], serde_json::json!(8));
    }
}
