//! Upload a folder to a Hub model repository as one commit, through the same HTTP API
//! `huggingface_hub`'s `upload_folder` uses (checked against its `hf_api.py`, `_commit_api.py` and
//! `lfs.py`):
//!
//! 1. `POST /api/repos/create` `{"name","organization","private"}`; 409 means it exists, which is fine.
//! 2. `POST /api/models/{repo}/preupload/{rev}` with each file's path, size, sha256 and first 512
//!    bytes (base64): the Hub answers `uploadMode` `lfs` or `regular` per file. Empty files are
//!    always regular.
//! 3. LFS files: `POST /{repo}.git/info/lfs/objects/batch` (`operation: upload`, `transfers:
//!    [basic]`, `hash_algo: sha256`, `ref.name`). An object the Hub already holds comes back without
//!    `actions` and is not sent again, so rerunning an interrupted push resumes it. The others are
//!    `PUT` to the `upload` href (a presigned URL: the token is never sent there), then the `verify`
//!    href gets `POST {"oid","size"}` with the token.
//!    When the `upload` action's `header` carries `chunk_size` and numbered part URLs, the object
//!    goes up in parts instead ([`Api::put_multipart`]): each slice is PUT to its part URL and the
//!    parts' ETags are POSTed to the action's `href`, which assembles it; then `verify` as above.
//! 4. `POST /api/models/{repo}/commit/{rev}`, `Content-Type: application/x-ndjson`: a `header` line
//!    (`summary`, `description`), then a `file` line (base64 content) per regular file and an
//!    `lfsFile` line (`path`, `algo: sha256`, `oid`, `size`) per LFS file. The answer carries
//!    `commitUrl` and `commitOid`.

use crate::fs_error::IoError;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::client::{encode_segment, same_origin, Attempt, Client};
use super::error::HubError;
use super::names;
use super::uri::{HubUri, RepoType};
use super::HubOptions;

/// At most this many files per preupload and LFS batch request, as `huggingface_hub` chunks them.
const CHUNK: usize = 256;

/// Where to push: a model repository and a branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushTarget {
    uri: HubUri,
}

impl PushTarget {
    /// Parse `hf://<owner>/<name>[@<branch>]`, refusing anything else (a dataset, a path inside
    /// the repository, a malformed owner, name or branch) before any request is made.
    pub fn parse(s: &str) -> Result<Self, HubError> {
        let bad = |reason: String| HubError::BadTarget { target: s.to_string(), reason };
        let uri = HubUri::parse(s.trim()).map_err(|e| bad(e.to_string()))?;
        if uri.repo_type != RepoType::Model || !uri.path.is_empty() {
            return Err(bad("push targets a whole model repository: write hf://<owner>/<name>[@<branch>]".into()));
        }
        // The Hub's own limit on a repository name.
        if uri.repo_id.split('/').nth(1).is_some_and(|n| n.len() > 96 || n.ends_with(".git")) {
            return Err(bad("the repository name must be at most 96 characters and not end in .git".into()));
        }
        Ok(Self { uri })
    }

    /// `owner/name`.
    pub fn repo_id(&self) -> &str {
        &self.uri.repo_id
    }

    /// The branch (`main` when none was given).
    pub fn revision(&self) -> &str {
        self.uri.revision_or_main()
    }
}

impl std::fmt::Display for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rev = self.uri.revision.as_ref().map(|r| format!("@{}", encode_segment(r))).unwrap_or_default();
        write!(f, "hf://{}{rev}", self.uri.repo_id)
    }
}

/// How to push.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// The commit summary.
    pub message: String,
    /// The commit description (may be empty).
    pub description: String,
    /// Create the repository private (an existing repository keeps its visibility).
    pub private: bool,
}

/// What [`push_folder`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The commit created.
    pub commit_oid: String,
    /// Its page on the Hub.
    pub commit_url: String,
    /// Files in the commit.
    pub files: usize,
    /// LFS objects sent in this call.
    pub uploaded: usize,
    /// LFS objects the Hub already had (not sent again).
    pub already_there: usize,
}

/// One file to push.
struct Local {
    path_in_repo: String,
    local: PathBuf,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
    lfs: bool,
}

/// Fail with [`HubError::NoToken`] unless a token is configured (call it before preparing the files).
pub fn require_token<'o>(target: &PushTarget, opts: &'o HubOptions) -> Result<&'o super::Token, HubError> {
    opts.token.as_ref().ok_or_else(|| HubError::NoToken { repo: target.to_string() })
}

