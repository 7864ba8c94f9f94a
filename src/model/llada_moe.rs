//! LLaDA-MoE's architecture (`LLaDAMoEModelLM`, inclusionAI/LLaDA-MoE-7B-A1B): LLaDA's
//! bidirectional Transformer with per-head QK RMSNorm before RoPE and, where `moe_layer_freq` says
//! so, a sparse mixture of experts in place of the dense SwiGLU ([`super::moe`]). Read top-down:
//! tensor names (the OLMoE-style names of the Hugging Face checkpoint) → tensor list → loader →
//! the tensors back under their names. The forward, the caches and the predictor are the family's
//! ([`super::llada::Llada`]), as the official code shares them with LLaDA-8B.
//!
//! As the official forward (`modeling_lladamoe.py`): positions are `0..L-1` on every row and the
//! attention mask is **ignored** (pads attend and are attended to) unless the config opts in with
//! `mask_padding: true` (a llada extension); the router's top-k weights are not renormalised.

use super::attention::{Attention, QkNorm, QkvBias};
use super::layers::{Linear, Mlp, RmsNorm};
use super::llada::{Block, Llada, OuterNames};
use super::moe::{Ffn, SparseMoe};
use super::{WeightLayout, WeightSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// The checkpoint keys: every tensor name is written here and nowhere else.
mod names {
    pub fn embed() -> String {
        "model.embed_tokens.weight".into()
    }
    pub fn norm() -> String {
        "model.norm.weight".into()
    }
    pub fn head() -> String {
        "lm_head.weight".into()
    }
    /// `part` (e.g. `self_attn.q_proj`) of layer `i`.
    pub fn layer(i: usize, part: &str) -> String {
        format!("model.layers.{i}.{part}.weight")
    }
    /// The bias of `part` (e.g. `self_attn.q_proj`) of layer `i` (Dream's q/k/v).
    pub fn bias(i: usize, part: &str) -> String {
        format!("model.layers.{i}.{part}.bias")
    }
    /// The router's expert bias of layer `i` (a buffer: no `.weight`).
    pub fn expert_bias(i: usize) -> String {
        format!("model.layers.{i}.mlp.expert_bias")
    }
}

/// The tensors of layer `i`: name and shape, in checkpoint order.
fn layer_specs(cfg: &ModelConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let d = cfg.d_model;
    let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let l = |part: &str, shape: Vec<usize>| (names::layer(i, part), shape);
    let mut out = vec![l("input_layernorm", vec![d])];
    for (proj, rows) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
        out.push(l(&format!("self_attn.{proj}"), vec![rows, d]));
        if cfg.qkv_bias {
            out.push((names::bias(i, &format!("self_attn.{proj}")), vec![rows]));
        }
    }
    out.push(l("self_attn.o_proj", vec![d, qd]));
    if cfg.qk_norm {
        out.push(l("self_attn.q_norm", vec![cfg.head_dim]));
        out.push(l("self_attn.k_norm", vec![cfg.head_dim]));
    }
    out.push(l("post_attention_layernorm", vec![d]));
    let swiglu = |out: &mut Vec<_>, prefix: &str, f: usize| {
        out.push(l(&format!("{prefix}.gate_proj"), vec![f, d]));
        out.push(l(&format!("{prefix}.up_proj"), vec![f, d]));
        out.push(l(&format!("{prefix}.down_proj"), vec![d, f]));
    };
    match moe_layer(cfg, i) {
        Some(m) => {
            out.push(l("mlp.gate", vec![m.num_experts, d]));
            if m.expert_bias {
                out.push((names::expert_bias(i), vec![m.num_experts]));
            }
            for e in 0..m.num_experts {
                swiglu(&mut out, &format!("mlp.experts.{e}"), m.expert_size);
            }
            if let Some(f) = m.shared_expert_size {
                swiglu(&mut out, "shared_expert", f);
            }
        }
        None => swiglu(&mut out, "mlp", cfg.mlp_hidden_size),
    }
    out
}

