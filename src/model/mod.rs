//! The LLaDA mask predictor: a LLaMA-style Transformer (RMSNorm, SwiGLU, RoPE) with bidirectional
//! attention, read top-down: names → block → model → load → forward (reference §2).

pub mod attention;
pub mod cache;
pub mod layers;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result as CResult, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::SafetensorsFiles;

pub use attention::{Attention, Rope};

pub use cache::KvCache;

use crate::kernels::attention::{KeyMask, KvShape};
pub use layers::{Linear, Mlp, RmsNorm};

/// Prefix of every tensor name in the Hugging Face checkpoint (`LLaDAModelLM.model.transformer`).
pub const PREFIX: &str = "model.transformer";

/// The tensors of a checkpoint for `cfg`: names (checkpoint keys) and shapes, in a stable order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size);
    let qd = cfg.n_heads * cfg.head_dim;
    let kvd = cfg.n_kv_heads * cfg.head_dim;
    let mut out = vec![(format!("{PREFIX}.wte.weight"), vec![v, d])];
    for i in 0..cfg.n_layers {
        let p = format!("{PREFIX}.blocks.{i}");
        out.push((format!("{p}.attn_norm.weight"), vec![d]));
        out.push((format!("{p}.q_proj.weight"), vec![qd, d]));
        out.push((format!("{p}.k_proj.weight"), vec![kvd, d]));
        out.push((format!("{p}.v_proj.weight"), vec![kvd, d]));
        out.push((format!("{p}.attn_out.weight"), vec![d, qd]));
        out.push((format!("{p}.ff_norm.weight"), vec![d]));
        out.push((format!("{p}.ff_proj.weight"), vec![f, d]));
        out.push((format!("{p}.up_proj.weight"), vec![f, d]));
        out.push((format!("{p}.ff_out.weight"), vec![d, f]));
    }
    out.push((format!("{PREFIX}.ln_f.weight"), vec![d]));
    if !cfg.weight_tying {
        out.push((format!("{PREFIX}.ff_out.weight"), vec![v, d]));
    }
    out
}

/// Where the model's tensors come from.
pub trait WeightSource {
    /// The tensor `name` with exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
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

/// One Transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ff_norm: RmsNorm,
    pub mlp: Mlp,
}

/// How linear weights are held: dense tensors (training, GPUs) or packed for the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    Dense,
    /// Packed for inference where the CPU has a kernel for the dtype (dense otherwise).
    PackedForInference,
}

fn make_linear(t: Tensor, layout: WeightLayout) -> Result<Linear> {
    Ok(match layout {
        WeightLayout::Dense => Linear::new(t),
        WeightLayout::PackedForInference => Linear::packed(t)?,
    })
}

