//! LLaDA-8B's architecture (`LLaDAModelLM`): a LLaMA-style Transformer (RMSNorm, SwiGLU, RoPE)
//! with bidirectional attention, read top-down: tensor names → block → model → load → the
//! inference forward (through a [`KvCache`]) → the training forward (differentiable ops only) →
//! the [`MaskPredictor`] implementation with the cache modes (reference §2, §6.4).

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Module, Result as CResult, Tensor};

use super::attention::{attention_bias, Attention, Rope, Visibility};
use super::cache::KvCache;
use super::layers::{Linear, Mlp, RmsNorm};
use super::moe::Ffn;
use super::{Architecture, CacheMode, MaskPredictor, WeightLayout, WeightSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::attention::KvShape;
use crate::kernels::Backend;

/// Prefix of every tensor name in the Hugging Face checkpoint (`LLaDAModelLM.model.transformer`).
pub const PREFIX: &str = "model.transformer";

/// The checkpoint keys: every tensor name is written here and nowhere else.
mod names {
    use super::PREFIX;

    /// The token embedding `wte` [V, D].
    pub fn wte() -> String {
        format!("{PREFIX}.wte.weight")
    }
    /// The final norm `ln_f` [D].
    pub fn ln_f() -> String {
        format!("{PREFIX}.ln_f.weight")
    }
    /// The untied output head [V, D].
    pub fn head() -> String {
        format!("{PREFIX}.ff_out.weight")
    }
    /// Part `part` (e.g. `q_proj`) of block `i`.
    pub fn block(i: usize, part: &str) -> String {
        format!("{PREFIX}.blocks.{i}.{part}.weight")
    }
}

/// The checkpoint name of part `part` (e.g. `q_proj`) of block `i`.
pub fn block_weight_name(i: usize, part: &str) -> String {
    names::block(i, part)
}

/// The parts of a block, in checkpoint order.
const BLOCK_PARTS: [&str; 9] = [
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_norm",
    "ff_proj",
    "up_proj",
    "ff_out",
];

/// The tensors of one block: part name and shape, in [`BLOCK_PARTS`] order.
fn block_specs(cfg: &ModelConfig) -> [(&'static str, Vec<usize>); 9] {
    let (d, f) = (cfg.d_model, cfg.mlp_hidden_size);
    let qd = cfg.n_heads * cfg.head_dim;
    let kvd = cfg.n_kv_heads * cfg.head_dim;
    let shapes = [
        vec![d],
        vec![qd, d],
        vec![kvd, d],
        vec![kvd, d],
        vec![d, qd],
        vec![d],
        vec![f, d],
        vec![f, d],
        vec![d, f],
    ];
    let mut out = BLOCK_PARTS.map(|part| (part, Vec::new()));
    for ((_, shape), s) in out.iter_mut().zip(shapes) {
        *shape = s;
    }
    out
}

/// The tensors of a checkpoint for `cfg` (of any architecture of this family): names
/// (checkpoint keys) and shapes, in a stable order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    match cfg.architecture {
        Architecture::Llada => llada_tensor_specs(cfg),
        Architecture::LladaMoe => super::llada_moe::tensor_specs(cfg),
        Architecture::Dream => super::dream::tensor_specs(cfg),
        Architecture::Llada2 => super::llada2::tensor_specs(cfg),
    }
}

/// LLaDA-8B's tensors.
fn llada_tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (cfg.d_model, cfg.embedding_size);
    let mut out = vec![(names::wte(), vec![v, d])];
    for i in 0..cfg.n_layers {
        out.extend(
            block_specs(cfg)
                .into_iter()
                .map(|(part, shape)| (names::block(i, part), shape)),
        );
    }
    out.push((names::ln_f(), vec![d]));
    if !cfg.weight_tying {
        out.push((names::head(), vec![v, d]));
    }
    out
}

/// The checkpoint names of the tensors outside the blocks.
pub(super) struct OuterNames<'a> {
    pub embedding: &'a str,
    pub final_norm: &'a str,
    /// The untied output head (unread when the head is tied).
    pub head: &'a str,
}

/// One Transformer block: attention, then a feed-forward part (dense SwiGLU, or a mixture of
/// experts), each after an RMSNorm and with a residual connection.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ff_norm: RmsNorm,
    pub ffn: Ffn,
}

