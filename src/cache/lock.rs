//! One OS file lock per cache key (`locks/<key>.lock`), so two mmrun processes never build the
//! same stage at once. The OS drops the lock when the process dies, even on SIGKILL, so a crash
//! never leaves a stale lock behind.

use super::{CacheError, IoCtx};
use std::fs::{File, TryLockError};
use std::path::Path;

/// A held per-key lock; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    file: File,
}

impl KeyLock {
    fn open(path: &Path) -> Result<File, CacheError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).ctx("creating", parent)?;
        }
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).ctx("opening lock", path)
    }

    /// Block until the lock is ours; `on_wait` runs once if someone else holds it.
    pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> Result<Self, CacheError> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => return Ok(Self { file }),
            Err(TryLockError::WouldBlock) => on_wait(),
            Err(TryLockError::Error(e)) => return Err(e).ctx("locking", path),
        }
        file.lock().ctx("locking", path)?;
        Ok(Self { file })
    }

    /// Take the lock if it is free.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, CacheError> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e).ctx("locking", path),
        }
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}
