//! The training loop: AdamW, LR schedule, accumulation, clipping, mixed precision, checkpoints,
//! exact resume, metrics and progress.
//!
//! The loop ([`trainer::train`]) is generic over a list of named [`candle_core::Var`]s and a loss
//! closure, so it is shared by every trainer stage (pretrain, SFT, later LoRA/DPO) and tested on
//! toy models without the full decoder.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod data_source;
pub mod device;
pub mod loss;
pub mod metrics;
pub mod optim;
pub(crate) mod parallel;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use batch::{Batch, BatchSource};
pub use optim::{AdamW, AdamWConfig};
pub use trainer::{train, TrainError, TrainOptions, TrainSummary};

#[cfg(test)]
mod tests;
