//! The mask predictor's building blocks: linear maps, RMSNorm (f32 statistics), the SwiGLU MLP.
//!
//! Each op has one implementation made of differentiable candle ops, so the same code serves
//! inference and training (candle's fused norm/softmax/RoPE kernels have no backward pass). Fast
//! CPU kernels live in [`crate::kernels`] and are picked only for inference, behind parity tests.

use candle_core::{DType, Module, Result, Tensor, D};

use crate::config::NormKind;

/// y = x·Wᵀ for x [.., in] and W [out, in] (PyTorch `nn.Linear` layout, no bias).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    crate::kernels::linear(x, w)
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
    pub ff_proj: Tensor, // [F, D] gate
    pub up_proj: Tensor, // [F, D]
    pub ff_out: Tensor,  // [D, F] down projection
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = linear(x, &self.ff_proj)?; // [N, F]
        let u = linear(x, &self.up_proj)?; // [N, F]
        let m = crate::kernels::silu_mul(&g, &u)?; // [N, F]
        linear(&m, &self.ff_out) // [N, D]
    }

    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let g = x.matmul(&self.ff_proj.t()?)?;
        let u = x.matmul(&self.up_proj.t()?)?;
        let m = (candle_nn::ops::silu(&g)? * u)?;
        m.matmul(&self.ff_out.t()?)
    }
}
