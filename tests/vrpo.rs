//! VRPO (preference optimisation) on the golden checkpoint (`LLADA_GOLDEN_DIR`): at the start the
//! policy is its reference (loss log 2 to the bit with shared noise); antithetic sampling lowers
//! the variance of the loss estimate; a run resumes exactly, with LoRA and with every weight,
//! and activation checkpointing changes nothing; training raises the reward margin; malformed
//! preference records are refused naming their line; the CLI runs, logs and plots it.

mod common;

use std::path::Path;

use common::*;
use llada::candle_core::{Device, Tensor};
use llada::diffusion::vrpo::VrpoSettings;
use llada::model::lora::{LoraSettings, TARGETS};
use llada::train::data::{self, DataKind, PrepareOptions};
use llada::train::trainer::{TrainConfig, Trainer};
use llada::Rng;

fn vrpo_config(dir: &Path, out: &str, steps: usize) -> TrainConfig {
    TrainConfig {
        eval_every: 0,
        batch_size: 2,
        lr: 5e-3,
        vrpo: VrpoSettings {
            timesteps: 2,
            ..Default::default()
        },
        lora: Some(LoraSettings {
            rank: 4,
            alpha: 8.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        }),
        ..small_run(
            dir,
            dataset(dir, DataKind::Preference),
            out,
            steps,
            DataKind::Preference,
        )
    }
}

