//! The Hugging Face cache layout, shared with Python tools (`huggingface_hub`):
//!
//! ```text
//! $HF_HUB_CACHE (default $HF_HOME/hub, $HF_HOME default ~/.cache/huggingface)
//!   datasets--owner--name/
//!     blobs/<sha256 for LFS files | git blob id for the others>   (+ <name>.incomplete while downloading)
//!     snapshots/<commit>/<path in repo>  -> ../../blobs/<name>     (relative symlink)
//!     refs/<branch or tag>                                          (holds the commit id)
//!   .locks/datasets--owner--name/<blob>.lock                        (one writer per blob)
//! ```
//!
//! Architecture invariant: a path under `snapshots/` only ever points at a complete, verified blob;
//! partial data lives only in `blobs/*.incomplete`.

use std::path::{Path, PathBuf};

use super::uri::RepoType;

/// The hub cache root as `huggingface_hub` computes it from the environment.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    hf_home().join("hub")
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
    base.join("huggingface")
}

/// One repository's folder inside the hub cache.
#[derive(Clone, Debug)]
pub struct RepoCache {
    /// The hub cache root.
    pub root: PathBuf,
    /// `datasets--owner--name` / `models--owner--name`.
    pub folder: String,
}

impl RepoCache {
    /// The cache folder of `repo_id` of the given type under `root`.
    pub fn new(root: &Path, repo_type: RepoType, repo_id: &str) -> Self {
        let prefix = match repo_type {
            RepoType::Dataset => "datasets",
            RepoType::Model => "models",
        };
        Self { root: root.to_path_buf(), folder: format!("{prefix}--{}", repo_id.replace('/', "--")) }
    }

    /// `<root>/<folder>`.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.folder)
    }

    /// `blobs/<name>`.
    pub fn blob(&self, name: &str) -> PathBuf {
        self.dir().join("blobs").join(name)
    }

    /// `blobs/<name>.incomplete` (the resumable partial download).
    pub fn incomplete(&self, name: &str) -> PathBuf {
        self.dir().join("blobs").join(format!("{name}.incomplete"))
    }

    /// `.locks/<folder>/<name>.lock`, where `huggingface_hub` keeps its per-blob locks.
    pub fn lock_file(&self, name: &str) -> PathBuf {
        self.root.join(".locks").join(&self.folder).join(format!("{name}.lock"))
    }

    /// `snapshots/<commit>/<path>`.
    pub fn snapshot_path(&self, commit: &str, path: &str) -> PathBuf {
        self.dir().join("snapshots").join(commit).join(path)
    }

    /// `snapshots/<commit>`.
    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir().join("snapshots").join(commit)
    }

    /// `refs/<revision>` (a revision like `refs/convert/parquet` nests folders, as in Python).
    pub fn ref_path(&self, revision: &str) -> PathBuf {
        self.dir().join("refs").join(revision)
    }

    /// The commit a branch/tag pointed to when last resolved online, if recorded.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    }

    /// Record `revision -> commit` (atomically, through a temporary file).
    pub fn write_ref(&self, revision: &str, commit: &str) -> std::io::Result<()> {
        if revision == commit {
            return Ok(());
        }
        let p = self.ref_path(revision);
        if self.read_ref(revision).as_deref() == Some(commit) {
            return Ok(());
        }
        std::fs::create_dir_all(p.parent().expect("ref has a parent"))?;
        let tmp = p.with_extension(format!("tmp{}", tmp_suffix()));
        std::fs::write(&tmp, commit)?;
        std::fs::rename(tmp, p)
    }

    /// Point `snapshots/<commit>/<path>` at `blobs/<name>` with a relative symlink, like
    /// `huggingface_hub` (`../../blobs/<name>`, one more `../` per folder level in `path`).
    pub fn link_snapshot(&self, commit: &str, path: &str, name: &str) -> std::io::Result<PathBuf> {
        let pointer = self.snapshot_path(commit, path);
        std::fs::create_dir_all(pointer.parent().expect("snapshot path has a parent"))?;
        let depth = path.matches('/').count() + 2;
        let target: PathBuf = std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(name);
        match std::fs::symlink_metadata(&pointer) {
            Ok(_) => {
                if std::fs::read_link(&pointer).ok().as_deref() == Some(target.as_path()) {
                    return Ok(pointer);
                }
                std::fs::remove_file(&pointer)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tmp = pointer.with_file_name(format!(
            ".{}.tmp{}",
            pointer.file_name().expect("file name").to_string_lossy(),
            tmp_suffix()
        ));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &pointer)?;
        Ok(pointer)
    }

    /// Every file under `snapshots/<commit>/`, as repository paths (`a/b.jsonl`), sorted.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        let root = self.snapshot_dir(commit);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.is_file() {
                    if let Ok(rel) = p.strip_prefix(&root) {
                        let rel = rel.to_string_lossy().replace('\\', "/");
                        if !rel.rsplit('/').next().unwrap_or("").starts_with('.') {
                            out.push(rel);
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Windows without developer mode cannot create symlinks; huggingface_hub then copies the blob.
    let blob = link.parent().map(|p| p.join(target)).unwrap_or_else(|| target.to_path_buf());
    std::fs::copy(blob, link).map(|_| ())
}

/// A temp-file suffix unique across processes *and* threads: two fetches in one process (or two
/// processes) writing the same ref or snapshot link must never rename each other's temp file away.
pub(crate) fn tmp_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_huggingface_hub() {
        let t = tempfile::tempdir().unwrap();
        let rc = RepoCache::new(t.path(), RepoType::Dataset, "shibing624/medical");
        assert!(rc.dir().ends_with("datasets--shibing624--medical"));
        std::fs::create_dir_all(rc.blob("x").parent().unwrap()).unwrap();
        std::fs::write(rc.blob("abc"), b"hello").unwrap();
        let p = rc.link_snapshot("c0ffee", "pretrain/train.txt", "abc").unwrap();
        assert_eq!(std::fs::read_link(&p).unwrap(), PathBuf::from("../../../blobs/abc"));
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert_eq!(rc.snapshot_files("c0ffee"), vec!["pretrain/train.txt".to_string()]);
        rc.write_ref("refs/convert/parquet", "c0ffee").unwrap();
        assert_eq!(rc.read_ref("refs/convert/parquet").as_deref(), Some("c0ffee"));
    }
}
