//! Hugging Face Hub client over `ureq`: revisions, tree listing, resolve, verification, Range
//! resume, retries, offline mode, and the HF cache layout; [`push`] uploads a folder as one commit.
//!
//! Entry point for the pipeline: [`lock::fetch_all`] resolves every remote input of a recipe (each
//! an `hf://` URI and a [`RemoteKind`]) through the recipe's lock into one [`Fetched`] map of local
//! files inside the shared HF cache; [`resolve`] does one URI. [`lock`] reads and writes
//! `recipes/<name>.lock` and implements `mmrun update`.
//!
//! API boundary: nothing here knows about recipes' stages or models; the token never leaves
//! [`Token`] except as an `Authorization` header to the configured endpoint.

mod base64;
pub mod cache;
pub mod client;
pub mod error;
pub mod fetched;
pub mod lock;
pub mod names;
pub mod push;
#[doc(hidden)]
pub mod testserver;
pub mod uri;

use std::path::PathBuf;
use std::time::Duration;

pub use error::HubError;
pub use fetched::{Fetched, RemoteId, RemoteInput};
pub use lock::{LockedFile, LockedRepo};
pub use uri::{HubUri, RemoteKind, RepoType};

use cache::RepoCache;
use client::{Client, RemoteFile};

/// An access token. Its `Debug` output is redacted so it cannot leak into logs or records.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wrap a token string.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret, for the `Authorization` header only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How to reach the Hub and where to cache. [`HubOptions::from_env`] follows `huggingface_hub`.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else `$HF_HOME/token`.
    pub token: Option<Token>,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: never touch the network, use only the cache.
    pub offline: bool,
    /// Retries after the first attempt for transient failures.
    pub max_retries: u32,
    /// First backoff delay; doubles per retry.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Cap on a server's `Retry-After`.
    pub retry_after_max: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to wait for response headers.
    pub response_timeout: Duration,
}

impl HubOptions {
    /// Options from the environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let token = env("HF_TOKEN")
            .or_else(|| {
                let path = env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| cache::hf_home().join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .map(Token);
        let truthy =
            |k: &str| env(k).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache_dir: cache::hub_cache_dir(),
            offline: truthy("HF_HUB_OFFLINE"),
            max_retries: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            retry_after_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
        }
    }
}

/// One file of a fetched repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedFile {
    /// Path inside the repository.
    pub repo_path: String,
    /// `snapshots/<commit>/<repo_path>` in the HF cache (a symlink to the verified blob).
    pub local_path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the content.
    pub sha256: String,
}

/// What [`resolve`] fetched: one remote input at one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedRepo {
    /// The URI as written in the recipe.
    pub uri: String,
    /// The revision asked for (`main` when none).
    pub revision: String,
    /// The full commit id used.
    pub commit: String,
    /// Matching files, sorted by repository path.
    pub files: Vec<FetchedFile>,
}

impl FetchedRepo {
    /// The lock entry pinning exactly these files.
    pub fn to_locked(&self) -> LockedRepo {
        LockedRepo {
            uri: self.uri.clone(),
            revision: self.revision.clone(),
            commit: self.commit.clone(),
            files: self
                .files
                .iter()
                .map(|f| LockedFile { path: f.repo_path.clone(), size: f.size, sha256: f.sha256.clone() })
                .collect(),
        }
    }
}

/// [`resolve`] for a dataset: the files the URI's path or glob selects.
pub fn resolve_dataset(uri: &HubUri, lock: Option<&LockedRepo>, opts: &HubOptions) -> Result<FetchedRepo, HubError> {
    resolve(uri, RemoteKind::Dataset, lock, opts)
}

