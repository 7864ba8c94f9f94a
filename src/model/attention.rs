//! Bidirectional multi-head attention with rotate-half RoPE in f32 and GQA (reference §2.4–2.7),
//! in its inference and training forms, and the attention-bias builders (padding, causal).

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Tensor, D};
use half::bf16;

pub use crate::kernels::attention::Visibility;
use crate::kernels::attention::{self as fused, KeyMask, KvShape, KvStore, RopeTables};
use crate::kernels::cpu::with_slice;

use super::layers::{Linear, RmsNorm};

/// Rotary position tables (f32), rotate-half (GPT-NeoX) layout over the full head dim.
///
/// The tables are built for the positions actually used, not for the model's whole context: they
/// start empty and grow on demand (to the next power of two, capped at `max_len`; past it exactly
/// to what is asked, as the reference extends its table). A position's entry does not depend on
/// the table's length, so a grown table holds the same values bit for bit. Clones share the
/// tables.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    /// Dims rotated with non-zero frequencies (see [`Rope::partial`]).
    rotary_dim: usize,
    theta: f32,
    /// The model's context: the table grows by powers of two up to it.
    max_len: usize,
    device: Device,
    /// Host tables [len][hd/2], for the fused CPU kernels.
    host: Arc<Mutex<HostTables>>,
    /// The same on the device, [len, hd/2] each (built from the host tables when first needed).
    dev: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

/// cos and sin for positions 0..len (`len · hd/2` values each).
type HostTables = (Arc<Vec<f32>>, Arc<Vec<f32>>);

/// Host cos/sin tables [len][hd/2] for positions 0..len. inv_freq[j] = 1 / θ^(2j/rot) for
/// j < rot/2 and 0 past it (cos 1, sin 0: those pairs are not rotated), all in f32 as the
/// reference computes it.
fn host_tables(head_dim: usize, rot: usize, theta: f32, len: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|j| {
            if j < rot / 2 {
                1.0f32 / theta.powf((2 * j) as f32 / rot as f32)
            } else {
                0.0
            }
        })
        .collect();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in 0..len {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Locks a table cache. A table is replaced whole, so a lock poisoned by a panic elsewhere still
/// guards a complete table.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Rope {
    /// RoPE of base `theta` for a model of `max_len` positions; nothing is computed yet.
    pub fn new(head_dim: usize, theta: f32, max_len: usize, device: &Device) -> Result<Self> {
        Self::partial(head_dim, head_dim, theta, max_len, device)
    }

    /// RoPE that rotates `rotary_dim` of the `head_dim` dims of a head (LLaDA2's partial rotary:
    /// rotate-half over the first `rotary_dim` dims, the rest unchanged). The tables keep the
    /// full-head layout (pair j, j + hd/2): the first `rotary_dim/2` pairs get the frequencies
    /// 1/θ^(2j/rotary_dim), the others frequency 0, so a head whose dims are permuted as
    /// [`partial_rotary_order`] says is rotated exactly as the official partial rotary rotates the
    /// unpermuted head.
    pub fn partial(
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Rope {
            head_dim,
            rotary_dim,
            theta,
            max_len,
            device: device.clone(),
            host: Default::default(),
            dev: Default::default(),
        })
    }

    /// Positions the host tables cover now.
    pub fn table_len(&self) -> usize {
        lock(&self.host).0.len() / (self.head_dim / 2).max(1)
    }

    /// The length to grow to when `len` positions are needed: the next power of two (a canvas
    /// growing one position at a time rebuilds the table log₂ n times), capped at the model's
    /// context, never below `len`.
    fn grown(&self, len: usize) -> usize {
        len.checked_next_power_of_two()
            .unwrap_or(len)
            .min(self.max_len)
            .max(len)
    }

    /// Host tables covering at least positions 0..len (grown if need be).
    pub fn host(&self, len: usize) -> (Arc<Vec<f32>>, Arc<Vec<f32>>) {
        let half = self.head_dim / 2;
        let mut t = lock(&self.host);
        if t.0.len() < len.saturating_mul(half) {
            let (c, s) = host_tables(self.head_dim, self.rotary_dim, self.theta, self.grown(len));
            *t = (Arc::new(c), Arc::new(s));
        }
        (t.0.clone(), t.1.clone())
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// cos/sin [len, hd/2] for absolute positions start..start+len, on the device (grown on
    /// demand).
    fn tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let mut dev = lock(&self.dev);
        let (c, s) = match dev.as_ref() {
            Some(t) if t.0.dim(0)? >= start + len => t.clone(),
            _ => {
                let (c, s) = self.host(start + len);
                let half = self.head_dim / 2;
                let n = c.len() / half.max(1);
                let t = (
                    Tensor::from_slice(&c, (n, half), &self.device)?,
                    Tensor::from_slice(&s, (n, half), &self.device)?,
                );
                *dev = Some(t.clone());
                t
            }
        };
        Ok((c.narrow(0, start, len)?, s.narrow(0, start, len)?))
    }

    /// Rotates x [B, H, L, hd] for positions start..start+L, in f32, cast back to x's dtype
    /// (inference: candle's fused kernel).
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _h, l, _hd) = x.dims4()?;
        let (cos, sin) = self.tables(start, l)?;
        let xf = x.to_dtype(DType::F32)?;
        candle_nn::rotary_emb::rope(&xf.contiguous()?, &cos, &sin)?.to_dtype(x.dtype())
    }

    /// [`Rope::apply`] made of differentiable ops (training; positions from 0).
    pub fn apply_diff(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, _h, l, hd) = x.dims4()?;
        let (cos, sin) = self.tables(0, l)?;
        let xf = x.to_dtype(DType::F32)?;
        let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?; // [L, hd]
        let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
        let x1 = xf.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = xf.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        (xf.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?.to_dtype(x.dtype())
    }
}

