//! Training: pretraining and SFT with the masked-diffusion bound ([`trainer`]), AdamW and the
//! learning-rate schedules ([`optim`]), token datasets with a resumable cursor ([`data`]),
//! tokenizer training ([`tokenizer`]) and loss plots ([`plot`]).

pub mod data;
pub mod optim;
pub mod params;
pub mod plot;
pub mod presets;
pub mod tokenizer;
pub mod trainer;

pub use params::Trainable;
pub use trainer::{ObjectiveKind, TrainConfig, Trainer};
