//! Inference kernels: the hot ops of the forward pass, with a fast path where one exists for the
//! device and dtype and the plain candle composition otherwise. Training never comes here (the
//! fast paths have no backward); every fast path is tested against the plain one.

/// Defines a function whose body is compiled twice: for baseline x86-64 and for AVX-512, the
/// latter chosen at run time when the CPU has it (the portable build's autovectorised loops are
/// otherwise only 4 lanes wide). The body must call only `#[inline(always)]` helpers to benefit.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if $crate::kernels::gemm::cpu_features().avx512f {
                    // SAFETY: the CPU has these features (checked at run time).
                    return unsafe { fast($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

pub mod attention;
pub mod cpu;
pub mod gemm;
pub mod math;
pub mod matmul_op;
pub mod peak;

use candle_core::{DType, Device, Result, Tensor};

/// a·bᵀ for the last two dims (batched when rank > 2, same batch dims).
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(r) = cpu::batched_matmul(a, b, true) {
        return r;
    }
    plain_matmul(a, &b.t()?)
}

/// a·b for the last two dims.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(r) = cpu::batched_matmul(a, b, false) {
        return r;
    }
    plain_matmul(a, b)
}

/// candle's matmul, with bf16 on CPU computed in f32 (candle's CPU matmul has no bf16 path).
pub fn plain_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if matches!(a.device(), Device::Cpu) && a.dtype() == DType::BF16 {
        let y = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
        return y.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

/// Which implementation a model's inference forward takes, decided once at load from its device
/// and dtype (the weights' packing is decided with it, see `Linear::packed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The AVX-512 CPU kernels: packed GEMM weights, fused attention over packed key/value
    /// stores (f32 and bf16 with AVX-512F; bf16 products by `vdpbf16ps` where the CPU has
    /// AVX512-BF16, by f32 FMAs on the widened pairs otherwise).
    FusedCpu,
    /// candle's tensor ops (GPUs, other CPUs and dtypes); on the CPU the element-wise ops
    /// still use this module's portable kernels.
    Tensor,
}

impl Backend {
    /// The backend for weights of `dtype` on `device`.
    pub fn select(device: &Device, dtype: DType) -> Self {
        let f = gemm::cpu_features();
        let fused = matches!(device, Device::Cpu)
            && match dtype {
                DType::F32 => f.avx512f,
                DType::BF16 => f.avx512f,
                _ => false,
            };
        if fused {
            Backend::FusedCpu
        } else {
            Backend::Tensor
        }
    }
}

/// Fused RMSNorm for inference, `None` where no fused kernel applies.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    cpu::rms_norm(x, w, eps)
}

/// silu(g) ⊙ u.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if let Some(r) = cpu::silu_mul(g, u) {
        return r;
    }
    candle_nn::ops::silu(g)? * u
}

/// a + b (residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(r) = cpu::add(a, b) {
        return r;
    }
    a + b
}

/// Softmax over the last dim, in f32, for inference.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(x)
}
