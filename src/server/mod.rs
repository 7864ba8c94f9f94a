//! `llada serve`: an OpenAI-compatible HTTP API (axum + tokio) with streaming, a denoising stream
//! and a live page. Handlers validate requests into typed settings ([`openai`]), hand jobs to the
//! engine thread that owns the model ([`engine`]) and stream its events back; errors map to HTTP
//! status codes in one place ([`error`]). Connections are accepted by [`listen::serve`] (header
//! and idle timeouts, a connection cap); every request passes [`guard`] (allowed origin, JSON
//! content type, the request timeout) and a body-size limit ([`Limits`]).

pub mod engine;
pub mod error;
pub mod listen;
pub mod openai;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use self::engine::{EngineHandle, Event, Job, JobKind, Output};
use self::error::ApiError;
use self::openai::{Defaults, RequestFields, Usage, ValidGeneration};
use crate::sampler::PromptRules;
use crate::score::{ScoreConfig, ScoreLimits, DEFAULT_BATCH, DEFAULT_MC_NUM};
use crate::tokenizer::Tokenizer;

/// The live denoising page.
pub const PAGE: &str = include_str!("page.html");

/// Default of [`Limits::max_body_bytes`].
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 << 20;
/// Default of [`Limits::max_batch_tokens`].
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 32_768;
/// Default of [`Limits::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest time limit of any kind (one day): deadlines are computed from it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Per-request bounds of the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Time a request may take, its body's upload included (504 after it); the engine stops its
    /// job at the deadline.
    pub request_timeout: Duration,
    /// Largest request body (413 beyond it).
    pub max_body_bytes: usize,
    /// Bounds on one `/v1/score` request's work, checked before it runs.
    pub score: ScoreLimits,
    /// Most tokens in the canvases of one generation request of several rows (prompts × `n`):
    /// rows × (prompt + max_tokens). A request of one row is bounded by the model's context.
    pub max_batch_tokens: usize,
    /// Origins (`scheme://host[:port]`) whose pages may call the API besides the server's own;
    /// `*` allows any. A request without an `Origin` header (not from a browser page) is always
    /// allowed.
    pub allowed_origins: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            score: ScoreLimits::default(),
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            allowed_origins: Vec::new(),
        }
    }
}

impl Limits {
    /// Checks the limits with the rules a request's values follow, naming the option.
    pub fn validate(&self) -> crate::Result<()> {
        if self.request_timeout.is_zero() || self.request_timeout > MAX_TIMEOUT {
            return Err(crate::Error::setting(
                "timeout",
                format!("{}s", self.request_timeout.as_secs_f64()),
                format!("must be between 1 and {} seconds", MAX_TIMEOUT.as_secs()),
            ));
        }
        if self.max_batch_tokens == 0 {
            return Err(crate::Error::setting(
                "max-batch-tokens",
                self.max_batch_tokens,
                "must be at least 1",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(crate::Error::setting(
                "max-body-bytes",
                self.max_body_bytes,
                "must be at least 1",
            ));
        }
        for o in &self.allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(crate::Error::setting(
                    "allow-origin",
                    o,
                    "must be * or an origin such as http://localhost:3000",
                ));
            }
        }
        self.score.validate()
    }
}

/// Shared state of the handlers (no tensors: the model lives in the engine thread).
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    pub model_name: String,
    pub max_sequence_length: usize,
    /// Token ids of a prompt must be below it (the model's `embedding_size`).
    pub vocab_size: usize,
    pub defaults: Defaults,
    pub limits: Limits,
    pub started: Instant,
    pub served: AtomicU64,
}

/// All routes, behind [`guard`] and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/score", post(score))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// Whether a request from a browser page may run: no `Origin` (not a page), an allowed one, or
/// the server's own (the origin's `host:port` is the request's `Host`) when that host is an IP
/// address or `localhost`. A page of a domain name needs `--allow-origin`: under DNS rebinding a
/// foreign page's domain resolves to this server and its requests look same-origin.
fn check_origin(allowed: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = String::from_utf8_lossy(origin.as_bytes()).to_string();
    let o = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(o))
    {
        return Ok(());
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let authority = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"));
    if let (Some(h), Some(a)) = (host, authority) {
        if a.eq_ignore_ascii_case(h) && is_address_or_localhost(h) {
            return Ok(());
        }
    }
    Err(ApiError::ForbiddenOrigin(format!(
        "requests from pages of origin {origin} are not allowed (this server takes its own origin only; allow it with --allow-origin {origin})"
    )))
}

