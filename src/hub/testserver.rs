//! A local stand-in for the Hugging Face Hub, for tests only (every area's integration tests may use
//! it: `mmrun::hub::testserver::TestHub`). It listens on `127.0.0.1:0` and implements what mmrun
//! uses: revision info, recursive tree listing, `resolve` (302 to a CDN-style `/cdn/<sha256>` path for
//! LFS files, 200 with a git-blob ETag for small files), `X-Repo-Commit` / `X-Linked-Etag` /
//! `X-Linked-Size`, and `Range`. Faults can be switched on: a dropped connection mid-body, 5xx (also
//! on multipart parts), 429 with `Retry-After`, wrong bytes, slow answers, private or gated repos (401
//! without the token, 403 with another), moving a branch, and hostile names (a commit id or tree
//! entries that try to leave the cache).
//!
//! It also accepts uploads the way the Hub does ([`super::push`] speaks to it): `POST /api/repos/create`
//! (409 when the repository exists), `preupload` (which files go to LFS), the LFS batch API
//! (`<repo>.git/info/lfs/objects/batch`; objects it already holds get no actions), `PUT` of an object
//! to a CDN-style presigned URL on the second address (which, like S3, refuses an `Authorization`
//! header and a body whose sha256 is not the oid), `verify`, and the NDJSON `commit` endpoint. What is
//! committed is served back by the read endpoints above, byte for byte. Objects above the threshold
//! set by [`TestHub::set_multipart`] are asked for in parts, as the Hub does for large files: the
//! upload action's `header` holds `chunk_size` and a presigned URL per part (`PUT /lfs-part/<oid>/<n>`,
//! which answers an `ETag`), and its `href` (`POST /api/complete_multipart?oid=…`) checks the parts'
//! ETags and the assembled object's sha256 before storing it.
//!
//! It is a small hand-written HTTP/1.1 server over `std::net` rather than `tiny_http`, because the
//! faults need byte-level control (closing the socket halfway through a declared body) and because
//! a library module cannot use a dev-dependency.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;

use super::client::git_blob_sha1;
use super::uri::RepoType;

/// A file stored in a test repository.
#[derive(Clone, Debug)]
pub struct TestFile {
    /// Content.
    pub data: Arc<Vec<u8>>,
    /// Stored through LFS (served by redirect, verified by sha256) or as a plain git blob.
    pub lfs: bool,
}

impl TestFile {
    fn sha256(&self) -> String {
        hex::encode(sha2::Sha256::digest(&self.data[..]))
    }
    fn oid(&self) -> String {
        if self.lfs {
            git_blob_sha1(self.pointer().as_bytes())
        } else {
            git_blob_sha1(&self.data)
        }
    }
    fn pointer(&self) -> String {
        format!("version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n", self.sha256(), self.data.len())
    }
}

#[derive(Default, Debug)]
struct Repo {
    branches: BTreeMap<String, String>,
    commits: HashMap<String, BTreeMap<String, TestFile>>,
    token: Option<String>,
}

/// The `.gitattributes` a new repository starts with (the Hub creates one in the first commit).
const GITATTRIBUTES: &str = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n";

/// Switchable faults. Counters are consumed one per matching response.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// The next N file bodies are cut halfway and the connection is closed.
    pub drop_mid_body: u32,
    /// The next N requests (any endpoint) answer 500.
    pub http_500: u32,
    /// The next N requests answer 429 with this `Retry-After` (seconds).
    pub http_429: u32,
    /// `Retry-After` value for 429s.
    pub retry_after_s: u64,
    /// The next N file bodies have a byte flipped (same length; checksum failure).
    pub corrupt: u32,
    /// The next N requests wait this long before answering.
    pub slow: u32,
    /// Delay for `slow`.
    pub slow_ms: u64,
    /// A hostile server: the revision endpoint answers this `sha` instead of the real commit.
    pub revision_sha: Option<String>,
    /// A hostile server: these raw entries are added to every tree listing.
    pub extra_tree_entries: Vec<serde_json::Value>,
    /// The next N `commit` requests answer 422 (an interrupted push: objects uploaded, no commit).
    pub reject_commit: u32,
    /// The next N multipart part uploads answer 500 after reading the body (flaky storage).
    pub fail_parts: u32,
}

