//! Executing a plan: for each stage in topological order, use the cached artifact or take the
//! key's lock, build the stage into a tmp dir, publish it, and record the outcome in the run.
//!
//! Architecture invariant: nothing half-written ever reaches `objects/`. A stage writes into
//! `tmp/…` (discarded on failure) and checkpoints into `work/<key>/` (kept for resume); only
//! [`Cache::publish`] moves a finished, manifested directory into place. A SIGKILL at any moment
//! therefore leaves the cache consistent, and the OS drops the key lock with the process.
//!
//! This module knows nothing of candle or of any particular stage: it drives
//! [`DynStage`]s through their object-safe interface.

pub mod pipeline;
pub mod ranks;
pub mod slurm;

use crate::artifact::Artifact;
use crate::cache::{Bucket, Cache, Depth, Lookup};
use crate::cancel::{CancelToken, Interrupted};
use crate::data::ResolvedDataset;
use crate::hub::Fetched;
use crate::recipe::Recipe;
use crate::runs::{RunSink, StageStatus};
use crate::stages::{DynStage, InputRef, Inputs, StageContext};
use std::collections::BTreeMap;
use std::time::Instant;

/// One stage as the executor sees it (built from the planner's `PlannedStage`).
#[derive(Clone, Debug)]
pub struct Job {
    /// Stage name in the recipe.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Stage key (object directory name).
    pub key: String,
    /// Canonical params (from the recipe, defaults applied).
    pub params: serde_json::Value,
    /// Declared inputs.
    pub inputs: Vec<InputRef>,
    /// A later stage of this run reads this artifact: check it against its manifest in full
    /// (blake3) before calling it cached, and rebuild it if it is damaged.
    pub verify: bool,
}

/// How a whole execution ended.
#[derive(Debug)]
pub enum ExecOutcome {
    /// Every stage is cached or was built.
    Succeeded,
    /// A stage failed (its error); later stages were skipped.
    Failed {
        /// The failed stage.
        stage: String,
        /// Its error chain.
        error: anyhow::Error,
    },
    /// Ctrl-C: the running stage checkpointed and stopped.
    Interrupted {
        /// The stage that was running (or the next one, if cancelled between stages).
        stage: String,
    },
}

/// Counts for the final summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecCounts {
    /// Stages built by this run.
    pub ran: usize,
    /// Stages found in the cache.
    pub cached: usize,
}

/// Everything [`execute`] needs besides the jobs.
pub struct Executor<'a> {
    /// The cache.
    pub cache: &'a Cache,
    /// The run record.
    pub run: &'a RunSink,
    /// Raised on Ctrl-C.
    pub cancel: &'a CancelToken,
    /// The loaded recipe.
    pub recipe: &'a Recipe,
    /// Resolved datasets by name.
    pub datasets: &'a BTreeMap<String, ResolvedDataset>,
    /// The recipe's `hf://` inputs, resolved through its lock before planning.
    pub fetched: &'a Fetched,
    /// The shared remote cache (`[cache] remote`), if any: pulled before a stage is built,
    /// pushed after.
    pub remote: Option<&'a crate::cache::Remote>,
    /// Stage kinds.
    pub registry: &'a [&'a dyn DynStage],
    /// Called after a stage's artifact is published (the planner records its fingerprint so a
    /// later `plan` can explain what changed).
    pub on_published: &'a dyn Fn(&Job, &Artifact),
}

