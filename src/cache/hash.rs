//! blake3 file hashing, memoised by (canonical path, size, mtime, device, inode) in
//! `hashes-v1/files.jsonl`: the local inputs of a recipe (dataset files, a local model folder) are
//! read in full once, not on every plan. A file written in place changes its mtime (and usually its
//! size); one replaced by a rename changes its inode; either is hashed again.

use super::CacheError;
use crate::fs_error::IoContext;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Files at least this large get a progress bar while hashing.
const PROGRESS_MIN_BYTES: u64 = 64 << 20;

/// One memo line.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    path: String,
    size: u64,
    mtime_ns: i128,
    /// Device and inode (0 where the platform has none). Lines written before they were recorded
    /// read as 0, miss, and are replaced by the rehash.
    #[serde(default)]
    dev: u64,
    #[serde(default)]
    ino: u64,
    blake3: String,
}

impl Entry {
    /// Whether the memoised line still describes the file `md` is the metadata of.
    fn matches(&self, md: &std::fs::Metadata) -> bool {
        let (dev, ino) = dev_ino(md);
        self.size == md.len() && self.mtime_ns == mtime_ns(md) && (self.dev, self.ino) == (dev, ino)
    }
}

/// The memo of file hashes. Lines are appended (one `write` each, `O_APPEND`), so concurrent
/// mmrun processes may share it; the last line for a path wins and unparsable lines (a torn
/// write after a crash) are ignored.
#[derive(Debug)]
pub struct HashIndex {
    file: PathBuf,
    memo: Mutex<Option<HashMap<String, Entry>>>,
    /// Files read in full by this index (memo misses).
    read: AtomicU64,
}

impl HashIndex {
    /// An index stored in `file` (read lazily).
    pub fn new(file: PathBuf) -> Self {
        Self { file, memo: Mutex::new(None), read: AtomicU64::new(0) }
    }

    fn load(&self) -> HashMap<String, Entry> {
        let mut map = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&self.file) {
            for line in text.lines() {
                if let Ok(e) = serde_json::from_str::<Entry>(line) {
                    map.insert(e.path.clone(), e);
                }
            }
        }
        map
    }

    /// How many files this index has read in full (the memo's misses) since it was opened.
    pub fn files_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// blake3 of `path` (hex), from the memo when size, mtime, device and inode are unchanged.
    pub fn hash_file(&self, path: &Path) -> Result<String, CacheError> {
        let canon = std::fs::canonicalize(path).ctx("resolving", path)?;
        let md = std::fs::metadata(&canon).ctx("reading metadata of", &canon)?;
        let key = canon.to_string_lossy().to_string();
        {
            let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
            let map = memo.get_or_insert_with(|| self.load());
            if let Some(e) = map.get(&key).filter(|e| e.matches(&md)) {
                return Ok(e.blake3.clone());
            }
        }
        let (hash, size) = hash_path(&canon)?;
        self.read.fetch_add(1, Ordering::Relaxed);
        // The metadata from before the read: a write racing with it leaves a newer mtime, which
        // misses next time rather than memoising a hash of bytes that are gone.
        let (dev, ino) = dev_ino(&md);
        let entry = Entry { path: key.clone(), size, mtime_ns: mtime_ns(&md), dev, ino, blake3: hash.clone() };
        let mut line = serde_json::to_string(&entry).expect("entry serialises");
        line.push('\n');
        // Best effort: a memo we cannot write only costs a rehash next time.
        if let Some(dir) = self.file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.file) {
            let _ = f.write_all(line.as_bytes());
        }
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.get_or_insert_with(HashMap::new).insert(key, entry);
        Ok(hash)
    }
}

impl HashIndex {
    /// Rewrite the memo keeping only the current line of each file that still exists with the
    /// memoised size and mtime (`gc`). Returns the bytes freed. A line appended by another
    /// process meanwhile may be lost; that only costs a rehash.
    pub(crate) fn compact(&self, dry_run: bool) -> Result<u64, CacheError> {
        let Ok(text) = std::fs::read_to_string(&self.file) else { return Ok(0) };
        let mut last: HashMap<String, Entry> = HashMap::new();
        for line in text.lines() {
            if let Ok(e) = serde_json::from_str::<Entry>(line) {
                last.insert(e.path.clone(), e);
            }
        }
        let mut kept: Vec<Entry> =
            last.into_values().filter(|e| std::fs::metadata(&e.path).is_ok_and(|md| e.matches(&md))).collect();
        kept.sort_by(|a, b| a.path.cmp(&b.path));
        let mut out = String::new();
        for e in &kept {
            out.push_str(&serde_json::to_string(e).expect("entry serialises"));
            out.push('\n');
        }
        let freed = (text.len() as u64).saturating_sub(out.len() as u64);
        if !dry_run && freed > 0 {
            crate::durable::write_atomic(&self.file, out.as_bytes()).ctx("rewriting", &self.file)?;
        }
        Ok(freed)
    }
}

fn mtime_ns(md: &std::fs::Metadata) -> i128 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(-1)
}

#[cfg(unix)]
fn dev_ino(md: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (md.dev(), md.ino())
}

#[cfg(not(unix))]
fn dev_ino(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// blake3 (hex) and size of one file, with a progress bar for large files.
pub(crate) fn hash_path(p: &Path) -> Result<(String, u64), CacheError> {
    let mut f = std::fs::File::open(p).ctx("opening", p)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = (len >= PROGRESS_MIN_BYTES).then(|| {
        crate::progress::bytes_bar(len, &format!("hashing {}", p.file_name().unwrap_or_default().to_string_lossy()))
    });
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).ctx("reading", p)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn set_mtime(p: &Path, t: SystemTime) {
        std::fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
    }

    #[test]
    fn an_unchanged_file_is_not_read_again_a_touched_replaced_or_edited_one_is() {
        let tmp = tempfile::tempdir().unwrap();
        let memo = tmp.path().join("hashes/files.jsonl");
        let f = tmp.path().join("model.safetensors");
        std::fs::write(&f, b"weights v1").unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        set_mtime(&f, t0);
        let idx = HashIndex::new(memo.clone());
        let h1 = idx.hash_file(&f).unwrap();
        assert_eq!(h1, blake3::hash(b"weights v1").to_hex().to_string());
        assert_eq!(idx.hash_file(&f).unwrap(), h1);
        assert_eq!(idx.files_read(), 1, "the second call is a memo hit");
        // Another process: the memo on disk answers.
        let idx = HashIndex::new(memo.clone());
        assert_eq!(idx.hash_file(&f).unwrap(), h1);
        assert_eq!(idx.files_read(), 0);

        // Touched (same bytes, new mtime): read again, same hash.
        set_mtime(&f, t0 + Duration::from_secs(1));
        assert_eq!(idx.hash_file(&f).unwrap(), h1);
        assert_eq!(idx.files_read(), 1);
        // Replaced by a rename with the same size and mtime: only the inode tells.
        let other = tmp.path().join("other");
        std::fs::write(&other, b"weights v2").unwrap();
        set_mtime(&other, t0 + Duration::from_secs(1));
        std::fs::rename(&other, &f).unwrap();
        let h2 = idx.hash_file(&f).unwrap();
        assert_eq!(h2, blake3::hash(b"weights v2").to_hex().to_string());
        // Edited in place to another size.
        std::fs::write(&f, b"weights v3, longer").unwrap();
        assert_ne!(idx.hash_file(&f).unwrap(), h2);
        assert_eq!(idx.files_read(), 3);
    }
}
