//! Golden tests of LLaDA-MoE (`LLaDAMoEModelLM`) against its official code, for any folder of the
//! `llada-moe` golden schema: `LLADA_MOE_GOLDEN_DIR` (default `tests/golden/llada-moe`, a copy of
//! `shared/golden/llada-moe`). Forward logits within 1e-4, the router's expert choices where its
//! top-k margin is not fragile, the original `generate()` grid and the Fast-dLLM threshold cases
//! token for token with equal model calls, the cache and early-stop properties, the training
//! forward, and the CLI.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use llada::candle_core::{DType, Device, Tensor};
use llada::model::{llada_moe, MaskPredictor};

/// The LLaDA-MoE golden folder.
fn moe_dir() -> PathBuf {
    match std::env::var_os("LLADA_MOE_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llada-moe"),
    }
}

fn moe(dtype: DType) -> &'static llada::Checkpoint {
    model_in(&moe_dir(), dtype)
}

/// The compute dtype of the folder's forward cases.
fn forward_dtype() -> DType {
    case_file_in(&moe_dir(), "forward.json")
        .map(|d| compute_dtype(&d["meta"]))
        .unwrap_or(DType::F32)
}

#[test]
fn the_folder_loads_as_llada_moe() {
    let ck = moe(DType::F32);
    assert_eq!(
        ck.model.architecture(),
        llada::model::Architecture::LladaMoe
    );
    let cfg = ck.model.config();
    assert!(cfg.moe.is_some(), "a mixture-of-experts config");
    // every tensor of the checkpoint was read: the tensor list is the checkpoint's
    let names: Vec<String> = llada::model::tensor_specs(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut ours = names.clone();
    ours.sort();
    let files = llada::weights::SafetensorsFiles::open(&moe_dir()).unwrap();
    let mut theirs: Vec<String> = files.names().map(str::to_string).collect();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn forward_logits_match_reference() {
    let dtype = forward_dtype();
    for device in devices() {
        let ck = if device.is_cpu() {
            moe(dtype)
        } else {
            Box::leak(Box::new(
                llada::Checkpoint::load(&moe_dir(), Some(dtype), &device).unwrap(),
            ))
        };
        golden::check_forward(&moe_dir(), ck, &device, dtype);
    }
}

/// Running the golden checkpoint in bf16 stays within the stated bf16 tolerance of the f32
/// reference logits (weights rounded to bf16 included; an expert choice may flip near a tie).
#[test]
fn forward_bf16_within_tolerance() {
    if forward_dtype() != DType::F32 {
        return;
    }
    golden::check_forward(&moe_dir(), moe(DType::BF16), &Device::Cpu, DType::BF16);
}

/// The router picks the reference's experts, in the reference's order, for every token of every
/// layer of every forward case whose router margin is not fragile.
#[test]
fn router_choices_match_reference() {
    let Some(doc) = case_file_in(&moe_dir(), "forward.json") else {
        return;
    };
    let ck = moe(forward_dtype());
    let llada::model::Model::Llada(m) = &ck.model;
    let mut checked = 0;
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let Some(want) = case.get("router_selected_experts").filter(|v| !v.is_null()) else {
            continue;
        };
        if case["router_fragile"].as_bool().unwrap_or(false) {
            continue;
        }
        let rows = ids2(&case["input_ids"]);
        let (b, l) = (rows.len(), rows[0].len());
        let ids = Tensor::from_vec(rows.concat(), (b, l), &Device::Cpu).unwrap();
        let ours = llada_moe::routing(m, &ids).unwrap();
        let want: Vec<Vec<Vec<Vec<u32>>>> = want.as_array().unwrap().iter().map(ids3).collect();
        assert_eq!(ours, want, "{name}: expert choices");
        checked += 1;
    }
    assert!(checked > 0);
}

fn ids3(v: &serde_json::Value) -> Vec<Vec<Vec<u32>>> {
    v.as_array().unwrap().iter().map(ids2).collect()
}

/// The official forward ignores the attention mask: a padded batch gives the same logits with
/// and without it (and the golden padded case records the same).
#[test]
fn the_attention_mask_is_ignored_as_the_official_forward() {
    let ck = moe(DType::F32);
    let ids = Tensor::from_vec(
        vec![507u32, 507, 40, 77, 258, 508, 508, 508],
        (1, 8),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::from_vec(vec![0u32, 0, 1, 1, 1, 1, 1, 1], (1, 8), &Device::Cpu).unwrap();
    let a = ck.model.forward(&ids, None).unwrap();
    let b = ck.model.forward(&ids, Some(&mask)).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(a), flat(b));
}

#[test]
fn generate_cases_match_reference() {
    golden::check_generate_cases(&moe_dir(), moe(DType::F32));
}

#[test]
fn fastdllm_cases_match_reference() {
    golden::check_fastdllm_cases(&moe_dir(), moe(DType::F32));
}

#[test]
fn cached_and_uncached_agree_where_they_must() {
    golden::check_cached_and_uncached_agree(moe(DType::F32));
}

#[test]
fn early_stop_keeps_the_answer() {
    golden::check_early_stop_keeps_the_answer(moe(DType::F32));
}

/// The expert-grouped kernel equals the plain per-expert loop (every expert over every token,
/// weighted where routed) on the golden checkpoint's layers.
#[test]
fn grouped_experts_equal_the_ungrouped_loop() {
    let ck = moe(DType::F32);
    let llada::model::Model::Llada(m) = &ck.model;
    let d = ck.model.config().d_model;
    for n in [1usize, 7, 50] {
        let x: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 30.0)
            .collect();
        let x = Tensor::from_vec(x, (n, d), &Device::Cpu).unwrap();
        for block in &m.blocks {
            let llada::model::moe::Ffn::Moe(moe) = &block.ffn else {
                continue;
            };
            let zero = x.zeros_like().unwrap();
            let grouped = moe.forward_add(&x, &zero).unwrap();
            let plain = moe.forward_ungrouped(&x).unwrap();
            let diff = max_diff(&grouped, &plain);
            assert!(diff < 1e-5, "n={n}: {diff}");
        }
    }
}

