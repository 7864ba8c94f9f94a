//! The mask predictor's building blocks: linear maps, RMSNorm (f32 statistics), the SwiGLU MLP.
//!
//! Each op has one implementation made of differentiable candle ops, so the same code serves
//! inference and training (candle's fused norm/softmax/RoPE kernels have no backward pass). Fast
//! CPU kernels live in [`crate::kernels`] and are picked only for inference, behind parity tests.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use half::bf16;

use crate::config::NormKind;
use crate::kernels::gemm::{cpu_features, PackedBf16, PackedF32};

/// The weight of a linear map, W [out, in] (PyTorch `nn.Linear` layout, no bias): a tensor, or,
/// for inference on CPUs with AVX-512, the same values packed once into the GEMM's panel layout
/// (the tensor is then dropped: no second copy is kept).
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    PackedF32(Arc<PackedF32>),
    PackedBf16(Arc<PackedBf16>),
    /// The gate (`up` false) or up half of an MLP's two input weights packed together for the
    /// fused SwiGLU kernel (see [`Mlp::fuse_for_inference`]); both halves share one packing.
    GluHalf {
        glu: Arc<PackedBf16>,
        up: bool,
    },
}

impl Linear {
    /// A dense weight.
    pub fn new(w: Tensor) -> Self {
        Linear::Dense(w)
    }

    /// Packs `w` for the CPU kernels when this CPU and dtype have one; dense otherwise.
    pub fn packed(w: Tensor) -> Result<Self> {
        let f = cpu_features();
        if !matches!(w.device(), Device::Cpu) {
            return Ok(Linear::Dense(w));
        }
        let (n, k) = w.dims2()?;
        match w.dtype() {
            DType::F32 if f.avx512f => {
                let data = w.flatten_all()?.to_vec1::<f32>()?;
                Ok(Linear::PackedF32(Arc::new(PackedF32::from_weight(
                    &data, n, k,
                ))))
            }
            DType::BF16 if f.avx512bf16 && k.is_multiple_of(2) => {
                let data = w.flatten_all()?.to_vec1::<bf16>()?;
                Ok(Linear::PackedBf16(Arc::new(PackedBf16::from_weight(
                    &data, n, k,
                ))))
            }
            _ => Ok(Linear::Dense(w)),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Linear::Dense(w) => w.dims2(),
            Linear::PackedF32(p) => Ok((p.n, p.k)),
            Linear::PackedBf16(p) => Ok((p.n, p.k)),
            Linear::GluHalf { glu, .. } => Ok((glu.n / 2, glu.k)),
        }
    }

    /// The weight as a tensor [out, in] (unpacked if needed: slow, for saving only).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Linear::Dense(w) => Ok(w.clone()),
            Linear::PackedF32(p) => Tensor::from_vec(p.to_weight(), (p.n, p.k), &Device::Cpu),
            Linear::PackedBf16(p) => Tensor::from_vec(p.to_weight(), (p.n, p.k), &Device::Cpu),
            Linear::GluHalf { glu, up } => {
                Tensor::from_vec(glu.glu_half(*up), (glu.n / 2, glu.k), &Device::Cpu)
            }
        }
    }

    /// The dense weight, for the differentiable path.
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Linear::Dense(w) => Ok(w),
            _ => candle_core::bail!(
                "this model's weights are packed for inference; load it dense to train"
            ),
        }
    }

    /// y = x·Wᵀ, x [N, in] → [N, out] (inference).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(w) => crate::kernels::plain_matmul(x, &w.t()?),
            Linear::PackedF32(p) => crate::kernels::cpu::linear_f32(&x.to_dtype(DType::F32)?, p),
            Linear::PackedBf16(p) => crate::kernels::cpu::linear_bf16(&x.to_dtype(DType::BF16)?, p),
            // one half of a fused pair on its own (not on the hot path): unpack it
            Linear::GluHalf { .. } => {
                crate::kernels::plain_matmul(&x.to_dtype(DType::BF16)?, &self.tensor()?.t()?)
            }
        }
    }

    /// res + x·Wᵀ (inference; a residual connection after the layer), in one pass where a fused
    /// kernel applies.
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        if let Linear::PackedBf16(p) = self {
            if let Some(y) = crate::kernels::cpu::linear_add_bf16(&x.to_dtype(DType::BF16)?, p, res)
            {
                return y;
            }
        }
        crate::kernels::add(res, &self.forward(x)?)
    }

    /// y = x·Wᵀ in f32 whatever the weight dtype (logits: a bf16 model's head accumulates in f32
    /// and its output is kept unrounded).
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::PackedBf16(p) => {
                crate::kernels::cpu::linear_bf16_f32(&x.to_dtype(DType::BF16)?, p)
            }
            _ => self.forward(x)?.to_dtype(DType::F32),
        }
    }

    /// y = x·Wᵀ made of differentiable ops (training).
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::matmul_op::matmul(x, &self.dense()?.t()?)
    }
}

