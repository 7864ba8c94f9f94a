//! What a new user sees first: one default sampler shared by the CLI and the server, the
//! reference behind one switch, answers that say why they are empty, answer-only token rates,
//! the chat console's commands, and infilling's spacing (the shipped model).

mod common;

use common::llada_cmd;
use llada::candle_core::{DType, Device};
use llada::sampler::{self, CacheMode, Commit, Preset, PromptBatch, SamplerConfig};
use llada::server::openai::Defaults;
use llada::{Checkpoint, Message, Rng};
use serde_json::Value;

const QUESTION: &str = "Ruth lives in Hebron and keeps 10 horses. What does Ruth keep?";

fn shipped() -> std::path::PathBuf {
    llada::hub::shipped_model()
}

fn generate_json(extra: &[&str]) -> Value {
    let d = shipped();
    let mut args = vec![
        "generate",
        d.to_str().unwrap(),
        "--chat",
        "--prompt",
        QUESTION,
        "--json",
    ];
    args.extend_from_slice(extra);
    let r = llada_cmd(&args).run();
    assert!(r.ok(), "{}", r.stderr);
    serde_json::from_str(r.stdout.trim()).unwrap()
}

fn library_ids(cfg: &SamplerConfig) -> Vec<u32> {
    let ck = Checkpoint::load(&shipped(), None, &Device::Cpu).unwrap();
    let tok = ck.tokenizer().unwrap();
    let prompt = tok.encode_chat(&[Message::user(QUESTION)]).unwrap();
    let mut m = ck.model.predictor();
    let g = sampler::generate(
        &mut m,
        &PromptBatch::single(prompt),
        cfg,
        &ck.special,
        &mut Rng::new(0),
        &mut sampler::no_progress,
    )
    .unwrap();
    g.generated_ids[0].clone()
}

#[test]
fn the_presets_are_what_they_say() {
    let fast = Preset::Fast.apply(SamplerConfig::default(), true);
    assert_eq!(
        fast.describe(),
        "gen 128 · steps 128 · block 32 · threshold 0.9 · greedy · dual cache · early stop"
    );
    assert_eq!(
        Preset::Reference.apply(SamplerConfig::default(), true),
        SamplerConfig::default()
    );
    // infilling: the threshold, no cache, its whole region as one block
    let infill = Preset::Fast.apply(
        SamplerConfig {
            steps: 5,
            block_length: 0,
            ..Default::default()
        },
        false,
    );
    assert_eq!(
        (
            infill.commit,
            infill.cache,
            infill.early_stop,
            infill.block_length
        ),
        (Commit::Threshold { tau: 0.9 }, CacheMode::None, false, 0)
    );
    // block diffusion keeps its own rule and gains the cache and the EOS return
    let bd = Preset::Fast.apply(SamplerConfig::block_diffusion_default(), true);
    assert_eq!(bd.commit, Commit::Threshold { tau: 0.95 });
    assert_eq!(bd.cache, CacheMode::Dual);
    assert!(bd.block_diffusion.unwrap().eos_early_stop);
}

/// The CLI's default answer is the server's default answer, and `--sampler reference` is the
/// official sampler's (the library with `SamplerConfig::for_model`).
#[test]
fn cli_and_server_share_the_default_sampler_and_reference_is_exact() {
    let ck = Checkpoint::load(&shipped(), Some(DType::F32), &Device::Cpu).unwrap();
    let server = Defaults::for_model(&ck.config, Preset::Fast).sampler;
    let v = generate_json(&[]);
    assert_eq!(v["generated_ids"], serde_json::json!(library_ids(&server)));
    assert_eq!(v["text"], "Ruth keeps horses.");
    // the rate counts the answer's 4 tokens, not the 128-token canvas
    assert_eq!(v["answer_tokens"], 4);
    assert_eq!(v["canvas_tokens"], 128);
    let rate = v["tokens_per_s"].as_f64().unwrap();
    let canvas_rate = v["canvas_tokens_per_s"].as_f64().unwrap();
    assert!(
        (rate * 32.0 - canvas_rate).abs() < 1e-6 * canvas_rate,
        "{v}"
    );
    let r = generate_json(&["--sampler", "reference"]);
    assert_eq!(
        r["generated_ids"],
        serde_json::json!(library_ids(&SamplerConfig::for_model(&ck.config)))
    );
    assert_eq!(r["nfe"], 128);
    assert!(v["nfe"].as_u64().unwrap() < 16, "{v}");
}