impl Block {
    fn load(
        src: &dyn WeightSource,
        cfg: &ModelConfig,
        i: usize,
        layout: WeightLayout,
    ) -> Result<Self> {
        let specs = block_specs(cfg);
        // each tensor is read, then packed, before the next is read: the loader holds at most
        // one tensor beyond the model
        let get = |part: &str| -> Result<Tensor> {
            let shape = specs
                .iter()
                .find(|(p, _)| *p == part)
                .map(|(_, s)| s.as_slice())
                .unwrap_or(&[]);
            src.get(&names::block(i, part), shape)
        };
        let w = |part: &str| -> Result<Linear> { layout.linear(get(part)?) };
        let norm = |part: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(get(part)?, cfg.rms_norm_eps, cfg.norm))
        };
        let mlp = Mlp::new(w("ff_proj")?, w("up_proj")?, w("ff_out")?);
        let attn_norm = norm("attn_norm")?;
        let attn = Attention {
            q_proj: w("q_proj")?,
            k_proj: w("k_proj")?,
            v_proj: w("v_proj")?,
            attn_out: w("attn_out")?,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            qk_norm: None,
            qkv_bias: None,
        };
        let ff_norm = norm("ff_norm")?;
        Ok(Block {
            attn_norm,
            attn,
            ff_norm,
            ffn: Ffn::Dense(mlp),
        })
    }

    /// The block's tensors with their checkpoint names, in [`BLOCK_PARTS`] order.
    fn named(&self, i: usize, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let Ffn::Dense(m) = &self.ffn else {
            return Err(Error::setting(
                "block",
                i,
                "a LLaDA-8B block has a dense feed-forward part",
            ));
        };
        let a = &self.attn;
        for part in BLOCK_PARTS {
            let t = match part {
                "attn_norm" => self.attn_norm.weight.clone(),
                "q_proj" => a.q_proj.tensor()?,
                "k_proj" => a.k_proj.tensor()?,
                "v_proj" => a.v_proj.tensor()?,
                "attn_out" => a.attn_out.tensor()?,
                "ff_norm" => self.ff_norm.weight.clone(),
                "ff_proj" => m.ff_proj.tensor()?,
                "up_proj" => m.up_proj.tensor()?,
                "ff_out" => m.ff_out.tensor()?,
                other => {
                    return Err(Error::MissingTensor {
                        name: names::block(i, other),
                        path: "<block>".into(),
                    })
                }
            };
            out.push((names::block(i, part), t));
        }
        Ok(())
    }

    /// Inference on a chunk: `x` [B·n, D] holds positions start..start+n; their keys and values
    /// go into `cache` (layer `layer`), the other positions' come from it. With `keep` (offsets
    /// within the chunk, increasing), only those rows go through the MLP and come out
    /// ([B·|keep|, D]): the last layer needs every row's keys and values but only the rows whose
    /// logits are read.
    #[allow(clippy::too_many_arguments)]
    fn forward_chunk(
        &self,
        x: &Tensor,
        b: usize,
        n: usize,
        start: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        keep: Option<&[usize]>,
    ) -> CResult<Tensor> {
        let mut x = self.attend_chunk(x, b, n, start, rope, cache, layer)?;
        if let Some(r) = keep {
            x = select_rows(&x, b, n, r)?;
        }
        let f = self.ff_norm.forward(&x)?;
        self.ffn.forward_add(&f, &x)
    }

    /// The attention half of [`Block::forward_chunk`]: x + attention(norm(x)), [B·n, D].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_chunk(
        &self,
        x: &Tensor,
        b: usize,
        n: usize,
        start: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> CResult<Tensor> {
        let a = self.attn_norm.forward(x)?;
        cache.attend(layer, &self.attn, &a, x, b, n, start, rope)
    }

    /// The linear map `part` (q_proj, k_proj, v_proj, attn_out; ff_proj, up_proj, ff_out of a
    /// dense feed-forward part), to replace it (e.g. with an adapted one).
    pub fn linear_mut(&mut self, part: &str) -> Option<&mut Linear> {
        let a = &mut self.attn;
        match (part, &mut self.ffn) {
            ("q_proj", _) => Some(&mut a.q_proj),
            ("k_proj", _) => Some(&mut a.k_proj),
            ("v_proj", _) => Some(&mut a.v_proj),
            ("attn_out", _) => Some(&mut a.attn_out),
            ("ff_proj", Ffn::Dense(m)) => Some(&mut m.ff_proj),
            ("up_proj", Ffn::Dense(m)) => Some(&mut m.up_proj),
            ("ff_out", Ffn::Dense(m)) => Some(&mut m.ff_out),
            _ => None,
        }
    }

    /// Training: h + attn(norm(h)), then + ffn(norm(·)), differentiable ops only. `x` is
    /// [B·L, D]. Also returns a mixture-of-experts layer's router logits [B·L, E].
    fn forward_train(
        &self,
        x: &Tensor,
        b: usize,
        l: usize,
        rope: &Rope,
        bias: Option<&Tensor>,
    ) -> CResult<(Tensor, Option<Tensor>)> {
        let a = self.attn_norm.forward_diff(x)?;
        let x = (x + self.attn.forward_train(&a, b, l, rope, bias)?)?;
        let f = self.ff_norm.forward_diff(&x)?;
        let (y, router) = self.ffn.forward_diff(&f)?;
        Ok(((x + y)?, router))
    }
}

