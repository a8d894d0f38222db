//! Listing run records and finding one by name or prefix.

use super::{files, RunError, RunRecord, StageStatus};
use crate::fs_error::{IoContext, IoError};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One line of `mmrun runs`.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The run directory.
    pub dir: PathBuf,
    /// Its record.
    pub record: RunRecord,
}

impl RunSummary {
    /// Number of stages with `status`.
    pub fn count(&self, status: StageStatus) -> usize {
        self.record.stages.iter().filter(|s| s.status == status).count()
    }
}

/// Read one run directory's record.
pub fn read_record(dir: &Path) -> Result<RunRecord, RunError> {
    let path = dir.join(files::RUN_JSON);
    let bytes = std::fs::read(&path).ctx("reading", &path)?;
    serde_json::from_slice(&bytes).map_err(|source| RunError::Parse { path, source })
}

/// All runs under `runs_dir`, oldest first. Directories without a readable `run.json` are
/// skipped (with a warning), so one damaged record never hides the others.
pub fn list_runs(runs_dir: &Path) -> Result<Vec<RunSummary>, RunError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(runs_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(IoError::new("listing", runs_dir, e).into()),
    };
    for entry in rd.flatten() {
        let dir = entry.path();
        if !dir.join(files::RUN_JSON).exists() {
            continue;
        }
        match read_record(&dir) {
            Ok(record) => out.push(RunSummary { dir, record }),
            Err(e) => tracing::warn!("skipping {}: {e}", dir.display()),
        }
    }
    out.sort_by(|a, b| (&a.record.started, &a.record.id).cmp(&(&b.record.started, &b.record.id)));
    Ok(out)
}

/// The run whose directory name is `name` or starts with it (must be unique). `name` may also
/// be a path to a run directory.
pub fn find_run(runs_dir: &Path, name: &str) -> Result<RunSummary, RunError> {
    let as_path = Path::new(name);
    if as_path.join(files::RUN_JSON).is_file() {
        return Ok(RunSummary { dir: as_path.to_path_buf(), record: read_record(as_path)? });
    }
    let runs = list_runs(runs_dir)?;
    if let Some(r) = runs.iter().find(|r| r.record.id == name || dir_name(&r.dir) == name) {
        return Ok(r.clone());
    }
    let hits: Vec<&RunSummary> = runs.iter().filter(|r| dir_name(&r.dir).starts_with(name)).collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(RunError::NotFound(name.to_string(), runs_dir.to_path_buf())),
        many => Err(RunError::Ambiguous(
            name.to_string(),
            many.iter().map(|r| dir_name(&r.dir)).collect::<Vec<_>>().join(", "),
        )),
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default()
}

/// Every cache key any run record under `runs_dir` mentions: stage keys and the other cache
/// entries the runs used (what `gc` must keep).
pub fn referenced_keys(runs_dir: &Path) -> Result<BTreeSet<String>, RunError> {
    let mut keys = BTreeSet::new();
    for r in list_runs(runs_dir)? {
        keys.extend(r.record.lock.stages.values().cloned());
        keys.extend(r.record.stages.iter().map(|s| s.key.clone()));
        keys.extend(r.record.cache_entries.values().flatten().cloned());
    }
    Ok(keys)
}

/// The newest run that did not finish and was not finished since: a later successful run of the
/// same recipe with the same overrides supersedes it. Runs whose process is still alive are not
/// candidates.
pub fn last_unfinished(runs: &[RunSummary]) -> Option<RunSummary> {
    let mut done: BTreeSet<(String, Vec<String>)> = BTreeSet::new();
    for r in runs.iter().rev() {
        let id = (r.record.recipe_path.clone(), r.record.overrides.clone());
        if !r.record.is_unfinished() {
            done.insert(id);
        } else if r.record.effective_status() != "running" && !done.contains(&id) {
            return Some(r.clone());
        }
    }
    None
}
