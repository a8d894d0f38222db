//! OS file locks under `locks-v1/`: one per cache key (`<key>.lock`), so two mmrun processes never
//! build the same entry at once, and the gc lock (`gc.lock`) that runs share and `gc` takes
//! exclusively. The OS drops a lock when its process dies, even on SIGKILL, so a crash never
//! leaves a stale lock behind.
//!
//! `gc` deletes lock files nobody holds. A process that opened such a file just before it was
//! deleted would hold a lock on an unlinked inode that nobody else can see, so after locking we
//! check that the path still names the file we locked, and start over if it does not.

use super::CacheError;
use crate::fs_error::{IoContext, IoError};
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

/// A held lock; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    file: File,
    path: PathBuf,
}

/// Exclusive (one holder) or shared (many holders, no exclusive one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Builders of a key, and `gc`.
    Exclusive,
    /// Runs registering what they use (against `gc`).
    Shared,
}

fn open(path: &Path) -> Result<File, CacheError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ctx("creating", parent)?;
    }
    Ok(std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).ctx("opening lock", path)?)
}

fn try_lock(file: &File, mode: Mode) -> Result<(), TryLockError> {
    match mode {
        Mode::Exclusive => file.try_lock(),
        Mode::Shared => file.try_lock_shared(),
    }
}

/// Whether `path` still names the inode `file` has open (it may have been deleted by `gc`).
#[cfg(unix)]
fn still_linked(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_linked(_file: &File, path: &Path) -> bool {
    path.exists()
}

impl KeyLock {
    /// Block until the lock is ours; `on_wait` runs once if someone else holds it.
    pub fn acquire(path: &Path, mode: Mode, on_wait: impl FnOnce()) -> Result<Self, CacheError> {
        let mut on_wait = Some(on_wait);
        loop {
            let file = open(path)?;
            match try_lock(&file, mode) {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    if let Some(f) = on_wait.take() {
                        f();
                    }
                    match mode {
                        Mode::Exclusive => file.lock(),
                        Mode::Shared => file.lock_shared(),
                    }
                    .ctx("locking", path)?;
                }
                Err(TryLockError::Error(e)) => return Err(IoError::new("locking", path, e).into()),
            }
            if still_linked(&file, path) {
                return Ok(Self { file, path: path.to_path_buf() });
            }
        }
    }

    /// Take the lock if it is free.
    pub fn try_acquire(path: &Path, mode: Mode) -> Result<Option<Self>, CacheError> {
        loop {
            let file = open(path)?;
            match try_lock(&file, mode) {
                Ok(()) if still_linked(&file, path) => return Ok(Some(Self { file, path: path.to_path_buf() })),
                Ok(()) => continue,
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(IoError::new("locking", path, e).into()),
            }
        }
    }

    /// Delete the lock file while still holding the lock (`gc`). Whoever opens the old file next
    /// notices it is unlinked and starts over on a fresh one.
    pub(crate) fn remove_file(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}