/// Rows `r` (offsets, increasing) of each sequence of `x` [B·n, D] → [B·|r|, D].
fn select_rows(x: &Tensor, b: usize, n: usize, r: &[usize]) -> CResult<Tensor> {
    let d = x.dim(1)?;
    let x3 = x.reshape((b, n, d))?;
    let contiguous_run = r.windows(2).all(|w| w[1] == w[0] + 1);
    let picked = if contiguous_run {
        x3.narrow(1, r[0], r.len())?.contiguous()?
    } else {
        let idx: Vec<u32> = r.iter().map(|&o| o as u32).collect();
        x3.index_select(&Tensor::from_vec(idx, r.len(), x.device())?, 1)?
    };
    picked.reshape((b * r.len(), d))
}

/// The mask predictor of the LLaDA family: LLaDA-8B's blocks, or LLaDA-MoE's (QK norms, mixture
/// of experts), which share everything else (embedding, bidirectional attention, caches, head).
/// Each architecture's file loads its checkpoint names into this struct.
#[derive(Debug, Clone)]
pub struct Llada {
    cfg: ModelConfig,
    pub wte: Tensor, // [V, D]
    pub blocks: Vec<Block>,
    pub ln_f: RmsNorm,
    /// Output head [V, D] (`wte` itself, packed if need be, when `weight_tying`).
    pub head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// Which kernels the inference forward takes (decided once, at load).
    backend: Backend,
}