/// Whether the host of a `Host` header (`host[:port]`) is an IP address or `localhost`: names no
/// other site can take over by DNS rebinding.
fn is_address_or_localhost(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
}

/// Whether a POST body is declared JSON (`application/json`, parameters such as `charset`
/// allowed). A browser page can send `text/plain` anywhere without asking first; JSON it can
/// not, so this also keeps other origins' pages from driving the server.
fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string());
    let essence = ct
        .as_deref()
        .map(|c| c.split(';').next().unwrap_or("").trim());
    match essence {
        Some(e) if e.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "the body must be JSON sent with Content-Type: application/json (got {})",
            ct.as_deref()
                .map_or("none".to_string(), |c| format!("{c:?}"))
        ))),
    }
}

/// Every request: the origin and content-type checks, then the handler within the request
/// timeout (which also bounds a slow body upload).
async fn guard(State(s): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Err(e) = check_origin(&s.limits.allowed_origins, req.headers()) {
        return e.into_response();
    }
    if req.method() == Method::POST {
        if let Err(e) = check_json(req.headers()) {
            return e.into_response();
        }
    }
    let limit = s.limits.request_timeout + Duration::from_secs(2);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// The `tracing` target of the access log: one line per request.
pub const ACCESS_LOG: &str = "llada::access";

/// Answer tokens of a response, for the access log (a response extension set by the handlers).
#[derive(Debug, Clone, Copy)]
struct AnswerTokens(usize);

/// Marks a streamed response: its access-log line is written when the stream ends ([`StreamLog`]).
#[derive(Debug, Clone, Copy)]
struct Streamed;

/// Logs every request on [`ACCESS_LOG`]: method, path, status, time and, for generations, the
/// answer tokens. A stream's line is written when it ends, with its whole time.
async fn access_log(req: HttpRequest, next: Next) -> Response {
    let mut pending = PendingLog {
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        t0: Instant::now(),
        answered: false,
    };
    let resp = next.run(req).await;
    pending.answered = true;
    if resp.extensions().get::<Streamed>().is_none() {
        let tokens = resp
            .extensions()
            .get::<AnswerTokens>()
            .map(|t| format!(" · {} answer tokens", t.0))
            .unwrap_or_default();
        tracing::info!(
            target: ACCESS_LOG,
            "{} {} {} · {:.3}s{tokens}",
            pending.method,
            pending.path,
            resp.status().as_u16(),
            pending.t0.elapsed().as_secs_f64()
        );
    }
    resp
}

/// A request not answered yet: if its client goes away first (the handler is dropped), its
/// access-log line says so.
struct PendingLog {
    method: Method,
    path: String,
    t0: Instant,
    answered: bool,
}

impl Drop for PendingLog {
    fn drop(&mut self) {
        if !self.answered {
            tracing::info!(
                target: ACCESS_LOG,
                "{} {} - · {:.3}s · the client went away",
                self.method,
                self.path,
                self.t0.elapsed().as_secs_f64()
            );
        }
    }
}

/// The access-log line of a stream, written when the stream ends or its client goes away.
struct StreamLog {
    path: &'static str,
    t0: Instant,
    tokens: Option<usize>,
    error: Option<u16>,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        let how = match (self.tokens, self.error) {
            (_, Some(code)) => format!("error {code}"),
            (Some(n), None) => format!("{n} answer tokens"),
            (None, None) => "the client went away".to_string(),
        };
        tracing::info!(
            target: ACCESS_LOG,
            "POST {} 200 stream · {:.3}s · {how}",
            self.path,
            self.t0.elapsed().as_secs_f64()
        );
    }
}

/// The body, or the reason there is none: 413 (OpenAI-style JSON) past the size limit.
fn body_or_error(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLong(format!(
                "the request body exceeds this server's limit of {} bytes (--max-body-bytes)",
                s.limits.max_body_bytes
            ))
        } else {
            ApiError::Malformed(format!("the body could not be read: {}", r.body_text()))
        }
    })
}

