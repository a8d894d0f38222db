//! The training loop shared by every trainer stage.
//!
//! One optimiser step = up to `accumulation_steps` micro-batches (an epoch's leftover partial
//! accumulation is flushed at the epoch's end, as the reference does), loss divided by
//! `accumulation_steps`, global-norm clipping, then in-place AdamW at the schedule's learning rate.
//! Checkpoints are taken at step boundaries only, so a checkpoint never holds half-accumulated
//! gradients and resuming replays exactly the same arithmetic.
//!
//! With several ranks (`TrainOptions::collective`), each trains on its slice of every global
//! micro-batch and the gradients are summed once per optimiser step before clipping (see
//! [`super::parallel`]); every rank then takes the same step. Only rank 0 writes checkpoints,
//! metrics and the loss curve.

use super::batch::{epoch_permutation, Batch, BatchSource};
use super::checkpoint::{self, TrainState};
use super::metrics::MetricsFile;
use super::optim::{clip_coefficient, global_norm, AdamW, AdamWConfig, GradAccumulator};
use super::parallel::{self, StepStats};
use super::schedule::lr_at;
use crate::cancel::{CancelToken, Interrupted};
use crate::dist::Collective;
use anyhow::Context;
use candle_core::{DType, Tensor, Var};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Hyper-parameters and I/O of one training run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Stage name (metrics and progress label).
    pub stage: String,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup micro-steps (0 = the reference: none).
    pub warmup_steps: usize,
    /// AdamW betas, eps, weight decay.
    pub adamw: AdamWConfig,
    /// Global-norm clip (`<= 0` disables).
    pub grad_clip: f64,
    /// Micro-batches per optimiser step.
    pub accumulation_steps: usize,
    /// Rows per micro-batch on each rank (a global micro-batch has `world_size` times as many).
    pub batch_size: usize,
    /// Passes over the data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Stop after this many optimiser steps (wrapping epochs as needed).
    pub max_steps: Option<usize>,
    /// Checkpoint every N optimiser steps (0: not by count). Does not change results.
    pub save_every: usize,
    /// Also checkpoint once this much time has passed since the last checkpoint (`Some(ZERO)`:
    /// after every step; `None`: not by time). Does not change results.
    pub save_interval: Option<Duration>,
    /// Progress message refresh interval in steps. Does not change results.
    pub log_every: usize,
    /// Data-order seed.
    pub seed: u64,
    /// Checkpoints live here.
    pub work_dir: PathBuf,
    /// Per-step metrics are appended here (JSONL), if set.
    pub metrics_path: Option<PathBuf>,
    /// The loss-curve PNG, if set.
    pub plot_path: Option<PathBuf>,
    /// Show a progress bar (it also hides itself when stderr is not a terminal).
    pub progress: bool,
    /// The ranks training together ([`crate::dist::Single`]: this process alone).
    pub collective: Arc<dyn Collective>,
}

impl TrainOptions {
    /// Defaults of the reference pretrain script for everything but the I/O.
    pub fn new(stage: &str, work_dir: PathBuf) -> Self {
        Self {
            stage: stage.to_string(),
            lr: 5e-4,
            warmup_steps: 0,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            accumulation_steps: 1,
            batch_size: 8,
            epochs: 1,
            max_steps: None,
            save_every: 0,
            save_interval: None,
            log_every: 10,
            seed: 42,
            work_dir,
            metrics_path: None,
            plot_path: None,
            progress: false,
            collective: Arc::new(crate::dist::Single),
        }
    }
}

/// What the loss closure returns for one micro-batch.
pub struct LossOutput {
    /// The scalar that is back-propagated: token cross-entropy plus the MoE aux loss.
    pub loss: Tensor,
    /// The MoE aux-loss part of `loss` (for metrics), if the model has one.
    pub aux: Option<Tensor>,
}