impl Llada {
    /// Builds the model from `src` with dense weights (training, any device), checking every
    /// tensor's name and shape.
    pub fn load(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<Self> {
        Self::load_with(cfg, src, WeightLayout::Dense)
    }

    /// Builds the model from `src` with the given weight layout.
    pub fn load_with(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        layout: WeightLayout,
    ) -> Result<Self> {
        match cfg.architecture {
            Architecture::LladaMoe => return super::llada_moe::load(cfg, src, layout),
            Architecture::Dream => return super::dream::load(cfg, src, layout),
            Architecture::Llada2 => return super::llada2::load(cfg, src, layout),
            Architecture::Llada => {}
        }
        let outer = OuterNames {
            embedding: &names::wte(),
            final_norm: &names::ln_f(),
            head: &names::head(),
        };
        Self::load_outer(cfg, src, layout, &outer, |i| {
            Block::load(src, cfg, i, layout)
        })
    }

    /// The model from `src` given the names of its outer tensors and a loader of block `i`
    /// (each architecture's file names its tensors; the rest is the family's).
    pub(super) fn load_outer(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        layout: WeightLayout,
        names: &OuterNames<'_>,
        block: impl Fn(usize) -> Result<Block>,
    ) -> Result<Self> {
        let (d, v) = (cfg.d_model, cfg.embedding_size);
        let wte = src.get(names.embedding, &[v, d])?;
        let blocks = (0..cfg.n_layers).map(block).collect::<Result<Vec<_>>>()?;
        let ln_f = RmsNorm::new(src.get(names.final_norm, &[d])?, cfg.rms_norm_eps, cfg.norm);
        let head = if cfg.weight_tying {
            layout.linear(wte.clone())?
        } else {
            layout.linear(src.get(names.head, &[v, d])?)?
        };
        Self::from_parts(cfg, wte, blocks, ln_f, head)
    }

    /// The model of these parts (an architecture's loader calls it once its tensors are read).
    pub fn from_parts(
        cfg: &ModelConfig,
        wte: Tensor,
        blocks: Vec<Block>,
        ln_f: RmsNorm,
        head: Linear,
    ) -> Result<Self> {
        let device = wte.device().clone();
        let rope = Rope::partial(
            cfg.head_dim,
            cfg.rotary_dim,
            cfg.rope_theta,
            cfg.max_sequence_length,
            &device,
        )?;
        Ok(Llada {
            cfg: cfg.clone(),
            dtype: wte.dtype(),
            backend: Backend::select(&device, wte.dtype()),
            wte,
            blocks,
            ln_f,
            head,
            rope,
            device,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The rotary position tables (built for the positions used so far).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes the weights take in the compute dtype.
    pub fn weights_bytes(&self) -> u64 {
        self.cfg
            .parameter_count()
            .saturating_mul(self.dtype.size_in_bytes() as u64)
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every tensor with its checkpoint name, in [`tensor_specs`] order (packed weights are
    /// unpacked).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self.cfg.architecture {
            Architecture::LladaMoe => return super::llada_moe::named_tensors(self),
            Architecture::Dream => return super::dream::named_tensors(self),
            Architecture::Llada2 => return super::llada2::named_tensors(self),
            Architecture::Llada => {}
        }
        let mut out = vec![(names::wte(), self.wte.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            b.named(i, &mut out)?;
        }
        out.push((names::ln_f(), self.ln_f.weight.clone()));
        if !self.cfg.weight_tying {
            out.push((names::head(), self.head.tensor()?));
        }
        Ok(out)
    }

    /// The mask predictor of this model for the sampler and the scorer, with the cache modes.
    pub fn predictor(&self) -> LladaPredictor<'_> {
        LladaPredictor::new(self)
    }

    pub(crate) fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, l) = ids.dims2()?;
        if b == 0 || l == 0 {
            return Err(Error::setting(
                "input",
                format!("{b}x{l}"),
                "needs at least one token",
            ));
        }
        Ok((b, l))
    }

    /// Embeds ids [B, L] → [B·L, D].
    fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        self.wte.embedding(&ids.flatten_all()?)
    }

    // ---- inference ----

    /// Logits [B, L, V] (f32) for every position of `ids` [B, L] (u32), with an optional
    /// key-padding mask [B, L] (1 = real token, 0 = padding; padded keys get no attention,
    /// padded queries are still computed).
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let (_, l) = self.check_ids(ids)?;
        let rows: Vec<usize> = (0..l).collect();
        self.forward_rows_at(ids, key_mask, &rows)
    }

    /// Logits [B, |rows|, V] of the positions `rows` (increasing) only: every position still goes
    /// through the blocks (attention is bidirectional), but the last block's MLP, the final norm
    /// and the output head run only on the rows asked for.
    pub fn forward_rows_at(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        self.forward_rows_visible(ids, key_mask, rows, self.default_visibility())
    }

    /// [`Llada::forward_rows_at`] with the keys each query sees given by `visibility`
    /// (block-causal attention for block diffusion).
    pub fn forward_rows_visible(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
        visibility: Visibility,
    ) -> Result<Tensor> {
        let (b, l) = self.check_ids(ids)?;
        // nothing is kept after this forward: the layers take turns with one key/value store
        let mut cache = self.cache_with(b, l, key_mask, true, visibility)?;
        self.forward_chunk_at(ids, 0, &mut cache, rows)
    }

    /// The attention mask of the model's own forward: causal for the autoregressive twin,
    /// bidirectional otherwise.
    pub fn default_visibility(&self) -> Visibility {
        if self.cfg.causal {
            Visibility::Causal
        } else {
            Visibility::All
        }
    }

