//! The logit-filter axis: top-p (nucleus) and top-k filtering of a position's logits before the
//! token is chosen and its confidence scored, as Dream's `sample_tokens` does (`top_p_logits`,
//! `top_k_logits`). Removed entries become −∞ (the reference writes `finfo(f32).min`, which
//! gives the same zero probability); at least one entry always stays.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Top-p then top-k (either optional).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LogitFilter {
    /// Keep the most probable entries through the first whose cumulative probability exceeds
    /// `top_p` (in (0, 1]; 1 = off, as the reference applies it only below 1).
    pub top_p: Option<f64>,
    /// Keep the entries not below the k-th largest logit (k ≥ 1).
    pub top_k: Option<usize>,
}

impl LogitFilter {
    /// Whether the filter removes anything at all.
    pub fn is_active(&self) -> bool {
        self.top_p.is_some_and(|p| p < 1.0) || self.top_k.is_some()
    }

    /// Checks the values, naming the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::setting("top_p", p, "must be in (0, 1]"));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::setting("top_k", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// Sets the removed entries of `l` to −∞.
    pub fn apply(&self, l: &mut [f32]) {
        if let Some(p) = self.top_p.filter(|&p| p < 1.0) {
            top_p(l, p);
        }
        if let Some(k) = self.top_k {
            top_k(l, k);
        }
    }
}

/// Nucleus filter: the entries sorted by logit, descending (ties: lower index first); those
/// after the first whose cumulative softmax probability exceeds `p` are removed (the first is
/// always kept). Only a growing prefix of the order is sorted (`select_nth` of the first 64, 256,
/// … entries): a peaked distribution over a vocabulary of 150k needs a few dozen.
fn top_p(l: &mut [f32], p: f64) {
    let order = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..l.len() as u32).collect();
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return;
    }
    let total: f64 = l.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let mut sorted = 0;
    let mut cum = 0.0;
    let mut keep = None;
    let mut want = 64usize;
    while keep.is_none() && sorted < idx.len() {
        let end = want.min(idx.len());
        let rest = &mut idx[sorted..];
        if end - sorted < rest.len() {
            rest.select_nth_unstable_by(end - sorted - 1, order);
        }
        idx[sorted..end].sort_by(order);
        for (j, &i) in idx.iter().enumerate().take(end).skip(sorted) {
            cum += ((l[i as usize] - m) as f64).exp() / total;
            if cum > p {
                keep = Some(j + 1);
                break;
            }
        }
        sorted = end;
        want = want.saturating_mul(4);
    }
    let keep = keep.unwrap_or(idx.len());
    let removed: Vec<u32> = idx[keep..].to_vec();
    for i in removed {
        l[i as usize] = f32::NEG_INFINITY;
    }
}

/// Removes the entries below the k-th largest logit (ties at the k-th value stay).
fn top_k(l: &mut [f32], k: usize) {
    let k = k.min(l.len());
    if k == 0 {
        return;
    }
    let mut v = l.to_vec();
    let (_, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for x in l.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(l: &[f32]) -> Vec<usize> {
        (0..l.len()).filter(|&i| l[i] > f32::NEG_INFINITY).collect()
    }

    #[test]
    fn top_p_keeps_through_the_first_entry_past_p() {
        // probabilities ≈ 0.643, 0.237, 0.087, 0.032
        let l = [3.0f32, 2.0, 1.0, 0.0];
        for (p, want) in [
            (0.5, vec![0]),
            (0.7, vec![0, 1]),
            (0.9, vec![0, 1, 2]),
            (0.99, vec![0, 1, 2, 3]),
        ] {
            let mut x = l;
            LogitFilter {
                top_p: Some(p),
                top_k: None,
            }
            .apply(&mut x);
            assert_eq!(kept(&x), want, "p={p}");
        }
        // order does not matter; 1.0 is off
        let mut x = [1.0f32, 3.0, 0.0, 2.0];
        LogitFilter {
            top_p: Some(0.7),
            top_k: None,
        }
        .apply(&mut x);
        assert_eq!(kept(&x), vec![1, 3]);
        let mut x = l;
        LogitFilter {
            top_p: Some(1.0),
            top_k: None,
        }
        .apply(&mut x);
        assert_eq!(kept(&x), vec![0, 1, 2, 3]);
    }

    /// The partial sort keeps exactly what a full sort keeps, on long rows with ties.
    #[test]
    fn top_p_partial_sort_equals_the_full_sort() {
        let full = |l: &[f32], p: f64| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..l.len()).collect();
            idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            let m = l[idx[0]];
            let total: f64 = l.iter().map(|&x| ((x - m) as f64).exp()).sum();
            let mut cum = 0.0;
            let mut keep = idx.len();
            for (j, &i) in idx.iter().enumerate() {
                cum += ((l[i] - m) as f64).exp() / total;
                if cum > p {
                    keep = j + 1;
                    break;
                }
            }
            let mut k = idx[..keep].to_vec();
            k.sort();
            k
        };
        let mut rng = crate::rng::Rng::new(4);
        for (v, scale) in [(50usize, 1.0), (3000, 0.5), (3000, 4.0), (20000, 2.0)] {
            for p in [0.1, 0.5, 0.9, 0.95, 0.999] {
                // rounded values: many ties
                let l: Vec<f32> = (0..v)
                    .map(|_| ((rng.normal() * scale * 4.0).round() / 4.0) as f32)
                    .collect();
                let mut x = l.clone();
                LogitFilter {
                    top_p: Some(p),
                    top_k: None,
                }
                .apply(&mut x);
                assert_eq!(kept(&x), full(&l, p), "v={v} scale={scale} p={p}");
            }
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties() {
        let mut x = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        LogitFilter {
            top_p: None,
            top_k: Some(2),
        }
        .apply(&mut x);
        assert_eq!(kept(&x), vec![1, 3]);
        let mut x = [0.5f32, 2.0, -1.0, 1.0];
        LogitFilter {
            top_p: None,
            top_k: Some(9),
        }
        .apply(&mut x);
        assert_eq!(kept(&x).len(), 4);
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (f, name) in [
            (
                LogitFilter {
                    top_p: Some(0.0),
                    top_k: None,
                },
                "top_p",
            ),
            (
                LogitFilter {
                    top_p: Some(1.5),
                    top_k: None,
                },
                "top_p",
            ),
            (
                LogitFilter {
                    top_p: None,
                    top_k: Some(0),
                },
                "top_k",
            ),
        ] {
            assert!(f.validate().unwrap_err().to_string().contains(name));
        }
    }
}
