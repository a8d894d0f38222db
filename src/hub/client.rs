//! The HTTP side: revision lookup, tree listing, and verified, resumable, retried downloads into
//! the HF cache layout.
//!
//! Built on `ureq` 3 directly rather than the `hf-hub` crate. `hf-hub` 0.4's blocking API (over
//! `ureq` 2) resolves revisions, downloads into the same cache layout with a retry count, and reads
//! `HF_HOME`/`HF_ENDPOINT`/the token file; but it has no recursive tree listing with sizes and LFS
//! sha256s (needed for globs and locks), does not verify sha256 or git blob ids after a download, has
//! no `HF_HUB_OFFLINE` mode, no per-blob lock against concurrent processes, and would add `ureq` 2
//! beside our `ureq` 3 (its newer releases move to reqwest/tokio).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use super::cache::RepoCache;
use super::error::HubError;
use super::names;
use super::uri::{HubUri, RepoType};
use super::HubOptions;

/// One file of a repository at a commit, as the tree API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path inside the repository.
    pub path: String,
    /// Size in bytes (of the real content, also for LFS files).
    pub size: u64,
    /// Git blob id (sha1 of `blob <len>\0<content>`; for LFS files, of the pointer file).
    pub oid: String,
    /// sha256 of the content for LFS files.
    pub lfs_sha256: Option<String>,
}

impl RemoteFile {
    /// The blob file name `huggingface_hub` uses: the LFS sha256, else the git blob id.
    pub fn blob_name(&self) -> &str {
        self.lfs_sha256.as_deref().unwrap_or(&self.oid)
    }
}

/// What one failed attempt means for the retry loop.
pub(super) enum Attempt {
    /// Transient: try again after the backoff (or the server's `Retry-After`).
    Retry { reason: String, after: Option<Duration> },
    /// A download broke off after receiving more bytes: resume at once, without counting an attempt
    /// (every such retry makes progress, so the loop is still bounded by the file size).
    Progressed { reason: String },
    /// Permanent.
    Fatal(HubError),
}

/// A client bound to one `hf://` URI (for error messages) and one set of options.
pub struct Client<'a> {
    opts: &'a HubOptions,
    agent: ureq::Agent,
    /// The URI as text, used to name the dataset in every error.
    pub dataset: String,
    repo_type: RepoType,
    repo_id: String,
}

impl<'a> Client<'a> {
    /// A client for the repository of `uri`.
    pub fn new(uri: &HubUri, opts: &'a HubOptions) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Redirects are followed by hand: the first hop carries the X-Linked-* headers, and the
            // token must never follow a redirect to a CDN host.
            .max_redirects(0)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_recv_response(Some(opts.response_timeout))
            // A stalled body (no byte for this long) is a transient failure, resumed with Range.
            .timeout_per_read(Some(opts.response_timeout))
            .user_agent(format!("mmrun/{}", crate::VERSION))
            .build()
            .into();
        Self { opts, agent, dataset: uri.to_string(), repo_type: uri.repo_type, repo_id: uri.repo_id.clone() }
    }

    /// The HTTP agent (no automatic redirects, statuses are not errors).
    pub(super) fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    pub(super) fn endpoint(&self) -> &str {
        self.opts.endpoint.trim_end_matches('/')
    }

    /// `{endpoint}/api/{datasets|models}/{owner}/{name}/revision/{rev}`.
    pub fn revision_url(&self, revision: &str) -> String {
        format!(
            "{}/api/{}/{}/revision/{}",
            self.endpoint(),
            self.repo_type.api_segment(),
            self.repo_id,
            encode_segment(revision)
        )
    }

    /// `{endpoint}/api/{type}/{repo}/tree/{commit}/{dir}?recursive=true`.
    pub fn tree_url(&self, commit: &str, dir: &str) -> String {
        let dir = dir.trim_matches('/');
        let sep = if dir.is_empty() { "" } else { "/" };
        format!(
            "{}/api/{}/{}/tree/{}{sep}{}?recursive=true",
            self.endpoint(),
            self.repo_type.api_segment(),
            self.repo_id,
            encode_segment(commit),
            dir
        )
    }

