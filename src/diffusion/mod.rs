//! The forward (noising) process and the training objectives of masked diffusion (reference §3):
//! [`noise`] masks tokens with probability t, [`loss`] turns the mask predictor's output into the
//! bound on the negative log-likelihood (cross-entropy on masked positions weighted by 1/t);
//! [`vrpo`] is preference optimisation on that bound (LLaDA 1.5).

pub mod loss;
pub mod noise;
pub mod vrpo;

pub use loss::{masked_diffusion_loss, LossWeights, Objective};
pub use noise::{forward_process, Noised, EPS};