/// The order of a head's dims that turns the partial rotary of `rotary_dim` of `head_dim` dims
/// (rotate-half within the first `rotary_dim`: pairs (j, j + rot/2)) into the full-head layout
/// (pairs (j, j + hd/2)): `order[new] = old`. The rotated pairs come first in each half, the
/// unrotated dims after them (paired among themselves with frequency 0, see [`Rope::partial`]).
/// Permuting queries and keys alike leaves every score q·k unchanged. The identity when
/// `rotary_dim == head_dim`.
pub fn partial_rotary_order(head_dim: usize, rotary_dim: usize) -> Vec<usize> {
    let (h, r) = (head_dim / 2, rotary_dim / 2);
    let ph = (head_dim - rotary_dim) / 2;
    let mut order = Vec::with_capacity(head_dim);
    order.extend(0..r);
    order.extend(rotary_dim..rotary_dim + ph);
    order.extend(r..rotary_dim);
    order.extend(rotary_dim + ph..head_dim);
    debug_assert_eq!(order.len(), 2 * h);
    order
}

/// Attention weights of one block (field names follow the checkpoint keys).
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,   // [H·hd, D]
    pub k_proj: Linear,   // [Hkv·hd, D]
    pub v_proj: Linear,   // [Hkv·hd, D]
    pub attn_out: Linear, // [D, H·hd]
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// RMSNorm of every query and key head before RoPE (LLaDA-MoE's `qk_layernorm`).
    pub qk_norm: Option<QkNorm>,
    /// Biases of the query, key and value projections (Dream's Qwen2 attention).
    pub qkv_bias: Option<QkvBias>,
}