/// Fetch the files of `uri` that `kind` selects ([`RemoteKind::selects`]) into the HF cache and
/// return their local paths.
///
/// With `lock` (for the same URI) the locked commit and file list are used whatever the branch says
/// now, and each file's sha256 must equal the locked one. When everything is already cached no
/// request is made at all. With `opts.offline`, only the cache is consulted.
pub fn resolve(
    uri: &HubUri,
    kind: RemoteKind,
    lock: Option<&LockedRepo>,
    opts: &HubOptions,
) -> Result<FetchedRepo, HubError> {
    let lock = lock.filter(|l| l.uri == uri.to_string());
    let rc = RepoCache::new(&opts.cache_dir, uri.repo_type, &uri.repo_id);
    let client = Client::new(uri, opts);
    let revision = uri.revision_or_main().to_string();
    if let Some(l) = lock {
        l.validate().map_err(|name| HubError::UnsafeName {
            dataset: client.dataset.clone(),
            name: Box::new(name),
            origin: "the lock file".into(),
            fix: "the lock was edited or is corrupt; delete the entry and run `mmrun update <recipe>`",
        })?;
    }

    if let Some(l) = lock {
        if let Some(files) = cached_files(&rc, &l.commit, l.files.iter().map(|f| f.path.clone()), Some(l)) {
            return Ok(FetchedRepo { uri: l.uri.clone(), revision, commit: l.commit.clone(), files });
        }
    }
    if opts.offline {
        return resolve_offline(uri, kind, lock, &rc, &client);
    }

    let commit = match lock {
        Some(l) => l.commit.clone(),
        None => {
            let c = client.resolve_revision(&revision)?;
            rc.write_ref(&revision, &c).map_err(|e| {
                HubError::from_write(&client.dataset, &client.revision_url(&revision), &rc.dir().join("refs"), e)
            })?;
            c
        }
    };
    let listing = client.list_files(&commit, listing_dir(&uri.path))?;
    let selected: Vec<RemoteFile> = match lock {
        Some(l) => {
            let mut v = Vec::new();
            for lf in &l.files {
                let rf = listing.iter().find(|r| r.path == lf.path).ok_or_else(|| HubError::FileNotFound {
                    dataset: client.dataset.clone(),
                    path: lf.path.clone(),
                    commit: commit.clone(),
                    url: client.resolve_url(&commit, &lf.path),
                })?;
                v.push(rf.clone());
            }
            v
        }
        None => {
            let selected: Vec<RemoteFile> =
                listing.iter().filter(|f| kind.selects(&uri.path, &f.path)).cloned().collect();
            if kind == RemoteKind::Model && !selected.iter().any(|f| f.path.ends_with(".safetensors")) {
                let pickled: Vec<String> = listing
                    .iter()
                    .filter(|f| path_matches(&uri.path, &f.path) && names::is_pickled(&f.path))
                    .map(|f| f.path.clone())
                    .collect();
                if !pickled.is_empty() {
                    return Err(HubError::PickledWeights { repo: uri.to_string(), files: pickled.join(", ") });
                }
            }
            selected
        }
    };
    if selected.is_empty() {
        return Err(HubError::FileNotFound {
            dataset: client.dataset.clone(),
            path: uri.path.clone(),
            commit: commit.clone(),
            url: client.tree_url(&commit, listing_dir(&uri.path)),
        });
    }
    let mut files = Vec::new();
    for rf in &selected {
        let (local_path, sha256) = client.fetch_file(&rc, &commit, rf)?;
        if let Some(lf) = lock.and_then(|l| l.files.iter().find(|f| f.path == rf.path)) {
            if lf.sha256 != sha256 || lf.size != rf.size {
                return Err(HubError::ChecksumMismatch {
                    dataset: client.dataset.clone(),
                    url: client.resolve_url(&commit, &rf.path),
                    expected: format!("sha256:{} ({} bytes, from the lock file)", lf.sha256, lf.size),
                    actual: format!("sha256:{sha256} ({} bytes)", rf.size),
                });
            }
        }
        files.push(FetchedFile { repo_path: rf.path.clone(), local_path, size: rf.size, sha256 });
    }
    files.sort_by(|a, b| a.repo_path.cmp(&b.repo_path));
    Ok(FetchedRepo { uri: uri.to_string(), revision, commit, files })
}

