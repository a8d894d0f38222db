//! Resumable checkpoints in a stage's work directory.
//!
//! Layout: `<work_dir>/checkpoints/step-00000042/{weights.safetensors, optimizer.safetensors,
//! state.json}` (a loop with several optimised parts, as PPO's actor and critic, adds
//! `<part>-weights.safetensors` and `<part>-optimizer.safetensors`). A checkpoint is assembled in a `.tmp-…` sibling, `state.json` is written last, every
//! file is synced, then the directory is renamed into place: a `step-*` directory is complete iff its
//! `state.json` exists. The two newest checkpoints are kept.

use super::optim::AdamW;
use anyhow::Context;
use candle_core::{Tensor, Var};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bumped when the checkpoint format changes.
pub const FORMAT: u32 = 1;
const WEIGHTS: &str = "weights.safetensors";
const OPTIM: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const KEEP: usize = 2;

/// Everything but tensors needed to continue a run exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Checkpoint format version.
    pub format: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// Micro-steps (batches) completed over the whole run (the schedule's `cur`).
    pub micro_step: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Next micro-batch index within the epoch (the data position).
    pub batch_in_epoch: usize,
    /// The run seed. The data-order RNG is ChaCha8 seeded with `seed + epoch`, so (seed, epoch)
    /// is its complete state.
    pub seed: u64,
    /// Tokens seen (padding included).
    pub tokens: u64,
    /// Loss-bearing tokens seen.
    pub useful_tokens: u64,
    /// Mean loss of every optimiser step so far (for the loss curve after a resume).
    pub losses: Vec<f32>,
    /// Parameter names, in optimiser order (checked on load).
    pub params: Vec<String>,
}

/// When the loop writes a checkpoint after an optimiser step: every `every_steps` steps (0: not by
/// count) and whenever `interval` has passed since the last checkpoint (or since the loop started;
/// `Some(ZERO)`: after every step; `None`: not by time). The caller passes the current time in,
/// so the policy is tested with made-up instants and the loop's results never depend on it.
#[derive(Clone, Debug)]
pub struct Cadence {
    every_steps: usize,
    interval: Option<Duration>,
    last: Instant,
}

impl Cadence {
    /// A cadence whose interval starts counting at `now`.
    pub fn new(every_steps: usize, interval: Option<Duration>, now: Instant) -> Self {
        Self { every_steps, interval, last: now }
    }

    /// Whether a checkpoint is due after optimiser step `step`, at `now`.
    pub fn due(&self, step: usize, now: Instant) -> bool {
        let by_count = self.every_steps > 0 && step.is_multiple_of(self.every_steps);
        let by_time = self.interval.is_some_and(|i| now.saturating_duration_since(self.last) >= i);
        by_count || by_time
    }

    /// A checkpoint was written at `now`: the interval starts again.
    pub fn saved(&mut self, now: Instant) {
        self.last = now;
    }
}

fn root(work_dir: &Path) -> PathBuf {
    work_dir.join("checkpoints")
}

/// One optimised set of parameters in a checkpoint: its weights and its optimiser state, stored as
/// `<name>-weights.safetensors` and `<name>-optimizer.safetensors` (plain `weights.safetensors` and
/// `optimizer.safetensors` for the unnamed part every single-model loop writes).
pub struct Part<'a> {
    /// File prefix (`""` for the main model).
    pub name: &'a str,
    /// The parameters, by name.
    pub params: &'a [(String, Var)],
    /// Their optimiser.
    pub opt: &'a AdamW,
}

fn part_files(name: &str) -> (String, String) {
    if name.is_empty() {
        (WEIGHTS.to_string(), OPTIM.to_string())
    } else {
        (format!("{name}-{WEIGHTS}"), format!("{name}-{OPTIM}"))
    }
}

/// Write a checkpoint of `params`, `opt` and `state` atomically; returns its directory.
pub fn save(work_dir: &Path, params: &[(String, Var)], opt: &AdamW, state: &TrainState) -> anyhow::Result<PathBuf> {
    save_parts(work_dir, state.step, &[Part { name: "", params, opt }], state)
}

