//! LLaDA-MoE configurations the golden folder does not cover: dense layers (`moe_layer_freq` 0),
//! a shared expert, the router's expert bias, GQA, tied embeddings. Each is built with random
//! weights, written as a checkpoint, read back and compared; the expert-grouped kernel is checked
//! against the plain per-expert loop; the cached predictor against the uncached forward.

mod common;

use common::max_diff;

use llada::candle_core::{DType, Device, Tensor};
use llada::model::moe::Ffn;
use llada::model::{Architecture, MaskPredictor};
use llada::{Checkpoint, Model, RawConfig};

fn config(extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada",
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "expert_intermediate_size": 16, "dense_intermediate_size": 48,
        "num_experts": 6, "num_experts_per_tok": 2, "moe_layer_freq": [0, 1, 1],
        "qk_layernorm": true, "rope_theta": 50000, "rms_norm_eps": 1e-5, "vocab_size": 96,
        "eos_token_id": 1, "pad_token_id": 1, "mask_token_id": 95,
        "shared_expert_intermediate_size": null, "tie_word_embeddings": false,
        "max_position_embeddings": 128, "initializer_range": 0.2
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn build(v: &serde_json::Value) -> (RawConfig, Model) {
    let raw = RawConfig::from_value(v.clone(), std::path::Path::new("config.json")).unwrap();
    let cfg = raw.resolve().unwrap();
    let m = Architecture::from_name("LLaDAMoEModelLM")
        .unwrap()
        .init_random(&cfg, 7, DType::F32, &Device::Cpu)
        .unwrap();
    (raw, m)
}

fn ids(l: usize) -> Tensor {
    let v: Vec<u32> = (0..2 * l as u32).map(|i| (i * 31 + 7) % 95).collect();
    Tensor::from_vec(v, (2, l), &Device::Cpu).unwrap()
}

fn variants() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("dense + moe layers", serde_json::json!({})),
        (
            "shared expert",
            serde_json::json!({"shared_expert_intermediate_size": 24}),
        ),
        (
            "expert bias",
            serde_json::json!({"moe_router_enable_expert_bias": true}),
        ),
        ("gqa", serde_json::json!({"num_key_value_heads": 2})),
        ("tied", serde_json::json!({"tie_word_embeddings": true})),
        (
            "no qk norm",
            serde_json::json!({"qk_layernorm": false, "moe_layer_freq": [1, 1, 1]}),
        ),
    ]
}

