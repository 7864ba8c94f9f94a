//! The reversal-curse experiment at small scale (paper §3.3, reference §8): a diffusion model and
//! its autoregressive twin (same Transformer, causal mask, next-token loss) trained on the same
//! synthetic pairs with equal budgets, then asked for each pair's second line given the first
//! (forward) and its first line given the second (reversal). The training text shows every test
//! pair in one order only.
//!
//! Data: "lines" are short sequences of pseudo-words. A document `A ; B .` says that line B follows
//! line A. Test pairs appear only that way. Bridge pairs (disjoint lines) appear both as `A ; B .`
//! and `B : A .` (`:` reads "follows"), which teaches the reversed template. Queries use the same
//! text for both models: forward `A ;` → ` B .`, reversal `B :` → ` A .`; the diffusion model fills
//! the masked answer after the prompt, the twin writes it left to right. Reversal for the diffusion
//! model is also asked by masking the first line of the training template (`[masks] ; B .`), which
//! only a bidirectional model can fill. The corpus lists the documents several times in seeded
//! orders; both models train without weight decay (the task is memorisation).

mod data;
mod eval;
mod plot;
mod poems;
mod training;

pub use data::{documents, make_pairs, query, shuffled_copies, words, Pair, Probe, CORPUS_COPIES};
pub use eval::{evaluate, exact_match, Answerer, DirectionScores};
pub use plot::plot;
pub use poems::{load_poems, poem_accuracy, Poem, PoemConfig};

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::ObjectiveKind;

/// Settings of the experiment.
#[derive(Debug, Clone, Serialize)]
pub struct ReversalConfig {
    /// Test pairs (shown one way) and bridge pairs (shown both ways).
    pub test_pairs: usize,
    pub bridge_pairs: usize,
    pub words_per_line: usize,
    pub seed: u64,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
}

impl ReversalConfig {
    /// Finishes in under 10 minutes on 2 CPU cores.
    pub fn quick() -> Self {
        ReversalConfig {
            test_pairs: 80,
            bridge_pairs: 80,
            words_per_line: 2,
            seed: 0,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            steps: 2500,
            batch_size: 32,
            seq_len: 32,
            lr: 1e-3,
        }
    }

    /// The full run (under an hour on 2 CPU cores). Masked diffusion memorises associations
    /// later than next-token prediction (its loss drops suddenly after a few thousand steps at
    /// this size), hence the step count.
    pub fn full() -> Self {
        ReversalConfig {
            test_pairs: 150,
            bridge_pairs: 150,
            steps: 10000,
            ..Self::quick()
        }
    }
}

/// The experiment's result.
#[derive(Debug, Clone, Serialize)]
pub struct ReversalReport {
    pub config: ReversalConfig,
    pub diffusion: DirectionScores,
    pub autoregressive: DirectionScores,
    pub parameters: u64,
    pub seconds: f64,
}

/// Runs the whole experiment in `dir`: data, tokenizer, both models, evaluation.
/// `log(msg)` reports progress.
pub fn run(
    cfg: &ReversalConfig,
    dir: &Path,
    threads_note: &str,
    log: &mut dyn FnMut(&str),
) -> Result<ReversalReport> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let all = make_pairs(
        cfg.test_pairs + cfg.bridge_pairs,
        cfg.words_per_line,
        cfg.seed,
    );
    let (test, bridge) = all.split_at(cfg.test_pairs);
    let corpus = write_corpus(cfg, dir, test, bridge, log)?;
    let prepared = training::prepare(cfg, dir, corpus)?;
    let (diffusion, _) = train_and_score(
        cfg,
        &prepared,
        test,
        "diffusion",
        ObjectiveKind::Diffusion,
        threads_note,
        log,
    )?;
    // the twin has the same parameter count (the causal mask has no weights)
    let (autoregressive, parameters) = train_and_score(
        cfg,
        &prepared,
        test,
        "autoregressive",
        ObjectiveKind::Autoregressive,
        threads_note,
        log,
    )?;
    Ok(ReversalReport {
        config: cfg.clone(),
        diffusion,
        autoregressive,
        parameters,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes the corpus (`corpus.txt`: the documents, in shuffled copies) and the pairs
/// (`pairs.json`) into `dir`; returns the corpus's path.
fn write_corpus(
    cfg: &ReversalConfig,
    dir: &Path,
    test: &[Pair],
    bridge: &[Pair],
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let docs = documents(test, bridge);
    let corpus = dir.join("corpus.txt");
    let stream = shuffled_copies(&docs, CORPUS_COPIES, cfg.seed);
    crate::weights::atomic_write(&corpus, stream.join("\n").as_bytes())?;
    let pairs_json =
        serde_json::to_string_pretty(&serde_json::json!({"test": test, "bridge": bridge}))
            .map_err(|e| Error::Json {
                path: dir.join("pairs.json"),
                source: e,
            })?;
    crate::weights::atomic_write(&dir.join("pairs.json"), pairs_json.as_bytes())?;
    log(&format!(
        "{} test pairs (one order), {} bridge pairs (both orders), {} documents",
        test.len(),
        bridge.len(),
        docs.len()
    ));
    Ok(corpus)
}

/// Trains one model (`label` names its files and log lines), scores it on the test pairs and logs
/// the scores; also returns its parameter count.
fn train_and_score(
    cfg: &ReversalConfig,
    prepared: &training::Prepared,
    test: &[Pair],
    label: &str,
    objective: ObjectiveKind,
    threads_note: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(DirectionScores, u64)> {
    let (ck, parameters) = training::train(cfg, prepared, label, objective, threads_note, log)?;
    let scores = eval::score_model(&ck, test, objective == ObjectiveKind::Autoregressive)?;
    log(&format!(
        "  {label}: forward {:.1}%, reversal {:.1}%{}",
        100.0 * scores.forward.accuracy,
        100.0 * scores.reversal.accuracy,
        scores
            .reversal_prompt
            .as_ref()
            .map(|a| format!(" (by the reversed template: {:.1}%)", 100.0 * a.accuracy))
            .unwrap_or_default()
    ));
    Ok((scores, parameters))
}