    /// Logits [B, L, V] (f32) of `ids` [B, L] with an explicit additive attention mask `bias`
    /// (f32, broadcastable to [B, 1, L, L]: added to the scaled scores, as a 4-D
    /// `attention_mask` of the Hugging Face models) at positions 0..L, through candle's tensor
    /// ops on any device.
    pub fn forward_with_bias(&self, ids: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l) = self.check_ids(ids)?;
        let bias = bias.to_dtype(DType::F32)?.to_device(&self.device)?;
        let mut h = self.embed(ids)?;
        for block in &self.blocks {
            let a = block.attn_norm.forward(&h)?;
            let (q, k, v) = block.attn.qkv(&a, b, l, &self.rope, 0)?;
            let o = block.attn.attend(&q, &k, &v, Some(&bias))?;
            let x = crate::kernels::add(&h, &o)?;
            let f = block.ff_norm.forward(&x)?;
            h = block.ffn.forward_add(&f, &x)?;
        }
        let logits = self.head.forward_f32(&self.ln_f.forward(&h)?)?;
        Ok(logits
            .to_dtype(DType::F32)?
            .reshape((b, l, self.cfg.embedding_size))?)
    }

    /// An empty key/value cache for `batch` canvases of `len` positions (with their key-padding
    /// mask [B, L], if any).
    pub fn new_cache(
        &self,
        batch: usize,
        len: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<KvCache> {
        self.cache_with(batch, len, key_mask, false, self.default_visibility())
    }

    /// [`Llada::new_cache`] for attention with `visibility`.
    pub fn new_cache_visible(
        &self,
        batch: usize,
        len: usize,
        key_mask: Option<&Tensor>,
        visibility: Visibility,
    ) -> Result<KvCache> {
        self.cache_with(batch, len, key_mask, false, visibility)
    }

    /// A cache as [`Llada::new_cache`]; `one_pass` for a single full forward whose keys and values
    /// are not kept (every layer rewrites one shared store before reading it).
    fn cache_with(
        &self,
        batch: usize,
        len: usize,
        key_mask: Option<&Tensor>,
        one_pass: bool,
        visibility: Visibility,
    ) -> Result<KvCache> {
        // a model whose official forward ignores padding (LLaDA-MoE) ignores it here too, unless
        // its config opts in (`mask_padding`)
        let key_mask = key_mask.filter(|_| self.cfg.mask_padding);
        if let (Architecture::Dream, Some(m)) = (self.cfg.architecture, key_mask) {
            super::dream::check_positions(m)?;
        }
        let visibility = match (self.cfg.architecture, key_mask) {
            (Architecture::Llada2, Some(m)) => super::llada2::padded_visibility(m, visibility)?,
            _ => visibility,
        };
        let shape = KvShape {
            batch,
            kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            len,
        };
        Ok(KvCache::new(
            self.backend,
            self.cfg.n_layers,
            shape,
            self.dtype,
            key_mask,
            one_pass,
            visibility,
        )?)
    }

    /// Inference forward of canvas positions `start..start+n` (`ids` [B, n]) with every other
    /// position's keys and values taken from `cache`, which is updated with this chunk's. The
    /// first call on a fresh cache must cover the whole canvas. Returns the logits [B, |rows|, V]
    /// (f32) of the increasing absolute positions `rows` (within the chunk): the last block's MLP
    /// and the head run only on those rows.
    pub fn forward_chunk_at(
        &self,
        ids: &Tensor,
        start: usize,
        cache: &mut KvCache,
        rows: &[usize],
    ) -> Result<Tensor> {
        let (b, n) = self.check_ids(ids)?;
        let ok = !rows.is_empty()
            && rows.windows(2).all(|w| w[0] < w[1])
            && rows[0] >= start
            && rows[rows.len() - 1] < start + n;
        if !ok {
            return Err(Error::setting(
                "rows",
                format!("{rows:?}"),
                format!(
                    "must be increasing positions (at least one) within the chunk {start}..{}",
                    start + n
                ),
            ));
        }
        let total = cache.len();
        if b != cache.batch() || start + n > total {
            return Err(Error::setting(
                "chunk",
                format!("{b}x{start}..{}", start + n),
                format!(
                    "must lie within the cached canvas {}x{total}",
                    cache.batch()
                ),
            ));
        }
        let vocab = self.cfg.embedding_size;
        let mut h = self.embed(ids)?; // [B·n, D]
        let w = rows.len();
        let offsets: Vec<usize> = rows.iter().map(|&r| r - start).collect();
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            // the last layer's MLP runs only on the rows whose logits are asked for
            let keep = (i == last && w != n).then_some(offsets.as_slice());
            h = block.forward_chunk(&h, b, n, start, &self.rope, cache, i, keep)?;
        }
        // final norm and output head: [B·w, D] → [B·w, V], in f32 whatever the weights' dtype
        let logits = self.head.forward_f32(&self.ln_f.forward(&h)?)?;
        Ok(logits.to_dtype(DType::F32)?.reshape((b, w, vocab))?)
    }

    // ---- training ----

    /// Training forward: logits [N, V] of the flattened positions `positions` (indices into
    /// B·L) only, made of differentiable ops. The output head (the largest matrix for small
    /// models) runs only on the positions the loss reads.
    pub fn forward_train_positions(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train_aux(ids, positions)?.0)
    }

    /// [`Llada::forward_train_positions`] with, for a mixture-of-experts model, the router's
    /// load-balancing loss over every layer's tokens (unweighted; the trainer applies
    /// `router_aux_loss_coef`).
    pub fn forward_train_aux(
        &self,
        ids: &Tensor,
        positions: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l) = self.check_ids(ids)?;
        let bias = attention_bias(None, self.default_visibility(), 0, l, l, &self.device)?;
        let mut h = self.embed(ids)?; // [B·L, D]
        let mut routers = Vec::new();
        for block in &self.blocks {
            let (next, router) = block.forward_train(&h, b, l, &self.rope, bias.as_ref())?;
            h = next;
            routers.extend(router);
        }
        let logits = self.train_head(&h, positions, l)?;
        let aux = match (&self.cfg.moe, routers.is_empty()) {
            // LLaDA2's grouped sigmoid router is balanced by its expert bias, not by this
            // softmax loss (which it has no coefficient for)
            (Some(m), false) if m.router == crate::config::Router::Softmax => {
                Some(super::moe::load_balancing_loss(&routers, m.top_k)?)
            }
            _ => None,
        };
        Ok((logits, aux))
    }

    /// The training forward's top: the final norm and the output head on the rows `positions`
    /// of `h` [B·L, D] (a shifted model's position p reads row p − 1) → f32 logits [N, V].
    fn train_head(&self, h: &Tensor, positions: &Tensor, l: usize) -> Result<Tensor> {
        let h = if self.cfg.logits_shift {
            // position p's prediction is output p − 1's (a sequence's first, its own)
            let p: Vec<u32> = positions.to_dtype(DType::U32)?.to_vec1()?;
            let src: Vec<u32> = p
                .iter()
                .map(|&p| {
                    if (p as usize).is_multiple_of(l) {
                        p
                    } else {
                        p - 1
                    }
                })
                .collect();
            h.index_select(&Tensor::from_vec(src, p.len(), &self.device)?, 0)?
        } else {
            h.index_select(positions, 0)?
        }; // [N, D]
        let head = if self.cfg.weight_tying {
            &self.wte
        } else {
            self.head.dense_tensor()?
        };
        let logits = super::layers::diff_matmul_t(&self.ln_f.forward_diff(&h)?, head)?; // [N, V]
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Activation checkpointing: the loss `loss_of(logits)` of the training forward and the
    /// gradients of `vars` (tensor ids of trainable variables), keeping only each block's input
    /// between the forward and the backward pass. The backward pass goes from the top down,
    /// recomputing one block at a time from its input and backpropagating the gradient that
    /// reached its output (`Σ out ⊙ g`, whose gradient is exactly g); the same operations in
    /// the same order as the plain backward, so the gradients are the same to the bit.
    ///
    /// Dense blocks only: a mixture-of-experts layer's load-balancing loss spans all layers.
    pub fn train_checkpointed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        vars: &[candle_core::TensorId],
        loss_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, HashMap<candle_core::TensorId, Tensor>)> {
        if self.cfg.moe.is_some() {
            return Err(Error::setting(
                "checkpoint_activations",
                true,
                "is implemented for dense models (a mixture of experts' balancing loss spans every layer)",
            ));
        }
        let (b, l) = self.check_ids(ids)?;
        let bias = attention_bias(None, self.default_visibility(), 0, l, l, &self.device)?;
        let mut grads: HashMap<candle_core::TensorId, Tensor> = HashMap::new();
        let mut collect = |store: &candle_core::backprop::GradStore| -> Result<()> {
            for id in vars {
                if let Some(g) = store.get_id(*id) {
                    let g = match grads.remove(id) {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    };
                    grads.insert(*id, g);
                }
            }
            Ok(())
        };
        // forward: keep each block's input, detached (its graph is dropped at once)
        let h0 = self.embed(ids)?;
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut h = h0.detach();
        for block in &self.blocks {
            let (next, _) = block.forward_train(&h, b, l, &self.rope, bias.as_ref())?;
            inputs.push(h);
            h = next.detach();
        }
        // the top: norm, head, loss
        let top = candle_core::Var::from_tensor(&h)?;
        drop(h);
        let loss = loss_of(&self.train_head(top.as_tensor(), positions, l)?)?;
        let store = loss.backward()?;
        collect(&store)?;
        let mut g = store
            .get(top.as_tensor())
            .cloned()
            .unwrap_or(top.as_tensor().zeros_like()?);
        drop(store);
        // down the blocks, recomputing each from its input
        for (block, x) in self.blocks.iter().zip(inputs).rev() {
            let x = candle_core::Var::from_tensor(&x)?;
            let (out, _) = block.forward_train(x.as_tensor(), b, l, &self.rope, bias.as_ref())?;
            let store = (out * &g)?.sum_all()?.backward()?;
            collect(&store)?;
            g = store
                .get(x.as_tensor())
                .cloned()
                .unwrap_or(x.as_tensor().zeros_like()?);
        }
        // the embedding
        let store = (h0 * &g)?.sum_all()?.backward()?;
        collect(&store)?;
        Ok((loss.detach(), grads))
    }

    /// Builds a model with weights drawn from N(0, init_std²) (norm weights 1), seeded. On a GPU
    /// the weights are drawn there (an 8B-shaped model needs no host copy); on the CPU from the
    /// library's seeded stream, tensor by tensor.
    pub fn init_random(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let mut map = HashMap::new();
        for (name, shape) in tensor_specs(cfg) {
            let t = initial_tensor(cfg, &name, &shape, dtype, device, &mut rng)?;
            map.insert(name, t);
        }
        Llada::load(cfg, &map)
    }
}