/// Push every file under `dir` (dot files and folders excepted) to `target` as one commit.
pub fn push_folder(dir: &Path, target: &PushTarget, opts: &HubOptions, push: &PushOptions) -> Result<Pushed, HubError> {
    let token = require_token(target, opts)?;
    let repo = target.to_string();
    let mut files = Vec::new();
    collect(dir, dir, &repo, &mut files)?;
    files.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));
    let api = Api { client: Client::new(&target.uri, opts), token, repo, target };

    api.create_repo(push.private)?;
    api.preupload(&mut files)?;
    let lfs: Vec<&Local> = files.iter().filter(|f| f.lfs).collect();
    let mut uploaded = 0;
    for chunk in lfs.chunks(CHUNK) {
        uploaded += api.upload_lfs(chunk)?;
    }
    let (commit_oid, commit_url) = api.commit(&files, push)?;
    Ok(Pushed { commit_oid, commit_url, files: files.len(), uploaded, already_there: lfs.len() - uploaded })
}

/// Every regular file under `dir`, with its repository path checked by [`names::repo_path`].
fn collect(root: &Path, dir: &Path, repo: &str, out: &mut Vec<Local>) -> Result<(), HubError> {
    let read_err =
        |path: &Path, e| HubError::PushRead { repo: repo.to_string(), source: IoError::new("reading", path, e) };
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).and_then(|rd| rd.collect::<Result<_, _>>()).map_err(|e| read_err(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|err| read_err(&path, err))?;
        if meta.is_dir() {
            collect(root, &path, repo, out)?;
            continue;
        }
        let rel = path.strip_prefix(root).expect("under root");
        let path_in_repo = rel
            .iter()
            .map(|c| c.to_str())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join("/"))
            .ok_or_else(|| read_err(&path, std::io::Error::other("the file name is not UTF-8")))?;
        names::repo_path(&path_in_repo).map_err(|n| read_err(&path, n.into()))?;
        let (sha256, sample) = hash_and_sample(&path).map_err(|err| read_err(&path, err))?;
        out.push(Local { path_in_repo, local: path, size: meta.len(), sha256, sample, lfs: false });
    }
    Ok(())
}

fn hash_and_sample(p: &Path) -> std::io::Result<(String, Vec<u8>)> {
    let mut f = File::open(p)?;
    let mut h = sha2::Sha256::new();
    let mut sample = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if sample.len() < 512 {
            let take = (512 - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), sample))
}

/// One part of a multipart upload: where its bytes go and which bytes they are.
#[derive(Debug, PartialEq, Eq)]
struct Part {
    url: String,
    offset: u64,
    len: u64,
}

/// The parts an upload action's `header` asks for: `chunk_size` (a decimal string, or a number)
/// and the URLs under the numeric keys, which must be exactly `1..=ceil(size / chunk_size)`.
fn multipart_plan(header: &serde_json::Value, size: u64) -> Result<Vec<Part>, String> {
    let chunk = match &header["chunk_size"] {
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        v => v.as_u64(),
    }
    .filter(|&c| c > 0)
    .ok_or_else(|| format!("chunk_size {} is not a positive integer", header["chunk_size"]))?;
    let mut urls = BTreeMap::new();
    for (k, v) in header.as_object().into_iter().flatten() {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let n: u64 = k.parse().map_err(|_| format!("part number {k} is out of range"))?;
        let url = v.as_str().ok_or_else(|| format!("part {k} has no URL"))?;
        urls.insert(n, url.to_string());
    }
    let count = size.div_ceil(chunk);
    if urls.len() as u64 != count || urls.keys().copied().ne(1..=count) {
        return Err(format!(
            "{} part URL(s) for {size} bytes in chunks of {chunk}; expected parts 1 to {count}",
            urls.len()
        ));
    }
    Ok(urls
        .into_iter()
        .map(|(n, url)| {
            let offset = (n - 1) * chunk;
            Part { url, offset, len: chunk.min(size - offset) }
        })
        .collect())
}

fn b64(data: &[u8]) -> String {
    super::base64::encode(data)
}

/// The requests of one push.
struct Api<'a> {
    client: Client<'a>,
    token: &'a super::Token,
    /// The target as text, for errors.
    repo: String,
    target: &'a PushTarget,
}

