//! Checking cache entries against their manifests.
//!
//! Two depths: [`Depth::Sizes`] (every listed file exists, is a regular file and has its recorded
//! size: a few `stat`s, done on every lookup) and [`Depth::Content`] (also its blake3: done before
//! an entry is opened by a stage, and by `mmrun verify`). Content hashes are memoised per process
//! by (device, inode, size, mtime), so a file is read once per process however many stages open
//! it, and never trusted across processes: bit rot does not change an mtime.

use crate::artifact::FileEntry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How thoroughly to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// Presence, type and size of every listed file.
    Sizes,
    /// Sizes plus the blake3 of the content.
    Content,
}

/// What is wrong with a cache entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", file.display())]
pub struct Damage {
    /// The damaged file (or the entry's manifest).
    pub file: PathBuf,
    /// What is wrong, e.g. "12 bytes, the manifest says 14".
    pub problem: String,
}

/// Per-process memo of content hashes.
#[derive(Debug, Default)]
pub(crate) struct Verifier {
    memo: Mutex<HashMap<FileId, String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileId {
    #[cfg(unix)]
    fn of(md: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        }
    }

    #[cfg(not(unix))]
    fn of(md: &std::fs::Metadata) -> Self {
        let mtime_ns = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(-1, |d| d.as_nanos() as i128);
        Self { dev: 0, ino: 0, size: md.len(), mtime_ns }
    }
}

impl Verifier {
    /// Check the files listed for the entry in `dir`.
    pub(crate) fn check(&self, dir: &Path, files: &[FileEntry], depth: Depth) -> Result<(), Damage> {
        for f in files {
            let p = dir.join(&f.path);
            let damage = |problem: String| Damage { file: p.clone(), problem };
            let md = match std::fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(damage("missing (the manifest lists it)".into()))
                }
                Err(e) => return Err(damage(format!("unreadable: {e}"))),
            };
            if !md.is_file() {
                return Err(damage("not a regular file".into()));
            }
            if md.len() != f.size {
                return Err(damage(format!("{} bytes, the manifest says {}", md.len(), f.size)));
            }
            if depth == Depth::Content {
                let actual = self.blake3(&p, &md).map_err(|e| damage(format!("unreadable: {e}")))?;
                if actual != f.blake3 {
                    return Err(damage(format!(
                        "content differs from the manifest (blake3 {}…, expected {}…)",
                        &actual[..actual.len().min(12)],
                        &f.blake3[..f.blake3.len().min(12)]
                    )));
                }
            }
        }
        Ok(())
    }

    /// blake3 of a file, memoised.
    pub(crate) fn hash(&self, p: &Path) -> Result<String, super::CacheError> {
        use crate::fs_error::IoContext;
        let md = std::fs::metadata(p).ctx("reading metadata of", p)?;
        self.blake3(p, &md)
    }

    fn blake3(&self, p: &Path, md: &std::fs::Metadata) -> Result<String, super::CacheError> {
        let id = FileId::of(md);
        if let Some(h) = self.memo.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(h.clone());
        }
        let (h, _) = super::hash::hash_path(p)?;
        self.memo.lock().unwrap_or_else(|e| e.into_inner()).insert(id, h.clone());
        Ok(h)
    }
}
