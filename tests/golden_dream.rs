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

/// Whether the tests run on the folder shipped in this repository (some checks are of what its
/// model answers, not of properties every checkpoint has).
fn shipped_folder() -> bool {
    std::env::var_os("LLADA_DREAM_GOLDEN_DIR").is_none()
}

fn dream(dtype: DType) -> &'static llada::Checkpoint {
    model_in(&dream_dir(), dtype)
}

/// The compute dtype of the folder's forward cases.
fn forward_dtype() -> DType {
    compute_dtype(&case_file("forward.json")["meta"])
}

/// A case file of the folder: the schema has both, so a folder without one is an error (a wrong
/// `LLADA_DREAM_GOLDEN_DIR` must not pass).
fn case_file(name: &str) -> Value {
    case_file_in(&dream_dir(), name)
        .unwrap_or_else(|| panic!("{}: no cases/{name}", dream_dir().display()))
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
    let doc = case_file("generate.json");
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
    let doc = case_file("generate.json");
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

use llada::model::{CacheMode, MaskPredictor};
use llada::sampler::{Commit, Remasking};

#[test]
fn cached_and_uncached_agree_where_they_must() {
    golden::check_cached_and_uncached_agree(dream(DType::F32));
}

#[test]
fn early_stop_keeps_the_answer() {
    golden::check_early_stop_keeps_the_answer(dream(DType::F32));
}

/// With shifted logits a block's first position is predicted from the output before the block:
/// the cached steps recompute it too. On an unchanged canvas a cached step's logits are the
/// uncached ones (the cache holds exactly this canvas's keys and values).
#[test]
fn cached_steps_read_the_shifted_outputs() {
    let ck = dream(DType::F32);
    let tok = ck.tokenizer().unwrap();
    let mut ids = tok.encode("And God said, Let there be light").unwrap();
    let p = ids.len();
    ids.extend(std::iter::repeat_n(ck.special.mask, 24));
    let l = ids.len();
    let x = llada::candle_core::Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
    for (lo, hi) in [(p, p + 8), (p + 8, p + 16), (p + 16, l)] {
        let rows: Vec<usize> = (lo..hi).collect();
        let full = ck.model.predictor().logits_at(&x, None, &rows).unwrap();
        for mode in [CacheMode::Prefix, CacheMode::Dual] {
            let mut m = ck.model.predictor();
            m.begin_block(lo..hi, mode).unwrap();
            let first = m.logits_at(&x, None, &rows).unwrap(); // block start: a full forward
            let cached = m.logits_at(&x, None, &rows).unwrap();
            assert_eq!(max_diff(&first, &full), 0.0, "{mode:?} block start");
            let d = max_diff(&cached, &full);
            assert!(d < 1e-4, "{mode:?} block {lo}..{hi}: {d}");
        }
    }
    // and the shift itself: row r is raw output r − 1, row 0 its own
    let raw = ck.model.forward(&x, None).unwrap();
    let shifted = ck
        .model
        .predictor()
        .logits_at(&x, None, &[0, 1, 5])
        .unwrap();
    // (rounding only: the predictor runs the last layer's MLP on the asked rows alone; adjacent
    // positions' logits differ by whole units)
    let pick = |t: &llada::candle_core::Tensor, i: usize| t.narrow(1, i, 1).unwrap();
    for (row, src) in [(0, 0), (1, 0), (2, 4)] {
        let d = max_diff(&pick(&shifted, row), &pick(&raw, src));
        assert!(d < 1e-5, "row {row} vs raw {src}: {d}");
    }
    assert!(max_diff(&pick(&shifted, 2), &pick(&raw, 5)) > 0.1);
}

/// Fast-dLLM's rules on Dream: a threshold of 1 commits exactly the most confident prediction
/// per step, i.e. the top-k rule at one token per step; with a cache and early stop the threshold
/// sampler finishes the answer in fewer calls.
#[test]
fn fastdllm_rules_work_on_dream() {
    let ck = dream(DType::F32);
    let tok = ck.tokenizer().unwrap();
    let prompt = tok
        .encode_chat(&[llada::Message::user(
            "The LORD is my shepherd; I shall not want.",
        )])
        .unwrap();
    let run = |cfg: &SamplerConfig| {
        let mut m = ck.model.predictor();
        sampler::generate(
            &mut m,
            &PromptBatch::single(prompt.clone()),
            cfg,
            &ck.special,
            &mut llada::Rng::new(0),
            &mut sampler::no_progress,
        )
        .unwrap()
    };
    let base = SamplerConfig {
        gen_length: 32,
        steps: 32,
        block_length: 8,
        remasking: Remasking::MaskgitPlus,
        ..Default::default()
    };
    let topk = run(&base);
    let one = run(&SamplerConfig {
        commit: Commit::Threshold { tau: 1.0 },
        ..base.clone()
    });
    assert_eq!(one.output_ids, topk.output_ids);
    let fast = run(&SamplerConfig {
        commit: Commit::Threshold { tau: 0.5 },
        cache: CacheMode::Dual,
        early_stop: true,
        ..base.clone()
    });
    assert!(fast.nfe < topk.nfe, "{} vs {}", fast.nfe, topk.nfe);
    let answer = tok.decode_answer(&fast.generated_ids[0]).unwrap();
    assert!(!answer.trim().is_empty(), "{answer:?}");
}

/// Dream's own sampler with Fast-dLLM's speed-ups: a threshold with a dual cache in blocks runs
/// past the schedule's steps when it must (fewer steps than tokens), and early stop on a batch
/// keeps every row's answer (finished rows leave Dream's batch average).
#[test]
fn dream_sampler_with_fastdllm_speedups() {
    let ck = dream(DType::F32);
    let tok = ck.tokenizer().unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The LORD is my shepherd; I shall not want.",
        "Blessed are the meek",
    ]
    .iter()
    .map(|q| tok.encode_chat(&[llada::Message::user(*q)]).unwrap())
    .collect();
    let batch = PromptBatch::left_padded(&prompts, ck.special.pad);
    let run = |s: SamplerSettings| {
        let cfg = s.resolve(&SamplerConfig::default()).unwrap();
        let mut m = ck.model.predictor();
        sampler::generate(
            &mut m,
            &batch,
            &cfg,
            &ck.special,
            &mut llada::Rng::new(0),
            &mut sampler::no_progress,
        )
        .unwrap()
    };
    let fast = run(SamplerSettings {
        alg: Some(Alg::MaskgitPlus),
        gen_length: Some(64),
        steps: Some(8),
        block_length: Some(16),
        threshold: Some(Some(0.9)),
        cache: Some(CacheMode::Dual),
        ..Default::default()
    });
    assert!(fast
        .generated_ids
        .iter()
        .flatten()
        .all(|&t| t != ck.special.mask));
    for alg in [Alg::MaskgitPlus, Alg::Entropy] {
        let base = SamplerSettings {
            alg: Some(alg),
            gen_length: Some(32),
            steps: Some(16),
            ..Default::default()
        };
        let full = run(base.clone());
        let early = run(SamplerSettings {
            early_stop: Some(true),
            ..base
        });
        for r in 0..2 {
            assert_eq!(
                tok.decode_answer(&full.generated_ids[r]).unwrap(),
                tok.decode_answer(&early.generated_ids[r]).unwrap(),
                "{alg} row {r}"
            );
        }
        assert!(early.nfe <= full.nfe);
    }
}

