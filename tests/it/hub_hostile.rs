//! A hostile Hub: the local test Hub serves names that try to leave the HF cache (a tree entry
//! `data/../../../../<dir>/x.jsonl`, a commit id `../..`, absolute, NUL, backslash and drive paths,
//! blob ids with `..`), and a recipe names a revision `..%2F..%2F…`. Each is refused with an error
//! that names it, and nothing outside the cache is created, changed or deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mmrun::hub::lock::{lock_path, LockFile};
use mmrun::hub::testserver::{Faults, TestHub};
use mmrun::hub::{resolve_dataset, HubError, HubOptions, HubUri, RepoType};

const REPO: &str = "evil/data";

fn opts(hub: &TestHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.url(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
        max_retries: 1,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        retry_after_max: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
    }
}

/// Every file below `root` with its content (symlinks as `-> target`), to compare before/after.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(p.clone(), format!("-> {}", std::fs::read_link(&p).unwrap().display()).into_bytes());
            } else if m.is_dir() {
                out.insert(p.clone(), b"<dir>".to_vec());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A sandbox: `<tmp>/victim/x.jsonl` (a file the user owns) next to the HF cache `<tmp>/hf`.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("victim")).unwrap();
        std::fs::write(dir.path().join("victim/x.jsonl"), "precious\n").unwrap();
        std::fs::create_dir_all(dir.path().join("hf")).unwrap();
        Self { dir }
    }
    fn cache(&self) -> PathBuf {
        self.dir.path().join("hf")
    }
    /// Everything outside the cache.
    fn outside(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(self.dir.path()).into_iter().filter(|(p, _)| !p.starts_with(self.cache())).collect()
    }
}

fn refused(e: &HubError, what: &str) -> String {
    let m = e.to_string();
    assert!(matches!(e, HubError::UnsafeName { .. }), "expected an unsafe-name refusal, got: {m}");
    assert!(m.contains("refusing") && m.contains(what), "{m}");
    assert!(!m.contains('\n'), "one line: {m}");
    m
}

#[test]
fn tree_entry_with_dot_dot_cannot_replace_a_file_outside_the_cache() {
    let hub = TestHub::start();
    let sb = Sandbox::new();
    // snapshots/<commit>/data/ + five `..` = the sandbox root, where victim/ lives.
    let hostile = "data/../../../../../victim/x.jsonl";
    hub.commit(
        RepoType::Dataset,
        REPO,
        "main",
        vec![("data/ok.jsonl".into(), b"{}\n".to_vec(), true), (hostile.into(), b"pwned\n".to_vec(), true)],
    );
    let before = sb.outside();
    for src in ["hf://datasets/evil/data/data", "hf://datasets/evil/data/**/*.jsonl", "hf://datasets/evil/data"] {
        let e = resolve_dataset(&HubUri::parse(src).unwrap(), None, &opts(&hub, &sb.cache())).unwrap_err();
        let m = refused(&e, "repository path");
        assert!(m.contains("victim/x.jsonl") && m.contains("'..' segment"), "{m}");
    }
    assert_eq!(sb.outside(), before, "nothing outside the cache changed");
    assert_eq!(std::fs::read_to_string(sb.dir.path().join("victim/x.jsonl")).unwrap(), "precious\n");
    // Nothing was downloaded either: the listing was refused as a whole.
    assert!(!hub.seen().iter().any(|s| s.target.contains("/resolve/")), "{:?}", hub.seen());
}

#[test]
fn commit_id_that_is_a_path_is_refused() {
    let hub = TestHub::start();
    let sb = Sandbox::new();
    hub.commit(RepoType::Dataset, REPO, "main", vec![("data/ok.jsonl".into(), b"{}\n".to_vec(), true)]);
    let before = sb.outside();
    for sha in ["../..", "../../../../victim", "/tmp", &"A".repeat(40)] {
        hub.set_faults(Faults { revision_sha: Some(sha.to_string()), ..Faults::default() });
        let u = HubUri::parse("hf://datasets/evil/data/data/ok.jsonl").unwrap();
        let e = resolve_dataset(&u, None, &opts(&hub, &sb.cache())).unwrap_err();
        let m = refused(&e, "commit id");
        assert!(m.contains("/revision/main"), "names the URL: {m}");
    }
    assert_eq!(sb.outside(), before);
    // No ref was recorded and no snapshot folder made for it.
    assert!(!sb.cache().join("datasets--evil--data/refs").exists());
    assert!(!sb.cache().join("datasets--evil--data/snapshots").exists());
}