/// One request the server saw (for assertions).
#[derive(Clone, Debug)]
pub struct Seen {
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// When it arrived.
    pub at: Instant,
    /// Status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    repos: HashMap<(RepoType, String), Repo>,
    faults: Faults,
    seen: Vec<Seen>,
    commit_counter: u64,
    cdn_origin: Option<String>,
    /// `http://<main address>`, for URLs in answers.
    origin: String,
    /// LFS objects uploaded (sha256 → content), shared by all repositories.
    lfs_objects: HashMap<String, Arc<Vec<u8>>>,
    /// The token write endpoints accept (`None`: any Bearer token).
    write_token: Option<String>,
    /// `(threshold, chunk_size)`: objects larger than `threshold` bytes go up in parts.
    multipart: Option<(u64, u64)>,
    /// Parts of multipart uploads not completed yet: oid → part number → content.
    parts: HashMap<String, BTreeMap<u64, Vec<u8>>>,
}

/// A running test Hub. Dropping it stops accepting connections.
pub struct TestHub {
    addr: std::net::SocketAddr,
    cdn_addr: Option<std::net::SocketAddr>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl TestHub {
    /// Start on `127.0.0.1:<free port>`.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State { origin: format!("http://{addr}"), ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        // The "CDN" is another loopback address, so redirects leave the endpoint's origin as on the
        // real Hub (and the token must not follow them). Falls back to the same origin.
        let cdn = TcpListener::bind("127.0.0.2:0").ok();
        state.lock().unwrap().cdn_origin =
            cdn.as_ref().and_then(|l| l.local_addr().ok()).map(|a| format!("http://{a}"));
        let cdn_addr = cdn.as_ref().and_then(|l| l.local_addr().ok());
        for l in std::iter::once(listener).chain(cdn) {
            let (st, sp) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    if sp.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, &st);
                    });
                }
            });
        }
        Self { addr, cdn_addr, state, stop }
    }

    /// The endpoint to put in `HF_ENDPOINT` (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Add a commit on `branch` of a repository (created if new) holding the branch's previous
    /// files overlaid with `files` (`(path, content, lfs)`); moves the branch. Returns the commit id.
    pub fn commit(
        &self,
        repo_type: RepoType,
        repo_id: &str,
        branch: &str,
        files: Vec<(String, Vec<u8>, bool)>,
    ) -> String {
        let files = files.into_iter().map(|(p, data, lfs)| (p, TestFile { data: Arc::new(data), lfs })).collect();
        commit_files(&mut self.state.lock().unwrap(), repo_type, repo_id, branch, files)
    }

    /// Require this token (`Authorization: Bearer <token>`) on the upload endpoints; anything else
    /// gets 401. Without it, any Bearer token may write.
    pub fn set_write_token(&self, token: &str) {
        self.state.lock().unwrap().write_token = Some(token.to_string());
    }

    /// Ask for LFS objects larger than `threshold` bytes in parts of `chunk_size` bytes (the Hub's
    /// multipart transfer) instead of one `PUT`.
    pub fn set_multipart(&self, threshold: u64, chunk_size: u64) {
        assert!(chunk_size > 0, "chunk_size must be positive");
        self.state.lock().unwrap().multipart = Some((threshold, chunk_size));
    }

    /// The files on `branch` of a repository (path → content), if both exist.
    pub fn files(&self, repo_type: RepoType, repo_id: &str, branch: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let st = self.state.lock().unwrap();
        let repo = st.repos.get(&(repo_type, repo_id.to_string()))?;
        let tree = repo.commits.get(repo.branches.get(branch)?)?;
        Some(tree.iter().map(|(p, f)| (p.clone(), f.data.to_vec())).collect())
    }

    /// Make a repository private or gated: requests without a token get 401, with another token 403.
    pub fn set_token(&self, repo_type: RepoType, repo_id: &str, token: &str) {
        let mut st = self.state.lock().unwrap();
        st.repos.entry((repo_type, repo_id.to_string())).or_default().token = Some(token.to_string());
    }

    /// Replace the fault switches.
    pub fn set_faults(&self, f: Faults) {
        self.state.lock().unwrap().faults = f;
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Forget the request log.
    pub fn clear_seen(&self) {
        self.state.lock().unwrap().seen.clear();
    }

    /// Serve `shared/data/medicalgpt` as the dataset `shibing624/medical` with that repository's
    /// real layout and record formats (see `docs/hub.md`): `pretrain/medical_book_zh.json` (JSONL
    /// `{"text"}` built from `pretrain/fever.txt`, one record per non-empty line),
    /// `finetune/valid_zh_0.json` (JSONL `{"instruction","input","output"}` from the first exchange
    /// of each `sft/medical_sft_1K_format.jsonl` dialogue), `reward/test.json` (byte-identical copy
    /// of `medicalgpt_history/reward/test.json`) and a small non-LFS `README.md`. Returns the commit.
    pub fn add_medical_repo(&self, shared: &Path) -> std::io::Result<String> {
        let fever = std::fs::read_to_string(shared.join("medicalgpt/pretrain/fever.txt"))?;
        let mut pretrain = String::new();
        for line in fever.lines().map(str::trim).filter(|l| !l.is_empty()) {
            pretrain.push_str(&serde_json::json!({ "text": line }).to_string());
            pretrain.push('\n');
        }
        let sft = std::fs::read_to_string(shared.join("medicalgpt/sft/medical_sft_1K_format.jsonl"))?;
        let mut finetune = String::new();
        for line in sft.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let turns = v.get("conversations").and_then(|c| c.as_array()).cloned().unwrap_or_default();
            let val = |role: &str| {
                turns
                    .iter()
                    .find(|t| t.get("from").and_then(|f| f.as_str()) == Some(role))
                    .and_then(|t| t.get("value").and_then(|s| s.as_str()))
                    .map(str::to_string)
            };
            if let (Some(q), Some(a)) = (val("human"), val("gpt")) {
                finetune.push_str(&serde_json::json!({ "instruction": q, "input": "", "output": a }).to_string());
                finetune.push('\n');
            }
        }
        let reward = std::fs::read(shared.join("medicalgpt_history/reward/test.json"))?;
        Ok(self.commit(
            RepoType::Dataset,
            "shibing624/medical",
            "main",
            vec![
                ("README.md".into(), b"---\nlicense: apache-2.0\n---\n# medical (local test copy)\n".to_vec(), false),
                ("pretrain/medical_book_zh.json".into(), pretrain.into_bytes(), true),
                ("finetune/valid_zh_0.json".into(), finetune.into_bytes(), true),
                ("reward/test.json".into(), reward, true),
            ],
        ))
    }
}

