//! Durable file writes: the one place mmrun replaces a file or publishes a directory.
//!
//! Every write that another process (or the next run) may read goes through here, so a crash or a
//! power cut at any moment leaves either the old content or the new one, never a torn file:
//! write to a unique temporary name in the same directory, fsync it, `rename` it over the
//! target, fsync the directory (which makes the rename itself durable on Linux).
//!
//! This module depends on nothing else in the crate, so every layer may use it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically and durably (see the module docs). Creates the parent
/// directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)
    })
}

/// Like [`write_atomic`], for writers that want a path rather than bytes (e.g. safetensors):
/// `write` fills a temporary file next to `path`, which is then fsynced and renamed over `path`.
/// On error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let dir = parent(path);
    std::fs::create_dir_all(dir)?;
    let tmp = temp_sibling(path);
    let res = write(&tmp).and_then(|()| fsync_file(&tmp)).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir);
    Ok(())
}

/// Move a finished directory (or file) `from` to `to` and make the move durable: every file under
/// `from` is fsynced first, then the rename, then both parent directories. Fails if `to` exists
/// as a non-empty directory (the caller decides what an existing target means).
pub fn publish_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fsync_tree(from)?;
    std::fs::rename(from, to)?;
    fsync_dir(parent(to));
    fsync_dir(parent(from));
    Ok(())
}

/// fsync one file's content.
pub fn fsync_file(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

/// fsync every regular file under `p` (or `p` itself) and every directory on the way.
pub fn fsync_tree(p: &Path) -> std::io::Result<()> {
    let md = std::fs::symlink_metadata(p)?;
    if md.is_dir() {
        for e in std::fs::read_dir(p)? {
            fsync_tree(&e?.path())?;
        }
        fsync_dir(p);
    } else if md.is_file() {
        fsync_file(p)?;
    }
    Ok(())
}

/// Best effort: fsync a directory so renames inside it survive a power cut. Some file systems
/// refuse to open or sync directories; that only weakens durability, never correctness.
pub fn fsync_dir(p: &Path) {
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.sync_all();
    }
}

/// Total size of the files under `p` (0 if it does not exist). Symlinks count as themselves.
pub fn dir_size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else { return 0 };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| dir_size(&e.path())).sum()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name>.<pid>-<n>.tmp` next to `path`: unique across processes and threads, and hidden, so
/// directory listings (manifests, snapshot listings) never pick it up.
fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    parent(path).join(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path().join("sub")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["f.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"old").unwrap();
        let e = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "the temporary file is removed");
    }

    #[test]
    fn publish_dir_moves_a_tree() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("a");
        std::fs::create_dir_all(from.join("x")).unwrap();
        std::fs::write(from.join("x/y"), b"1").unwrap();
        publish_dir(&from, &d.path().join("b")).unwrap();
        assert_eq!(std::fs::read(d.path().join("b/x/y")).unwrap(), b"1");
        assert!(!from.exists());
        assert_eq!(dir_size(&d.path().join("b")), 1);
    }
}