/// The likelihood bound reads the shifted logits: for a one-token answer it is exact,
/// log softmax of the raw output at the last prompt position.
#[test]
fn score_uses_the_shifted_logits() {
    let ck = dream(DType::F32);
    let tok = ck.tokenizer().unwrap();
    let prompt = tok.encode("In the beginning God").unwrap();
    let answer = [" the", " and", " of", " God", " a", "."]
        .iter()
        .map(|w| tok.encode(w).unwrap())
        .find(|a| a.len() == 1)
        .expect("a one-token word in the vocabulary");
    let mut m = ck.model.predictor();
    let e = llada::score::log_likelihood(
        &mut m,
        &prompt,
        &answer,
        &llada::score::ScoreConfig::default(),
        ck.special.mask,
        &mut llada::Rng::new(0),
    )
    .unwrap();
    let mut x = prompt.clone();
    x.push(ck.special.mask);
    let l = x.len();
    let t = llada::candle_core::Tensor::from_vec(x, (1, l), &Device::Cpu).unwrap();
    let raw: Vec<f32> = ck
        .model
        .forward(&t, None)
        .unwrap()
        .get(0)
        .unwrap()
        .get(l - 2)
        .unwrap()
        .to_vec1()
        .unwrap();
    let m = raw.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = raw.iter().map(|&v| (v as f64 - m).exp()).sum();
    let want = raw[answer[0] as usize] as f64 - m - z.ln();
    assert!(
        (e.log_likelihood - want).abs() < 1e-4,
        "{} vs {want}",
        e.log_likelihood
    );
}

