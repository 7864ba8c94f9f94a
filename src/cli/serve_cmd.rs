//! `llada serve`: the OpenAI-compatible server.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use llada::sampler::{CacheMode, Preset, SamplerConfig, SamplerSettings};
use llada::score::{ScoreLimits, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_MC_NUM};
use llada::server::listen::{self, ConnLimits};
use llada::server::{self, engine, openai::Defaults, AppState, Limits};
use llada::Tokenizer;

use super::{ModelArg, RuntimeArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests that may wait for the engine; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most compatible requests run together in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Per-request time limit in seconds, the body's upload included (504 after it; the engine
    /// stops the request's work at it).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Largest request body in bytes (413 beyond it).
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Open connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = listen::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open).
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a client may stop taking its answer before its connection is closed.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Most tokens in the canvases of one generation request of several answers (prompts × n):
    /// answers × (prompt + max_tokens); bounds its memory.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Most Monte Carlo samples (mc_num) one /v1/score request may ask for.
    #[arg(long, default_value_t = DEFAULT_MAX_MC_NUM)]
    pub score_max_mc_num: usize,
    /// Most tokens in one forward pass of a /v1/score request: batch × (prompt + answer),
    /// doubled with cfg_scale (bounds its memory).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    pub score_max_batch_tokens: usize,
    /// An origin (scheme://host:port) whose web pages may call this server, besides its own
    /// (repeatable; "*" for any). By default only the server's own page may.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// The sampler requests start from, the CLI's: fast (threshold 0.9, blocks of 32, dual
    /// cache, early stop; LLaDA2: its own sampler with the block cache) or reference (the
    /// official defaults exactly).
    #[arg(
        long = "sampler",
        value_enum,
        default_value = "fast",
        value_name = "PRESET"
    )]
    pub preset: Preset,
    /// Default answer length when a request gives no max_tokens.
    #[arg(long, default_value_t = llada::sampler::DEFAULT_GEN_LENGTH)]
    pub default_max_tokens: usize,
    /// Default commit threshold over the preset; "off" for the reference top-k schedule
    /// [default: the preset's: 0.9 fast, off reference; an LLaDA2 model: its official 0.95].
    #[arg(long)]
    pub default_threshold: Option<String>,
    /// Default cache over the preset: none, prefix or dual [default: the preset's: dual fast,
    /// none reference].
    #[arg(long, value_enum, hide_possible_values = true)]
    pub default_cache: Option<CacheMode>,
    /// Name the model is served under (default: the folder name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

/// How long freed pages stay with a serving process before they go back to the OS, in ms: long
/// enough that the buffers of one job's steps are reused, short enough that a large request's
/// memory does not stay with the process (the one-shot commands keep them for good).
const SERVE_PURGE_DELAY_MS: std::os::raw::c_long = 250;

/// Hands the allocator's freed pages back to the OS now (the engine calls it when it goes idle).
fn release_memory() {
    // SAFETY: a collection call of the linked allocator.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // every setting is checked before the model loads, with the rules requests follow
    let limits = Limits {
        request_timeout: Duration::from_secs(a.timeout),
        max_body_bytes: a.max_body_bytes,
        score: ScoreLimits {
            max_mc_num: a.score_max_mc_num,
            max_batch_tokens: a.score_max_batch_tokens,
        },
        max_batch_tokens: a.max_batch_tokens,
        allowed_origins: a.allow_origin.clone(),
    };
    limits.validate().context("the server's limits")?;
    let conn = ConnLimits {
        max_connections: a.max_connections,
        header_timeout: Duration::from_secs(a.header_timeout),
        idle_timeout: Duration::from_secs(a.idle_timeout),
    };
    conn.validate().context("the server's connection limits")?;
    let engine_cfg = engine::EngineConfig {
        queue: a.queue,
        max_batch: a.max_batch,
        on_idle: Some(release_memory),
    };
    engine_cfg
        .validate()
        .context("the server's engine settings")?;
    let dir = a.model.resolve()?;
    // the name the user knows it by: the folder they gave (a run folder, not its step-N
    // checkpoint), a hub id as given
    let given_name = a
        .model
        .model
        .as_deref()
        .map(|m| match std::fs::canonicalize(m) {
            Ok(c) => c
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| m.to_string()),
            Err(_) => m.to_string(),
        });
    let ck = a.rt.load(&dir)?;
    // SAFETY: a plain option setter of the linked allocator (after loading, which sets its own).
    unsafe { libmimalloc_sys::mi_option_set(crate::MI_OPTION_PURGE_DELAY, SERVE_PURGE_DELAY_MS) };
    let tokenizer = Tokenizer::from_dir(&dir, &ck.config)
        .context("the server needs the checkpoint's tokenizer")?;
    let name = a.name.clone().or(given_name).unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "llada".into())
    });
    let threshold = match a.default_threshold.as_deref() {
        None => None,
        Some("off" | "none") => Some(None),
        Some(t) => Some(Some(
            t.parse::<f64>()
                .context("--default-threshold must be a number in (0, 1] or off")?,
        )),
    };
    // a block-diffusion model (LLaDA2) gets its own sampler
    let builtin = Defaults::for_model(&ck.config, a.preset).sampler;
    let block_diffusion = builtin.block_diffusion.is_some();
    let base = SamplerSettings {
        threshold,
        cache: a.default_cache,
        ..Default::default()
    }
    .merge(&builtin)?;
    let defaults = Defaults {
        sampler: SamplerConfig {
            gen_length: a.default_max_tokens,
            // block diffusion's steps are per block
            steps: if block_diffusion {
                base.steps
            } else {
                a.default_max_tokens
            },
            ..base
        },
        max_tokens_limit: ck.config.max_sequence_length,
    };
    defaults
        .check()
        .context("the server's default sampler settings")?;
    let vocab_size = ck.config.embedding_size;
    let max_len = ck.config.max_sequence_length;
    let handle = engine::start(ck, engine_cfg);
    let state = Arc::new(AppState {
        engine: handle,
        tokenizer,
        model_name: name.clone(),
        max_sequence_length: max_len,
        vocab_size,
        defaults,
        limits,
        started: Instant::now(),
        served: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let st = state.clone();
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("llada serving {name} on http://{addr}  (page: /, API: /v1/chat/completions, /v1/completions, /v1/score, /v1/models, /health)");
        eprintln!("one line per request follows (RUST_LOG=warn hides them); Ctrl-C stops");
        listen::serve(listener, server::router(state), conn, async {
            shutdown_signal().await;
            eprintln!("shutting down: no new connections; finishing the requests in flight");
        })
        .await
        .context("serving")
    })?;
    let served = st.served.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "llada stopped after {:.0}s: {served} request{} answered",
        st.started.elapsed().as_secs_f64(),
        if served == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Ctrl-C, or SIGTERM (a service manager's stop) on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
