//! The content-addressed store under `$MMRUN_HOME` (default `.mmrun/`), in typed, versioned
//! buckets (as uv names its own): a bucket's name carries its format version, so a format change
//! moves to a fresh directory instead of misreading an old one, and `gc` frees the old one.
//!
//! | bucket | holds | complete iff |
//! |---|---|---|
//! | `objects-v1/<key>/` | finished stage artifacts | `manifest.json` exists (renamed in whole) |
//! | `shards-v1/<key>/` | tokenised shards of a dataset ([`Cache::derived`]) | the directory exists (renamed in whole, with `manifest.json`) |
//! | `builtin-v1/<key>/` | generated `builtin:` datasets ([`Cache::derived`]) | as shards |
//! | `fingerprints-v1/<recipe>/<stage>.json` | what each stage was last built from (`plan --why`) | each file is written atomically |
//! | `hashes-v1/files.jsonl` | memo of local input file hashes (datasets, model folders) by (path, size, mtime, dev, inode) | append-only; torn lines are ignored |
//! | `work-v1/<key>/` | checkpoints and half-built derived entries | survives interrupts; removed once `<key>` is published |
//! | `tmp-v1/<pid>-<random>/` | artifacts being assembled | never read; removed on failure, or by `gc` once its process is gone |
//! | `locks-v1/` | `<key>.lock` per key, `gc.lock`, and the leases of live runs | OS locks: released when their process dies |
//!
//! Every entry of `objects`, `shards` and `builtin` carries a `manifest.json` listing each file's
//! size and blake3. Lookups check sizes; an entry is checked in full ([`Depth::Content`]) before a
//! stage opens it, and by `mmrun verify`. A damaged entry counts as missing and is rebuilt.
//!
//! Publishing is `build in tmp or work → write manifest → fsync → rename into the bucket`: a
//! crash at any moment leaves either no entry or a complete one, never half of one.

mod gc;
mod hash;
mod lease;
mod lock;
pub mod remote;
pub mod spec;
mod verify;

pub use gc::{BucketGc, GcReport, VerifyReport};
pub use hash::HashIndex;
pub use lock::{KeyLock, Mode};
pub use remote::{Pushed, Remote, RemoteError};
pub use verify::{Damage, Depth};

use crate::artifact::{layout, Artifact, ArtifactKind, FileEntry, Manifest};
use crate::durable;
use crate::fs_error::{IoContext, IoError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What can go wrong inside the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file system operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
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

/// The cache's buckets. [`Bucket::dir_name`] is the one place their directory names are spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bucket {
    /// Finished stage artifacts, by stage key.
    Objects,
    /// Tokenised shard sets, by shard key.
    Shards,
    /// Generated `builtin:` datasets, by generator key.
    Builtin,
    /// The fingerprint each stage of each recipe was last built from.
    Fingerprints,
    /// The dataset file hash memo.
    Hashes,
    /// Checkpoints of unfinished stages and half-built derived entries, by key.
    Work,
    /// Artifacts being assembled.
    Tmp,
    /// Key locks, the gc lock and run leases.
    Locks,
}

impl Bucket {
    /// Every bucket.
    pub const ALL: [Bucket; 8] = [
        Bucket::Objects,
        Bucket::Shards,
        Bucket::Builtin,
        Bucket::Fingerprints,
        Bucket::Hashes,
        Bucket::Work,
        Bucket::Tmp,
        Bucket::Locks,
    ];

    /// The directory name under the cache root, with the bucket's format version.
    pub fn dir_name(self) -> &'static str {
        match self {
            Bucket::Objects => "objects-v1",
            Bucket::Shards => "shards-v1",
            Bucket::Builtin => "builtin-v1",
            Bucket::Fingerprints => "fingerprints-v1",
            Bucket::Hashes => "hashes-v1",
            Bucket::Work => "work-v1",
            Bucket::Tmp => "tmp-v1",
            Bucket::Locks => "locks-v1",
        }
    }

    /// The bucket whose directory is `name`.
    pub fn from_dir_name(name: &str) -> Option<Bucket> {
        Self::ALL.into_iter().find(|b| b.dir_name() == name)
    }

    /// Buckets whose entries carry a `manifest.json` and are verified.
    pub const VERIFIED: [Bucket; 3] = [Bucket::Objects, Bucket::Shards, Bucket::Builtin];
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// A handle on one cache directory. Clones share the hash memos and this process's lease.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
    hashes: Arc<HashIndex>,
    verifier: Arc<verify::Verifier>,
    lease: Arc<lease::Lease>,
}

