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

pub use data::{documents, make_pairs, query, shuffled_copies, words, Pair, Probe, CORPUS_COPIES};
pub use eval::{evaluate, exact_match, Answerer, DirectionScores};
pub use plot::plot;
pub use poems::{load_poems, poem_accuracy, Poem, PoemConfig};

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::LladaConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::train::data::{DataKind, PrepareOptions};
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::{ObjectiveKind, TrainConfig, Trainer};

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

    let tok_dir = dir.join("tokenizer");
    let ids =
        crate::train::tokenizer::train_tokenizer(std::slice::from_ref(&corpus), 512, &tok_dir)?;
    let tok = Tokenizer::open(&tok_dir)?;
    let data_dir = dir.join("data");
    crate::train::data::prepare(
        &[corpus],
        &tok,
        &data_dir,
        &PrepareOptions {
            kind: DataKind::Pretrain,
            doc_per_line: true,
            val_fraction: 0.0,
            seed: cfg.seed,
            max_len: None,
        },
    )?;
    let base = LladaConfig {
        d_model: cfg.d_model,
        n_layers: cfg.n_layers,
        n_heads: cfg.n_heads,
        n_kv_heads: Some(cfg.n_heads),
        mlp_hidden_size: Some(3 * cfg.d_model),
        vocab_size: ids.vocab_size,
        embedding_size: Some(ids.vocab_size),
        mask_token_id: Some(ids.mask),
        eos_token_id: Some(ids.eos),
        pad_token_id: Some(ids.eos),
        max_sequence_length: cfg.seq_len.max(64),
        rope_theta: 10000.0,
        ..LladaConfig::default()
    };
    let mut scores = Vec::new();
    let mut parameters = 0;
    for (label, objective) in [
        ("diffusion", ObjectiveKind::Diffusion),
        ("autoregressive", ObjectiveKind::Autoregressive),
    ] {
        let model_cfg = LladaConfig {
            causal_attention: objective == ObjectiveKind::Autoregressive,
            ..base.clone()
        };
        let cfg_path = dir.join(format!("{label}-config.json"));
        let text = serde_json::to_string_pretty(&model_cfg).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        crate::weights::atomic_write(&cfg_path, text.as_bytes())?;
        parameters = model_cfg.resolve()?.parameter_count();
        let run_dir = dir.join(label);
        let _ = std::fs::remove_dir_all(&run_dir);
        let tc = TrainConfig {
            mode: DataKind::Pretrain,
            objective,
            model_config: Some(cfg_path),
            tokenizer: Some(tok_dir.clone()),
            data: data_dir.clone(),
            out: run_dir.clone(),
            seq_len: cfg.seq_len,
            batch_size: cfg.batch_size,
            steps: cfg.steps,
            lr: cfg.lr,
            schedule: Schedule::Wsd {
                warmup: cfg.steps / 20,
                decay_fraction: 0.2,
                min_ratio: 0.1,
            },
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 1,
            random_length_prob: 0.0,
            // memorisation: no weight decay pulling the facts out of either model
            optimizer: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            seed: cfg.seed,
            ..TrainConfig::default()
        };
        log(&format!(
            "training the {label} model ({parameters} parameters, {} steps, {threads_note})",
            cfg.steps
        ));
        let t = std::time::Instant::now();
        let mut trainer = Trainer::new(tc, &candle_core::Device::Cpu)?;
        let mut last = 0.0;
        let ck_dir = trainer.run(&mut |r| {
            last = r.loss;
        })?;
        log(&format!(
            "  done in {:.0} s, final loss {last:.3}",
            t.elapsed().as_secs_f64()
        ));
        let ck = Checkpoint::load(&ck_dir, None, &candle_core::Device::Cpu)?;
        let ar = objective == ObjectiveKind::Autoregressive;
        let forward = evaluate(&ck, test, Probe::Forward, ar)?;
        let prompted = evaluate(&ck, test, Probe::ReversalPrompt, ar)?;
        let scores_here = if ar {
            DirectionScores {
                forward,
                reversal: prompted,
                reversal_prompt: None,
            }
        } else {
            DirectionScores {
                forward,
                reversal: evaluate(&ck, test, Probe::ReversalInfill, ar)?,
                reversal_prompt: Some(prompted),
            }
        };
        log(&format!(
            "  {label}: forward {:.1}%, reversal {:.1}%{}",
            100.0 * scores_here.forward.accuracy,
            100.0 * scores_here.reversal.accuracy,
            scores_here
                .reversal_prompt
                .as_ref()
                .map(|a| format!(" (by the reversed template: {:.1}%)", 100.0 * a.accuracy))
                .unwrap_or_default()
        ));
        scores.push(scores_here);
    }
    let autoregressive = scores
        .pop()
        .ok_or_else(|| Error::setting("experiment", "", "no result"))?;
    let diffusion = scores
        .pop()
        .ok_or_else(|| Error::setting("experiment", "", "no result"))?;
    Ok(ReversalReport {
        config: cfg.clone(),
        diffusion,
        autoregressive,
        parameters,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