/// The mixture-of-experts settings when layer `i` is one.
fn moe_layer(cfg: &ModelConfig, i: usize) -> Option<&crate::config::MoeSpec> {
    cfg.moe
        .as_ref()
        .filter(|m| m.layers.get(i).copied().unwrap_or(false))
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

/// Layer `i`'s block read from `src`.
fn load_block(
    src: &dyn WeightSource,
    cfg: &ModelConfig,
    i: usize,
    layout: WeightLayout,
) -> Result<Block> {
    let d = cfg.d_model;
    let get = |part: &str, shape: &[usize]| src.get(&names::layer(i, part), shape);
    let norm = |part: &str, n: usize| -> Result<RmsNorm> {
        Ok(RmsNorm::new(get(part, &[n])?, cfg.rms_norm_eps, cfg.norm))
    };
    let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let w = |part: &str, shape: &[usize]| -> Result<Linear> { layout.linear(get(part, shape)?) };
    let attn_norm = norm("input_layernorm", d)?;
    let qk_norm = if cfg.qk_norm {
        Some(QkNorm {
            q: norm("self_attn.q_norm", cfg.head_dim)?,
            k: norm("self_attn.k_norm", cfg.head_dim)?,
        })
    } else {
        None
    };
    let attn = Attention {
        q_proj: w("self_attn.q_proj", &[qd, d])?,
        k_proj: w("self_attn.k_proj", &[kvd, d])?,
        v_proj: w("self_attn.v_proj", &[kvd, d])?,
        attn_out: w("self_attn.o_proj", &[d, qd])?,
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        qk_norm,
        qkv_bias: None,
    };
    let attn = if cfg.qkv_bias {
        let b = |proj: &str, n: usize| src.get(&names::bias(i, &format!("self_attn.{proj}")), &[n]);
        attn.with_bias(QkvBias {
            q: b("q_proj", qd)?,
            k: b("k_proj", kvd)?,
            v: b("v_proj", kvd)?,
        })
    } else {
        attn
    };
    let ff_norm = norm("post_attention_layernorm", d)?;
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
            // the router stays dense (E rows are few); its logits are computed in the hidden
            // dtype and the softmax in f32, as the official block
            let gate = Linear::dense(get("mlp.gate", &[m.num_experts, d])?);
            let expert_bias = if m.expert_bias {
                Some(read_expert_bias(
                    src,
                    &names::expert_bias(i),
                    m.num_experts,
                )?)
            } else {
                None
            };
            let experts = (0..m.num_experts)
                .map(|e| swiglu(&format!("mlp.experts.{e}"), m.expert_size))
                .collect::<Result<Vec<_>>>()?;
            let shared = match m.shared_expert_size {
                Some(f) => Some(swiglu("shared_expert", f)?),
                None => None,
            };
            Ffn::Moe(SparseMoe {
                gate,
                experts,
                shared,
                expert_bias,
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

/// A router's expert bias `name` [n] (f32), which must be finite: it decides which experts run.
pub(super) fn read_expert_bias(src: &dyn WeightSource, name: &str, n: usize) -> Result<Vec<f32>> {
    let b = src
        .get(name, &[n])?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    if let Some(x) = b.iter().find(|x| !x.is_finite()) {
        return Err(Error::setting(
            name,
            x,
            "the router's expert bias must be finite (it decides which experts run)",
        ));
    }
    Ok(b)
}

/// The model read from `src`, checking every tensor's name and shape.
pub fn load(cfg: &ModelConfig, src: &dyn WeightSource, layout: WeightLayout) -> Result<Llada> {
    let outer = OuterNames {
        embedding: &names::embed(),
        final_norm: &names::norm(),
        head: &names::head(),
    };
    Llada::load_outer(cfg, src, layout, &outer, |i| {
        load_block(src, cfg, i, layout)
    })
}

/// The matrices of a SwiGLU of layer `i` under their Hugging Face names
/// (`model.layers.{i}.{prefix}.{gate,up,down}_proj.weight`, the layout LLaDA-MoE, Dream and
/// LLaDA2 share).
pub(super) fn push_swiglu(
    out: &mut Vec<(String, Tensor)>,
    i: usize,
    prefix: &str,
    mlp: &Mlp,
) -> Result<()> {
    for (proj, w) in [
        ("gate_proj", &mlp.ff_proj),
        ("up_proj", &mlp.up_proj),
        ("down_proj", &mlp.ff_out),
    ] {
        out.push((names::layer(i, &format!("{prefix}.{proj}")), w.tensor()?));
    }
    Ok(())
}

/// Every tensor of `m` with its checkpoint name, in [`tensor_specs`] order.
pub fn named_tensors(m: &Llada) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![(names::embed(), m.wte.clone())];
    for (i, b) in m.blocks.iter().enumerate() {
        let mut push = |part: &str, t: Tensor| out.push((names::layer(i, part), t));
        push("input_layernorm", b.attn_norm.weight.clone());
        let a = &b.attn;
        let biases = a.qkv_bias.as_ref().map(|b| [&b.q, &b.k, &b.v]);
        for (j, (proj, w)) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
        ]
        .into_iter()
        .enumerate()
        {
            out.push((names::layer(i, &format!("self_attn.{proj}")), w.tensor()?));
            if let Some(b) = biases {
                out.push((names::bias(i, &format!("self_attn.{proj}")), b[j].clone()));
            }
        }
        let mut push = |part: &str, t: Tensor| out.push((names::layer(i, part), t));
        push("self_attn.o_proj", a.attn_out.tensor()?);
        if let Some(n) = &a.qk_norm {
            push("self_attn.q_norm", n.q.weight.clone());
            push("self_attn.k_norm", n.k.weight.clone());
        }
        push("post_attention_layernorm", b.ff_norm.weight.clone());
        let mlp = |out: &mut Vec<(String, Tensor)>, prefix: &str, mlp: &Mlp| {
            push_swiglu(out, i, prefix, mlp)
        };
        match &b.ffn {
            Ffn::Dense(d) => mlp(&mut out, "mlp", d)?,
            Ffn::Moe(moe) => {
                out.push((names::layer(i, "mlp.gate"), moe.gate.tensor()?));
                if let Some(bias) = &moe.expert_bias {
                    let t =
                        Tensor::from_slice(bias, bias.len(), m.device())?.to_dtype(m.dtype())?;
                    out.push((names::expert_bias(i), t));
                }
                for (e, x) in moe.experts.iter().enumerate() {
                    mlp(&mut out, &format!("mlp.experts.{e}"), x)?;
                }
                if let Some(s) = &moe.shared {
                    mlp(&mut out, "shared_expert", s)?;
                }
            }
        }
    }
    out.push((names::norm(), m.ln_f.weight.clone()));
    if !m.config().weight_tying {
        out.push((names::head(), m.head.tensor()?));
    }
    Ok(out)
}

/// Whether `name` is a tensor that starts at zero (the router's expert bias; Dream's q/k/v
/// projection biases, as `nn.Linear` biases under the official `_init_weights`), not N(0, σ²) or
/// ones.
pub fn starts_at_zero(name: &str) -> bool {
    name.ends_with(".mlp.expert_bias")
        || name.ends_with(".mlp.gate.expert_bias")
        || name.ends_with("_proj.bias")
}

/// The embedding row the official model keeps at zero and never trains: `nn.Embedding`'s
/// `padding_idx` = `pad_token_id` (tensor name, row), for a LLaDA-MoE config that names a pad id
/// within the vocabulary.
pub fn padding_row(cfg: &ModelConfig) -> Option<(String, usize)> {
    if cfg.architecture != super::Architecture::LladaMoe {
        return None;
    }
    let p = cfg.pad_token_id? as usize;
    (p < cfg.embedding_size).then(|| (names::embed(), p))
}

/// `t` [V, D] with row `row` set to zero.
pub fn zero_row(t: &Tensor, row: usize) -> candle_core::Result<Tensor> {
    let d = t.dim(1)?;
    let z = Tensor::zeros((1, d), t.dtype(), t.device())?;
    t.slice_assign(&[row..row + 1, 0..d], &z)
}

/// The routing of every layer for `ids` [B, L] (inference forward): per mixture-of-experts layer
/// (dense layers are skipped), per sequence and position, the chosen experts in descending
/// probability. For tests and `llada info`-style diagnostics.
pub fn routing(m: &Llada, ids: &Tensor) -> Result<Vec<Vec<Vec<Vec<u32>>>>> {
    let (b, l) = m.check_ids(ids)?;
    let mut cache = m.new_cache(b, l, None)?;
    let mut out = Vec::new();
    let mut h = m.wte.embedding(&ids.flatten_all()?)?;
    let rope = m.rope().clone();
    for (i, block) in m.blocks.iter().enumerate() {
        // the blocks' own steps, with the router's choices read in between
        let x = block.attend_chunk(&h, b, l, 0, &rope, &mut cache, i)?;
        let f = candle_core::Module::forward(&block.ff_norm, &x)?;
        if let Ffn::Moe(moe) = &block.ffn {
            let r = moe.route(&f)?;
            out.push(r.experts.chunks(l).map(|c| c.to_vec()).collect());
        }
        h = block.ffn.forward_add(&f, &x)?;
    }
    if out.is_empty() {
        return Err(Error::setting(
            "model",
            "dense",
            "has no mixture-of-experts layer to route",
        ));
    }
    Ok(out)
}