impl Block {
    fn load(
        src: &dyn WeightSource,
        cfg: &ModelConfig,
        i: usize,
        layout: WeightLayout,
    ) -> Result<Self> {
        let p = format!("{PREFIX}.blocks.{i}");
        let (d, f) = (cfg.d_model, cfg.mlp_hidden_size);
        let qd = cfg.n_heads * cfg.head_dim;
        let kvd = cfg.n_kv_heads * cfg.head_dim;
        let norm = |n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                src.get(&format!("{p}.{n}.weight"), &[d])?,
                cfg.rms_norm_eps,
                cfg.norm,
            ))
        };
        let w = |n: &str, shape: &[usize]| -> Result<Linear> {
            make_linear(src.get(&format!("{p}.{n}.weight"), shape)?, layout)
        };
        let mut mlp = Mlp {
            ff_proj: w("ff_proj", &[f, d])?,
            up_proj: w("up_proj", &[f, d])?,
            ff_out: w("ff_out", &[d, f])?,
        };
        mlp.fuse_for_inference();
        Ok(Block {
            attn_norm: norm("attn_norm")?,
            attn: Attention {
                q_proj: w("q_proj", &[qd, d])?,
                k_proj: w("k_proj", &[kvd, d])?,
                v_proj: w("v_proj", &[kvd, d])?,
                attn_out: w("attn_out", &[d, qd])?,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
            },
            ff_norm: norm("ff_norm")?,
            mlp,
        })
    }

    fn named(&self, i: usize, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let p = format!("{PREFIX}.blocks.{i}");
        out.push((
            format!("{p}.attn_norm.weight"),
            self.attn_norm.weight.clone(),
        ));
        for (n, l) in [
            ("q_proj", &self.attn.q_proj),
            ("k_proj", &self.attn.k_proj),
            ("v_proj", &self.attn.v_proj),
            ("attn_out", &self.attn.attn_out),
        ] {
            out.push((format!("{p}.{n}.weight"), l.tensor()?));
        }
        out.push((format!("{p}.ff_norm.weight"), self.ff_norm.weight.clone()));
        for (n, l) in [
            ("ff_proj", &self.mlp.ff_proj),
            ("up_proj", &self.mlp.up_proj),
            ("ff_out", &self.mlp.ff_out),
        ] {
            out.push((format!("{p}.{n}.weight"), l.tensor()?));
        }
        Ok(())
    }

    /// h + attn(norm(h)), then + mlp(norm(·)). `x` is [B·L, D].
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        l: usize,
        rope: &Rope,
        bias: Option<&Tensor>,
        differentiable: bool,
    ) -> CResult<Tensor> {
        let a = self.norm(&self.attn_norm, x, differentiable)?;
        let (q, k, v) = self.attn.qkv(&a, b, l, rope, 0, differentiable)?;
        let x = (x + self.attn.attend(&q, &k, &v, bias, differentiable)?)?;
        self.mlp_residual(&x, differentiable)
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
        causal: bool,
        keep: Option<&[usize]>,
    ) -> CResult<Tensor> {
        let a = self.attn_norm.forward(x)?;
        // x + attention(norm(x))
        let mut x = match cache {
            KvCache::Fused {
                stores,
                shape,
                valid,
            } => {
                let mask = KeyMask {
                    valid: valid.as_deref(),
                    causal,
                };
                let shape = *shape;
                // one shared store in a one-pass cache (see `KvCache::new`)
                let at = layer.min(stores.len() - 1);
                self.attn
                    .forward_fused(&a, x, b, n, start, &mut stores[at], shape, &mask, rope)?
            }
            KvCache::Tensors {
                kv, pad_bias, len, ..
            } => {
                let (q, k, v) = self.attn.qkv(&a, b, n, rope, start, false)?;
                let (k, v) = match kv[layer].take() {
                    Some((ok, ov)) => (
                        cache::replace_rows(&ok, &k, start)?,
                        cache::replace_rows(&ov, &v, start)?,
                    ),
                    None if start == 0 && n == *len => (k, v),
                    None => {
                        candle_core::bail!("KV cache: the first pass must cover the whole canvas")
                    }
                };
                let bias = if causal {
                    let c = cache::causal_bias(start, n, *len, x.device())?;
                    Some(match pad_bias {
                        Some(p) => p.broadcast_add(&c)?.clamp(f32::MIN, 0.0)?,
                        None => c,
                    })
                } else {
                    pad_bias.clone()
                };
                let o = self.attn.attend(&q, &k, &v, bias.as_ref(), false)?;
                kv[layer] = Some((k, v));
                crate::kernels::add(x, &o)?
            }
        };
        if let Some(r) = keep {
            let d = x.dim(1)?;
            let x3 = x.reshape((b, n, d))?;
            let contiguous_run = r.windows(2).all(|w| w[1] == w[0] + 1);
            x = if contiguous_run {
                x3.narrow(1, r[0], r.len())?.contiguous()?
            } else {
                let idx: Vec<u32> = r.iter().map(|&o| o as u32).collect();
                x3.index_select(&Tensor::from_vec(idx, r.len(), x.device())?, 1)?
            }
            .reshape((b * r.len(), d))?;
        }
        self.mlp_residual(&x, false)
    }

    fn norm(&self, n: &RmsNorm, x: &Tensor, differentiable: bool) -> CResult<Tensor> {
        if differentiable {
            n.forward_diff(x)
        } else {
            n.forward(x)
        }
    }

    /// x + mlp(ff_norm(x)).
    fn mlp_residual(&self, x: &Tensor, differentiable: bool) -> CResult<Tensor> {
        let f = self.norm(&self.ff_norm, x, differentiable)?;
        if differentiable {
            x + self.mlp.forward_diff(&f)?
        } else {
            self.mlp.forward_add(&f, x)
        }
    }
}