/// The initial value of tensor `name` of a model of `cfg`: zeros for a router's expert bias,
/// otherwise as [`random_tensor`] (N(0, `init_std`²), norms 1), with LLaDA-MoE's padding
/// embedding row at zero (the official `nn.Embedding(padding_idx)`).
pub fn initial_tensor(
    cfg: &ModelConfig,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
    rng: &mut crate::rng::Rng,
) -> Result<Tensor> {
    if super::llada_moe::starts_at_zero(name) {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    let t = random_tensor(shape, cfg.init_std, dtype, device, rng)?;
    match super::llada_moe::padding_row(cfg) {
        Some((n, row)) if n == name && shape.len() == 2 => Ok(super::llada_moe::zero_row(&t, row)?),
        _ => Ok(t),
    }
}

/// One initial tensor: ones for norm weights (1-D), N(0, std²) otherwise.
pub fn random_tensor(
    shape: &[usize],
    std: f64,
    dtype: DType,
    device: &Device,
    rng: &mut crate::rng::Rng,
) -> Result<Tensor> {
    if shape.len() == 1 {
        return Ok(Tensor::ones(shape, dtype, device)?);
    }
    if !device.is_cpu() {
        return Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?);
    }
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// LLaDA's [`MaskPredictor`]: the inference forward with the cache modes (Fast-dLLM, reference
/// §6.4). At the start of each block one full forward (its logits are the block's first step)
/// fills the keys/values of every layer; later steps recompute only the current block (`Dual`:
/// the suffix keeps its block-start keys/values) or the block and everything after it
/// (`Prefix`: the prefix before the block stays cached).
pub struct LladaPredictor<'a> {
    model: &'a Llada,
    mode: CacheMode,
    cache: Option<KvCache>,
    block: Range<usize>,
    refresh: bool,
    /// The attention mask (block diffusion sets a block-causal one).
    visibility: Visibility,
    /// Block diffusion's canvas length (the exact block cache is sized to it).
    canvas_len: usize,
    /// Block diffusion's exact cache: the positions before this one hold final keys/values.
    final_until: usize,
}

