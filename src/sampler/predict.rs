//! One step's prediction: for each masked position of the window, the token x0 (argmax, or a
//! Gumbel-max sample when T > 0) and its confidence (reference §4.4–4.8).
//!
//! Two paths compute the same thing: a fused host loop for CPU tensors (one pass over each row,
//! only for the rows that are still masked) and candle tensor ops for other devices, after which
//! only x0 and the confidences ([B, W] each, a few kB) cross to the host.

use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

use super::filter::LogitFilter;
use super::gumbel;
use super::remask::Remasking;
use crate::error::Result;
use crate::kernels::math::{exp_nonpos, row_max, row_sum_exp};
use crate::rng::Rng;
use crate::tokenizer::SpecialTokens;

/// What a step does with the logits.
#[derive(Debug, Clone)]
pub struct PredictOpts {
    pub temperature: f64,
    pub remasking: Remasking,
    /// A token whose logit is −∞ before sampling (`logits_eos_inf`: EOS).
    pub suppress_logit: Option<u32>,
    /// Tokens whose logits are −∞ in the confidence softmax only, after x0 is chosen
    /// (`confidence_eos_eot_inf` as the reference really behaves: EOS and EOT at T = 0, EOT only at
    /// T > 0).
    pub suppress_conf: Vec<u32>,
    /// Top-p / top-k filtering of the (tempered) logits before the token is chosen.
    pub filter: LogitFilter,
}

impl PredictOpts {
    /// The options of a sampler's settings: `logits_eos_inf` suppresses EOS before sampling;
    /// `confidence_eos_eot_inf` as the reference really behaves (EOS and EOT at T = 0, EOT only
    /// at T > 0, reference §4.8).
    pub fn of(cfg: &super::SamplerConfig, special: &SpecialTokens) -> Self {
        let suppress_conf = if cfg.confidence_eos_eot_inf {
            let mut v: Vec<u32> = special.eot.into_iter().collect();
            if cfg.temperature == 0.0 {
                v.push(special.eos);
            }
            v
        } else {
            Vec::new()
        };
        PredictOpts {
            temperature: cfg.temperature,
            remasking: cfg.remasking,
            suppress_logit: cfg.logits_eos_inf.then_some(special.eos),
            suppress_conf,
            filter: cfg.filter,
        }
    }
}

/// A prediction for one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Offset in the window.
    pub offset: usize,
    pub token: u32,
    pub confidence: f64,
}

/// Predicts x0 and confidence for `wanted[b]` (window offsets) of each row of `logits` [B, W, V],
/// whose W rows hold the window offsets `columns` (increasing; `None`: every offset).
pub fn predict(
    logits: &Tensor,
    columns: Option<&[usize]>,
    wanted: &[Vec<usize>],
    opts: &PredictOpts,
    rng: &mut Rng,
) -> Result<Vec<Vec<Prediction>>> {
    // Randomness is drawn here, single-threaded, so results do not depend on the thread count.
    let step_seed = rng.next_seed();
    let logits = logits.to_dtype(DType::F32)?;
    // the filters and Dream's sampling at T > 0 are computed on the host (on a GPU the
    // window's logits are read back)
    let host_only =
        (opts.remasking.is_dream() && opts.temperature > 0.0) || opts.filter.is_active();
    if host_only && !matches!(logits.device(), Device::Cpu) {
        let logits = logits.to_device(&Device::Cpu)?;
        return predict_host(&logits, columns, wanted, opts, step_seed);
    }
    if matches!(logits.device(), Device::Cpu) {
        predict_host(&logits, columns, wanted, opts, step_seed)
    } else {
        predict_tensor(&logits, columns, wanted, opts, step_seed)
    }
}

/// The per-position random stream of a step.
fn position_rng(step_seed: u64, b: usize, offset: usize) -> Rng {
    Rng::derived(step_seed, ((b as u64) << 32) | offset as u64)
}

