//! The Hub client against the local test Hub (`mmrun::hub::testserver`) on 127.0.0.1: fetching,
//! the HF cache layout, verification, every switchable fault, locks, offline mode, concurrency.
//! Every test is bounded: retries use millisecond backoffs and short timeouts.

use crate::common;

use std::path::Path;
use std::time::Duration;

use mmrun::hub::cache::RepoCache;
use mmrun::hub::lock::{self, LockFile};
use mmrun::hub::testserver::{Faults, TestHub};
use mmrun::hub::{resolve_dataset, HubError, HubOptions, HubUri, RemoteId, RemoteInput, RemoteKind, RepoType, Token};

const REPO: &str = "acme/med";

fn opts(hub: &TestHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.url(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
        max_retries: 4,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        retry_after_max: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
    }
}

/// Deterministic pseudo-random bytes (big enough that a half body is a real partial download).
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8).collect()
}

fn repo(hub: &TestHub) -> String {
    hub.commit(
        RepoType::Dataset,
        REPO,
        "main",
        vec![
            ("README.md".into(), b"# med\n".to_vec(), false),
            ("data/train.jsonl".into(), bytes(300_000, 1), true),
            ("data/valid.jsonl".into(), bytes(5_000, 2), true),
            ("data/sub/extra.jsonl".into(), bytes(100, 3), true),
            ("notes.txt".into(), b"small git file\n".to_vec(), false),
        ],
    )
}

fn uri(s: &str) -> HubUri {
    HubUri::parse(s).unwrap()
}

fn one_line(e: &HubError) -> String {
    let m = e.to_string();
    assert!(!m.contains('\n'), "error must be one line: {m}");
    m
}