impl<'a> LladaPredictor<'a> {
    pub fn new(model: &'a Llada) -> Self {
        LladaPredictor {
            model,
            mode: CacheMode::None,
            cache: None,
            block: 0..0,
            refresh: true,
            visibility: model.default_visibility(),
            canvas_len: 0,
            final_until: 0,
        }
    }

    /// Block-causal attention with −∞ for later blocks: finished blocks' keys and values are
    /// final, and the cached steps keep them (see `outputs_at`).
    fn exact_block_cache(&self) -> bool {
        matches!(self.visibility, Visibility::Blocks { blocked, .. } if blocked == f32::NEG_INFINITY)
            && self.mode != CacheMode::None
    }
}

impl LladaPredictor<'_> {
    /// The model's outputs at `rows` (no shift).
    fn outputs_at(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        let (b, l) = x.dims2()?;
        if self.mode == CacheMode::None {
            return self
                .model
                .forward_rows_visible(x, key_mask, rows, self.visibility);
        }
        if matches!(self.visibility, Visibility::Blocks { .. }) && !self.exact_block_cache() {
            return Err(Error::setting(
                "cache",
                self.mode,
                "block-causal attention whose later blocks are not hidden (LLaDA2.1's 0/1 mask) cannot be cached",
            ));
        }
        if self.exact_block_cache() {
            if rows.is_empty() || rows[rows.len() - 1] >= l {
                return Err(Error::setting(
                    "rows",
                    format!("{rows:?}"),
                    format!("must be at least one position of the {l}-token window"),
                ));
            }
            // x is the window up to the block's end; recompute from the first position whose
            // keys/values are not final (the previous block at a block's first step)
            let cap = self.canvas_len.max(l);
            let stale = self
                .cache
                .as_ref()
                .is_none_or(|c| c.len() != cap || c.batch() != b);
            if stale {
                self.cache =
                    Some(
                        self.model
                            .new_cache_visible(b, cap, key_mask, self.visibility)?,
                    );
                self.final_until = 0;
            }
            let from = self.final_until.min(self.block.start).min(rows[0]);
            let ids = x.narrow(1, from, l - from)?;
            let cache = self
                .cache
                .as_mut()
                .ok_or_else(|| Error::setting("cache", "empty", "no block cache"))?;
            let out = self.model.forward_chunk_at(&ids, from, cache, rows)?;
            self.final_until = self.block.start;
            return Ok(out);
        }
        let stale = self
            .cache
            .as_ref()
            .is_none_or(|c| c.len() != l || c.batch() != b);
        if self.refresh || stale {
            let mut cache = self.model.new_cache(b, l, key_mask)?;
            let out = self.model.forward_chunk_at(x, 0, &mut cache, rows)?;
            self.cache = Some(cache);
            self.refresh = false;
            return Ok(out);
        }
        let chunk = self.mode.recomputed(self.block.clone(), l);
        let ids = x.narrow(1, chunk.start, chunk.end - chunk.start)?;
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| Error::setting("cache", "empty", "no block-start forward yet"))?;
        self.model.forward_chunk_at(&ids, chunk.start, cache, rows)
    }
}

