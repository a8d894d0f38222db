//! Content-addressed store under `$MMRUN_HOME` (default `.mmrun/`).
//!
//! Layout: `objects/<key>/` finished artifacts (complete iff `manifest.json` exists), `tmp/` where
//! artifacts are assembled before an atomic rename, `work/<key>/` in-progress checkpoints,
//! `locks/<key>.lock` one file lock per key.

use std::path::{Path, PathBuf};

/// A handle on one cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Open (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        for sub in ["objects", "tmp", "work", "locks"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(Self { root })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