/// Runs `f` (template rendering, tokenising: CPU work bounded by the body size and the template
/// fuel) on the blocking pool, so the runtime's threads stay free for `/health` and streams.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!("request preparation failed: {e}");
        Err(ApiError::Internal(error::INTERNAL))
    })
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        param: None,
        message: "no such route (see GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/score)".into(),
    }
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.model_name,
        "queue": {"waiting": s.engine.waiting(), "capacity": s.engine.capacity},
        "served": s.served.load(Ordering::Relaxed),
        "uptime_seconds": s.started.elapsed().as_secs_f64(),
        "defaults": defaults_json(&s.defaults),
    }))
}

/// The sampler a request that gives nothing gets, in the request's own keys (the page starts
/// from it, so that it shows what the API does).
fn defaults_json(d: &Defaults) -> Value {
    // as a request that gives nothing resolves them (a default answer length the default block
    // does not divide is one block)
    let resolved = d.resolve(crate::sampler::SamplerSettings::default(), None);
    let c = resolved.as_ref().unwrap_or(&d.sampler);
    let (threshold, factor) = match c.commit {
        crate::sampler::Commit::Threshold { tau } => (json!(tau), Value::Null),
        crate::sampler::Commit::Factor { f } => (Value::Null, json!(f)),
        _ => (Value::Null, Value::Null),
    };
    json!({
        "max_tokens": c.gen_length, "steps": c.steps, "block_length": c.block_length,
        "base_block_length": d.sampler.block_length,
        "threshold": threshold, "factor": factor, "cache": c.cache,
        "temperature": c.temperature, "early_stop": c.early_stop,
        "max_tokens_limit": d.max_tokens_limit, "block_diffusion": c.block_diffusion.is_some(),
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.model_name, "object": "model", "created": now(), "owned_by": "llada"}],
    }))
}

/// Parses a body as UTF-8 JSON (400 otherwise).
fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::Malformed("the body is not UTF-8".into()))?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::Malformed(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::Malformed("the body must be a JSON object".into()));
    }
    Ok(v)
}

fn check_model(s: &AppState, f: &RequestFields) -> Result<(), ApiError> {
    match &f.model {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == &s.model_name || m == "llada" => Ok(()),
        Some(m) => Err(ApiError::NotFound {
            param: Some("model".into()),
            message: format!(
                "model {m} is not served here (this server serves {:?})",
                s.model_name
            ),
        }),
    }
}

/// Cancels its job when dropped (the client went away or the handler finished).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn submit(
    s: &AppState,
    kind: JobKind,
) -> Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
    let (tx, rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    s.engine.submit(Job {
        kind,
        events: tx,
        cancel: cancel.clone(),
        deadline: Instant::now() + s.limits.request_timeout,
    })?;
    Ok((rx, CancelOnDrop(cancel)))
}

/// Waits for the job's result (ignoring step events), within the request timeout.
async fn wait(s: &AppState, mut rx: UnboundedReceiver<Event>) -> Result<Output, ApiError> {
    let fut = async {
        while let Some(e) = rx.recv().await {
            if let Event::Done(r) = e {
                return r;
            }
        }
        Err(ApiError::Internal("the engine dropped the request"))
    };
    match tokio::time::timeout(s.limits.request_timeout + Duration::from_secs(1), fut).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::Timeout),
    }
}

/// The answer text: cut at EOS/EOT, special tokens dropped, then at the first stop string.
fn answer_text(
    tok: &Tokenizer,
    ids: &[u32],
    stop: &[String],
) -> Result<(String, bool, usize), ApiError> {
    let sp = tok.special();
    let end = sp.answer_end(ids);
    let used = end.unwrap_or(ids.len());
    let mut text = tok.decode(&ids[..used], true).map_err(ApiError::from)?;
    let mut stopped = end.is_some();
    for s in stop {
        if let Some(i) = text.find(s.as_str()) {
            text.truncate(i);
            stopped = true;
        }
    }
    Ok((text, stopped, used))
}

enum Kind {
    Chat,
    Completion,
}

struct Request {
    kind: Kind,
    /// The request's prompts (each answered `gen.n` times).
    prompts: Vec<Vec<u32>>,
    gen: ValidGeneration,
}

impl Request {
    /// The batch's rows: each prompt `n` times in a row, so that answer `i` is prompt `i / n`'s
    /// (OpenAI's order of `choices`).
    fn rows(&self) -> Vec<Vec<u32>> {
        self.prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), self.gen.n))
            .collect()
    }
}

