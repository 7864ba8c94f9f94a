//! LLaDA2.x's architecture (`LLaDA2MoeModelLM`: inclusionAI/LLaDA2.0-mini, LLaDA2.0-flash,
//! LLaDA2.1-mini; BailingMoeV2-derived), as the official `modeling_llada2_moe.py` computes it:
//!
//! ```text
//! h = word_embeddings[ids]
//! per layer: h += dense(Attn(n)),  n = RMSNorm(h) · input_layernorm
//!            Attn: q, k, v = split(query_key_value(n))   (heads: nh queries, nkv keys, nkv values)
//!                  q, k = RMSNorm_hd(q) · query_layernorm, RMSNorm_hd(k) · key_layernorm
//!                  RoPE (rotate-half) on the first head_dim · partial_rotary_factor dims only
//!                  SDPA with GQA, scale 1/√hd, the attention mask added (block-causal in generate())
//!            h += mlp(n'),  n' = RMSNorm(h) · post_attention_layernorm
//!            mlp: layers < first_k_dense_replace a SwiGLU; the others a mixture of experts with
//!                 LLaDA2's grouped sigmoid router (crate::config::Router::SigmoidGrouped) and
//!                 one shared expert
//! logits = lm_head(RMSNorm(h) · norm)
//! ```
//!
//! The forward, the caches and the predictor are the family's ([`Llada`]); what this file owns
//! is the checkpoint layout and two load-time rewrites that leave the logits unchanged:
//!
//! - **Fused QKV.** `attention.query_key_value` [(nh + 2·nkv)·hd, D] is split into the q, k and
//!   v projections (rows 0..nh·hd, then nkv·hd, then nkv·hd) and fused back on export.
//! - **Partial rotary.** RoPE rotates pairs (j, j + rot/2) of the first `rot` dims of each head.
//!   The engine's kernels rotate pairs (j, j + hd/2); the rows of each q and k head (and the QK
//!   norm weights) are permuted at load by [`partial_rotary_order`], and the pairs past `rot/2`
//!   get frequency 0 ([`super::attention::Rope::partial`]). A permutation applied to queries and
//!   keys alike leaves every attention score unchanged; the values are not permuted.
//!
//! Attention masks, as the official forward: none = bidirectional; a 2-D padding mask with any
//! zero = **causal** + key padding (transformers' causal-LM mask builder, inherited from the
//! autoregressive BailingMoe: [`padded_visibility`]); block diffusion passes its block-causal
//! mask as a [`Visibility::Blocks`] (LLaDA2.0's 0/−∞, LLaDA2.1's 0/1), and any other 4-D mask
//! goes through [`Llada::forward_with_bias`].

use candle_core::{DType, Tensor};

use super::attention::{partial_rotary_order, Attention, QkNorm, Visibility};
use super::layers::{Linear, Mlp, RmsNorm};
use super::llada::{Block, Llada, OuterNames};
use super::moe::{Ffn, SparseMoe};
use super::{WeightLayout, WeightSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The checkpoint keys: every tensor name is written here and nowhere else.
mod names {
    pub fn embed() -> String {
        "model.word_embeddings.weight".into()
    }
    pub fn norm() -> String {
        "model.norm.weight".into()
    }
    pub fn head() -> String {
        "lm_head.weight".into()
    }
    /// `part` (e.g. `attention.dense`) of layer `i`.
    pub fn layer(i: usize, part: &str) -> String {
        format!("model.layers.{i}.{part}.weight")
    }
    /// The router's expert bias of layer `i` (a persistent buffer: no `.weight`).
    pub fn expert_bias(i: usize) -> String {
        format!("model.layers.{i}.mlp.gate.expert_bias")
    }
}

/// The mixture-of-experts settings when layer `i` is one.
fn moe_layer(cfg: &ModelConfig, i: usize) -> Option<&crate::config::MoeSpec> {
    cfg.moe
        .as_ref()
        .filter(|m| m.layers.get(i).copied().unwrap_or(false))
}

/// The tensors of layer `i`: name and shape, in checkpoint order.
fn layer_specs(cfg: &ModelConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let (d, hd) = (cfg.d_model, cfg.head_dim);
    let l = |part: &str, shape: Vec<usize>| (names::layer(i, part), shape);
    let mut out = vec![
        l("input_layernorm", vec![d]),
        l(
            "attention.query_key_value",
            vec![(cfg.n_heads + 2 * cfg.n_kv_heads) * hd, d],
        ),
    ];
    if cfg.qk_norm {
        out.push(l("attention.query_layernorm", vec![hd]));
        out.push(l("attention.key_layernorm", vec![hd]));
    }
    out.push(l("attention.dense", vec![d, cfg.n_heads * hd]));
    out.push(l("post_attention_layernorm", vec![d]));
    let swiglu = |out: &mut Vec<_>, prefix: &str, f: usize| {
        out.push(l(&format!("{prefix}.gate_proj"), vec![f, d]));
        out.push(l(&format!("{prefix}.up_proj"), vec![f, d]));
        out.push(l(&format!("{prefix}.down_proj"), vec![d, f]));
    };
    match moe_layer(cfg, i) {
        Some(m) => {
            out.push(l("mlp.gate", vec![m.num_experts, d]));
            out.push((names::expert_bias(i), vec![m.num_experts]));
            for e in 0..m.num_experts {
                swiglu(&mut out, &format!("mlp.experts.{e}"), m.expert_size);
            }
            if let Some(f) = m.shared_expert_size {
                swiglu(&mut out, "mlp.shared_experts", f);
            }
        }
        None => swiglu(&mut out, "mlp", cfg.mlp_hidden_size),
    }
    out
}

/// The tensors of a checkpoint for `cfg`: names and shapes, in a stable order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (cfg.d_model, cfg.embedding_size);
    let mut out = vec![(names::embed(), vec![v, d])];
    for i in 0..cfg.n_layers {
        out.extend(layer_specs(cfg, i));
    }
    out.push((names::norm(), vec![d]));
    if !cfg.weight_tying {
        out.push((names::head(), vec![v, d]));
    }
    out
}