/// Probability of `token` under softmax(row) with `skip` entries at −∞: exp(ℓ_x − m) / Σ exp(ℓ − m).
fn confidence_of(row: &[f32], token: u32, skip: &[u32]) -> f64 {
    if skip.contains(&token) {
        return 0.0;
    }
    // the segments between skipped entries
    let mut cuts: Vec<usize> = skip
        .iter()
        .map(|&s| s as usize)
        .filter(|&s| s < row.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut segments = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for end in cuts.iter().copied().chain(std::iter::once(row.len())) {
        segments.push(&row[start..end.max(start)]);
        start = end + 1;
    }
    let m = segments
        .iter()
        .map(|s| row_max(s))
        .fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return 0.0;
    }
    // f32 lanes per chunk (vectorised) accumulated in f64, so a dominant skipped entry costs no
    // precision
    let mut total = 0f64;
    for seg in segments {
        for chunk in seg.chunks(1024) {
            total += row_sum_exp(chunk, m) as f64;
        }
    }
    exp_nonpos(row[token as usize] - m) as f64 / total
}

fn predict_row(row: &[f32], opts: &PredictOpts, rng: &mut Rng) -> (u32, f64) {
    if opts.remasking.is_dream() {
        return predict_row_dream(row, opts, rng);
    }
    if opts.filter.is_active() {
        // the filter decides on the tempered logits (Dream's order); the removed entries leave
        // both the token choice and the confidence softmax
        let mut f = tempered(row, opts.temperature);
        opts.filter.apply(&mut f);
        let l: Vec<f32> = row
            .iter()
            .zip(&f)
            .map(|(&x, &y)| if y == f32::NEG_INFINITY { y } else { x })
            .collect();
        return predict_row_llada(&l, opts, rng);
    }
    predict_row_llada(row, opts, rng)
}

/// Dream's `sample_tokens`: logits / T (T > 0), `logits_eos_inf`, the filters, p = softmax;
/// x0 = argmax p (T = 0) or a draw from p; the confidence of [`Remasking`] from p.
fn predict_row_dream(row: &[f32], opts: &PredictOpts, rng: &mut Rng) -> (u32, f64) {
    let mut l = tempered(row, opts.temperature);
    if let Some(s) = opts.suppress_logit.and_then(|s| l.get_mut(s as usize)) {
        *s = f32::NEG_INFINITY;
    }
    opts.filter.apply(&mut l);
    let m = row_max(&l);
    let mut p: Vec<f64> = l
        .iter()
        .map(|&x| {
            if x == f32::NEG_INFINITY {
                0.0
            } else {
                ((x - m) as f64).exp()
            }
        })
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    let token = if opts.temperature == 0.0 {
        gumbel::argmax(&l, None) as usize
    } else {
        let mut u = rng.uniform();
        let mut pick = gumbel::argmax(&l, None) as usize;
        for (i, &x) in p.iter().enumerate() {
            if x > 0.0 {
                pick = i;
                if u < x {
                    break;
                }
                u -= x;
            }
        }
        pick
    };
    let confidence = match opts.remasking {
        Remasking::TopkMargin => {
            let (mut a, mut b) = (0f64, 0f64);
            for &x in &p {
                if x > a {
                    (a, b) = (x, a);
                } else if x > b {
                    b = x;
                }
            }
            a - b
        }
        Remasking::Entropy => p.iter().map(|&x| x * (x + 1e-10).ln()).sum(),
        _ => p[token],
    };
    (token as u32, confidence)
}

/// The logits divided by the temperature T > 0 (the row itself at T = 0), shifted by their
/// maximum first: softmax, argmax and the filters do not change, and a tiny T gives −∞ rather
/// than ∞ − ∞ (the division is in f64).
fn tempered(row: &[f32], t: f64) -> Vec<f32> {
    if t <= 0.0 {
        return row.to_vec();
    }
    let m = row_max(row);
    if !m.is_finite() {
        return row.to_vec();
    }
    row.iter().map(|&x| ((x - m) as f64 / t) as f32).collect()
}