/// The training forward (dense weights, differentiable ops) computes the inference forward's
/// logits, and the load-balancing loss is finite and at least its minimum, 1 · k / k… (≥ k·(1/E)·E
/// only for a uniform router: here it is checked to lie in [0, E·k]).
#[test]
fn training_forward_equals_inference_forward() {
    let ck = moe(DType::F32);
    let tr = llada::train::Trainable::from_model(&ck.model).unwrap();
    let cfg = ck.model.config();
    let m = cfg.moe.as_ref().unwrap();
    for l in [7usize, 33] {
        let ids: Vec<u32> = (0..l as u32)
            .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
            .collect();
        let x = Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
        let a = ck.model.forward(&x, None).unwrap().squeeze(0).unwrap();
        let pos = Tensor::from_vec((0..l as u32).collect::<Vec<_>>(), l, &Device::Cpu).unwrap();
        let (b, aux) = tr.model.forward_train_aux(&x, &pos).unwrap();
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d <= 1e-4, "L={l}: max |inference − training| = {d}");
        let aux = aux
            .expect("a mixture of experts has an aux loss")
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            aux.is_finite() && aux > 0.0 && aux <= (m.num_experts * m.top_k) as f32,
            "{aux}"
        );
    }
}

/// A gradient reaches the router through the load-balancing loss and the expert weights.
#[test]
fn the_router_gets_a_gradient() {
    let ck = moe(DType::F32);
    let tr = llada::train::Trainable::from_model(&ck.model).unwrap();
    let x = Tensor::from_vec(
        (0..20u32).map(|i| i * 13 % 500).collect::<Vec<_>>(),
        (1, 20),
        &Device::Cpu,
    )
    .unwrap();
    let pos = Tensor::from_vec((0..20u32).collect::<Vec<_>>(), 20, &Device::Cpu).unwrap();
    let (logits, aux) = tr.model.forward_train_aux(&x, &pos).unwrap();
    let loss = (logits.sum_all().unwrap() * 1e-3 + aux.unwrap()).unwrap();
    let grads = tr.gradients(&loss).unwrap();
    for (i, (name, _)) in tr.vars.iter().enumerate() {
        if name.ends_with("mlp.gate.weight") {
            let g = grads[i]
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(g > 0.0, "{name}: no gradient");
        }
    }
}

