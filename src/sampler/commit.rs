//! The commit axis: how many of a step's masked candidates are unmasked (reference §4.4, §6.2,
//! §6.3). Candidates are ordered by confidence, highest first, ties by lower position first (the
//! reference leaves tie order unspecified; this is llada's documented rule).

use serde::{Deserialize, Serialize};

/// How many candidates a step commits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum Commit {
    /// LLaDA: the k most confident, k from the linear schedule of the block.
    TopK,
    /// Fast-dLLM: the most confident always, plus every other candidate with confidence ≥ τ.
    Threshold { tau: f64 },
    /// Fast-dLLM factor rule: the longest prefix of ranks n with (n + 1)(1 − c_n) ≤ f.
    Factor { f: f64 },
}

/// Orders candidates (position, confidence): confidence descending, then position ascending.
pub fn order(cands: &mut [(usize, f64)]) {
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

impl Commit {
    /// Positions to commit among `cands` (position, confidence), given the schedule's count `k`
    /// for this step (read by `TopK` only). Returns positions in commit order.
    pub fn select(&self, cands: &[(usize, f64)], k: usize) -> Vec<usize> {
        let mut c = cands.to_vec();
        order(&mut c);
        let n = match *self {
            Commit::TopK => k.min(c.len()),
            Commit::Threshold { tau } => {
                if c.is_empty() {
                    0
                } else {
                    1 + c[1..].iter().take_while(|x| x.1 >= tau).count()
                }
            }
            Commit::Factor { f } => factor_count(&c, f),
        };
        c.iter().take(n).map(|x| x.0).collect()
    }
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
    fn top_k_orders_by_confidence_then_position() {
        let c = vec![(5, 0.2), (3, 0.9), (9, 0.9), (1, 0.1)];
        assert_eq!(Commit::TopK.select(&c, 2), vec![3, 9]);
        assert_eq!(Commit::TopK.select(&c, 10), vec![3, 9, 5, 1]);
    }
}