/// Write a checkpoint of several optimised parts (PPO's actor and critic) and a loop's own `state`
/// as step `step`, atomically; returns its directory.
pub fn save_parts<S: Serialize>(
    work_dir: &Path,
    step: usize,
    parts: &[Part<'_>],
    state: &S,
) -> anyhow::Result<PathBuf> {
    let root = root(work_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create checkpoint dir {}", root.display()))?;
    let final_dir = root.join(format!("step-{step:08}"));
    let tmp = root.join(format!(".tmp-step-{step:08}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    for p in parts {
        let (wf, of) = part_files(p.name);
        let weights: HashMap<String, Tensor> =
            p.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&weights, tmp.join(wf)).context("writing checkpoint weights")?;
        candle_core::safetensors::save(&p.opt.state_tensors()?, tmp.join(of)).context("writing optimizer state")?;
    }
    std::fs::write(tmp.join(STATE), serde_json::to_vec_pretty(state)?)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    // fsyncs every file (state.json included) before the rename, and the directory after it.
    crate::durable::publish_dir(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint into place at {}", final_dir.display()))?;
    prune(&root)?;
    Ok(final_dir)
}

/// Complete checkpoints, oldest first.
fn complete(root: &Path) -> anyhow::Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(out) };
    for e in rd {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if p.join(STATE).is_file() {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn prune(root: &Path) -> anyhow::Result<()> {
    let all = complete(root)?;
    for (_, p) in all.iter().take(all.len().saturating_sub(KEEP)) {
        std::fs::remove_dir_all(p)?;
    }
    // Leftovers of a crash while writing.
    for e in std::fs::read_dir(root)? {
        let p = e?.path();
        if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-")) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    Ok(())
}

/// The newest complete checkpoint in `work_dir`, if any.
pub fn latest(work_dir: &Path) -> anyhow::Result<Option<(PathBuf, TrainState)>> {
    let Some((dir, state)) = latest_state::<TrainState>(work_dir)? else { return Ok(None) };
    anyhow::ensure!(
        state.format == FORMAT,
        "checkpoint {} has format {} (this mmrun writes {FORMAT}); delete it to start over",
        dir.display(),
        state.format
    );
    Ok(Some((dir, state)))
}

/// The newest complete checkpoint in `work_dir` with its state read as a loop's own type `S`.
pub fn latest_state<S: DeserializeOwned>(work_dir: &Path) -> anyhow::Result<Option<(PathBuf, S)>> {
    let Some((_, dir)) = complete(&root(work_dir))?.pop() else { return Ok(None) };
    let text = std::fs::read(dir.join(STATE))?;
    let state: S = serde_json::from_slice(&text)
        .with_context(|| format!("checkpoint {} is unreadable; delete it to start over", dir.display()))?;
    Ok(Some((dir, state)))
}

/// Load the weights and optimiser state of the checkpoint in `dir` into `params` and `opt`.
pub fn restore(dir: &Path, state: &TrainState, params: &[(String, Var)], opt: &mut AdamW) -> anyhow::Result<()> {
    restore_part(dir, "", &state.params, params, opt, state.step as u64)
}

/// Load part `name` of the checkpoint in `dir` (see [`Part`]) into `params` and `opt`, whose
/// optimiser has taken `steps` steps; `saved_names` are the parameter names the checkpoint's state
/// recorded for it, checked against `params`.
pub fn restore_part(
    dir: &Path,
    name: &str,
    saved_names: &[String],
    params: &[(String, Var)],
    opt: &mut AdamW,
    steps: u64,
) -> anyhow::Result<()> {
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    anyhow::ensure!(
        names == saved_names,
        "checkpoint {} was made for different parameters; delete it to start over",
        dir.display()
    );
    let (wf, of) = part_files(name);
    let dev = params.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let weights = candle_core::safetensors::load(dir.join(wf), &dev).context("reading checkpoint weights")?;
    for (name, var) in params {
        let t = weights.get(name).with_context(|| format!("checkpoint {} lacks weight '{name}'", dir.display()))?;
        var.set(&t.to_dtype(var.dtype())?).with_context(|| format!("restoring '{name}'"))?;
    }
    crate::model::ops::linear_bf16::weights_changed();
    let st = candle_core::safetensors::load(dir.join(of), &dev).context("reading optimizer state")?;
    opt.load_state(&st, steps)?;
    Ok(())
}