fn prepare(s: &AppState, body: &Bytes, kind: Kind) -> Result<Request, ApiError> {
    let v = parse_body(body)?;
    let fields: RequestFields =
        serde_json::from_value(v.clone()).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    check_model(s, &fields)?;
    let gen = openai::validate_generation(&v, &s.defaults)?;
    let prompts = match kind {
        Kind::Chat => {
            let msgs = openai::parse_messages(v.get("messages").unwrap_or(&Value::Null))?;
            vec![s.tokenizer.encode_chat(&msgs).map_err(ApiError::from)?]
        }
        Kind::Completion => openai::parse_prompts(v.get("prompt"))?
            .iter()
            .map(|p| s.tokenizer.encode(p))
            .collect::<Result<_, _>>()
            .map_err(ApiError::from)?,
    };
    let rules = PromptRules {
        mask_id: s.tokenizer.special().mask,
        vocab_size: Some(s.vocab_size),
        max_sequence_length: Some(s.max_sequence_length),
    };
    for p in &prompts {
        rules.check(p, gen.cfg.gen_length).map_err(ApiError::from)?;
    }
    if prompts.len() * gen.n > openai::MAX_ANSWERS {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n={} answers exceed this server's {} answers per request",
                prompts.len(),
                gen.n,
                openai::MAX_ANSWERS
            ),
        ));
    }
    let rows = prompts.len() * gen.n;
    let tokens: usize = prompts
        .iter()
        .map(|p| (p.len() + gen.cfg.gen_length) * gen.n)
        .sum();
    if rows > 1 && tokens > s.limits.max_batch_tokens {
        return Err(ApiError::TooLong(format!(
            "{rows} answers (prompts × n) of prompt + max_tokens hold {tokens} tokens, more than this server's {} per request (--max-batch-tokens): ask for fewer answers or fewer tokens",
            s.limits.max_batch_tokens
        )));
    }
    if gen.stream && prompts.len() > 1 {
        return Err(ApiError::invalid(
            "prompt",
            "streaming takes a single prompt",
        ));
    }
    Ok(Request { kind, prompts, gen })
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, body, Kind::Chat).await
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, body, Kind::Completion).await
}

async fn generate(s: Arc<AppState>, body: Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    let body = match body_or_error(&s, body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let s2 = s.clone();
    let req = match off_runtime(move || prepare(&s2, &body, kind)).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let id = format!(
        "{}-{:x}",
        match req.kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        },
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let job = JobKind::Generate {
        prompts: req.rows(),
        cfg: req.gen.cfg.clone(),
        seed: req.gen.seed,
        steps_wanted: req.gen.stream,
    };
    let (rx, guard) = match submit(&s, job) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if req.gen.stream {
        let mut r = Sse::new(stream_events(s, req, id, rx, guard))
            .keep_alive(KeepAlive::default())
            .into_response();
        r.extensions_mut().insert(Streamed);
        return r;
    }
    let out = wait(&s, rx).await;
    drop(guard);
    let out = match out {
        Ok(Output::Generated {
            generated_ids,
            nfe,
            steps,
            seconds,
            batch_size,
        }) => (generated_ids, nfe, steps, seconds, batch_size),
        Ok(_) => return ApiError::Internal("unexpected engine output").into_response(),
        Err(e) => return e.into_response(),
    };
    s.served.fetch_add(1, Ordering::Relaxed);
    let (ids, nfe, steps, seconds, batch_size) = out;
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (i, g) in ids.iter().enumerate() {
        let (text, stopped, used) = match answer_text(&s.tokenizer, g, &req.gen.stop) {
            Ok(x) => x,
            Err(e) => return e.into_response(),
        };
        completion_tokens += used;
        let finish = if stopped { "stop" } else { "length" };
        choices.push(match req.kind {
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}),
            Kind::Completion => json!({"index": i, "text": text, "logprobs": null, "finish_reason": finish}),
        });
    }
    let prompt_tokens: usize = req.prompts.iter().map(Vec::len).sum();
    let usage = Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    };
    let mut r = Json(json!({
        "id": id,
        "object": match req.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": now(),
        "model": s.model_name,
        "choices": choices,
        "usage": usage,
        // generated tokens only (the answers before their EOS/EOT; prompts are not throughput)
        "llada": {"nfe": nfe, "steps": steps, "seconds": seconds, "batch_size": batch_size,
            "completion_tokens_per_s": completion_tokens as f64 / seconds.max(1e-9),
            "tokens_per_forward": completion_tokens as f64 / nfe.max(1) as f64},
    }))
    .into_response();
    r.extensions_mut().insert(AnswerTokens(completion_tokens));
    r
}