/// LLaDA's prediction: argmax or Gumbel-max at T, confidence by [`Remasking`] (the
/// probability at temperature 1, or a uniform draw).
fn predict_row_llada(row: &[f32], opts: &PredictOpts, rng: &mut Rng) -> (u32, f64) {
    let token = if opts.temperature == 0.0 {
        gumbel::argmax(row, opts.suppress_logit)
    } else {
        gumbel::sample(row, opts.temperature, opts.suppress_logit, rng)
    };
    let confidence = match opts.remasking {
        Remasking::LowConfidence => {
            let mut skip: Vec<u32> = opts.suppress_conf.clone();
            skip.extend(opts.suppress_logit);
            confidence_of(row, token, &skip)
        }
        Remasking::Random => rng.uniform_f32() as f64,
        // Dream's confidences go through predict_row_dream
        Remasking::MaskgitPlus | Remasking::TopkMargin | Remasking::Entropy => {
            return predict_row_dream(row, opts, rng)
        }
    };
    (token, confidence)
}

/// The row of the logits holding window offset `o`.
fn column(columns: Option<&[usize]>, o: usize) -> Result<usize> {
    match columns {
        None => Ok(o),
        Some(c) => c
            .binary_search(&o)
            .map_err(|_| crate::error::Error::setting("offset", o, "has no logits row (internal)")),
    }
}

fn predict_host(
    logits: &Tensor,
    columns: Option<&[usize]>,
    wanted: &[Vec<usize>],
    opts: &PredictOpts,
    step_seed: u64,
) -> Result<Vec<Vec<Prediction>>> {
    let (_b, w, v) = logits.dims3()?;
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let data: &[f32] = match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            match layout.contiguous_offsets() {
                Some((a, b)) => &all[a..b],
                None => return Err(candle_core::Error::Msg("logits not contiguous".into()).into()),
            }
        }
        _ => return Err(candle_core::Error::Msg("host prediction needs CPU logits".into()).into()),
    };
    let mut jobs: Vec<(usize, usize, usize)> = Vec::new();
    for (b, offs) in wanted.iter().enumerate() {
        for &o in offs {
            jobs.push((b, o, column(columns, o)?));
        }
    }
    let results: Vec<(u32, f64)> = jobs
        .par_iter()
        .map(|&(b, o, c)| {
            let row = &data[(b * w + c) * v..(b * w + c + 1) * v];
            let mut rng = position_rng(step_seed, b, o);
            predict_row(row, opts, &mut rng)
        })
        .collect();
    let mut out: Vec<Vec<Prediction>> =
        wanted.iter().map(|w| Vec::with_capacity(w.len())).collect();
    for (&(b, o, _), (token, confidence)) in jobs.iter().zip(results) {
        out[b].push(Prediction {
            offset: o,
            token,
            confidence,
        });
    }
    Ok(out)
}

