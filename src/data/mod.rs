//! Data layer: readers (jsonl / json / txt / parquet), formats → examples, built-in synthetic data,
//! chat template, loss masks, pre-tokenised memory-mapped shards, batching.
//!
//! Flow: a recipe's `[datasets.<name>]` is [`resolve`]d to local files and a content hash;
//! [`read::for_each_example`] streams typed [`Example`]s out of them (bad records are reported by
//! `file:line` or skipped into the run's `rejects.jsonl`); [`tokenize::TextTokenizer`] turns examples
//! into `(input_ids, loss mask)` per the reference (spec §7); [`shards`] stores those once, memory
//! mapped, keyed by dataset hash + tokenizer key + format params.
//!
//! Architecture invariant: nothing here knows about candle or models; the output of this layer is
//! plain token ids and masks.

pub mod answer;
pub mod builtin;
pub mod builtin_tools;
pub mod chat;
pub mod example;
mod formats;
pub mod parquet;
pub mod read;
pub mod rejects;
pub mod shards;
pub mod spec;
pub mod tokenize;

pub use example::{Example, Message, ReadStats};
pub use read::read_examples;
pub use rejects::{RejectLog, RejectSink};

use crate::cache::Cache;
use crate::fs_error::{IoContext, IoError};
use spec::DatasetSpec;
use std::path::{Path, PathBuf};

/// A dataset whose files are local and whose content hash is known.
#[derive(Clone, Debug)]
pub struct ResolvedDataset {
    /// Name in the recipe.
    pub name: String,
    /// The declaration.
    pub spec: DatasetSpec,
    /// The files, in a stable order.
    pub files: Vec<PathBuf>,
    /// Hash over the files' contents (and names), hex.
    pub content_hash: String,
}