/// Row indices that apply `order` (per head, `order[new] = old`) to `heads` heads of `hd` rows.
fn head_rows(order: &[usize], heads: usize) -> Vec<u32> {
    let hd = order.len();
    (0..heads)
        .flat_map(|h| order.iter().map(move |&o| (h * hd + o) as u32))
        .collect()
}

/// The inverse of a permutation.
fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; order.len()];
    for (new, &old) in order.iter().enumerate() {
        inv[old] = new;
    }
    inv
}

/// The rows `rows` of `t` (along dim 0).
fn pick_rows(t: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_slice(rows, rows.len(), t.device())?;
    Ok(t.index_select(&idx, 0)?.contiguous()?)
}

/// Layer `i`'s block read from `src`.
fn load_block(
    src: &dyn WeightSource,
    cfg: &ModelConfig,
    i: usize,
    layout: WeightLayout,
) -> Result<Block> {
    let (d, hd) = (cfg.d_model, cfg.head_dim);
    let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
    let get = |part: &str, shape: &[usize]| src.get(&names::layer(i, part), shape);
    let norm = |w: Tensor| RmsNorm::new(w, cfg.rms_norm_eps, cfg.norm);
    let w = |part: &str, shape: &[usize]| -> Result<Linear> { layout.linear(get(part, shape)?) };
    let order = partial_rotary_order(hd, cfg.rotary_dim);
    let permuted = cfg.rotary_dim != hd;
    let permute = |t: Tensor, heads: usize| -> Result<Tensor> {
        if permuted {
            pick_rows(&t, &head_rows(&order, heads))
        } else {
            Ok(t)
        }
    };
    let attn_norm = norm(get("input_layernorm", &[d])?);
    let qkv = get("attention.query_key_value", &[(nh + 2 * nkv) * hd, d])?;
    let q = permute(qkv.narrow(0, 0, nh * hd)?, nh)?;
    let k = permute(qkv.narrow(0, nh * hd, nkv * hd)?, nkv)?;
    let v = qkv.narrow(0, (nh + nkv) * hd, nkv * hd)?.contiguous()?;
    drop(qkv);
    let qk_norm = if cfg.qk_norm {
        Some(QkNorm {
            q: norm(permute(get("attention.query_layernorm", &[hd])?, 1)?),
            k: norm(permute(get("attention.key_layernorm", &[hd])?, 1)?),
        })
    } else {
        None
    };
    let attn = Attention {
        q_proj: layout.linear(q)?,
        k_proj: layout.linear(k)?,
        v_proj: layout.linear(v)?,
        attn_out: w("attention.dense", &[d, nh * hd])?,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        qk_norm,
        qkv_bias: None,
    };
    let ff_norm = norm(get("post_attention_layernorm", &[d])?);
    let swiglu = |prefix: &str, f: usize| -> Result<Mlp> {
        Ok(Mlp::new(
            w(&format!("{prefix}.gate_proj"), &[f, d])?,
            w(&format!("{prefix}.up_proj"), &[f, d])?,
            w(&format!("{prefix}.down_proj"), &[d, f])?,
        ))
    };
    let ffn = match moe_layer(cfg, i) {
        None => Ffn::Dense(swiglu("mlp", cfg.mlp_hidden_size)?),
        Some(m) => {
            // the router is computed in f32 from the f32 weights, as the official gate
            let gate = Linear::dense(get("mlp.gate", &[m.num_experts, d])?);
            let b = super::llada_moe::read_expert_bias(src, &names::expert_bias(i), m.num_experts)?;
            let experts = (0..m.num_experts)
                .map(|e| swiglu(&format!("mlp.experts.{e}"), m.expert_size))
                .collect::<Result<Vec<_>>>()?;
            let shared = match m.shared_expert_size {
                Some(f) => Some(swiglu("mlp.shared_experts", f)?),
                None => None,
            };
            Ffn::Moe(SparseMoe {
                gate,
                experts,
                shared,
                expert_bias: Some(b),
                top_k: m.top_k,
                router: m.router,
            })
        }
    };
    Ok(Block {
        attn_norm,
        attn,
        ff_norm,
        ffn,
    })
}

