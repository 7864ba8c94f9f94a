//! LoRA adapters, activation checkpointing and bf16 mixed precision, on the golden checkpoint
//! (`LLADA_GOLDEN_DIR`): a zero update is the base model; merged equals unmerged; the LoRA
//! gradient is the full gradient projected; checkpointed training is bit-exact; a LoRA run
//! resumes exactly and saves PEFT's format; a bf16 run's loss tracks the f32 one.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use llada::candle_core::{DType, Device, Tensor};
use llada::model::lora::{self, LoraSettings, PeftConfig, TARGETS};
use llada::model::FileWeights;
use llada::train::data::DataKind;
use llada::train::trainer::{Precision, TrainConfig, Trainer};
use llada::train::Trainable;
use llada::weights::SafetensorsFiles;
use llada::{Checkpoint, Llada, Rng};

fn base() -> Llada {
    let dir = golden_dir();
    let (_, cfg) = llada::checkpoint::read_config(&dir).unwrap();
    let files = SafetensorsFiles::open(&dir).unwrap();
    Llada::load(
        &cfg,
        &FileWeights {
            files: &files,
            dtype: DType::F32,
            device: &Device::Cpu,
        },
    )
    .unwrap()
}

fn settings(rank: usize) -> LoraSettings {
    LoraSettings {
        rank,
        alpha: 2.0 * rank as f64,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
    }
}

/// Token ids [2, 16] below the vocabulary, seeded.
fn ids(m: &Llada) -> Tensor {
    let v = m.config().vocab_size;
    let mut rng = Rng::new(7);
    let x: Vec<u32> = (0..32).map(|_| rng.below(v) as u32).collect();
    Tensor::from_vec(x, (2, 16), &Device::Cpu).unwrap()
}

fn all_positions() -> Tensor {
    Tensor::arange(0u32, 32, &Device::Cpu).unwrap()
}

/// Sets every B of the adapter to small seeded values (a trained-looking, non-zero update).
fn randomise_b(t: &Trainable) {
    for (i, (name, v)) in t.vars.iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let r = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
            let _ = i;
            v.set(&r).unwrap();
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    max_diff(t, &t.zeros_like().unwrap())
}

#[test]
fn a_zero_update_is_the_base_model_to_the_bit() {
    let m = base();
    let full = Trainable::from_llada(&m).unwrap();
    let lo = Trainable::with_lora(&m, &settings(4), DType::F32, 0).unwrap();
    // only the factors train: 2 per target per block
    assert_eq!(lo.vars.len(), 2 * TARGETS.len() * m.config().n_layers);
    let (ids, pos) = (ids(&m), all_positions());
    let a = full.model.forward_train_positions(&ids, &pos).unwrap();
    let b = lo.model.forward_train_positions(&ids, &pos).unwrap();
    assert_eq!(tensor_bits(&a), tensor_bits(&b), "training forward");
    let a = full.model.forward(&ids, None).unwrap();
    let b = lo.model.forward(&ids, None).unwrap();
    assert_eq!(tensor_bits(&a), tensor_bits(&b), "inference forward");
}