/// Add a commit on `branch` (the repository is created if new) holding the branch's previous files
/// overlaid with `files`; moves the branch. Returns the commit id.
fn commit_files(
    st: &mut State,
    repo_type: RepoType,
    repo_id: &str,
    branch: &str,
    files: Vec<(String, TestFile)>,
) -> String {
    st.commit_counter += 1;
    let counter = st.commit_counter;
    let repo = st.repos.entry((repo_type, repo_id.to_string())).or_default();
    let mut tree = repo.branches.get(branch).and_then(|c| repo.commits.get(c)).cloned().unwrap_or_default();
    tree.extend(files);
    let mut h = sha1::Sha1::new();
    h.update(format!("{repo_id}\0{branch}\0{counter}").as_bytes());
    for (p, f) in &tree {
        h.update(p.as_bytes());
        h.update(f.oid().as_bytes());
    }
    let commit = hex::encode(h.finalize());
    repo.commits.insert(commit.clone(), tree);
    repo.branches.insert(branch.to_string(), commit.clone());
    commit
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        for a in std::iter::once(self.addr).chain(self.cdn_addr) {
            let _ = TcpStream::connect_timeout(&a, Duration::from_millis(200));
        }
    }
}

struct Req {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_req(stream: &TcpStream) -> std::io::Result<Req> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 || l == "\r\n" || l == "\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers.get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Req { method, target, headers, body })
}

/// A response to write: status, headers, body, and how to mangle the body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
    range: Option<(usize, usize)>,
    /// Cut the body halfway and close.
    drop_mid: bool,
}

