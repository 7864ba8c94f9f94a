//! AdamW with decoupled weight decay, global gradient-norm clipping and the learning-rate
//! schedules of the paper (Warmup-Stable-Decay) and cosine; the optimizer state is plain tensors so
//! a checkpoint restores it bit for bit.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::cpu::with_slice;
use crate::weights::non_finite_count;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (the paper: 0.1), applied to matrices only (not norm weights).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Learning-rate schedule over `total` steps (step counted from 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// Linear warm-up, then constant.
    Constant { warmup: usize },
    /// Linear warm-up, cosine decay to `min_ratio`·lr at the last step.
    Cosine { warmup: usize, min_ratio: f64 },
    /// Warmup-Stable-Decay (the paper, §3.4): linear warm-up, constant, then a linear decay to
    /// `min_ratio`·lr over the final `decay_fraction` of the steps.
    Wsd {
        warmup: usize,
        decay_fraction: f64,
        min_ratio: f64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Wsd {
            warmup: 100,
            decay_fraction: 0.1,
            min_ratio: 0.1,
        }
    }
}

/// The default warm-up of a run of `steps` steps: 100 steps, or a tenth of a shorter run (at
/// least 1), so that every run reaches its peak learning rate.
pub fn default_warmup(steps: usize) -> usize {
    100.min((steps / 10).max(1))
}

impl Schedule {
    /// Warm-up steps.
    pub fn warmup(&self) -> usize {
        match *self {
            Schedule::Constant { warmup }
            | Schedule::Cosine { warmup, .. }
            | Schedule::Wsd { warmup, .. } => warmup,
        }
    }

    /// The same schedule with `w` warm-up steps.
    pub fn with_warmup(mut self, w: usize) -> Self {
        match &mut self {
            Schedule::Constant { warmup }
            | Schedule::Cosine { warmup, .. }
            | Schedule::Wsd { warmup, .. } => *warmup = w,
        }
        self
    }

