//! Multiple-choice evaluation: each candidate answer is scored by its likelihood bound given the
//! question (and optional few-shot examples); the best-scoring candidate is the prediction.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{log_likelihood, single_token_candidates, ScoreConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sampler::MaskPredictor;
use crate::tokenizer::Tokenizer;

/// One task: a context (question), candidate answers and the index of the right one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceTask {
    #[serde(alias = "question", alias = "ctx")]
    pub context: String,
    #[serde(alias = "endings", alias = "options", alias = "candidates")]
    pub choices: Vec<String>,
    #[serde(alias = "label", alias = "gold")]
    pub answer: usize,
}

/// Reads a JSONL file of [`ChoiceTask`]s; blank lines are skipped; errors name the line.
pub fn load_tasks(path: &Path) -> Result<Vec<ChoiceTask>> {
    let mut out = Vec::new();
    let rows: Vec<(usize, ChoiceTask)> = crate::error::read_jsonl(
        path,
        "{\"context\": str, \"choices\": [str, ...], \"answer\": index}",
    )?;
    for (line, t) in rows {
        let bad = |reason: String| Error::DataLine {
            path: path.to_path_buf(),
            line,
            reason,
        };
        if t.choices.len() < 2 {
            return Err(bad(format!("{} choices: need at least 2", t.choices.len())));
        }
        if t.answer >= t.choices.len() {
            return Err(bad(format!(
                "answer={} is not an index of the {} choices",
                t.answer,
                t.choices.len()
            )));
        }
        if t.choices.iter().any(|c| c.is_empty()) {
            return Err(bad("an empty choice cannot be scored".into()));
        }
        out.push(t);
    }
    if out.is_empty() {
        return Err(Error::DataLine {
            path: path.to_path_buf(),
            line: 0,
            reason: "no tasks in the file".into(),
        });
    }
    Ok(out)
}

/// Tokenises (context, continuation) as lm-evaluation-harness does: trailing whitespace of the
/// context moves to the continuation; the continuation's ids are those of the whole text after
/// the context's.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let cont = format!("{moved}{continuation}");
    let whole = tok.encode(&format!("{trimmed}{cont}"))?;
    let ctx = tok.encode(trimmed)?;
    if whole.len() > ctx.len() && whole.starts_with(&ctx) {
        Ok((ctx.clone(), whole[ctx.len()..].to_vec()))
    } else {
        Ok((ctx, tok.encode(&cont)?))
    }
}

/// The result of one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    /// Log-likelihood bound of each choice (summed over its tokens).
    pub scores: Vec<f64>,
    /// The choice with the highest score.
    pub predicted: usize,
    pub correct: bool,
    /// The choice with the highest score per byte of its text (lm-eval's `acc_norm`).
    pub predicted_norm: usize,
    pub correct_norm: bool,
}

/// Both accuracies of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    /// Highest summed log-likelihood wins.
    pub acc: Accuracy,
    /// Highest log-likelihood per byte of the choice wins (removes the bias to short answers).
    pub acc_norm: Accuracy,
    /// Forward passes of the whole evaluation.
    pub forwards: usize,
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k)
        .unwrap_or(0)
}

/// Accuracy with a 95% Wilson interval.
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
}

impl Accuracy {
    pub fn of(correct: usize, n: usize) -> Self {
        let p = correct as f64 / n.max(1) as f64;
        let z = 1.959964f64;
        let nf = n.max(1) as f64;
        let denom = 1.0 + z * z / nf;
        let center = (p + z * z / (2.0 * nf)) / denom;
        let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / denom;
        Accuracy {
            n,
            correct,
            accuracy: p,
            ci95: ((center - half).max(0.0), (center + half).min(1.0)),
        }
    }
}