/// The q/k/v projection biases, `[H·hd]`, `[Hkv·hd]`, `[Hkv·hd]`, added to the projections'
/// outputs (before any QK norm and RoPE).
#[derive(Debug, Clone)]
pub struct QkvBias {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

/// The query and key norms: one `[head_dim]` weight each, shared by all heads, applied to every
/// head of the projections' output before RoPE.
#[derive(Debug, Clone)]
pub struct QkNorm {
    pub q: RmsNorm,
    pub k: RmsNorm,
}

/// `norm` over each `hd`-wide head of x [N, heads·hd] (inference, or differentiable ops with
/// `diff`).
fn norm_heads(norm: &RmsNorm, x: &Tensor, hd: usize, diff: bool) -> Result<Tensor> {
    let (n, w) = x.dims2()?;
    let heads = x.reshape((n * w / hd, hd))?;
    let y = if diff {
        norm.forward_diff(&heads)?
    } else {
        candle_core::Module::forward(norm, &heads)?
    };
    y.reshape((n, w))
}

/// Runs `f` on the host RoPE tables for positions 0..len.
pub fn with_rope_host<R>(rope: &Rope, len: usize, f: impl FnOnce(&RopeTables<'_>) -> R) -> R {
    let (c, s) = rope.host(len);
    f(&RopeTables {
        cos: &c,
        sin: &s,
        half: rope.head_dim() / 2,
    })
}

/// Splits [B·L, heads·hd] into [B, heads, L, hd].
fn split_heads(x: &Tensor, b: usize, l: usize, heads: usize, hd: usize) -> Result<Tensor> {
    x.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous()
}

impl Attention {
    /// This attention with projection biases.
    pub fn with_bias(self, bias: QkvBias) -> Self {
        Attention {
            qkv_bias: Some(bias),
            ..self
        }
    }

    /// Queries [N, H·hd], keys and values [N, Hkv·hd] of `x` [N, D] before RoPE: the projections
    /// (with their biases), then the per-head QK norms when the model has them (with `diff`:
    /// differentiable ops only).
    fn project_qkv(&self, x: &Tensor, diff: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let proj = |w: &Linear| {
            if diff {
                w.forward_diff(x)
            } else {
                w.forward(x)
            }
        };
        let (mut q, mut k, mut v) = (
            proj(&self.q_proj)?,
            proj(&self.k_proj)?,
            proj(&self.v_proj)?,
        );
        if let Some(b) = &self.qkv_bias {
            let add = |y: &Tensor, b: &Tensor| y.broadcast_add(&b.to_dtype(y.dtype())?);
            (q, k, v) = (add(&q, &b.q)?, add(&k, &b.k)?, add(&v, &b.v)?);
        }
        match &self.qk_norm {
            None => Ok((q, k, v)),
            Some(n) => Ok((
                norm_heads(&n.q, &q, self.head_dim, diff)?,
                norm_heads(&n.k, &k, self.head_dim, diff)?,
                v,
            )),
        }
    }

    /// Projects `x` [B·L, D] into rotated queries [B, H, L, hd] and rotated keys and values
    /// [B, Hkv, L, hd]; the queries and keys sit at positions start..start+L (inference).
    pub fn qkv(
        &self,
        x: &Tensor,
        b: usize,
        l: usize,
        rope: &Rope,
        start: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = self.project_qkv(x, false)?;
        let q = rope.apply(&split_heads(&q, b, l, h, hd)?, start)?; // [B, H, L, hd]
        let k = rope.apply(&split_heads(&k, b, l, hkv, hd)?, start)?; // [B, Hkv, L, hd]
        let v = split_heads(&v, b, l, hkv, hd)?; // [B, Hkv, L, hd]
        Ok((q, k, v))
    }

    /// The fused CPU path (inference): projections, RoPE, attention and output projection of
    /// `x` [B·L, D] without splitting heads; keys and values go into `store` at positions
    /// `start..start+L` (a fresh store holds just these). Returns `res` + the attention output
    /// [B·L, D] (the residual connection, fused into the output projection where it can be).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_fused(
        &self,
        x: &Tensor,
        res: &Tensor,
        b: usize,
        l: usize,
        start: usize,
        store: &mut KvStore,
        store_shape: KvShape,
        mask: &KeyMask<'_>,
        rope: &Rope,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project_qkv(x, false)?; // [B·L, H·hd], [B·L, Hkv·hd] ×2
        let total = store_shape.len;
        let o = with_rope_host(rope, total.max(start + l), |tables| -> Result<Tensor> {
            match x.dtype() {
                DType::BF16 => {
                    with_slice::<bf16, _>(&k, |ks| {
                        with_slice::<bf16, _>(&v, |vs| {
                            store.write(store_shape, start, l, ks, vs, tables)
                        })
                    })??;
                    let o = with_slice::<bf16, _>(&q, |qs| {
                        fused::attend(qs, store_shape, self.n_heads, start, l, store, mask, tables)
                    })?;
                    Tensor::from_vec(o, (b * l, self.n_heads * self.head_dim), x.device())
                }
                _ => {
                    with_slice::<f32, _>(&k, |ks| {
                        with_slice::<f32, _>(&v, |vs| {
                            store.write(store_shape, start, l, ks, vs, tables)
                        })
                    })??;
                    let o = with_slice::<f32, _>(&q, |qs| {
                        fused::attend(qs, store_shape, self.n_heads, start, l, store, mask, tables)
                    })?;
                    Tensor::from_vec(o, (b * l, self.n_heads * self.head_dim), x.device())
                }
            }
        })?;
        self.attn_out.forward_add(&o, res)
    }

    /// softmax(q·kᵀ/√hd + bias)·v with GQA, then the output projection (inference).
    /// q [B, H, Lq, hd]; k, v [B, Hkv, Lk, hd]; bias f32 broadcastable to [B, H, Lq, Lk].
    /// Returns [B·Lq, D].
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let g = Grouped::of(q, k, self.n_kv_heads)?;
        let scores = crate::kernels::matmul_nt(&g.queries(q)?, k)?; // [B, Hkv, rep·Lq, Lk]
        let p = crate::kernels::softmax_last_dim(&g.scaled_scores(&scores, bias)?)?;
        let o = crate::kernels::matmul(&g.probs(&p)?, v)?; // [B, Hkv, rep·Lq, hd]
        self.attn_out.forward(&g.merge_heads(&o)?)
    }