impl Resp {
    fn json(status: u16, v: serde_json::Value) -> Self {
        Resp {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Arc::new(v.to_string().into_bytes()),
            range: None,
            drop_mid: false,
        }
    }
    fn error(status: u16, code: &str, msg: &str) -> Self {
        let mut r = Resp::json(status, serde_json::json!({ "error": msg }));
        if !code.is_empty() {
            r.headers.push(("X-Error-Code".into(), code.into()));
        }
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

fn handle(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = read_req(&stream)?;
    let at = Instant::now();
    let (resp, delay) = {
        let mut st = state.lock().unwrap();
        let delay = if st.faults.slow > 0 {
            st.faults.slow -= 1;
            Some(Duration::from_millis(st.faults.slow_ms))
        } else {
            None
        };
        let resp = if st.faults.http_500 > 0 {
            st.faults.http_500 -= 1;
            Resp::error(500, "", "injected 500")
        } else if st.faults.http_429 > 0 {
            st.faults.http_429 -= 1;
            let mut r = Resp::error(429, "", "injected 429");
            r.headers.push(("Retry-After".into(), st.faults.retry_after_s.to_string()));
            r
        } else {
            route(&mut st, &req)
        };
        st.seen.push(Seen {
            method: req.method.clone(),
            target: req.target.clone(),
            authorization: req.headers.get("authorization").cloned(),
            range: req.headers.get("range").cloned(),
            at,
            status: resp.status,
        });
        (resp, delay)
    };
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    let (start, end) = resp.range.unwrap_or((0, resp.body.len()));
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        resp.status,
        reason(resp.status),
        end - start
    );
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        let body = &resp.body[start..end];
        if resp.drop_mid {
            stream.write_all(&body[..body.len() / 2])?;
            stream.flush()?;
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        stream.write_all(body)?;
    }
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(st: &mut State, req: &Req) -> Resp {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let segs: Vec<String> = path.trim_start_matches('/').split('/').map(decode).collect();
    let seg = |i: usize| segs.get(i).map(String::as_str).unwrap_or("");
    if seg(0) == "cdn" {
        return serve_cdn(st, seg(1), req);
    }
    if let Some(r) = route_upload(st, req, &segs) {
        return r;
    }
    let (repo_type, rest) = match (seg(0), seg(1)) {
        ("api", "datasets") => (RepoType::Dataset, &segs[2..]),
        ("api", "models") => (RepoType::Model, &segs[2..]),
        ("datasets", _) => (RepoType::Dataset, &segs[1..]),
        _ => (RepoType::Model, &segs[..]),
    };
    let api = seg(0) == "api";
    if rest.len() < 3 {
        return Resp::error(404, "", "not found");
    }
    let repo_id = format!("{}/{}", rest[0], rest[1]);
    let Some(repo) = st.repos.get(&(repo_type, repo_id.clone())) else {
        return Resp::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(tok) = &repo.token {
        // As the Hub for a gated repository: 401 without a token, 403 with one not granted access.
        match req.headers.get("authorization") {
            None => return Resp::error(401, "GatedRepo", "Access to this repository is restricted"),
            Some(h) if *h != format!("Bearer {tok}") => {
                return Resp::error(403, "GatedRepo", "Access to this repository is restricted")
            }
            Some(_) => {}
        }
    }
    let action = rest[2].as_str();
    let rev = rest.get(3).cloned().unwrap_or_default();
    let commit = repo.branches.get(&rev).cloned().or_else(|| repo.commits.contains_key(&rev).then(|| rev.clone()));
    let Some(commit) = commit else {
        return Resp::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    };
    let tree = &repo.commits[&commit];
    let cdn_origin = st.cdn_origin.clone().unwrap_or_default();
    let file_path = rest.get(4..).map(|s| s.join("/")).unwrap_or_default();
    match (api, action) {
        (true, "revision") => Resp::json(
            200,
            serde_json::json!({
                "id": repo_id,
                "sha": st.faults.revision_sha.clone().unwrap_or(commit),
                "siblings": tree.keys().map(|p| serde_json::json!({ "rfilename": p })).collect::<Vec<_>>(),
            }),
        ),
        (true, "tree") => {
            let prefix = file_path.trim_matches('/');
            let recursive = query.contains("recursive=true");
            let mut items = Vec::new();
            let mut dirs = std::collections::BTreeSet::new();
            for (p, f) in tree {
                let rel = if prefix.is_empty() {
                    p.as_str()
                } else if let Some(r) = p.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) {
                    r
                } else {
                    continue;
                };
                let parts: Vec<&str> = rel.split('/').collect();
                for d in 1..parts.len() {
                    let dir = parts[..d].join("/");
                    if recursive || d == 1 {
                        dirs.insert(if prefix.is_empty() { dir } else { format!("{prefix}/{dir}") });
                    }
                }
                if !recursive && parts.len() > 1 {
                    continue;
                }
                let mut it = serde_json::json!({ "type": "file", "oid": f.oid(), "size": f.data.len(), "path": p });
                if f.lfs {
                    it["lfs"] = serde_json::json!({ "oid": f.sha256(), "size": f.data.len(), "pointerSize": f.pointer().len() });
                }
                items.push(it);
            }
            if items.is_empty() && dirs.is_empty() && !prefix.is_empty() {
                return Resp::error(404, "EntryNotFound", &format!("{prefix} does not exist on {rev}"));
            }
            let mut all: Vec<_> = dirs
                .into_iter()
                .map(|d| serde_json::json!({ "type": "directory", "oid": "0", "size": 0, "path": d }))
                .collect();
            all.extend(items);
            all.extend(st.faults.extra_tree_entries.iter().cloned());
            Resp::json(200, serde_json::Value::Array(all))
        }
        (false, "resolve") => {
            let Some(f) = tree.get(&file_path) else {
                return Resp::error(404, "EntryNotFound", &format!("{file_path} does not exist on {rev}"));
            };
            let common = vec![("X-Repo-Commit".to_string(), commit.clone())];
            if f.lfs {
                let mut r = Resp::error(302, "", "");
                r.body = Arc::new(Vec::new());
                r.headers = common;
                r.headers.push(("ETag".into(), format!("\"{}\"", f.oid())));
                r.headers.push(("X-Linked-Etag".into(), format!("\"{}\"", f.sha256())));
                r.headers.push(("X-Linked-Size".into(), f.data.len().to_string()));
                r.headers.push(("Location".into(), format!("{}/cdn/{}?repo={repo_id}", cdn_origin, f.sha256())));
                r
            } else {
                let f = f.clone();
                let mut r = body_resp(st, f.data.clone(), req);
                r.headers.extend(common);
                r.headers.push(("ETag".into(), format!("\"{}\"", f.oid())));
                r
            }
        }
        _ => Resp::error(404, "", "unknown endpoint"),
    }
}

/// The upload side of the Hub API (`None`: not an upload request).
fn route_upload(st: &mut State, req: &Req, segs: &[String]) -> Option<Resp> {
    let seg = |i: usize| segs.get(i).map(String::as_str).unwrap_or("");
    let method = req.method.as_str();
    // The presigned object URL: no Hub token (S3 refuses a second auth mechanism).
    if method == "PUT" && seg(0) == "lfs-upload" {
        return Some(lfs_put(st, req, seg(1)));
    }
    if method == "PUT" && seg(0) == "lfs-part" {
        return Some(lfs_put_part(st, req, seg(1), seg(2)));
    }
    if method != "POST" {
        return None;
    }
    // The completion URL is signed on the real Hub: it needs no token.
    if seg(0) == "api" && seg(1) == "complete_multipart" {
        return Some(complete_multipart(st, req));
    }
    let authorized = match (&st.write_token, req.headers.get("authorization")) {
        (_, None) => false,
        (None, Some(h)) => h.starts_with("Bearer "),
        (Some(t), Some(h)) => *h == format!("Bearer {t}"),
    };
    let json = || serde_json::from_slice::<serde_json::Value>(&req.body).ok();
    let deny = || Resp::error(401, "", "Invalid credentials in Authorization header");
    if seg(0) == "api" && seg(1) == "repos" && seg(2) == "create" {
        if !authorized {
            return Some(deny());
        }
        let Some(v) = json() else { return Some(Resp::error(400, "", "invalid JSON")) };
        let repo_type = match v["type"].as_str() {
            Some("dataset") => RepoType::Dataset,
            None | Some("model") => RepoType::Model,
            Some(t) => return Some(Resp::error(400, "", &format!("unsupported repo type {t}"))),
        };
        let (Some(org), Some(name)) = (v["organization"].as_str(), v["name"].as_str()) else {
            return Some(Resp::error(400, "", "name and organization are required"));
        };
        let repo_id = format!("{org}/{name}");
        let url = format!("{}/{}{repo_id}", st.origin, if repo_type == RepoType::Dataset { "datasets/" } else { "" });
        if st.repos.contains_key(&(repo_type, repo_id.clone())) {
            return Some(Resp::json(409, serde_json::json!({ "error": "You already created this repo", "url": url })));
        }
        let attrs = TestFile { data: Arc::new(GITATTRIBUTES.as_bytes().to_vec()), lfs: false };
        commit_files(st, repo_type, &repo_id, "main", vec![(".gitattributes".into(), attrs)]);
        if v["private"].as_bool() == Some(true) {
            let tok = req.headers["authorization"].trim_start_matches("Bearer ").to_string();
            st.repos.get_mut(&(repo_type, repo_id)).expect("just created").token = Some(tok);
        }
        return Some(Resp::json(200, serde_json::json!({ "url": url })));
    }
    // `/api/{models|datasets}/{o}/{n}/{preupload|commit}/{rev}` and `/{datasets/}{o}/{n}.git/info/lfs/objects/{batch|verify}`.
    let (repo_type, repo_id, action, rev) = match (seg(0), seg(1)) {
        ("api", t @ ("models" | "datasets")) if matches!(seg(4), "preupload" | "commit") => (
            if t == "datasets" { RepoType::Dataset } else { RepoType::Model },
            format!("{}/{}", seg(2), seg(3)),
            seg(4),
            seg(5).to_string(),
        ),
        _ => {
            let (t, rest) =
                if seg(0) == "datasets" { (RepoType::Dataset, &segs[1..]) } else { (RepoType::Model, segs) };
            let name = rest.get(1).and_then(|n| n.strip_suffix(".git"))?;
            if rest.get(2..5).is_none_or(|r| r != ["info", "lfs", "objects"]) {
                return None;
            }
            (t, format!("{}/{name}", rest[0]), rest.get(5).map(String::as_str).unwrap_or(""), String::new())
        }
    };
    if !authorized {
        return Some(deny());
    }
    let Some(repo) = st.repos.get(&(repo_type, repo_id.clone())) else {
        return Some(Resp::error(404, "RepoNotFound", "Repository not found"));
    };
    if !rev.is_empty() && !repo.branches.contains_key(&rev) {
        return Some(Resp::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")));
    }
    let Some(body) = (if action == "commit" { Some(serde_json::Value::Null) } else { json() }) else {
        return Some(Resp::error(400, "", "invalid JSON"));
    };
    Some(match action {
        "preupload" => {
            let files = body["files"].as_array().cloned().unwrap_or_default();
            let modes: Vec<_> = files
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap_or("");
                    let size = f["size"].as_u64().unwrap_or(0);
                    let sample = f["sample"].as_str().and_then(super::base64::decode).unwrap_or_default();
                    // As the Hub: .gitattributes LFS patterns, anything over 10 MB, and binary content.
                    let lfs = size > 0
                        && ([".safetensors", ".gguf", ".bin"].iter().any(|e| path.ends_with(e))
                            || size > 10_000_000
                            || sample.contains(&0));
                    serde_json::json!({ "path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false })
                })
                .collect();
            Resp::json(200, serde_json::json!({ "files": modes }))
        }
        "batch" => {
            if body["operation"] != "upload"
                || !body["transfers"].as_array().is_some_and(|t| t.iter().any(|x| x == "basic"))
            {
                return Some(Resp::error(400, "", "only the upload operation with the basic transfer is supported"));
            }
            let cdn = st.cdn_origin.clone().unwrap_or_else(|| st.origin.clone());
            let prefix = if repo_type == RepoType::Dataset { "datasets/" } else { "" };
            let objects: Vec<_> = body["objects"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|o| {
                    let (oid, size) = (o["oid"].as_str().unwrap_or(""), o["size"].as_u64().unwrap_or(0));
                    if st.lfs_objects.get(oid).is_some_and(|d| d.len() as u64 == size) {
                        return serde_json::json!({ "oid": oid, "size": size });
                    }
                    let upload = match st.multipart {
                        Some((threshold, chunk)) if size > threshold => {
                            let mut header = serde_json::json!({ "chunk_size": chunk.to_string() });
                            for n in 1..=size.div_ceil(chunk) {
                                header[format!("{n:05}")] = format!("{cdn}/lfs-part/{oid}/{n}").into();
                            }
                            let href = format!("{}/api/complete_multipart?oid={oid}", st.origin);
                            serde_json::json!({ "href": href, "header": header })
                        }
                        _ => serde_json::json!({ "href": format!("{cdn}/lfs-upload/{oid}?size={size}"), "header": {} }),
                    };
                    serde_json::json!({ "oid": oid, "size": size, "authenticated": true, "actions": {
                        "upload": upload,
                        "verify": { "href": format!("{}/{prefix}{repo_id}.git/info/lfs/objects/verify", st.origin), "header": {} },
                    }})
                })
                .collect();
            let mut r = Resp::json(200, serde_json::json!({ "transfer": "basic", "objects": objects }));
            r.headers = vec![("Content-Type".into(), "application/vnd.git-lfs+json".into())];
            r
        }
        "verify" => {
            let (oid, size) = (body["oid"].as_str().unwrap_or(""), body["size"].as_u64().unwrap_or(0));
            match st.lfs_objects.get(oid) {
                Some(d) if d.len() as u64 == size => Resp::json(200, serde_json::json!({})),
                _ => Resp::error(404, "", "object not found"),
            }
        }
        "commit" => {
            if st.faults.reject_commit > 0 {
                st.faults.reject_commit -= 1;
                return Some(Resp::error(422, "", "injected commit failure"));
            }
            match parse_commit(st, &req.body) {
                Ok(files) => {
                    let oid = commit_files(st, repo_type, &repo_id, &rev, files);
                    let url = format!(
                        "{}/{prefix}{repo_id}/commit/{oid}",
                        st.origin,
                        prefix = if repo_type == RepoType::Dataset { "datasets/" } else { "" }
                    );
                    Resp::json(200, serde_json::json!({ "commitUrl": url, "commitOid": oid, "pullRequestUrl": null }))
                }
                Err(msg) => Resp::error(400, "", &msg),
            }
        }
        _ => Resp::error(404, "", "unknown endpoint"),
    })
}

/// The files of an NDJSON commit body: a `header` line with a summary, then `file` (base64) and
/// `lfsFile` (an uploaded object) lines.
fn parse_commit(st: &State, body: &[u8]) -> Result<Vec<(String, TestFile)>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let head: serde_json::Value =
        serde_json::from_str(lines.next().ok_or("empty commit")?).map_err(|e| format!("bad header line: {e}"))?;
    if head["key"] != "header" || !head["value"]["summary"].is_string() {
        return Err("the first line must be the header with a summary".into());
    }
    let mut files = Vec::new();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad line: {e}"))?;
        let path = v["value"]["path"].as_str().ok_or("an operation without a path")?.to_string();
        super::names::repo_path(&path).map_err(|e| e.to_string())?;
        let file = match v["key"].as_str() {
            Some("file") => {
                if v["value"]["encoding"] != "base64" {
                    return Err(format!("{path}: only base64 encoding is supported"));
                }
                let data = super::base64::decode(v["value"]["content"].as_str().unwrap_or(""))
                    .ok_or_else(|| format!("{path}: content is not base64"))?;
                TestFile { data: Arc::new(data), lfs: false }
            }
            Some("lfsFile") => {
                let oid = v["value"]["oid"].as_str().unwrap_or("");
                if v["value"]["algo"] != "sha256" {
                    return Err(format!("{path}: algo must be sha256"));
                }
                let data =
                    st.lfs_objects.get(oid).ok_or_else(|| format!("{path}: LFS object {oid} was never uploaded"))?;
                if v["value"]["size"].as_u64().is_some_and(|s| s != data.len() as u64) {
                    return Err(format!("{path}: size differs from the uploaded object"));
                }
                TestFile { data: data.clone(), lfs: true }
            }
            other => return Err(format!("unsupported operation {other:?}")),
        };
        files.push((path, file));
    }
    Ok(files)
}

/// `PUT /lfs-upload/<oid>`: store the object if its sha256 is the oid.
fn lfs_put(st: &mut State, req: &Req, oid: &str) -> Resp {
    if req.headers.contains_key("authorization") {
        return Resp::error(400, "", "Only one auth mechanism allowed");
    }
    let got = hex::encode(sha2::Sha256::digest(&req.body));
    if got != oid {
        return Resp::error(400, "", &format!("content sha256 {got} is not the oid {oid}"));
    }
    st.lfs_objects.insert(got, Arc::new(req.body.clone()));
    let mut r = Resp::json(200, serde_json::json!({}));
    r.headers.push(("ETag".into(), format!("\"{oid}\"")));
    r
}

/// The ETag the test storage gives a part (quoted, as S3 does).
fn part_etag(data: &[u8]) -> String {
    format!("\"{}\"", hex::encode(sha2::Sha256::digest(data)))
}

/// `PUT /lfs-part/<oid>/<n>`: keep one part of a multipart upload (a retried part replaces it).
fn lfs_put_part(st: &mut State, req: &Req, oid: &str, n: &str) -> Resp {
    if req.headers.contains_key("authorization") {
        return Resp::error(400, "", "Only one auth mechanism allowed");
    }
    let Ok(n) = n.parse::<u64>() else { return Resp::error(400, "", "bad part number") };
    if st.faults.fail_parts > 0 {
        st.faults.fail_parts -= 1;
        return Resp::error(500, "", "injected part failure");
    }
    st.parts.entry(oid.to_string()).or_default().insert(n, req.body.clone());
    let mut r = Resp::json(200, serde_json::json!({}));
    r.headers.push(("ETag".into(), part_etag(&req.body)));
    r
}

/// `POST /api/complete_multipart?oid=…` with `{"oid", "parts": [{"partNumber", "etag"}]}`: every
/// part in order with the ETag it was given; the assembled object must hash to the oid.
fn complete_multipart(st: &mut State, req: &Req) -> Resp {
    let query = req.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let oid = query.split('&').find_map(|kv| kv.strip_prefix("oid=")).unwrap_or("").to_string();
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return Resp::error(400, "", "invalid JSON");
    };
    if body["oid"] != oid.as_str() {
        return Resp::error(400, "", "the body's oid is not the upload's");
    }
    let Some(stored) = st.parts.get(&oid) else { return Resp::error(404, "", "no parts uploaded for this oid") };
    let listed = body["parts"].as_array().cloned().unwrap_or_default();
    if listed.len() != stored.len() {
        return Resp::error(400, "", &format!("{} parts listed, {} uploaded", listed.len(), stored.len()));
    }
    let mut data = Vec::new();
    for (i, p) in listed.iter().enumerate() {
        let n = i as u64 + 1;
        let Some(part) = stored.get(&n).filter(|_| p["partNumber"].as_u64() == Some(n)) else {
            return Resp::error(400, "", &format!("part {n} missing or out of order"));
        };
        if p["etag"].as_str() != Some(part_etag(part).as_str()) {
            return Resp::error(400, "", &format!("part {n}: wrong etag {}", p["etag"]));
        }
        data.extend_from_slice(part);
    }
    let got = hex::encode(sha2::Sha256::digest(&data));
    if got != oid {
        return Resp::error(400, "", &format!("assembled sha256 {got} is not the oid {oid}"));
    }
    st.parts.remove(&oid);
    st.lfs_objects.insert(oid, Arc::new(data));
    Resp::json(200, serde_json::json!({}))
}