fn resolve_offline(
    uri: &HubUri,
    kind: RemoteKind,
    lock: Option<&LockedRepo>,
    rc: &RepoCache,
    client: &Client<'_>,
) -> Result<FetchedRepo, HubError> {
    let revision = uri.revision_or_main().to_string();
    let not_cached = |what: String, url: String| HubError::OfflineNotCached {
        dataset: client.dataset.clone(),
        what,
        cache: rc.dir(),
        url,
    };
    let commit = match lock {
        Some(l) => l.commit.clone(),
        None => {
            if names::is_commit_id(&revision) && rc.snapshot_dir(&revision).is_ok_and(|d| d.is_dir()) {
                revision.clone()
            } else {
                rc.read_ref(&revision)
                    .ok_or_else(|| not_cached(format!("revision '{revision}'"), client.revision_url(&revision)))?
            }
        }
    };
    let paths: Vec<String> = match lock {
        Some(l) => l.files.iter().map(|f| f.path.clone()).collect(),
        None => rc.snapshot_files(&commit).into_iter().filter(|p| kind.selects(&uri.path, p)).collect(),
    };
    if paths.is_empty() {
        return Err(not_cached(format!("'{}' at commit {commit}", uri.path), client.resolve_url(&commit, &uri.path)));
    }
    match cached_files(rc, &commit, paths.iter().cloned(), lock) {
        Some(files) => Ok(FetchedRepo { uri: uri.to_string(), revision, commit, files }),
        None => {
            let missing =
                paths.iter().find(|p| !rc.snapshot_path(&commit, p).is_ok_and(|f| f.is_file())).unwrap_or(&paths[0]);
            Err(not_cached(format!("'{missing}' at commit {commit}"), client.resolve_url(&commit, missing)))
        }
    }
}

/// The cached snapshot files for `paths`, if every one is present (and matches the lock's size and
/// sha256 when a lock is given).
fn cached_files(
    rc: &RepoCache,
    commit: &str,
    paths: impl Iterator<Item = String>,
    lock: Option<&LockedRepo>,
) -> Option<Vec<FetchedFile>> {
    let mut out = Vec::new();
    for path in paths {
        let local = rc.snapshot_path(commit, &path).ok()?;
        let size = std::fs::metadata(&local).ok().filter(|m| m.is_file())?.len();
        // A blob named by a 64-hex LFS sha256 is its own checksum; otherwise hash the (small) file.
        let blob_name =
            std::fs::read_link(&local).ok().and_then(|t| t.file_name().map(|n| n.to_string_lossy().to_string()));
        let sha256 = match blob_name.filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())) {
            Some(n) => n,
            None => client::sha256_file(&local).ok()?,
        };
        if let Some(lf) = lock.and_then(|l| l.files.iter().find(|f| f.path == path)) {
            if lf.size != size || lf.sha256 != sha256 {
                return None;
            }
        }
        out.push(FetchedFile { repo_path: path, local_path: local, size, sha256 });
    }
    out.sort_by(|a, b| a.repo_path.cmp(&b.repo_path));
    Some(out)
}

/// The folder to list for a path or glob: everything before the first glob character's segment.
fn listing_dir(pattern: &str) -> &str {
    let pattern = pattern.trim_matches('/');
    // For an exact path (file or folder) list its parent recursively: that covers both cases.
    let head = match pattern.find(['*', '?', '[']) {
        Some(i) => &pattern[..i],
        None => pattern,
    };
    match head.rfind('/') {
        Some(i) => &head[..i],
        None => "",
    }
}

/// Whether repository path `p` is selected by `pattern` (empty = everything; exact file; folder
/// prefix; or a glob where `*` stays within one folder and `**` crosses folders).
pub fn path_matches(pattern: &str, p: &str) -> bool {
    let pattern = pattern.trim_matches('/');
    if pattern.is_empty() || pattern == p {
        return true;
    }
    if pattern.contains(['*', '?', '[']) {
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        return glob::Pattern::new(pattern).map(|g| g.matches_with(p, opts)).unwrap_or(false);
    }
    p.starts_with(pattern) && p.as_bytes().get(pattern.len()) == Some(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_prefixes() {
        assert!(path_matches("finetune/*.jsonl", "finetune/train.jsonl"));
        assert!(!path_matches("finetune/*.jsonl", "finetune/x/train.jsonl"));
        assert!(path_matches("**/*.parquet", "a/b/c.parquet"));
        assert!(path_matches("pretrain", "pretrain/fever.txt"));
        assert!(!path_matches("pre", "pretrain/fever.txt"));
        assert!(path_matches("", "x"));
        assert_eq!(listing_dir("a/b/*.txt"), "a/b");
        assert_eq!(listing_dir("*.txt"), "");
        assert_eq!(listing_dir("pretrain/fever.txt"), "pretrain");
        assert_eq!(listing_dir("pretrain"), "");
    }

    #[test]
    fn token_debug_is_redacted() {
        let o = HubOptions { token: Some(Token::new("hf_secret")), ..HubOptions::from_env() };
        assert!(!format!("{o:?}").contains("hf_secret"));
    }
}
