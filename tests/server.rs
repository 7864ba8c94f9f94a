//! The HTTP server through its router (no sockets): OpenAI shapes, streaming, the denoising
//! stream, validation and the one error mapping, the bounded queue, batching; the request guards
//! (origin, content type, body size), the per-request work bounds and deadlines of scoring, the
//! chat template off the runtime; and, on loopback sockets, the connection limits.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::golden_dir;
use http_body_util::BodyExt;
use llada::candle_core::{DType, Device, Tensor};
use llada::model::MaskPredictor;
use llada::server::{self, engine, openai::Defaults, AppState, Limits};
use llada::{Checkpoint, Tokenizer};
use serde_json::{json, Value};
use tower::ServiceExt;

fn state(queue: usize, max_batch: usize) -> Arc<AppState> {
    state_with_vocab(queue, max_batch, None)
}

/// The tiny model's server; `vocab` pretends the model has fewer token ids than its tokenizer.
fn state_with_vocab(queue: usize, max_batch: usize, vocab: Option<usize>) -> Arc<AppState> {
    state_of(&golden_dir(), queue, max_batch, vocab)
}

/// The server of the checkpoint in `dir`.
fn state_of(
    dir: &std::path::Path,
    queue: usize,
    max_batch: usize,
    vocab: Option<usize>,
) -> Arc<AppState> {
    let ck = Checkpoint::load(dir, Some(DType::F32), &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(dir, &ck.config).unwrap();
    let max = ck.config.max_sequence_length;
    let ck_vocab = vocab.unwrap_or(ck.config.embedding_size);
    Arc::new(AppState {
        engine: engine::start(
            ck,
            engine::EngineConfig {
                queue,
                max_batch,
                on_idle: None,
            },
        ),
        tokenizer,
        model_name: "tiny".into(),
        max_sequence_length: max,
        vocab_size: ck_vocab,
        defaults: Defaults {
            max_tokens_limit: max,
            ..Defaults::default()
        },
        limits: Limits {
            request_timeout: Duration::from_secs(60),
            ..Limits::default()
        },
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
    call_with(
        s,
        method,
        path,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

/// A request with exactly these headers.
async fn call_with(
    s: &Arc<AppState>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body.into()).unwrap();
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
/// fails (an internal error, as a device failure would be, its message carrying a backtrace), or
/// panics; each call takes `delay` and is counted in `calls`.
struct Fake {
    special: llada::SpecialTokens,
    vocab: usize,
    token: u32,
    fail: bool,
    panic: bool,
    delay: Duration,
    calls: Arc<AtomicUsize>,
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
        f.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(f.delay);
        if f.fail {
            return Err(llada::Error::Tensor(llada::candle_core::Error::Msg(
                format!(
                    "device lost\n{}",
                    std::backtrace::Backtrace::force_capture()
                ),
            )));
        }
        if f.panic {
            panic!("fake model panicked at {}:{}", file!(), line!());
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
    fake_state_with(fake, Limits::default(), None)
}

/// [`fake_state`] with these limits (a 60 s request timeout unless they say otherwise) and an
/// idle hook.
fn fake_state_with(fake: Fake, limits: Limits, on_idle: Option<fn()>) -> Arc<AppState> {
    let tokenizer = Tokenizer::from_dir(&golden_dir(), &common::model(DType::F32).config).unwrap();
    let vocab = fake.vocab;
    let limits = if limits.request_timeout == server::DEFAULT_REQUEST_TIMEOUT {
        Limits {
            request_timeout: Duration::from_secs(60),
            ..limits
        }
    } else {
        limits
    };
    Arc::new(AppState {
        engine: engine::start(
            fake,
            engine::EngineConfig {
                queue: 4,
                max_batch: 2,
                on_idle,
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
        limits,
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
        panic: false,
        delay: Duration::ZERO,
        calls: Arc::new(AtomicUsize::new(0)),
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
    // the cause (with its backtrace and source paths) is logged, never sent
    let text = String::from_utf8_lossy(&b).to_string();
    assert_eq!(
        json_of(&b)["error"]["message"],
        server::error::INTERNAL,
        "{text}"
    );
    assert!(
        !text.contains("device lost") && !text.contains(".rs"),
        "{text}"
    );
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
    // speed figures count generated tokens only
    let done = v["usage"]["completion_tokens"].as_f64().unwrap();
    let l = &v["llada"];
    assert_eq!(l["tokens_per_forward"].as_f64().unwrap(), done / 8.0);
    let rate = done / l["seconds"].as_f64().unwrap();
    assert!((l["completion_tokens_per_s"].as_f64().unwrap() - rate).abs() <= 1e-6 * rate.max(1.0));
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
    server_output_equals_the_library_for(&golden_dir()).await;
}

/// The same on LLaDA-MoE (the golden llada-moe checkpoint), with the scores of `/v1/score`.
#[tokio::test]
async fn llada_moe_is_served_as_the_library_runs_it() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llada-moe");
    server_output_equals_the_library_for(&dir).await;
    let s = state_of(&dir, 8, 4, None);
    let (st, b) = call(&s, "POST", "/v1/score", json!({"prompt": "In the beginning God", "answer": " created the heaven", "mc_num": 8, "batch": 8}).to_string()).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    let ll = v["log_likelihood"].as_f64().unwrap();
    assert!(ll.is_finite() && ll < 0.0, "{v}");
    assert_eq!(v["answer_tokens"], 7, "{v}");
}

/// The same on Dream, and Dream's official sampler through the API (`alg`): the golden
/// `diffusion_generate` answer.
#[tokio::test]
async fn dream_is_served_as_the_library_runs_it() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dream");
    server_output_equals_the_library_for(&dir).await;
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases/generate.json")).unwrap())
            .unwrap();
    let case = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "g_entropy_L32_s32")
        .unwrap();
    let s = state_of(&dir, 8, 4, None);
    let prompt = "In the beginning God created the heaven and the earth. And the earth was";
    let (st, b) = call(&s, "POST", "/v1/completions", json!({"prompt": prompt, "max_tokens": 32, "steps": 32, "alg": "entropy", "temperature": 0}).to_string()).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    assert_eq!(v["choices"][0]["text"], case["generated_text"][0], "{v}");
    assert_eq!(v["llada"]["nfe"], 32, "{v}");
    // a bad Dream setting is a 422 naming it
    let (st, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 8, "alg": "origin", "threshold": 0.9}).to_string(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(json_of(&b)["error"]["param"], "alg");
}

/// An LLaDA2 model is served with its block-diffusion sampler (the defaults of
/// `Defaults::for_model`: exact cache, EOS return), as the library runs it; its settings go
/// through the API, and a cache with LLaDA2.1's editing is a 422 naming it.
#[tokio::test(flavor = "multi_thread")]
async fn llada2_is_served_with_block_diffusion() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llada2-moe");
    let ck = common::model_in(&dir, DType::F32);
    let defaults = Defaults::for_model(&ck.config, llada::sampler::Preset::Fast);
    assert!(defaults.sampler.block_diffusion.is_some());
    let s = {
        let st = state_of(&dir, 8, 4, None);
        Arc::new(AppState {
            engine: engine::start(
                Checkpoint::load(&dir, Some(DType::F32), &Device::Cpu).unwrap(),
                engine::EngineConfig {
                    queue: 8,
                    max_batch: 4,
                    on_idle: None,
                },
            ),
            tokenizer: Tokenizer::from_dir(&dir, &ck.config).unwrap(),
            model_name: "llada2".into(),
            max_sequence_length: st.max_sequence_length,
            vocab_size: st.vocab_size,
            defaults: Defaults {
                max_tokens_limit: st.max_sequence_length,
                ..defaults
            },
            limits: Limits {
                request_timeout: Duration::from_secs(60),
                ..Limits::default()
            },
            started: Instant::now(),
            served: AtomicU64::new(0),
        })
    };
    let prompt = "And Moses said unto the people, Fear ye not";
    let tok = ck.tokenizer().unwrap();
    let mut expect = Vec::new();
    for editing in [None, Some(0.9)] {
        let mut body = json!({"prompt": prompt, "max_tokens": 24, "block_length": 8, "steps": 8, "temperature": 0});
        let mut cfg = llada::SamplerConfig {
            gen_length: 24,
            block_length: 8,
            steps: 8,
            ..s.defaults.sampler.clone()
        };
        if let Some(e) = editing {
            body["editing_threshold"] = json!(e);
            body["cache"] = json!("none");
            cfg.cache = llada::sampler::CacheMode::None;
            cfg.block_diffusion.as_mut().unwrap().editing =
                Some(llada::sampler::block_diffusion::Editing {
                    editing_threshold: e,
                    ..llada::sampler::block_diffusion::DEFAULT_EDITING
                });
        }
        let (st, b) = call(&s, "POST", "/v1/completions", body.to_string()).await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let text = json_of(&b)["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        let mut m = ck.model.predictor();
        let g = llada::sampler::generate(
            &mut m,
            &llada::PromptBatch::single(tok.encode(prompt).unwrap()),
            &cfg,
            &ck.special,
            &mut llada::Rng::new(0),
            &mut llada::sampler::no_progress,
        )
        .unwrap();
        assert_eq!(
            text,
            tok.decode_answer(&g.generated_ids[0]).unwrap(),
            "editing {editing:?}"
        );
        expect.push(text);
    }
    let (st, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 8, "editing_threshold": 0.9, "cache": "dual"})
            .to_string(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(json_of(&b)["error"]["param"], "cache");
    // the block-diffusion keys on another model are a 422 naming the key
    let tiny = state_of(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny"),
        8,
        4,
        None,
    );
    let (st, b) = call(
        &tiny,
        "POST",
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 8, "minimal_topk": 2}).to_string(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(json_of(&b)["error"]["param"], "minimal_topk");
}

async fn server_output_equals_the_library_for(dir: &std::path::Path) {
    let s = state_of(dir, 8, 4, None);
    let (st, b) = call(&s, "POST", "/v1/completions", json!({"prompt": "In the beginning God created the heaven", "max_tokens": 16, "steps": 16, "block_length": 8, "threshold": null, "cache": "none", "early_stop": false}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let text = json_of(&b)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let ck = common::model_in(dir, DType::F32);
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

/// A panic inside the engine and an error carrying a backtrace are both a 500 with the fixed
/// message (before the audit's fix, 500 bodies carried backtraces with source paths).
#[tokio::test]
async fn internal_failures_send_no_backtrace_or_source_path() {
    let s = fake_state(Fake {
        panic: true,
        ..fake(false)
    });
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "In the beginning", "max_tokens": 8, "cache": "none"}),
        ),
        (
            "/v1/score",
            json!({"prompt": "In the beginning", "answer": " God created", "mc_num": 2, "batch": 1}),
        ),
    ] {
        let (st, b) = call(&s, "POST", path, body.to_string()).await;
        let text = String::from_utf8_lossy(&b).to_string();
        assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
        assert!(
            !text.contains(".rs") && !text.contains("panicked"),
            "{text}"
        );
    }
    let (st, _) = call(&s, "GET", "/health", Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
}

/// The work of a score request is bounded before it runs: rows × tokens of one forward pass and
/// the number of samples (before: `batch` 256 over a long text grew the process by gigabytes).
#[tokio::test]
async fn score_work_is_bounded_before_it_runs() {
    let f = fake(false);
    let calls = f.calls.clone();
    let limits = Limits {
        score: llada::score::ScoreLimits {
            max_mc_num: 64,
            max_batch_tokens: 200,
        },
        ..Limits::default()
    };
    let s = fake_state_with(f, limits, None);
    let prompt = "In the beginning God created the heaven and the earth";
    let pair = |extra: Value| {
        let mut v = json!({"prompt": prompt, "answer": " And the earth was without form"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v.to_string()
    };
    let (st, b) = call(
        &s,
        "POST",
        "/v1/score",
        pair(json!({"mc_num": 64, "batch": 64})),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let v = json_of(&b);
    assert_eq!(v["error"]["param"], "batch");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("limit of 200 tokens per pass"), "{msg}");
    // guidance doubles the rows
    let (st, b) = call(
        &s,
        "POST",
        "/v1/score",
        pair(json!({"mc_num": 8, "batch": 8, "cfg_scale": 1.0})),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (st, b) = call(
        &s,
        "POST",
        "/v1/score",
        pair(json!({"mc_num": 128, "batch": 1})),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json_of(&b)["error"]["param"], "mc_num");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "a refused request ran");
    // within the bounds it runs: mc_num / batch passes
    let (st, b) = call(
        &s,
        "POST",
        "/v1/score",
        pair(json!({"mc_num": 8, "batch": 4})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json_of(&b)["nfe"], 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A score request stops at its deadline (504) and the engine is free at once for the next
/// request (before: the engine went on for the whole estimate, and every later request timed out
/// too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_stops_at_its_deadline() {
    let f = Fake {
        delay: Duration::from_millis(50),
        ..fake(false)
    };
    let calls = f.calls.clone();
    let s = fake_state_with(
        f,
        Limits {
            request_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
        None,
    );
    // 1024 passes of 50 ms: far past the 1 s timeout
    let body = json!({"prompt": "In the beginning", "answer": " God created the heaven", "mc_num": 1024, "batch": 1});
    let (st, b) = call(&s, "POST", "/v1/score", body.to_string()).await;
    assert_eq!(
        st,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (st, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 4, "cache": "none", "threshold": null})
            .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert!(calls.load(Ordering::SeqCst) < 200, "the estimate ran on");
}

/// A client that goes away cancels its score request between mini-batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_stops_when_the_client_goes_away() {
    let f = Fake {
        delay: Duration::from_millis(50),
        ..fake(false)
    };
    let calls = f.calls.clone();
    let s = fake_state(f);
    let body = json!({"prompt": "In the beginning", "answer": " God created the heaven", "mc_num": 1024, "batch": 1});
    let s2 = s.clone();
    let req = tokio::spawn(async move { call(&s2, "POST", "/v1/score", body.to_string()).await });
    for _ in 0..200 {
        if calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    req.abort();
    let _ = req.await;
    // the engine stops within a pass or two: the counter settles far below 1024
    let mut last = usize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = calls.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < 100,
        "{last} passes: the estimate ran on after the client left"
    );
}

static IDLE_CALLS: AtomicUsize = AtomicUsize::new(0);

fn count_idle() {
    IDLE_CALLS.fetch_add(1, Ordering::SeqCst);
}

/// The engine calls its idle hook (the binary returns freed memory there) once work is done.
#[tokio::test]
async fn the_engine_returns_memory_when_it_goes_idle() {
    let s = fake_state_with(fake(false), Limits::default(), Some(count_idle));
    let before = IDLE_CALLS.load(Ordering::SeqCst);
    let (st, _) = call(
        &s,
        "POST",
        "/v1/score",
        json!({"prompt": "In the beginning", "answer": " God created", "mc_num": 4, "batch": 2})
            .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let mut n = 0;
    for _ in 0..250 {
        n = IDLE_CALLS.load(Ordering::SeqCst) - before;
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(n, 1, "the idle hook ran {n} times after one job");
}

/// POSTs must be declared JSON (415 otherwise, OpenAI-style) and browser pages of other origins
/// are refused (403): before, a `text/plain` POST from any page was executed.
#[tokio::test]
async fn cross_origin_and_non_json_posts_are_refused() {
    let s = fake_state(fake(false));
    let body = json!({"prompt": "In the beginning", "max_tokens": 4, "cache": "none"}).to_string();
    for headers in [
        vec![("content-type", "text/plain")],
        vec![],
        vec![("content-type", "application/x-www-form-urlencoded")],
    ] {
        let (st, b) = call_with(&s, "POST", "/v1/completions", &headers, body.clone()).await;
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{headers:?}");
        let v = json_of(&b);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/json"));
    }
    let ok = [("content-type", "Application/JSON; charset=utf-8")];
    let (st, _) = call_with(&s, "POST", "/v1/completions", &ok, body.clone()).await;
    assert_eq!(st, StatusCode::OK);
    // another origin's page: refused, whatever the method
    let evil = [
        ("content-type", "application/json"),
        ("origin", "http://evil.example"),
        ("host", "127.0.0.1:8000"),
    ];
    for (method, path) in [
        ("POST", "/v1/completions"),
        ("POST", "/v1/score"),
        ("GET", "/health"),
    ] {
        let (st, b) = call_with(&s, method, path, &evil, body.clone()).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}");
        let v = json_of(&b);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("http://evil.example"));
    }
    // the server's own page (origin host:port = Host) is served
    let own = [
        ("content-type", "application/json"),
        ("origin", "http://127.0.0.1:8000"),
        ("host", "127.0.0.1:8000"),
    ];
    let (st, _) = call_with(&s, "POST", "/v1/completions", &own, body.clone()).await;
    assert_eq!(st, StatusCode::OK);
    for host in ["localhost:8000", "[::1]:8000"] {
        let own = [
            ("content-type", "application/json"),
            ("origin", &*format!("http://{host}")),
            ("host", host),
        ];
        let (st, _) = call_with(&s, "POST", "/v1/completions", &own, body.clone()).await;
        assert_eq!(st, StatusCode::OK, "{host}");
    }
    // DNS rebinding: a foreign domain resolving to this server looks same-origin; a domain name
    // must be allowed by name
    let rebound = [
        ("content-type", "application/json"),
        ("origin", "http://rebind.example:8000"),
        ("host", "rebind.example:8000"),
    ];
    let (st, _) = call_with(&s, "POST", "/v1/completions", &rebound, body.clone()).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // an allowed origin is served
    let s = fake_state_with(
        fake(false),
        Limits {
            allowed_origins: vec!["http://evil.example".into()],
            ..Limits::default()
        },
        None,
    );
    let (st, _) = call_with(&s, "POST", "/v1/completions", &evil, body).await;
    assert_eq!(st, StatusCode::OK);
}

/// A body past the limit is 413 with an OpenAI-style JSON error naming the limit (before: plain
/// text).
#[tokio::test]
async fn a_body_past_the_limit_is_413_json() {
    let s = fake_state_with(
        fake(false),
        Limits {
            max_body_bytes: 1000,
            ..Limits::default()
        },
        None,
    );
    let big = json!({"prompt": "word ".repeat(400)}).to_string();
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/score"] {
        let (st, b) = call(&s, "POST", path, big.clone()).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let v = json_of(&b);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1000 bytes"),
            "{v}"
        );
    }
}

/// `seed` of a score request must be an integer (before: "abc" was silently 0); `logprobs`, which
/// this server cannot return, is refused when asked for (before: silently ignored).
#[tokio::test]
async fn score_seed_and_logprobs_are_checked() {
    let s = fake_state(fake(false));
    let (st, b) = call(
        &s,
        "POST",
        "/v1/score",
        json!({"prompt": "In the beginning", "answer": " God", "seed": "abc"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json_of(&b)["error"]["param"], "seed");
    for (path, body, param) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 2}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
            "top_logprobs",
        ),
    ] {
        let (st, b) = call(&s, "POST", path, body.to_string()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        let v = json_of(&b);
        assert_eq!(v["error"]["param"], param);
    }
    // asking for none is fine
    for lp in [json!(null), json!(false), json!(0)] {
        let (st, _) = call(
            &s,
            "POST",
            "/v1/completions",
            json!({"prompt": "In the beginning", "max_tokens": 4, "cache": "none", "logprobs": lp})
                .to_string(),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "logprobs={lp}");
    }
}

/// A copy of the tiny model's tokenizer files whose chat template is `template`.
fn tokenizer_with_template(template: &str) -> (tempfile::TempDir, Tokenizer) {
    let d = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "special_tokens_map.json", "config.json"] {
        std::fs::copy(golden_dir().join(f), d.path().join(f)).unwrap();
    }
    let mut tc: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    tc["chat_template"] = json!(template);
    std::fs::write(d.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    let tok = Tokenizer::from_dir(d.path(), &common::model(DType::F32).config).unwrap();
    (d, tok)
}

/// A template that loops without end runs out of fuel (422 naming the messages) and renders off
/// the runtime's threads: `/health` is answered while it runs, even on a one-thread runtime
/// (before: it hung the handler, and two such requests made `/health` time out).
#[tokio::test(flavor = "current_thread")]
async fn a_runaway_chat_template_is_bounded_and_health_stays_responsive() {
    let (_dir, tokenizer) = tokenizer_with_template(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x",
    );
    let base = fake_state(fake(false));
    let s = Arc::new(AppState {
        engine: base.engine.clone(),
        tokenizer,
        model_name: "fake".into(),
        max_sequence_length: 256,
        vocab_size: base.vocab_size,
        defaults: base.defaults.clone(),
        limits: base.limits.clone(),
        started: Instant::now(),
        served: AtomicU64::new(0),
    });
    let s2 = s.clone();
    let chat = tokio::spawn(async move {
        call(
            &s2,
            "POST",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string(),
        )
        .await
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let (st, _) = call(&s, "GET", "/health", Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        !chat.is_finished(),
        "the template rendered on the runtime's thread: /health waited for it"
    );
    let (st, b) = chat.await.unwrap();
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let v = json_of(&b);
    assert_eq!(v["error"]["param"], "messages");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("fuel"),
        "{v}"
    );
}

/// The live page inserts data as text only (before: an error message went in with innerHTML).
#[test]
fn the_live_page_inserts_no_markup() {
    assert!(!server::PAGE.contains("innerHTML"));
    assert!(!server::PAGE.contains("outerHTML") && !server::PAGE.contains("insertAdjacentHTML"));
}

/// Start-up settings follow the rules of requests: a zero timeout, queue or connection cap, a
/// default answer longer than a request may ask for, a malformed origin are refused.
#[test]
fn start_up_settings_are_checked() {
    let name = |e: llada::Error| match e {
        llada::Error::InvalidSetting { name, .. } => name,
        other => panic!("{other}"),
    };
    assert!(Limits::default().validate().is_ok());
    let bad = Limits {
        request_timeout: Duration::ZERO,
        ..Limits::default()
    };
    assert_eq!(name(bad.validate().unwrap_err()), "timeout");
    let bad = Limits {
        request_timeout: Duration::from_secs(u64::MAX),
        ..Limits::default()
    };
    assert_eq!(name(bad.validate().unwrap_err()), "timeout");
    let bad = Limits {
        allowed_origins: vec!["evil.example".into()],
        ..Limits::default()
    };
    assert_eq!(name(bad.validate().unwrap_err()), "allow-origin");
    let bad = Limits {
        score: llada::score::ScoreLimits {
            max_mc_num: 1,
            max_batch_tokens: 0,
        },
        ..Limits::default()
    };
    assert_eq!(name(bad.validate().unwrap_err()), "score-max-batch-tokens");
    let conn = server::listen::ConnLimits {
        max_connections: 0,
        ..Default::default()
    };
    assert_eq!(name(conn.validate().unwrap_err()), "max-connections");
    let conn = server::listen::ConnLimits {
        header_timeout: Duration::ZERO,
        ..Default::default()
    };
    assert_eq!(name(conn.validate().unwrap_err()), "header-timeout");
    let e = engine::EngineConfig {
        queue: 0,
        max_batch: 1,
        on_idle: None,
    };
    assert_eq!(name(e.validate().unwrap_err()), "queue");
    let d = Defaults {
        max_tokens_limit: 32,
        ..Defaults::default()
    };
    assert_eq!(name(d.check().unwrap_err()), "default-max-tokens");
}

/// `llada serve --timeout 0` fails at start naming the option (before: it started, then every
/// request failed).
#[test]
fn serve_refuses_bad_settings_at_start() {
    for args in [
        ["--timeout", "0"],
        ["--default-threshold", "5"],
        ["--default-max-tokens", "0"],
        ["--max-connections", "0"],
        ["--timeout", "18446744073709551615"],
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
            .arg("serve")
            .arg(golden_dir())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = status.unwrap_or_else(|| panic!("{args:?}: the server started"));
        assert!(!status.success(), "{args:?}");
        let flag = args[0].trim_start_matches("--");
        let want = if flag == "default-threshold" {
            "threshold"
        } else {
            flag
        };
        let want = if want == "default-max-tokens" {
            "gen_length"
        } else {
            want
        };
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Serves `s` on a loopback port with these connection limits.
async fn live(s: Arc<AppState>, conn: server::listen::ConnLimits) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::listen::serve(
        listener,
        server::router(s),
        conn,
        std::future::pending(),
    ));
    addr
}

/// Reads until the server closes the connection (bounded); what it sent.
async fn read_to_close(c: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut out)).await;
    r.ok().map(|_| out)
}

/// A client that never finishes its headers is disconnected after the header timeout (before:
/// such connections stayed open for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_headers_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let addr = live(
        fake_state(fake(false)),
        server::listen::ConnLimits {
            header_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_to_close(&mut c).await.is_some(),
        "the connection with partial headers stayed open"
    );
    // a whole request on a fresh connection is served
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_to_close(&mut c).await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

/// Beyond the connection cap a client is answered 503 with a JSON error and the connection is
/// closed; once connections close, new ones are served (before: ~20,000 idle connections ran the
/// process out of file descriptors and nothing was served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_get_503() {
    use tokio::io::AsyncWriteExt;
    let addr = live(
        fake_state(fake(false)),
        server::listen::ConnLimits {
            max_connections: 2,
            header_timeout: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await;
    let held: Vec<_> = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ]
    .into();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let get = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(get).await.unwrap();
    let out = read_to_close(&mut c).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v = json_of(body.as_bytes());
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max-connections"));
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(get).await.unwrap();
        if read_to_close(&mut c)
            .await
            .unwrap()
            .starts_with(b"HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "no connection served after the held ones closed");
}

/// Data lines of an SSE body (`event:` kind, data), in order.
fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|ev| {
            let kind = ev
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .map(|k| k.trim().to_string());
            let data: String = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect();
            (kind, data)
        })
        .collect()
}

/// `n` answers per prompt in OpenAI's order; greedy copies are equal to the one answer alone,
/// sampled ones are reproducible with the seed; the prompt tokens are counted once per prompt.
#[tokio::test]
async fn n_answers_per_prompt() {
    let s = state(8, 4);
    let one = json!({"prompt": "In the beginning", "max_tokens": 8, "temperature": 0});
    let (st, b) = call(&s, "POST", "/v1/completions", one.to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let alone = json_of(&b);
    let mut three = one.clone();
    three["n"] = json!(3);
    let (st, b) = call(&s, "POST", "/v1/completions", three.to_string()).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], alone["choices"][0]["text"]);
    }
    assert_eq!(v["usage"]["prompt_tokens"], alone["usage"]["prompt_tokens"]);
    let two_prompts = json!({"prompt": ["In the beginning", "And God said"], "n": 2, "max_tokens": 8,
        "temperature": 1.0, "seed": 7, "cache": "none", "threshold": null});
    let (st, b1) = call(&s, "POST", "/v1/completions", two_prompts.to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let (_, b2) = call(&s, "POST", "/v1/completions", two_prompts.to_string()).await;
    assert_eq!(json_of(&b1)["choices"], json_of(&b2)["choices"]);
    assert_eq!(json_of(&b1)["choices"].as_array().unwrap().len(), 4);
    // chat: n answers of one conversation
    let (st, b) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 8})
            .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json_of(&b)["choices"][1]["index"], 1);
    // beyond the server's bound on a request's canvases: 413
    let small = with_limits(
        &s,
        Limits {
            max_batch_tokens: 500,
            ..s.limits.clone()
        },
    );
    let (st, b) = call(
        &small,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "n": 4, "max_tokens": 128}).to_string(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(String::from_utf8_lossy(&b).contains("--max-batch-tokens"));
    // beyond the bound, and with a stream: 422 naming n
    for body in [
        json!({"prompt": ["a", "b", "c"], "n": 6, "max_tokens": 8}),
        json!({"prompt": "a", "n": 2, "stream": true, "max_tokens": 8}),
    ] {
        let (st, b) = call(&s, "POST", "/v1/completions", body.to_string()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(json_of(&b)["error"]["param"], "n");
    }
}

/// `stream_options.include_usage` adds a last chunk with no choices and the usage; the page's
/// `done` event counts the answer's own tokens.
#[tokio::test]
async fn a_stream_can_end_with_its_usage() {
    let s = state(8, 4);
    let (st, b) = call(&s, "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Blessed are the meek"}], "max_tokens": 16, "stream": true, "denoise": true, "stream_options": {"include_usage": true}}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let evs = sse_events(&String::from_utf8(b).unwrap());
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let usage: Value = serde_json::from_str(&evs[evs.len() - 2].1).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["object"], "chat.completion.chunk");
    let done: Value = serde_json::from_str(
        &evs.iter()
            .find(|(k, _)| k.as_deref() == Some("done"))
            .unwrap()
            .1,
    )
    .unwrap();
    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage["usage"]["completion_tokens"], done["answer_tokens"]);
    assert!(done["tokens_per_s"].as_f64().unwrap() >= 0.0);
    // without the option: no usage chunk
    let (_, b) = call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8, "stream": true}).to_string(),
    )
    .await;
    let evs = sse_events(&String::from_utf8(b).unwrap());
    assert!(evs.iter().all(|(_, d)| !d.contains("\"usage\"")));
}

