//! `mmrun gc` and `mmrun verify`: walking every bucket.

use super::lease::{self, GC_LOCK, LEASE_EXT};
use super::lock::{KeyLock, Mode};
use super::{Bucket, Cache, CacheError, Damage, Depth, CACHEDIR_TAG};
use crate::durable;
use crate::fs_error::IoContext;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What `gc` did (or, dry, would do) in one bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketGc {
    /// Entries removed.
    pub removed: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Entries kept.
    pub kept: usize,
    /// Bytes kept.
    pub kept_bytes: u64,
}

/// What `gc` removed, per bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Per bucket (by directory name; leftovers of older cache layouts under `legacy`).
    pub buckets: BTreeMap<String, BucketGc>,
    /// Object keys removed.
    pub removed_objects: Vec<String>,
}

impl GcReport {
    /// Bytes freed over all buckets.
    pub fn freed_bytes(&self) -> u64 {
        self.buckets.values().map(|b| b.freed_bytes).sum()
    }

    /// One bucket's line.
    pub fn bucket(&self, b: Bucket) -> BucketGc {
        self.buckets.get(b.dir_name()).cloned().unwrap_or_default()
    }

    fn add(&mut self, bucket: &str, removed: bool, bytes: u64) {
        let b = self.buckets.entry(bucket.to_string()).or_default();
        if removed {
            b.removed += 1;
            b.freed_bytes += bytes;
        } else {
            b.kept += 1;
            b.kept_bytes += bytes;
        }
    }
}

/// The name under which leftovers of older cache layouts are reported.
pub const LEGACY: &str = "legacy";

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Entries checked.
    pub checked: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Entries skipped because another process is building them.
    pub busy: usize,
    /// Damaged entries: bucket, key, what is wrong.
    pub damaged: Vec<(Bucket, String, Damage)>,
    /// Whether the damaged entries were removed (`--repair`).
    pub repaired: bool,
}

/// Names mmrun used for buckets before they were versioned.
const UNVERSIONED: [&str; 8] = ["objects", "shards", "builtin", "fingerprints", "work", "tmp", "locks", "hashes.jsonl"];

/// Whether a cache-root entry is a bucket of an older layout: an unversioned bucket name, or a
/// bucket name with another version. Anything else is not ours and is left alone.
fn is_legacy(name: &str) -> bool {
    if UNVERSIONED.contains(&name) {
        return true;
    }
    let Some((base, v)) = name.rsplit_once("-v") else { return false };
    !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_digit())
        && Bucket::from_dir_name(name).is_none()
        && Bucket::ALL.iter().any(|b| b.dir_name().rsplit_once("-v").map(|x| x.0) == Some(base))
}

