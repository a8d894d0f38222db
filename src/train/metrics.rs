//! Where per-step metrics go: the run's `metrics.jsonl`, one JSON object per line, each tagged
//! with its stage.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends metric records to a JSONL file.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsFile {
    /// Open `path` for appending (created if missing).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot open metrics file {}: {e}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Append `{"stage": stage, ...record}`.
    pub fn write(&mut self, stage: &str, record: &serde_json::Value) -> anyhow::Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("stage".into(), stage.into());
        if let serde_json::Value::Object(m) = record {
            obj.extend(m.clone());
        }
        writeln!(self.file, "{}", serde_json::Value::Object(obj))
            .map_err(|e| anyhow::anyhow!("cannot write metrics to {}: {e}", self.path.display()))
    }
}