/// Penalties a diffusion sampler cannot honour are refused when they ask for something, and
/// accepted at 0 (what clients send by default); `top_p` is honoured.
#[tokio::test]
async fn penalties_are_refused_not_ignored() {
    let s = state(8, 4);
    for (field, v) in [
        ("frequency_penalty", json!(0.5)),
        ("presence_penalty", json!(1)),
    ] {
        let mut body = json!({"prompt": "In the beginning", "max_tokens": 8});
        body[field] = v;
        let (st, b) = call(&s, "POST", "/v1/completions", body.to_string()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        let e = json_of(&b);
        assert_eq!(e["error"]["param"], field);
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("diffusion"));
    }
    let (st, _) = call(&s, "POST", "/v1/completions", json!({"prompt": "In the beginning", "max_tokens": 8, "frequency_penalty": 0, "presence_penalty": 0.0, "top_p": 0.9, "temperature": 0.7}).to_string()).await;
    assert_eq!(st, StatusCode::OK);
}

/// `/health` gives the sampler a request that gives nothing gets (the live page starts from it).
#[tokio::test]
async fn health_gives_the_default_sampler() {
    let s = state(8, 4);
    let (_, b) = call(&s, "GET", "/health", Body::empty()).await;
    let d = json_of(&b)["defaults"].clone();
    let g = server::openai::validate_generation(&json!({}), &s.defaults).unwrap();
    assert_eq!(d["max_tokens"], g.cfg.gen_length);
    assert_eq!(d["steps"], g.cfg.steps);
    assert_eq!(d["block_length"], g.cfg.block_length);
    assert_eq!(d["threshold"], json!(0.9));
    assert_eq!(d["cache"], "dual");
    assert_eq!(d["early_stop"], true);
    assert_eq!(d["block_diffusion"], false);
    assert_eq!(d["base_block_length"], 32);
    // a default answer length the default block does not divide: one block, as a request gets
    let mut odd = s.defaults.clone();
    odd.sampler.gen_length = 100;
    odd.sampler.steps = 100;
    let s2 = Arc::new(AppState {
        engine: s.engine.clone(),
        tokenizer: Tokenizer::open(&golden_dir()).unwrap(),
        model_name: "tiny".into(),
        max_sequence_length: s.max_sequence_length,
        vocab_size: s.vocab_size,
        defaults: odd,
        limits: s.limits.clone(),
        started: Instant::now(),
        served: AtomicU64::new(0),
    });
    let (_, b) = call(&s2, "GET", "/health", Body::empty()).await;
    let d = json_of(&b)["defaults"].clone();
    assert_eq!(
        (
            d["max_tokens"].clone(),
            d["block_length"].clone(),
            d["base_block_length"].clone()
        ),
        (json!(100), json!(100), json!(32))
    );
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One access-log line per request: method, path, status, time, and the answer tokens of a
/// generation; a stream's line when it ends.
#[tokio::test]
async fn every_request_gets_one_log_line() {
    let cap = Captured::default();
    let w = cap.clone();
    let sub = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("llada::access=info"))
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    let _g = tracing::subscriber::set_default(sub);
    let s = state(8, 4);
    call(&s, "GET", "/health", Body::empty()).await;
    call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": 8}).to_string(),
    )
    .await;
    call(
        &s,
        "POST",
        "/v1/completions",
        json!({"prompt": "In the beginning", "max_tokens": -8}).to_string(),
    )
    .await;
    call(
        &s,
        "POST",
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true})
            .to_string(),
    )
    .await;
    let log = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    assert!(lines[0].contains("GET /health 200"), "{log}");
    assert!(
        lines[1].contains("POST /v1/completions 200") && lines[1].contains("answer tokens"),
        "{log}"
    );
    assert!(lines[2].contains("POST /v1/completions 422"), "{log}");
    assert!(
        lines[3].contains("POST /v1/chat/completions 200 stream")
            && lines[3].contains("answer tokens"),
        "{log}"
    );
}