/// A directory under `tmp-v1/` in which an artifact is assembled. Removed on drop unless published.
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

/// What looking an entry up found.
#[derive(Debug)]
pub enum Lookup {
    /// No entry.
    Absent,
    /// An entry that does not match its manifest (or has none): unusable, to be rebuilt.
    Damaged(Damage),
    /// A complete entry.
    Found(Artifact),
}

/// A derived entry ([`Cache::derived`]).
#[derive(Clone, Debug)]
pub struct Derived {
    /// Its directory (`<bucket>/<key>/`).
    pub dir: PathBuf,
    /// Whether this call built it.
    pub built: bool,
    /// The damage found on an existing entry that this call therefore rebuilt.
    pub replaced: Option<Damage>,
}

/// `manifest.json` of a derived entry (objects use [`Manifest`], which has the same `files`).
#[derive(Debug, Serialize, Deserialize)]
struct EntryManifest {
    bucket: String,
    key: String,
    mmrun_version: String,
    files: Vec<FileEntry>,
}

/// The part of any manifest that verification reads.
#[derive(Deserialize)]
struct ListedFiles {
    files: Vec<FileEntry>,
}

/// Marks the cache root for backup tools (<https://bford.info/cachedir/>), as cargo and uv do.
const CACHEDIR_TAG: &str = "CACHEDIR.TAG";
const CACHEDIR_TAG_BODY: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by mmrun.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

