//! Content-addressed store under `$MMRUN_HOME` (default `.mmrun/`).
//!
//! Layout:
//!
//! | path | what | invariant |
//! |---|---|---|
//! | `objects/<key>/` | finished artifacts | complete iff `manifest.json` exists (it is written last, then the directory is renamed in) |
//! | `tmp/<pid>-<random>/` | artifacts being assembled | never read; removed on failure or by `gc` once the owning process is gone |
//! | `work/<key>/` | in-progress checkpoints of a running stage | survives interrupts; removed after the object is published |
//! | `locks/<key>.lock` | one OS file lock per key | held by whichever process builds `<key>` |
//! | `hashes.jsonl` | memo of dataset file hashes by (path, size, mtime) | append-only; the last line for a path wins |
//!
//! Publishing is `write files → write manifest → fsync → rename(tmp/…, objects/<key>)`: a crash at
//! any moment leaves either no object or a complete one, never half of one.

mod hash;
mod lock;

pub use hash::HashIndex;
pub use lock::KeyLock;

use crate::artifact::{layout, Artifact, ArtifactKind, FileEntry, Manifest};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What can go wrong inside the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What we were doing ("creating", "renaming", …).
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A manifest could not be written or read.
    #[error("manifest {}: {source}", path.display())]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// Attach a description and path to an `io::Result`.
pub(crate) trait IoCtx<T> {
    fn ctx(self, what: &'static str, path: &Path) -> Result<T, CacheError>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn ctx(self, what: &'static str, path: &Path) -> Result<T, CacheError> {
        self.map_err(|source| CacheError::Io { what, path: path.to_path_buf(), source })
    }
}

/// A handle on one cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
    hashes: Arc<HashIndex>,
}

/// A directory under `tmp/` in which an artifact is assembled. Removed on drop unless published.
#[derive(Debug)]
pub struct TmpDir {
    path: Option<PathBuf>,
}

impl TmpDir {
    /// Its path.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("TmpDir used after publish")
    }

    fn take(mut self) -> PathBuf {
        self.path.take().expect("TmpDir used after publish")
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// What `gc` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Object keys removed.
    pub removed_objects: Vec<String>,
    /// Stale tmp directories removed.
    pub removed_tmp: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Objects kept because a run record references them.
    pub kept_objects: usize,
}

impl Cache {
    /// Open (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        for sub in ["objects", "tmp", "work", "locks"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let hashes = Arc::new(HashIndex::new(root.join("hashes.jsonl")));
        Ok(Self { root, hashes })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `objects/<key>/` (whether or not it exists).
    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    /// The finished artifact for `key`, if one exists: only directories whose manifest exists and
    /// parses count (the manifest is written last, so anything else is not an object).
    pub fn object(&self, key: &str) -> Option<Artifact> {
        let dir = self.object_dir(key);
        let text = std::fs::read(dir.join(layout::MANIFEST)).ok()?;
        let manifest: Manifest = serde_json::from_slice(&text).ok()?;
        Some(Artifact { dir, manifest })
    }