/// The mask predictor.
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
        let (d, v) = (cfg.d_model, cfg.embedding_size);
        let wte = src.get(&format!("{PREFIX}.wte.weight"), &[v, d])?;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::load(src, cfg, i, layout))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = RmsNorm::new(
            src.get(&format!("{PREFIX}.ln_f.weight"), &[d])?,
            cfg.rms_norm_eps,
            cfg.norm,
        );
        let head = if cfg.weight_tying {
            make_linear(wte.clone(), layout)?
        } else {
            make_linear(
                src.get(&format!("{PREFIX}.ff_out.weight"), &[v, d])?,
                layout,
            )?
        };
        let device = wte.device().clone();
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.max_sequence_length,
            &device,
        )?;
        Ok(Llada {
            cfg: cfg.clone(),
            dtype: wte.dtype(),
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

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes the weights take in the compute dtype.
    pub fn weights_bytes(&self) -> u64 {
        self.cfg.parameter_count() * self.dtype.size_in_bytes() as u64
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every tensor with its checkpoint name, in [`tensor_specs`] order (packed weights are
    /// unpacked).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(format!("{PREFIX}.wte.weight"), self.wte.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            b.named(i, &mut out)?;
        }
        out.push((format!("{PREFIX}.ln_f.weight"), self.ln_f.weight.clone()));
        if !self.cfg.weight_tying {
            out.push((format!("{PREFIX}.ff_out.weight"), self.head.tensor()?));
        }
        Ok(out)
    }

    /// Additive f32 attention bias from a key-padding mask [B, L] (1 = keep, 0 = padding) and the
    /// causal flag: 0 for visible keys, f32::MIN (as the reference) for hidden ones.
    /// Shape [B, 1, 1, L], or [B, 1, L, L] when causal.
    pub fn attention_bias(
        &self,
        key_mask: Option<&Tensor>,
        b: usize,
        l: usize,
    ) -> CResult<Option<Tensor>> {
        let pad = match key_mask {
            Some(m) => {
                let keep = m.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
                Some(((1.0 - keep)? * f32::MIN as f64)?)
            }
            None => None,
        };
        if !self.cfg.causal {
            return Ok(pad);
        }
        let causal: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { f32::MIN }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, l, l), &self.device)?;
        Ok(Some(match pad {
            Some(p) => p.broadcast_add(&causal)?.clamp(f32::MIN, 0.0)?,
            None => causal,
        }))
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
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

    /// Final norm and output head: [N, D] → [N, V].
    fn logits_of(&self, h: &Tensor, differentiable: bool) -> CResult<Tensor> {
        if differentiable {
            let head = if self.cfg.weight_tying {
                &self.wte
            } else {
                self.head.dense()?
            };
            crate::kernels::matmul_op::matmul(&self.ln_f.forward_diff(h)?, &head.t()?)
        } else {
            self.head.forward_f32(&self.ln_f.forward(h)?)
        }
    }

    /// Logits [B, L, V] (f32) for every position of `ids` [B, L] (u32), with an optional
    /// key-padding mask [B, L] (1 = real token, 0 = padding; padded keys get no attention,
    /// padded queries are still computed).
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_impl(ids, key_mask, false)
    }

    /// The same forward pass made only of differentiable ops (training).
    pub fn forward_train(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_impl(ids, key_mask, true)
    }

    fn forward_impl(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (_, l) = self.check_ids(ids)?;
        self.forward_rows_impl(ids, key_mask, 0..l, differentiable)
    }

    /// Logits [B, hi − lo, V] of positions lo..hi only: every position is still computed through
    /// the blocks (attention is bidirectional), but the final norm and the output head run only on
    /// the rows asked for.
    pub fn forward_rows(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        self.forward_rows_impl(ids, key_mask, rows, false)
    }

    fn forward_rows_impl(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        rows: std::ops::Range<usize>,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (b, l) = self.check_ids(ids)?;
        if rows.start >= rows.end || rows.end > l {
            return Err(Error::setting(
                "rows",
                format!("{rows:?}"),
                format!("must be a non-empty range within 0..{l}"),
            ));
        }
        if !differentiable {
            let rows: Vec<usize> = rows.collect();
            return self.forward_rows_at(ids, key_mask, &rows);
        }
        let (d, vocab) = (self.cfg.d_model, self.cfg.embedding_size);
        let mut h = self.embed(ids)?; // [B·L, D]
        let bias = self.attention_bias(key_mask, b, l)?;
        for block in &self.blocks {
            h = block.forward(&h, b, l, &self.rope, bias.as_ref(), differentiable)?;
        }
        let n = rows.end - rows.start;
        if n != l {
            h = h
                .reshape((b, l, d))?
                .narrow(1, rows.start, n)?
                .reshape((b * n, d))?; // [B·n, D]
        }
        let logits = self.logits_of(&h, differentiable)?.to_dtype(DType::F32)?;
        Ok(logits.reshape((b, n, vocab))?)
    }

    /// Logits [B, |rows|, V] of the positions `rows` (increasing) only: every position still goes
    /// through the blocks (attention is bidirectional), but the last block's MLP, the final norm
    /// and the output head run only on the rows asked for (inference).
    pub fn forward_rows_at(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        let (b, l) = self.check_ids(ids)?;
        // nothing is kept after this forward: the layers take turns with one key/value store
        let mut cache = self.cache_with(b, l, key_mask, true)?;
        self.forward_chunk_at(ids, 0, &mut cache, rows)
    }

    /// An empty key/value cache for `batch` canvases of `len` positions (with their key-padding
    /// mask [B, L], if any).
    pub fn new_cache(
        &self,
        batch: usize,
        len: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<KvCache> {
        self.cache_with(batch, len, key_mask, false)
    }

    /// A cache as [`Llada::new_cache`]; `one_pass` for a single full forward whose keys and values
    /// are not kept (every layer rewrites one shared store before reading it).
    fn cache_with(
        &self,
        batch: usize,
        len: usize,
        key_mask: Option<&Tensor>,
        one_pass: bool,
    ) -> Result<KvCache> {
        let shape = KvShape {
            batch,
            kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            len,
        };
        Ok(KvCache::new(
            crate::kernels::fused_cpu(&self.device, self.dtype),
            self.cfg.n_layers,
            shape,
            self.dtype,
            key_mask,
            one_pass,
        )?)
    }

    /// Inference forward of canvas positions `start..start+n` (`ids` [B, n]) with every other
    /// position's keys and values taken from `cache`, which is updated with this chunk's. The
    /// first call on a fresh cache must cover the whole canvas. Returns the logits [B, |rows|, V]
    /// (f32) of the absolute positions `rows` (within the chunk).
    pub fn forward_chunk(
        &self,
        ids: &Tensor,
        start: usize,
        cache: &mut KvCache,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let rows: Vec<usize> = rows.collect();
        self.forward_chunk_at(ids, start, cache, &rows)
    }

    /// [`Llada::forward_chunk`] for the logits of any increasing positions `rows` of the chunk
    /// ([B, |rows|, V]): the last block's MLP and the head run only on those rows.
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
            h = block.forward_chunk(
                &h,
                b,
                n,
                start,
                &self.rope,
                cache,
                i,
                self.cfg.causal,
                keep,
            )?;
        }
        let logits = self.logits_of(&h, false)?.to_dtype(DType::F32)?;
        Ok(logits.reshape((b, w, vocab))?)
    }

    /// Training forward: logits [N, V] of the flattened positions `positions` (indices into
    /// B·L) only, made of differentiable ops. The output head (the largest matrix for small
    /// models) runs only on the positions the loss reads.
    pub fn forward_train_positions(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, l) = self.check_ids(ids)?;
        let bias = self.attention_bias(None, b, l)?;
        let mut h = self.embed(ids)?; // [B·L, D]
        for block in &self.blocks {
            h = block.forward(&h, b, l, &self.rope, bias.as_ref(), true)?;
        }
        let h = h.index_select(positions, 0)?; // [N, D]
        Ok(self.logits_of(&h, true)?.to_dtype(DType::F32)?)
    }

    /// The token embedding table [V, D].
    pub fn embedding(&self) -> &Tensor {
        &self.wte
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
            let t = random_tensor(&shape, cfg.init_std, dtype, device, &mut rng)?;
            map.insert(name, t);
        }
        Llada::load(cfg, &map)
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