#[test]
fn merged_equals_unmerged_and_the_adapter_loads_three_ways() {
    let m = base();
    let s = settings(4);
    let lo = Trainable::with_lora(&m, &s, DType::F32, 3).unwrap();
    randomise_b(&lo);
    let d = tempfile::tempdir().unwrap();
    let ad = d.path().join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    let golden = std::fs::canonicalize(golden_dir()).unwrap();
    lora::save(
        &ad,
        &PeftConfig::for_training(&s, &golden.to_string_lossy()),
        &lo.lora_updates(),
    )
    .unwrap();
    let ids = ids(&m);
    let unmerged = lo.model.forward(&ids, None).unwrap();
    let base_logits = m.forward(&ids, None).unwrap();
    // merged at load
    let ck =
        Checkpoint::load_with_adapter(&golden, Some(DType::F32), &Device::Cpu, Some(&ad)).unwrap();
    let merged = ck.model.forward(&ids, None).unwrap();
    let scale = max_abs(&unmerged).max(1.0);
    let diff = max_diff(&merged, &unmerged);
    assert!(diff <= 1e-4 * scale, "merged vs unmerged: {diff}");
    // the update is visible (the test can fail)
    assert!(max_diff(&base_logits, &unmerged) > 100.0 * diff.max(1e-6));
    // the adapter folder alone loads its base model (base_model_name_or_path)
    let alone = Checkpoint::load(&ad, Some(DType::F32), &Device::Cpu).unwrap();
    assert_eq!(
        tensor_bits(&alone.model.forward(&ids, None).unwrap()),
        tensor_bits(&merged)
    );
    // `llada lora merge` writes the same weights
    let out = d.path().join("merged");
    lora::merge(&golden, &ad, &out).unwrap();
    let written = Checkpoint::load(&out, Some(DType::F32), &Device::Cpu).unwrap();
    let stored_f32 = written.stored_dtype == "f32";
    let w = written.model.forward(&ids, None).unwrap();
    if stored_f32 {
        assert_eq!(tensor_bits(&w), tensor_bits(&merged));
    } else {
        // a bf16 checkpoint is merged in f32 and rounded once to bf16
        assert!(max_diff(&w, &merged) <= 5e-2 * scale);
    }
    // in bf16 the adapter is merged into the stored values and rounded once, as the merged
    // checkpoint loaded in bf16
    if stored_f32 {
        let a = Checkpoint::load_with_adapter(&golden, Some(DType::BF16), &Device::Cpu, Some(&ad))
            .unwrap();
        let b = Checkpoint::load(&out, Some(DType::BF16), &Device::Cpu).unwrap();
        assert_eq!(
            tensor_bits(&a.model.forward(&ids, None).unwrap()),
            tensor_bits(&b.model.forward(&ids, None).unwrap())
        );
    }
    // into a folder that is not empty: refused, nothing touched
    let e = lora::merge(&golden, &ad, &out).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn the_lora_gradient_is_the_full_gradient_projected() {
    let m = base();
    let s = settings(3);
    let lo = Trainable::with_lora(&m, &s, DType::F32, 5).unwrap();
    randomise_b(&lo);
    // the dense model of the merged weights W + s·B·A, every weight trainable
    let merged: HashMap<String, Tensor> = lo.model.named_tensors().unwrap().into_iter().collect();
    let dense = Trainable::from_llada(&Llada::load(m.config(), &merged).unwrap()).unwrap();
    let (ids, pos) = (ids(&m), all_positions());
    let v = m.config().vocab_size;
    let r = Tensor::randn(0f32, 1.0, (32, v), &Device::Cpu).unwrap();
    let loss = |t: &Trainable| {
        let logits = t.model.forward_train_positions(&ids, &pos).unwrap();
        (logits * &r).unwrap().sum_all().unwrap()
    };
    let g_lora = lo.gradients(&loss(&lo)).unwrap();
    let g_full = dense.gradients(&loss(&dense)).unwrap();
    let full: HashMap<&str, &Tensor> = dense
        .vars
        .iter()
        .zip(&g_full)
        .map(|((n, _), g)| (n.as_str(), g))
        .collect();
    let (_, ups) = lo.lora.as_ref().unwrap();
    for (w, ia, ib) in ups {
        let g = full[w.as_str()]; // [out, in]
        let a = lo.vars[*ia].1.as_tensor();
        let b = lo.vars[*ib].1.as_tensor();
        // dL/dA = s·Bᵀ·G, dL/dB = s·G·Aᵀ
        let da = (b.t().unwrap().matmul(g).unwrap() * s.scale()).unwrap();
        let db = (g.matmul(&a.t().unwrap()).unwrap() * s.scale()).unwrap();
        for (what, got, want) in [("A", &g_lora[*ia], &da), ("B", &g_lora[*ib], &db)] {
            let err = max_diff(got, want);
            let size = max_abs(want);
            assert!(
                size > 0.0 && err <= 2e-3 * size,
                "{w} {what}: max error {err} of {size}"
            );
        }
    }
}

fn run_config(dir: &Path, out: &str, steps: usize, kind: DataKind) -> TrainConfig {
    TrainConfig {
        eval_every: 0,
        ..small_run(dir, dataset(dir, kind), out, steps, kind)
    }
}

/// Runs a trainer, returning the (loss, gradient norm) of every step.
fn run(t: &mut Trainer) -> Vec<(f64, f64)> {
    let mut v = Vec::new();
    t.run(&mut |r| v.push((r.loss, r.grad_norm))).unwrap();
    v
}

#[test]
fn activation_checkpointing_gives_the_same_steps_to_the_bit() {
    let d = tempfile::tempdir().unwrap();
    for (kind, lora) in [
        (DataKind::Pretrain, None),
        (DataKind::Sft, None),
        (DataKind::Sft, Some(settings(4))),
    ] {
        let mut plain = run_config(d.path(), "plain", 2, kind);
        plain.lora = lora.clone();
        let mut ckpt = plain.clone();
        ckpt.out = d.path().join("ckpt");
        ckpt.checkpoint_activations = true;
        let mut a = Trainer::start(plain, &Device::Cpu, true).unwrap();
        let mut b = Trainer::start(ckpt, &Device::Cpu, true).unwrap();
        let (sa, sb) = (run(&mut a), run(&mut b));
        assert_eq!(sa, sb, "{kind:?} lora={}: losses and norms", lora.is_some());
        assert!(
            var_bits(&a) == var_bits(&b),
            "{kind:?} lora={}: weights after 2 steps",
            lora.is_some()
        );
    }
}

#[test]
fn a_lora_run_resumes_exactly_and_saves_peft_format() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = run_config(d.path(), "full", 4, DataKind::Sft);
    cfg.lora = Some(settings(4));
    let mut full = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    run(&mut full);
    let mut first = cfg.clone();
    first.out = d.path().join("split");
    first.steps = 2;
    let mut t = Trainer::new(first, &Device::Cpu).unwrap();
    run(&mut t);
    let at2 = var_bits(&t);
    drop(t);
    let mut resumed = Trainer::resume(&d.path().join("split"), Some(4), &Device::Cpu).unwrap();
    assert_eq!(resumed.state.step, 2);
    assert!(var_bits(&resumed) == at2, "the adapter reloads to the bit");
    run(&mut resumed);
    assert!(
        var_bits(&full) == var_bits(&resumed),
        "2 + resume + 2 steps differ from 4 steps"
    );
    // the training moved the adapter: B is no longer 0
    let b: f32 = full
        .trainable
        .vars
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(_, v)| max_abs(v.as_tensor()))
        .fold(0.0, f32::max);
    assert!(b > 0.0);

    // the checkpoint: PEFT's files, the adapter only
    let ck = llada::train::trainer::latest_checkpoint(&d.path().join("full")).unwrap();
    assert!(!ck.join("model.safetensors").exists());
    assert!(!ck.join("config.json").exists());
    let cfg_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["lora_alpha"], 8.0);
    assert_eq!(cfg_json["bias"], "none");
    let golden = std::fs::canonicalize(golden_dir()).unwrap();
    assert_eq!(
        cfg_json["base_model_name_or_path"],
        golden.to_string_lossy().as_ref()
    );
    // PEFT full-matches target_modules against module names: the block maps, not the head
    let re = cfg_json["target_modules"].as_str().unwrap().to_string();
    assert!(re.contains(r"\.blocks\.") && re.contains("q_proj") && re.contains("ff_out"));
    let files = SafetensorsFiles::open_file(&ck.join("adapter_model.safetensors")).unwrap();
    let names: Vec<&str> = files.names().collect();
    assert_eq!(
        names.len(),
        2 * TARGETS.len() * full.model().config().n_layers
    );
    assert!(names.iter().all(
        |n| n.starts_with("base_model.model.model.transformer.blocks.")
            && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
    ));
    // A is [r, in], B is [out, r]
    let q_a = files
        .shape("base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(q_a[0], 4);
    // the optimizer holds the adapter's moments only
    let moments = SafetensorsFiles::open_file(&ck.join("optimizer.safetensors")).unwrap();
    assert_eq!(moments.names().count(), 2 * names.len());
    // the checkpoint loads as a model: the base with the adapter merged
    let loaded = Checkpoint::load(&ck, Some(DType::F32), &Device::Cpu).unwrap();
    assert_eq!(loaded.adapter.as_deref(), Some(ck.as_path()));
    let ids = ids(full.model());
    let want = full.model().forward(&ids, None).unwrap();
    let got = loaded.model.forward(&ids, None).unwrap();
    assert!(max_diff(&got, &want) <= 1e-4 * max_abs(&want).max(1.0));
}

