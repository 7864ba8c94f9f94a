//! Golden checks shared by every architecture's golden tests, parametrized by the golden folder
//! (each architecture's test file names its folder: `LLADA_GOLDEN_DIR`, `LLADA_MOE_GOLDEN_DIR`).

use std::path::Path;

use super::*;
use llada::candle_core::{DType, Device, Tensor};
use llada::sampler::{self, CacheMode, Commit, PromptBatch, Remasking, SamplerConfig};
use llada::{Checkpoint, Rng, SpecialTokens};
use serde_json::Value;

pub fn check_forward(dir: &Path, ck: &Checkpoint, device: &Device, dtype: DType) {
    check_forward_with(dir, ck, device, dtype, false)
}

/// [`check_forward`]; with `valid_only`, positions whose `attention_mask` is 0 are not compared
/// (Dream: pad query rows have no allowed key, and the reference's outputs there are meaningless).
pub fn check_forward_with(
    dir: &Path,
    ck: &Checkpoint,
    device: &Device,
    dtype: DType,
    valid_only: bool,
) {
    let Some(doc) = case_file_in(dir, "forward.json") else {
        return;
    };
    let logits_path = dir.join("cases/forward_logits.safetensors");
    let refs = llada::candle_core::safetensors::load(&logits_path, &Device::Cpu).unwrap();
    let (abs, rel) = logits_tolerance(dtype);
    let cases = doc["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rows = ids2(&case["input_ids"]);
        let (b, l) = (rows.len(), rows[0].len());
        let ids = Tensor::from_vec(rows.concat(), (b, l), device).unwrap();
        let mask = if case["attention_mask"].is_null() {
            None
        } else {
            let m = ids2(&case["attention_mask"]);
            Some(Tensor::from_vec(m.concat(), (b, l), device).unwrap())
        };
        let ours = ck.model.forward(&ids, mask.as_ref()).unwrap();
        let ours: Vec<f32> = ours
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let key = case["logits_key"].as_str().unwrap();
        let reference = refs
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no tensor {key}"));
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            reference.dims(),
            shape.as_slice(),
            "{name}: reference shape"
        );
        let reference: Vec<f32> = reference
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours.len(), reference.len(), "{name}: logits size");
        let scale = reference.iter().fold(0f32, |m, r| m.max(r.abs()));
        let tol = abs + rel * scale;
        let valid: Vec<bool> = if valid_only && !case["attention_mask"].is_null() {
            ids2(&case["attention_mask"])
                .concat()
                .iter()
                .map(|&m| m != 0)
                .collect()
        } else {
            vec![true; b * l]
        };
        let v = shape[2];
        let (mut max_abs, mut worst) = (0f32, 0usize);
        for (i, (o, r)) in ours.iter().zip(&reference).enumerate() {
            if !valid[i / v] {
                continue;
            }
            let d = (o - r).abs();
            assert!(d.is_finite(), "{name}: non-finite logit at {i}");
            if d > max_abs {
                (max_abs, worst) = (d, i);
            }
        }
        eprintln!(
            "{name} [{:?}, {:?}]: max |Δ| = {max_abs:.3e} (tolerance {tol:.3e})",
            device.location(),
            dtype
        );
        assert!(
            max_abs <= tol,
            "{name}: logit {worst} differs by {max_abs:.3e} (ours {}, reference {}); tolerance {abs} + {rel}·{scale}",
            ours[worst], reference[worst]
        );
    }
}

pub fn special_for(case: &Value, base: &SpecialTokens) -> SpecialTokens {
    let id = |k: &str, d: u32| case[k].as_u64().map(|v| v as u32).unwrap_or(d);
    SpecialTokens {
        mask: id("mask_id", base.mask),
        eos: id("eos_id_used", base.eos),
        eot: Some(id("eot_id_used", base.eot.unwrap_or(u32::MAX))),
        ..*base
    }
}

pub fn run_case(
    ck: &Checkpoint,
    case: &Value,
    commit: Commit,
    cache: CacheMode,
) -> llada::Generation {
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
        cache,
        early_stop: false,
        ..Default::default()
    };
    let special = special_for(case, &ck.special);
    let mut m = ck.model.predictor();
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

/// Every non-fragile case of `generate.json` in `dir`: output ids, model calls and the unmasking
/// trajectory (when recorded) as the reference's.
pub fn check_generate_cases(dir: &Path, ck: &Checkpoint) {
    let Some(doc) = case_file_in(dir, "generate.json") else {
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
        let g = run_case(ck, case, Commit::TopK, CacheMode::None);
        assert_eq!(
            g.output_ids,
            ids2(&case["output_ids"]),
            "{name}: output_ids"
        );
        assert_eq!(g.nfe as u64, case["nfe"].as_u64().unwrap(), "{name}: nfe");
        if let Some(us) = case.get("unmask_step").filter(|v| !v.is_null()) {
            assert_eq!(unmask_steps(&g), ids2(us), "{name}: unmask_step trajectory");
        }
        ran += 1;
    }
    eprintln!("generate.json: {ran} cases matched, {skipped} fragile skipped");
    assert!(ran > 0);
}