impl Api<'_> {
    fn url(&self, action: &str) -> String {
        format!(
            "{}/api/models/{}/{action}/{}",
            self.client.endpoint(),
            self.target.repo_id(),
            encode_segment(self.target.revision())
        )
    }

    fn protocol(&self, url: &str, reason: String) -> HubError {
        HubError::Protocol { dataset: self.repo.clone(), url: url.to_string(), reason }
    }

    /// POST `body` to `url` (with the token when `url` is on the endpoint), retrying transient
    /// failures; returns the status and the body of every answer `ok` accepts.
    fn post(
        &self,
        url: &str,
        content_type: &str,
        body: &[u8],
        ok: impl Fn(u16) -> bool,
    ) -> Result<(u16, serde_json::Value), HubError> {
        self.client.with_retries(url, || {
            let mut req = self
                .client
                .agent()
                .post(url)
                .header("content-type", content_type)
                .header("accept", "application/json, application/vnd.git-lfs+json");
            if same_origin(url, self.client.endpoint()) {
                req = req.header("authorization", format!("Bearer {}", self.token.expose()));
            }
            let mut resp = req.send(body).map_err(|e| self.client.transport(url, e))?;
            let status = resp.status().as_u16();
            let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
            if resp.status().is_success() || ok(status) {
                let v = if text.trim().is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_str(&text).map_err(|e| {
                        Attempt::Fatal(self.protocol(url, format!("HTTP {status} with invalid JSON: {e}")))
                    })?
                };
                return Ok((status, v));
            }
            Err(self.failure(url, status, &resp, &text))
        })
    }

    /// Map a failed answer to an [`Attempt`]: 401/403 name the token, 404 the repository or
    /// branch, 408/429/5xx are retried, anything else quotes the Hub's message.
    fn failure(&self, url: &str, status: u16, resp: &ureq::http::Response<ureq::Body>, text: &str) -> Attempt {
        let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let message = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect());
        match status {
            401 | 403 => Attempt::Fatal(HubError::PushDenied {
                repo: self.repo.clone(),
                status,
                url: url.to_string(),
                token_hint: if status == 401 {
                    " (the token in HF_TOKEN was not accepted: it is invalid or expired)"
                } else {
                    " (the token is valid but may not write there: give it write access, or push to your own namespace)"
                },
            }),
            404 if header("x-error-code") == "RevisionNotFound" => Attempt::Fatal(HubError::RevisionNotFound {
                dataset: self.repo.clone(),
                revision: self.target.revision().to_string(),
                url: url.to_string(),
            }),
            404 => Attempt::Fatal(HubError::RepoNotFound { dataset: self.repo.clone(), url: url.to_string() }),
            408 | 429 | 500..=599 => Attempt::Retry {
                reason: format!("HTTP {status}"),
                after: header("retry-after").trim().parse::<u64>().ok().map(std::time::Duration::from_secs),
            },
            _ => {
                Attempt::Fatal(HubError::PushRefused { repo: self.repo.clone(), url: url.to_string(), status, message })
            }
        }
    }

    fn create_repo(&self, private: bool) -> Result<(), HubError> {
        let url = format!("{}/api/repos/create", self.client.endpoint());
        let (owner, name) = self.target.repo_id().split_once('/').expect("owner/name");
        let body = serde_json::json!({ "name": name, "organization": owner, "private": private });
        // 409: the repository exists already, which is what we want.
        self.post(&url, "application/json", body.to_string().as_bytes(), |s| s == 409)?;
        Ok(())
    }

    /// Ask the Hub which files go through LFS.
    fn preupload(&self, files: &mut [Local]) -> Result<(), HubError> {
        let url = self.url("preupload");
        for chunk in files.chunks_mut(CHUNK) {
            let payload = serde_json::json!({ "files": chunk.iter().map(|f| serde_json::json!({
                "path": f.path_in_repo, "sample": b64(&f.sample), "size": f.size, "sha": f.sha256,
            })).collect::<Vec<_>>() });
            let (_, v) = self.post(&url, "application/json", payload.to_string().as_bytes(), |_| false)?;
            let modes = v["files"].as_array().ok_or_else(|| self.protocol(&url, "no 'files' list".into()))?;
            for f in chunk.iter_mut() {
                let mode = modes
                    .iter()
                    .find(|m| m["path"] == f.path_in_repo.as_str())
                    .and_then(|m| m["uploadMode"].as_str())
                    .ok_or_else(|| self.protocol(&url, format!("no upload mode for {}", f.path_in_repo)))?;
                // Empty files cannot go to LFS storage (S3 refuses them); the Hub takes them as regular.
                f.lfs = match mode {
                    "lfs" => f.size > 0,
                    "regular" => false,
                    m => return Err(self.protocol(&url, format!("unknown upload mode '{m}' for {}", f.path_in_repo))),
                };
            }
        }
        Ok(())
    }

    /// Upload the LFS objects the Hub does not have yet; returns how many were sent.
    fn upload_lfs(&self, files: &[&Local]) -> Result<usize, HubError> {
        let url = format!("{}/{}.git/info/lfs/objects/batch", self.client.endpoint(), self.target.repo_id());
        let payload = serde_json::json!({
            "operation": "upload",
            "transfers": ["basic"],
            "objects": files.iter().map(|f| serde_json::json!({ "oid": f.sha256, "size": f.size })).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": { "name": self.target.revision() },
        });
        let (_, v) = self.post(&url, "application/vnd.git-lfs+json", payload.to_string().as_bytes(), |_| false)?;
        let objects = v["objects"].as_array().ok_or_else(|| self.protocol(&url, "no 'objects' list".into()))?;
        let mut sent = 0;
        for f in files {
            let o = objects
                .iter()
                .find(|o| o["oid"] == f.sha256.as_str())
                .ok_or_else(|| self.protocol(&url, format!("no answer for {} (oid {})", f.path_in_repo, f.sha256)))?;
            if let Some(err) = o.get("error") {
                return Err(self.protocol(&url, format!("LFS refused {}: {err}", f.path_in_repo)));
            }
            let Some(actions) = o.get("actions").filter(|a| !a.is_null()) else {
                tracing::info!(path = %f.path_in_repo, "already on the Hub; not uploading it again");
                continue;
            };
            let upload = &actions["upload"];
            let href =
                upload["href"].as_str().ok_or_else(|| self.protocol(&url, "upload action without href".into()))?;
            tracing::info!(path = %f.path_in_repo, bytes = f.size, "uploading");
            if upload["header"].get("chunk_size").is_some() {
                self.put_multipart(href, &upload["header"], f)?;
            } else {
                self.put(href, &upload["header"], f)?;
            }
            if let Some(href) = actions["verify"]["href"].as_str() {
                let body = serde_json::json!({ "oid": f.sha256, "size": f.size });
                self.post(href, "application/vnd.git-lfs+json", body.to_string().as_bytes(), |_| false)?;
            }
            sent += 1;
        }
        Ok(sent)
    }

    /// PUT the file to a presigned URL with the action's headers (never the Hub token).
    fn put(&self, href: &str, headers: &serde_json::Value, f: &Local) -> Result<(), HubError> {
        self.client.with_retries(href, || {
            let file = File::open(&f.local).map_err(|source| {
                Attempt::Fatal(HubError::PushRead {
                    repo: self.repo.clone(),
                    source: IoError::new("opening", &f.local, source),
                })
            })?;
            let mut req = self.client.agent().put(href);
            for (k, v) in headers.as_object().into_iter().flatten() {
                if let Some(v) = v.as_str() {
                    req = req.header(k.as_str(), v);
                }
            }
            // `&File` sends a Content-Length, as S3 requires.
            let mut resp = req.send(&file).map_err(|e| self.client.transport(href, e))?;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                return Ok(());
            }
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            Err(self.failure(href, status, &resp, &text))
        })
    }

    /// The Hub's multipart transfer for large objects (`huggingface_hub`'s `lfs.py`,
    /// `_upload_multi_part`): the upload action's `header` holds `chunk_size` and one presigned
    /// URL per part, keyed by its number (`"00001"`, …). Each `chunk_size` slice of the file (the
    /// last one shorter) is PUT to its URL without the token, and the `ETag`s the storage answers
    /// are POSTed to the action's `href` as `{"oid", "parts": [{"partNumber", "etag"}]}`, which
    /// assembles the object. A failed part is retried alone.
    fn put_multipart(&self, completion: &str, header: &serde_json::Value, f: &Local) -> Result<(), HubError> {
        let parts = multipart_plan(header, f.size)
            .map_err(|reason| self.protocol(completion, format!("multipart upload of {}: {reason}", f.path_in_repo)))?;
        let mut etags = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            tracing::debug!(path = %f.path_in_repo, part = i + 1, of = parts.len(), "uploading part");
            let etag = self.put_part(part, f)?;
            etags.push(serde_json::json!({ "partNumber": i + 1, "etag": etag }));
        }
        let body = serde_json::json!({ "oid": f.sha256, "parts": etags });
        self.post(completion, "application/vnd.git-lfs+json", body.to_string().as_bytes(), |_| false)?;
        Ok(())
    }

    /// PUT one slice of the file to its presigned URL; returns the `ETag` the storage answered.
    fn put_part(&self, part: &Part, f: &Local) -> Result<String, HubError> {
        let url = part.url.as_str();
        self.client.with_retries(url, || {
            let read_err = |doing: &'static str| {
                move |e| {
                    Attempt::Fatal(HubError::PushRead {
                        repo: self.repo.clone(),
                        source: IoError::new(doing, &f.local, e),
                    })
                }
            };
            let mut file = File::open(&f.local).map_err(read_err("opening"))?;
            file.seek(SeekFrom::Start(part.offset)).map_err(read_err("reading"))?;
            let mut slice = file.take(part.len);
            // An explicit Content-Length makes ureq send the reader length-delimited (S3 refuses
            // chunked uploads), without holding the part in memory.
            let mut resp = self
                .client
                .agent()
                .put(url)
                .header("content-length", part.len.to_string())
                .send(ureq::SendBody::from_reader(&mut slice))
                .map_err(|e| self.client.transport(url, e))?;
            let status = resp.status().as_u16();
            if !resp.status().is_success() {
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                return Err(self.failure(url, status, &resp, &text));
            }
            match resp.headers().get("etag").and_then(|v| v.to_str().ok()).filter(|e| !e.is_empty()) {
                Some(etag) => Ok(etag.to_string()),
                None => Err(Attempt::Fatal(self.protocol(url, format!("no ETag for a part of {}", f.path_in_repo)))),
            }
        })
    }

    /// Create the commit; returns its oid and URL.
    fn commit(&self, files: &[Local], push: &PushOptions) -> Result<(String, String), HubError> {
        let url = self.url("commit");
        let mut body = serde_json::json!({ "key": "header", "value": { "summary": push.message, "description": push.description } }).to_string();
        body.push('\n');
        for f in files {
            let line = if f.lfs {
                serde_json::json!({ "key": "lfsFile", "value": { "path": f.path_in_repo, "algo": "sha256", "oid": f.sha256, "size": f.size } })
            } else {
                let data = std::fs::read(&f.local).map_err(|e| HubError::PushRead {
                    repo: self.repo.clone(),
                    source: IoError::new("reading", &f.local, e),
                })?;
                serde_json::json!({ "key": "file", "value": { "content": b64(&data), "path": f.path_in_repo, "encoding": "base64" } })
            };
            body.push_str(&line.to_string());
            body.push('\n');
        }
        let (_, v) = self.post(&url, "application/x-ndjson", body.as_bytes(), |_| false)?;
        let oid = v["commitOid"].as_str().ok_or_else(|| self.protocol(&url, "no 'commitOid' in the answer".into()))?;
        let commit_url = v["commitUrl"].as_str().unwrap_or_default();
        Ok((oid.to_string(), commit_url.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_plan_slices_the_file_by_the_numbered_part_urls() {
        let header = serde_json::json!({ "chunk_size": "4", "00002": "u2", "00001": "u1", "00003": "u3" });
        let plan = multipart_plan(&header, 10).unwrap();
        let got: Vec<(&str, u64, u64)> = plan.iter().map(|p| (p.url.as_str(), p.offset, p.len)).collect();
        assert_eq!(got, [("u1", 0, 4), ("u2", 4, 4), ("u3", 8, 2)]);
        // A number works as well as a string.
        assert_eq!(multipart_plan(&serde_json::json!({ "chunk_size": 5, "1": "a", "2": "b" }), 10).unwrap().len(), 2);
        for (bad, why) in [
            (serde_json::json!({ "chunk_size": "4", "00001": "u1" }), "expected parts 1 to 3"),
            (
                serde_json::json!({ "chunk_size": "4", "00001": "a", "00002": "b", "00004": "c" }),
                "expected parts 1 to 3",
            ),
            (serde_json::json!({ "chunk_size": "0", "00001": "u1" }), "not a positive integer"),
            (serde_json::json!({ "chunk_size": "x" }), "not a positive integer"),
            (serde_json::json!({ "chunk_size": "8", "00001": 7, "00002": "b" }), "part 00001 has no URL"),
        ] {
            let e = multipart_plan(&bad, 10).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn targets_are_whole_model_repositories() {
        let t = PushTarget::parse("hf://me/tiny@dev").unwrap();
        assert_eq!((t.repo_id(), t.revision(), t.to_string().as_str()), ("me/tiny", "dev", "hf://me/tiny@dev"));
        assert_eq!(PushTarget::parse("hf://me/tiny").unwrap().revision(), "main");
        for bad in [
            "hf://datasets/me/x",
            "hf://me/x/config.json",
            "hf://me",
            "me/x",
            "hf://bad name/x",
            "hf://me/x@..",
            "hf://me/x.git",
        ] {
            assert!(PushTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
