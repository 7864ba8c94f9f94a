//! # llada
//!
//! An engine for LLaDA-family masked diffusion language models: load Hugging Face checkpoints,
//! run the mask predictor, sample (generate, chat, infill), score likelihoods, train and serve.
//!
//! Each concept of the paper lives in one module: [`model`] (the mask predictor), the sampler
//! (the reverse process), the scorer (the likelihood bound), the forward process and losses, the
//! trainer, [`tokenizer`]/[`chat`] and the server.

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod experiment;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod rng;
pub mod sampler;
pub mod score;
pub mod server;
pub mod synth;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use chat::{ChatTemplate, Message};
pub use checkpoint::Checkpoint;
pub use config::{LladaConfig, LladaMoeConfig, ModelConfig, RawConfig};
pub use device::RunDType;
pub use error::{Error, Result};
pub use model::{Llada, MaskPredictor, Model};
pub use rng::Rng;
pub use sampler::{generate, Generation, PromptBatch, SamplerConfig};
pub use tokenizer::{SpecialTokens, Tokenizer};

/// Re-exported tensor library.
pub use candle_core;
