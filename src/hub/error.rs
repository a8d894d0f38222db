//! What can go wrong while fetching from or pushing to the Hub. Every message is one line that names the dataset
//! (its `hf://` URI), the URL involved and what the user can do about it. No variant ever carries
//! the access token.

use crate::fs_error::IoError;
use std::path::PathBuf;

/// A Hub fetch failure.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The repository does not exist (or is private and no token was sent).
    #[error("{dataset}: repository not found at {url}; check the owner/name in the recipe, or set HF_TOKEN if it is private")]
    RepoNotFound {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The URL that answered 404.
        url: String,
    },
    /// The branch, tag or commit does not exist in the repository.
    #[error("{dataset}: revision '{revision}' not found at {url}; check the @revision in the recipe (branch, tag or full commit id)")]
    RevisionNotFound {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The revision asked for.
        revision: String,
        /// The URL that answered 404.
        url: String,
    },
    /// A file (or every file of a glob) is missing at the resolved commit.
    #[error("{dataset}: no file '{path}' at commit {commit} ({url}); check the path or glob in the recipe against the repository's file list")]
    FileNotFound {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The path or glob inside the repository.
        path: String,
        /// The resolved commit.
        commit: String,
        /// The URL that was asked.
        url: String,
    },
    /// 401/403: the repository is gated or private.
    #[error("{dataset}: access denied (HTTP {status}) at {url}; the repository is gated or private: accept its conditions on the Hub page and set HF_TOKEN (or run `huggingface-cli login`){token_hint}")]
    Unauthorized {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// 401 or 403.
        status: u16,
        /// The URL that refused.
        url: String,
        /// Whether a token was sent (the token itself is never kept here).
        token_hint: &'static str,
    },
    /// The downloaded bytes do not match the size or hash the Hub announced, even after one retry.
    #[error("{dataset}: checksum mismatch for {url}: expected {expected}, got {actual}; the bad download was deleted, retry later or report the mirror (HF_ENDPOINT) if it persists")]
    ChecksumMismatch {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The download URL.
        url: String,
        /// What the Hub announced (`sha256:…`, `git-sha1:…` or `size:…`).
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The disk is full while writing into the cache.
    #[error("{dataset}: disk full while writing {path} (downloading {url}); free space there or point HF_HUB_CACHE/HF_HOME at a larger disk")]
    DiskFull {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The file being written.
        path: PathBuf,
        /// The download URL.
        url: String,
    },
    /// `HF_HUB_OFFLINE=1` and what is needed is not in the cache.
    #[error("{dataset}: HF_HUB_OFFLINE=1 and {what} is not in the cache {cache} (would fetch {url}); run once online (unset HF_HUB_OFFLINE) to download it")]
    OfflineNotCached {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// What is missing (a revision or a file).
        what: String,
        /// The cache directory searched.
        cache: PathBuf,
        /// What would have been fetched online.
        url: String,
    },
    /// The Hub's host name does not resolve: the machine is offline or `HF_ENDPOINT` is wrong.
    /// Not retried (a lookup that failed once fails the same way seconds later, and six attempts
    /// with backoff made an offline `mmrun plan` wait 15 s before saying so).
    #[error("{dataset}: cannot resolve the host of {url} ({reason}); this machine looks offline or HF_ENDPOINT is wrong: check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only what is cached")]
    HostNotFound {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The URL.
        url: String,
        /// The resolver's answer.
        reason: String,
    },
    /// A network failure or a retryable status that persisted through every retry.
    #[error("{dataset}: could not reach {url} after {attempts} attempts ({reason}); check the network or HF_ENDPOINT and retry")]
    Network {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The URL.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// Any other unexpected HTTP status or malformed answer.
    #[error(
        "{dataset}: unexpected answer from {url}: {reason}; check HF_ENDPOINT points at a Hugging Face Hub (or mirror)"
    )]
    Protocol {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// A name from the server or the lock file (commit, file path, blob id) that would leave the
    /// cache if used as a path. Nothing is written for it.
    #[error("{dataset}: refusing the {name} from {origin}: it could escape the Hub cache, so nothing was written for it; {fix}")]
    UnsafeName {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// What was refused and why (boxed: errors are rare and `HubError` stays small).
        name: Box<super::names::UnsafeName>,
        /// Where it came from (a URL, or the lock file).
        origin: String,
        /// What the user can do.
        fix: &'static str,
    },
    /// A model repository has only pickled weights: nothing was downloaded.
    #[error("{repo} has only pickled weights ({files}); mmrun reads safetensors only, because loading a pickle can run arbitrary code; convert once with `python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('<repo>').save_pretrained('<out>', safe_serialization=True)\"` and push or point at <out>")]
    PickledWeights {
        /// The `hf://` URI.
        repo: String,
        /// The pickled files found.
        files: String,
    },
    /// The `hf://` URI itself is malformed.
    #[error("dataset {dataset}: {reason}")]
    BadUri {
        /// The dataset name.
        dataset: String,
        /// The parser's message (it already says what is expected).
        reason: String,
    },
    /// `mmrun push` without a token: nothing was sent.
    #[error("{repo}: no Hugging Face token, so nothing was pushed; set HF_TOKEN to a token with write access to {repo} (https://huggingface.co/settings/tokens), or run `huggingface-cli login`")]
    NoToken {
        /// The `hf://` target.
        repo: String,
    },
    /// 401/403 on an upload endpoint: the token is missing, invalid or read-only.
    #[error("{repo}: the Hub refused the push (HTTP {status}) at {url}; set HF_TOKEN to a token with write access to {repo}{token_hint}")]
    PushDenied {
        /// The `hf://` target.
        repo: String,
        /// 401 or 403.
        status: u16,
        /// The URL that refused.
        url: String,
        /// What the status suggests about the token.
        token_hint: &'static str,
    },
    /// The push target is not `hf://<owner>/<name>[@<branch>]`: nothing was sent.
    #[error("push target '{target}': {reason}")]
    BadTarget {
        /// The target as written.
        target: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// The Hub answered an upload request with a permanent error.
    #[error("{repo}: the Hub refused the upload at {url}: HTTP {status}: {message}; fix that and rerun `mmrun push` (large files already uploaded are not sent again)")]
    PushRefused {
        /// The `hf://` target.
        repo: String,
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The Hub's `error` message (or the start of the body).
        message: String,
    },
    /// A file of the folder being pushed cannot be read.
    #[error("{repo}: cannot push: {source}")]
    PushRead {
        /// The `hf://` target.
        repo: String,
        /// What failed, on which local file.
        #[source]
        source: IoError,
    },
    /// A local file-system failure in the cache.
    #[error("{dataset}: cannot write the Hub cache: {source}; check permissions or set HF_HUB_CACHE")]
    Io {
        /// The `hf://` URI being fetched.
        dataset: String,
        /// What failed, where.
        #[source]
        source: IoError,
    },
}

impl HubError {
    /// Map an I/O error while writing `path` to [`HubError::DiskFull`] (ENOSPC / EDQUOT) or [`HubError::Io`].
    pub fn from_write(dataset: &str, url: &str, path: &std::path::Path, e: std::io::Error) -> Self {
        if crate::fs_error::is_disk_full(&e) {
            HubError::DiskFull { dataset: dataset.into(), path: path.into(), url: url.into() }
        } else {
            HubError::Io { dataset: dataset.into(), source: IoError::new("writing", path, e) }
        }
    }
}