#[test]
fn absolute_nul_backslash_and_drive_paths_and_bad_blob_ids_are_refused() {
    let hub = TestHub::start();
    let sb = Sandbox::new();
    hub.commit(RepoType::Dataset, REPO, "main", vec![("data/ok.jsonl".into(), b"{}\n".to_vec(), true)]);
    let abs = sb.dir.path().join("victim/x.jsonl").display().to_string();
    let blob = "ce013625030ba8dba906f756967f9e9ca394464a";
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"type": "file", "path": abs, "size": 3, "oid": blob}), "is absolute"),
        (serde_json::json!({"type": "file", "path": "data/a\u{0}b.jsonl", "size": 3, "oid": blob}), "NUL"),
        (serde_json::json!({"type": "file", "path": "data\\..\\..\\x.jsonl", "size": 3, "oid": blob}), "backslash"),
        (serde_json::json!({"type": "file", "path": "C:/victim/x.jsonl", "size": 3, "oid": blob}), "drive letter"),
        (
            serde_json::json!({"type": "file", "path": "data/y.jsonl", "size": 3, "oid": "../../../../victim/x"}),
            "blob id",
        ),
        (
            serde_json::json!({"type": "file", "path": "data/z.jsonl", "size": 3, "oid": blob,
                               "lfs": {"oid": "../../victim/x.jsonl", "size": 3}}),
            "sha256",
        ),
    ];
    let before = sb.outside();
    for (entry, problem) in cases {
        hub.set_faults(Faults { extra_tree_entries: vec![entry.clone()], ..Faults::default() });
        let u = HubUri::parse("hf://datasets/evil/data").unwrap();
        let e = resolve_dataset(&u, None, &opts(&hub, &sb.cache())).unwrap_err();
        let m = refused(&e, problem);
        assert!(m.contains("/tree/"), "names the listing URL: {m}");
        assert!(!m.contains('\0'), "the NUL is shown escaped: {m:?}");
    }
    assert_eq!(sb.outside(), before);
}

#[test]
fn recipe_revision_with_encoded_dot_dot_is_refused_before_any_request() {
    let hub = TestHub::start();
    let sb = Sandbox::new();
    // The server would even answer for that branch name.
    hub.commit(RepoType::Dataset, REPO, "../../../../victim", vec![("x.jsonl".into(), b"{}\n".to_vec(), true)]);
    for src in [
        "hf://datasets/evil/data@..%2F..%2F..%2F..%2Fvictim/x.jsonl",
        "hf://datasets/evil/data@refs%2F..%2F..%2Fx/x.jsonl",
        "hf://datasets/evil/data@%2E%2E%2F%2E%2E/x.jsonl",
    ] {
        let e = HubUri::parse(src).unwrap_err().to_string();
        assert!(e.contains("revision"), "{e}");
    }
    assert!(hub.seen().is_empty());

    // The same through a recipe: a load-time error at the source's line, exit 2, nothing written.
    let recipe = sb.dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[recipe]\nname = \"r\"\n\n[datasets.d]\nsource = \"hf://datasets/evil/data@..%2F..%2F..%2F..%2Fvictim/x.jsonl\"\nformat = \"text\"\n\n[stages.tok]\nkind = \"tokenizer\"\ndata = [\"d\"]\n",
    )
    .unwrap();
    let before = sb.outside();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmrun"))
        .args(["plan", recipe.to_str().unwrap()])
        .current_dir(sb.dir.path())
        .env("MMRUN_HOME", sb.cache().join("mmrun"))
        .env("MMRUN_RUNS_DIR", sb.cache().join("runs"))
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HUB_CACHE", sb.cache())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("r.toml:5:") && stderr.contains("revision"), "{stderr}");
    assert_eq!(sb.outside(), before);
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
}

#[test]
fn lock_file_with_hostile_names_is_refused() {
    let hub = TestHub::start();
    let sb = Sandbox::new();
    let commit = hub.commit(RepoType::Dataset, REPO, "main", vec![("data/ok.jsonl".into(), b"{}\n".to_vec(), true)]);
    let recipe = sb.dir.path().join("r.toml");
    std::fs::write(&recipe, "").unwrap();
    let u = HubUri::parse("hf://datasets/evil/data/data/ok.jsonl").unwrap();
    let o = opts(&hub, &sb.cache());
    mmrun::hub::lock::fetch_locked(&recipe, "d", &u, &o).unwrap();
    let good = std::fs::read_to_string(lock_path(&recipe)).unwrap();
    let before = sb.outside();
    for (from, to) in [
        (commit.as_str(), "../../../../victim"),
        ("path = \"data/ok.jsonl\"", "path = \"../../../../victim/x.jsonl\""),
        ("sha256 = \"", "sha256 = \"../"),
    ] {
        std::fs::write(lock_path(&recipe), good.replacen(from, to, 1)).unwrap();
        let e = LockFile::load(&lock_path(&recipe)).unwrap_err().to_string();
        assert!(e.contains("malformed") && e.contains("dataset d"), "{e}");
        assert!(mmrun::hub::lock::fetch_locked(&recipe, "d", &u, &o).is_err());
        // Handed over directly (not read from disk), the entry is refused too.
        let l: LockFile = toml::from_str(&good.replacen(from, to, 1)).unwrap();
        let e = resolve_dataset(&u, l.datasets.get("d"), &o).unwrap_err();
        refused(&e, "lock file");
    }
    // The outside is untouched (the lock itself lives next to the recipe, which is the sandbox).
    let after: BTreeMap<_, _> = sb.outside().into_iter().filter(|(p, _)| *p != lock_path(&recipe)).collect();
    let before: BTreeMap<_, _> = before.into_iter().filter(|(p, _)| *p != lock_path(&recipe)).collect();
    assert_eq!(after, before);
}