/// y = x·Wᵀ (inference).
pub fn linear(x: &Tensor, w: &Linear) -> Result<Tensor> {
    w.forward(x)
}

/// RMSNorm with weight: statistics in f32, `x / sqrt(mean(x²) + eps)` cast back to the input
/// dtype **before** the multiplication by the weight (reference §2.5).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor, // [D]
    eps: f64,
    kind: NormKind,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64, kind: NormKind) -> Self {
        RmsNorm { weight, eps, kind }
    }

    /// Differentiable form.
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?; // [.., D]
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
        let r = xf.broadcast_mul(&(ms + self.eps)?.sqrt()?.recip()?)?;
        let r = r.to_dtype(dtype)?;
        match self.kind {
            NormKind::Rms => r.broadcast_mul(&self.weight),
            NormKind::GemmaRms => r.broadcast_mul(&(&self.weight + 1.0)?),
        }
    }
}

impl Module for RmsNorm {
    /// Inference form (fused kernel on CPU where available).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kind == NormKind::Rms {
            if let Some(y) = crate::kernels::rms_norm(x, &self.weight, self.eps) {
                return y;
            }
        }
        self.forward_diff(x)
    }
}

/// SwiGLU MLP of a LLaDA block: `ff_out(silu(ff_proj(x)) * up_proj(x))`. The activation goes on
/// `ff_proj` (the gate), `up_proj` is the linear branch (reference §2.4, pitfall 1).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub ff_proj: Linear, // [F, D] gate
    pub up_proj: Linear, // [F, D]
    pub ff_out: Linear,  // [D, F] down projection
}

impl Mlp {
    /// Packs the gate and up weights together for the fused SwiGLU kernel when both are packed
    /// bf16 (inference on CPUs with AVX512-BF16); the separate packings are dropped.
    pub fn fuse_for_inference(&mut self) {
        if let (Linear::PackedBf16(g), Linear::PackedBf16(u)) = (&self.ff_proj, &self.up_proj) {
            if (g.n, g.k) == (u.n, u.k) {
                let glu = Arc::new(PackedBf16::glu(g, u));
                self.ff_proj = Linear::GluHalf {
                    glu: glu.clone(),
                    up: false,
                };
                self.up_proj = Linear::GluHalf { glu, up: true };
            }
        }
    }

    /// silu(ff_proj(x)) ⊙ up_proj(x), [N, D] → [N, F].
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        if let Linear::GluHalf { glu, .. } = &self.ff_proj {
            return crate::kernels::cpu::glu_bf16(x, glu);
        }
        let g = linear(x, &self.ff_proj)?; // [N, F]
        let u = linear(x, &self.up_proj)?; // [N, F]
        crate::kernels::silu_mul(&g, &u)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(&self.hidden(x)?, &self.ff_out) // [N, D]
    }

    /// res + mlp(x), the residual add fused into the down projection where it can be.
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        self.ff_out.forward_add(&self.hidden(x)?, res)
    }

    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.ff_proj.forward_diff(x)?;
        let u = self.up_proj.forward_diff(x)?;
        let m = (candle_nn::ops::silu(&g)? * u)?;
        self.ff_out.forward_diff(&m)
    }
}
