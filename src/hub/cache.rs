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

use super::names;
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

    /// `blobs/<name>`, for a validated blob id ([`names::blob_name`]).
    pub fn blob(&self, name: &str) -> std::io::Result<PathBuf> {
        names::blob_name(name)?;
        Ok(names::join_under(&self.dir().join("blobs"), name)?)
    }

    /// `blobs/<name>.incomplete` (the resumable partial download).
    pub fn incomplete(&self, name: &str) -> std::io::Result<PathBuf> {
        names::blob_name(name)?;
        Ok(names::join_under(&self.dir().join("blobs"), &format!("{name}.incomplete"))?)
    }

    /// `.locks/<folder>/<name>.lock`, where `huggingface_hub` keeps its per-blob locks.
    pub fn lock_file(&self, name: &str) -> std::io::Result<PathBuf> {
        names::blob_name(name)?;
        Ok(names::join_under(&self.root.join(".locks").join(&self.folder), &format!("{name}.lock"))?)
    }

    /// `snapshots/<commit>/<path>`, for a validated commit id and repository path.
    pub fn snapshot_path(&self, commit: &str, path: &str) -> std::io::Result<PathBuf> {
        names::repo_path(path)?;
        Ok(names::join_under(&self.snapshot_dir(commit)?, path)?)
    }

    /// `snapshots/<commit>`, for a validated commit id.
    pub fn snapshot_dir(&self, commit: &str) -> std::io::Result<PathBuf> {
        names::commit(commit)?;
        Ok(names::join_under(&self.dir().join("snapshots"), commit)?)
    }

    /// `refs/<revision>` (a revision like `refs/convert/parquet` nests folders, as in Python), for a
    /// validated revision.
    pub fn ref_path(&self, revision: &str) -> std::io::Result<PathBuf> {
        names::revision(revision)?;
        Ok(names::join_under(&self.dir().join("refs"), revision)?)
    }

    /// The commit a branch/tag pointed to when last resolved online, if recorded. A ref file that
    /// does not hold a commit id (edited or corrupt) counts as absent.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.ref_path(revision).ok()?).ok()?;
        let s = s.trim();
        names::is_commit_id(s).then(|| s.to_string())
    }

    /// Record `revision -> commit` atomically and durably ([`crate::durable::write_atomic`]).
    pub fn write_ref(&self, revision: &str, commit: &str) -> std::io::Result<()> {
        names::commit(commit)?;
        if revision == commit {
            return Ok(());
        }
        let p = self.ref_path(revision)?;
        if self.read_ref(revision).as_deref() == Some(commit) {
            return Ok(());
        }
        crate::durable::write_atomic(&p, commit.as_bytes())
    }

    /// Point `snapshots/<commit>/<path>` at `blobs/<name>` with a relative symlink, like
    /// `huggingface_hub` (`../../blobs/<name>`, one more `../` per folder level in `path`).
    ///
    /// Only ever replaces what a Hub client made: a symlink into `blobs/`. Anything else already at
    /// that path (a regular file, a folder, a link elsewhere) is left alone: a file with the same
    /// content is used as it is (a copy-mode cache), any other is an error. The new link is
    /// renamed over the old one, so nothing is deleted first.
    pub fn link_snapshot(&self, commit: &str, path: &str, name: &str) -> std::io::Result<PathBuf> {
        let pointer = self.snapshot_path(commit, path)?;
        let blob = self.blob(name)?;
        std::fs::create_dir_all(pointer.parent().expect("snapshot path has a parent"))?;
        let depth = path.matches('/').count() + 2;
        let target: PathBuf = std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(name);
        match std::fs::symlink_metadata(&pointer) {
            Ok(m) if m.file_type().is_symlink() => {
                let old = std::fs::read_link(&pointer)?;
                if old == target {
                    return Ok(pointer);
                }
                if !is_blob_link(&old, depth) {
                    return Err(occupied(&pointer, "a symbolic link that does not point into blobs/"));
                }
            }
            Ok(m) if m.is_file() => {
                if same_content(&pointer, &blob)? {
                    return Ok(pointer);
                }
                return Err(occupied(&pointer, "a file with different content"));
            }
            Ok(_) => return Err(occupied(&pointer, "a folder")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tmp = pointer.with_file_name(format!(
            ".{}.tmp{}",
            pointer.file_name().expect("file name").to_string_lossy(),
            tmp_suffix()
        ));
        symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &pointer).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Ok(pointer)
    }

    /// Every file under `snapshots/<commit>/`, as repository paths (`a/b.jsonl`), sorted.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        let Ok(root) = self.snapshot_dir(commit) else { return Vec::new() };
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

/// Whether a snapshot link's target is `../` × `depth` + `blobs/<blob id>`, as Hub clients write it.
fn is_blob_link(target: &Path, depth: usize) -> bool {
    let comps: Vec<_> = target.components().collect();
    comps.len() == depth + 2
        && comps[..depth].iter().all(|c| matches!(c, std::path::Component::ParentDir))
        && comps[depth].as_os_str() == "blobs"
        && comps[depth + 1].as_os_str().to_str().is_some_and(|n| names::blob_name(n).is_ok())
}

/// Byte-for-byte equality, streamed (snapshot files can be gigabytes).
fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    if std::fs::metadata(a)?.len() != std::fs::metadata(b)?.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn occupied(p: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{} is {what}, which mmrun did not create and will not replace; move it away", p.display()),
    )
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
        let (commit, blob) = ("c0ffee".repeat(6) + "c0ff", "ab".repeat(32));
        std::fs::create_dir_all(rc.dir().join("blobs")).unwrap();
        std::fs::write(rc.blob(&blob).unwrap(), b"hello").unwrap();
        let p = rc.link_snapshot(&commit, "pretrain/train.txt", &blob).unwrap();
        assert_eq!(std::fs::read_link(&p).unwrap(), Path::new("../../../blobs").join(&blob));
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert_eq!(rc.snapshot_files(&commit), vec!["pretrain/train.txt".to_string()]);
        rc.write_ref("refs/convert/parquet", &commit).unwrap();
        assert_eq!(rc.read_ref("refs/convert/parquet").as_deref(), Some(commit.as_str()));
    }

    #[test]
    fn link_snapshot_never_replaces_what_it_did_not_make() {
        let t = tempfile::tempdir().unwrap();
        let rc = RepoCache::new(t.path(), RepoType::Dataset, "o/n");
        let commit = "1".repeat(40);
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        std::fs::create_dir_all(rc.dir().join("blobs")).unwrap();
        std::fs::write(rc.blob(&a).unwrap(), b"A").unwrap();
        std::fs::write(rc.blob(&b).unwrap(), b"B").unwrap();
        // A link into blobs/ (ours or huggingface_hub's) is replaced by renaming over it.
        rc.link_snapshot(&commit, "x.txt", &a).unwrap();
        let p = rc.link_snapshot(&commit, "x.txt", &b).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"B");
        // A regular file with the same content is used as is; a different one is kept and refused.
        let copy = rc.snapshot_path(&commit, "copy.txt").unwrap();
        std::fs::write(&copy, b"A").unwrap();
        assert_eq!(rc.link_snapshot(&commit, "copy.txt", &a).unwrap(), copy);
        assert!(!std::fs::symlink_metadata(&copy).unwrap().file_type().is_symlink());
        let e = rc.link_snapshot(&commit, "copy.txt", &b).unwrap_err().to_string();
        assert!(e.contains("did not create"), "{e}");
        assert_eq!(std::fs::read(&copy).unwrap(), b"A");
        // A link pointing anywhere else is not ours either.
        let other = rc.snapshot_path(&commit, "other.txt").unwrap();
        symlink(Path::new("/etc/hostname"), &other).unwrap();
        assert!(rc.link_snapshot(&commit, "other.txt", &a).is_err());
        assert_eq!(std::fs::read_link(&other).unwrap(), Path::new("/etc/hostname"));
        // Names that would leave the cache never become paths.
        assert!(rc.link_snapshot("../..", "x.txt", &a).is_err());
        assert!(rc.link_snapshot(&commit, "../../../x.txt", &a).is_err());
        assert!(rc.link_snapshot(&commit, "x.txt", "../../x").is_err());
        assert!(rc.ref_path("../../x").is_err());
    }
}