impl Executor<'_> {
    /// Run `jobs` (topologically ordered) to completion, a failure, or an interrupt, keeping
    /// `run.json` up to date after every state change.
    pub fn execute(&self, jobs: &[Job]) -> (ExecOutcome, ExecCounts) {
        let mut artifacts: BTreeMap<String, Artifact> = BTreeMap::new();
        let mut counts = ExecCounts::default();
        let total = jobs.len();
        for (i, job) in jobs.iter().enumerate() {
            let tag = format!("[{}/{}] {} ({})", i + 1, total, job.name, job.kind);
            if self.cancel.is_cancelled() {
                self.skip_rest(&jobs[i..]);
                return (ExecOutcome::Interrupted { stage: job.name.clone() }, counts);
            }
            if let Some(art) = self.usable_object(job, &tag) {
                eprintln!("{tag}: cached {}", short(&job.key));
                self.set_status(&job.name, StageStatus::Cached, 0.0, Some(&art), None);
                artifacts.insert(job.name.clone(), art);
                counts.cached += 1;
                continue;
            }
            match self.build(job, &artifacts, &tag) {
                Ok((art, origin, secs)) => {
                    match origin {
                        Origin::Built => {
                            eprintln!("{tag}: ran in {secs:.1}s");
                            counts.ran += 1;
                            self.set_status(&job.name, StageStatus::Ran, secs, Some(&art), None);
                        }
                        Origin::OtherMmrun => {
                            eprintln!("{tag}: cached {} (built by another mmrun)", short(&job.key));
                            counts.cached += 1;
                            self.set_status(&job.name, StageStatus::Cached, 0.0, Some(&art), None);
                        }
                        Origin::Remote(url) => {
                            eprintln!("{tag}: cached {} (downloaded from the remote cache {url})", short(&job.key));
                            counts.cached += 1;
                            self.set_status(&job.name, StageStatus::Cached, secs, Some(&art), None);
                        }
                    }
                    artifacts.insert(job.name.clone(), art);
                }
                Err((error, secs)) => {
                    let interrupted = error.chain().any(|e| e.is::<Interrupted>());
                    self.skip_rest(&jobs[i + 1..]);
                    if interrupted {
                        eprintln!("{tag}: interrupted after {secs:.1}s (checkpoint kept)");
                        self.set_status(&job.name, StageStatus::Interrupted, secs, None, None);
                        return (ExecOutcome::Interrupted { stage: job.name.clone() }, counts);
                    }
                    eprintln!("{tag}: failed after {secs:.1}s");
                    self.set_status(&job.name, StageStatus::Failed, secs, None, Some(format!("{error:#}")));
                    return (ExecOutcome::Failed { stage: job.name.clone(), error }, counts);
                }
            }
        }
        (ExecOutcome::Succeeded, counts)
    }

    /// The cached object of `job`, if there is one it may use: complete by size, and when a later
    /// stage reads it (`job.verify`), by content too. A damaged one is reported (and left for
    /// [`Self::build`] to replace under the key lock).
    fn usable_object(&self, job: &Job, tag: &str) -> Option<Artifact> {
        let art = self.cache.object(&job.key)?;
        if !job.verify {
            return Some(art);
        }
        match self.cache.verify(&art) {
            Ok(()) => Some(art),
            Err(damage) => {
                let msg = format!("the cached object of stage '{}' is damaged ({damage}); rebuilding it", job.name);
                eprintln!("{tag}: {msg}");
                self.run.note(msg);
                None
            }
        }
    }

    /// Lock, re-check, pull from the remote, or run and publish (and push). Returns the artifact,
    /// where it came from, and seconds.
    fn build(
        &self,
        job: &Job,
        artifacts: &BTreeMap<String, Artifact>,
        tag: &str,
    ) -> Result<(Artifact, Origin, f64), (anyhow::Error, f64)> {
        let start = Instant::now();
        let fail = |e: anyhow::Error| (e, start.elapsed().as_secs_f64());
        let _lock = self
            .cache
            .lock(&job.key, || {
                eprintln!("{tag}: waiting for another mmrun building {} ({})", job.name, short(&job.key));
                tracing::info!(stage = %job.name, key = %job.key, "waiting for another mmrun building {}", job.name);
            })
            .map_err(|e| fail(e.into()))?;
        // Whoever held the lock may have just published this very key.
        match self.cache.lookup(&job.key, if job.verify { Depth::Content } else { Depth::Sizes }) {
            Lookup::Found(art) => return Ok((art, Origin::OtherMmrun, 0.0)),
            Lookup::Absent => {}
            // We hold the lock: nobody else can be replacing it.
            Lookup::Damaged(_) => self.cache.discard(Bucket::Objects, &job.key).map_err(|e| fail(e.into()))?,
        }
        if let Some(remote) = self.remote {
            if let Some(art) = remote.try_pull(self.cache, &job.key) {
                return Ok((art, Origin::Remote(remote.url().to_string()), start.elapsed().as_secs_f64()));
            }
        }
        let stage = self.registry.iter().find(|s| s.kind() == job.kind).ok_or_else(|| {
            fail(anyhow::anyhow!("internal: stage kind '{}' of stage '{}' is not registered", job.kind, job.name))
        })?;
        let inputs = self.inputs_for(job, *stage, artifacts).map_err(fail)?;
        self.set_status(&job.name, StageStatus::Running, 0.0, None, None);
        eprintln!("{tag}: running");
        let tmp = self.cache.tmp_dir().map_err(|e| fail(e.into()))?;
        let work_dir = self.cache.work_dir(&job.key).map_err(|e| fail(e.into()))?;
        let ranks = stage.ranks(&job.params);
        let (rank, workers) = if ranks.world_size > 1 {
            let (r, w) = ranks::start(self, job, &ranks).map_err(fail)?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let mut ctx = StageContext {
            name: &job.name,
            key: &job.key,
            recipe: self.recipe,
            inputs: &inputs,
            out_dir: tmp.path(),
            work_dir: &work_dir,
            cache: self.cache,
            run: self.run,
            cancel: self.cancel,
            rank,
        };
        let outcome = stage.run(&mut ctx, &job.params);
        if let Some(w) = workers {
            w.finish(outcome.as_ref().map_or_else(|e| e.chain().any(|c| c.is::<Interrupted>()), |_| true));
        }
        let outcome = outcome.map_err(|e| fail(e.context(format!("stage '{}' ({})", job.name, job.kind))))?;
        let art = self
            .cache
            .publish(tmp, &job.key, stage.output(), stage.kind(), outcome.metrics)
            .map_err(|e| fail(anyhow::Error::from(e).context(format!("publishing stage '{}'", job.name))))?;
        (self.on_published)(job, &art);
        let secs = start.elapsed().as_secs_f64();
        if let Some(remote) = self.remote {
            if remote.try_push(self.cache, &art) == Some(crate::cache::Pushed::Uploaded) {
                eprintln!("{tag}: pushed to the remote cache {}", remote.url());
            }
        }
        Ok((art, Origin::Built, secs))
    }

    pub(crate) fn inputs_for(
        &self,
        job: &Job,
        stage: &dyn DynStage,
        artifacts: &BTreeMap<String, Artifact>,
    ) -> anyhow::Result<Inputs> {
        let mut inputs = Inputs::default();
        for src in stage.remote_sources(&job.params) {
            let repo = self.fetched.get(src.kind, &job.name).cloned().ok_or_else(|| {
                anyhow::anyhow!("internal: {} of stage '{}' was not fetched before planning", src.uri, job.name)
            })?;
            inputs.remote.insert(src.param, repo);
        }
        for input in &job.inputs {
            match input {
                InputRef::Stage { stage, .. } => {
                    let art = artifacts.get(stage).cloned().ok_or_else(|| {
                        anyhow::anyhow!("internal: stage '{}' needs '{stage}', which has not been built", job.name)
                    })?;
                    // Memoised: free unless the files changed since they were checked.
                    self.cache.verify(&art).map_err(|damage| {
                        anyhow::anyhow!(
                            "the artifact of stage '{stage}' changed on disk during this run ({damage}); \
                             run again to rebuild it"
                        )
                    })?;
                    inputs.artifacts.insert(stage.clone(), art);
                }
                InputRef::Dataset { dataset, .. } => {
                    let ds = self.datasets.get(dataset).cloned().ok_or_else(|| {
                        anyhow::anyhow!("internal: dataset '{dataset}' of stage '{}' was not resolved", job.name)
                    })?;
                    inputs.datasets.insert(dataset.clone(), ds);
                }
            }
        }
        Ok(inputs)
    }

    fn skip_rest(&self, rest: &[Job]) {
        for j in rest {
            self.set_status(&j.name, StageStatus::Skipped, 0.0, None, None);
        }
    }

    fn set_status(&self, name: &str, status: StageStatus, secs: f64, art: Option<&Artifact>, error: Option<String>) {
        set_status(self.run, self.cache, name, status, secs, art, error);
    }
}