fn chunk(
    s: &AppState,
    req: &Request,
    id: &str,
    delta: Option<&str>,
    role: bool,
    finish: Option<&str>,
) -> SseEvent {
    let choice = match req.kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if role {
                d.insert("role".into(), "assistant".into());
            }
            if let Some(t) = delta {
                d.insert("content".into(), t.into());
            }
            json!({"index": 0, "delta": d, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        }
    };
    let v = json!({
        "id": id,
        "object": match req.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
        "created": now(),
        "model": s.model_name,
        "choices": [choice],
    });
    SseEvent::default().data(v.to_string())
}

/// The SSE stream of a streaming request: OpenAI chunks with the text as it becomes final (the
/// committed prefix grows left to right), optional `event: denoise` events with each step's
/// canvas, a final chunk with the finish reason, then `[DONE]`.
fn stream_events(
    s: Arc<AppState>,
    req: Request,
    id: String,
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct St {
        s: Arc<AppState>,
        req: Request,
        id: String,
        rx: UnboundedReceiver<Event>,
        _guard: CancelOnDrop,
        sent: String,
        started: bool,
        finished: bool,
        deadline: tokio::time::Instant,
        log: StreamLog,
    }
    let log = StreamLog {
        path: match req.kind {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        },
        t0: Instant::now(),
        tokens: None,
        error: None,
    };
    let deadline = tokio::time::Instant::now() + s.limits.request_timeout + Duration::from_secs(1);
    let st = St {
        s,
        req,
        id,
        rx,
        _guard: guard,
        sent: String::new(),
        started: false,
        finished: false,
        deadline,
        log,
    };
    stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let mut out: Vec<SseEvent> = Vec::new();
        if !st.started {
            st.started = true;
            if let Kind::Chat = st.req.kind {
                out.push(chunk(&st.s, &st.req, &st.id, None, true, None));
            }
        }
        let ev = match tokio::time::timeout_at(st.deadline, st.rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => Event::Done(Err(ApiError::Internal("the engine dropped the request"))),
            Err(_) => Event::Done(Err(ApiError::Timeout)),
        };
        match ev {
            Event::Step(u) => {
                let tok = &st.s.tokenizer;
                if st.req.gen.denoise {
                    let canvas = &u.canvas[0];
                    let mask = tok.special().mask;
                    let tokens: Vec<Value> = canvas
                        .iter()
                        .map(|&t| if t == mask { Value::Null } else { Value::String(tok.decode(&[t], false).unwrap_or_default()) })
                        .collect();
                    let d = json!({
                        "step": u.step + 1, "total_steps": u.total_steps, "block": u.block, "nfe": u.nfe,
                        "tokens": tokens, "committed": u.committed[0], "elapsed": u.elapsed.as_secs_f64(),
                        "masked": canvas.iter().filter(|&&t| t == mask).count(),
                    });
                    out.push(SseEvent::default().event("denoise").data(d.to_string()));
                }
                if let Some(prefix) = tok.committed_prefix(&u.canvas[0]) {
                    if prefix.len() > st.sent.len() && prefix.starts_with(&st.sent) {
                        let delta = prefix[st.sent.len()..].to_string();
                        let stop_hit = st.req.gen.stop.iter().any(|x| prefix.contains(x.as_str()));
                        if !stop_hit {
                            out.push(chunk(&st.s, &st.req, &st.id, Some(&delta), false, None));
                            st.sent = prefix;
                        }
                    }
                }
            }
            Event::Done(Ok(Output::Generated { generated_ids, nfe, seconds, .. })) => {
                st.finished = true;
                let (text, stopped, used) = answer_text(&st.s.tokenizer, &generated_ids[0], &st.req.gen.stop).unwrap_or_default();
                st.log.tokens = Some(used);
                if text.len() > st.sent.len() && text.starts_with(&st.sent) {
                    let delta = text[st.sent.len()..].to_string();
                    out.push(chunk(&st.s, &st.req, &st.id, Some(&delta), false, None));
                }
                out.push(chunk(&st.s, &st.req, &st.id, None, false, Some(if stopped { "stop" } else { "length" })));
                if st.req.gen.denoise {
                    let empty = if text.trim().is_empty() { st.s.tokenizer.empty_answer_reason(&generated_ids[0]) } else { None };
                    out.push(SseEvent::default().event("done").data(json!({
                        "nfe": nfe, "seconds": seconds, "text": text, "answer_tokens": used,
                        "tokens_per_s": used as f64 / seconds.max(1e-9), "empty_reason": empty,
                    }).to_string()));
                }
                if st.req.gen.include_usage {
                    let prompt_tokens = st.req.prompts[0].len();
                    let v = json!({
                        "id": st.id,
                        "object": match st.req.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
                        "created": now(),
                        "model": st.s.model_name,
                        "choices": [],
                        "usage": Usage { prompt_tokens, completion_tokens: used, total_tokens: prompt_tokens + used },
                    });
                    out.push(SseEvent::default().data(v.to_string()));
                }
                out.push(SseEvent::default().data("[DONE]"));
                st.s.served.fetch_add(1, Ordering::Relaxed);
            }
            Event::Done(Ok(_)) => st.finished = true,
            Event::Done(Err(e)) => {
                st.finished = true;
                st.log.error = Some(e.status().0.as_u16());
                out.push(SseEvent::default().event("error").data(e.body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
            }
        }
        Some((stream::iter(out.into_iter().map(Ok::<_, Infallible>)), st))
    })
    .flatten()
}