    /// The multiplier of the peak learning rate at `step` (0-based) of `total`.
    pub fn factor(&self, step: usize, total: usize) -> f64 {
        let warm = |w: usize| {
            if w > 0 && step < w {
                Some((step + 1) as f64 / w as f64)
            } else {
                None
            }
        };
        match *self {
            Schedule::Constant { warmup } => warm(warmup).unwrap_or(1.0),
            Schedule::Cosine { warmup, min_ratio } => warm(warmup).unwrap_or_else(|| {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let p = ((step - warmup) as f64 / span).min(1.0);
                min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }),
            Schedule::Wsd {
                warmup,
                decay_fraction,
                min_ratio,
            } => warm(warmup).unwrap_or_else(|| {
                let decay_steps = ((total as f64) * decay_fraction).round() as usize;
                let start = total.saturating_sub(decay_steps);
                if step < start || decay_steps == 0 {
                    1.0
                } else {
                    let p = ((step - start + 1) as f64 / decay_steps as f64).min(1.0);
                    1.0 - (1.0 - min_ratio) * p
                }
            }),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ratio = |r: f64| {
            if (0.0..=1.0).contains(&r) {
                Ok(())
            } else {
                Err(Error::setting("min_ratio", r, "must be in [0, 1]"))
            }
        };
        match *self {
            Schedule::Constant { .. } => Ok(()),
            Schedule::Cosine { min_ratio, .. } => ratio(min_ratio),
            Schedule::Wsd {
                decay_fraction,
                min_ratio,
                ..
            } => {
                ratio(min_ratio)?;
                if !(0.0..=1.0).contains(&decay_fraction) {
                    return Err(Error::setting(
                        "decay_fraction",
                        decay_fraction,
                        "must be in [0, 1]",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// AdamW state: first and second moments per variable, and the step count.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates applied so far.
    pub t: u64,
}

impl AdamW {
    /// Zero moments for `vars`.
    pub fn new(cfg: AdamWConfig, vars: &[(String, Var)]) -> Result<Self> {
        let zeros =
            |v: &Var| -> Result<Tensor> { Ok(Tensor::zeros(v.shape(), DType::F32, v.device())?) };
        Ok(AdamW {
            cfg,
            m: vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?,
            v: vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?,
            t: 0,
        })
    }

    /// One update with learning rate `lr` (gradients already clipped/scaled). Returns the index
    /// of the first variable whose updated weights or moments would not be finite (a diverging
    /// run), `None` when all are finite. The update is applied only when all are: otherwise the
    /// weights, moments and step count stay as they were, so the state in memory is the last good
    /// one. Two passes, so that no second copy of all the weights and moments is ever held: the
    /// first computes every new value and only checks it (on a device: one summed scalar, read
    /// once), the second applies the update one variable at a time, as before the check existed.
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
    ) -> Result<Option<usize>> {
        let t = self.t + 1;
        // pass 1: would every new value be finite?
        let mut on_device: Option<Tensor> = None;
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            if var.device().is_cpu() {
                let h = self.hyper(var, lr, t);
                let g = g.to_dtype(DType::F32)?;
                let finite = with_slice::<f32, _>(var.as_tensor(), |w| {
                    with_slice::<f32, _>(&self.m[i], |m| {
                        with_slice::<f32, _>(&self.v[i], |v| {
                            with_slice::<f32, _>(&g, |gs| finite_in_parallel(w, gs, m, v, h))
                        })
                    })
                })????;
                if !finite {
                    return Ok(Some(i));
                }
            } else {
                let bad = finite_sum(&self.device_update(var, g, i, lr, t)?)?;
                on_device = Some(match on_device {
                    None => bad,
                    Some(acc) => {
                        let bad = bad.to_device(acc.device())?;
                        (acc + bad)?
                    }
                });
            }
        }
        if let Some(sum) = on_device {
            if sum.to_scalar::<f32>()? != 0.0 {
                // rare (a diverging run): find the first one, one read per variable
                for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
                    if !var.device().is_cpu() {
                        let new = self.device_update(var, g, i, lr, t)?;
                        if finite_sum(&new)?.to_scalar::<f32>()? != 0.0 {
                            return Ok(Some(i));
                        }
                    }
                }
            }
        }
        // pass 2: apply, one variable at a time
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            if var.device().is_cpu() {
                let h = self.hyper(var, lr, t);
                let shape = var.shape().clone();
                let mut w = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let mut m = self.m[i].flatten_all()?.to_vec1::<f32>()?;
                let mut v = self.v[i].flatten_all()?.to_vec1::<f32>()?;
                with_slice::<f32, _>(&g.to_dtype(DType::F32)?, |gs| {
                    adamw_update(&mut w, gs, &mut m, &mut v, h)
                })?;
                var.set(&Tensor::from_vec(w, shape.clone(), &Device::Cpu)?)?;
                self.m[i] = Tensor::from_vec(m, shape.clone(), &Device::Cpu)?;
                self.v[i] = Tensor::from_vec(v, shape, &Device::Cpu)?;
            } else {
                let (w, m, v) = self.device_update(var, g, i, lr, t)?;
                var.set(&w)?;
                self.m[i] = m;
                self.v[i] = v;
            }
        }
        self.t = t;
        Ok(None)
    }

    /// The CPU kernel's hyperparameters for `var` at step `t`.
    fn hyper(&self, var: &Var, lr: f64, t: u64) -> Hyper {
        let c = self.cfg;
        let decay = if var.rank() >= 2 { c.weight_decay } else { 0.0 };
        Hyper {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            decay: decay as f32,
            bc1: (1.0 - c.beta1.powi(t as i32)) as f32,
            bc2: (1.0 - c.beta2.powi(t as i32)) as f32,
        }
    }

    /// The new weights and moments of variable `i` on a device (tensor ops).
    fn device_update(
        &self,
        var: &Var,
        g: &Tensor,
        i: usize,
        lr: f64,
        t: u64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = self.cfg;
        let decay = if var.rank() >= 2 { c.weight_decay } else { 0.0 };
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        let g = g.to_dtype(DType::F32)?;
        let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
        let w = ((var.as_tensor() * (1.0 - lr * decay))? - (upd * lr)?)?;
        Ok((w, m, v))
    }
}

/// Σ (x − x) over the new weights and moments, a scalar on their device: exactly 0 when every
/// element is finite, NaN otherwise.
fn finite_sum((w, m, v): &(Tensor, Tensor, Tensor)) -> Result<Tensor> {
    let bad = |t: &Tensor| t.sub(t)?.sum_all();
    Ok(((bad(w)? + bad(m)?)? + bad(v)?)?)
}

/// Whether every element of `tensors` is finite. CPU tensors: a scan of their bytes
/// ([`non_finite_count`]). Tensors on a device: x − x is 0 for finite x and NaN for NaN and ±∞,
/// so the sum over all of them is exactly 0 unless some element is not finite; it is read once.
pub fn all_finite(tensors: &[&Tensor]) -> Result<bool> {
    let mut device_sum: Option<Tensor> = None;
    for t in tensors {
        let t = t.to_dtype(DType::F32)?;
        if t.device().is_cpu() && cfg!(target_endian = "little") {
            let bad = with_slice::<f32, _>(&t, |s| {
                // SAFETY: the bytes of an f32 slice: u8 has no alignment or validity requirement,
                // and the length is the slice's size in bytes.
                let bytes = unsafe {
                    std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s))
                };
                non_finite_count(bytes, DType::F32)
            })?;
            if bad > 0 {
                return Ok(false);
            }
        } else {
            let s = t.sub(&t)?.sum_all()?;
            device_sum = Some(match device_sum {
                None => s,
                Some(acc) => {
                    let s = s.to_device(acc.device())?;
                    (acc + s)?
                }
            });
        }
    }
    match device_sum {
        Some(s) => Ok(s.to_scalar::<f32>()? == 0.0),
        None => Ok(true),
    }
}

/// Per-tensor AdamW constants.
#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
}

