//! The two models: the tokenizer and data they share, the diffusion model's configuration and its
//! causal twin's, and their training with equal budgets (no weight decay: the task is
//! memorisation).

use std::path::{Path, PathBuf};

use super::ReversalConfig;
use crate::checkpoint::Checkpoint;
use crate::config::LladaConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::train::data::{DataKind, PrepareOptions};
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::tokenizer::TrainedIds;
use crate::train::{ObjectiveKind, TrainConfig, Trainer};

/// What both models train from, in the experiment's folder.
pub(super) struct Prepared {
    pub dir: PathBuf,
    pub tok_dir: PathBuf,
    pub data_dir: PathBuf,
    /// The model both share (the twin only turns on the causal mask).
    pub base: LladaConfig,
}

/// Trains a tokenizer on the corpus (`dir/tokenizer`), tokenizes the corpus one document per line
/// (`dir/data`) and sizes the model to the tokenizer.
pub(super) fn prepare(cfg: &ReversalConfig, dir: &Path, corpus: PathBuf) -> Result<Prepared> {
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
    Ok(Prepared {
        dir: dir.to_path_buf(),
        tok_dir,
        data_dir,
        base: base_model(cfg, &ids),
    })
}

/// The diffusion model's configuration: the settings' shape over the tokenizer's vocabulary.
fn base_model(cfg: &ReversalConfig, ids: &TrainedIds) -> LladaConfig {
    LladaConfig {
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
    }
}

/// Trains one model with `objective` (its files named by `label`: `label-config.json`, the run in
/// `label/`) and loads its final checkpoint; also returns its parameter count.
pub(super) fn train(
    cfg: &ReversalConfig,
    prepared: &Prepared,
    label: &str,
    objective: ObjectiveKind,
    threads_note: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(Checkpoint, u64)> {
    let model_cfg = LladaConfig {
        causal_attention: objective == ObjectiveKind::Autoregressive,
        ..prepared.base.clone()
    };
    let cfg_path = prepared.dir.join(format!("{label}-config.json"));
    let text = serde_json::to_string_pretty(&model_cfg).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        source: e,
    })?;
    crate::weights::atomic_write(&cfg_path, text.as_bytes())?;
    let parameters = model_cfg.resolve()?.parameter_count();
    let run_dir = prepared.dir.join(label);
    let tc = train_config(cfg, prepared, objective, cfg_path, run_dir);
    log(&format!(
        "training the {label} model ({parameters} parameters, {} steps, {threads_note})",
        cfg.steps
    ));
    let t = std::time::Instant::now();
    // a rerun replaces the earlier run's checkpoints; nothing else in the folder is removed
    let mut trainer = Trainer::start(tc, &candle_core::Device::Cpu, true)?;
    let mut last = 0.0;
    let ck_dir = trainer.run(&mut |r| {
        last = r.loss;
    })?;
    log(&format!(
        "  done in {:.0} s, final loss {last:.3}",
        t.elapsed().as_secs_f64()
    ));
    let ck = Checkpoint::load(&ck_dir, None, &candle_core::Device::Cpu)?;
    Ok((ck, parameters))
}

/// The training run of one model: pretraining on the prepared data with a warmup-stable-decay
/// schedule, no evaluation, one checkpoint at the end.
fn train_config(
    cfg: &ReversalConfig,
    prepared: &Prepared,
    objective: ObjectiveKind,
    model_config: PathBuf,
    out: PathBuf,
) -> TrainConfig {
    TrainConfig {
        mode: DataKind::Pretrain,
        objective,
        model_config: Some(model_config),
        tokenizer: Some(prepared.tok_dir.clone()),
        data: prepared.data_dir.clone(),
        out,
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
    }
}