/// Sets every B of the adapter to small seeded values: a policy that differs from its reference
/// as a trained one does.
fn perturb(t: &Trainer, scale: f32) {
    let mut rng = Rng::new(11);
    for (name, v) in &t.trainable.vars {
        if name.ends_with("lora_B.weight") {
            let n: usize = v.dims().iter().product();
            let x: Vec<f32> = (0..n).map(|_| scale * rng.normal() as f32).collect();
            v.set(&Tensor::from_vec(x, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn at_the_start_the_policy_is_its_reference() {
    let d = tempfile::tempdir().unwrap();
    let lora = Trainer::new(vrpo_config(d.path(), "lora", 1), &Device::Cpu).unwrap();
    let mut full_cfg = vrpo_config(d.path(), "full", 1);
    full_cfg.lora = None;
    full_cfg.vrpo.full_weights = true;
    let full = Trainer::new(full_cfg, &Device::Cpu).unwrap();
    let mut indep_cfg = vrpo_config(d.path(), "indep", 1);
    indep_cfg.vrpo.antithetic = false;
    let indep = Trainer::new(indep_cfg, &Device::Cpu).unwrap();
    let (x0, pl) = lora.preference_pairs(3).unwrap();
    assert_eq!(x0.len(), 6);
    for seed in 0..3 {
        for (name, t) in [("lora", &lora), ("full weights", &full)] {
            let (loss, st) = t.vrpo_estimate(&x0, &pl, &mut Rng::new(seed)).unwrap();
            // every log-ratio is exactly 0: the loss is −log σ(0) = log 2
            assert_eq!(loss as f32, std::f32::consts::LN_2, "{name}, seed {seed}");
            assert_eq!(st.reward_margin, 0.0, "{name}");
            assert_eq!(st.reward_accuracy, 0.0, "{name}: no pair is strictly ahead");
        }
        // with independent noise the two estimates differ: the loss is not log 2
        let (loss, _) = indep.vrpo_estimate(&x0, &pl, &mut Rng::new(seed)).unwrap();
        assert!((loss - std::f64::consts::LN_2).abs() > 1e-4, "{loss}");
    }
    // the adapter-off reference really is the base: a perturbed policy moves the rewards
    perturb(&lora, 0.05);
    let (_, st) = lora.vrpo_estimate(&x0, &pl, &mut Rng::new(0)).unwrap();
    assert!(st.reward_chosen != 0.0 && st.reward_rejected != 0.0);
}

/// The variance of the loss estimate over seeds, for a policy a little away from its reference.
fn loss_variance(t: &Trainer, x0: &[Vec<u32>], pl: &[usize], seeds: u64) -> f64 {
    let v: Vec<f64> = (0..seeds)
        .map(|s| t.vrpo_estimate(x0, pl, &mut Rng::new(1000 + s)).unwrap().0)
        .collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64
}

#[test]
fn antithetic_sampling_lowers_the_variance_of_the_loss() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = vrpo_config(d.path(), "anti", 1);
    cfg.vrpo.beta = 1.0;
    let anti = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    cfg.out = d.path().join("indep");
    cfg.vrpo.antithetic = false;
    let indep = Trainer::new(cfg, &Device::Cpu).unwrap();
    perturb(&anti, 0.02);
    perturb(&indep, 0.02);
    let (x0, pl) = anti.preference_pairs(4).unwrap();
    let (va, vi) = (
        loss_variance(&anti, &x0, &pl, 24),
        loss_variance(&indep, &x0, &pl, 24),
    );
    eprintln!(
        "variance of the VRPO loss estimate over 24 seeds: antithetic {va:.3e}, independent {vi:.3e}, ratio {:.1}",
        vi / va
    );
    assert!(va > 0.0, "a perturbed policy's estimate still varies");
    assert!(
        vi > 10.0 * va,
        "antithetic {va:e} should be far below independent {vi:e}"
    );
}

#[test]
fn a_vrpo_run_resumes_exactly_and_checkpointing_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    for full_weights in [false, true] {
        let tag = if full_weights { "full" } else { "lora" };
        let mut cfg = vrpo_config(d.path(), &format!("{tag}-4"), 4);
        if full_weights {
            cfg.lora = None;
            cfg.vrpo.full_weights = true;
            cfg.lr = 1e-4;
        }
        let mut whole = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        let mut steps = Vec::new();
        whole
            .run(&mut |r| steps.push((r.loss, r.grad_norm, r.rewards)))
            .unwrap();
        assert!(steps.iter().all(|s| s.2.is_some()), "{tag}: rewards logged");
        assert!(steps.iter().all(|s| s.1 > 0.0), "{tag}: the policy moves");

        let mut ck = cfg.clone();
        ck.out = d.path().join(format!("{tag}-ckpt"));
        ck.checkpoint_activations = true;
        let mut c = Trainer::new(ck, &Device::Cpu).unwrap();
        let mut csteps = Vec::new();
        c.run(&mut |r| csteps.push((r.loss, r.grad_norm, r.rewards)))
            .unwrap();
        assert_eq!(steps, csteps, "{tag}: checkpointed steps");
        assert!(
            var_bits(&whole) == var_bits(&c),
            "{tag}: checkpointed weights"
        );

        let mut first = cfg.clone();
        first.out = d.path().join(format!("{tag}-split"));
        first.steps = 2;
        let mut t = Trainer::new(first, &Device::Cpu).unwrap();
        t.run(&mut |_| {}).unwrap();
        drop(t);
        let mut resumed = Trainer::resume(
            &d.path().join(format!("{tag}-split")),
            Some(4),
            &Device::Cpu,
        )
        .unwrap();
        let mut rsteps = Vec::new();
        resumed
            .run(&mut |r| rsteps.push((r.loss, r.grad_norm, r.rewards)))
            .unwrap();
        assert_eq!(&steps[2..], &rsteps[..], "{tag}: steps 3–4 after a resume");
        assert!(
            var_bits(&whole) == var_bits(&resumed),
            "{tag}: 2 + resume + 2 steps differ from 4 steps"
        );
    }
}

#[test]
fn training_raises_the_reward_margin() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = vrpo_config(d.path(), "learn", 12);
    cfg.lr = 1e-2;
    cfg.grad_accum = 1;
    cfg.vrpo.beta = 0.5;
    cfg.steps = 20;
    cfg.batch_size = 4;
    let ds = data::Dataset::open(&cfg.data).unwrap();
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
    // the training pairs (6 distinct ones, repeated), the loss and margin averaged over 8 noise
    // draws of the estimator
    let batch = data::Reader::new(&ds, &ds.train, 32, 0, Default::default())
        .unwrap()
        .next_batch(12);
    let (x0, pl) = (batch.x0, batch.prompt_lengths.unwrap());
    let mean = |t: &Trainer| {
        let v: Vec<(f64, f64)> = (0..8)
            .map(|s| {
                let (l, st) = t.vrpo_estimate(&x0, &pl, &mut Rng::new(s)).unwrap();
                (l, st.reward_margin)
            })
            .collect();
        (
            v.iter().map(|x| x.0).sum::<f64>() / 8.0,
            v.iter().map(|x| x.1).sum::<f64>() / 8.0,
        )
    };
    let before = mean(&t);
    t.run(&mut |_| {}).unwrap();
    let after = mean(&t);
    eprintln!("(loss, margin) before {before:?}, after {after:?}");
    // (the loss, a mean of a convex function of noisy margins, is too noisy on this random-weight
    // model to test; the margin is what DPO's gradient raises)
    assert_eq!(before.1, 0.0);
    assert!(
        after.1 > 0.1,
        "the chosen answers gained on the rejected ones: {after:?}"
    );
}

#[test]
fn malformed_preference_records_name_their_line() {
    let d = tempfile::tempdir().unwrap();
    let tok = llada::Tokenizer::open(&golden_dir()).unwrap();
    let opts = PrepareOptions {
        kind: DataKind::Preference,
        doc_per_line: false,
        val_fraction: 0.0,
        seed: 0,
        max_len: None,
    };
    let good = r#"{"prompt": "Who?", "chosen": "God.", "rejected": "Night."}"#;
    for (bad, want) in [
        (r#"{"prompt": "Who?", "chosen": "God."}"#, "rejected"),
        (
            r#"{"prompt": "Who?", "messages": [{"role": "user", "content": "Who?"}], "chosen": "a", "rejected": "b"}"#,
            "not both",
        ),
        (r#"{"chosen": "a", "rejected": "b"}"#, "no prompt"),
        (
            r#"{"prompt": "Who?", "chosen": " God. ", "rejected": "God."}"#,
            "the same answer",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "God."}], "chosen": "a", "rejected": "b"}"#,
            "must end with a user message",
        ),
        (
            r#"{"prompt": "Who?", "chosen": "", "rejected": "b"}"#,
            "non-empty",
        ),
        (
            r#"{"prompt": "Who?", "chosen": "a", "rejected": "b", "score": 1}"#,
            "unknown field",
        ),
        ("not json", "expected {\"prompt\""),
    ] {
        let f = d.path().join("p.jsonl");
        std::fs::write(&f, format!("{good}\n\n{bad}\n")).unwrap();
        let e = data::prepare(std::slice::from_ref(&f), &tok, &d.path().join("out"), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.jsonl:3:"), "{bad}: {e}");
        assert!(e.contains(want), "{bad}: {e}");
    }
    // a good file: pairs stored as two examples each, chosen first, one split per pair
    let f = d.path().join("ok.jsonl");
    std::fs::write(
        &f,
        format!(
            "{good}\n{}\n",
            r#"{"messages": [{"role": "user", "content": "Where?"}], "chosen": "Eden.", "rejected": "Egypt, the land of bondage."}"#
        ),
    )
    .unwrap();
    let h = data::prepare(&[f], &tok, &d.path().join("ok"), &opts).unwrap();
    assert_eq!(h.kind, DataKind::Preference);
    assert_eq!(h.train.examples, 4);
    let ds = data::Dataset::open(&d.path().join("ok")).unwrap();
    let (c, cpl) = ds.train.example(2);
    let (r, rpl) = ds.train.example(3);
    assert_eq!(cpl, rpl, "one prompt per pair");
    assert_eq!(c[..cpl], r[..rpl]);
    assert_eq!(
        tok.decode(&c[cpl..c.len() - 1], true).unwrap().trim(),
        "Eden."
    );
    assert!(tok
        .decode(&r[rpl..r.len() - 1], true)
        .unwrap()
        .contains("bondage"));
}

#[test]
fn a_seq_len_that_leaves_no_answer_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = vrpo_config(d.path(), "short", 1);
    cfg.seq_len = 8;
    let e = Trainer::new(cfg, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("seq_len=8") && e.contains("pair "), "{e}");
    assert!(
        !d.path().join("short").exists(),
        "refused before the run folder is made"
    );
    // a preference dataset must hold pairs: an odd example count is corrupt
    let data = d.path().join("data-Preference");
    let mut h: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("header.json")).unwrap()).unwrap();
    let n = h["train"]["examples"].as_u64().unwrap();
    let ex = std::fs::read(data.join("train.examples")).unwrap();
    std::fs::write(data.join("train.examples"), &ex[..ex.len() - 16]).unwrap();
    h["train"]["examples"] = (n - 1).into();
    std::fs::write(data.join("header.json"), h.to_string()).unwrap();
    let e = data::Dataset::open(&data).err().unwrap().to_string();
    assert!(e.contains("pairs") && e.contains("even"), "{e}");
}

