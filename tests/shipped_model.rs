//! The model shipped in `models/llada-tiny-kjv`: it loads, is the default model, matches the held-out
//! bound of its model card (within 2%) and reproduces recorded greedy generations (a regression
//! guard). Also the hub-id resolution of model arguments.

use std::path::PathBuf;

use llada::candle_core::{DType, Device};
use llada::sampler::{self, PromptBatch, SamplerConfig};
use llada::score::{ppl, ScoreConfig};
use llada::{Checkpoint, Message, Rng};
use serde_json::Value;

fn shipped() -> PathBuf {
    llada::hub::shipped_model()
}

fn card() -> Value {
    let text = std::fs::read_to_string(shipped().join("card.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn shipped_model_loads_and_is_the_default() {
    let ck = Checkpoint::load(&shipped(), None, &Device::Cpu).unwrap();
    assert!(ck.tokenizer.is_some());
    assert!(ck.tokenizer().unwrap().chat_template().is_some());
    let p = ck.config.parameter_count();
    assert!((5_000_000..=25_000_000).contains(&p), "{p} parameters");
    let size: u64 = ck
        .files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(size < 50_000_000, "{size} bytes of weights");
    // no model argument: the shipped model
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
        .args(["info", "--json"])
        .env_remove("LLADA_MODEL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["path"].as_str().unwrap().ends_with("llada-tiny-kjv"));
}

#[test]
fn heldout_bound_matches_the_model_card() {
    let c = card();
    let h = &c["heldout_bound"];
    let ck = Checkpoint::load(&shipped(), Some(DType::F32), &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(shipped().join(h["file"].as_str().unwrap())).unwrap();
    let mut ids = ck.tokenizer().unwrap().encode(&text).unwrap();
    let context = h["context"].as_u64().unwrap() as usize;
    ids.truncate(h["max_windows"].as_u64().unwrap() as usize * context);
    let cfg = ScoreConfig {
        mc_num: h["mc_num"].as_u64().unwrap() as usize,
        batch: h["batch"].as_u64().unwrap() as usize,
        cfg_scale: 0.0,
    };
    let mut m = ck.model.predictor();
    let r = ppl::perplexity(
        &mut m,
        &ids,
        context,
        &cfg,
        ck.special.mask,
        h["seed"].as_u64().unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    let want = h["nll_per_token"].as_f64().unwrap();
    assert!(
        (r.nll_per_token - want).abs() <= 0.02 * want,
        "held-out bound {} vs the card's {want}",
        r.nll_per_token
    );
}

#[test]
fn greedy_generations_match_the_recorded_ones() {
    let c = card();
    let ck = Checkpoint::load(&shipped(), Some(DType::F32), &Device::Cpu).unwrap();
    let tok = ck.tokenizer().unwrap();
    let cases = c["greedy"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for g in cases {
        let prompt = g["prompt"].as_str().unwrap();
        let ids = if g["chat"].as_bool().unwrap() {
            tok.encode_chat(&[Message::user(prompt)]).unwrap()
        } else {
            tok.encode(prompt).unwrap()
        };
        let n = g["gen_length"].as_u64().unwrap() as usize;
        let cfg = SamplerConfig {
            gen_length: n,
            steps: g["steps"].as_u64().unwrap() as usize,
            block_length: g["block_length"].as_u64().unwrap() as usize,
            ..Default::default()
        };
        let mut m = ck.model.predictor();
        let out = sampler::generate(
            &mut m,
            &PromptBatch::single(ids),
            &cfg,
            &ck.special,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )
        .unwrap();
        assert_eq!(
            tok.decode_answer(&out.generated_ids[0]).unwrap(),
            g["text"].as_str().unwrap(),
            "{prompt}"
        );
    }
}

#[test]
fn hub_ids_resolve_from_the_local_cache_only() {
    let d = tempfile::tempdir().unwrap();
    let snap = d.path().join("models--acme--tiny/snapshots/0123abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(d.path().join("models--acme--tiny/refs")).unwrap();
    std::fs::write(d.path().join("models--acme--tiny/refs/main"), "0123abc").unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(shipped().join(f), snap.join(f)).unwrap();
    }
    let run = |model: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
            .args(["info", model, "--json"])
            .env("HF_HUB_CACHE", d.path())
            .output()
            .unwrap()
    };
    let ok = run("acme/tiny");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let missing = run("acme/absent");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("not found in the local Hugging Face cache") && err.contains("acme/absent"),
        "{err}"
    );
}