/// For a model whose output i predicts position i + 1 (`logits_shift`): the outputs to compute
/// for the increasing positions `rows` (each row's predecessor, position 0 its own), and for each
/// row the index of its output among them.
pub(crate) fn shifted_rows(rows: &[usize]) -> (Vec<usize>, Vec<u32>) {
    let mut src: Vec<usize> = rows.iter().map(|&r| r.saturating_sub(1)).collect();
    src.dedup();
    let pick = rows
        .iter()
        .map(|&r| src.partition_point(|&s| s < r.saturating_sub(1)) as u32)
        .collect();
    (src, pick)
}

impl MaskPredictor for LladaPredictor<'_> {
    fn logits_at(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        if !self.model.cfg.logits_shift {
            return self.outputs_at(x, key_mask, rows);
        }
        // Dream's sampler: position i's logits are output i − 1's, position 0 keeps its own
        let (src, pick) = shifted_rows(rows);
        let out = self.outputs_at(x, key_mask, &src)?;
        if src.len() == rows.len() {
            return Ok(out); // a one-to-one map of increasing rows is the identity
        }
        let pick = Tensor::from_vec(pick, rows.len(), out.device())?;
        Ok(out.index_select(&pick, 1)?)
    }

    fn device(&self) -> Device {
        self.model.device().clone()
    }

    fn max_sequence_length(&self) -> usize {
        self.model.config().max_sequence_length
    }

    fn set_visibility(&mut self, visibility: Visibility, len: usize) -> Result<()> {
        // a new canvas: nothing cached is final for it
        self.cache = None;
        self.final_until = 0;
        self.visibility = visibility;
        self.canvas_len = len;
        Ok(())
    }

    fn begin_block(&mut self, block: Range<usize>, mode: CacheMode) -> Result<()> {
        self.mode = mode;
        // with shifted logits the block's first position is predicted by the output before it,
        // which the cached steps must therefore recompute too
        self.block = if self.model.cfg.logits_shift {
            block.start.saturating_sub(1)..block.end
        } else {
            block
        };
        self.refresh = true;
        Ok(())
    }
}