impl Cache {
    /// Open (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        for b in Bucket::ALL {
            std::fs::create_dir_all(root.join(b.dir_name()))?;
        }
        let tag = root.join(CACHEDIR_TAG);
        if !tag.exists() {
            durable::write_atomic(&tag, CACHEDIR_TAG_BODY)?;
        }
        let hashes = Arc::new(HashIndex::new(root.join(Bucket::Hashes.dir_name()).join("files.jsonl")));
        Ok(Self { root, hashes, verifier: Default::default(), lease: Default::default() })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A bucket's directory.
    pub fn bucket(&self, bucket: Bucket) -> PathBuf {
        self.root.join(bucket.dir_name())
    }

    /// `<bucket>/<key>` (whether or not it exists).
    pub fn entry_dir(&self, bucket: Bucket, key: &str) -> PathBuf {
        self.bucket(bucket).join(key)
    }

    /// `objects-v1/<key>/` (whether or not it exists).
    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.entry_dir(Bucket::Objects, key)
    }

    /// Register `(bucket, key)` as used by this process, so a concurrent `gc` keeps it (see
    /// the lease module). Lookups pin by themselves; call it before relying on an entry otherwise.
    pub fn pin(&self, bucket: Bucket, key: &str) -> Result<(), CacheError> {
        self.lease.pin(&self.bucket(Bucket::Locks), bucket, key)
    }

    /// The entries this process pinned, outside `objects` (which run records name by stage key):
    /// bucket name → keys. Run records keep them so `gc` knows what they used.
    pub fn pinned_entries(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (b, k) in self.lease.pinned() {
            if matches!(b, Bucket::Shards | Bucket::Builtin) {
                out.entry(b.dir_name().to_string()).or_default().insert(k);
            }
        }
        out
    }

    /// Look up the object for `key` at `depth` (and pin it). A directory without a manifest (a
    /// hand-made one: publishing renames complete directories only) is `Absent`.
    pub fn lookup(&self, key: &str, depth: Depth) -> Lookup {
        if let Err(e) = self.pin(Bucket::Objects, key) {
            tracing::warn!("could not register object {key} against gc: {e}");
        }
        self.lookup_unpinned(key, depth)
    }

    fn lookup_unpinned(&self, key: &str, depth: Depth) -> Lookup {
        let dir = self.object_dir(key);
        let mpath = dir.join(layout::MANIFEST);
        let text = match std::fs::read(&mpath) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Absent,
            Err(e) => return Lookup::Damaged(Damage { file: mpath, problem: format!("unreadable: {e}") }),
        };
        let manifest: Manifest = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => return Lookup::Damaged(Damage { file: mpath, problem: format!("not a valid manifest: {e}") }),
        };
        match self.verifier.check(&dir, &manifest.files, depth) {
            Ok(()) => Lookup::Found(Artifact { dir, manifest }),
            Err(d) => Lookup::Damaged(d),
        }
    }

    /// The finished, undamaged (by size) artifact for `key`, if there is one.
    pub fn object(&self, key: &str) -> Option<Artifact> {
        match self.lookup(key, Depth::Sizes) {
            Lookup::Found(a) => Some(a),
            Lookup::Absent | Lookup::Damaged(_) => None,
        }
    }

    /// Check an artifact's files against its manifest, content included (memoised per process).
    pub fn verify(&self, artifact: &Artifact) -> Result<(), Damage> {
        self.verifier.check(&artifact.dir, &artifact.manifest.files, Depth::Content)
    }

    /// Remove a (damaged) entry so it can be rebuilt: it is renamed into `tmp-v1/` first, so
    /// the bucket never shows half of it. Take the key's lock first.
    pub fn discard(&self, bucket: Bucket, key: &str) -> Result<(), CacheError> {
        let dir = self.entry_dir(bucket, key);
        if std::fs::symlink_metadata(&dir).is_err() {
            return Ok(());
        }
        let trash = self.tmp_dir()?;
        std::fs::rename(&dir, trash.path().join("old")).ctx("moving aside", &dir)?;
        durable::fsync_dir(&self.bucket(bucket));
        Ok(())
    }

    /// `work-v1/<key>/`, created if needed: checkpoints of a stage (or the partial build of a
    /// derived entry) that has not finished yet.
    pub fn work_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        let dir = self.entry_dir(Bucket::Work, key);
        std::fs::create_dir_all(&dir).ctx("creating work directory", &dir)?;
        Ok(dir)
    }

    /// A fresh, empty directory under `tmp-v1/` to assemble an artifact in.
    pub fn tmp_dir(&self) -> Result<TmpDir, CacheError> {
        let base = self.bucket(Bucket::Tmp);
        std::fs::create_dir_all(&base).ctx("creating", &base)?;
        loop {
            let name = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
            let p = base.join(name);
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TmpDir { path: Some(p) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(IoError::new("creating tmp directory", &p, e).into()),
            }
        }
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.bucket(Bucket::Locks).join(format!("{key}.lock"))
    }

    /// Take the per-key lock, blocking while another process holds it. `on_wait` is called once
    /// if we have to wait (so the caller can say who it is waiting for).
    pub fn lock(&self, key: &str, on_wait: impl FnOnce()) -> Result<KeyLock, CacheError> {
        KeyLock::acquire(&self.lock_path(key), Mode::Exclusive, on_wait)
    }

    /// Try to take the per-key lock without blocking.
    pub fn try_lock(&self, key: &str) -> Result<Option<KeyLock>, CacheError> {
        KeyLock::try_acquire(&self.lock_path(key), Mode::Exclusive)
    }

    /// Publish the artifact assembled in `tmp` as `objects-v1/<key>/`: hash every file, write the
    /// manifest last, fsync, rename. If a complete object for `key` already exists (built by
    /// another process), `tmp` is discarded and the existing one returned; a damaged one is
    /// replaced. The `work-v1/<key>/` checkpoints are removed afterwards.
    pub fn publish(
        &self,
        tmp: TmpDir,
        key: &str,
        kind: ArtifactKind,
        stage_kind: &str,
        metrics: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Artifact, CacheError> {
        // The builder pinned `key` when it looked it up before building.
        if let Lookup::Found(existing) = self.lookup_unpinned(key, Depth::Sizes) {
            return Ok(existing);
        }
        let dir = tmp.path().to_path_buf();
        let manifest = Manifest {
            kind,
            stage_kind: stage_kind.to_string(),
            key: key.to_string(),
            mmrun_version: crate::VERSION.to_string(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            files: self.list_files(&dir)?,
            metrics,
        };
        write_json(&dir.join(layout::MANIFEST), &manifest)?;
        // A directory without a valid manifest is not an object (e.g. a hand-edited cache).
        self.discard(Bucket::Objects, key)?;
        let target = self.object_dir(key);
        let src = tmp.take();
        if let Err(e) = durable::publish_dir(&src, &target) {
            let _ = std::fs::remove_dir_all(&src);
            return Err(IoError::new("publishing", &target, e).into());
        }
        let _ = std::fs::remove_dir_all(self.entry_dir(Bucket::Work, key));
        Ok(Artifact { dir: target, manifest })
    }

    /// The entry `<bucket>/<key>/`, built by `build` if it is not there (or is damaged).
    ///
    /// `build` runs under the key's lock, in `work-v1/<key>/`, which may hold the files of an
    /// earlier interrupted attempt: it may continue from them (shards do) or overwrite them.
    /// When it succeeds the directory gets a `manifest.json` (size and blake3 of every file) and
    /// is renamed into the bucket. An existing entry is checked against its manifest in full
    /// (memoised per process) before it is returned; a damaged one is discarded and rebuilt,
    /// and [`Derived::replaced`] says what was wrong.
    pub fn derived<E: From<CacheError>>(
        &self,
        bucket: Bucket,
        key: &str,
        build: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Derived, E> {
        debug_assert!(matches!(bucket, Bucket::Shards | Bucket::Builtin), "{bucket} holds no derived entries");
        self.pin(bucket, key)?;
        let dir = self.entry_dir(bucket, key);
        if let Ok(true) = self.check_entry(&dir) {
            return Ok(Derived { dir, built: false, replaced: None });
        }
        let _lock = self.lock(key, || {
            eprintln!("waiting for another mmrun building {bucket}/{}", &key[..key.len().min(12)]);
        })?;
        let replaced = match self.check_entry(&dir) {
            Ok(true) => return Ok(Derived { dir, built: false, replaced: None }),
            Ok(false) => None,
            Err(damage) => {
                tracing::warn!("{damage}; rebuilding {bucket}/{key}");
                self.discard(bucket, key)?;
                Some(damage)
            }
        };
        let work = self.work_dir(key)?;
        build(&work)?;
        let manifest = EntryManifest {
            bucket: bucket.dir_name().into(),
            key: key.into(),
            mmrun_version: crate::VERSION.into(),
            files: self.list_files(&work)?,
        };
        write_json(&work.join(layout::MANIFEST), &manifest)?;
        durable::publish_dir(&work, &dir).ctx("publishing", &dir).map_err(CacheError::from)?;
        Ok(Derived { dir, built: true, replaced })
    }

    /// Whether a derived entry exists and matches its manifest in full. A directory without a
    /// manifest is damaged: derived entries are only ever renamed in complete.
    fn check_entry(&self, dir: &Path) -> Result<bool, Damage> {
        if std::fs::symlink_metadata(dir).is_err() {
            return Ok(false);
        }
        self.check_dir(dir, Depth::Content).map(|()| true)
    }

    /// Check any manifested entry directory.
    fn check_dir(&self, dir: &Path, depth: Depth) -> Result<(), Damage> {
        let mpath = dir.join(layout::MANIFEST);
        let damage = |problem: String| Damage { file: mpath.clone(), problem };
        let text = std::fs::read(&mpath).map_err(|e| damage(format!("unreadable: {e}")))?;
        let listed: ListedFiles =
            serde_json::from_slice(&text).map_err(|e| damage(format!("not a valid manifest: {e}")))?;
        self.verifier.check(dir, &listed.files, depth)
    }

    /// blake3 of a file's content (hex), memoised by (canonical path, size, mtime, device, inode)
    /// so a large corpus or a local model folder is hashed once, not on every run.
    pub fn hash_file(&self, path: &Path) -> Result<String, CacheError> {
        self.hashes.hash_file(path)
    }

    /// How many files [`Cache::hash_file`] has read in full through this handle (memo misses).
    pub fn files_hashed(&self) -> u64 {
        self.hashes.files_read()
    }

    /// Every file under `dir` except a manifest at its root, with size and blake3, sorted by
    /// path. The hashes are remembered for verification (renaming the directory into its bucket
    /// keeps inodes and mtimes), so an artifact built by this process is not read again.
    fn list_files(&self, dir: &Path) -> Result<Vec<FileEntry>, CacheError> {
        let mut rels = Vec::new();
        collect_files(dir, dir, &mut rels)?;
        rels.sort();
        let mut out = Vec::with_capacity(rels.len());
        for rel in rels {
            if rel == layout::MANIFEST {
                continue;
            }
            let p = dir.join(&rel);
            let blake3 = self.verifier.hash(&p)?;
            let size = std::fs::metadata(&p).ctx("reading metadata of", &p)?.len();
            out.push(FileEntry { path: rel, size, blake3 });
        }
        Ok(out)
    }

    /// Names of the entries of `bucket`, sorted.
    pub fn entries(&self, bucket: Bucket) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.bucket(bucket))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        keys.sort();
        keys
    }

    /// Keys of all objects (complete or not) currently in `objects-v1/`.
    pub fn object_keys(&self) -> Vec<String> {
        self.entries(Bucket::Objects)
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

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), CacheError> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| CacheError::Manifest { path: path.into(), source })?;
    Ok(durable::write_atomic(path, &json).ctx("writing", path)?)
}

/// Total size of the files under `p` (0 if it does not exist).
pub fn dir_size(p: &Path) -> u64 {
    durable::dir_size(p)
}

#[cfg(test)]
mod tests;