/// The model read from `src`, checking every tensor's name and shape.
pub fn load(cfg: &ModelConfig, src: &dyn WeightSource, layout: WeightLayout) -> Result<Llada> {
    if cfg.moe.is_none() || cfg.qkv_bias || cfg.logits_shift {
        return Err(Error::setting(
            "architecture",
            "LLaDA2MoeModelLM",
            "needs a LLaDA2 config (mixture-of-experts layers, no q/k/v biases, unshifted logits)",
        ));
    }
    let outer = OuterNames {
        embedding: &names::embed(),
        final_norm: &names::norm(),
        head: &names::head(),
    };
    Llada::load_outer(cfg, src, layout, &outer, |i| {
        load_block(src, cfg, i, layout)
    })
}

/// Every tensor of `m` with its checkpoint name, in [`tensor_specs`] order (the q/k/v
/// projections fused back, the head rows in the checkpoint's order).
pub fn named_tensors(m: &Llada) -> Result<Vec<(String, Tensor)>> {
    let cfg = m.config();
    let hd = cfg.head_dim;
    let back = inverse(&partial_rotary_order(hd, cfg.rotary_dim));
    let permuted = cfg.rotary_dim != hd;
    let unpermute = |t: Tensor, heads: usize| -> Result<Tensor> {
        if permuted {
            pick_rows(&t, &head_rows(&back, heads))
        } else {
            Ok(t)
        }
    };
    let mut out = vec![(names::embed(), m.wte.clone())];
    for (i, b) in m.blocks.iter().enumerate() {
        let mut push = |part: &str, t: Tensor| out.push((names::layer(i, part), t));
        push("input_layernorm", b.attn_norm.weight.clone());
        let a = &b.attn;
        let q = unpermute(a.q_proj.tensor()?, cfg.n_heads)?;
        let k = unpermute(a.k_proj.tensor()?, cfg.n_kv_heads)?;
        let qkv = Tensor::cat(&[&q, &k, &a.v_proj.tensor()?], 0)?;
        push("attention.query_key_value", qkv);
        if let Some(n) = &a.qk_norm {
            push(
                "attention.query_layernorm",
                unpermute(n.q.weight.clone(), 1)?,
            );
            push("attention.key_layernorm", unpermute(n.k.weight.clone(), 1)?);
        }
        push("attention.dense", a.attn_out.tensor()?);
        push("post_attention_layernorm", b.ff_norm.weight.clone());
        let mlp = |out: &mut Vec<(String, Tensor)>, prefix: &str, mlp: &Mlp| {
            super::llada_moe::push_swiglu(out, i, prefix, mlp)
        };
        match &b.ffn {
            Ffn::Dense(d) => mlp(&mut out, "mlp", d)?,
            Ffn::Moe(moe) => {
                out.push((names::layer(i, "mlp.gate"), moe.gate.tensor()?));
                let bias = moe.expert_bias.clone().unwrap_or_default();
                let t = Tensor::from_slice(&bias, bias.len(), m.device())?.to_dtype(m.dtype())?;
                out.push((names::expert_bias(i), t));
                for (e, x) in moe.experts.iter().enumerate() {
                    mlp(&mut out, &format!("mlp.experts.{e}"), x)?;
                }
                if let Some(s) = &moe.shared {
                    mlp(&mut out, "mlp.shared_experts", s)?;
                }
            }
        }
    }
    out.push((names::norm(), m.ln_f.weight.clone()));
    if !cfg.weight_tying {
        out.push((names::head(), m.head.tensor()?));
    }
    Ok(out)
}

/// The attention of the official forward given a 2-D padding mask `key_mask` [B, L]: a mask with
/// any zero makes it causal (transformers' causal-LM mask builder) on top of `visibility`'s
/// bidirectional default; an all-ones mask is dropped (bidirectional). Block-causal visibility
/// is kept as it is.
pub fn padded_visibility(key_mask: &Tensor, visibility: Visibility) -> Result<Visibility> {
    if visibility != Visibility::All {
        return Ok(visibility);
    }
    let zeros = key_mask
        .to_dtype(DType::F32)?
        .eq(0f64)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(if zeros > 0.0 {
        Visibility::Causal
    } else {
        Visibility::All
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_rotary_order_pairs_the_rotated_dims_across_the_halves() {
        // head 16, rotary 8: old pairs (0,4) (1,5) (2,6) (3,7) must sit at (j, j + 8)
        let o = partial_rotary_order(16, 8);
        for j in 0..4 {
            assert_eq!((o[j], o[j + 8]), (j, j + 4));
        }
        // the unrotated dims 8..16 fill the rest, each once
        let mut rest: Vec<usize> = o[4..8].iter().chain(&o[12..16]).copied().collect();
        rest.sort();
        assert_eq!(rest, (8..16).collect::<Vec<_>>());
        assert_eq!(partial_rotary_order(8, 8), (0..8).collect::<Vec<_>>());
        let inv = inverse(&o);
        assert!((0..16).all(|i| o[inv[i]] == i));
    }
}