    /// `work/<key>/`, created if needed: checkpoints of a stage that has not finished yet.
    pub fn work_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("work").join(key);
        std::fs::create_dir_all(&dir).ctx("creating work directory", &dir)?;
        Ok(dir)
    }

    /// A fresh, empty directory under `tmp/` to assemble an artifact in.
    pub fn tmp_dir(&self) -> Result<TmpDir, CacheError> {
        let base = self.root.join("tmp");
        std::fs::create_dir_all(&base).ctx("creating", &base)?;
        loop {
            let name = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
            let p = base.join(name);
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TmpDir { path: Some(p) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).ctx("creating tmp directory", &p),
            }
        }
    }

    /// Take the per-key lock, blocking while another process holds it. `on_wait` is called once
    /// if we have to wait (so the caller can say who it is waiting for).
    pub fn lock(&self, key: &str, on_wait: impl FnOnce()) -> Result<KeyLock, CacheError> {
        KeyLock::acquire(&self.root.join("locks").join(format!("{key}.lock")), on_wait)
    }

    /// Try to take the per-key lock without blocking.
    pub fn try_lock(&self, key: &str) -> Result<Option<KeyLock>, CacheError> {
        KeyLock::try_acquire(&self.root.join("locks").join(format!("{key}.lock")))
    }

    /// Publish the artifact assembled in `tmp` as `objects/<key>/`: hash every file, write the
    /// manifest last, fsync, rename. If a complete object for `key` already exists (built by
    /// another process), `tmp` is discarded and the existing one returned. The `work/<key>/`
    /// checkpoints are removed afterwards.
    pub fn publish(
        &self,
        tmp: TmpDir,
        key: &str,
        kind: ArtifactKind,
        stage_kind: &str,
        metrics: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Artifact, CacheError> {
        if let Some(existing) = self.object(key) {
            return Ok(existing);
        }
        let dir = tmp.path().to_path_buf();
        let mut files = Vec::new();
        collect_files(&dir, &dir, &mut files)?;
        files.sort();
        let mut entries = Vec::with_capacity(files.len());
        for rel in files {
            if rel == layout::MANIFEST {
                continue;
            }
            let p = dir.join(&rel);
            let (hash, size) = hash::hash_path(&p)?;
            fsync_file(&p)?;
            entries.push(FileEntry { path: rel, size, blake3: hash });
        }
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let manifest = Manifest {
            kind,
            stage_kind: stage_kind.to_string(),
            key: key.to_string(),
            mmrun_version: crate::VERSION.to_string(),
            created_unix,
            files: entries,
            metrics,
        };
        let mpath = dir.join(layout::MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|source| CacheError::Manifest { path: mpath.clone(), source })?;
        {
            let mut f = std::fs::File::create(&mpath).ctx("writing", &mpath)?;
            f.write_all(&json).ctx("writing", &mpath)?;
            f.sync_all().ctx("syncing", &mpath)?;
        }
        fsync_dir(&dir);
        let target = self.object_dir(key);
        if target.exists() {
            // A directory without a valid manifest is not an object (e.g. a hand-edited cache):
            // move it aside so the rename below can take its place.
            let trash = self.tmp_dir()?;
            std::fs::rename(&target, trash.path().join("old")).ctx("moving aside", &target)?;
        }
        let src = tmp.take();
        if let Err(e) = std::fs::rename(&src, &target) {
            let _ = std::fs::remove_dir_all(&src);
            return Err(e).ctx("publishing", &target);
        }
        fsync_dir(&self.root.join("objects"));
        let _ = std::fs::remove_dir_all(self.root.join("work").join(key));
        Ok(Artifact { dir: target, manifest })
    }

    /// blake3 of a file's content (hex), memoised by (canonical path, size, mtime) so a large
    /// corpus is hashed once, not on every run.
    pub fn hash_file(&self, path: &Path) -> Result<String, CacheError> {
        self.hashes.hash_file(path)
    }

    /// Keys of all objects (complete or not) currently in `objects/`.
    pub fn object_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.root.join("objects"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        keys.sort();
        keys
    }

    /// Remove objects no key in `referenced` names, and stale `tmp/` directories (whose owning
    /// process is gone). Objects whose key lock is held by a running mmrun are kept. With
    /// `dry_run`, only report.
    pub fn gc(&self, referenced: &BTreeSet<String>, dry_run: bool) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        for key in self.object_keys() {
            if referenced.contains(&key) {
                report.kept_objects += 1;
                continue;
            }
            // A process building this key may be about to record it: leave it alone.
            let Some(_lock) = self.try_lock(&key)? else {
                report.kept_objects += 1;
                continue;
            };
            let dir = self.object_dir(&key);
            report.freed_bytes += dir_size(&dir);
            if !dry_run {
                std::fs::remove_dir_all(&dir).ctx("removing", &dir)?;
                let _ = std::fs::remove_dir_all(self.root.join("work").join(&key));
            }
            report.removed_objects.push(key);
        }
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).ctx("listing", &tmp)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let pid: Option<u32> = name.split('-').next().and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if alive {
                continue;
            }
            report.freed_bytes += dir_size(&entry.path());
            if !dry_run {
                std::fs::remove_dir_all(entry.path()).ctx("removing", &entry.path())?;
            }
            report.removed_tmp += 1;
        }
        Ok(report)
    }
}

fn collect_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), CacheError> {
    for entry in std::fs::read_dir(dir).ctx("listing", dir)? {
        let entry = entry.ctx("listing", dir)?;
        let p = entry.path();
        let ft = entry.file_type().ctx("inspecting", &p)?;
        if ft.is_dir() {
            collect_files(base, &p, out)?;
        } else {
            let rel = p.strip_prefix(base).expect("under base");
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
            out.push(rel.join("/"));
        }
    }
    Ok(())
}

fn fsync_file(p: &Path) -> Result<(), CacheError> {
    std::fs::File::open(p).and_then(|f| f.sync_all()).ctx("syncing", p)
}

/// Best effort: directory fsync makes the rename durable on Linux; some file systems refuse it.
fn fsync_dir(p: &Path) {
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.sync_all();
    }
}

/// Total size of the files under `p` (0 if it does not exist).
pub fn dir_size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else { return 0 };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| dir_size(&e.path())).sum()
}

#[cfg(test)]
mod tests;