impl Cache {
    /// Free every entry that nothing needs, in every bucket:
    ///
    /// * `objects`, `shards`, `builtin`, `work`: entries whose key is neither in `referenced`
    ///   (the keys run records name) nor pinned by a live process, nor locked by a builder;
    /// * `tmp`: directories whose process is gone;
    /// * `locks`: key locks nobody holds, leases of dead processes;
    /// * `hashes`: memo lines of files that no longer exist, and superseded lines;
    /// * leftovers of older cache layouts (`objects/`, `shards-v0/`, …).
    ///
    /// `fingerprints` are kept (one small file per recipe stage; they explain `plan`).
    ///
    /// Holds `locks-v1/gc.lock` exclusively throughout, so no run can start using an entry while
    /// gc decides about it; `referenced` is called with that lock held, so a run that finished
    /// in the meantime has its record read. With `dry_run`, only reports.
    pub fn gc<E: From<CacheError>>(
        &self,
        referenced: impl FnOnce() -> Result<BTreeSet<String>, E>,
        dry_run: bool,
    ) -> Result<GcReport, E> {
        let locks = self.bucket(Bucket::Locks);
        let _gc = KeyLock::acquire(&locks.join(GC_LOCK), Mode::Exclusive, || {
            eprintln!("waiting for running mmrun processes to register what they use");
        })?;
        let pinned: BTreeSet<String> = lease::live_pins(&locks, dry_run)?.into_iter().map(|(_, k)| k).collect();
        let referenced = referenced()?;
        let mut report = GcReport::default();
        for bucket in [Bucket::Objects, Bucket::Shards, Bucket::Builtin, Bucket::Work] {
            for key in self.entries(bucket) {
                let path = self.entry_dir(bucket, &key);
                let bytes = durable::dir_size(&path);
                let keep = referenced.contains(&key) || pinned.contains(&key);
                // A process building this key holds its lock: leave it alone.
                let lock = if keep { None } else { self.try_lock(&key)? };
                let Some(lock) = lock else {
                    report.add(bucket.dir_name(), false, bytes);
                    continue;
                };
                if !dry_run {
                    std::fs::remove_dir_all(&path).ctx("removing", &path).map_err(CacheError::from)?;
                }
                drop(lock);
                if bucket == Bucket::Objects {
                    report.removed_objects.push(key);
                }
                report.add(bucket.dir_name(), true, bytes);
            }
        }
        self.gc_tmp(&mut report, dry_run)?;
        self.gc_locks(&mut report, dry_run)?;
        let freed = self.hashes.compact(dry_run)?;
        let hashes = report.buckets.entry(Bucket::Hashes.dir_name().into()).or_default();
        hashes.freed_bytes = freed;
        hashes.kept_bytes =
            durable::dir_size(&self.bucket(Bucket::Hashes)).saturating_sub(if dry_run { freed } else { 0 });
        let fp = self.bucket(Bucket::Fingerprints);
        let fps = report.buckets.entry(Bucket::Fingerprints.dir_name().into()).or_default();
        fps.kept = std::fs::read_dir(&fp).into_iter().flatten().count();
        fps.kept_bytes = durable::dir_size(&fp);
        for entry in std::fs::read_dir(&self.root).ctx("listing", &self.root).map_err(CacheError::from)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if Bucket::from_dir_name(&name).is_some() || name == CACHEDIR_TAG || !is_legacy(&name) {
                continue;
            }
            let p = entry.path();
            let bytes = durable::dir_size(&p);
            if !dry_run {
                let res = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                res.ctx("removing", &p).map_err(CacheError::from)?;
            }
            report.add(LEGACY, true, bytes);
        }
        Ok(report)
    }

    fn gc_tmp(&self, report: &mut GcReport, dry_run: bool) -> Result<(), CacheError> {
        let tmp = self.bucket(Bucket::Tmp);
        for entry in std::fs::read_dir(&tmp).ctx("listing", &tmp)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let pid: Option<u32> = name.split('-').next().and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            let bytes = durable::dir_size(&entry.path());
            if !alive && !dry_run {
                std::fs::remove_dir_all(entry.path()).ctx("removing", &entry.path())?;
            }
            report.add(Bucket::Tmp.dir_name(), !alive, bytes);
        }
        Ok(())
    }

    fn gc_locks(&self, report: &mut GcReport, dry_run: bool) -> Result<(), CacheError> {
        let locks = self.bucket(Bucket::Locks);
        for entry in std::fs::read_dir(&locks).ctx("listing", &locks)?.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name == GC_LOCK || p.extension().and_then(|x| x.to_str()) == Some(LEASE_EXT) {
                report.add(Bucket::Locks.dir_name(), false, 0);
                continue;
            }
            match KeyLock::try_acquire(&p, Mode::Exclusive)? {
                Some(l) => {
                    if !dry_run {
                        l.remove_file();
                    }
                    report.add(Bucket::Locks.dir_name(), true, 0);
                }
                None => report.add(Bucket::Locks.dir_name(), false, 0),
            }
        }
        Ok(())
    }

    /// Check every entry of `objects`, `shards` and `builtin` against its manifest, content
    /// included. With `repair`, remove the damaged ones (under their key lock) so the next run
    /// rebuilds them. Entries being built by another process are skipped.
    pub fn verify_all(&self, repair: bool) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport { repaired: repair, ..Default::default() };
        for bucket in Bucket::VERIFIED {
            for key in self.entries(bucket) {
                let Some(_lock) = self.try_lock(&key)? else {
                    report.busy += 1;
                    continue;
                };
                let dir = self.entry_dir(bucket, &key);
                report.checked += 1;
                report.bytes += durable::dir_size(&dir);
                if let Err(d) = self.check_dir(&dir, Depth::Content) {
                    if repair {
                        self.discard(bucket, &key)?;
                    }
                    report.damaged.push((bucket, key, d));
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::is_legacy;

    #[test]
    fn legacy_names_are_old_buckets_only() {
        for n in ["objects", "hashes.jsonl", "shards-v0", "objects-v2", "tmp"] {
            assert!(is_legacy(n), "{n}");
        }
        for n in ["objects-v1", "my-data", "notes.txt", "shards-vx", "CACHEDIR.TAG", "foo-v1"] {
            assert!(!is_legacy(n), "{n}");
        }
    }
}