/// A [V] vector: 0, with −∞ at `ids`.
fn neg_inf_bias(v: usize, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
    let mut b = vec![0f32; v];
    for &i in ids {
        if let Some(x) = b.get_mut(i as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(b, v, device)
}

/// Tensor-op path (GPU): the whole window is predicted on the device; x0 and the confidences
/// ([B, W] each) are the only data read back.
fn predict_tensor(
    logits: &Tensor,
    columns: Option<&[usize]>,
    wanted: &[Vec<usize>],
    opts: &PredictOpts,
    step_seed: u64,
) -> Result<Vec<Vec<Prediction>>> {
    let (b, w, v) = logits.dims3()?;
    let device = logits.device().clone();
    let mut l = logits.clone();
    if let Some(s) = opts.suppress_logit {
        l = l.broadcast_add(&neg_inf_bias(v, &[s], &device)?)?;
    }
    let x0 = if opts.temperature == 0.0 {
        l.argmax_keepdim(D::Minus1)?
    } else {
        device.set_seed(step_seed)?;
        let u = Tensor::rand(0f64, 1f64, (b, w, v), &device)?;
        let u = u.clamp(f64::MIN_POSITIVE, 1.0)?;
        let g = u.log()?.neg()?.log()?.neg()?; // −ln(−ln u)
        (l.to_dtype(DType::F64)? + (g * opts.temperature)?)?.argmax_keepdim(D::Minus1)?
    }; // [B, W, 1]
    let conf: Option<Vec<Vec<f32>>> = match opts.remasking {
        Remasking::LowConfidence => {
            let lc = if opts.suppress_conf.is_empty() {
                l.clone()
            } else {
                l.broadcast_add(&neg_inf_bias(v, &opts.suppress_conf, &device)?)?
            };
            let m = lc.max_keepdim(D::Minus1)?;
            let s = lc.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?;
            let lx = lc.gather(&x0, D::Minus1)?;
            Some((lx - m)?.exp()?.div(&s)?.squeeze(D::Minus1)?.to_vec2()?)
        }
        // drawn on the host from the caller's seed, as the host path draws them (the same values
        // at T = 0), so random remasking is reproducible on every device
        Remasking::Random => None,
        // Dream's confidences at T = 0 without filters (`predict` sends the other cases to the
        // host): from p = softmax(l), x0 = argmax p
        Remasking::MaskgitPlus | Remasking::TopkMargin | Remasking::Entropy => {
            let m = l.max_keepdim(D::Minus1)?;
            let e = l.broadcast_sub(&m)?.exp()?;
            let s = e.sum_keepdim(D::Minus1)?;
            let c = match opts.remasking {
                // the top probability: e(x0) = 1
                Remasking::MaskgitPlus => s.recip()?,
                Remasking::TopkMargin => {
                    // the runner-up: the largest logit once x0's entry is removed
                    let ids = Tensor::arange(0u32, v as u32, &device)?.reshape((1, 1, v))?;
                    let is_x0 = ids.broadcast_eq(&x0)?;
                    let rest = is_x0
                        .where_cond(&Tensor::full(f32::NEG_INFINITY, (b, w, v), &device)?, &l)?;
                    let second = (rest.max_keepdim(D::Minus1)? - &m)?.exp()?;
                    ((1.0 - second)? / &s)?
                }
                _ => {
                    let p = e.broadcast_div(&s)?;
                    (&p * (&p + 1e-10)?.log()?)?.sum_keepdim(D::Minus1)?
                }
            };
            Some(c.squeeze(D::Minus1)?.to_vec2()?)
        }
    };
    let x0: Vec<Vec<u32>> = x0.squeeze(D::Minus1)?.to_vec2()?;
    wanted
        .iter()
        .enumerate()
        .map(|(b, offs)| {
            offs.iter()
                .map(|&o| {
                    let c = column(columns, o)?;
                    let confidence = match &conf {
                        Some(conf) => conf[b][c] as f64,
                        None => position_rng(step_seed, b, o).uniform_f32() as f64,
                    };
                    Ok(Prediction {
                        offset: o,
                        token: x0[b][c],
                        confidence,
                    })
                })
                .collect()
        })
        .collect()
}

/// Forces the tensor path (parity tests on CPU).
#[doc(hidden)]
pub fn predict_with_tensor_ops(
    logits: &Tensor,
    wanted: &[Vec<usize>],
    opts: &PredictOpts,
    rng: &mut Rng,
) -> Result<Vec<Vec<Prediction>>> {
    let step_seed = rng.next_seed();
    predict_tensor(&logits.to_dtype(DType::F32)?, None, wanted, opts, step_seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(t: f64, sl: Option<u32>, sc: Vec<u32>) -> PredictOpts {
        PredictOpts {
            temperature: t,
            remasking: Remasking::LowConfidence,
            suppress_logit: sl,
            suppress_conf: sc,
            filter: LogitFilter::default(),
        }
    }

    #[test]
    fn host_and_tensor_paths_agree_at_t0() {
        let mut r = Rng::new(5);
        let (b, w, v) = (2, 7, 300);
        let data: Vec<f32> = (0..b * w * v).map(|_| (r.normal() * 3.0) as f32).collect();
        let logits = Tensor::from_vec(data, (b, w, v), &Device::Cpu).unwrap();
        let wanted = vec![vec![0, 2, 6], vec![1, 3, 4, 5]];
        for o in [
            opts(0.0, None, vec![]),
            opts(0.0, Some(7), vec![]),
            opts(0.0, Some(7), vec![7, 9]),
        ] {
            let a = predict(&logits, None, &wanted, &o, &mut Rng::new(1)).unwrap();
            let t = predict_with_tensor_ops(&logits, &wanted, &o, &mut Rng::new(1)).unwrap();
            for (ra, rt) in a.iter().zip(&t) {
                for (pa, pt) in ra.iter().zip(rt) {
                    assert_eq!(pa.token, pt.token);
                    assert_eq!(pa.offset, pt.offset);
                    assert!(
                        (pa.confidence - pt.confidence).abs() < 1e-6,
                        "{pa:?} {pt:?}"
                    );
                }
            }
        }
    }

    /// Dream's confidences on the tensor path (GPUs, T = 0) equal the host path's.
    #[test]
    fn dream_confidences_agree_on_both_paths() {
        let mut r = Rng::new(8);
        let (b, w, v) = (2, 6, 300);
        let data: Vec<f32> = (0..b * w * v).map(|_| (r.normal() * 3.0) as f32).collect();
        let logits = Tensor::from_vec(data, (b, w, v), &Device::Cpu).unwrap();
        let wanted = vec![vec![0, 2, 5], vec![1, 3, 4]];
        for remasking in [
            Remasking::MaskgitPlus,
            Remasking::TopkMargin,
            Remasking::Entropy,
        ] {
            for sl in [None, Some(7)] {
                let o = PredictOpts {
                    remasking,
                    ..opts(0.0, sl, vec![])
                };
                let a = predict(&logits, None, &wanted, &o, &mut Rng::new(1)).unwrap();
                let t = predict_with_tensor_ops(&logits, &wanted, &o, &mut Rng::new(1)).unwrap();
                for (pa, pt) in a.iter().flatten().zip(t.iter().flatten()) {
                    assert_eq!((pa.token, pa.offset), (pt.token, pt.offset));
                    let tol = 1e-5 * pa.confidence.abs().max(1.0);
                    assert!(
                        (pa.confidence - pt.confidence).abs() < tol,
                        "{remasking}: {pa:?} {pt:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn random_remasking_is_seeded_and_device_independent() {
        let mut r = Rng::new(6);
        let (b, w, v) = (2, 5, 64);
        let data: Vec<f32> = (0..b * w * v).map(|_| r.normal() as f32).collect();
        let logits = Tensor::from_vec(data, (b, w, v), &Device::Cpu).unwrap();
        let wanted = vec![vec![0, 3], vec![1, 2, 4]];
        let o = PredictOpts {
            remasking: Remasking::Random,
            ..opts(0.0, None, vec![])
        };
        let run = |tensor: bool, seed: u64| -> Vec<f64> {
            let mut rng = Rng::new(seed);
            let p = if tensor {
                predict_with_tensor_ops(&logits, &wanted, &o, &mut rng)
            } else {
                predict(&logits, None, &wanted, &o, &mut rng)
            };
            p.unwrap().iter().flatten().map(|p| p.confidence).collect()
        };
        // the tensor path draws from the caller's seed, the same values as the host path
        assert_eq!(run(true, 3), run(false, 3));
        assert_eq!(run(true, 3), run(true, 3));
        assert_ne!(run(true, 3), run(true, 4));
    }

    #[test]
    fn confidence_is_softmax_probability() {
        let row = [1.0f32, 2.0, 0.5, -1.0];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((confidence_of(&row, 1, &[]) - 2f64.exp() / z).abs() < 1e-7);
        // suppressed entries leave the softmax; a suppressed choice has confidence 0
        let z2 = z - 2f64.exp();
        assert!((confidence_of(&row, 0, &[1]) - 1f64.exp() / z2).abs() < 1e-7);
        assert_eq!(confidence_of(&row, 1, &[1]), 0.0);
    }
}
