//! Keys and values of every layer for one canvas, kept across denoising steps: the inference
//! forward computes a chunk of the canvas (all of it, or one block, or a block and what follows)
//! and takes the other positions' keys and values from here (Fast-dLLM's prefix and dual caches,
//! reference §6.1, §6.4). Keys are stored rotated, which the reference notes is numerically the
//! same as rotating cached pre-RoPE keys on every call.
//!
//! The cache also runs the attention step of a chunk, so that the choice between the fused CPU
//! kernels and candle's tensor ops (the model's [`Backend`], decided once at load) is matched
//! here and nowhere else.

use candle_core::{DType, Result, Tensor};

use super::attention::{attention_bias, padding_bias, Attention, Rope, Visibility};
use crate::kernels::attention::{KeyMask, KvShape, KvStore};
use crate::kernels::Backend;

/// Per-layer keys/values of `batch` canvases of `len` positions.
pub struct KvCache {
    store: Store,
    /// Which keys each query sees (bidirectional, causal, block-causal).
    visibility: Visibility,
}

enum Store {
    /// Packed stores for the fused CPU kernels, one per layer.
    Fused {
        stores: Vec<KvStore>,
        shape: KvShape,
        /// Key-padding validity per sequence and position.
        valid: Option<Vec<Vec<bool>>>,
    },
    /// Tensors for other devices: per layer (K, V) `[B, Hkv, L, hd]`, K rotated.
    Tensors {
        kv: Vec<Option<(Tensor, Tensor)>>,
        /// Additive key-padding bias `[B, 1, 1, L]` (f32), if any position is padded.
        pad_bias: Option<Tensor>,
        batch: usize,
        len: usize,
    },
}

impl KvCache {
    /// An empty cache for `shape.batch` sequences of `shape.len` positions. With `one_pass` (a
    /// single forward over the whole canvas, nothing kept) the fused variant holds one store that
    /// every layer rewrites in full before reading it.
    pub(crate) fn new(
        backend: Backend,
        n_layers: usize,
        shape: KvShape,
        dtype: DType,
        key_mask: Option<&Tensor>,
        one_pass: bool,
        visibility: Visibility,
    ) -> Result<Self> {
        let store = match backend {
            Backend::FusedCpu => {
                let valid: Option<Vec<Vec<bool>>> = match key_mask {
                    Some(m) => Some(
                        m.to_dtype(DType::U32)?
                            .to_vec2::<u32>()?
                            .into_iter()
                            .map(|r| r.into_iter().map(|x| x != 0).collect())
                            .collect(),
                    ),
                    None => None,
                };
                let bf16 = dtype == DType::BF16;
                Store::Fused {
                    stores: (0..if one_pass { 1 } else { n_layers })
                        .map(|_| KvStore::new(shape, bf16))
                        .collect(),
                    shape,
                    valid,
                }
            }
            Backend::Tensor => Store::Tensors {
                kv: (0..n_layers).map(|_| None).collect(),
                pad_bias: padding_bias(key_mask, shape.batch, shape.len)?,
                batch: shape.batch,
                len: shape.len,
            },
        };
        Ok(KvCache { store, visibility })
    }

    /// Canvas length.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Fused { shape, .. } => shape.len,
            Store::Tensors { len, .. } => *len,
        }
    }

    /// Whether the canvas is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        match &self.store {
            Store::Fused { shape, .. } => shape.batch,
            Store::Tensors { batch, .. } => *batch,
        }
    }

    /// `x` + the attention output of layer `layer` for the chunk of canvas positions
    /// start..start+n: `a` [B·n, D] is the normed input, `x` [B·n, D] the residual stream. The
    /// chunk's keys and values replace theirs in the cache; every other position's come from it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &mut self,
        layer: usize,
        attn: &Attention,
        a: &Tensor,
        x: &Tensor,
        b: usize,
        n: usize,
        start: usize,
        rope: &Rope,
    ) -> Result<Tensor> {
        let visibility = self.visibility;
        match &mut self.store {
            Store::Fused {
                stores,
                shape,
                valid,
            } => {
                let mask = KeyMask {
                    valid: valid.as_deref(),
                    visibility,
                };
                let shape = *shape;
                // one shared store in a one-pass cache (see `KvCache::new`)
                let at = layer.min(stores.len() - 1);
                attn.forward_fused(a, x, b, n, start, &mut stores[at], shape, &mask, rope)
            }
            Store::Tensors {
                kv, pad_bias, len, ..
            } => {
                let (q, k, v) = attn.qkv(a, b, n, rope, start)?;
                let (k, v) = match kv[layer].take() {
                    Some((ok, ov)) => {
                        (replace_rows(&ok, &k, start)?, replace_rows(&ov, &v, start)?)
                    }
                    None if start == 0 && n == *len => (k, v),
                    // a first pass over a prefix (block-causal attention: the later keys are
                    // not seen until they are written)
                    None if start == 0 && !matches!(visibility, Visibility::All) => {
                        let (bk, hkv, _, hd) = k.dims4()?;
                        let zeros = Tensor::zeros((bk, hkv, *len, hd), k.dtype(), k.device())?;
                        (replace_rows(&zeros, &k, 0)?, replace_rows(&zeros, &v, 0)?)
                    }
                    None => {
                        candle_core::bail!("KV cache: the first pass must cover the whole canvas")
                    }
                };
                let bias =
                    attention_bias(pad_bias.as_ref(), visibility, start, n, *len, x.device())?;
                let o = attn.attend(&q, &k, &v, bias.as_ref())?;
                kv[layer] = Some((k, v));
                crate::kernels::add(x, &o)
            }
        }
    }
}

/// Writes `new` `[B, H, n, hd]` into `old` `[B, H, L, hd]` at positions start..start+n.
fn replace_rows(old: &Tensor, new: &Tensor, start: usize) -> Result<Tensor> {
    let l = old.dim(2)?;
    let n = new.dim(2)?;
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(old.narrow(2, 0, start)?);
    }
    parts.push(new.clone());
    if start + n < l {
        parts.push(old.narrow(2, start + n, l - start - n)?);
    }
    Tensor::cat(&parts, 2)
}