#[test]
fn an_empty_answer_is_explained_and_the_summary_counts_answer_tokens() {
    let d = shipped();
    let r = llada_cmd(&["generate", d.to_str().unwrap(), "--prompt", "hi"]).run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(r.stdout.trim().is_empty(), "{:?}", r.stdout);
    assert!(
        r.stderr
            .contains("(empty answer: the model ended the answer at once (<|endoftext|> first)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--chat"), "{}", r.stderr);
    assert!(r.stderr.contains("[0 answer tokens in "), "{}", r.stderr);
    let r = llada_cmd(&[
        "generate",
        d.to_str().unwrap(),
        "--chat",
        "--prompt",
        QUESTION,
    ])
    .run();
    assert_eq!(r.stdout, "Ruth keeps horses.\n");
    assert!(r.stderr.contains("[4 answer tokens in "), "{}", r.stderr);
    assert!(r.stderr.contains("canvas 128"), "{}", r.stderr);
    assert!(!r.stderr.contains("empty answer"), "{}", r.stderr);
}

#[test]
fn chat_answers_unknown_commands_with_the_list_and_takes_a_system_message() {
    let d = shipped();
    let r = llada_cmd(&["chat", d.to_str().unwrap(), "--system", "Answer briefly."])
        .stdin(&format!("/frobnicate\n/help\n{QUESTION}\n/history\n"))
        .run();
    assert!(r.ok(), "{}", r.stderr);
    // only the question reached the model: one answer on stdout
    assert_eq!(r.stdout.lines().count(), 1, "{:?}", r.stdout);
    assert!(
        r.stderr
            .contains("unknown command /frobnicate: /help lists"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("system: Answer briefly."), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("user: {QUESTION}")),
        "{}",
        r.stderr
    );
}

