//! Training: pretraining and SFT with the masked-diffusion bound, AdamW, schedules, checkpoints
//! with exact resume.

pub mod params;

pub use params::Trainable;
