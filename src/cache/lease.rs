//! Leases: what a live mmrun process uses, so `gc` never deletes it underneath.
//!
//! Before a process looks an entry up (an object the plan calls `cached`, a shard set, builtin
//! data) it *pins* it: under a shared hold of `locks-v1/gc.lock` it appends `<bucket> <key>` to its
//! lease file `locks-v1/<pid>-<random>.lease`, which it keeps exclusively locked for as long as it
//! lives. `gc` holds `gc.lock` exclusively for its whole run and reads every live lease first, so
//! either the pin happened before `gc` started (and `gc` keeps the entry) or `gc` finished first
//! (and the lookup after the pin sees the entry gone and rebuilds it). No timing is involved: the
//! OS lock orders the two. A lease whose lock is free belongs to a dead process and is removed.

use super::lock::{KeyLock, Mode};
use super::{Bucket, CacheError};
use crate::fs_error::{IoContext, IoError};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File name of the gc lock inside `locks-v1/`.
pub(crate) const GC_LOCK: &str = "gc.lock";
/// Extension of lease files.
pub(crate) const LEASE_EXT: &str = "lease";

/// This process's lease on one cache (created on the first pin, removed on drop).
#[derive(Debug, Default)]
pub(crate) struct Lease {
    state: Mutex<LeaseState>,
}

#[derive(Debug, Default)]
struct LeaseState {
    file: Option<(File, PathBuf)>,
    pinned: BTreeSet<(Bucket, String)>,
}

impl Lease {
    /// Register `(bucket, key)` as used by this process (idempotent).
    pub(crate) fn pin(&self, locks: &Path, bucket: Bucket, key: &str) -> Result<(), CacheError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.pinned.contains(&(bucket, key.to_string())) {
            return Ok(());
        }
        let _gc = KeyLock::acquire(&locks.join(GC_LOCK), Mode::Shared, || {
            eprintln!("waiting for `mmrun gc` to finish with this cache");
        })?;
        if st.file.is_none() {
            st.file = Some(create_lease(locks)?);
        }
        let (file, path) = st.file.as_mut().expect("just created");
        // One write per line, so a crash can only lose the last line, never garble an earlier one.
        file.write_all(format!("{} {key}\n", bucket.dir_name()).as_bytes()).ctx("writing lease", path)?;
        st.pinned.insert((bucket, key.to_string()));
        Ok(())
    }

    /// Everything pinned so far.
    pub(crate) fn pinned(&self) -> BTreeSet<(Bucket, String)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).pinned.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some((_file, path)) = st.file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn create_lease(locks: &Path) -> Result<(File, PathBuf), CacheError> {
    std::fs::create_dir_all(locks).ctx("creating", locks)?;
    loop {
        let path = locks.join(format!("{}-{:016x}.{LEASE_EXT}", std::process::id(), rand::random::<u64>()));
        match std::fs::OpenOptions::new().create_new(true).append(true).open(&path) {
            Ok(f) => {
                // Fresh file: nobody else can hold it. The lock marks this process as alive.
                f.lock().ctx("locking", &path)?;
                return Ok((f, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(IoError::new("creating lease", &path, e).into()),
        }
    }
}

/// The entries pinned by live processes; leases of dead ones are deleted (unless `dry_run`).
/// Call with `gc.lock` held exclusively.
pub(crate) fn live_pins(locks: &Path, dry_run: bool) -> Result<BTreeSet<(String, String)>, CacheError> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir(locks) else { return Ok(out) };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some(LEASE_EXT) {
            continue;
        }
        let file = match std::fs::OpenOptions::new().read(true).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(IoError::new("opening lease", &p, e).into()),
        };
        match file.try_lock() {
            Ok(()) => {
                // Its process is gone.
                if !dry_run {
                    let _ = std::fs::remove_file(&p);
                }
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let text = std::fs::read_to_string(&p).ctx("reading lease", &p)?;
                for line in text.lines() {
                    if let Some((b, k)) = line.split_once(' ') {
                        out.insert((b.to_string(), k.to_string()));
                    }
                }
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(IoError::new("locking", &p, e).into()),
        }
    }
    Ok(out)
}
