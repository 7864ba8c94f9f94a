//! The HTTP server through its router (no sockets): OpenAI shapes, streaming, the denoising
//! stream, validation and the one error mapping, the bounded queue, batching.

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::golden_dir;
use http_body_util::BodyExt;
use llada::candle_core::{DType, Device, Tensor};
use llada::model::MaskPredictor;
use llada::server::{self, engine, openai::Defaults, AppState};
use llada::{Checkpoint, Tokenizer};
use serde_json::{json, Value};
use tower::ServiceExt;

fn state(queue: usize, max_batch: usize) -> Arc<AppState> {
    state_with_vocab(queue, max_batch, None)
}

/// The tiny model's server; `vocab` pretends the model has fewer token ids than its tokenizer.
fn state_with_vocab(queue: usize, max_batch: usize, vocab: Option<usize>) -> Arc<AppState> {
    let ck = Checkpoint::load(&golden_dir(), Some(DType::F32), &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&golden_dir(), &ck.config).unwrap();
    let max = ck.config.max_sequence_length;
    let ck_vocab = vocab.unwrap_or(ck.config.embedding_size);
    Arc::new(AppState {
        engine: engine::start(ck, engine::EngineConfig { queue, max_batch }),
        tokenizer,
        model_name: "tiny".into(),
        max_sequence_length: max,
        vocab_size: ck_vocab,
        defaults: Defaults {
            max_tokens_limit: max,
            ..Defaults::default()
        },
        request_timeout: Duration::from_secs(60),
        started: Instant::now(),
        served: AtomicU64::new(0),
    })
}

async fn call(
    s: &Arc<AppState>,
    method: &str,
    path: &str,
    body: impl Into<Body>,
) -> (StatusCode, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let resp = server::router(s.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, bytes)
}

/// A fake model for the engine: every logit row puts all its weight on `token`, or every call
/// fails (an internal error, as a device failure would be).
struct Fake {
    special: llada::SpecialTokens,
    vocab: usize,
    token: u32,
    fail: bool,
}

impl engine::Predictors for Fake {
    fn predictor(&self) -> Box<dyn MaskPredictor + '_> {
        Box::new(FakePredictor(self))
    }
    fn special(&self) -> &llada::SpecialTokens {
        &self.special
    }
}

struct FakePredictor<'a>(&'a Fake);