/// `llada generate` prints the official `generated_ids` of the golden generate cases.
#[test]
fn the_cli_reproduces_generate_cases() {
    let Some(doc) = case_file_in(&moe_dir(), "generate.json") else {
        return;
    };
    let mut ran = 0;
    for case in doc["cases"].as_array().unwrap() {
        let batch1 = case["prompt_ids"].as_array().unwrap().len() == 1;
        if fragile(case) || !batch1 || ran >= 3 {
            continue;
        }
        if case["logits_eos_inf"].as_bool().unwrap_or(false)
            || case["confidence_eos_eot_inf"].as_bool().unwrap_or(false)
        {
            continue;
        }
        let prompt = ids2(&case["prompt_ids"])[0]
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let num = |k: &str| case[k].as_f64().unwrap().to_string();
        let dir = moe_dir();
        let args = vec![
            "generate".to_string(),
            dir.display().to_string(),
            "--sampler".into(),
            "reference".into(),
            "--prompt-ids".into(),
            prompt,
            "--gen-length".into(),
            num("gen_length"),
            "--steps".into(),
            num("steps"),
            "--block-length".into(),
            num("block_length"),
            "--cfg-scale".into(),
            num("cfg_scale"),
            "--temperature".into(),
            "0".into(),
            "--json".into(),
        ];
        let run = llada_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()).run();
        assert!(run.ok(), "{}: {}", case["name"], run.stderr);
        let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        assert_eq!(
            vec![ids1(&v["generated_ids"])],
            ids2(&case["generated_ids"]),
            "{}",
            case["name"]
        );
        ran += 1;
    }
    assert!(ran > 0);
}

/// A dual-cache predictor's block-start call is the full forward (it fills the caches), and a
/// cached step on an unchanged canvas recomputes the same logits.
#[test]
fn dual_cache_first_step_equals_the_full_forward() {
    let ck = moe(DType::F32);
    let ids: Vec<u32> = (0..40u32)
        .map(|i| if i >= 24 { 508 } else { (i * 29 + 3) % 500 })
        .collect();
    let x = Tensor::from_vec(ids, (1, 40), &Device::Cpu).unwrap();
    let full = ck
        .model
        .forward(&x, None)
        .unwrap()
        .narrow(1, 24, 8)
        .unwrap();
    let mut p = ck.model.predictor();
    p.begin_block(24..32, llada::sampler::CacheMode::Dual)
        .unwrap();
    let first = p.logits(&x, None, 24..32).unwrap();
    let second = p.logits(&x, None, 24..32).unwrap();
    // the same computation but for the last layer's feed-forward rows (the experts then see
    // fewer tokens: products of other shapes)
    let d = max_diff(&full, &first);
    assert!(d < 1e-5, "block-start step vs full forward: {d}");
    // nothing changed on the canvas: the cached step recomputes the same logits
    let d = max_diff(&first, &second);
    assert!(d < 1e-4, "cached step: {d}");
}

/// Every command runs on LLaDA-MoE: info (experts, active parameters), infill, score, and the
/// bench's cached step.
#[test]
fn the_commands_run_on_llada_moe() {
    let dir = moe_dir();
    let d = dir.to_str().unwrap();
    let r = llada_cmd(&["info", d, "--json"]).run();
    assert!(r.ok(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["architecture"], "LLaDAMoEModelLM");
    assert!(v["experts"]["num_experts"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["active_parameters"].as_u64() < v["parameters"].as_u64(),
        "{v}"
    );
    assert_eq!(v["mask_padding"], false);
    let r = llada_cmd(&[
        "infill",
        d,
        "--text",
        "In the beginning God created the <mask:4> and the earth.",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["fills"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        v["text"].as_str().unwrap().ends_with(" and the earth."),
        "{v}"
    );
    let r = llada_cmd(&[
        "score",
        d,
        "--prompt",
        "In the beginning God",
        "--answer",
        " created the heaven",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let ll = v["log_likelihood"].as_f64().unwrap();
    assert!(ll.is_finite() && ll < 0.0 && v["answer_tokens"] == 7, "{v}");
    let r = llada_cmd(&[
        "bench",
        d,
        "--mode",
        "step",
        "--prompt-len",
        "16",
        "--gen-length",
        "16",
        "--block-length",
        "8",
        "--runs",
        "1",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
}