    /// Training: the attention of `x` [B·L, D] (positions 0..L) with its output projection,
    /// made of differentiable ops only. Returns [B·L, D].
    pub fn forward_train(
        &self,
        x: &Tensor,
        b: usize,
        l: usize,
        rope: &Rope,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        use crate::kernels::matmul_op::matmul;
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = self.project_qkv(x, true)?;
        let q = rope.apply_diff(&split_heads(&q, b, l, h, hd)?)?; // [B, H, L, hd]
        let k = rope.apply_diff(&split_heads(&k, b, l, hkv, hd)?)?; // [B, Hkv, L, hd]
        let v = split_heads(&v, b, l, hkv, hd)?; // [B, Hkv, L, hd]
        let g = Grouped::of(&q, &k, hkv)?;
        let scores = matmul(&g.queries(&q)?, &k.t()?)?; // [B, Hkv, rep·L, L]
        let p = candle_nn::ops::softmax(&g.scaled_scores(&scores, bias)?, D::Minus1)?;
        let o = matmul(&g.probs(&p)?, &v)?; // [B, Hkv, rep·L, hd]
        self.attn_out.forward_diff(&g.merge_heads(&o)?)
    }
}

/// The shapes of grouped-query attention: query head g·rep + r uses KV head g, so the query
/// heads are grouped by their KV head and the keys and values are used without being repeated.
struct Grouped {
    b: usize,
    h: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    hd: usize,
    dtype: DType,
}

impl Grouped {
    /// q [B, H, Lq, hd]; k [B, Hkv, Lk, hd].
    fn of(q: &Tensor, k: &Tensor, hkv: usize) -> Result<Self> {
        let (b, h, lq, hd) = q.dims4()?;
        Ok(Grouped {
            b,
            h,
            hkv,
            lq,
            lk: k.dim(2)?,
            hd,
            dtype: q.dtype(),
        })
    }

    /// [B, H, Lq, hd] → [B, Hkv, rep·Lq, hd].
    fn queries(&self, q: &Tensor) -> Result<Tensor> {
        q.reshape((self.b, self.hkv, self.h / self.hkv * self.lq, self.hd))
    }

    /// Scores [B, Hkv, rep·Lq, Lk] → f32 scores / √hd + bias, [B, H, Lq, Lk].
    fn scaled_scores(&self, scores: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let scale = 1.0 / (self.hd as f64).sqrt();
        let s =
            (scores.to_dtype(DType::F32)? * scale)?.reshape((self.b, self.h, self.lq, self.lk))?;
        match bias {
            Some(bias) => s.broadcast_add(bias),
            None => Ok(s),
        }
    }

    /// Probabilities [B, H, Lq, Lk] → [B, Hkv, rep·Lq, Lk] in the compute dtype.
    fn probs(&self, p: &Tensor) -> Result<Tensor> {
        p.to_dtype(self.dtype)?
            .reshape((self.b, self.hkv, self.h / self.hkv * self.lq, self.lk))
    }