#[test]
fn a_bf16_run_tracks_the_f32_run() {
    let d = tempfile::tempdir().unwrap();
    for lora in [None, Some(settings(8))] {
        let mut f32_cfg = run_config(d.path(), "f32", 6, DataKind::Pretrain);
        f32_cfg.lora = lora.clone();
        f32_cfg.random_length_prob = 0.0;
        let mut bf16_cfg = f32_cfg.clone();
        bf16_cfg.out = d.path().join("bf16");
        bf16_cfg.precision = Precision::Bf16;
        let mut a = Trainer::start(f32_cfg, &Device::Cpu, true).unwrap();
        let mut b = Trainer::start(bf16_cfg, &Device::Cpu, true).unwrap();
        if lora.is_some() {
            // QLoRA-style: the frozen linear weights are held in bf16
            let named = b.model().named_tensors().unwrap();
            let q = named.iter().find(|(n, _)| n.ends_with("0.q_proj.weight"));
            assert_eq!(q.unwrap().1.dtype(), DType::BF16);
        }
        let (la, lb) = (run(&mut a), run(&mut b));
        for (i, ((x, _), (y, _))) in la.iter().zip(&lb).enumerate() {
            // bf16 rounding of the products: a percent, not a different curve
            assert!(
                (x - y).abs() <= 0.02 * x.abs(),
                "lora={} step {}: f32 loss {x}, bf16 loss {y}",
                lora.is_some(),
                i + 1
            );
        }
        // it is not f32 run twice
        assert!(la != lb, "the bf16 run computed in f32");
    }
}

