//! A remote copy of the `objects` bucket that several machines share, as DVC shares a remote:
//! `[cache] remote = "s3://bucket/prefix"` or `"file:///shared/path"`, through the `object_store`
//! crate (S3 credentials, region and endpoint from the usual `AWS_*` variables).
//!
//! Layout under the prefix:
//!
//! | path | holds |
//! |---|---|
//! | `blobs-v1/<blake3>` | one file's content, named by its blake3 |
//! | `objects-v1/<key>.json` | the object's `manifest.json` (written last, with a conditional put) |
//!
//! Files are content-addressed, so two machines pushing the same key never overwrite each
//! other's bytes: whatever one uploads under a name is exactly what that name promises. The
//! manifest goes up last and only if none is there yet (`PutMode::Create`), so the first complete
//! push wins and a manifest always points at blobs that are already there. A download streams
//! every blob into a fresh `tmp-v1/` directory, checks its size and blake3 against the manifest,
//! and publishes the object like a build does; a mismatch is refused and nothing is published.
//!
//! Credentials are read by `object_store` from the environment and never pass through mmrun's
//! messages or records; only the remote's URL (without any user info) is printed.

use super::{write_json, Cache, CacheError, Lookup};
use crate::artifact::{layout, Artifact, FileEntry, Manifest};
use crate::cache::{Bucket, Depth};
use crate::durable;
use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What can go wrong with the remote cache.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not one mmrun can use.
    #[error("remote cache {url:?}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The remote could not be reached or answered with an error.
    #[error("remote cache {url}: {source}")]
    Store {
        /// The remote (no credentials).
        url: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A downloaded file or manifest does not match what the manifest promises.
    #[error("remote cache {url}: object {key} refused: {problem}")]
    Corrupt {
        /// The remote.
        url: String,
        /// The stage key.
        key: String,
        /// What did not match.
        problem: String,
    },
    /// The local cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A connection to the remote cache.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    url: String,
    rt: tokio::runtime::Runtime,
    /// Set after the first failure to reach the remote: the rest of the run stays local.
    down: AtomicBool,
    /// Whether the "unreachable" warning was printed.
    warned: AtomicBool,
}

/// What [`Remote::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// This call uploaded the manifest (and the blobs the remote lacked).
    Uploaded,
    /// The remote had the object already (or another writer published it first).
    AlreadyThere,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish_non_exhaustive()
    }
}