/// Failures of the loop that the user can act on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The loss or the gradient norm stopped being finite.
    #[error(
        "{what} is {value} at optimiser step {step} (micro-step {micro_step}); {kept}. Lower `lr`, \
         set `grad_clip`, or check the data"
    )]
    NonFinite {
        /// "the loss" or "the gradient norm".
        what: &'static str,
        /// The offending value.
        value: f64,
        /// 1-based optimiser step being computed.
        step: usize,
        /// 1-based global micro-step.
        micro_step: usize,
        /// Which checkpoint is left.
        kept: String,
    },
    /// Nothing to train on.
    #[error("no training examples: the dataset is empty after tokenisation and filtering")]
    Empty,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Optimiser steps in total (including those before a resume).
    pub steps: usize,
    /// Mean loss of the last step.
    pub final_loss: f32,
    /// Mean loss of every step.
    pub losses: Vec<f32>,
    /// Tokens processed in total (padding included).
    pub tokens: u64,
    /// Loss-bearing tokens in total.
    pub useful_tokens: u64,
    /// The step a checkpoint resumed from, if any.
    pub resumed_from: Option<usize>,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Tokens per second over this invocation.
    pub tokens_per_s: f64,
}

impl TrainSummary {
    /// The summary as stage metrics (`resumed_from` only when a checkpoint was resumed).
    pub fn to_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("steps".into(), self.steps.into());
        m.insert("final_loss".into(), (self.final_loss as f64).into());
        m.insert("tokens".into(), self.tokens.into());
        m.insert("useful_tokens".into(), self.useful_tokens.into());
        m.insert("tokens_per_s".into(), self.tokens_per_s.into());
        if let Some(step) = self.resumed_from {
            m.insert("resumed_from".into(), step.into());
        }
        m
    }
}

/// Train `params` on `data` with `loss_fn`, resuming from the newest checkpoint in
/// `opts.work_dir` if one exists. Checkpoints follow `opts.save_every` and `opts.save_interval`
/// ([`checkpoint::Cadence`]); on `cancel` one is saved and [`Interrupted`] returned.
///
/// A single rank runs its loop on a thread of rayon's pool ([`super::on_pool`]; nothing in it
/// waits for work that needs the pool), hence the `Send` and `Sync` bounds. Ranks do not: they
/// wait for each other in every all-reduce, and ranks that are threads of one process (the tests)
/// would each hold one of the pool's workers while waiting.
pub fn train<F>(
    params: &[(String, Var)],
    data: &(dyn BatchSource + Sync),
    opts: &TrainOptions,
    cancel: &CancelToken,
    loss_fn: F,
) -> anyhow::Result<TrainSummary>
where
    F: FnMut(&Batch) -> candle_core::Result<LossOutput> + Send,
{
    if opts.collective.as_ref().world_size() > 1 {
        return train_loop(params, data, opts, cancel, loss_fn);
    }
    super::on_pool(|| train_loop(params, data, opts, cancel, loss_fn))
}

