//! The commit axis: how many of a step's masked candidates are unmasked (reference §4.4, §6.2,
//! §6.3; Dream's `alg_temp` and `origin`). Candidates are ordered by confidence, highest first,
//! ties by lower position first (the reference leaves tie order unspecified; this is llada's
//! documented rule).

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// How many candidates a step commits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum Commit {
    /// LLaDA: the k most confident, k from the transfer schedule.
    TopK,
    /// Fast-dLLM: the most confident always, plus every other candidate with confidence ≥ τ.
    Threshold { tau: f64 },
    /// Fast-dLLM factor rule: the longest prefix of ranks n with (n + 1)(1 − c_n) ≤ f.
    Factor { f: f64 },
    /// Dream with `alg_temp` > 0: k candidates drawn without replacement, each draw with
    /// probability softmax(confidence / temp) over those left (`torch.multinomial`).
    Sampled { temp: f64 },
    /// Dream's `origin`: each candidate revealed independently with the step's probability
    /// 1 − s/t of the schedule (1 at the last step); confidences play no part.
    Origin,
}

impl std::fmt::Display for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Commit::TopK => write!(f, "top-k"),
            Commit::Threshold { tau } => write!(f, "threshold {tau}"),
            Commit::Factor { f: x } => write!(f, "factor {x}"),
            Commit::Sampled { temp } => write!(f, "sampled (alg_temp {temp})"),
            Commit::Origin => write!(f, "origin"),
        }
    }
}

/// What the transfer schedule allows a step: `k` positions (the rank rules), or each candidate
/// with probability `reveal_p` ([`Commit::Origin`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub k: usize,
    pub reveal_p: f64,
}

