//! The trainer: exact resume, atomic checkpoints, data and configuration errors, the trained
//! tokenizer's format.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use llada::candle_core::Device;
use llada::train::data::{self, DataKind, PrepareOptions};
use llada::train::trainer::{latest_checkpoint, TrainConfig, Trainer};
use llada::Tokenizer;

const TEXT: &str = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void; and darkness was upon the face of the deep.\nAnd the Spirit of God moved upon the face of the waters.\nAnd God said, Let there be light: and there was light.\nAnd God saw the light, that it was good: and God divided the light from the darkness.\nAnd God called the light Day, and the darkness he called Night.\n";

fn dataset(dir: &Path, kind: DataKind) -> PathBuf {
    let tok = Tokenizer::open(&golden_dir()).unwrap();
    let f = dir.join(if kind == DataKind::Sft {
        "chat.jsonl"
    } else {
        "text.txt"
    });
    match kind {
        DataKind::Pretrain => std::fs::write(&f, TEXT.repeat(20)).unwrap(),
        DataKind::Sft => {
            let mut s = String::new();
            for (i, line) in TEXT.lines().enumerate() {
                s += &serde_json::json!({"messages": [{"role": "user", "content": format!("Verse {i}?")}, {"role": "assistant", "content": line}]}).to_string();
                s.push('\n');
            }
            std::fs::write(&f, s.repeat(5)).unwrap();
        }
    }
    let out = dir.join(format!("data-{kind:?}"));
    let opts = PrepareOptions {
        kind,
        doc_per_line: true,
        val_fraction: 0.2,
        seed: 1,
        max_len: None,
    };
    data::prepare(&[f], &tok, &out, &opts).unwrap();
    out
}

fn config(dir: &Path, data: PathBuf, out: &str, steps: usize, kind: DataKind) -> TrainConfig {
    TrainConfig {
        mode: kind,
        init_from: Some(golden_dir()),
        data,
        out: dir.join(out),
        seq_len: 32,
        batch_size: 4,
        grad_accum: 2,
        steps,
        lr: 1e-3,
        eval_every: 2,
        eval_batches: 1,
        save_every: 0,
        random_length_prob: 0.3,
        ..Default::default()
    }
}

fn weights(t: &Trainer) -> Vec<Vec<u32>> {
    t.model()
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(_, w)| {
            w.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        })
        .collect()
}

#[test]
fn resume_is_bit_exact() {
    for kind in [DataKind::Pretrain, DataKind::Sft] {
        let d = tempfile::tempdir().unwrap();
        let data = dataset(d.path(), kind);
        let mut full = Trainer::new(
            config(d.path(), data.clone(), "full", 6, kind),
            &Device::Cpu,
        )
        .unwrap();
        full.run(&mut |_| {}).unwrap();

        let mut first =
            Trainer::new(config(d.path(), data, "split", 3, kind), &Device::Cpu).unwrap();
        first.run(&mut |_| {}).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&d.path().join("split"), Some(6), &Device::Cpu).unwrap();
        assert_eq!(resumed.state.step, 3);
        resumed.run(&mut |_| {}).unwrap();
        assert_eq!(resumed.state.step, 6);
        assert!(
            weights(&full) == weights(&resumed),
            "{kind:?}: 3 + resume + 3 steps differ from 6 steps"
        );
        assert_eq!(full.state.cursor, resumed.state.cursor);
        // the training moved the weights
        let init = Trainer::new(
            config(d.path(), dataset(d.path(), kind), "init", 1, kind),
            &Device::Cpu,
        )
        .unwrap();
        assert!(weights(&init) != weights(&full));
    }
}

