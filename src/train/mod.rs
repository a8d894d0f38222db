//! The training loop: AdamW, LR schedule, accumulation, clipping, mixed precision, checkpoints,
//! exact resume, metrics and progress.
