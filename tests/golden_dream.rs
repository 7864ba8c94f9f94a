//! Golden tests of Dream (`DreamModel`) against its official code, for any folder of the `dream`
//! golden schema: `LLADA_DREAM_GOLDEN_DIR` (default `tests/golden/dream`, a copy of
//! `shared/golden/dream`). Forward logits within 1e-4 at the valid positions, the official
//! `diffusion_generate` cases token for token with equal model calls (the RNG-dependent ones
//! replayed from their recorded reveal sets), the Fast-dLLM speed-ups' parity properties, and the
//! CLI.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use llada::candle_core::{DType, Device};

/// The Dream golden folder.
fn dream_dir() -> PathBuf {
    match std::env::var_os("LLADA_DREAM_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dream"),
    }
}

fn dream(dtype: DType) -> &'static llada::Checkpoint {
    model_in(&dream_dir(), dtype)
}

/// The compute dtype of the folder's forward cases.
fn forward_dtype() -> DType {
    case_file_in(&dream_dir(), "forward.json")
        .map(|d| compute_dtype(&d["meta"]))
        .unwrap_or(DType::F32)
}

#[test]
fn the_folder_loads_as_dream() {
    let ck = dream(DType::F32);
    assert_eq!(ck.model.architecture(), llada::model::Architecture::Dream);
    let cfg = ck.model.config();
    assert!(cfg.qkv_bias && cfg.logits_shift);
    // every tensor of the checkpoint was read: the tensor list is the checkpoint's
    let mut ours: Vec<String> = llada::model::tensor_specs(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    ours.sort();
    let files = llada::weights::SafetensorsFiles::open(&dream_dir()).unwrap();
    let mut theirs: Vec<String> = files.names().map(str::to_string).collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    // and written back under the same names with the same values
    let named = ck.model.named_tensors().unwrap();
    assert_eq!(named.len(), theirs.len());
}

#[test]
fn forward_logits_match_reference() {
    let dtype = forward_dtype();
    for device in devices() {
        let ck = if device.is_cpu() {
            dream(dtype)
        } else {
            Box::leak(Box::new(
                llada::Checkpoint::load(&dream_dir(), Some(dtype), &device).unwrap(),
            ))
        };
        golden::check_forward_with(&dream_dir(), ck, &device, dtype, true);
    }
}

#[test]
fn forward_bf16_within_tolerance() {
    if forward_dtype() != DType::F32 {
        return;
    }
    golden::check_forward_with(
        &dream_dir(),
        dream(DType::BF16),
        &Device::Cpu,
        DType::BF16,
        true,
    );
}

use llada::sampler::{self, settings::Alg, PromptBatch, SamplerConfig, SamplerSettings};
use serde_json::Value;

/// The sampler settings of a `generate.json` case, through the same path as the CLI's flags.
fn case_config(case: &Value) -> SamplerConfig {
    let alg: Alg = serde_json::from_value(case["alg"].clone()).unwrap();
    let settings = SamplerSettings {
        gen_length: Some(case["max_new_tokens"].as_u64().unwrap() as usize),
        steps: Some(case["steps"].as_u64().unwrap() as usize),
        temperature: Some(case["temperature"].as_f64().unwrap()),
        alg: Some(alg),
        alg_temp: case["alg_temp"].as_f64(),
        eps: case["eps"].as_f64(),
        top_p: case["top_p"].as_f64(),
        top_k: case["top_k"].as_u64().map(|k| k as usize),
        ..Default::default()
    };
    settings
        .resolve(&SamplerConfig::default())
        .unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
}

fn case_prompts(case: &Value) -> PromptBatch {
    PromptBatch {
        ids: ids2(&case["prompt_ids"]),
        key_mask: case
            .get("attention_mask")
            .filter(|m| !m.is_null())
            .map(ids2),
    }
}

/// Per step, per row: the answer indices the reference wrote at that step.
fn reveals_of(case: &Value) -> Vec<Vec<Vec<usize>>> {
    let steps = case["steps"].as_u64().unwrap() as usize;
    let unmask: Vec<Vec<Value>> = case["unmask_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().clone())
        .collect();
    (0..steps)
        .map(|s| {
            unmask
                .iter()
                .map(|row| {
                    (0..row.len())
                        .filter(|&i| row[i].as_u64() == Some(s as u64))
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The tokens written per step and row, from a generation's unmask steps.
fn transfer_counts(g: &llada::Generation, steps: usize) -> Vec<Vec<u64>> {
    (0..steps)
        .map(|s| {
            g.unmask_step
                .iter()
                .map(|row| row.iter().filter(|&&u| u == Some(s)).count() as u64)
                .collect()
        })
        .collect()
}

fn check_case(case: &Value, g: &llada::Generation) {
    let name = case["name"].as_str().unwrap();
    assert_eq!(
        g.output_ids,
        ids2(&case["output_ids"]),
        "{name}: output_ids"
    );
    assert_eq!(g.nfe as u64, case["nfe"].as_u64().unwrap(), "{name}: nfe");
    let steps = case["steps"].as_u64().unwrap() as usize;
    let want: Vec<Vec<u64>> = case["transfer_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(transfer_counts(g, steps), want, "{name}: transfer counts");
    let unmask: Vec<Vec<Option<usize>>> = case["unmask_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().map(|v| v as usize))
                .collect()
        })
        .collect();
    assert_eq!(g.unmask_step, unmask, "{name}: unmask steps");
}

/// Every deterministic, non-fragile `diffusion_generate` case token for token, with the
/// reference's model calls and per-step reveals.
#[test]
fn generate_cases_match_reference() {
    let Some(doc) = case_file_in(&dream_dir(), "generate.json") else {
        return;
    };
    let ck = dream(DType::F32);
    let mut checked = 0;
    for case in doc["cases"].as_array().unwrap() {
        if fragile(case) || case["rng_dependent"].as_bool().unwrap_or(false) {
            continue;
        }
        let mut m = ck.model.predictor();
        let g = sampler::generate(
            &mut m,
            &case_prompts(case),
            &case_config(case),
            &ck.special,
            &mut llada::Rng::new(0),
            &mut sampler::no_progress,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        check_case(case, &g);
        checked += 1;
    }
    assert!(checked > 0);
    eprintln!("{checked} deterministic cases checked");
}

/// The RNG-dependent cases (`origin`, `alg_temp` > 0) replayed from their recorded reveal sets:
/// the draws are torch's, everything else (the schedule's counts, the predictions and their
/// shift, the canvas) must be the reference's.
#[test]
fn random_cases_replay_from_their_reveal_sets() {
    let Some(doc) = case_file_in(&dream_dir(), "generate.json") else {
        return;
    };
    let ck = dream(DType::F32);
    let mut checked = 0;
    for case in doc["cases"].as_array().unwrap() {
        if fragile(case) || !case["rng_dependent"].as_bool().unwrap_or(false) {
            continue;
        }
        let mut m = ck.model.predictor();
        let g = sampler::generate_replayed(
            &mut m,
            &case_prompts(case),
            &case_config(case),
            &ck.special,
            &reveals_of(case),
            &mut sampler::no_progress,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        check_case(case, &g);
        checked += 1;
    }
    assert!(checked > 0);
}