/// The training forward (dense weights, differentiable ops) reads the same shifted outputs as
/// the predictor: position p's logits are output p − 1's, a sequence's first its own.
#[test]
fn training_reads_the_shifted_outputs() {
    let ck = dream(DType::F32);
    let tr = llada::train::Trainable::from_model(&ck.model).unwrap();
    let l = 19usize;
    let ids: Vec<u32> = (0..2 * l as u32).map(|i| (i * 37 + 11) % 500).collect();
    let x = llada::candle_core::Tensor::from_vec(ids, (2, l), &Device::Cpu).unwrap();
    let positions: Vec<u32> = vec![0, 1, 7, l as u32, l as u32 + 5];
    let pos = llada::candle_core::Tensor::from_vec(positions.clone(), 5, &Device::Cpu).unwrap();
    let train = tr.model.forward_train_positions(&x, &pos).unwrap();
    let raw = ck
        .model
        .forward(&x, None)
        .unwrap()
        .reshape((2 * l, 512))
        .unwrap();
    for (j, &p) in positions.iter().enumerate() {
        let src = if (p as usize).is_multiple_of(l) {
            p
        } else {
            p - 1
        } as usize;
        let d = max_diff(&train.get(j).unwrap(), &raw.get(src).unwrap());
        assert!(d < 1e-4, "position {p}: {d}");
    }
}

/// `llada generate` prints the official `generated_ids` with Dream's flags.
#[test]
fn the_cli_reproduces_generate_cases() {
    let doc = case_file("generate.json");
    let dir = dream_dir();
    let mut ran = 0;
    for case in doc["cases"].as_array().unwrap() {
        let batch1 = case["prompt_ids"].as_array().unwrap().len() == 1;
        if fragile(case) || !batch1 || case["rng_dependent"].as_bool().unwrap_or(true) {
            continue;
        }
        let prompt = ids2(&case["prompt_ids"])[0]
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut args: Vec<String> = vec![
            "generate".into(),
            dir.display().to_string(),
            "--sampler".into(),
            "reference".into(),
            "--prompt-ids".into(),
            prompt,
            "--alg".into(),
            case["alg"].as_str().unwrap().into(),
            "--gen-length".into(),
            case["max_new_tokens"].to_string(),
            "--steps".into(),
            case["steps"].to_string(),
            "--eps".into(),
            case["eps"].to_string(),
            "--temperature".into(),
            "0".into(),
            "--json".into(),
        ];
        for key in ["alg_temp", "top_p", "top_k"] {
            if !case[key].is_null() {
                args.push(format!("--{}", key.replace('_', "-")));
                args.push(case[key].to_string());
            }
        }
        let run = llada_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()).run();
        assert!(run.ok(), "{}: {}", case["name"], run.stderr);
        let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        assert_eq!(
            vec![ids1(&v["generated_ids"])],
            ids2(&case["generated_ids"]),
            "{}",
            case["name"]
        );
        assert_eq!(v["nfe"], case["nfe"], "{}", case["name"]);
        ran += 1;
    }
    assert!(ran >= 10, "{ran}");
}