/// Why a dataset could not be resolved or read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The source matched no file.
    #[error("dataset '{name}': source '{source_str}' matched no file (looked at {looked}); check the path — it is relative to the recipe file")]
    NotFound {
        /// Dataset name.
        name: String,
        /// The `source` string.
        source_str: String,
        /// The absolute path or pattern tried.
        looked: String,
    },
    /// A glob pattern that does not parse.
    #[error("dataset '{name}': bad glob pattern '{pattern}': {msg}")]
    BadGlob {
        /// Dataset name.
        name: String,
        /// The pattern.
        pattern: String,
        /// Parser message.
        msg: String,
    },
    /// Fetching an `hf://` source failed.
    #[error("dataset '{name}': {msg}")]
    Hub {
        /// Dataset name.
        name: String,
        /// The hub client's message.
        msg: String,
    },
    /// Unknown `builtin:` generator or bad parameters.
    #[error("dataset '{name}': {msg}")]
    Builtin {
        /// Dataset name.
        name: String,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// A record that cannot be read (with `on_bad_record = "error"`).
    #[error("{file}:{line}: {problem} (format {format}); fix the record or set on_bad_record = \"skip\" on dataset '{dataset}'")]
    BadRecord {
        /// Dataset name.
        dataset: String,
        /// File (as resolved).
        file: String,
        /// 1-based line (or record number for JSON arrays).
        line: usize,
        /// What is wrong.
        problem: String,
        /// The declared format.
        format: String,
    },
    /// The dataset has no usable record.
    #[error("dataset '{name}': no records in {files} (after skipping {skipped} bad or empty ones); check the source and format")]
    Empty {
        /// Dataset name.
        name: String,
        /// Files read.
        files: String,
        /// Records skipped.
        skipped: usize,
    },
    /// Hashing a dataset file failed.
    #[error("{path}: cannot hash dataset file: {msg}")]
    Hash {
        /// The file.
        path: String,
        /// Why.
        msg: String,
    },
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// I/O with a path.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// File extensions picked up when a dataset source is a directory.
const DATA_EXTENSIONS: &[&str] = &["jsonl", "json", "txt", "parquet"];

/// Resolve a recipe dataset to local files and a content hash.
///
/// `source` is a local file, a directory (all `.jsonl/.json/.txt/.parquet` files below it), or a glob
/// — all relative to `recipe_dir` — or `builtin:<name>` (generated into the cache). Files are sorted
/// by their path relative to the base so the order (and the hash) is stable. An `hf://` source
/// needs its files fetched first: see [`resolve_fetched`].
pub fn resolve(name: &str, spec: &DatasetSpec, recipe_dir: &Path, cache: &Cache) -> Result<ResolvedDataset, DataError> {
    resolve_fetched(name, spec, recipe_dir, cache, None)
}

/// [`resolve`], with the local files of an `hf://` source as the caller fetched them (exec, through
/// the hub client and the recipe's lock). The data layer never reaches the network itself, so what a
/// run reads is exactly what the lock pinned.
pub fn resolve_fetched(
    name: &str,
    spec: &DatasetSpec,
    recipe_dir: &Path,
    cache: &Cache,
    fetched: Option<Vec<PathBuf>>,
) -> Result<ResolvedDataset, DataError> {
    let source = spec.source.trim();
    let (files, base): (Vec<PathBuf>, PathBuf) = if let Some(gen) = source.strip_prefix("builtin:") {
        let file = builtin::materialize(name, gen, spec, cache)?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        (vec![file], base)
    } else if source.starts_with("hf://") {
        let hub = |msg: String| DataError::Hub { name: name.to_string(), msg };
        let files = fetched.ok_or_else(|| hub(format!("{source} has not been fetched (fetch hf:// sources first)")))?;
        if files.is_empty() {
            return Err(hub(format!("{source} matched no file")));
        }
        let base = common_parent(&files);
        (files, base)
    } else {
        resolve_local(name, source, recipe_dir)?
    };
    let content_hash = content_hash(&files, &base, cache)?;
    Ok(ResolvedDataset { name: name.to_string(), spec: spec.clone(), files, content_hash })
}

fn common_parent(files: &[PathBuf]) -> PathBuf {
    files.first().and_then(|f| f.parent()).map(Path::to_path_buf).unwrap_or_default()
}

fn resolve_local(name: &str, source: &str, recipe_dir: &Path) -> Result<(Vec<PathBuf>, PathBuf), DataError> {
    let not_found = |looked: &Path| DataError::NotFound {
        name: name.to_string(),
        source_str: source.to_string(),
        looked: looked.display().to_string(),
    };
    let full = recipe_dir.join(source);
    if source.contains(['*', '?', '[']) {
        let pattern = full.to_string_lossy().to_string();
        let paths = glob::glob(&pattern).map_err(|e| DataError::BadGlob {
            name: name.to_string(),
            pattern: pattern.clone(),
            msg: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = paths.filter_map(Result::ok).filter(|p| p.is_file()).collect();
        files.sort();
        if files.is_empty() {
            return Err(not_found(&full));
        }
        // The hash names files relative to the non-glob prefix of the pattern.
        let base: PathBuf =
            full.ancestors().find(|a| !a.to_string_lossy().contains(['*', '?', '['])).unwrap_or(recipe_dir).into();
        return Ok((files, base));
    }
    if full.is_dir() {
        let mut files = Vec::new();
        walk(&full, &mut files).ctx("listing", &full)?;
        files.sort();
        if files.is_empty() {
            return Err(not_found(&full));
        }
        return Ok((files, full));
    }
    if full.is_file() {
        let base = full.parent().map(Path::to_path_buf).unwrap_or_default();
        return Ok((vec![full], base));
    }
    Err(not_found(&full))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path.file_name().map(|n| n.to_string_lossy().starts_with('.')).unwrap_or(false);
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| DATA_EXTENSIONS.contains(&e)) {
            out.push(path);
        }
    }
    Ok(())
}

/// blake3 over `(relative name, file content hash)` of every file, in order. Names are relative to
/// the source's base so that moving a project (or the cache) does not change the hash.
fn content_hash(files: &[PathBuf], base: &Path, cache: &Cache) -> Result<String, DataError> {
    let mut h = blake3::Hasher::new();
    for f in files {
        let rel = f.strip_prefix(base).unwrap_or(f);
        h.update(rel.to_string_lossy().replace('\\', "/").as_bytes());
        h.update(b"\0");
        // Memoised by (path, size, mtime) in the cache, so a large corpus is hashed once.
        let fh =
            cache.hash_file(f).map_err(|e| DataError::Hash { path: f.display().to_string(), msg: e.to_string() })?;
        h.update(fh.as_bytes());
        h.update(b"\n");
    }
    Ok(h.finalize().to_hex().to_string())
}

/// A spinner on stderr with a message (indicatif hides it when stderr is not a terminal).
pub(crate) fn progress_spinner(msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

#[cfg(test)]
pub(crate) use crate::testutil::shared_data;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::spec::{DataFormat, OnBadRecord};

    pub(crate) fn spec(source: &str, format: DataFormat) -> DatasetSpec {
        DatasetSpec {
            source: source.into(),
            format,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Error,
            builtin: Default::default(),
        }
    }

    #[test]
    fn resolves_file_dir_and_glob_with_stable_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("cache")).unwrap();
        let d = tmp.path().join("proj");
        std::fs::create_dir_all(d.join("data/sub")).unwrap();
        std::fs::write(d.join("data/b.jsonl"), "{\"text\":\"b\"}\n").unwrap();
        std::fs::write(d.join("data/a.jsonl"), "{\"text\":\"a\"}\n").unwrap();
        std::fs::write(d.join("data/sub/c.txt"), "c\n").unwrap();
        std::fs::write(d.join("data/notes.md"), "ignored").unwrap();

        let file = resolve("x", &spec("data/a.jsonl", DataFormat::Text), &d, &cache).unwrap();
        assert_eq!(file.files, vec![d.join("data/a.jsonl")]);

        let dir = resolve("x", &spec("data", DataFormat::Text), &d, &cache).unwrap();
        let names: Vec<_> = dir.files.iter().map(|p| p.strip_prefix(&d).unwrap().to_path_buf()).collect();
        assert_eq!(names, vec![PathBuf::from("data/a.jsonl"), "data/b.jsonl".into(), "data/sub/c.txt".into()]);

        let glob = resolve("x", &spec("data/*.jsonl", DataFormat::Text), &d, &cache).unwrap();
        assert_eq!(glob.files.len(), 2);
        assert_eq!(glob.files[0], d.join("data/a.jsonl"));

        // Same content elsewhere → same hash; changed content → different hash.
        let again = resolve("x", &spec("data", DataFormat::Text), &d, &cache).unwrap();
        assert_eq!(again.content_hash, dir.content_hash);
        std::fs::write(d.join("data/b.jsonl"), "{\"text\":\"B\"}\n").unwrap();
        let changed = resolve("x", &spec("data", DataFormat::Text), &d, &cache).unwrap();
        assert_ne!(changed.content_hash, dir.content_hash);

        let err = resolve("x", &spec("nope/*.jsonl", DataFormat::Text), &d, &cache).unwrap_err().to_string();
        assert!(err.contains("matched no file"), "{err}");
        let err = resolve("x", &spec("hf://nonsense", DataFormat::Text), &d, &cache).unwrap_err().to_string();
        assert!(err.starts_with("dataset 'x': "), "{err}");
    }
}