    /// Outputs [B, Hkv, rep·Lq, hd] → [B·Lq, H·hd].
    fn merge_heads(&self, o: &Tensor) -> Result<Tensor> {
        o.reshape((self.b, self.h, self.lq, self.hd))?
            .transpose(1, 2)?
            .reshape((self.b * self.lq, self.h * self.hd))
    }
}

/// Additive f32 key-padding bias from a mask [B, L] (1 = keep, 0 = padding): 0 for visible keys,
/// f32::MIN (as the reference) for padded ones. [B, 1, 1, L].
pub fn padding_bias(key_mask: Option<&Tensor>, b: usize, l: usize) -> Result<Option<Tensor>> {
    match key_mask {
        Some(m) => {
            let keep = m.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
            Ok(Some(((1.0 - keep)? * f32::MIN as f64)?))
        }
        None => Ok(None),
    }
}

/// Causal bias for queries at absolute positions start..start+n over keys 0..l: [1, 1, n, l].
pub fn causal_bias(start: usize, n: usize, l: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..l).map(move |j| if j <= start + i { 0.0 } else { f32::MIN }))
        .collect();
    Tensor::from_vec(v, (1, 1, n, l), device)
}

/// The additive bias [1, 1, n, l] of `visibility` for queries at positions start..start+n over
/// keys 0..l (hidden keys get f32::MIN, as the reference's masks), or `None` when every key is
/// seen unchanged.
pub fn visibility_bias(
    visibility: Visibility,
    start: usize,
    n: usize,
    l: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    match visibility {
        Visibility::All => Ok(None),
        Visibility::Causal => Ok(Some(causal_bias(start, n, l, device)?)),
        Visibility::Blocks {
            block,
            allowed,
            blocked,
        } => {
            let blocked = if blocked == f32::NEG_INFINITY {
                f32::MIN
            } else {
                blocked
            };
            let b = block.max(1);
            let v: Vec<f32> = (0..n)
                .flat_map(|i| {
                    let end = ((start + i) / b + 1) * b;
                    (0..l).map(move |j| if j < end { allowed } else { blocked })
                })
                .collect();
            Ok(Some(Tensor::from_vec(v, (1, 1, n, l), device)?))
        }
    }
}

/// The attention bias of queries start..start+n over keys 0..l: the padding bias (see
/// [`padding_bias`]) with `visibility`'s added ([B or 1, 1, n, l]).
pub fn attention_bias(
    pad: Option<&Tensor>,
    visibility: Visibility,
    start: usize,
    n: usize,
    l: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let Some(c) = visibility_bias(visibility, start, n, l, device)? else {
        return Ok(pad.cloned());
    };
    Ok(Some(match pad {
        // f32::MIN + f32::MIN would be −∞: hidden stays f32::MIN
        Some(p) => p.broadcast_add(&c)?.clamp(f32::MIN, f32::MAX)?,
        None => c,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_tables_grow_on_demand_with_the_same_values() {
        // a context of 10^9 positions costs nothing until positions are used
        let rope = Rope::new(16, 500000.0, 1_000_000_000, &Device::Cpu).unwrap();
        assert_eq!(rope.table_len(), 0);
        let (c, s) = rope.host(40);
        assert_eq!(rope.table_len(), 64);
        let (fc, fs) = host_tables(16, 16, 500000.0, 300);
        assert_eq!(c.as_slice(), &fc[..64 * 8]);
        assert_eq!(s.as_slice(), &fs[..64 * 8]);
        // the device tables (candle path) are the same prefix, at any start
        let (dc, ds) = rope.tables(250, 50).unwrap();
        assert_eq!(rope.table_len(), 512);
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(dc), &fc[250 * 8..]);
        assert_eq!(flat(ds), &fs[250 * 8..]);
        // growth is capped at the context, but what is asked past it is still served
        let small = Rope::new(16, 500000.0, 100, &Device::Cpu).unwrap();
        small.host(70);
        assert_eq!(small.table_len(), 100);
        small.host(300);
        assert_eq!(small.table_len(), 300);
        assert_eq!(small.host(300).0.as_slice(), fc.as_slice());
    }
}