#[test]
fn the_cli_trains_logs_and_plots_vrpo() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Preference);
    let golden = golden_dir();
    let out = d.path().join("run");
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "train",
            "--mode",
            "vrpo",
            "--init-from",
            golden.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--eval-every",
            "1",
            "--vrpo-timesteps",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let r = llada_cmd(&args(&["--beta", "0.2"])).run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(r.stderr.contains("LoRA adapter (rank 16"), "{}", r.stderr);
    assert!(
        r.stderr.contains("VRPO β 0.2 · budget 2×1 antithetic"),
        "{}",
        r.stderr
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!((lines[0]["eval_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    assert!(lines[0]["eval_rewards"]["reward_margin"].as_f64() == Some(0.0));
    assert!(lines[1]["rewards"]["reward_margin"].is_f64());
    assert!(lines[1]["eval_rewards"]["reward_accuracy"].is_f64());
    // the adapter is a PEFT adapter of the base: it loads with --adapter
    let ck = llada::train::trainer::latest_checkpoint(&out).unwrap();
    assert!(ck.join("adapter_config.json").exists());
    let plot = llada_cmd(&["plot", out.to_str().unwrap()]).run();
    assert!(plot.ok(), "{}", plot.stderr);
    assert!(out.join("curves.png").exists());
    // VRPO settings without the mode, and a bad β, are refused naming them
    let e = llada_cmd(&[
        "train",
        "--mode",
        "sft",
        "--init-from",
        golden.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--beta",
        "0.5",
    ])
    .run();
    assert!(!e.ok() && e.stderr.contains("--mode vrpo"), "{}", e.stderr);
    let e = llada_cmd(&args(&["--beta", "0", "--force"])).run();
    assert!(!e.ok() && e.stderr.contains("vrpo beta=0"), "{}", e.stderr);
    let e = llada_cmd(&args(&["--full-weights", "--lora-rank", "4", "--force"])).run();
    assert!(!e.ok() && e.stderr.contains("full_weights"), "{}", e.stderr);
    // the refusals left the run as it was
    assert!(llada::train::trainer::latest_checkpoint(&out).is_some());
}
