//! The mask predictor's building blocks: linear maps over any weight format ([`LinearWeight`]:
//! dense, or packed for the CPU GEMM), RMSNorm (f32 statistics), the SwiGLU MLP.
//!
//! Each block has an inference form (`forward`, `forward_add`: fast CPU kernels from
//! [`crate::kernels`] where they apply, behind parity tests) and a training form
//! (`forward_diff`: differentiable candle ops only, since candle's fused norm/softmax/RoPE kernels
//! have no backward pass).

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use half::bf16;

use crate::config::NormKind;
use crate::kernels::gemm::{cpu_features, PackedBf16, PackedF32};

/// One weight format of a linear map W [out, in] (PyTorch `nn.Linear` layout, no bias): how it
/// is held and multiplied. A new format (e.g. a quantized block type) is one more implementation;
/// the forwards only call [`Linear`].
pub trait LinearWeight: std::any::Any + std::fmt::Debug + Send + Sync {
    /// (out, in).
    fn dims(&self) -> (usize, usize);

    /// y = x·Wᵀ, x [N, in] → [N, out] (inference).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// res + x·Wᵀ (a residual connection after the layer), in one pass where a fused kernel
    /// applies.
    fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        crate::kernels::add(res, &self.forward(x)?)
    }

    /// y = x·Wᵀ in f32 whatever the weight dtype (logits: a bf16 model's head accumulates in f32
    /// and its output is kept unrounded).
    fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)?.to_dtype(DType::F32)
    }

    /// The weight as a tensor [out, in] (unpacked if needed: slow, for saving only).
    fn to_tensor(&self) -> Result<Tensor>;

    /// The tensor itself when the weight is held dense (the differentiable path needs it).
    fn as_dense(&self) -> Option<&Tensor> {
        None
    }

    /// y = x·Wᵀ made of differentiable ops (training), under the thread's [`autocast`] dtype.
    fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.as_dense().ok_or_else(|| {
            candle_core::Error::Msg(
                "this model's weights are packed for inference; load it dense to train".into(),
            )
        })?;
        diff_matmul_t(x, w)
    }
}

thread_local! {
    /// The dtype the differentiable linear maps compute in on this thread (`None`: the
    /// operands' own). See [`autocast`].
    static AUTOCAST: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// Mixed precision as PyTorch's autocast does it: while the guard lives, the training forward's
/// linear maps (projections, MLP, output head) multiply in `dtype` (bf16: the bf16 GEMM), with
/// f32 master weights cast on the way in and the product cast back to the input's dtype; norms,
/// softmax, the loss and every reduction stay in f32. The backward pass follows the recorded
/// casts (gradients reach the f32 weights in f32).
pub fn autocast(dtype: Option<DType>) -> AutocastGuard {
    let prev = AUTOCAST.with(|c| c.replace(dtype));
    AutocastGuard(prev)
}

/// Restores the previous autocast dtype when dropped.
pub struct AutocastGuard(Option<DType>);

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST.with(|c| c.set(self.0));
    }
}

/// The thread's autocast dtype.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(|c| c.get())
}

/// x·Wᵀ for `w` [out, in], differentiable: in the autocast dtype when one is set (the result
/// cast back to x's dtype), else in x's dtype (a weight of another dtype, e.g. a frozen bf16
/// base under f32 training, is cast to it).
pub fn diff_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use crate::kernels::matmul_op::matmul_t;
    match autocast_dtype() {
        Some(dt) if dt != x.dtype() || dt != w.dtype() => {
            let y = matmul_t(&x.to_dtype(dt)?, &w.to_dtype(dt)?)?;
            y.to_dtype(x.dtype())
        }
        _ if w.dtype() != x.dtype() => matmul_t(x, &w.to_dtype(x.dtype())?),
        _ => matmul_t(x, w),
    }
}

/// A dense weight tensor (training, GPUs, CPUs without a kernel for the dtype).
#[derive(Debug)]
struct Dense(Tensor);

impl LinearWeight for Dense {
    fn dims(&self) -> (usize, usize) {
        self.0.dims2().unwrap_or((0, 0))
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::plain_matmul(x, &self.0.t()?)
    }
    fn to_tensor(&self) -> Result<Tensor> {
        Ok(self.0.clone())
    }
    fn as_dense(&self) -> Option<&Tensor> {
        Some(&self.0)
    }
}

impl LinearWeight for PackedF32 {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::cpu::linear_f32(&x.to_dtype(DType::F32)?, self)
    }
    fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_weight(), (self.n, self.k), &Device::Cpu)
    }
}

impl LinearWeight for PackedBf16 {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::cpu::linear_bf16(&x.to_dtype(DType::BF16)?, self)
    }
    fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::cpu::linear_add_bf16(&x.to_dtype(DType::BF16)?, self, res)
        {
            return y;
        }
        crate::kernels::add(res, &self.forward(x)?)
    }
    fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::cpu::linear_bf16_f32(&x.to_dtype(DType::BF16)?, self)
    }
    fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_weight(), (self.n, self.k), &Device::Cpu)
    }
}

/// The gate (`up` false) or up half of an MLP's two input weights packed together for the fused
/// SwiGLU kernel (see [`Mlp::new`]); both halves share one packing. On its own (not on the hot
/// path) a half is unpacked.
#[derive(Debug)]
struct GluHalf {
    glu: Arc<PackedBf16>,
    up: bool,
}