fn train_loop<F>(
    params: &[(String, Var)],
    data: &dyn BatchSource,
    opts: &TrainOptions,
    cancel: &CancelToken,
    mut loss_fn: F,
) -> anyhow::Result<TrainSummary>
where
    F: FnMut(&Batch) -> candle_core::Result<LossOutput>,
{
    let n = data.len();
    if n == 0 {
        return Err(TrainError::Empty.into());
    }
    let dist = opts.collective.as_ref();
    let (rank, world) = (dist.rank(), dist.world_size());
    let lead = rank == 0;
    let bs = opts.batch_size.max(1);
    let accum = opts.accumulation_steps.max(1);
    let iters = n.div_ceil(bs * world);
    let (total_steps, total_micro) = match opts.max_steps {
        Some(s) => (s, s * accum),
        None => (opts.epochs * iters.div_ceil(accum), opts.epochs * iters),
    };

    let mut opt = AdamW::new(params.to_vec(), opts.adamw)?;
    let mut st = TrainState {
        format: checkpoint::FORMAT,
        step: 0,
        micro_step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: opts.seed,
        tokens: 0,
        useful_tokens: 0,
        losses: Vec::new(),
        params: params.iter().map(|(n, _)| n.clone()).collect(),
    };
    let mut resumed_from = None;
    if let Some((dir, saved)) = checkpoint::latest(&opts.work_dir)? {
        checkpoint::restore(&dir, &saved, params, &mut opt)?;
        tracing::info!(stage = %opts.stage, step = saved.step, "resuming from checkpoint {}", dir.display());
        resumed_from = Some(saved.step);
        st = saved;
    }
    if world > 1 {
        parallel::sync_start(dist, params, st.step)?;
    }
    let mut last_ckpt = resumed_from;
    let mut cadence = checkpoint::Cadence::new(opts.save_every, opts.save_interval, Instant::now());

    let mut metrics = opts.metrics_path.as_deref().filter(|_| lead).map(MetricsFile::open).transpose()?;
    let bar = if lead { progress_bar(opts, total_steps, st.step) } else { indicatif::ProgressBar::hidden() };
    // Several ranks stop together, after the step in which any of them was cancelled.
    let mut stop = false;
    let mut acc = GradAccumulator::new(params.len());
    let mut perm: Option<(usize, Vec<usize>)> = None;
    let started = Instant::now();
    let tokens_at_start = st.tokens;

    while st.step < total_steps {
        if stop || (world == 1 && cancel.is_cancelled()) {
            if lead {
                let dir = checkpoint::save(&opts.work_dir, params, &opt, &st)?;
                bar.abandon_with_message(format!("interrupted; checkpoint at step {}", st.step));
                tracing::info!(stage = %opts.stage, step = st.step, "checkpoint saved to {}", dir.display());
            }
            return Err(Interrupted.into());
        }
        if st.batch_in_epoch >= iters {
            st.epoch += 1;
            st.batch_in_epoch = 0;
        }
        if perm.as_ref().is_none_or(|(e, _)| *e != st.epoch) {
            perm = Some((st.epoch, epoch_permutation(opts.seed, st.epoch, n)));
        }
        let order = &perm.as_ref().expect("set above").1;

        let t0 = Instant::now();
        let cycle = accum.min(iters - st.batch_in_epoch);
        let (mut loss_sum, mut aux_sum, mut tokens, mut useful) = (0f64, 0f64, 0usize, 0usize);
        acc.clear();
        for _ in 0..cycle {
            let (lo, hi, global_rows) = parallel::rank_rows(st.batch_in_epoch * bs * world, n, bs, rank, world);
            st.micro_step += 1;
            st.batch_in_epoch += 1;
            if lo == hi {
                continue; // a short last batch left this rank nothing
            }
            let batch = data.batch(&order[lo..hi])?;
            let out = loss_fn(&batch).with_context(|| format!("forward pass at step {}", st.step + 1))?;
            let mut loss_val = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut aux_val = out.aux.as_ref().map(|a| a.to_dtype(DType::F64)?.to_scalar::<f64>()).transpose()?;
            let scaled = if world > 1 {
                // Checked after the exchange, so every rank stops at the same step.
                let share = (hi - lo) as f64 / global_rows as f64;
                loss_val *= share;
                aux_val = aux_val.map(|a| a * share);
                (&out.loss * (share / accum as f64))?
            } else {
                if !loss_val.is_finite() {
                    st.micro_step -= 1;
                    return Err(non_finite("the loss", loss_val, &st, last_ckpt, &opts.work_dir).into());
                }
                if accum > 1 {
                    (&out.loss / accum as f64)?
                } else {
                    out.loss.clone()
                }
            };
            let grads = scaled.backward()?;
            acc.add(params, &grads)?;
            drop(grads);
            aux_sum += aux_val.unwrap_or(0.0);
            loss_sum += loss_val;
            tokens += batch.tokens();
            useful += batch.useful_tokens();
        }
        let reduced;
        let grads = if world > 1 {
            let local = StepStats {
                loss: loss_sum,
                aux: aux_sum,
                tokens: tokens as u64,
                useful: useful as u64,
                cancelled: cancel.is_cancelled(),
            };
            let (g, s) = parallel::all_reduce_step(dist, params, acc.grads(), local)?;
            (loss_sum, aux_sum, tokens, useful, stop) =
                (s.loss, s.aux, s.tokens as usize, s.useful as usize, s.cancelled);
            if !loss_sum.is_finite() {
                st.micro_step -= cycle;
                return Err(non_finite("the loss", loss_sum, &st, last_ckpt, &opts.work_dir).into());
            }
            reduced = g;
            &reduced[..]
        } else {
            acc.grads()
        };
        let norm = global_norm(grads)?;
        if !norm.is_finite() {
            return Err(non_finite("the gradient norm", norm, &st, last_ckpt, &opts.work_dir).into());
        }
        let lr = lr_at(st.micro_step, total_micro, opts.lr, opts.warmup_steps);
        opt.step(grads, lr, clip_coefficient(norm, opts.grad_clip))?;
        acc.clear();
        st.step += 1;
        st.tokens += tokens as u64;
        st.useful_tokens += useful as u64;
        let loss = (loss_sum / cycle as f64) as f32;
        st.losses.push(loss);

        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        let tps = tokens as f64 / dt;
        if let Some(m) = metrics.as_mut() {
            m.write(
                &opts.stage,
                &serde_json::json!({
                    "step": st.step, "epoch": st.epoch, "loss": loss, "aux_loss": aux_sum / cycle as f64,
                    "lr": lr, "grad_norm": norm, "tokens": tokens, "useful_tokens": useful,
                    "tokens_per_s": tps, "useful_tokens_per_s": useful as f64 / dt, "step_s": dt,
                }),
            )?;
        }
        bar.set_position(st.step as u64);
        if st.step.is_multiple_of(opts.log_every.max(1)) || st.step == total_steps || st.step == 1 {
            bar.set_message(format!("loss {loss:.4}  {tps:.0} tok/s  lr {lr:.2e}"));
            tracing::debug!(stage = %opts.stage, step = st.step, loss, lr, grad_norm = norm, tokens_per_s = tps);
        }
        // The last step is followed by publishing, which makes a checkpoint pointless.
        if lead && st.step < total_steps && cadence.due(st.step, Instant::now()) {
            checkpoint::save(&opts.work_dir, params, &opt, &st)?;
            cadence.saved(Instant::now());
            last_ckpt = Some(st.step);
        }
    }
    bar.finish_and_clear();

    Ok(finish(opts, st.step, st.losses, (st.tokens, st.useful_tokens), resumed_from, started, tokens_at_start))
}

