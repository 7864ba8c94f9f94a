//! Golden tests of the reverse process: every non-fragile case of `generate.json` (and the
//! no-cache cases of `fastdllm.json`) reproduced token for token, with the same unmasking
//! trajectory and number of model calls.

mod common;

use common::*;
use llada::candle_core::DType;
use llada::sampler::{self, Commit, PromptBatch, Remasking, SamplerConfig};
use llada::{Rng, SpecialTokens};
use serde_json::Value;

fn special_for(case: &Value, base: &SpecialTokens) -> SpecialTokens {
    let id = |k: &str, d: u32| case[k].as_u64().map(|v| v as u32).unwrap_or(d);
    SpecialTokens {
        mask: id("mask_id", base.mask),
        eos: id("eos_id_used", base.eos),
        eot: Some(id("eot_id_used", base.eot.unwrap_or(u32::MAX))),
        ..*base
    }
}

fn run_case(case: &Value, commit: Commit) -> llada::Generation {
    let doc_dtype = DType::F32;
    let ck = model(doc_dtype);
    let ids = ids2(&case["prompt_ids"]);
    let key_mask = case
        .get("attention_mask")
        .filter(|m| !m.is_null())
        .map(ids2);
    let cfg = SamplerConfig {
        gen_length: case["gen_length"].as_u64().unwrap() as usize,
        steps: case["steps"].as_u64().unwrap() as usize,
        block_length: case["block_length"].as_u64().unwrap() as usize,
        temperature: case["temperature"].as_f64().unwrap(),
        remasking: case["remasking"]
            .as_str()
            .unwrap()
            .parse::<Remasking>()
            .unwrap(),
        commit,
        cfg_scale: case["cfg_scale"].as_f64().unwrap_or(0.0),
        logits_eos_inf: case["logits_eos_inf"].as_bool().unwrap_or(false),
        confidence_eos_eot_inf: case["confidence_eos_eot_inf"].as_bool().unwrap_or(false),
    };
    let special = special_for(case, &ck.special);
    let mut m = &ck.model;
    sampler::generate(
        &mut m,
        &PromptBatch { ids, key_mask },
        &cfg,
        &special,
        &mut Rng::new(0),
        &mut sampler::no_progress,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
}

#[test]
fn generate_cases_match_reference() {
    let Some(doc) = case_file("generate.json") else {
        return;
    };
    assert_eq!(
        compute_dtype(&doc["meta"]),
        DType::F32,
        "generation goldens are checked at f32"
    );
    let (mut ran, mut skipped) = (0, 0);
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if fragile(case) {
            skipped += 1;
            continue;
        }
        let g = run_case(case, Commit::TopK);
        assert_eq!(
            g.output_ids,
            ids2(&case["output_ids"]),
            "{name}: output_ids"
        );
        assert_eq!(g.nfe as u64, case["nfe"].as_u64().unwrap(), "{name}: nfe");
        if let Some(us) = case.get("unmask_step").filter(|v| !v.is_null()) {
            let ours: Vec<Vec<u32>> = g
                .unmask_step
                .iter()
                .map(|r| r.iter().map(|s| s.unwrap() as u32).collect())
                .collect();
            assert_eq!(ours, ids2(us), "{name}: unmask_step trajectory");
        }
        ran += 1;
    }
    eprintln!("generate.json: {ran} cases matched, {skipped} fragile skipped");
    assert!(ran > 0);
}

fn fd_commit(case: &Value) -> Commit {
    match case["threshold"].as_f64() {
        Some(tau) => Commit::Threshold { tau },
        None => match case.get("factor").and_then(|f| f.as_f64()) {
            Some(f) => Commit::Factor { f },
            None => Commit::TopK,
        },
    }
}

#[test]
fn fastdllm_nocache_cases_match_reference() {
    let Some(doc) = case_file("fastdllm.json") else {
        return;
    };
    let mut ran = 0;
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if fragile(case) || case["function"].as_str() != Some("generate") {
            continue;
        }
        let g = run_case(case, fd_commit(case));
        assert_eq!(
            g.output_ids,
            ids2(&case["output_ids"]),
            "{name}: output_ids"
        );
        assert_eq!(g.nfe as u64, case["nfe"].as_u64().unwrap(), "{name}: nfe");
        ran += 1;
    }
    eprintln!("fastdllm.json (no cache): {ran} cases matched");
}