    /// `{endpoint}/{datasets/}{repo}/resolve/{commit}/{path}`.
    pub fn resolve_url(&self, commit: &str, path: &str) -> String {
        let prefix = match self.repo_type {
            RepoType::Dataset => "datasets/",
            RepoType::Model => "",
        };
        format!("{}/{prefix}{}/resolve/{}/{}", self.endpoint(), self.repo_id, encode_segment(commit), path)
    }

    fn request(&self, url: &str, range_from: Option<u64>) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = self.agent.get(url);
        // The token goes only to the configured endpoint, never to a redirect target elsewhere.
        if let Some(tok) = &self.opts.token {
            if same_origin(url, self.endpoint()) {
                req = req.header("authorization", format!("Bearer {}", tok.expose()));
            }
        }
        if let Some(start) = range_from.filter(|s| *s > 0) {
            req = req.header("range", format!("bytes={start}-"));
        }
        req.call()
    }

    /// Run `f` until it succeeds, fails permanently, or the retries run out (bounded exponential
    /// backoff; `Retry-After` honoured up to `retry_after_max`).
    pub(super) fn with_retries<T>(&self, url: &str, mut f: impl FnMut() -> Result<T, Attempt>) -> Result<T, HubError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match f() {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Progressed { reason }) => {
                    tracing::warn!(dataset = %self.dataset, %url, %reason, "resuming");
                    attempt = 0;
                }
                Err(Attempt::Retry { reason, after }) => {
                    if attempt > self.opts.max_retries {
                        return Err(HubError::Network {
                            dataset: self.dataset.clone(),
                            url: url.to_string(),
                            attempts: attempt,
                            reason,
                        });
                    }
                    let backoff =
                        self.opts.backoff_base.saturating_mul(1 << (attempt - 1).min(16)).min(self.opts.backoff_max);
                    let wait = match after {
                        Some(a) => a.min(self.opts.retry_after_max),
                        None => backoff,
                    };
                    tracing::warn!(dataset = %self.dataset, %url, attempt, %reason, wait_ms = wait.as_millis() as u64, "retrying");
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// Map a non-success status to an [`Attempt`].
    fn classify(&self, url: &str, resp: &ureq::http::Response<ureq::Body>, what: NotFound<'_>) -> Attempt {
        let status = resp.status().as_u16();
        let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        match status {
            // The Hub answers 401 + RepoNotFound for a repository that does not exist or is private
            // and no (valid) token was sent, as huggingface_hub reports it.
            401 if header("x-error-code") == "RepoNotFound" => {
                Attempt::Fatal(HubError::RepoNotFound { dataset: self.dataset.clone(), url: url.to_string() })
            }
            401 | 403 => Attempt::Fatal(HubError::Unauthorized {
                dataset: self.dataset.clone(),
                status,
                url: url.to_string(),
                token_hint: if self.opts.token.is_some() {
                    " (a token was sent but does not grant access)"
                } else {
                    " (no token was found)"
                },
            }),
            404 => {
                let code = header("x-error-code");
                Attempt::Fatal(match (code.as_str(), what) {
                    ("RepoNotFound", _) => HubError::RepoNotFound { dataset: self.dataset.clone(), url: url.into() },
                    ("RevisionNotFound", _) | (_, NotFound::Revision(_)) => HubError::RevisionNotFound {
                        dataset: self.dataset.clone(),
                        revision: match what {
                            NotFound::Revision(r) => r.to_string(),
                            NotFound::File { commit, .. } => commit.to_string(),
                        },
                        url: url.into(),
                    },
                    (_, NotFound::File { path, commit }) => HubError::FileNotFound {
                        dataset: self.dataset.clone(),
                        path: path.into(),
                        commit: commit.into(),
                        url: url.into(),
                    },
                })
            }
            408 | 429 | 500..=599 => Attempt::Retry {
                reason: format!("HTTP {status}"),
                after: header("retry-after").trim().parse::<u64>().ok().map(Duration::from_secs),
            },
            _ => Attempt::Fatal(HubError::Protocol {
                dataset: self.dataset.clone(),
                url: url.into(),
                reason: format!("HTTP {status}"),
            }),
        }
    }

    pub(super) fn transport(&self, url: &str, e: ureq::Error) -> Attempt {
        if is_name_resolution_failure(&e) {
            return Attempt::Fatal(HubError::HostNotFound {
                dataset: self.dataset.clone(),
                url: url.to_string(),
                reason: e.to_string(),
            });
        }
        // Every other transport-level failure (refused, reset, timeout, truncated headers) is transient.
        Attempt::Retry { reason: e.to_string(), after: None }
    }

    fn get_json(&self, url: &str, what: NotFound<'_>) -> Result<(serde_json::Value, Option<String>), HubError> {
        self.with_retries(url, || {
            let mut resp = self.request(url, None).map_err(|e| self.transport(url, e))?;
            if !resp.status().is_success() {
                return Err(self.classify(url, &resp, what));
            }
            let next = resp.headers().get("link").and_then(|v| v.to_str().ok()).and_then(next_link);
            let text = resp
                .body_mut()
                .with_config()
                .limit(256 << 20)
                .read_to_string()
                .map_err(|e| Attempt::Retry { reason: format!("reading the answer: {e}"), after: None })?;
            let v = serde_json::from_str(&text).map_err(|e| {
                Attempt::Fatal(HubError::Protocol {
                    dataset: self.dataset.clone(),
                    url: url.into(),
                    reason: format!("invalid JSON: {e}"),
                })
            })?;
            Ok((v, next))
        })
    }

    /// Resolve a branch, tag or commit to the full commit id.
    /// The answer must be a 40-hex commit id: it becomes a folder name in the cache.
    pub fn resolve_revision(&self, revision: &str) -> Result<String, HubError> {
        let url = self.revision_url(revision);
        let (v, _) = self.get_json(&url, NotFound::Revision(revision))?;
        let sha = v.get("sha").and_then(|s| s.as_str()).ok_or_else(|| HubError::Protocol {
            dataset: self.dataset.clone(),
            url: url.clone(),
            reason: "no 'sha' field in the revision info".into(),
        })?;
        names::commit(sha).map_err(|name| self.unsafe_name(name, &url))?;
        Ok(sha.to_string())
    }

    /// [`HubError::UnsafeName`] for a name the server sent at `url`.
    fn unsafe_name(&self, name: names::UnsafeName, url: &str) -> HubError {
        HubError::UnsafeName {
            dataset: self.dataset.clone(),
            name: Box::new(name),
            origin: url.to_string(),
            fix: "the server at HF_ENDPOINT is not a well-behaved Hub; check HF_ENDPOINT and report the repository",
        }
    }

    /// Every file under `dir` at `commit` (following `Link: rel="next"` pagination). Every entry's
    /// path and ids are validated ([`names`]); one unsafe entry refuses the whole listing, since
    /// a server that sends it cannot be trusted for the rest either.
    pub fn list_files(&self, commit: &str, dir: &str) -> Result<Vec<RemoteFile>, HubError> {
        let mut url = self.tree_url(commit, dir);
        let mut out = Vec::new();
        loop {
            let (v, next) = self.get_json(&url, NotFound::File { path: dir, commit })?;
            let items = v.as_array().ok_or_else(|| HubError::Protocol {
                dataset: self.dataset.clone(),
                url: url.clone(),
                reason: "the tree listing is not a JSON array".into(),
            })?;
            for it in items {
                if it.get("type").and_then(|t| t.as_str()) != Some("file") {
                    continue;
                }
                let bad = |field: &str| HubError::Protocol {
                    dataset: self.dataset.clone(),
                    url: url.clone(),
                    reason: format!("tree entry without '{field}': {it}"),
                };
                let file = RemoteFile {
                    path: it.get("path").and_then(|p| p.as_str()).ok_or_else(|| bad("path"))?.to_string(),
                    size: it.get("size").and_then(|p| p.as_u64()).ok_or_else(|| bad("size"))?,
                    oid: it.get("oid").and_then(|p| p.as_str()).ok_or_else(|| bad("oid"))?.to_string(),
                    lfs_sha256: it.pointer("/lfs/oid").and_then(|p| p.as_str()).map(str::to_string),
                };
                names::repo_path(&file.path)
                    .and_then(|()| names::blob_name(&file.oid))
                    .and_then(|()| file.lfs_sha256.as_deref().map_or(Ok(()), names::sha256))
                    .map_err(|name| self.unsafe_name(name, &url))?;
                out.push(file);
            }
            match next {
                Some(n) => url = join_url(&url, &n),
                None => break,
            }
        }
        Ok(out)
    }

    /// Make `snapshots/<commit>/<file.path>` point at a complete, verified blob, downloading it if
    /// needed. Returns the snapshot path and the content's sha256.
    pub fn fetch_file(&self, rc: &RepoCache, commit: &str, file: &RemoteFile) -> Result<(PathBuf, String), HubError> {
        let name = file.blob_name().to_string();
        let url = self.resolve_url(commit, &file.path);
        let io = |p: &Path, e: std::io::Error| HubError::from_write(&self.dataset, &url, p, e);
        let blob = rc.blob(&name).map_err(|e| io(&rc.dir(), e))?;
        if !blob_ok(&blob, file.size) {
            let lock_path = rc.lock_file(&name).map_err(|e| io(&rc.dir(), e))?;
            std::fs::create_dir_all(lock_path.parent().expect("lock dir")).map_err(|e| io(&lock_path, e))?;
            std::fs::create_dir_all(blob.parent().expect("blobs dir")).map_err(|e| io(&blob, e))?;
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| io(&lock_path, e))?;
            // One downloader per blob across threads and processes; the others wait, then reuse it.
            lock.lock().map_err(|e| io(&lock_path, e))?;
            let res = if blob_ok(&blob, file.size) { Ok(()) } else { self.download_blob(rc, commit, file, &url) };
            let _ = lock.unlock();
            res?;
        }
        let sha = match &file.lfs_sha256 {
            Some(s) => s.clone(),
            None => sha256_file(&blob).map_err(|e| io(&blob, e))?,
        };
        let pointer = rc.link_snapshot(commit, &file.path, &name).map_err(|e| io(&rc.dir(), e))?;
        Ok((pointer, sha))
    }

    /// Download into `blobs/<name>.incomplete` (resuming), verify, and rename to `blobs/<name>`.
    /// A checksum mismatch deletes the partial file and starts over once, then fails.
    fn download_blob(&self, rc: &RepoCache, commit: &str, file: &RemoteFile, url: &str) -> Result<(), HubError> {
        let name = file.blob_name();
        tracing::info!(dataset = %self.dataset, path = %file.path, bytes = file.size, "downloading");
        let io = |e: std::io::Error| HubError::from_write(&self.dataset, url, &rc.dir(), e);
        let part = rc.incomplete(name).map_err(io)?;
        let blob = rc.blob(name).map_err(io)?;
        let mut second_try = false;
        loop {
            let res = self.download_to(&part, commit, file, url);
            if let Err(e) = res {
                if matches!(e, HubError::DiskFull { .. }) {
                    // Nothing half-written is kept when the disk is full.
                    let _ = std::fs::remove_file(&part);
                }
                return Err(e);
            }
            match verify(&part, file) {
                Ok(()) => break,
                Err(actual) => {
                    let _ = std::fs::remove_file(&part);
                    if second_try {
                        return Err(HubError::ChecksumMismatch {
                            dataset: self.dataset.clone(),
                            url: url.to_string(),
                            expected: expected_digest(file),
                            actual,
                        });
                    }
                    tracing::warn!(dataset = %self.dataset, %url, %actual, "checksum mismatch; downloading again");
                    second_try = true;
                }
            }
        }
        // fsync the verified content, then rename: a power cut never leaves a torn blob.
        crate::durable::publish_dir(&part, &blob).map_err(|e| HubError::from_write(&self.dataset, url, &blob, e))
    }

    /// Bring `part` to `file.size` bytes, resuming with `Range` after drops and retrying transient failures.
    fn download_to(&self, part: &Path, commit: &str, file: &RemoteFile, url: &str) -> Result<(), HubError> {
        let wio = |e: std::io::Error| Attempt::Fatal(HubError::from_write(&self.dataset, url, part, e));
        self.with_retries(url, || {
            let mut out = OpenOptions::new().create(true).append(true).read(true).open(part).map_err(wio)?;
            let mut have = out.metadata().map_err(wio)?.len();
            if have > file.size {
                out.set_len(0).map_err(wio)?;
                have = 0;
            }
            if have == file.size && file.size > 0 {
                return Ok(());
            }
            let mut resp = self.follow(url, commit, file, have)?;
            match resp.status().as_u16() {
                206 => {}
                200 => {
                    if have > 0 {
                        // The server ignored the Range: start over.
                        out.set_len(0).map_err(wio)?;
                        out.seek(std::io::SeekFrom::Start(0)).map_err(wio)?;
                    }
                }
                416 => {
                    out.set_len(0).map_err(wio)?;
                    return Err(Attempt::Retry { reason: "HTTP 416 (range not satisfiable)".into(), after: None });
                }
                _ => unreachable!("follow() returns only 2xx/416"),
            }
            let mut reader = resp.body_mut().as_reader();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = out.flush();
                        let reason = format!("connection dropped mid-body: {e}");
                        let now = out.metadata().map(|m| m.len()).unwrap_or(have);
                        return Err(if now > have {
                            Attempt::Progressed { reason }
                        } else {
                            Attempt::Retry { reason, after: None }
                        });
                    }
                };
                out.write_all(&buf[..n]).map_err(wio)?;
            }
            out.flush().map_err(wio)?;
            let got = out.metadata().map_err(wio)?.len();
            if got < file.size {
                return Err(Attempt::Retry {
                    reason: format!("body ended after {got} of {} bytes", file.size),
                    after: None,
                });
            }
            Ok(())
        })
    }

    /// GET `url` (with `Range` from `start`), following up to 5 redirects by hand. Checks the Hub's
    /// `X-Repo-Commit` / `X-Linked-Etag` / `X-Linked-Size` against the listing when present.
    fn follow(
        &self,
        url: &str,
        commit: &str,
        file: &RemoteFile,
        start: u64,
    ) -> Result<ureq::http::Response<ureq::Body>, Attempt> {
        let mut cur = url.to_string();
        for _ in 0..6 {
            let resp = self.request(&cur, Some(start)).map_err(|e| self.transport(url, e))?;
            let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            if let Some(c) = h("x-repo-commit") {
                if c != commit {
                    return Err(Attempt::Fatal(
                        self.protocol(url, format!("X-Repo-Commit {c} is not the requested commit {commit}")),
                    ));
                }
            }
            if let Some(etag) = h("x-linked-etag").or_else(|| if resp.status().is_success() { h("etag") } else { None })
            {
                let etag = normalize_etag(&etag);
                if cur == url && etag != file.blob_name() {
                    return Err(Attempt::Fatal(
                        self.protocol(url, format!("ETag {etag} differs from the listed blob {}", file.blob_name())),
                    ));
                }
            }
            if let Some(size) = h("x-linked-size").and_then(|s| s.parse::<u64>().ok()) {
                if size != file.size {
                    return Err(Attempt::Fatal(
                        self.protocol(url, format!("X-Linked-Size {size} differs from the listed size {}", file.size)),
                    ));
                }
            }
            let status = resp.status().as_u16();
            match status {
                200 | 206 | 416 => return Ok(resp),
                301 | 302 | 303 | 307 | 308 => {
                    let loc = h("location")
                        .ok_or_else(|| Attempt::Fatal(self.protocol(&cur, "redirect without Location".into())))?;
                    cur = join_url(&cur, &loc);
                }
                _ => return Err(self.classify(&cur, &resp, NotFound::File { path: &file.path, commit })),
            }
        }
        Err(Attempt::Fatal(self.protocol(url, "too many redirects".into())))
    }

    fn protocol(&self, url: &str, reason: String) -> HubError {
        HubError::Protocol { dataset: self.dataset.clone(), url: url.to_string(), reason }
    }
}

