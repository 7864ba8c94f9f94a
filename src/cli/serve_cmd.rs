//! `llada serve`: the OpenAI-compatible server.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use llada::sampler::{CacheMode, SamplerConfig, SamplerSettings};
use llada::server::{self, engine, openai::Defaults, AppState};
use llada::Tokenizer;

use super::{ModelArg, RuntimeArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests that may wait for the engine; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most compatible requests run together in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Per-request time limit in seconds (504 after it).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Default answer length when a request gives no max_tokens.
    #[arg(long, default_value_t = 64)]
    pub default_max_tokens: usize,
    /// Default commit threshold (Fast-dLLM); "off" for the reference top-k schedule.
    #[arg(long, default_value = "0.9")]
    pub default_threshold: String,
    /// Default cache: none, prefix or dual.
    #[arg(long, value_enum, default_value = "dual", hide_possible_values = true)]
    pub default_cache: CacheMode,
    /// Name the model is served under (default: the folder name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let dir = a.model.resolve()?;
    let ck = a.rt.load(&dir)?;
    let tokenizer = Tokenizer::from_dir(&dir, &ck.config)
        .context("the server needs the checkpoint's tokenizer")?;
    let name = a.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "llada".into())
    });
    let threshold = match a.default_threshold.as_str() {
        "off" | "none" => None,
        t => Some(
            t.parse::<f64>()
                .context("--default-threshold must be a number in (0, 1] or off")?,
        ),
    };
    let builtin = Defaults::default().sampler;
    let base = SamplerSettings {
        threshold: Some(threshold),
        cache: Some(a.default_cache),
        ..Default::default()
    }
    .merge(&builtin)?;
    let defaults = Defaults {
        sampler: SamplerConfig {
            gen_length: a.default_max_tokens,
            steps: a.default_max_tokens,
            ..base
        },
        max_tokens_limit: ck.config.max_sequence_length,
    };
    defaults
        .check()
        .context("the server's default sampler settings")?;
    let vocab_size = ck.config.embedding_size;
    let max_len = ck.config.max_sequence_length;
    let handle = engine::start(
        ck,
        engine::EngineConfig {
            queue: a.queue,
            max_batch: a.max_batch,
        },
    );
    let state = Arc::new(AppState {
        engine: handle,
        tokenizer,
        model_name: name.clone(),
        max_sequence_length: max_len,
        vocab_size,
        defaults,
        request_timeout: Duration::from_secs(a.timeout),
        started: Instant::now(),
        served: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("llada serving {name} on http://{addr}  (page: /, API: /v1/chat/completions, /v1/completions, /v1/score, /v1/models, /health)");
        axum::serve(listener, server::router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })
}