async fn score(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body_or_error(&s, body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let s2 = s.clone();
    let r = off_runtime(move || score_job(&s2, &body)).await;
    let kind = match r {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let answer_tokens = match &kind {
        JobKind::Score { answer, .. } => answer.len(),
        _ => 0,
    };
    let (rx, guard) = match submit(&s, kind) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let out = wait(&s, rx).await;
    drop(guard);
    match out {
        Ok(Output::Scored(e, batch_size)) => {
            s.served.fetch_add(1, Ordering::Relaxed);
            Json(json!({
                "object": "score", "model": s.model_name, "log_likelihood": e.log_likelihood,
                "stderr": e.stderr, "answer_tokens": answer_tokens, "nfe": e.nfe,
                // requests that shared the forward passes (one-token answers to one prompt)
                "batch_size": batch_size,
            }))
            .into_response()
        }
        Ok(_) => ApiError::Internal("unexpected engine output").into_response(),
        Err(e) => e.into_response(),
    }
}

/// A `/v1/score` body checked into a job: the texts, the settings, the seed, and the work bounds
/// of [`Limits::score`] (before anything runs).
fn score_job(s: &AppState, body: &Bytes) -> Result<JobKind, ApiError> {
    let v = parse_body(body)?;
    let fields: RequestFields =
        serde_json::from_value(v.clone()).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    check_model(s, &fields)?;
    let text = |k: &str| -> Result<String, ApiError> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ApiError::invalid(k, format!("{k} must be a string")))
    };
    let (prompt, answer) = (text("prompt")?, text("answer")?);
    if answer.is_empty() {
        return Err(ApiError::invalid("answer", "the answer must not be empty"));
    }
    let (p, a) = crate::score::choice::encode_pair(&s.tokenizer, &prompt, &answer)
        .map_err(ApiError::from)?;
    if p.len() + a.len() > s.max_sequence_length {
        return Err(ApiError::TooLong(format!(
            "prompt + answer ({} tokens) exceed the model's context of {}",
            p.len() + a.len(),
            s.max_sequence_length
        )));
    }
    let num = |k: &str, d: usize| -> Result<usize, ApiError> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(x) => x
                .as_u64()
                .filter(|&n| n >= 1 && n <= u32::MAX as u64)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ApiError::invalid(k, format!("{k} must be a positive integer, got {x}"))
                }),
        }
    };
    let cfg = ScoreConfig {
        mc_num: num("mc_num", DEFAULT_MC_NUM)?,
        batch: num("batch", DEFAULT_BATCH)?,
        cfg_scale: match v.get("cfg_scale") {
            None | Some(Value::Null) => 0.0,
            Some(x) => x
                .as_f64()
                .filter(|c| c.is_finite() && *c >= 0.0 && *c <= 100.0)
                .ok_or_else(|| {
                    ApiError::invalid("cfg_scale", "cfg_scale must be a number between 0 and 100")
                })?,
        },
    };
    s.limits
        .score
        .check(&cfg, p.len(), a.len())
        .map_err(ApiError::from)?;
    let seed = openai::parse_seed(v.get("seed"))?;
    Ok(JobKind::Score {
        prompt: p,
        answer: a,
        cfg,
        seed,
    })
}
