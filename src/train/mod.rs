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

/// Run `f` on a thread of rayon's pool while this thread waits: the kernels' parallel loops then
/// start on their own thread and the other workers directly. Called from outside the pool, every
/// op queued its work into it and parked the caller until done, two thread switches per op (6 % of
/// a 256-wide model's training step). Only for work that never waits on other work needing the
/// pool (a blocked worker would be one worker fewer, or a deadlock with one core).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
pub use optim::{AdamW, AdamWConfig};
pub use trainer::{train, TrainError, TrainOptions, TrainSummary};

#[cfg(test)]
mod tests;