/// Record a stage's new state in `run.json` (with the final metrics from its artifact, the
/// current reject counts and the cache entries the run holds). A record that cannot be written is
/// a warning, not a failed stage.
pub(crate) fn set_status(
    run: &RunSink,
    cache: &Cache,
    name: &str,
    status: StageStatus,
    secs: f64,
    art: Option<&Artifact>,
    error: Option<String>,
) {
    // The records skipped while building an artifact (a prepare stage's shards) are stored
    // with it and belong to every run that has it, built or cached, so the record does not
    // depend on what the cache held. Each is recorded once per run.
    if let Some(a) = art {
        let p = a.dir.join(crate::data::rejects::REJECTS);
        if let Err(e) = crate::data::RejectSink::adopt_rejects(run, &p) {
            tracing::warn!("could not copy {} into the run record: {e}", p.display());
        }
    }
    let rejects = run.count_rejects();
    let res = run.update(|r| {
        if let Some(st) = r.stage_mut(name) {
            st.status = status;
            st.seconds = secs;
            if let Some(a) = art {
                st.metrics = a.manifest.metrics.clone();
            }
            st.error = error;
        }
        if let Some(c) = rejects {
            r.rejects = c;
        }
        r.cache_entries = cache.pinned_entries();
    });
    if let Err(e) = res {
        tracing::warn!("could not update the run record: {e}");
    }
}

/// Where a stage's artifact came from when it was not cached at the start.
enum Origin {
    /// This run built it.
    Built,
    /// Another mmrun published it while this one waited for the key's lock.
    OtherMmrun,
    /// Downloaded (and verified) from the remote cache at this URL.
    Remote(String),
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

#[cfg(test)]
mod tests;