/// The summary of a finished loop, after drawing its loss curve (best effort): `steps` taken in
/// total, the loss of each, `(tokens, useful_tokens)` in total, and what this invocation started
/// from (its resumed step, start time and token count).
pub(crate) fn finish(
    opts: &TrainOptions,
    steps: usize,
    losses: Vec<f32>,
    (tokens, useful_tokens): (u64, u64),
    resumed_from: Option<usize>,
    started: Instant,
    tokens_at_start: u64,
) -> TrainSummary {
    if let Some(p) = opts.plot_path.as_ref().filter(|_| opts.collective.rank() == 0) {
        // A missing plot must never fail a finished training run.
        if let Err(e) = super::plot::stage_png(p, &opts.stage, &losses, opts.metrics_path.as_deref()) {
            tracing::warn!("could not draw the loss curve: {e:#}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    TrainSummary {
        steps,
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        losses,
        tokens,
        useful_tokens,
        resumed_from,
        seconds,
        tokens_per_s: (tokens - tokens_at_start) as f64 / seconds.max(1e-9),
    }
}

fn non_finite(
    what: &'static str,
    value: f64,
    st: &TrainState,
    last: Option<usize>,
    work_dir: &std::path::Path,
) -> TrainError {
    let kept = match last {
        Some(s) => format!("the last good checkpoint (step {s}) is kept in {}", work_dir.display()),
        None => "no checkpoint was written before it".to_string(),
    };
    TrainError::NonFinite { what, value, step: st.step + 1, micro_step: st.micro_step + 1, kept }
}

/// The loop's progress bar (hidden unless `opts.progress` and stderr is a terminal).
pub(crate) fn progress_bar(opts: &TrainOptions, total: usize, done: usize) -> indicatif::ProgressBar {
    if !opts.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(opts.stage.clone());
    bar.set_position(done as u64);
    bar
}