/// The model call at which each generated position was revealed.
fn unmask_steps(g: &llada::Generation) -> Vec<Vec<u32>> {
    g.unmask_step
        .iter()
        .map(|r| {
            r.iter()
                .map(|s| s.expect("every position revealed") as u32)
                .collect()
        })
        .collect()
}

pub fn fd_commit(case: &Value) -> Commit {
    match case["threshold"].as_f64() {
        Some(tau) => Commit::Threshold { tau },
        None => match case.get("factor").and_then(|f| f.as_f64()) {
            Some(f) => Commit::Factor { f },
            None => Commit::TopK,
        },
    }
}

pub fn fd_cache(case: &Value) -> CacheMode {
    // the function name, possibly after its source (`NVlabs/Fast-dLLM llada/generate.py:generate`)
    let f = case["function"].as_str().unwrap();
    match f.rsplit(':').next().unwrap_or(f) {
        "generate" => CacheMode::None,
        "generate_with_prefix_cache" => CacheMode::Prefix,
        "generate_with_dual_cache" => CacheMode::Dual,
        other => panic!("unknown Fast-dLLM function {other}"),
    }
}

/// Every non-fragile case of `fastdllm.json` in `dir`: output ids and model calls as the
/// reference's.
pub fn check_fastdllm_cases(dir: &Path, ck: &Checkpoint) {
    let Some(doc) = case_file_in(dir, "fastdllm.json") else {
        return;
    };
    let mut ran = 0;
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if fragile(case) {
            continue;
        }
        let g = run_case(ck, case, fd_commit(case), fd_cache(case));
        assert_eq!(
            g.output_ids,
            ids2(&case["output_ids"]),
            "{name}: output_ids"
        );
        assert_eq!(g.nfe as u64, case["nfe"].as_u64().unwrap(), "{name}: nfe");
        if let Some(us) = case.get("unmask_step").filter(|v| !v.is_null()) {
            assert_eq!(unmask_steps(&g), ids2(us), "{name}: unmask_step trajectory");
        }
        ran += 1;
    }
    eprintln!("fastdllm.json: {ran} cases matched");
    assert!(ran > 0);
}

/// Where the reference says cached and uncached must agree: when every block is one step long,
/// each step is a block-start full forward, so prefix and dual caches change nothing.
pub fn check_cached_and_uncached_agree(ck: &Checkpoint) {
    let prompt = ck
        .tokenizer()
        .unwrap()
        .encode("And God said, Let there be light")
        .unwrap();
    let run = |cfg: &SamplerConfig| {
        let mut m = ck.model.predictor();
        sampler::generate(
            &mut m,
            &PromptBatch::single(prompt.clone()),
            cfg,
            &ck.special,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )
        .unwrap()
    };
    let one = SamplerConfig {
        gen_length: 32,
        steps: 32,
        block_length: 1,
        ..Default::default()
    };
    let reference = run(&one);
    for cache in [CacheMode::Prefix, CacheMode::Dual] {
        let g = run(&SamplerConfig {
            cache,
            ..one.clone()
        });
        assert_eq!(g.output_ids, reference.output_ids, "{cache:?}");
        // the reference cached loops make one more (no-op) forward after a block completed by its
        // block-start step: with one-token blocks, every block
        assert_eq!(g.nfe, 2 * reference.nfe);
    }
}

/// Early stop keeps the decoded answer and saves forward passes.
pub fn check_early_stop_keeps_the_answer(ck: &Checkpoint) {
    let tok = ck.tokenizer().unwrap();
    let mut saved = 0;
    for q in [
        "The LORD is my shepherd; I shall not want.",
        "And Moses said unto the people, Fear ye not.",
        "Blessed are the meek",
    ] {
        let prompt = tok.encode_chat(&[llada::Message::user(q)]).unwrap();
        for cache in [CacheMode::None, CacheMode::Dual] {
            for commit in [Commit::TopK, Commit::Threshold { tau: 0.9 }] {
                let cfg = SamplerConfig {
                    gen_length: 64,
                    steps: 64,
                    block_length: 8,
                    commit,
                    cache,
                    ..Default::default()
                };
                let run = |early_stop| {
                    let mut m = ck.model.predictor();
                    let c = SamplerConfig {
                        early_stop,
                        ..cfg.clone()
                    };
                    sampler::generate(
                        &mut m,
                        &PromptBatch::single(prompt.clone()),
                        &c,
                        &ck.special,
                        &mut Rng::new(0),
                        &mut sampler::no_progress,
                    )
                    .unwrap()
                };
                let (full, early) = (run(false), run(true));
                let (a, e) = (
                    tok.decode_answer(&full.generated_ids[0]).unwrap(),
                    tok.decode_answer(&early.generated_ids[0]).unwrap(),
                );
                assert_eq!(a, e, "{q} {cache:?} {commit:?}");
                assert!(early.nfe <= full.nfe);
                saved += full.nfe - early.nfe;
            }
        }
    }
    assert!(saved > 0, "early stop never triggered");
}