#[test]
fn run_folder_has_config_metrics_and_loadable_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Pretrain);
    let mut cfg = config(d.path(), data, "run", 4, DataKind::Pretrain);
    cfg.save_every = 2;
    cfg.keep_checkpoints = 1;
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
    // the run config exists before the first step
    assert!(d.path().join("run/train_config.json").exists());
    let last = t.run(&mut |_| {}).unwrap();
    assert_eq!(latest_checkpoint(&d.path().join("run")), Some(last.clone()));
    // only the newest checkpoint is kept
    let n = std::fs::read_dir(d.path().join("run/checkpoints"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("step-")
        })
        .count();
    assert_eq!(n, 1);
    // a checkpoint is a Hugging Face folder the engine loads
    let ck = llada::Checkpoint::load(&last, None, &Device::Cpu).unwrap();
    assert!(ck.tokenizer.is_some());
    let metrics = std::fs::read_to_string(d.path().join("run/metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 4);
    assert!(metrics.contains("eval_loss"));
    // the plot renders
    llada::train::plot::plot_run(&d.path().join("run"), &d.path().join("curves.png")).unwrap();
    assert!(
        std::fs::metadata(d.path().join("curves.png"))
            .unwrap()
            .len()
            > 1000
    );
}

#[test]
fn an_interrupted_checkpoint_leaves_the_last_good_one() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Pretrain);
    let mut t = Trainer::new(
        config(d.path(), data, "run", 2, DataKind::Pretrain),
        &Device::Cpu,
    )
    .unwrap();
    let good = t.run(&mut |_| {}).unwrap();
    // a kill mid-write leaves a temporary folder; `latest` still names the good checkpoint
    let tmp = d.path().join("run/checkpoints/.tmp-step-0000003-1");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    assert_eq!(latest_checkpoint(&d.path().join("run")), Some(good.clone()));
    let r = Trainer::resume(&d.path().join("run"), Some(3), &Device::Cpu).unwrap();
    assert_eq!(r.state.step, 2);
    // a corrupt checkpoint is a clear error on resume
    let f = good.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = Trainer::resume(&d.path().join("run"), Some(3), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let tok = Tokenizer::open(&golden_dir()).unwrap();
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let opts = PrepareOptions {
        kind: DataKind::Pretrain,
        doc_per_line: true,
        val_fraction: 0.0,
        seed: 0,
        max_len: None,
    };
    let e = data::prepare(&[empty], &tok, &d.path().join("x"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty corpus"), "{e}");
    let data = dataset(d.path(), DataKind::Pretrain);
    // sequence longer than the model supports (tiny: 256)
    let mut c = config(d.path(), data.clone(), "r1", 2, DataKind::Pretrain);
    c.seq_len = 512;
    let e = Trainer::new(c, &Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("seq_len=512") && e.contains("max_sequence_length"),
        "{e}"
    );
    // vocabulary mismatch: data made by a tokenizer larger than the model
    let cfg_path = d.path().join("small-vocab.json");
    let mut cfgv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("config.json")).unwrap())
            .unwrap();
    cfgv["vocab_size"] = 300.into();
    cfgv["embedding_size"] = 300.into();
    cfgv["mask_token_id"] = 299.into();
    cfgv["eos_token_id"] = 298.into();
    cfgv["pad_token_id"] = 298.into();
    std::fs::write(&cfg_path, cfgv.to_string()).unwrap();
    let mut c = config(d.path(), data.clone(), "r2", 2, DataKind::Pretrain);
    c.init_from = None;
    c.model_config = Some(cfg_path);
    let e = Trainer::new(c, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vocabulary mismatch"), "{e}");
    // mode mismatch
    let e = Trainer::new(
        config(d.path(), data.clone(), "r3", 2, DataKind::Sft),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("mode"), "{e}");
    // unwritable output folder
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let mut c = config(d.path(), data, "r4", 2, DataKind::Pretrain);
    c.out = blocker.join("run");
    assert!(Trainer::new(c, &Device::Cpu).is_err());
}

#[test]
fn trained_tokenizer_loads_like_a_published_one() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.txt");
    std::fs::write(&f, TEXT.repeat(50)).unwrap();
    let ids = llada::train::tokenizer::train_tokenizer(&[f], 300, &d.path().join("tok")).unwrap();
    assert_eq!(ids.vocab_size, 300);
    let tok = Tokenizer::open(&d.path().join("tok")).unwrap();
    let sp = tok.special();
    assert_eq!(
        (sp.mask, sp.eos, sp.eot, sp.bos),
        (ids.mask, ids.eos, Some(ids.eot), Some(ids.bos))
    );
    let text = tok
        .apply_chat_template(&[llada::Message::user("Hi")])
        .unwrap();
    assert!(
        text.starts_with("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    );
    let enc = tok.encode("And God said, Let there be light").unwrap();
    assert_eq!(
        tok.decode(&enc, false).unwrap(),
        "And God said, Let there be light"
    );
    assert_eq!(tok.encode("<|mdm_mask|>").unwrap(), vec![ids.mask]);
}
