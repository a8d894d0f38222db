//! Run records: `runs/<timestamp>-<recipe>/run.json`, `metrics.jsonl`, `rejects.jsonl`, plots;
//! listing and diffing them.

use std::path::{Path, PathBuf};

/// Where a running pipeline writes its per-run records (metrics, rejects, plots).
#[derive(Debug)]
pub struct RunSink {
    dir: PathBuf,
}

impl RunSink {
    /// A sink writing into `dir` (created if needed).
    pub fn create(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