/// Orders candidates (position, confidence): confidence descending, then position ascending.
pub fn order(cands: &mut [(usize, f64)]) {
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

impl Commit {
    /// Positions to commit among `cands` (position, confidence), given the schedule's count `k`
    /// for this step, for the deterministic rules (`TopK`, `Threshold`, `Factor`; the random ones
    /// draw from a fixed seed here: use [`Commit::select_with`]). Returns positions in commit
    /// order.
    pub fn select(&self, cands: &[(usize, f64)], k: usize) -> Vec<usize> {
        let quota = Quota { k, reveal_p: 1.0 };
        self.select_with(cands, quota, &mut Rng::new(0))
    }

    /// Positions to commit among `cands` under the step's `quota`; the random rules draw from
    /// `rng`. Returns positions in commit order.
    pub fn select_with(&self, cands: &[(usize, f64)], quota: Quota, rng: &mut Rng) -> Vec<usize> {
        match *self {
            Commit::Sampled { temp } => {
                return sample_without_replacement(cands, quota.k, temp, rng)
            }
            Commit::Origin => {
                let mut c = cands.to_vec();
                c.sort_by_key(|x| x.0);
                // one draw per candidate in position order, as the reference draws per position
                return c
                    .into_iter()
                    .filter(|_| rng.uniform() < quota.reveal_p)
                    .map(|x| x.0)
                    .collect();
            }
            _ => {}
        }
        let mut c = cands.to_vec();
        order(&mut c);
        let n = match *self {
            Commit::Threshold { tau } => {
                if c.is_empty() {
                    0
                } else {
                    1 + c[1..].iter().take_while(|x| x.1 >= tau).count()
                }
            }
            Commit::Factor { f } => factor_count(&c, f),
            _ => quota.k.min(c.len()),
        };
        c.iter().take(n).map(|x| x.0).collect()
    }

    /// Whether the rule commits a fixed number per step (its block loop runs every scheduled
    /// step, as the reference loops), rather than as many as pass a test.
    pub fn is_scheduled(&self) -> bool {
        matches!(self, Commit::TopK | Commit::Sampled { .. } | Commit::Origin)
    }
}

/// `k` of `cands` drawn without replacement, each draw with probability ∝ exp(c / temp) among
/// those left (f64, relative to the largest left).
fn sample_without_replacement(
    cands: &[(usize, f64)],
    k: usize,
    temp: f64,
    rng: &mut Rng,
) -> Vec<usize> {
    let mut c = cands.to_vec();
    c.sort_by_key(|x| x.0);
    let mut taken = vec![false; c.len()];
    let mut out = Vec::with_capacity(k.min(c.len()));
    let mut w = vec![0f64; c.len()];
    for _ in 0..k.min(c.len()) {
        let left = || (0..c.len()).filter(|&i| !taken[i]);
        // weights relative to the most confident left, so that one always weighs 1
        let m = left().map(|i| c[i].1).fold(f64::NEG_INFINITY, f64::max);
        for i in left() {
            w[i] = ((c[i].1 - m) / temp).exp();
        }
        let total: f64 = left().map(|i| w[i]).sum();
        let mut pick = left().next().unwrap_or(0);
        if total > 0.0 {
            let mut u = rng.uniform() * total;
            for i in left() {
                pick = i; // the last one left absorbs rounding
                if u < w[i] {
                    break;
                }
                u -= w[i];
            }
        }
        taken[pick] = true;
        out.push(c[pick].0);
    }
    out
}

/// The factor rule's count over confidences sorted descending (reference §6.3, quirks included:
/// when the first failing rank is the last one, every candidate is committed).
fn factor_count(sorted: &[(usize, f64)], f: f64) -> usize {
    let count = sorted.len();
    for (i, &(_, conf)) in sorted.iter().enumerate() {
        let rank = i + 1;
        let passes = rank == 1 || conf >= 1.0 - f / (rank as f64 + 1.0);
        if !passes {
            return if rank == count { count } else { i };
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(c: &[f64]) -> Vec<(usize, f64)> {
        c.iter().copied().enumerate().collect()
    }

    #[test]
    fn threshold_reference_examples() {
        let t = Commit::Threshold { tau: 0.9 };
        assert_eq!(t.select(&cands(&[0.95, 0.91, 0.5]), 0), vec![0, 1]);
        assert_eq!(t.select(&cands(&[0.6, 0.5]), 0), vec![0]);
        assert_eq!(t.select(&cands(&[0.5, 0.9]), 0), vec![1]);
        assert!(t.select(&[], 0).is_empty());
    }

    #[test]
    fn threshold_commits_at_least_one() {
        let t = Commit::Threshold { tau: 1.0 };
        for n in 1..10 {
            let c: Vec<f64> = (0..n).map(|i| i as f64 / 10.0).collect();
            assert_eq!(t.select(&cands(&c), 0).len(), 1);
        }
    }

    #[test]
    fn factor_thresholds_f1() {
        // rank n passes iff c_n >= 1 - 1/(n+1): 0.6667, 0.75, 0.8, 0.8333, 0.8571, 0.875, 0.8889
        let th = [2.0 / 3.0, 0.75, 0.8, 5.0 / 6.0, 6.0 / 7.0, 0.875, 8.0 / 9.0];
        for (i, t) in th.iter().enumerate() {
            let n = i + 2; // the rank whose threshold this is
            for (delta, expect) in [(-1e-6, n - 1), (1e-6, n)] {
                // ranks 1..n-1 pass, rank n sits just below/above its threshold, then two
                // failing ranks (so the first failure is never the last rank)
                let mut c = vec![0.999; n - 1];
                c.extend([t + delta, 0.1, 0.05]);
                let got = Commit::Factor { f: 1.0 }.select(&cands(&c), 0).len();
                assert_eq!(got, expect, "rank {n}, delta {delta}");
            }
        }
    }

    #[test]
    fn factor_quirks() {
        let f = Commit::Factor { f: 1.0 };
        // C = 2: both always committed (a failing last rank bumps K to C).
        assert_eq!(f.select(&cands(&[0.3, 0.1]), 0).len(), 2);
        assert_eq!(f.select(&cands(&[0.3]), 0).len(), 1);
        // first failure in the middle: the passing prefix only
        assert_eq!(f.select(&cands(&[0.3, 0.1, 0.1]), 0).len(), 1);
    }

    #[test]
    fn sampled_draws_k_distinct_candidates_favouring_confidence() {
        let c = vec![(4, 0.9), (1, 0.1), (7, 0.5), (2, 0.2)];
        let mut rng = Rng::new(3);
        let mut first = [0usize; 8];
        for _ in 0..4000 {
            let q = Quota {
                k: 3,
                reveal_p: 0.0,
            };
            let got = Commit::Sampled { temp: 0.2 }.select_with(&c, q, &mut rng);
            assert_eq!(got.len(), 3);
            let mut u = got.clone();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), 3, "{got:?}");
            first[got[0]] += 1;
        }
        // P(first = 4) = e^4.5 / (e^4.5 + e^2.5 + e^0.5 + e^0) ≈ 0.863
        let p = first[4] as f64 / 4000.0;
        assert!((p - 0.863).abs() < 0.03, "{p}");
        // a tiny temperature is the top-k rule; k beyond the candidates takes them all
        let q = Quota {
            k: 2,
            reveal_p: 0.0,
        };
        assert_eq!(
            Commit::Sampled { temp: 1e-9 }.select_with(&c, q, &mut rng),
            vec![4, 7]
        );
        let q = Quota {
            k: 9,
            reveal_p: 0.0,
        };
        assert_eq!(
            Commit::Sampled { temp: 1.0 }
                .select_with(&c, q, &mut rng)
                .len(),
            4
        );
    }

    #[test]
    fn origin_reveals_each_candidate_with_the_step_probability() {
        let c: Vec<(usize, f64)> = (0..50).map(|i| (i, 0.0)).collect();
        let mut rng = Rng::new(9);
        let q = Quota {
            k: 0,
            reveal_p: 0.3,
        };
        let n: usize = (0..400)
            .map(|_| Commit::Origin.select_with(&c, q, &mut rng).len())
            .sum();
        let p = n as f64 / (400.0 * 50.0);
        assert!((p - 0.3).abs() < 0.02, "{p}");
        let all = Quota {
            k: 0,
            reveal_p: 1.0,
        };
        assert_eq!(Commit::Origin.select_with(&c, all, &mut rng).len(), 50);
    }

    #[test]
    fn top_k_orders_by_confidence_then_position() {
        let c = vec![(5, 0.2), (3, 0.9), (9, 0.9), (1, 0.1)];
        assert_eq!(Commit::TopK.select(&c, 2), vec![3, 9]);
        assert_eq!(Commit::TopK.select(&c, 10), vec![3, 9, 5, 1]);
    }
}