#[test]
fn infill_moves_the_space_before_a_span_into_it() {
    let ck = Checkpoint::load(&shipped(), None, &Device::Cpu).unwrap();
    let tok = ck.tokenizer().unwrap();
    let (canvas, spans) = tok
        .encode_infill("The LORD is my <mask:2>; I shall", 512)
        .unwrap();
    let before = tok.encode("The LORD is my").unwrap();
    assert_eq!(&canvas[..before.len()], &before[..]);
    assert_eq!(spans, vec![(before.len(), 2)]);
    let d = shipped();
    let r = llada_cmd(&[
        "infill",
        d.to_str().unwrap(),
        "--text",
        "The LORD is my <mask:2>; I shall not want.",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(!r.stdout.contains("  "), "two spaces: {:?}", r.stdout);
    assert!(r.stdout.starts_with("The LORD is my "), "{:?}", r.stdout);
}

#[test]
fn bench_prints_settings_for_people() {
    let g = common::golden_dir();
    let r = llada_cmd(&[
        "bench",
        g.to_str().unwrap(),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--gen-length",
        "8",
        "--block-length",
        "8",
        "--threshold",
        "0.9",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(r.stdout.contains("threshold 0.9"), "{}", r.stdout);
    assert!(!r.stdout.contains("Threshold {"), "{}", r.stdout);
}

/// `--show-steps` into a log (not a terminal) writes one compact line per step: runs of masks
/// and of padding are counted, not repeated.
#[test]
fn show_steps_in_a_log_is_compact() {
    let d = shipped();
    let r = llada_cmd(&[
        "generate",
        d.to_str().unwrap(),
        "--prompt",
        "hi",
        "--show-steps",
        "--sampler",
        "reference",
        "--gen-length",
        "32",
        "--steps",
        "4",
        "--block-length",
        "32",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let steps: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("step "))
        .collect();
    assert_eq!(steps.len(), 4, "{}", r.stderr);
    assert!(steps[0].contains("░×"), "{}", steps[0]);
    for l in &steps {
        assert!(!l.contains("░░"), "{l}");
        assert!(!l.contains("|><|endoftext|>"), "{l}");
        assert!(l.chars().count() < 200, "{l}");
    }
}

/// `score` draws a progress bar on a terminal only: its output into a pipe is the result alone.
#[test]
fn score_prints_the_result_alone_into_a_pipe() {
    let d = shipped();
    let r = llada_cmd(&[
        "score",
        d.to_str().unwrap(),
        "--prompt",
        "What is 2 + 3?",
        "--answer",
        " 2 + 3 = 5.",
        "--mc-num",
        "8",
        "--batch",
        "4",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    assert!(
        r.stdout.starts_with("log p(answer | prompt) ≥ "),
        "{}",
        r.stdout
    );
    assert!(!r.stderr.contains("scoring"), "{}", r.stderr);
}

/// `chat --help` states the defaults chat really uses (the fast preset's block, threshold, cache
/// and early stop).
#[test]
fn chat_help_states_the_defaults_it_uses() {
    let r = llada_cmd(&["chat", "--help"]).run();
    assert!(r.ok(), "{}", r.stderr);
    let help = r.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    let fast = Preset::Fast.apply(SamplerConfig::default(), true);
    assert_eq!(fast.block_length, 32);
    assert_eq!(fast.commit, Commit::Threshold { tau: 0.9 });
    assert_eq!(fast.cache, CacheMode::Dual);
    assert!(fast.early_stop);
    for want in [
        "Semi-autoregressive block length [default: 32 (--sampler fast",
        "[default: 0.9 with --sampler fast",
        "[default: dual with --sampler fast",
        "[default: on with --sampler fast",
        "[default: fast;",
    ] {
        assert!(help.contains(want), "chat --help lacks {want:?}:\n{help}");
    }
}

/// `eval` and `eval-chat` say what they cost: elapsed seconds and forward passes, and for
/// generation the answer tokens (generated only) and their rate.
#[test]
fn evaluations_report_time_forwards_and_generated_tokens() {
    let d = shipped();
    let mc = common::repo_path("tests/lm_eval/mc.jsonl");
    let r = llada_cmd(&[
        "eval",
        d.to_str().unwrap(),
        mc.to_str().unwrap(),
        "--mc-num",
        "8",
        "--batch",
        "4",
        "--limit",
        "2",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    // question 1: one-token choices, one forward; question 2: 4 choices × 8/4 mini-batches
    assert_eq!(v["forwards"], 1 + 4 * 2, "{v}");
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    let chat = common::repo_path("tests/lm_eval/chat.jsonl");
    let r = llada_cmd(&[
        "eval-chat",
        d.to_str().unwrap(),
        chat.to_str().unwrap(),
        "--limit",
        "2",
        "--json",
    ])
    .run();
    assert!(r.ok(), "{}", r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let per_case: u64 = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["answer_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(v["answer_tokens"].as_u64().unwrap(), per_case);
    assert!(per_case > 0 && per_case < 64, "{v}");
    // one batch of 2 rows, 32 steps of one forward each (the reference sampler)
    assert_eq!(v["forwards"], 32, "{v}");
    let rate = v["tokens_per_s"].as_f64().unwrap();
    let want = per_case as f64 / v["seconds"].as_f64().unwrap();
    assert!(
        (rate - want).abs() < 1e-6 * want.max(1.0),
        "{rate} vs {want}"
    );
}
