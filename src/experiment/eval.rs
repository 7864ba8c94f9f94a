//! Scoring: exact-match accuracy of whatever answers the queries, and of a trained model (the
//! diffusion model by infilling, its twin left to right).

use serde::Serialize;

use super::data::{query, Pair, Probe};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sampler::{self, ar, SamplerConfig};
use crate::score::choice::Accuracy;
use crate::tokenizer::Tokenizer;

/// Accuracies of one model.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionScores {
    pub forward: Accuracy,
    /// Diffusion: by infilling the first line (`[masks] ; B .`); autoregressive: by the reversed
    /// template (`B :`).
    pub reversal: Accuracy,
    /// Diffusion only: the reversed template too, continued as the twin is asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversal_prompt: Option<Accuracy>,
}

/// Produces `n` answer tokens between a prefix and a suffix (see [`exact_match`]).
pub type Answerer<'a> = dyn FnMut(&[u32], usize, &[u32]) -> Result<Vec<u32>> + 'a;

/// Exact-match accuracy over `pairs` for one probe, whatever produces the answers:
/// `answer(prefix, n, suffix)` returns the `n` answer tokens between `prefix` (`eos`, then the
/// query) and `suffix` (empty for continuations).
pub fn exact_match(
    tok: &Tokenizer,
    eos: u32,
    pairs: &[Pair],
    probe: Probe,
    answer: &mut Answerer,
) -> Result<Accuracy> {
    let mut correct = 0;
    for p in pairs {
        let (before, a, after) = query(p, probe);
        let mut prefix = vec![eos];
        prefix.extend(tok.encode(&before)?);
        let target = tok.encode(&a)?;
        let suffix = tok.encode(&after)?;
        let got = answer(&prefix, target.len(), &suffix)?;
        correct += usize::from(got == target);
    }
    Ok(Accuracy::of(correct, pairs.len()))
}

/// Exact-match accuracy of a model on the test pairs for one probe. The answer length is the
/// expected answer's: the diffusion model fills exactly that many masks, one per step (greedy,
/// low-confidence remasking); the twin writes that many tokens greedily.
pub fn evaluate(
    ck: &Checkpoint,
    pairs: &[Pair],
    probe: Probe,
    autoregressive: bool,
) -> Result<Accuracy> {
    let tok = ck.tokenizer()?;
    let sp = ck.special;
    if autoregressive && probe == Probe::ReversalInfill {
        return Err(Error::setting(
            "probe",
            "reversal by infilling",
            "a left-to-right model cannot fill a span before its context",
        ));
    }
    exact_match(tok, sp.eos, pairs, probe, &mut |prefix, n, suffix| {
        let mut m = ck.model.predictor();
        if autoregressive {
            let out = ar::generate_ar(
                &mut m,
                prefix,
                n,
                0.0,
                false,
                &sp,
                &mut Rng::new(0),
                &mut sampler::no_progress,
            )?;
            return Ok(out.generated_ids.into_iter().next().unwrap_or_default());
        }
        let cfg = SamplerConfig {
            gen_length: n,
            steps: n,
            // one block over the whole region (the answer and, for infilling, the suffix)
            block_length: 0,
            ..Default::default()
        };
        let mut canvas = prefix.to_vec();
        canvas.extend(std::iter::repeat_n(sp.mask, n));
        canvas.extend_from_slice(suffix);
        let out = sampler::infill(
            &mut m,
            &canvas,
            &cfg,
            &sp,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )?;
        let mut ids = out.generated_ids.into_iter().next().unwrap_or_default();
        ids.truncate(n);
        Ok(ids)
    })
}

/// A trained model's scores on the test pairs: forward, then reversal by the probes it can be
/// asked (the diffusion model by infilling and by the reversed template, the twin by the reversed
/// template only).
pub(super) fn score_model(
    ck: &Checkpoint,
    test: &[Pair],
    autoregressive: bool,
) -> Result<DirectionScores> {
    let ar = autoregressive;
    let forward = evaluate(ck, test, Probe::Forward, ar)?;
    let prompted = evaluate(ck, test, Probe::ReversalPrompt, ar)?;
    Ok(if ar {
        DirectionScores {
            forward,
            reversal: prompted,
            reversal_prompt: None,
        }
    } else {
        DirectionScores {
            forward,
            reversal: evaluate(ck, test, Probe::ReversalInfill, ar)?,
            reversal_prompt: Some(prompted),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::data::{documents, make_pairs};
    use std::collections::HashMap;

    /// The evaluation scores exact matches: an oracle that knows every pair forward only gets
    /// 100% forward and 0% reversal; one answer token off is a miss.
    #[test]
    fn exact_match_scores_an_oracle() {
        let dir = tempfile::tempdir().unwrap();
        let all = make_pairs(12, 2, 3);
        let (test, bridge) = all.split_at(6);
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, documents(test, bridge).join("\n")).unwrap();
        let ids = crate::train::tokenizer::train_tokenizer(&[corpus], 300, &dir.path().join("tok"))
            .unwrap();
        let tok = Tokenizer::open(&dir.path().join("tok")).unwrap();
        let forward: HashMap<String, String> = test
            .iter()
            .map(|p| (format!("{} ;", p.first), format!(" {} .", p.second)))
            .collect();
        let oracle = |sabotage: bool| {
            let tok = &tok;
            let forward = &forward;
            move |prompt: &[u32], n: usize, suffix: &[u32]| -> Result<Vec<u32>> {
                assert_eq!(prompt[0], ids.eos);
                assert!(suffix.is_empty());
                let q = tok.decode(&prompt[1..], false)?;
                let mut out = match forward.get(&q) {
                    Some(a) => tok.encode(a)?,
                    None => vec![ids.eos; n],
                };
                if sabotage {
                    out[0] = ids.mask;
                }
                Ok(out)
            }
        };
        let fwd = exact_match(&tok, ids.eos, test, Probe::Forward, &mut oracle(false)).unwrap();
        assert_eq!((fwd.correct, fwd.n), (6, 6));
        let rev = exact_match(
            &tok,
            ids.eos,
            test,
            Probe::ReversalPrompt,
            &mut oracle(false),
        )
        .unwrap();
        assert_eq!((rev.correct, rev.n), (0, 6));
        let off = exact_match(&tok, ids.eos, test, Probe::Forward, &mut oracle(true)).unwrap();
        assert_eq!(off.correct, 0);
        // infilling: the answer sits between the prefix and the suffix ` ; B .`
        let first_of: HashMap<String, String> = test
            .iter()
            .map(|p| (format!(" ; {} .", p.second), p.first.clone()))
            .collect();
        let mut infiller = |prefix: &[u32], n: usize, suffix: &[u32]| -> Result<Vec<u32>> {
            assert_eq!(prefix, &[ids.eos]);
            let a = tok.encode(&first_of[&tok.decode(suffix, false)?])?;
            assert_eq!(a.len(), n);
            Ok(a)
        };
        let inf = exact_match(&tok, ids.eos, test, Probe::ReversalInfill, &mut infiller).unwrap();
        assert_eq!(inf.correct, 6);
    }
}