impl LinearWeight for GluHalf {
    fn dims(&self) -> (usize, usize) {
        (self.glu.n / 2, self.glu.k)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::plain_matmul(&x.to_dtype(DType::BF16)?, &self.to_tensor()?.t()?)
    }
    fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(
            self.glu.glu_half(self.up),
            (self.glu.n / 2, self.glu.k),
            &Device::Cpu,
        )
    }
}

/// A linear map, whatever its weight format: dense, or, for inference on CPUs with AVX-512, the
/// same values packed once into the GEMM's panel layout (the tensor is then dropped: no second
/// copy is kept).
#[derive(Debug, Clone)]
pub struct Linear(Arc<dyn LinearWeight>);

impl Linear {
    /// A dense weight.
    pub fn dense(w: Tensor) -> Self {
        Linear(Arc::new(Dense(w)))
    }

    /// A weight of any format.
    pub fn from_weight(w: impl LinearWeight + 'static) -> Self {
        Linear(Arc::new(w))
    }

    /// Packs `w` for the CPU kernels when this CPU and dtype have one; dense otherwise.
    pub fn packed(w: Tensor) -> Result<Self> {
        let f = cpu_features();
        if !matches!(w.device(), Device::Cpu) {
            return Ok(Linear::dense(w));
        }
        let (n, k) = w.dims2()?;
        match w.dtype() {
            DType::F32 if f.avx512f => {
                let data = w.flatten_all()?.to_vec1::<f32>()?;
                Ok(Linear::from_weight(PackedF32::from_weight(&data, n, k)))
            }
            // AVX512-BF16 multiplies the pairs directly; plain AVX-512 widens them in registers
            DType::BF16 if f.avx512f && k.is_multiple_of(2) => {
                let data = w.flatten_all()?.to_vec1::<bf16>()?;
                Ok(Linear::from_weight(PackedBf16::from_weight(&data, n, k)))
            }
            _ => Ok(Linear::dense(w)),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        self.0.dims()
    }

    /// The weight as a tensor [out, in] (unpacked if needed: slow, for saving only).
    pub fn tensor(&self) -> Result<Tensor> {
        self.0.to_tensor()
    }

    /// The dense weight, for the differentiable path.
    pub fn dense_tensor(&self) -> Result<&Tensor> {
        self.0.as_dense().ok_or_else(|| {
            candle_core::Error::Msg(
                "this model's weights are packed for inference; load it dense to train".into(),
            )
        })
    }

    /// y = x·Wᵀ, x [N, in] → [N, out] (inference).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }

    /// res + x·Wᵀ (inference; a residual connection after the layer).
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        self.0.forward_add(x, res)
    }

    /// y = x·Wᵀ in f32 whatever the weight dtype (logits).
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward_f32(x)
    }

    /// y = x·Wᵀ made of differentiable ops (training; an adapter's update included).
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward_diff(x)
    }

    /// The weight with a low-rank update `s·B·A` (unmerged; A [r, in] and B [out, r] may be
    /// trainable variables).
    pub fn with_lora(self, a: Tensor, b: Tensor, scale: f64) -> Self {
        Linear::from_weight(super::lora::Lora {
            base: self,
            a,
            b,
            scale,
        })
    }
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
    /// Gate and up weights packed together for the fused SwiGLU kernel (then `ff_proj` and
    /// `up_proj` are views of its halves).
    gate_up: Option<Arc<PackedBf16>>,
}

impl Mlp {
    /// The MLP of these weights. When gate and up are both packed bf16 (inference on CPUs with
    /// AVX512-BF16) they are packed together for the fused SwiGLU kernel and the separate
    /// packings are dropped.
    pub fn new(ff_proj: Linear, up_proj: Linear, ff_out: Linear) -> Self {
        let g = ff_proj.0.clone() as Arc<dyn std::any::Any + Send + Sync>;
        let u = up_proj.0.clone() as Arc<dyn std::any::Any + Send + Sync>;
        if let (Ok(g), Ok(u)) = (g.downcast::<PackedBf16>(), u.downcast::<PackedBf16>()) {
            if (g.n, g.k) == (u.n, u.k) {
                let glu = Arc::new(PackedBf16::glu(&g, &u));
                return Mlp {
                    ff_proj: Linear(Arc::new(GluHalf {
                        glu: glu.clone(),
                        up: false,
                    })),
                    up_proj: Linear(Arc::new(GluHalf {
                        glu: glu.clone(),
                        up: true,
                    })),
                    ff_out,
                    gate_up: Some(glu),
                };
            }
        }
        Mlp {
            ff_proj,
            up_proj,
            ff_out,
            gate_up: None,
        }
    }

    /// silu(ff_proj(x)) ⊙ up_proj(x), [N, D] → [N, F].
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(glu) = &self.gate_up {
            return crate::kernels::cpu::glu_bf16(x, glu);
        }
        let g = self.ff_proj.forward(x)?; // [N, F]
        let u = self.up_proj.forward(x)?; // [N, F]
        crate::kernels::silu_mul(&g, &u)
    }

    /// mlp(x) (inference).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.ff_out.forward(&self.hidden(x)?)
    }

    /// res + mlp(x), the residual add fused into the down projection where it can be.
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        self.ff_out.forward_add(&self.hidden(x)?, res)
    }

    /// mlp(x) made of differentiable ops (training).
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.ff_proj.forward_diff(x)?;
        let u = self.up_proj.forward_diff(x)?;
        let m = (candle_nn::ops::silu(&g)? * u)?;
        self.ff_out.forward_diff(&m)
    }
}