#[test]
fn fetches_glob_into_hf_cache_layout() {
    let hub = TestHub::start();
    let commit = repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub, cache.path());
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/data/*.jsonl"), None, &o).unwrap();
    assert_eq!(ds.commit, commit);
    let paths: Vec<_> = ds.files.iter().map(|f| f.repo_path.as_str()).collect();
    assert_eq!(paths, ["data/train.jsonl", "data/valid.jsonl"], "`*` stays within one folder");
    let rc = RepoCache::new(cache.path(), RepoType::Dataset, REPO);
    for f in &ds.files {
        assert!(f.local_path.starts_with(rc.snapshot_dir(&commit).unwrap()));
        // Relative symlink into blobs/, named by the LFS sha256, exactly like huggingface_hub.
        let target = std::fs::read_link(&f.local_path).unwrap();
        assert_eq!(target, Path::new("../../../blobs").join(&f.sha256));
        assert_eq!(std::fs::metadata(&f.local_path).unwrap().len(), f.size);
        assert_eq!(mmrun::hub::client::sha256_file(&f.local_path).unwrap(), f.sha256);
    }
    assert_eq!(std::fs::read(&ds.files[0].local_path).unwrap(), bytes(300_000, 1));
    assert_eq!(rc.read_ref("main").as_deref(), Some(commit.as_str()));
    // LFS downloads went through the 302 to the CDN path, without the token-bearing header.
    assert!(hub.seen().iter().any(|s| s.target.starts_with("/cdn/")));

    // A non-LFS file is named by its git blob id and verified against it.
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/notes.txt"), None, &o).unwrap();
    let target = std::fs::read_link(&ds.files[0].local_path).unwrap();
    assert_eq!(target, Path::new("../../blobs").join(mmrun::hub::client::git_blob_sha1(b"small git file\n")));

    // `**` and folder paths.
    let all = resolve_dataset(&uri("hf://datasets/acme/med/data"), None, &o).unwrap();
    assert_eq!(all.files.len(), 3);
}

#[test]
fn reuses_cache_written_by_python_and_makes_no_request_with_a_lock() {
    let hub = TestHub::start();
    let commit = repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    // Lay the file out the way huggingface_hub would have (blobs/<sha256> + relative symlink).
    let rc = RepoCache::new(cache.path(), RepoType::Dataset, REPO);
    let data = bytes(5_000, 2);
    let sha = hex_sha(&data);
    std::fs::create_dir_all(rc.dir().join("blobs")).unwrap();
    std::fs::write(rc.blob(&sha).unwrap(), &data).unwrap();
    rc.link_snapshot(&commit, "data/valid.jsonl", &sha).unwrap();
    let o = opts(&hub, cache.path());
    let u = uri("hf://datasets/acme/med/data/valid.jsonl");
    let ds = resolve_dataset(&u, None, &o).unwrap();
    assert_eq!(ds.files[0].sha256, sha);
    assert!(hub.seen().iter().all(|s| s.target.starts_with("/api/")), "only API calls, no download: {:?}", hub.seen());

    // With the lock and everything cached: no request at all.
    hub.clear_seen();
    let again = resolve_dataset(&u, Some(&ds.to_locked()), &o).unwrap();
    assert_eq!(again, ds);
    assert!(hub.seen().is_empty());
}

#[test]
fn dropped_connection_mid_body_resumes_with_range() {
    let hub = TestHub::start();
    repo(&hub);
    // More drops than retries: each drop made progress, so none of them counts as a failed attempt.
    hub.set_faults(Faults { drop_mid_body: 8, ..Faults::default() });
    let cache = tempfile::tempdir().unwrap();
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/data/train.jsonl"), None, &opts(&hub, cache.path())).unwrap();
    assert_eq!(std::fs::read(&ds.files[0].local_path).unwrap(), bytes(300_000, 1));
    let ranges: Vec<_> = hub.seen().into_iter().filter_map(|s| s.range).collect();
    assert!(ranges.iter().any(|r| r == "bytes=150000-"), "resumed from the half already received: {ranges:?}");
    let blobs = RepoCache::new(cache.path(), RepoType::Dataset, REPO).dir().join("blobs");
    assert!(std::fs::read_dir(blobs).unwrap().all(|e| !e.unwrap().path().to_string_lossy().ends_with(".incomplete")));
}

#[test]
fn server_errors_then_success_are_retried() {
    let hub = TestHub::start();
    repo(&hub);
    hub.set_faults(Faults { http_500: 3, ..Faults::default() });
    let cache = tempfile::tempdir().unwrap();
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/data/valid.jsonl"), None, &opts(&hub, cache.path())).unwrap();
    assert_eq!(ds.files.len(), 1);
    assert_eq!(hub.seen().iter().filter(|s| s.status == 500).count(), 3);
}

#[test]
fn persistent_server_errors_fail_after_bounded_retries() {
    let hub = TestHub::start();
    repo(&hub);
    hub.set_faults(Faults { http_500: 1000, ..Faults::default() });
    let cache = tempfile::tempdir().unwrap();
    let e =
        resolve_dataset(&uri("hf://datasets/acme/med/data/valid.jsonl"), None, &opts(&hub, cache.path())).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::Network { attempts: 5, .. }), "{m}");
    assert!(
        m.contains("hf://datasets/acme/med/data/valid.jsonl") && m.contains("/api/datasets/acme/med/revision/main"),
        "{m}"
    );
    assert_eq!(hub.seen().len(), 5);
}

#[test]
fn unresolvable_host_fails_at_once_with_the_offline_hint() {
    // `.invalid` never resolves (RFC 6761), online or off, so this needs no network. A failed
    // lookup is not retried: offline, six attempts with backoff only delayed the same answer.
    let cache = tempfile::tempdir().unwrap();
    let o = HubOptions {
        endpoint: "http://mmrun-no-such-host.invalid".into(),
        max_retries: 4,
        backoff_base: Duration::from_millis(10),
        ..HubOptions::from_env()
    };
    let o = HubOptions { cache_dir: cache.path().to_path_buf(), offline: false, ..o };
    let e = resolve_dataset(&uri("hf://datasets/acme/med/data/valid.jsonl"), None, &o).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::HostNotFound { .. }), "{m}");
    assert!(m.contains("mmrun-no-such-host.invalid") && m.contains("HF_HUB_OFFLINE=1"), "{m}");
}

#[test]
fn rate_limit_honours_retry_after() {
    let hub = TestHub::start();
    repo(&hub);
    hub.set_faults(Faults { http_429: 1, retry_after_s: 1, ..Faults::default() });
    let cache = tempfile::tempdir().unwrap();
    resolve_dataset(&uri("hf://datasets/acme/med/notes.txt"), None, &opts(&hub, cache.path())).unwrap();
    let seen = hub.seen();
    assert_eq!(seen[0].status, 429);
    // The backoff alone would be 10 ms; the server asked for 1 s.
    assert!(seen[1].at.duration_since(seen[0].at) >= Duration::from_millis(900));
}

#[test]
fn wrong_bytes_are_deleted_and_retried_once() {
    let hub = TestHub::start();
    let commit = repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub, cache.path());
    hub.set_faults(Faults { corrupt: 1, ..Faults::default() });
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/data/valid.jsonl"), None, &o).unwrap();
    assert_eq!(std::fs::read(&ds.files[0].local_path).unwrap(), bytes(5_000, 2));

    // Twice wrong: fail, and keep nothing (no blob, no partial, no snapshot entry).
    hub.set_faults(Faults { corrupt: 2, ..Faults::default() });
    let e = resolve_dataset(&uri("hf://datasets/acme/med/data/train.jsonl"), None, &o).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::ChecksumMismatch { .. }), "{m}");
    assert!(m.contains("/datasets/acme/med/resolve/") && m.contains("sha256:"), "{m}");
    let rc = RepoCache::new(cache.path(), RepoType::Dataset, REPO);
    let sha = hex_sha(&bytes(300_000, 1));
    assert!(!rc.blob(&sha).unwrap().exists() && !rc.incomplete(&sha).unwrap().exists());
    assert!(!rc.snapshot_path(&commit, "data/train.jsonl").unwrap().exists());

    // Non-LFS files are verified by git blob id.
    hub.set_faults(Faults { corrupt: 2, ..Faults::default() });
    let e = resolve_dataset(&uri("hf://datasets/acme/med/notes.txt"), None, &o).unwrap_err();
    assert!(one_line(&e).contains("git-sha1:"));
}

#[test]
fn private_repo_needs_token_which_never_leaks() {
    let hub = TestHub::start();
    let commit = repo(&hub);
    let secret = "hf_SeCrEtToKeN123";
    hub.set_token(RepoType::Dataset, REPO, secret);
    let cache = tempfile::tempdir().unwrap();
    let recipe_dir = tempfile::tempdir().unwrap();
    let recipe = recipe_dir.path().join("x.toml");
    let u = uri("hf://datasets/acme/med/data/valid.jsonl");
    let mut o = opts(&hub, cache.path());
    let e = resolve_dataset(&u, None, &o).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::Unauthorized { status: 401, .. }), "{m}");
    assert!(m.contains("HF_TOKEN") && m.contains(&hub.url()) && m.contains("hf://datasets/acme/med"), "{m}");

    o.token = Some(Token::new(secret));
    // A wrong token: still refused, and the message does not echo it.
    let bad = HubOptions { token: Some(Token::new("hf_wrong_one")), ..o.clone() };
    let e = resolve_dataset(&u, None, &bad).unwrap_err();
    assert!(!format!("{e} {e:?}").contains("hf_wrong_one"));

    let ds = lock::fetch_locked(&recipe, "med", &u, &o).unwrap();
    assert_eq!(ds.commit, commit);
    let lock_text = std::fs::read_to_string(lock::lock_path(&recipe)).unwrap();
    assert!(!lock_text.contains(secret), "the lock never holds the token");
    assert!(!format!("{o:?} {ds:?}").contains(secret), "Debug output is redacted");
    for s in hub.seen() {
        if s.target.starts_with("/cdn/") {
            assert!(s.authorization.is_none(), "the token is not sent to the CDN host");
        }
    }
    assert!(hub.seen().iter().any(|s| s.authorization.as_deref() == Some(&format!("Bearer {secret}"))));
}

#[test]
fn slow_responses_time_out_and_are_retried() {
    let hub = TestHub::start();
    repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let o = HubOptions { response_timeout: Duration::from_millis(300), ..opts(&hub, cache.path()) };
    hub.set_faults(Faults { slow: 1, slow_ms: 1500, ..Faults::default() });
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/data/valid.jsonl"), None, &o).unwrap();
    assert_eq!(ds.files.len(), 1);
    assert!(
        hub.seen().iter().filter(|s| s.target.contains("/revision/")).count() >= 2,
        "the slow answer was abandoned and retried"
    );
}

#[test]
fn not_found_errors_name_dataset_url_and_fix() {
    let hub = TestHub::start();
    repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub, cache.path());
    let e = resolve_dataset(&uri("hf://datasets/acme/nope/x.jsonl"), None, &o).unwrap_err();
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e}");
    assert!(one_line(&e).contains("/api/datasets/acme/nope/revision/main"));
    let e = resolve_dataset(&uri("hf://datasets/acme/med@v9/x.jsonl"), None, &o).unwrap_err();
    assert!(matches!(e, HubError::RevisionNotFound { .. }) && one_line(&e).contains("'v9'"), "{e}");
    let e = resolve_dataset(&uri("hf://datasets/acme/med/data/*.parquet"), None, &o).unwrap_err();
    assert!(matches!(e, HubError::FileNotFound { .. }) && one_line(&e).contains("data/*.parquet"), "{e}");
    let e = resolve_dataset(&uri("hf://datasets/acme/med/missing/file.txt"), None, &o).unwrap_err();
    assert!(matches!(e, HubError::FileNotFound { .. }), "{e}");
    assert_eq!(hub.seen().iter().filter(|s| s.status >= 500).count(), 0);
}

#[test]
fn offline_uses_only_the_cache() {
    let hub = TestHub::start();
    let commit = repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let u = uri("hf://datasets/acme/med/data/*.jsonl");
    let offline = HubOptions { offline: true, ..opts(&hub, cache.path()) };
    let e = resolve_dataset(&u, None, &offline).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::OfflineNotCached { .. }) && m.contains("HF_HUB_OFFLINE"), "{m}");
    assert!(hub.seen().is_empty(), "offline never touches the network");

    let online = resolve_dataset(&u, None, &opts(&hub, cache.path())).unwrap();
    let endpoint = hub.url();
    drop(hub);
    let offline = HubOptions { endpoint, ..offline };
    let ds = resolve_dataset(&u, None, &offline).unwrap();
    assert_eq!(ds, online);
    assert_eq!(ds.commit, commit);
    // A file that was never fetched is reported as such.
    let e = resolve_dataset(&uri("hf://datasets/acme/med/notes.txt"), None, &offline).unwrap_err();
    assert!(matches!(e, HubError::OfflineNotCached { .. }), "{e}");
}

#[test]
fn lock_pins_commit_after_branch_moves_and_update_moves_it() {
    let hub = TestHub::start();
    let c1 = repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub, cache.path());
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("x.toml");
    std::fs::write(
        &recipe,
        "[recipe]\nname = \"x\"\n[datasets.med]\nsource = \"hf://datasets/acme/med/data/valid.jsonl\"\nformat = \"text\"\n\
         [datasets.local]\nsource = \"data.txt\"\nformat = \"text\"\n",
    )
    .unwrap();
    let u = uri("hf://datasets/acme/med/data/valid.jsonl");
    let first = lock::fetch_locked(&recipe, "med", &u, &o).unwrap();
    let lock = LockFile::load(&lock::lock_path(&recipe)).unwrap().unwrap();
    let entry = &lock.datasets["med"];
    assert_eq!((entry.commit.as_str(), entry.revision.as_str()), (c1.as_str(), "main"));
    assert_eq!(entry.files[0].sha256, hex_sha(&bytes(5_000, 2)));
    assert_eq!(entry.files[0].size, 5_000);

    // The branch moves and the file changes.
    let c2 = hub.commit(RepoType::Dataset, REPO, "main", vec![("data/valid.jsonl".into(), bytes(6_000, 9), true)]);
    let again = lock::fetch_locked(&recipe, "med", &u, &o).unwrap();
    assert_eq!(again.commit, c1, "the lock wins over the moved branch");
    assert_eq!(again.files, first.files);
    let moved = lock::check_recipe(&recipe, &o).unwrap();
    assert_eq!(moved.len(), 1);
    let msg = moved[0].to_string();
    assert!(
        msg.contains("branch main of acme/med has moved") && msg.contains(&c1[..12]) && msg.contains(&c2[..12]),
        "{msg}"
    );
    assert!(msg.contains("mmrun update") && msg.contains("x.toml med"), "{msg}");

    // Also a fresh cache with only the lock reproduces the locked bytes (re-downloaded at c1).
    let cache2 = tempfile::tempdir().unwrap();
    let repro = lock::fetch_locked(&recipe, "med", &u, &opts(&hub, cache2.path())).unwrap();
    assert_eq!(repro.commit, c1);
    assert_eq!(std::fs::read(&repro.files[0].local_path).unwrap(), bytes(5_000, 2));

    let inputs = [RemoteInput { id: RemoteId::new(RemoteKind::Dataset, "med"), uri: u.clone() }];
    let e = lock::update_with(&recipe, &inputs, Some("nope"), &o).unwrap_err();
    assert!(e.to_string().contains("dataset med"), "{e}");
    let updated = lock::update_with(&recipe, &inputs, Some("med"), &o).unwrap();
    assert_eq!(updated.datasets["med"].commit, c2);
    assert_eq!(updated.datasets["med"].files[0].size, 6_000);
    assert!(lock::check_recipe(&recipe, &o).unwrap().is_empty());
    let now = lock::fetch_locked(&recipe, "med", &u, &o).unwrap();
    assert_eq!(std::fs::read(&now.files[0].local_path).unwrap(), bytes(6_000, 9));
}

#[test]
fn disk_full_is_reported_and_nothing_kept() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIP: no /dev/full");
        return;
    }
    let hub = TestHub::start();
    let commit = repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let rc = RepoCache::new(cache.path(), RepoType::Dataset, REPO);
    let sha = hex_sha(&bytes(5_000, 2));
    std::fs::create_dir_all(rc.dir().join("blobs")).unwrap();
    // Every write to /dev/full fails with ENOSPC, like a full disk.
    std::os::unix::fs::symlink("/dev/full", rc.incomplete(&sha).unwrap()).unwrap();
    let e =
        resolve_dataset(&uri("hf://datasets/acme/med/data/valid.jsonl"), None, &opts(&hub, cache.path())).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::DiskFull { .. }) && m.contains("HF_HUB_CACHE"), "{m}");
    assert!(std::fs::symlink_metadata(rc.incomplete(&sha).unwrap()).is_err(), "the partial file is removed");
    assert!(!rc.snapshot_path(&commit, "data/valid.jsonl").unwrap().exists());
}

#[test]
fn concurrent_fetches_download_each_blob_once() {
    let hub = TestHub::start();
    repo(&hub);
    // Slow the bodies down a little so the two fetches overlap.
    hub.set_faults(Faults { slow: 6, slow_ms: 150, ..Faults::default() });
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub, cache.path());
    let u = uri("hf://datasets/acme/med/data/train.jsonl");
    let results: Vec<_> = std::thread::scope(|s| {
        let h: Vec<_> = (0..2).map(|_| s.spawn(|| resolve_dataset(&u, None, &o).unwrap())).collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0], results[1]);
    let cdn = hub.seen().iter().filter(|s| s.target.starts_with("/cdn/")).count();
    assert_eq!(cdn, 1, "the second fetch waited on the blob lock and reused the blob");
}

#[test]
fn medical_repo_from_shared_data() {
    let Some(shared) = common::shared_data() else { return };
    let hub = TestHub::start();
    let commit = hub.add_medical_repo(&shared).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let ds =
        resolve_dataset(&uri("hf://datasets/shibing624/medical/reward/test.json"), None, &opts(&hub, cache.path()))
            .unwrap();
    assert_eq!(ds.commit, commit);
    // Served byte-identical: the sha256 is the one in shared/data/README.md.
    assert_eq!(ds.files[0].sha256, "7966ec39a4ecabc27ffa70ee9a6b1f2a14b9f3d61b11a719b54751054b3b9ab5");
    let ds = resolve_dataset(&uri("hf://datasets/shibing624/medical/finetune/*.json"), None, &opts(&hub, cache.path()))
        .unwrap();
    let first = std::fs::read_to_string(&ds.files[0].local_path).unwrap();
    let rec: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(rec.get("instruction").is_some() && rec.get("output").is_some());
}

fn hex_sha(d: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(d))
}

#[test]
fn medical_recipe_points_at_files_the_local_hub_serves() {
    let Some(shared) = common::shared_data() else { return };
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/medical_sft.toml");
    let src = mmrun::exec::pipeline::RecipeSource { path: recipe, overrides: Vec::new(), text: None };
    let inputs = mmrun::exec::pipeline::remote_inputs(&mmrun::exec::pipeline::load_recipe(&src).unwrap()).unwrap();
    let hubs: Vec<(String, HubUri)> = inputs.into_iter().map(|i| (i.id.name, i.uri)).collect();
    assert_eq!(hubs.iter().map(|h| h.0.as_str()).collect::<Vec<_>>(), ["medical_pref", "medical_sft", "medical_text"]);
    let hub = TestHub::start();
    hub.add_medical_repo(&shared).unwrap();
    let cache = tempfile::tempdir().unwrap();
    for (name, u) in &hubs {
        assert_eq!(u.repo_id, "shibing624/medical", "{name}");
        let ds = resolve_dataset(u, None, &opts(&hub, cache.path())).unwrap();
        assert_eq!(ds.files.len(), 1, "{name}");
        assert!(ds.files[0].size > 10_000, "{name}");
    }
}

/// Child half of `two_processes_download_each_blob_once`: runs only when spawned by it.
#[test]
fn child_fetch() {
    let (Ok(endpoint), Ok(cache)) = (std::env::var("MMRUN_HUB_CHILD_ENDPOINT"), std::env::var("MMRUN_HUB_CHILD_CACHE"))
    else {
        return;
    };
    let o = HubOptions { endpoint, cache_dir: cache.into(), ..HubOptions::from_env() };
    let ds = resolve_dataset(&uri("hf://datasets/acme/med/data/train.jsonl"), None, &o).unwrap();
    assert_eq!(std::fs::read(&ds.files[0].local_path).unwrap(), bytes(300_000, 1));
}

#[test]
fn two_processes_download_each_blob_once() {
    let hub = TestHub::start();
    repo(&hub);
    // Slow answers so that both processes are inside the fetch at the same time.
    hub.set_faults(Faults { slow: 8, slow_ms: 200, ..Faults::default() });
    let cache = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        std::process::Command::new(&exe)
            .args(["--exact", "hub_client::child_fetch", "--test-threads=1"])
            .env("MMRUN_HUB_CHILD_ENDPOINT", hub.url())
            .env("MMRUN_HUB_CHILD_CACHE", cache.path())
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let cdn = hub.seen().iter().filter(|s| s.target.starts_with("/cdn/")).count();
    assert_eq!(cdn, 1, "one process downloaded, the other waited on the blob lock and reused it");
}

#[test]
fn lock_with_a_different_sha256_is_refused() {
    let hub = TestHub::start();
    repo(&hub);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub, cache.path());
    let u = uri("hf://datasets/acme/med/data/valid.jsonl");
    let mut locked = resolve_dataset(&u, None, &o).unwrap().to_locked();
    locked.files[0].sha256 = "0".repeat(64);
    let e = resolve_dataset(&u, Some(&locked), &o).unwrap_err();
    let m = one_line(&e);
    assert!(matches!(e, HubError::ChecksumMismatch { .. }) && m.contains("from the lock file"), "{m}");
}
