//! Dream's architecture (`DreamModel`, Dream-org/Dream-v0-Base/-Instruct-7B, adapted from
//! Qwen2.5-7B; DiffuCoder and Dream-Coder share it), as the official `modeling_dream.py`
//! computes it:
//!
//! ```text
//! x = embed_tokens[ids]
//! per layer: x += o_proj(SDPA(RoPE(q_proj(n) + bq), RoPE(k_proj(n) + bk), v_proj(n) + bv)),
//!            n = RMSNorm(x) · input_layernorm          (bidirectional, GQA, scale 1/√hd)
//!            x += down(silu(gate(n')) · up(n')),  n' = RMSNorm(x) · post_attention_layernorm
//! logits = lm_head(RMSNorm(x) · norm)                   (untied head unless tie_word_embeddings)
//! ```
//!
//! It is LLaDA's bidirectional LLaMA-style block with biases on the q/k/v projections, in the
//! Hugging Face Qwen2 tensor layout (`model.layers.N.self_attn.q_proj.{weight,bias}`, …,
//! `model.norm`, `lm_head`): the tensors are those of the layout LLaDA-MoE's file reads
//! ([`super::llada_moe`], with `qkv_bias`), and the forward, the caches and the predictor are the
//! family's ([`Llada`]). What is Dream's own:
//!
//! - **Shifted logits.** The model's output at position i predicts position i + 1 (the
//!   autoregressive habit it was adapted from); Dream's sampler shifts them
//!   (`cat(logits[:, :1], logits[:, :-1])`), so position 0 keeps its own output. In llada the
//!   shift is the model's property (`ModelConfig::logits_shift`): [`super::MaskPredictor`] gives
//!   shifted logits to every sampler and to the scorer, the training loss reads the same outputs,
//!   and the raw forward ([`Llada::forward`], the golden forward cases) is unshifted.
//! - **Positions of padded rows.** The official sampler gives a padded row the positions
//!   `cumsum(mask) − 1` and masks pad keys (pad query rows have no allowed key: their outputs are
//!   meaningless). For a row whose tokens are one contiguous run (left or right padding, all the
//!   engine builds) those positions are the canvas positions minus a constant, and RoPE scores
//!   depend only on position differences: llada keeps positions `0..L-1` and masks the pad keys,
//!   which gives the same logits at every token position up to float rounding (the golden
//!   left-padded batch agrees within 2e-5). A row with holes in its mask would need other
//!   relative positions: [`check_positions`] refuses it.

use candle_core::Tensor;

use super::llada::Llada;
use super::{WeightLayout, WeightSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The tensors of a Dream checkpoint for `cfg`: names and shapes, in checkpoint order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    super::llada_moe::tensor_specs(cfg)
}

/// The model read from `src`, checking every tensor's name and shape.
pub fn load(cfg: &ModelConfig, src: &dyn WeightSource, layout: WeightLayout) -> Result<Llada> {
    if cfg.moe.is_some() || !cfg.qkv_bias || !cfg.logits_shift {
        return Err(Error::setting(
            "architecture",
            "DreamModel",
            "needs a Dream config (dense layers, q/k/v biases, shifted logits)",
        ));
    }
    super::llada_moe::load(cfg, src, layout)
}

/// Every tensor of `m` with its checkpoint name, in [`tensor_specs`] order.
pub fn named_tensors(m: &Llada) -> Result<Vec<(String, Tensor)>> {
    super::llada_moe::named_tensors(m)
}

/// Dream's positions of a padded batch are `cumsum(mask) − 1`; llada's canvas positions give the
/// same attention only when each row's tokens form one contiguous run (see the module docs).
/// `key_mask` is [B, L] (1 = token).
pub fn check_positions(key_mask: &Tensor) -> Result<()> {
    let rows: Vec<Vec<u32>> = key_mask.to_dtype(candle_core::DType::U32)?.to_vec2()?;
    for (b, row) in rows.iter().enumerate() {
        let first = row.iter().position(|&m| m != 0);
        let last = row.iter().rposition(|&m| m != 0);
        if let (Some(f), Some(l)) = (first, last) {
            if row[f..=l].contains(&0) {
                return Err(Error::setting(
                    "attention_mask",
                    format!("row {b} with padding between tokens"),
                    "a Dream model needs each row's tokens in one run (left or right padding): its positions are cumsum(mask) - 1",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `llada init` starts the q/k/v biases at zero (the official `_init_weights`), the norms
    /// at one and the matrices random.
    #[test]
    fn initial_biases_are_zero() {
        let cfg = crate::config::DreamConfig::default().resolve().unwrap();
        let mut rng = crate::rng::Rng::new(0);
        let mut init = |name: &str, shape: &[usize]| -> Vec<f32> {
            super::super::initial_tensor(
                &cfg,
                name,
                shape,
                candle_core::DType::F32,
                &Device::Cpu,
                &mut rng,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
        };
        assert!(init("model.layers.0.self_attn.q_proj.bias", &[8])
            .iter()
            .all(|&x| x == 0.0));
        assert!(init("model.layers.0.input_layernorm.weight", &[8])
            .iter()
            .all(|&x| x == 1.0));
        assert!(init("model.layers.0.self_attn.q_proj.weight", &[8, 8])
            .iter()
            .any(|&x| x != 0.0));
    }

    #[test]
    fn positions_need_one_run_of_tokens() {
        let m = |v: Vec<u32>| Tensor::from_vec(v, (2, 4), &Device::Cpu).unwrap();
        check_positions(&m(vec![0, 0, 1, 1, 1, 1, 1, 1])).unwrap();
        check_positions(&m(vec![1, 1, 0, 0, 0, 1, 1, 1])).unwrap();
        let e = check_positions(&m(vec![1, 1, 1, 1, 1, 0, 1, 1])).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
    }
}
