//! Keys and values of every layer for one canvas, kept across denoising steps: the inference
//! forward computes a chunk of the canvas (all of it, or one block, or a block and what follows)
//! and takes the other positions' keys and values from here (Fast-dLLM's prefix and dual caches,
//! reference §6.1, §6.4). Keys are stored rotated, which the reference notes is numerically the
//! same as rotating cached pre-RoPE keys on every call.

use candle_core::{DType, Device, Tensor};

use crate::kernels::attention::{KvShape, KvStore};

/// Per-layer keys/values of a canvas of `len` positions.
pub enum KvCache {
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
    /// An empty cache for `batch` sequences of `len` positions. With `one_pass` (a single
    /// forward over the whole canvas, nothing kept) the fused variant holds one store that every
    /// layer rewrites in full before reading it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        fused: bool,
        n_layers: usize,
        shape: KvShape,
        dtype: DType,
        key_mask: Option<&Tensor>,
        one_pass: bool,
    ) -> candle_core::Result<Self> {
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
        if fused {
            let bf16 = dtype == DType::BF16;
            Ok(KvCache::Fused {
                stores: (0..if one_pass { 1 } else { n_layers })
                    .map(|_| KvStore::new(shape, bf16))
                    .collect(),
                shape,
                valid,
            })
        } else {
            let pad_bias = match key_mask {
                Some(m) => {
                    let keep = m
                        .to_dtype(DType::F32)?
                        .reshape((shape.batch, 1, 1, shape.len))?;
                    Some(((1.0 - keep)? * f32::MIN as f64)?)
                }
                None => None,
            };
            Ok(KvCache::Tensors {
                kv: (0..n_layers).map(|_| None).collect(),
                pad_bias,
                batch: shape.batch,
                len: shape.len,
            })
        }
    }

    /// Canvas length.
    pub fn len(&self) -> usize {
        match self {
            KvCache::Fused { shape, .. } => shape.len,
            KvCache::Tensors { len, .. } => *len,
        }
    }

    /// Whether the canvas is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        match self {
            KvCache::Fused { shape, .. } => shape.batch,
            KvCache::Tensors { batch, .. } => *batch,
        }
    }
}

/// Writes `new` `[B, H, n, hd]` into `old` `[B, H, L, hd]` at positions start..start+n.
pub(crate) fn replace_rows(
    old: &Tensor,
    new: &Tensor,
    start: usize,
) -> candle_core::Result<Tensor> {
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

/// Causal bias for queries at absolute positions start..start+n over keys 0..l: [1, 1, n, l].
pub(crate) fn causal_bias(
    start: usize,
    n: usize,
    l: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..l).map(move |j| if j <= start + i { 0.0 } else { f32::MIN }))
        .collect();
    Tensor::from_vec(v, (1, 1, n, l), device)
}