fn serve_cdn(st: &mut State, sha: &str, req: &Req) -> Resp {
    let found = st
        .repos
        .values()
        .flat_map(|r| r.commits.values())
        .flat_map(|t| t.values())
        .find(|f| f.lfs && f.sha256() == sha)
        .cloned();
    match found {
        Some(f) => {
            let mut r = body_resp(st, f.data.clone(), req);
            r.headers.push(("ETag".into(), format!("\"{sha}\"")));
            r
        }
        None => Resp::error(404, "", "no such object"),
    }
}

/// A file body honouring `Range: bytes=N-`, with the body faults applied.
fn body_resp(st: &mut State, data: Arc<Vec<u8>>, req: &Req) -> Resp {
    let len = data.len();
    let mut data = data;
    if st.faults.corrupt > 0 {
        st.faults.corrupt -= 1;
        let mut v = (*data).clone();
        if let Some(b) = v.last_mut() {
            *b ^= 0x55;
        }
        data = Arc::new(v);
    }
    let drop_mid = if st.faults.drop_mid_body > 0 {
        st.faults.drop_mid_body -= 1;
        true
    } else {
        false
    };
    let mut r = Resp {
        status: 200,
        headers: vec![("Accept-Ranges".into(), "bytes".into())],
        body: data,
        range: None,
        drop_mid,
    };
    if let Some(start) = req
        .headers
        .get("range")
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok())
    {
        if start >= len {
            return Resp {
                status: 416,
                headers: vec![("Content-Range".into(), format!("bytes */{len}"))],
                body: Arc::new(Vec::new()),
                range: None,
                drop_mid: false,
            };
        }
        r.status = 206;
        r.range = Some((start, len));
        r.headers.push(("Content-Range".into(), format!("bytes {start}-{}/{len}", len - 1)));
    }
    r
}