/// [`adamw_finite`] over chunks on the thread pool (the check pass reads the weights, moments
/// and gradients once more: on one thread it cost ~3% of a training step of the shipped model).
fn finite_in_parallel(w: &[f32], g: &[f32], m: &[f32], v: &[f32], h: Hyper) -> bool {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    w.par_chunks(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks(CHUNK))
        .zip(v.par_chunks(CHUNK))
        .all(|(((w, g), m), v)| adamw_finite(w, g, m, v, h))
}

crate::kernels::simd_fn! {
    /// Whether every new weight and moment of the update would be finite (nothing written: the
    /// same arithmetic as [`adamw_update`]).
    fn adamw_finite(w: &[f32], g: &[f32], m: &[f32], v: &[f32], h: Hyper) -> bool {
        let mut finite = true;
        for i in 0..w.len() {
            let gi = g[i];
            let mi = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
            let vi = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
            let upd = (mi / h.bc1) / ((vi / h.bc2).sqrt() + h.eps);
            let wi = w[i] * (1.0 - h.lr * h.decay) - h.lr * upd;
            finite &= wi.is_finite() & mi.is_finite() & vi.is_finite();
        }
        finite
    }
}

crate::kernels::simd_fn! {
    /// The update in place; whether every new weight and moment is finite (checked in the same
    /// pass).
    fn adamw_update(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: Hyper) -> bool {
        let mut finite = true;
        for i in 0..w.len() {
            let gi = g[i];
            m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
            v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
            let upd = (m[i] / h.bc1) / ((v[i] / h.bc2).sqrt() + h.eps);
            w[i] = w[i] * (1.0 - h.lr * h.decay) - h.lr * upd;
            finite &= w[i].is_finite() & m[i].is_finite() & v[i].is_finite();
        }
        finite
    }
}

