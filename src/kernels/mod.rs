//! Inference kernels: the hot ops of the forward pass, with a fast path where one exists for the
//! device and dtype and the plain candle composition otherwise. Training never comes here (the
//! fast paths have no backward); every fast path is tested against the plain one.

pub mod math;

use candle_core::{DType, Device, Result, Tensor};

/// y = x·Wᵀ, x [N, in], W [out, in] → [N, out].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_nt(x, w)
}

/// a·bᵀ for the last two dims (batched when rank > 2, same batch dims).
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    plain_matmul(a, &b.t()?)
}

/// a·b for the last two dims.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    plain_matmul(a, b)
}

fn plain_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    // candle's CPU matmul has no bf16 path: compute in f32 and round once.
    if matches!(a.device(), Device::Cpu) && a.dtype() == DType::BF16 {
        let y = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
        return y.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

/// Fused RMSNorm for inference, `None` where no fused kernel applies.
pub fn rms_norm(_x: &Tensor, _w: &Tensor, _eps: f64) -> Option<Result<Tensor>> {
    None
}

/// silu(g) ⊙ u.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(g)? * u
}

/// Softmax over the last dim, in f32, for inference.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(x)
}