/// The few-shot prefix for task `i`: `shots` other tasks (a seeded choice) with their right
/// answers, each followed by a blank line.
pub fn few_shot_prefix(tasks: &[ChoiceTask], i: usize, shots: usize, seed: u64) -> String {
    if shots == 0 || tasks.len() < 2 {
        return String::new();
    }
    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let others: Vec<usize> = rng
        .permutation(tasks.len())
        .into_iter()
        .filter(|&j| j != i)
        .take(shots)
        .collect();
    others
        .iter()
        .map(|&j| {
            format!(
                "{}{}\n\n",
                tasks[j].context, tasks[j].choices[tasks[j].answer]
            )
        })
        .collect()
}

/// Scores every candidate of every task. Single-token candidate sets use one exact forward pass
/// per task; others the Monte Carlo estimator with `cfg`. `on_task(done, total)` reports progress.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &mut dyn MaskPredictor,
    tok: &Tokenizer,
    tasks: &[ChoiceTask],
    shots: usize,
    cfg: &ScoreConfig,
    seed: u64,
    on_task: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<TaskResult>, EvalSummary)> {
    cfg.validate()?;
    let mask = tok.special().mask;
    let mut forwards = 0;
    let mut results = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        let context = format!("{}{}", few_shot_prefix(tasks, i, shots, seed), t.context);
        let pairs = t
            .choices
            .iter()
            .map(|c| encode_pair(tok, &context, c))
            .collect::<Result<Vec<_>>>()?;
        let same_prompt = pairs.iter().all(|(p, _)| p == &pairs[0].0);
        let scores = if same_prompt && pairs.iter().all(|(_, a)| a.len() == 1) {
            let cands: Vec<u32> = pairs.iter().map(|(_, a)| a[0]).collect();
            forwards += 1;
            single_token_candidates(model, &pairs[0].0, &cands, cfg.cfg_scale, mask)?
        } else {
            pairs
                .iter()
                // every pair from the same seed: its score does not depend on the order of the
                // tasks (the server and lm-eval, which send pairs in any order, give the same),
                // and the choices of a task share their masks (common random numbers)
                .map(|(p, a)| {
                    log_likelihood(model, p, a, cfg, mask, &mut Rng::new(seed)).map(|e| {
                        forwards += e.nfe;
                        e.log_likelihood
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let predicted = argmax(scores.iter().copied());
        let predicted_norm = argmax(
            scores
                .iter()
                .zip(&t.choices)
                .map(|(s, c)| s / c.len().max(1) as f64),
        );
        results.push(TaskResult {
            correct: predicted == t.answer,
            predicted,
            correct_norm: predicted_norm == t.answer,
            predicted_norm,
            scores,
        });
        on_task(i + 1, tasks.len());
    }
    let n = results.len();
    let summary = EvalSummary {
        acc: Accuracy::of(results.iter().filter(|r| r.correct).count(), n),
        acc_norm: Accuracy::of(results.iter().filter(|r| r.correct_norm).count(), n),
        forwards,
    };
    Ok((results, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval() {
        let a = Accuracy::of(50, 100);
        assert!((a.accuracy - 0.5).abs() < 1e-12);
        assert!((a.ci95.0 - 0.404).abs() < 0.002 && (a.ci95.1 - 0.596).abs() < 0.002);
        let a = Accuracy::of(0, 10);
        assert_eq!(a.ci95.0, 0.0);
    }

    #[test]
    fn bad_lines_are_named() {
        let d = std::env::temp_dir().join(format!("llada-choice-{}", std::process::id()));
        std::fs::write(
            &d,
            "{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"answer\": 1}\n\nnot json\n",
        )
        .unwrap();
        let e = load_tasks(&d).unwrap_err().to_string();
        assert!(e.contains(":3:"), "{e}");
        std::fs::write(
            &d,
            "{\"question\": \"a\", \"endings\": [\"x\", \"y\"], \"label\": 5}\n",
        )
        .unwrap();
        let e = load_tasks(&d).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("answer=5"), "{e}");
        let _ = std::fs::remove_file(&d);
    }
}