/// object_store's HTTP client (reqwest) is built without a bundled crypto provider (see
/// Cargo.toml: aws-lc-rs is a large C build), so install ring's as the process default before the
/// first client is built. Harmless when one is already installed.
fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Remote {
    /// Connect to `url` (`s3://bucket/prefix` or `file:///path`). Nothing is contacted yet.
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        let bad = |why: String| RemoteError::BadUrl { url: url.to_string(), why };
        super::spec::check_remote_url(url).map_err(bad)?;
        let store_err = |source| RemoteError::Store { url: url.to_string(), source };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if let Some(rest) = url.strip_prefix("s3://") {
            install_tls_provider();
            let prefix = rest.split_once('/').map(|(_, p)| p).unwrap_or("").to_string();
            // A remote that does not answer must not hold the run up: few retries, short timeouts.
            let retry = object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(20),
                ..Default::default()
            };
            // Timeouts go in key by key: `with_client_options` would replace the client options
            // `from_env` read (AWS_ALLOW_HTTP among them), and every request to an http://
            // endpoint would then fail to build.
            use object_store::aws::AmazonS3ConfigKey::Client;
            use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(retry)
                .with_config(Client(ConnectTimeout), "5s")
                .with_config(Client(Timeout), "300s")
                .build()
                .map_err(store_err)?;
            (Arc::new(s3), prefix)
        } else {
            let dir = url.strip_prefix("file://").expect("checked");
            std::fs::create_dir_all(dir).map_err(|e| bad(format!("creating {dir}: {e}")))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(store_err)?;
            (Arc::new(fs), String::new())
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(format!("starting its I/O runtime: {e}")))?;
        Ok(Remote {
            store,
            prefix: StorePath::from(prefix),
            url: url.to_string(),
            rt,
            down: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        })
    }

    /// The URL (no credentials ever appear in it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether an earlier call found the remote unreachable (later calls then do nothing).
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn path(&self, rel: &str) -> StorePath {
        rel.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn manifest_path(&self, key: &str) -> StorePath {
        self.path(&format!("{}/{key}.json", Bucket::Objects.dir_name()))
    }

    fn blob_path(&self, blake3: &str) -> StorePath {
        self.path(&format!("blobs-v1/{blake3}"))
    }

    fn store_err(&self, source: object_store::Error) -> RemoteError {
        // Anything but a plain answer about one object means the remote is not usable now.
        if !matches!(source, object_store::Error::NotFound { .. } | object_store::Error::AlreadyExists { .. }) {
            self.down.store(true, Ordering::Relaxed);
        }
        RemoteError::Store { url: self.url.clone(), source }
    }

    fn corrupt(&self, key: &str, problem: String) -> RemoteError {
        RemoteError::Corrupt { url: self.url.clone(), key: key.to_string(), problem }
    }

    /// The remote's manifest for `key`, if it has one.
    fn manifest(&self, key: &str) -> Result<Option<Manifest>, RemoteError> {
        let bytes = match self.rt.block_on(async { self.store.get(&self.manifest_path(key)).await?.bytes().await }) {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(key, format!("its manifest is not valid: {e}")))?;
        if m.key != key {
            return Err(self.corrupt(key, format!("its manifest is for key {}", m.key)));
        }
        for f in &m.files {
            if !is_safe_rel_path(&f.path) || f.path == layout::MANIFEST {
                return Err(self.corrupt(key, format!("its manifest names the file {:?}", f.path)));
            }
            if f.blake3.len() != 64 || !f.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.corrupt(key, format!("its manifest gives {:?} the hash {:?}", f.path, f.blake3)));
            }
        }
        Ok(Some(m))
    }

    /// Download the object for `key` into the local cache if the remote has it: every file is
    /// checked against the manifest's size and blake3 before the object is published. Returns
    /// `None` when the remote has no such object. The caller holds the key's lock.
    pub fn pull(&self, cache: &Cache, key: &str) -> Result<Option<Artifact>, RemoteError> {
        if self.is_down() {
            return Ok(None);
        }
        let Some(manifest) = self.manifest(key)? else { return Ok(None) };
        let tmp = cache.tmp_dir()?;
        for f in &manifest.files {
            self.download(key, f, &tmp.path().join(&f.path))?;
        }
        write_json(&tmp.path().join(layout::MANIFEST), &manifest)?;
        // We hold the key's lock, so nobody else is publishing it; a damaged local copy goes.
        if let Lookup::Found(existing) = cache.lookup(key, Depth::Sizes) {
            return Ok(Some(existing));
        }
        cache.discard(Bucket::Objects, key)?;
        let target = cache.object_dir(key);
        let src = tmp.take();
        if let Err(e) = durable::publish_dir(&src, &target) {
            let _ = std::fs::remove_dir_all(&src);
            return Err(CacheError::from(crate::fs_error::IoError::new("publishing", &target, e)).into());
        }
        Ok(Some(Artifact { dir: target, manifest }))
    }

    /// [`Self::pull`] for a run: any failure is a warning and the stage is built here instead. An
    /// unreachable remote is reported once; the rest of the run does not try it again.
    pub fn try_pull(&self, cache: &Cache, key: &str) -> Option<Artifact> {
        match self.pull(cache, key) {
            Ok(found) => found,
            Err(e) => {
                self.warn(&e, "building it here");
                None
            }
        }
    }

    /// [`Self::push`] for a run: a failure is a warning (the local object is complete either way).
    pub fn try_push(&self, cache: &Cache, art: &Artifact) -> Option<Pushed> {
        if self.is_down() {
            return None;
        }
        match self.push(cache, art) {
            Ok(p) => Some(p),
            Err(e) => {
                self.warn(&e, "not pushed");
                None
            }
        }
    }

    fn warn(&self, e: &RemoteError, then: &str) {
        match e {
            RemoteError::Store { source, .. } if self.is_down() => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "warning: remote cache {} is unreachable or refused access ({source}); continuing with the local cache only",
                        self.url
                    );
                }
            }
            _ => eprintln!("warning: {e}; {then}"),
        }
    }

    /// Stream one blob to `dest`, hashing as it comes; refuse it unless size and blake3 match.
    fn download(&self, key: &str, f: &FileEntry, dest: &Path) -> Result<(), RemoteError> {
        use crate::fs_error::IoContext;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).ctx("creating", parent).map_err(CacheError::from)?;
        }
        let mut out = std::fs::File::create(dest).ctx("creating", dest).map_err(CacheError::from)?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let path = self.blob_path(&f.blake3);
        let res: Result<(), RemoteError> = self.rt.block_on(async {
            let mut stream = match self.store.get(&path).await {
                Ok(r) => r.into_stream(),
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(self.corrupt(key, format!("the content of {} ({}) is missing", f.path, f.blake3)))
                }
                Err(e) => return Err(self.store_err(e)),
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.store_err(e))?;
                size += chunk.len() as u64;
                if size > f.size {
                    break;
                }
                hasher.update(&chunk);
                out.write_all(&chunk).ctx("writing", dest).map_err(CacheError::from)?;
            }
            Ok(())
        });
        res?;
        if size != f.size {
            return Err(
                self.corrupt(key, format!("{} has {size} bytes on the remote, the manifest says {}", f.path, f.size))
            );
        }
        let got = hasher.finalize().to_hex().to_string();
        if got != f.blake3 {
            return Err(
                self.corrupt(key, format!("{} has blake3 {got} on the remote, the manifest says {}", f.path, f.blake3))
            );
        }
        Ok(())
    }

    /// Upload the local object `art` unless the remote has its key: the blobs it lacks first,
    /// then the manifest, only if no other writer published one meanwhile.
    pub fn push(&self, cache: &Cache, art: &Artifact) -> Result<Pushed, RemoteError> {
        let key = &art.manifest.key;
        if self.is_down() {
            return Err(self.store_err(object_store::Error::Generic {
                store: "remote",
                source: "unreachable earlier in this run".into(),
            }));
        }
        if self.manifest(key)?.is_some() {
            return Ok(Pushed::AlreadyThere);
        }
        // What we upload must be what the manifest says: check the local copy in full first.
        cache.verify(art).map_err(|d| self.corrupt(key, format!("the local copy is damaged ({d}); not pushed")))?;
        for f in &art.manifest.files {
            let path = self.blob_path(&f.blake3);
            let exists = match self.rt.block_on(self.store.head(&path)) {
                Ok(meta) => meta.size == f.size,
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => return Err(self.store_err(e)),
            };
            if !exists {
                self.upload(&art.dir.join(&f.path), &path)?;
            }
        }
        let json = serde_json::to_vec_pretty(&art.manifest).expect("a manifest serialises");
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.rt.block_on(self.store.put_opts(&self.manifest_path(key), PutPayload::from(json), opts)) {
            Ok(_) => Ok(Pushed::Uploaded),
            // Another writer finished first; its blobs are content-addressed like ours.
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(Pushed::AlreadyThere)
            }
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// Upload one file (in parts when it is large, so memory stays flat).
    fn upload(&self, src: &Path, to: &StorePath) -> Result<(), RemoteError> {
        use crate::fs_error::IoContext;
        const PART: usize = 16 << 20;
        let mut file = std::fs::File::open(src).ctx("opening", src).map_err(CacheError::from)?;
        let len = file.metadata().ctx("reading metadata of", src).map_err(CacheError::from)?.len();
        let read_part = |file: &mut std::fs::File, n: usize| -> Result<Vec<u8>, RemoteError> {
            let mut buf = vec![0u8; n];
            std::io::Read::read_exact(file, &mut buf).ctx("reading", src).map_err(CacheError::from)?;
            Ok(buf)
        };
        if len as usize <= PART {
            let buf = read_part(&mut file, len as usize)?;
            self.rt.block_on(self.store.put(to, PutPayload::from(buf))).map_err(|e| self.store_err(e))?;
            return Ok(());
        }
        let upload = self.rt.block_on(self.store.put_multipart(to)).map_err(|e| self.store_err(e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(PART);
            let buf = read_part(&mut file, n)?;
            w.write(&buf);
            left -= n;
        }
        self.rt.block_on(w.finish()).map_err(|e| self.store_err(e))?;
        Ok(())
    }
}

/// A `/`-separated relative path that stays inside its directory.
fn is_safe_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_network_stay_inside() {
        assert!(is_safe_rel_path("model.safetensors"));
        assert!(is_safe_rel_path("ckpt/a.bin"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b"] {
            assert!(!is_safe_rel_path(bad), "{bad:?}");
        }
    }
}