/// The same server (engine, tokenizer, defaults) with other limits.
fn with_limits(s: &Arc<AppState>, limits: Limits) -> Arc<AppState> {
    Arc::new(AppState {
        engine: s.engine.clone(),
        tokenizer: Tokenizer::open(&golden_dir()).unwrap(),
        model_name: s.model_name.clone(),
        max_sequence_length: s.max_sequence_length,
        vocab_size: s.vocab_size,
        defaults: s.defaults.clone(),
        limits,
        started: Instant::now(),
        served: AtomicU64::new(0),
    })
}

/// Batch invariance through the server: greedy requests of different prompt lengths that wait
/// together share a (left-padded) batch and each gets exactly the answer it gets with batching
/// off (`--max-batch 1`); a seeded sampled request gets the same answer whatever runs beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_do_not_depend_on_server_batching() {
    let prompts = [
        "In the beginning God created",
        "And God said",
        "The LORD is my shepherd; I shall not want.",
        "Blessed are the meek: for they shall inherit the earth.",
    ];
    let body = |p: &str, extra: Value| {
        let mut b = json!({"prompt": p, "max_tokens": 32, "steps": 32, "block_length": 32,
            "threshold": null, "cache": "none", "early_stop": false});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let off = state(16, 1);
    let mut alone = Vec::new();
    for p in prompts {
        let (st, b) = call(&off, "POST", "/v1/completions", body(p, json!({}))).await;
        assert_eq!(st, StatusCode::OK);
        let v = json_of(&b);
        assert_eq!(v["llada"]["batch_size"], 1);
        alone.push(v["choices"][0]["text"].clone());
    }
    let sampled = json!({"temperature": 0.8, "seed": 11});
    let (_, b) = call(
        &off,
        "POST",
        "/v1/completions",
        body(prompts[0], sampled.clone()),
    )
    .await;
    let sampled_alone = json_of(&b)["choices"][0]["text"].clone();

    let on = state(16, 8);
    // a long request occupies the engine so that the others wait together
    let blocker = {
        let s = on.clone();
        tokio::spawn(async move {
            call(&s, "POST", "/v1/completions", json!({"prompt": "And it came to pass", "max_tokens": 200, "steps": 200, "block_length": 200, "threshold": null, "cache": "none"}).to_string()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut handles = Vec::new();
    for p in prompts {
        let s = on.clone();
        let b = body(p, json!({}));
        handles.push(tokio::spawn(async move {
            call(&s, "POST", "/v1/completions", b).await
        }));
    }
    let s = on.clone();
    let b = body(prompts[0], sampled);
    let sampled_h = tokio::spawn(async move { call(&s, "POST", "/v1/completions", b).await });
    let mut batched = false;
    for (h, want) in handles.into_iter().zip(&alone) {
        let (st, b) = h.await.unwrap();
        assert_eq!(st, StatusCode::OK);
        let v = json_of(&b);
        assert_eq!(&v["choices"][0]["text"], want);
        batched |= v["llada"]["batch_size"].as_u64().unwrap() > 1;
    }
    // (the engine batches different lengths where left padding is exact: the portable path)
    if !llada::kernels::gemm::cpu_features().avx512f {
        assert!(
            batched,
            "requests of different lengths did not share a batch"
        );
    }
    let (_, b) = sampled_h.await.unwrap();
    assert_eq!(json_of(&b)["choices"][0]["text"], sampled_alone);
    blocker.await.unwrap();
}

/// One-token answers to one prompt that wait together are scored in one forward pass, each
/// exactly as alone (the candidates of a multiple-choice question sent concurrently).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_candidates_score_the_same_together_and_alone() {
    let s = state(16, 8);
    let prompt = "In the beginning God created the heaven and the";
    let tok = Tokenizer::open(&golden_dir()).unwrap();
    let answers: Vec<&str> = [
        " the", " and", " of", " a", " in", ".", ",", " to", "e", "a",
    ]
    .into_iter()
    .filter(|a| tok.encode(a).unwrap().len() == 1)
    .take(5)
    .collect();
    assert!(answers.len() >= 3, "{answers:?}");
    let mut alone = Vec::new();
    for a in &answers {
        let (st, b) = call(
            &s,
            "POST",
            "/v1/score",
            json!({"prompt": prompt, "answer": a}).to_string(),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let v = json_of(&b);
        assert_eq!(v["answer_tokens"], 1, "{a} is not one token");
        alone.push(v["log_likelihood"].as_f64().unwrap());
    }
    let blocker = {
        let s = s.clone();
        tokio::spawn(async move {
            call(&s, "POST", "/v1/completions", json!({"prompt": "And it came to pass", "max_tokens": 200, "steps": 200, "block_length": 200, "threshold": null, "cache": "none"}).to_string()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut hs = Vec::new();
    for a in &answers {
        let s = s.clone();
        let body = json!({"prompt": prompt, "answer": a}).to_string();
        hs.push(tokio::spawn(async move {
            call(&s, "POST", "/v1/score", body).await
        }));
    }
    let mut shared = false;
    for (h, want) in hs.into_iter().zip(&alone) {
        let (st, b) = h.await.unwrap();
        assert_eq!(st, StatusCode::OK);
        let v = json_of(&b);
        assert_eq!(
            v["log_likelihood"].as_f64().unwrap().to_bits(),
            want.to_bits()
        );
        shared |= v["batch_size"].as_u64().unwrap() > 1;
    }
    assert!(shared, "the candidates did not share a forward pass");
    blocker.await.unwrap();
}