/// Which kind of 404 a request can produce.
#[derive(Clone, Copy)]
enum NotFound<'s> {
    Revision(&'s str),
    File { path: &'s str, commit: &'s str },
}

fn blob_ok(blob: &Path, size: u64) -> bool {
    std::fs::metadata(blob).map(|m| m.is_file() && m.len() == size).unwrap_or(false)
}

fn expected_digest(f: &RemoteFile) -> String {
    match &f.lfs_sha256 {
        Some(s) => format!("sha256:{s} ({} bytes)", f.size),
        None => format!("git-sha1:{} ({} bytes)", f.oid, f.size),
    }
}

/// Check size and hash; on mismatch return what was found.
fn verify(part: &Path, f: &RemoteFile) -> Result<(), String> {
    let size = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if size != f.size {
        return Err(format!("{size} bytes"));
    }
    match &f.lfs_sha256 {
        Some(want) => {
            let got = sha256_file(part).map_err(|e| e.to_string())?;
            if &got == want {
                Ok(())
            } else {
                Err(format!("sha256:{got}"))
            }
        }
        None => {
            let got = git_blob_sha1_file(part).map_err(|e| e.to_string())?;
            if got == f.oid {
                Ok(())
            } else {
                Err(format!("git-sha1:{got}"))
            }
        }
    }
}

