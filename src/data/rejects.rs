//! Records skipped under `on_bad_record = "skip"`: the [`RejectSink`] they go to, and
//! [`RejectLog`], the `rejects.jsonl` file that both a run record and a shard set keep.
//!
//! A line is capped ([`MAX_REJECT_RAW`] bytes of the raw record, 1 KiB of reason and file name):
//! a rejected "record" can be a whole file (a JSON array, a file in the wrong format). Each
//! (dataset, file, line) is written once per log, so rejects copied from several shard sets (or
//! read again by a resumed build) are not counted twice.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file name of a reject log, in run records and shard sets alike.
pub const REJECTS: &str = "rejects.jsonl";
/// The most bytes of a rejected record's raw text kept (`"raw_bytes"` then gives its full size).
pub const MAX_REJECT_RAW: usize = 4096;
const MAX_REJECT_TEXT: usize = 1024;

/// Where records skipped under `on_bad_record = "skip"` go. The run record
/// (`crate::runs::RunSink`) implements it, so `data` never depends on `runs`.
pub trait RejectSink {
    /// Record one skipped record: its dataset, file, 1-based line, why, and its raw bytes (the
    /// sink caps their size).
    fn reject(&self, dataset: &str, file: &Path, line: usize, reason: &str, raw: &[u8]) -> std::io::Result<()>;
    /// Copy the rejects recorded in another reject log (e.g. the one stored with a shard set),
    /// each once. A missing file means no rejects.
    fn adopt_rejects(&self, path: &Path) -> std::io::Result<()>;
    /// Where the rejects are written, for I/O error messages.
    fn location(&self) -> &Path;
    /// Something the user should know about how the data was obtained (e.g. that a damaged cache
    /// entry was rebuilt). The run record keeps it; by default it is only logged.
    fn note(&self, msg: &str) {
        tracing::warn!("{msg}");
    }
}

/// An append-only `rejects.jsonl`, each (dataset, file, line) once.
#[derive(Debug)]
pub struct RejectLog {
    path: PathBuf,
    /// Serialises appends (lines never interleave) and remembers what was written.
    seen: Mutex<HashSet<(String, String, u64)>>,
}

impl RejectLog {
    /// A log appending to `path` (created at the first reject). Records already in the file are
    /// not written again.
    pub fn open(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let mut seen = HashSet::new();
        for v in read_lines(&path)? {
            seen.insert(id(&v));
        }
        Ok(Self { path, seen: Mutex::new(seen) })
    }

    /// Append one capped reject object unless this log holds the same (dataset, file, line).
    fn append(&self, v: serde_json::Value) -> std::io::Result<()> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.insert(id(&v)) {
            return Ok(());
        }
        let mut line = serde_json::to_string(&v).expect("json serialises");
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(line.as_bytes())
    }
}

impl RejectSink for RejectLog {
    fn reject(&self, dataset: &str, file: &Path, line: usize, reason: &str, raw: &[u8]) -> std::io::Result<()> {
        let file = file.display().to_string();
        // Cut before decoding: a rejected "record" may be a whole file. +3 keeps a character
        // split at the cut from becoming a replacement character inside the cap.
        let text = String::from_utf8_lossy(&raw[..raw.len().min(MAX_REJECT_RAW + 3)]);
        let mut v = serde_json::json!({
            "dataset": cap(dataset, MAX_REJECT_TEXT),
            "file": cap(&file, MAX_REJECT_TEXT),
            "line": line,
            "reason": cap(reason, MAX_REJECT_TEXT),
            "raw": cap(&text, MAX_REJECT_RAW),
        });
        if raw.len() > MAX_REJECT_RAW {
            v["raw_bytes"] = raw.len().into();
        }
        self.append(v)
    }

    fn adopt_rejects(&self, path: &Path) -> std::io::Result<()> {
        read_lines(path)?.into_iter().try_for_each(|v| self.append(v))
    }

    fn location(&self) -> &Path {
        &self.path
    }
}

/// The reject objects of a log; a missing file has none, a torn last line (a crash mid-append)
/// is not a record.
pub fn read_lines(path: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(serde_json::Value::is_object)
        .collect())
}

fn id(v: &serde_json::Value) -> (String, String, u64) {
    (
        v["dataset"].as_str().unwrap_or_default().to_string(),
        v["file"].as_str().unwrap_or_default().to_string(),
        v["line"].as_u64().unwrap_or_default(),
    )
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cap(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
