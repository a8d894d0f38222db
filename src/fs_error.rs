//! The one I/O error type: what mmrun was doing, to which path, and what the OS said.
//!
//! Every module's error enum wraps it (`Io(#[from] IoError)`) instead of declaring its own
//! `Io { path, source }` variant, so an I/O failure renders the same way wherever it happens
//! ("renaming /x/y: No space left on device") and callers can ask one type whether the disk is
//! full. Like [`crate::durable`], this module depends on nothing else in the crate.

use std::path::{Path, PathBuf};

/// A file-system operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct IoError {
    /// What mmrun was doing, as a present participle ("reading", "renaming", …).
    pub op: &'static str,
    /// The path involved.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// An error from `op` on `path`.
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError { op, path: path.into(), source }
    }

    /// The OS error's kind.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.source.kind()
    }

    /// Whether the disk (or the user's quota) is full: `ENOSPC` or `EDQUOT`.
    pub fn is_disk_full(&self) -> bool {
        is_disk_full(&self.source)
    }
}

/// Whether `e` says the disk (or the user's quota) is full. `StorageFull` is the portable
/// spelling; ENOSPC = 28 and EDQUOT = 122 are Linux's raw codes, which older std versions and
/// some wrappers leave uncategorised.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// Attach what was being done and to which path to an [`std::io::Result`].
pub trait IoContext<T> {
    /// `op` is a present participle ("reading"), `path` the file or directory involved.
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, IoError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, IoError> {
        self.map_err(|source| IoError::new(op, path, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_where_and_why() {
        let e = std::fs::read("/nonexistent/mmrun-x").ctx("reading", Path::new("/nonexistent/mmrun-x")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        let s = e.to_string();
        assert!(s.starts_with("reading /nonexistent/mmrun-x: "), "{s}");
        assert!(!e.is_disk_full());
        assert!(IoError::new("writing", "/x", std::io::Error::from_raw_os_error(28)).is_disk_full());
        assert!(IoError::new("writing", "/x", std::io::Error::from_raw_os_error(122)).is_disk_full());
    }
}