/// Hex sha256 of a file.
pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut File::open(p)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Git's blob id: sha1 of `blob <len>\0<content>`.
pub fn git_blob_sha1_file(p: &Path) -> std::io::Result<String> {
    let len = std::fs::metadata(p)?.len();
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    std::io::copy(&mut File::open(p)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Git's blob id of bytes in memory.
pub fn git_blob_sha1(data: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex::encode(h.finalize())
}

/// Strip `W/` and quotes from an ETag.
pub fn normalize_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// Percent-encode `/` in a revision so `refs/convert/parquet` stays one path segment.
pub(super) fn encode_segment(s: &str) -> String {
    s.replace('/', "%2F")
}

/// Whether a transport error is a failed host-name lookup (getaddrinfo's "Name or service not
/// known", "Temporary failure in name resolution"), which retrying cannot fix in useful time.
fn is_name_resolution_failure(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::HostNotFound => true,
        // std reports every getaddrinfo failure with this prefix and no specific ErrorKind.
        ureq::Error::Io(io) => io.to_string().contains("failed to lookup address information"),
        _ => false,
    }
}

fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after..].find('/').map(|i| after + i).unwrap_or(url.len());
    &url[..end]
}

pub(super) fn same_origin(url: &str, endpoint: &str) -> bool {
    origin(url).eq_ignore_ascii_case(origin(endpoint))
}