/// Each variant written with `save_model` and loaded back as a checkpoint gives the same logits
/// (and the folder holds exactly the tensors of its specs).
#[test]
fn variants_round_trip_through_a_checkpoint() {
    let tmp = std::env::temp_dir().join(format!("llada-moe-variants-{}", std::process::id()));
    for (name, extra) in variants() {
        let (raw, m) = build(&config(extra));
        let dir = tmp.join(name.replace(' ', "_"));
        llada::checkpoint::save_model(&dir, &raw, &m).unwrap();
        let ck = Checkpoint::load(&dir, Some(DType::F32), &Device::Cpu).unwrap();
        assert_eq!(ck.model.architecture(), Architecture::LladaMoe, "{name}");
        let x = ids(11);
        let d = max_diff(
            &m.forward(&x, None).unwrap(),
            &ck.model.forward(&x, None).unwrap(),
        );
        assert!(d < 1e-5, "{name}: {d}");
        let files = llada::weights::SafetensorsFiles::open(&dir).unwrap();
        let mut names: Vec<String> = files.names().map(str::to_string).collect();
        names.sort();
        let mut specs: Vec<String> = llada::model::tensor_specs(ck.model.config())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        specs.sort();
        assert_eq!(names, specs, "{name}");
        // the config is written back under LLaDA-MoE's keys
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(text.contains("\"num_experts\""), "{name}: {text}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The expert-grouped kernel equals the per-expert loop over every token, for every variant.
#[test]
fn grouped_experts_equal_the_loop() {
    for (name, extra) in variants() {
        let (_, m) = build(&config(extra));
        let Model::Llada(l) = &m;
        let x = Tensor::from_vec(
            (0..13 * 32)
                .map(|i| ((i % 17) as f32 - 8.0) / 5.0)
                .collect::<Vec<_>>(),
            (13, 32),
            &Device::Cpu,
        )
        .unwrap();
        for b in &l.blocks {
            if let Ffn::Moe(moe) = &b.ffn {
                let grouped = moe.forward_add(&x, &x.zeros_like().unwrap()).unwrap();
                let plain = moe.forward_ungrouped(&x).unwrap();
                let d = max_diff(&grouped, &plain);
                assert!(d < 1e-5, "{name}: {d}");
            }
        }
    }
}

/// The dual and prefix caches recompute the block-start forward's logits on an unchanged
/// canvas, and a block-start call equals the full forward.
#[test]
fn cached_steps_agree_with_the_full_forward() {
    let (_, m) = build(&config(
        serde_json::json!({"shared_expert_intermediate_size": 24}),
    ));
    let x = ids(40);
    let full = m.forward(&x, None).unwrap().narrow(1, 16, 8).unwrap();
    for mode in [
        llada::sampler::CacheMode::Prefix,
        llada::sampler::CacheMode::Dual,
    ] {
        let mut p = m.predictor();
        p.begin_block(16..24, mode).unwrap();
        let first = p.logits(&x, None, 16..24).unwrap();
        let again = p.logits(&x, None, 16..24).unwrap();
        assert!(max_diff(&full, &first) < 1e-5, "{mode:?}");
        assert!(max_diff(&first, &again) < 1e-4, "{mode:?}");
    }
}

/// `mask_padding: true` (a llada extension) makes padded keys invisible: the real tokens' logits
/// then equal those of the unpadded sequence (RoPE scores depend on relative positions only); by
/// default padding is attended, as the official forward, and the mask changes nothing.
#[test]
fn mask_padding_is_an_opt_in() {
    let x: Vec<u32> = vec![5, 9, 13, 95, 95, 40];
    let padded: Vec<u32> = [vec![1u32, 1, 1], x.clone()].concat();
    let mask = Tensor::from_vec(vec![0u32, 0, 0, 1, 1, 1, 1, 1, 1], (1, 9), &Device::Cpu).unwrap();
    let p = Tensor::from_vec(padded, (1, 9), &Device::Cpu).unwrap();
    let alone = Tensor::from_vec(x, (1, 6), &Device::Cpu).unwrap();
    for opt_in in [false, true] {
        let (_, m) = build(&config(serde_json::json!({"mask_padding": opt_in})));
        let with = m.forward(&p, Some(&mask)).unwrap();
        let without = m.forward(&p, None).unwrap();
        let unpadded = m.forward(&alone, None).unwrap();
        let real = with.narrow(1, 3, 6).unwrap();
        if opt_in {
            assert!(max_diff(&real, &unpadded) < 1e-4, "the pads were seen");
        } else {
            assert_eq!(max_diff(&with, &without), 0.0, "the mask was not ignored");
            assert!(
                max_diff(&real, &unpadded) > 1e-3,
                "the pads changed nothing"
            );
        }
    }
}

/// With a non-zero expert bias (read from the checkpoint) the inference forward and the training
/// forward agree, and the bias changes the routing.
#[test]
fn a_nonzero_expert_bias_routes_and_trains_consistently() {
    let v = config(
        serde_json::json!({"moe_router_enable_expert_bias": true, "moe_layer_freq": [1, 1, 1]}),
    );
    let (raw, m) = build(&v);
    let cfg = raw.resolve().unwrap();
    let mut map: std::collections::HashMap<String, Tensor> =
        m.named_tensors().unwrap().into_iter().collect();
    for i in 0..3 {
        let name = format!("model.layers.{i}.mlp.expert_bias");
        let b = Tensor::from_vec(vec![0.0f32, 0.3, -0.2, 0.0, 0.5, 0.1], 6, &Device::Cpu).unwrap();
        map.insert(name, b);
    }
    let biased = llada::Llada::load(&cfg, &map).unwrap();
    let x = ids(10);
    let Model::Llada(plain) = &m;
    let route = |l: &llada::Llada| llada::model::llada_moe::routing(l, &x).unwrap();
    assert_ne!(
        route(plain),
        route(&biased),
        "the bias changed no expert choice"
    );
    let tr = llada::train::Trainable::from_llada(&biased).unwrap();
    let pos = Tensor::from_vec((0..10u32).collect::<Vec<_>>(), 10, &Device::Cpu).unwrap();
    let one = x.narrow(0, 0, 1).unwrap();
    let (train, _) = tr.model.forward_train_aux(&one, &pos).unwrap();
    let infer = biased.forward(&one, None).unwrap().squeeze(0).unwrap();
    assert!(max_diff(&train, &infer) < 1e-4);
    // the grouped kernel with the bias equals the per-expert loop
    let h = Tensor::from_vec(
        (0..9 * 32)
            .map(|i| ((i % 11) as f32 - 5.0) / 4.0)
            .collect::<Vec<_>>(),
        (9, 32),
        &Device::Cpu,
    )
    .unwrap();
    for b in &biased.blocks {
        if let Ffn::Moe(moe) = &b.ffn {
            let g = moe.forward_add(&h, &h.zeros_like().unwrap()).unwrap();
            assert!(max_diff(&g, &moe.forward_ungrouped(&h).unwrap()) < 1e-5);
        }
    }
}

/// `llada init` writes a LLaDA-MoE checkpoint from a config (expert bias starting at zero) that
/// every command loads.
#[test]
fn llada_init_writes_a_loadable_moe_checkpoint() {
    let tmp = std::env::temp_dir().join(format!("llada-moe-init-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let cfg = tmp.join("config.json");
    let v = config(serde_json::json!({"moe_router_enable_expert_bias": true}));
    std::fs::write(&cfg, serde_json::to_string(&v).unwrap()).unwrap();
    let out = tmp.join("ck");
    let r = common::llada_cmd(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let files = llada::weights::SafetensorsFiles::open(&out).unwrap();
    let bias = files
        .load(
            "model.layers.1.mlp.expert_bias",
            &[6],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(bias.to_vec1::<f32>().unwrap(), vec![0.0; 6]);
    let r = common::llada_cmd(&[
        "generate",
        out.to_str().unwrap(),
        "--prompt-ids",
        "5,9,13",
        "--gen-length",
        "8",
        "--steps",
        "4",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Training LLaDA-MoE (from the golden checkpoint): the steps move the weights, include the
/// load-balancing loss, resume bit for bit, and save checkpoints under LLaDA-MoE's names; without
/// a mask id in config.json the run is refused with an error saying what to add.
#[test]
fn training_llada_moe_resumes_exactly_and_saves_its_own_format() {
    use llada::train::data::{self, DataKind, PrepareOptions};
    use llada::train::trainer::{latest_checkpoint, TrainConfig, Trainer};
    let d = tempfile::tempdir().unwrap();
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llada-moe");
    let model = d.path().join("moe");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(&golden).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
        }
    }
    let text = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n".repeat(30);
    std::fs::write(d.path().join("t.txt"), text).unwrap();
    let tok = llada::Tokenizer::open(&model).unwrap();
    let data = d.path().join("data");
    let opts = PrepareOptions {
        kind: DataKind::Pretrain,
        doc_per_line: true,
        val_fraction: 0.2,
        seed: 1,
        max_len: None,
    };
    data::prepare(&[d.path().join("t.txt")], &tok, &data, &opts).unwrap();
    let cfg = |out: &str, steps: usize| TrainConfig {
        mode: DataKind::Pretrain,
        init_from: Some(model.clone()),
        data: data.clone(),
        out: d.path().join(out),
        seq_len: 32,
        batch_size: 4,
        steps,
        lr: 1e-3,
        eval_every: 0,
        save_every: 0,
        ..Default::default()
    };
    let err = Trainer::new(cfg("refused", 1), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mask_token_id") && err.contains("156895"),
        "{err}"
    );
    let path = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["mask_token_id"] = serde_json::json!(508);
    std::fs::write(&path, v.to_string()).unwrap();

    let weights = common::weight_bits;
    let mut full = Trainer::new(cfg("full", 3), &Device::Cpu).unwrap();
    full.run(&mut |_| {}).unwrap();
    let mut first = Trainer::new(cfg("split", 2), &Device::Cpu).unwrap();
    first.run(&mut |_| {}).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&d.path().join("split"), Some(3), &Device::Cpu).unwrap();
    resumed.run(&mut |_| {}).unwrap();
    assert!(
        weights(&full) == weights(&resumed),
        "2 + resume + 1 ≠ 3 steps"
    );
    let start = Trainer::new(cfg("start", 1), &Device::Cpu).unwrap();
    assert!(
        weights(&start) != weights(&full),
        "the steps moved the weights"
    );

    // the router's balance term is part of a step's loss: without it the step differs
    v["router_aux_loss_coef"] = serde_json::json!(0.0);
    std::fs::write(&path, v.to_string()).unwrap();
    let mut no_aux = Trainer::new(cfg("no-aux", 3), &Device::Cpu).unwrap();
    no_aux.run(&mut |_| {}).unwrap();
    assert!(
        weights(&no_aux) != weights(&full),
        "the aux loss changed nothing"
    );

    let ck = latest_checkpoint(&d.path().join("full")).unwrap();
    let loaded = Checkpoint::load(&ck, Some(DType::F32), &Device::Cpu).unwrap();
    assert_eq!(loaded.model.architecture(), Architecture::LladaMoe);
    let x = ids(9);
    let d2 = max_diff(
        &loaded.model.forward(&x, None).unwrap(),
        &full.model().forward(&x, None).unwrap(),
    );
    assert!(d2 < 1e-5, "{d2}");
}