/// The global L2 norm of `grads`, and the grads scaled so that norm ≤ `max_norm` (no scaling when
/// `max_norm` ≤ 0 or the norm is below it).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        Ok((
            norm,
            grads
                .iter()
                .map(|g| g * s)
                .collect::<candle_core::Result<_>>()?,
        ))
    } else {
        Ok((norm, grads.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let wsd = Schedule::Wsd {
            warmup: 10,
            decay_fraction: 0.2,
            min_ratio: 0.1,
        };
        assert!((wsd.factor(0, 100) - 0.1).abs() < 1e-12);
        assert_eq!(wsd.factor(9, 100), 1.0);
        assert_eq!(wsd.factor(50, 100), 1.0);
        assert_eq!(wsd.factor(79, 100), 1.0);
        assert!((wsd.factor(99, 100) - 0.1).abs() < 1e-12);
        assert!(wsd.factor(90, 100) < 1.0 && wsd.factor(90, 100) > 0.1);
        let cos = Schedule::Cosine {
            warmup: 0,
            min_ratio: 0.0,
        };
        assert!((cos.factor(0, 100) - 1.0).abs() < 1e-12);
        assert!((cos.factor(50, 100) - 0.5).abs() < 1e-12);
        assert!(cos.factor(100, 100).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_the_formula() {
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(AdamWConfig::default(), &vars).unwrap();
        let g = Tensor::new(&[[0.5f32, 0.25]], &Device::Cpu).unwrap();
        opt.step(&vars, &[g], 0.1).unwrap();
        // first step: m̂ = g, v̂ = g², update = g/|g| = sign(g) (eps negligible)
        let w: Vec<Vec<f32>> = var.as_tensor().to_vec2().unwrap();
        let expect = |w0: f32| w0 * (1.0 - 0.1 * 0.1) - 0.1;
        assert!((w[0][0] - expect(1.0)).abs() < 1e-6, "{w:?}");
        assert!((w[0][1] - expect(-2.0)).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn a_diverging_update_is_reported() {
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(AdamWConfig::default(), &vars).unwrap();
        let g = Tensor::new(&[[0.5f32, 0.25]], &Device::Cpu).unwrap();
        assert_eq!(
            opt.step(&vars, std::slice::from_ref(&g), 0.1).unwrap(),
            None
        );
        // NaN moments (a corrupt optimizer state) make the update NaN
        opt.m[0] = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap();
        let w1: Vec<Vec<f32>> = var.as_tensor().to_vec2().unwrap();
        assert_eq!(
            opt.step(&vars, std::slice::from_ref(&g), 0.1).unwrap(),
            Some(0)
        );
        // nothing was applied: the weights and the step count are those of the last good update
        assert_eq!(var.as_tensor().to_vec2::<f32>().unwrap(), w1);
        assert_eq!(opt.t, 1);
        // a learning rate of 1e30 overflows the weights (f32) within two steps
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(AdamWConfig::default(), &vars).unwrap();
        let first = opt.step(&vars, std::slice::from_ref(&g), 1e30).unwrap();
        let second = opt.step(&vars, std::slice::from_ref(&g), 1e30).unwrap();
        assert_eq!((first, second), (None, Some(0)));
        // the second variable diverging leaves the first (finite) one untouched too
        let mk =
            |x: f32| Var::from_tensor(&Tensor::new(&[[x, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let (a, b) = (mk(1.0), mk(3.0));
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut opt = AdamW::new(AdamWConfig::default(), &vars).unwrap();
        let grads = [g.clone(), g.clone()];
        assert_eq!(opt.step(&vars, &grads, 0.1).unwrap(), None);
        let good: Vec<Vec<Vec<f32>>> = [&a, &b]
            .iter()
            .map(|v| v.as_tensor().to_vec2().unwrap())
            .collect();
        opt.v[1] = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(opt.step(&vars, &grads, 0.1).unwrap(), Some(1));
        let now: Vec<Vec<Vec<f32>>> = [&a, &b]
            .iter()
            .map(|v| v.as_tensor().to_vec2().unwrap())
            .collect();
        assert_eq!(now, good);
        assert_eq!(opt.t, 1);
        let t = Tensor::new(&[1.0f32, f32::INFINITY], &Device::Cpu).unwrap();
        let ok = Tensor::new(&[1.0f32, -3e38], &Device::Cpu).unwrap();
        assert!(!all_finite(&[&ok, &t]).unwrap());
        assert!(all_finite(&[&ok]).unwrap());
    }

    #[test]
    fn clipping() {
        let g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let (n, c) = clip_grad_norm(&g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let v: Vec<f32> = c[0].to_vec1().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
    }
}