/// Resolve a `Location` (absolute, or absolute-path, or relative) against the current URL.
fn join_url(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        loc.to_string()
    } else if loc.starts_with('/') {
        format!("{}{loc}", origin(base))
    } else {
        let path_end = base.find('?').unwrap_or(base.len());
        let dir = &base[..base[..path_end].rfind('/').map(|i| i + 1).unwrap_or(path_end)];
        format!("{dir}{loc}")
    }
}

/// The `rel="next"` target of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find(|p| p.contains("rel=\"next\"")).and_then(|p| {
        let s = p.find('<')? + 1;
        let e = p.find('>')?;
        Some(p[s..e].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_helpers() {
        assert_eq!(join_url("http://a:1/x/y?z", "/cdn/q"), "http://a:1/cdn/q");
        assert_eq!(join_url("http://a:1/x/y", "z"), "http://a:1/x/z");
        assert_eq!(join_url("http://a:1/x/y", "https://b/c"), "https://b/c");
        assert!(same_origin("http://127.0.0.1:5/a", "http://127.0.0.1:5"));
        assert!(!same_origin("http://cdn.example/a", "http://127.0.0.1:5"));
        assert_eq!(next_link("<http://h/api?cursor=2>; rel=\"next\"").as_deref(), Some("http://h/api?cursor=2"));
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        // `git hash-object` of "hello\n".
        assert_eq!(git_blob_sha1(b"hello\n"), "ce013625030ba8dba906f756967f9e9ca394464a");
    }
}