/// The user's path: train an adapter from the CLI, generate with the run folder, with
/// `--adapter`, and with the merged checkpoint (the same answer three ways); clear errors.
#[test]
fn the_cli_trains_loads_and_merges_an_adapter() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Sft);
    let run_dir = d.path().join("run");
    let golden = golden_dir();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let r = llada_cmd(&[
        "train",
        "--mode",
        "sft",
        "--init-from",
        &s(&golden),
        "--data",
        &s(&data),
        "--out",
        &s(&run_dir),
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--lr",
        "0.05",
        "--checkpoint-activations",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("LoRA adapter (rank 4, α 8, q_proj,v_proj)")
            && r.stderr.contains("activation checkpointing"),
        "{}",
        r.stderr
    );
    let ids = "5,6,7,8";
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt-ids",
            ids,
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
            "--sampler",
            "reference",
            "--json",
        ];
        a.extend(extra);
        let r = llada_cmd(&a).run();
        assert!(r.ok(), "{a:?}: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
        v["generated_ids"].clone()
    };
    // `info` names the adapter merged at load
    let r = llada_cmd(&[
        "info",
        golden.to_str().unwrap(),
        "--adapter",
        run_dir.to_str().unwrap(),
    ])
    .run();
    assert!(
        r.ok() && r.stdout.contains("adapter") && r.stdout.contains("step-0000003"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let by_run = gen(&[run_dir.to_str().unwrap()]);
    let by_flag = gen(&[
        golden.to_str().unwrap(),
        "--adapter",
        run_dir.to_str().unwrap(),
    ]);
    assert_eq!(by_run, by_flag);
    let merged = d.path().join("merged");
    let r = llada_cmd(&[
        "lora",
        "merge",
        golden.to_str().unwrap(),
        run_dir.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(merged.join("config.json").exists() && merged.join("tokenizer.json").exists());
    if llada::Checkpoint::load(&merged, None, &Device::Cpu)
        .unwrap()
        .stored_dtype
        == "f32"
    {
        assert_eq!(gen(&[merged.to_str().unwrap()]), by_flag);
    }

    // errors name the value and the rule
    let bad = |args: &[&str], want: &str| {
        let r = llada_cmd(args).run();
        assert!(!r.ok() && r.stderr.contains(want), "{args:?}: {}", r.stderr);
    };
    bad(
        &[
            "generate",
            golden.to_str().unwrap(),
            "--prompt-ids",
            ids,
            "--adapter",
            d.path().to_str().unwrap(),
        ],
        "adapter_config.json not found",
    );
    bad(
        &[
            "train",
            "--mode",
            "sft",
            "--init-from",
            golden.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            d.path().join("x").to_str().unwrap(),
            "--lora-rank",
            "4",
            "--lora-targets",
            "q_proj,wq",
        ],
        "wq",
    );
    bad(
        &[
            "train",
            "--mode",
            "sft",
            "--init-from",
            golden.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            d.path().join("x").to_str().unwrap(),
            "--lora-rank",
            "0",
        ],
        "lora rank",
    );
    // an adapter of other shapes: the error names the weight
    let ck = llada::train::trainer::latest_checkpoint(&run_dir).unwrap();
    let other = d.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(
        ck.join("adapter_config.json"),
        other.join("adapter_config.json"),
    )
    .unwrap();
    let a = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
    let w = "model.transformer.blocks.0.q_proj.weight".to_string();
    let bytes = llada::weights::safetensors_bytes(&[
        (lora::peft_name(&w, "A"), a),
        (lora::peft_name(&w, "B"), b),
    ])
    .unwrap();
    std::fs::write(other.join("adapter_model.safetensors"), bytes).unwrap();
    bad(
        &[
            "generate",
            golden.to_str().unwrap(),
            "--prompt-ids",
            ids,
            "--adapter",
            other.to_str().unwrap(),
        ],
        "model.transformer.blocks.0.q_proj.weight",
    );
}

/// Settings a model refuses are refused before `--force` removes an earlier run; duplicate
/// targets and other architectures' names are errors naming the value.
#[test]
fn refusals_name_the_value_and_leave_an_earlier_run_intact() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = run_config(d.path(), "run", 1, DataKind::Sft);
    cfg.save_every = 1;
    Trainer::new(cfg.clone(), &Device::Cpu)
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    let before = llada::train::trainer::latest_checkpoint(&cfg.out).unwrap();
    let mut dup = cfg.clone();
    dup.lora = Some(LoraSettings {
        targets: vec!["q_proj".into(), "q_proj".into()],
        ..settings(4)
    });
    let e = Trainer::start(dup, &Device::Cpu, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("q_proj") && e.contains("twice"), "{e}");
    // a mixture-of-experts model: no activation checkpointing, no LoRA (other tensor names)
    let moe = repo_path("tests/golden/llada-moe");
    if moe.join("config.json").exists() {
        // a copy whose config names a mask id (the golden one leaves it to the tokenizer)
        let m = d.path().join("moe");
        std::fs::create_dir_all(&m).unwrap();
        for f in std::fs::read_dir(&moe).unwrap().flatten() {
            if f.path().is_file() {
                std::fs::copy(f.path(), m.join(f.file_name())).unwrap();
            }
        }
        let mut conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.join("config.json")).unwrap()).unwrap();
        let v = conf["vocab_size"].as_u64().unwrap();
        if conf.get("mask_token_id").is_none_or(|x| x.is_null()) {
            conf["mask_token_id"] = (v - 1).into();
        }
        std::fs::write(m.join("config.json"), conf.to_string()).unwrap();
        let mut c = cfg.clone();
        c.init_from = Some(m);
        c.checkpoint_activations = true;
        let e = Trainer::start(c.clone(), &Device::Cpu, true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("checkpoint_activations"), "{e}");
        c.checkpoint_activations = false;
        c.lora = Some(settings(4));
        let e = Trainer::start(c, &Device::Cpu, true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("LLaDA-8B's architecture"), "{e}");
    }
    // the earlier run is as it was
    assert_eq!(
        llada::train::trainer::latest_checkpoint(&cfg.out).unwrap(),
        before
    );
    assert!(before.join("model.safetensors").exists());
    assert!(cfg.out.join("metrics.jsonl").exists());
}