/// Every command runs on Dream: info, chat, infill, score, eval of a choice task, the bench's
/// cached step.
#[test]
fn the_commands_run_on_dream() {
    let dir = dream_dir();
    let d = dir.to_str().unwrap();
    let r = llada_cmd(&["info", d, "--json"]).run();
    assert!(r.ok(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["architecture"], "DreamModel");
    assert_eq!(
        (v["qkv_bias"].as_bool(), v["logits_shift"].as_bool()),
        (Some(true), Some(true))
    );
    let q = "The LORD is my shepherd; I shall not want.\n";
    let r = llada_cmd(&["chat", d, "--gen-length", "16"]).stdin(q).run();
    assert!(r.ok(), "{}", r.stderr);
    if shipped_folder() {
        // the golden model answers this prompt with a word (another checkpoint may end at once)
        assert!(!r.stdout.trim().is_empty(), "{}", r.stdout);
    }
    let r = llada_cmd(&[
        "chat",
        d,
        "--gen-length",
        "32",
        "--steps",
        "16",
        "--alg",
        "entropy",
    ])
    .stdin(q)
    .run();
    assert!(r.ok(), "{}", r.stderr);
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
    let text = v["text"].as_str().unwrap();
    assert!(
        text.starts_with("In the beginning God created the ") && text.ends_with(" and the earth."),
        "{v}"
    );
    assert_eq!(v["fills"].as_array().unwrap().len(), 1, "{v}");
    let r = llada_cmd(&[
        "infill",
        d,
        "--text",
        "In the beginning God created the <mask:4> and the earth.",
        "--alg",
        "entropy",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
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
    assert!(ll.is_finite() && ll < 0.0, "{v}");
    let tmp = tempfile::tempdir().unwrap();
    let tasks = tmp.path().join("tasks.jsonl");
    std::fs::write(
        &tasks,
        "{\"context\": \"In the beginning God created the\", \"choices\": [\" heaven\", \" xqzv\"], \"answer\": 0}\n\
         {\"context\": \"And God said, Let there be\", \"choices\": [\" light\", \" qqq\"], \"answer\": 0}\n",
    )
    .unwrap();
    let r = llada_cmd(&[
        "eval",
        d,
        tasks.to_str().unwrap(),
        "--mc-num",
        "8",
        "--batch",
        "8",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{v}");
    if shipped_folder() {
        assert_eq!(acc, 1.0, "{v}");
    }
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

/// Dream's repositories ship the slow Qwen2-style tokenizer files (`vocab.json`, `merges.txt`,
/// the added tokens in `tokenizer_config.json`), not `tokenizer.json`: a folder with those files
/// (here: the golden folder's byte-level BPE written out that way) loads, encodes plain text as
/// the fast tokenizer does, keeps the added tokens' ids, and chats with the ChatML turn end.
#[test]
fn the_slow_tokenizer_files_load() {
    let src = dream_dir();
    let tj: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    // the slow files describe a byte-level BPE (Dream's): only such a tokenizer.json can be
    // written as them
    if tj["model"]["type"] != "BPE" || tj["pre_tokenizer"]["type"] != "ByteLevel" {
        eprintln!("skipped: the folder's tokenizer is not a byte-level BPE");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // the checkpoint's files, whatever their layout, without its tokenizer.json
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if e.path().is_file() && name != "tokenizer.json" {
            std::fs::copy(e.path(), dir.join(&name)).unwrap();
        }
    }
    let added: Vec<u64> = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let vocab: serde_json::Map<String, Value> = tj["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, id)| !added.contains(&id.as_u64().unwrap()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    std::fs::write(dir.join("vocab.json"), Value::Object(vocab).to_string()).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for m in tj["model"]["merges"].as_array().unwrap() {
        match m {
            Value::String(s) => merges.push_str(s),
            Value::Array(p) => merges.push_str(&format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            other => panic!("merge {other}"),
        }
        merges.push('\n');
    }
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
    // a ChatML template and turn end, as Dream-Instruct's tokenizer_config.json
    let mut tc: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    tc["added_tokens_decoder"]["512"] =
        serde_json::json!({"content": "<|im_start|>", "special": true});
    tc["added_tokens_decoder"]["513"] =
        serde_json::json!({"content": "<|im_end|>", "special": true});
    tc["chat_template"] = Value::String("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{{ '<|im_start|>assistant\n' }}".into());
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();

    let slow = llada::Tokenizer::open(dir).unwrap();
    let fast = dream(DType::F32).tokenizer().unwrap();
    for text in [
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light: and there was light.",
        "Blessed are the meek: for they shall inherit the earth.",
    ] {
        assert_eq!(
            slow.encode(text).unwrap(),
            fast.encode(text).unwrap(),
            "{text}"
        );
        let ids = slow.encode(text).unwrap();
        assert_eq!(slow.decode(&ids, false).unwrap(), text);
    }
    // Qwen2's split (not GPT-2's): contractions in any case, one digit per piece, a space run
    // split before a word, newline runs apart
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let pt = slow.inner().get_pre_tokenizer().unwrap();
    let mut pieces = PreTokenizedString::from("I'M 123  a\n\nb");
    pt.pre_tokenize(&mut pieces).unwrap();
    let pieces: Vec<String> = pieces
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(p, _, _)| p.to_string())
        .collect();
    assert_eq!(
        pieces,
        ["I", "'M", "Ġ", "1", "2", "3", "Ġ", "Ġa", "ĊĊ", "b"]
    );
    assert_eq!(
        slow.encode("<|mdm_mask|><|eot_id|>").unwrap(),
        vec![508, 511]
    );
    let s = slow.special();
    assert_eq!((s.mask, s.eos), (508, 507));
    let chat = slow.encode_chat(&[llada::Message::user("Hi")]).unwrap();
    assert_eq!(chat[0], 512, "{chat:?}");
    // a checkpoint folder with these files has a tokenizer, and is copied with it
    let ck = llada::Checkpoint::load(dir, Some(DType::F32), &Device::Cpu).unwrap();
    assert!(ck.tokenizer().is_ok());
    let files = llada::checkpoint::read_tokenizer_files(&[dir]).unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"vocab.json") && names.contains(&"merges.txt"),
        "{names:?}"
    );
    // the older added_tokens.json declares what the config does not
    let mut tc2 = tc.clone();
    tc2["added_tokens_decoder"]
        .as_object_mut()
        .unwrap()
        .remove("513");
    std::fs::write(dir.join("tokenizer_config.json"), tc2.to_string()).unwrap();
    std::fs::write(dir.join("added_tokens.json"), r#"{"<|im_end|>": 513}"#).unwrap();
    let older = llada::Tokenizer::open(dir).unwrap();
    assert_eq!(older.encode("<|im_end|>").unwrap(), vec![513]);
    std::fs::remove_file(dir.join("added_tokens.json")).unwrap();
    // the added tokens must follow the vocabulary
    tc["added_tokens_decoder"]["600"] = serde_json::json!({"content": "<|far|>", "special": true});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let e = llada::Tokenizer::open(dir).unwrap_err().to_string();
    assert!(e.contains("<|far|>") && e.contains("600"), "{e}");
}