impl MaskPredictor for FakePredictor<'_> {
    fn logits_at(
        &mut self,
        x: &Tensor,
        _key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> llada::Result<Tensor> {
        let f = self.0;
        if f.fail {
            return Err(llada::Error::Tensor(llada::candle_core::Error::Msg(
                "device lost".into(),
            )));
        }
        let b = x.dim(0)?;
        let mut row = vec![0f32; f.vocab];
        row[f.token as usize] = 30.0;
        let data = row.repeat(b * rows.len());
        Ok(Tensor::from_vec(
            data,
            (b, rows.len(), f.vocab),
            &Device::Cpu,
        )?)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// A server whose engine runs `fake` (the tiny model's tokenizer for text).
fn fake_state(fake: Fake) -> Arc<AppState> {
    let tokenizer = Tokenizer::from_dir(&golden_dir(), &common::model(DType::F32).config).unwrap();
    let vocab = fake.vocab;
    Arc::new(AppState {
        engine: engine::start(
            fake,
            engine::EngineConfig {
                queue: 4,
                max_batch: 2,
            },
        ),
        tokenizer,
        model_name: "fake".into(),
        max_sequence_length: 256,
        vocab_size: vocab,
        defaults: Defaults {
            max_tokens_limit: 256,
            ..Defaults::default()
        },
        request_timeout: Duration::from_secs(60),
        started: Instant::now(),
        served: AtomicU64::new(0),
    })
}

fn fake(fail: bool) -> Fake {
    let ck = common::model(DType::F32);
    Fake {
        special: ck.special,
        vocab: ck.config.embedding_size,
        token: 40,
        fail,
    }
}

#[tokio::test]
async fn the_engine_runs_any_predictor_and_internal_errors_are_500() {
    // a fake model whose every prediction is token 40: the answer is that token, max_tokens times
    let s = fake_state(fake(false));
    let (st, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8, "cache": "none", "threshold": null})
            .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    let want = s.tokenizer.decode(&[40; 8], true).unwrap();
    assert_eq!(v["choices"][0]["text"], json!(want));
    assert_eq!(v["llada"]["nfe"], 8);
    // a model that fails: 500 with a generic message (the cause goes to the log), and the server
    // keeps serving
    let s = fake_state(fake(true));
    let (st, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8, "cache": "none"}).to_string(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(!String::from_utf8_lossy(&b).contains("device lost"));
    let (st, _) = call(&s, "GET", "/health", Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}

#[tokio::test]
async fn chat_and_completion_follow_openai_shapes() {
    let s = state(8, 4);
    let (st, b) = call(&s, "POST", "/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "The LORD is my shepherd"}], "max_tokens": 16}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let v = json_of(&b);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let (st, b) = call(&s, "POST", "/v1/completions", json!({"prompt": ["In the beginning", "And God said"], "max_tokens": 8, "cache": "none", "threshold": null}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let v = json_of(&b);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["llada"]["nfe"], 8);
    let (st, b) = call(&s, "GET", "/v1/models", Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json_of(&b)["data"][0]["id"], "tiny");
    let (st, b) = call(&s, "GET", "/health", Body::empty()).await;
    assert_eq!(
        (st, json_of(&b)["status"].clone()),
        (StatusCode::OK, json!("ok"))
    );
    let (st, b) = call(&s, "GET", "/", Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert!(String::from_utf8_lossy(&b).contains("denoise"));
}

/// Greedy generation through the server equals the library's.
#[tokio::test]
async fn server_output_equals_the_library() {
    let s = state(8, 4);
    let (st, b) = call(&s, "POST", "/v1/completions", json!({"prompt": "In the beginning God created the heaven", "max_tokens": 16, "steps": 16, "block_length": 8, "threshold": null, "cache": "none", "early_stop": false}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let text = json_of(&b)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let ck = common::model(DType::F32);
    let tok = ck.tokenizer().unwrap();
    let cfg = llada::SamplerConfig {
        gen_length: 16,
        steps: 16,
        block_length: 8,
        ..Default::default()
    };
    let mut m = ck.model.predictor();
    let g = llada::sampler::generate(
        &mut m,
        &llada::PromptBatch::single(
            tok.encode("In the beginning God created the heaven")
                .unwrap(),
        ),
        &cfg,
        &ck.special,
        &mut llada::Rng::new(0),
        &mut llada::sampler::no_progress,
    )
    .unwrap();
    assert_eq!(text, tok.decode_answer(&g.generated_ids[0]).unwrap());
}

#[tokio::test]
async fn streaming_sends_chunks_denoise_events_and_done() {
    let s = state(8, 4);
    let (st, b) = call(&s, "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Blessed are the meek"}], "max_tokens": 16, "stream": true, "denoise": true}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let body = String::from_utf8(b).unwrap();
    let mut chunks = 0;
    let mut denoise = 0;
    let mut content = String::new();
    for ev in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let kind = ev
            .lines()
            .find_map(|l| l.strip_prefix("event:"))
            .map(str::trim);
        let data: String = ev
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .collect();
        match kind {
            Some("denoise") => {
                denoise += 1;
                let d: Value = serde_json::from_str(&data).unwrap();
                assert_eq!(d["tokens"].as_array().unwrap().len(), 16);
            }
            Some("done") | None if data == "[DONE]" => {}
            Some("done") => {}
            None => {
                let d: Value = serde_json::from_str(&data).unwrap();
                assert_eq!(d["object"], "chat.completion.chunk");
                if let Some(c) = d["choices"][0]["delta"]["content"].as_str() {
                    content += c;
                }
                chunks += 1;
            }
            Some(other) => panic!("unexpected event {other}: {data}"),
        }
    }
    assert!(body.trim_end().ends_with("data: [DONE]"));
    assert!(
        denoise >= 1 && chunks >= 2,
        "{denoise} denoise events, {chunks} chunks"
    );
    let _ = content;
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_the_server_keeps_serving() {
    let s = state(8, 4);
    let cases: Vec<(&str, Body, StatusCode, Option<&str>)> = vec![
        ("/v1/chat/completions", Body::from("{not json"), StatusCode::BAD_REQUEST, None),
        ("/v1/chat/completions", Body::from(vec![0xff, 0xfe, 0x00]), StatusCode::BAD_REQUEST, None),
        ("/v1/chat/completions", Body::from("[1,2]"), StatusCode::BAD_REQUEST, None),
        ("/v1/chat/completions", Body::from(json!({"messages": "hi"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("messages")),
        ("/v1/chat/completions", Body::from(json!({"messages": []}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("messages")),
        ("/v1/chat/completions", Body::from(json!({"messages": [{"role": "user", "content": 5}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("messages[0].content")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "max_tokens": -3}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("max_tokens")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "max_tokens": 123456789012345678u64}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("max_tokens")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "temperature": "hot"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("temperature")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "max_tokens": 32, "steps": 10, "block_length": 8, "threshold": null}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("steps")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "threshold": 0.8, "factor": 2.0}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("threshold")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "cfg_scale": 1.0, "cache": "dual"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("cache")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "cache": "quad"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("cache")),
        ("/v1/completions", Body::from(json!({"prompt": "x", "model": "gpt-4o"}).to_string()), StatusCode::NOT_FOUND, Some("model")),
        ("/v1/completions", Body::from(json!({"prompt": "word ".repeat(300), "max_tokens": 16}).to_string()), StatusCode::PAYLOAD_TOO_LARGE, None),
        ("/v1/score", Body::from(json!({"prompt": "x", "answer": ""}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("answer")),
        ("/v1/score", Body::from(json!({"prompt": "x", "answer": " y", "mc_num": 30, "batch": 16}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, Some("mc_num")),
        ("/nope", Body::empty(), StatusCode::NOT_FOUND, None),
    ];
    for (path, body, want, param) in cases {
        let (st, b) = call(&s, "POST", path, body).await;
        assert_eq!(st, want, "{path}: {}", String::from_utf8_lossy(&b));
        let v = json_of(&b);
        assert!(v["error"]["message"].is_string());
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{}", v);
        }
    }
    let (st, _) = call(&s, "GET", "/health", Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
}

/// Threshold and factor together are refused (before, the threshold silently won), with both
/// named in the message.
#[tokio::test]
async fn threshold_with_factor_is_422_naming_both() {
    let s = state(8, 4);
    let (st, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8, "threshold": 0.9, "factor": 1.0})
            .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let v = json_of(&b);
    assert_eq!(v["error"]["param"], "threshold");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("threshold=0.9") && msg.contains("factor=1"),
        "{msg}"
    );
    // a factor alone replaces the default threshold, `null` turns it off
    let (st, _) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8, "factor": 1.0}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8, "threshold": null, "factor": 1.0})
            .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

/// A prompt with a token id the model has no embedding for is refused (422), not run.
#[tokio::test]
async fn token_ids_outside_the_vocabulary_are_422() {
    let s = state_with_vocab(8, 4, Some(5));
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "In the beginning", "max_tokens": 8}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "In the beginning"}], "max_tokens": 8}),
        ),
    ] {
        let (st, b) = call(&s, "POST", path, body.to_string()).await;
        assert_eq!(
            st,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {}",
            String::from_utf8_lossy(&b)
        );
        let v = json_of(&b);
        assert_eq!(v["error"]["param"], "prompt");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("embedding_size=5"), "{msg}");
    }
}

/// A full queue answers 429; waiting requests with the same settings and prompt length share a
/// batch (and get the same answer they would alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_is_429_and_compatible_requests_batch() {
    let s = state(2, 8);
    let body = json!({"prompt": "In the beginning God created", "max_tokens": 200, "steps": 200, "block_length": 200, "threshold": null, "cache": "none", "early_stop": false}).to_string();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            call(&s, "POST", "/v1/completions", body).await
        }));
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    for h in handles {
        let (st, b) = h.await.unwrap();
        match st {
            StatusCode::OK => ok.push(json_of(&b)),
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(json_of(&b)["error"]["type"], "overloaded_error");
            }
            other => panic!("{other}"),
        }
    }
    assert!(
        refused > 0,
        "no 429 with a queue of 2 and 8 concurrent requests"
    );
    assert!(ok.len() >= 2);
    let texts: Vec<&Value> = ok.iter().map(|v| &v["choices"][0]["text"]).collect();
    assert!(texts.windows(2).all(|w| w[0] == w[1]));
    assert!(
        ok.iter()
            .any(|v| v["llada"]["batch_size"].as_u64().unwrap() > 1),
        "no batching happened"
    );
}
