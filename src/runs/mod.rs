//! Run records: `runs/<timestamp>-<recipe>/run.json`, `metrics.jsonl`, `rejects.jsonl`, plots;
//! listing and diffing them.
//!
//! `run.json` is rewritten atomically ([`crate::durable::write_atomic`]) every time a stage changes
//! state, so a run killed at any moment still leaves a valid record saying how far it got.
//! `runs/` is the user's record: the cache can be deleted and rebuilt from it.

mod diff;
mod list;
mod record;
mod show;

pub use diff::{diff_runs, DiffOptions};
pub use list::{find_run, last_unfinished, list_runs, referenced_keys, RunSummary};
pub use record::{DatasetLock, RunLock, RunRecord, RunStatus, StageRecord, StageStatus};
pub use show::{render_text as render_show, show_run, EvalTable, ModelLine, RunReport, StageLine};

use crate::data::rejects::RejectLog;
use crate::fs_error::{IoContext, IoError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File names inside a run directory.
pub mod files {
    /// The run record.
    pub const RUN_JSON: &str = "run.json";
    /// One JSON object per line: `{"stage": ..., "step": ..., <metrics>}`.
    pub const METRICS: &str = "metrics.jsonl";
    /// One JSON object per line for every skipped bad record.
    pub const REJECTS: &str = crate::data::rejects::REJECTS;
}

/// What can go wrong writing or reading run records.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// File system error.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A run.json that does not parse.
    #[error("run record {} is not valid: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// No run matches a name or prefix.
    #[error("no run named '{0}' in {1}; `mmrun runs` lists them")]
    NotFound(String, PathBuf),
    /// A prefix matches several runs.
    #[error("'{0}' matches several runs ({1}); give more of the name")]
    Ambiguous(String, String),
}

/// Where a running pipeline writes its per-run records (metrics, rejects, plots). Shared by
/// reference with every stage, so all mutation goes through an internal lock.
#[derive(Debug)]
pub struct RunSink {
    dir: PathBuf,
    record: Mutex<Option<RunRecord>>,
    /// Serialises appends from several threads (lines never interleave).
    append: Mutex<()>,
    /// `rejects.jsonl`: each (dataset, file, line) once per run, however many stages or shard
    /// sets report it.
    rejects: RejectLog,
}

impl RunSink {
    /// A sink writing into `dir` (created if needed), without a `run.json` (tests, tools).
    pub fn create(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let rejects = RejectLog::open(dir.join(files::REJECTS))?;
        Ok(Self { dir, record: Mutex::new(None), append: Mutex::default(), rejects })
    }

    /// Start a new run under `runs_dir`: create `<UTC timestamp>-<recipe>/` and write the initial
    /// `run.json` (status `running`).
    pub fn start(runs_dir: &Path, mut record: RunRecord) -> Result<Self, RunError> {
        std::fs::create_dir_all(runs_dir).ctx("creating runs directory", runs_dir)?;
        let now = time::OffsetDateTime::now_utc();
        let stamp = now
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
            ))
            .expect("formattable");
        let name = sanitize(&record.recipe_name);
        let mut n = 1;
        let dir = loop {
            let id = if n == 1 { format!("{stamp}-{name}") } else { format!("{stamp}-{name}-{n}") };
            let dir = runs_dir.join(&id);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    record.id = id;
                    break dir;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(IoError::new("creating run directory", &dir, e).into()),
            }
        };
        record.started = now.format(&time::format_description::well_known::Rfc3339).expect("formattable");
        record.pid = std::process::id();
        let rejects = RejectLog::open(dir.join(files::REJECTS)).ctx("reading", &dir)?;
        let sink = Self { dir, record: Mutex::new(Some(record)), append: Mutex::default(), rejects };
        sink.save()?;
        Ok(sink)
    }

    /// The run directory (plots go here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's id (its directory name).
    pub fn id(&self) -> String {
        self.dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default()
    }

    /// Change the record and rewrite `run.json` atomically.
    pub fn update(&self, f: impl FnOnce(&mut RunRecord)) -> Result<(), RunError> {
        {
            let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = rec.as_mut() {
                f(r);
            }
        }
        self.save()
    }

    /// A copy of the current record (None for sinks made with [`RunSink::create`]).
    pub fn record(&self) -> Option<RunRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn save(&self) -> Result<(), RunError> {
        let rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = rec.as_ref() else { return Ok(()) };
        let json = serde_json::to_vec_pretty(r).expect("record serialises");
        let dst = self.dir.join(files::RUN_JSON);
        Ok(crate::durable::write_atomic(&dst, &json).ctx("writing", &dst)?)
    }

    fn append_line(&self, file: &str, value: &serde_json::Value) -> std::io::Result<()> {
        let _g = self.append.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = serde_json::to_string(value).expect("json serialises");
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(file))?;
        f.write_all(line.as_bytes())
    }

    /// Add a note to `run.json` (something the user should know about how the run went, e.g.
    /// that a damaged cache entry was rebuilt). Best effort: a note that cannot be saved is logged.
    pub fn note(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Err(e) = self.update(|r| r.notes.push(msg.clone())) {
            tracing::warn!("could not add a note to the run record: {e}");
        }
    }

    /// Record the cache entries (outside `objects`) the run uses, bucket → keys, so `gc` keeps
    /// them while the record exists.
    pub fn set_cache_entries(&self, entries: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>) {
        let changed = self.record().is_some_and(|r| r.cache_entries != entries);
        if changed {
            if let Err(e) = self.update(|r| r.cache_entries = entries) {
                tracing::warn!("could not update the run record: {e}");
            }
        }
    }

    /// Append one metrics point of `stage` to `metrics.jsonl`. `point` should be an object with
    /// a `step` field (e.g. `{"step": 10, "loss": 3.2, "lr": 5e-4}`); `stage` is added.
    pub fn metric(&self, stage: &str, point: serde_json::Value) -> std::io::Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("stage".into(), stage.into());
        match point {
            serde_json::Value::Object(m) => obj.extend(m),
            other => {
                obj.insert("value".into(), other);
            }
        }
        self.append_line(files::METRICS, &serde_json::Value::Object(obj))
    }

    /// Skipped records per dataset, counted from `rejects.jsonl` (whoever appended them);
    /// `None` when there are none.
    pub fn count_rejects(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        let text = std::fs::read_to_string(self.dir.join(files::REJECTS)).ok()?;
        let mut counts = std::collections::BTreeMap::new();
        for line in text.lines() {
            let ds = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["dataset"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".into());
            *counts.entry(ds).or_insert(0) += 1;
        }
        Some(counts)
    }
}

/// Skipped bad records (`on_bad_record = "skip"`) are appended to `rejects.jsonl` (capped, each
/// once) and counted per dataset in `run.json` (recounted from the file at the next state change).
impl crate::data::RejectSink for RunSink {
    fn reject(&self, dataset: &str, file: &Path, line: usize, reason: &str, raw: &[u8]) -> std::io::Result<()> {
        self.rejects.reject(dataset, file, line, reason, raw)
    }

    fn adopt_rejects(&self, path: &Path) -> std::io::Result<()> {
        self.rejects.adopt_rejects(path)
    }

    fn location(&self) -> &Path {
        self.dir()
    }

    fn note(&self, msg: &str) {
        tracing::warn!("{msg}");
        RunSink::note(self, msg);
    }
}

/// Keep run directory names portable.
fn sanitize(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if s.is_empty() {
        "recipe".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests;
