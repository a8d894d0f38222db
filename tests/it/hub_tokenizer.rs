//! A tokenizer stage adopting an `hf://` source (issue 9): the source is resolved once, through the
//! recipe's lock, before planning. Its stage key follows the locked files' sha256s, so when the
//! branch moves on the local test Hub neither the key nor the bytes used change until
//! `mmrun update`, and `mmrun update` then changes both. `mmrun plan` says that the branch moved,
//! and plans offline from the lock.

use crate::common;

use common::Sandbox;
use mmrun::hub::lock::{lock_path, LockFile};
use mmrun::hub::testserver::TestHub;
use mmrun::hub::RepoType;

const RECIPE: &str = "[recipe]\nname = \"hubtok\"\n\n[stages.tok]\nkind = \"tokenizer\"\nsource = \"hf://acme/tok\"\n";

/// A small valid tokenizer (trained like the tokenizer stage does), serialised `pretty` or compact:
/// the same tokenizer in different bytes.
fn tokenizer_json(pretty: bool) -> Vec<u8> {
    let texts: Vec<String> = (0..50).map(|i| format!("hello world {i} the quick brown fox")).collect();
    let tok = mmrun::stages::tokenizer::train(&texts, 320).unwrap();
    tok.to_string(pretty).unwrap().into_bytes()
}

#[test]
fn moving_the_branch_of_an_hf_tokenizer_changes_nothing_until_update() {
    let hub = TestHub::start();
    let (v1, v2) = (tokenizer_json(true), tokenizer_json(false));
    assert_ne!(v1, v2);
    let c1 = hub.commit(
        RepoType::Model,
        "acme/tok",
        "main",
        vec![
            ("tokenizer.json".into(), v1.clone(), false),
            // Weights next to it are not the tokenizer's business: never downloaded.
            ("model.safetensors".into(), vec![7; 4096], true),
        ],
    );
    let sb = Sandbox::new();
    let recipe = sb.write("hubtok.toml", RECIPE);
    let hf_home = sb.root().join("hf");
    let mmrun = |args: &[&str], offline: bool| {
        let mut c = sb.command(args);
        c.env("HF_ENDPOINT", hub.url()).env("HF_HOME", &hf_home).env_remove("HF_TOKEN").env_remove("HF_HUB_CACHE");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        let out = c.output().unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert!(out.status.success(), "mmrun {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
        (stdout, stderr)
    };
    let plan_key = |offline: bool| {
        let (stdout, stderr) = mmrun(&["plan", "--json", "hubtok.toml"], offline);
        let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        (plan["stages"][0]["key"].as_str().unwrap().to_string(), stderr)
    };
    let run = || {
        mmrun(&["hubtok.toml"], false);
        let rec = sb.last_run();
        let tok = &rec["stages"]["tok"];
        let key = tok["key"].as_str().unwrap().to_string();
        let bytes = std::fs::read(sb.home().join("objects-v1").join(&key).join("tokenizer.json")).unwrap();
        (key, tok["status"].as_str().unwrap().to_string(), bytes)
    };

    let (k1, status, bytes) = run();
    assert_eq!((status.as_str(), bytes == v1), ("ran", true));
    let lock = LockFile::load(&lock_path(&recipe)).unwrap().expect("the run pins the tokenizer");
    let pinned = &lock.tokenizers["tok"];
    assert_eq!((pinned.commit.as_str(), pinned.revision.as_str()), (c1.as_str(), "main"));
    assert_eq!(pinned.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["tokenizer.json"]);
    let snapshot = hf_home.join("hub/models--acme--tok/snapshots").join(&c1);
    assert!(snapshot.join("tokenizer.json").is_file() && !snapshot.join("model.safetensors").exists());

    // Offline, the plan comes from the lock and the HF cache alone.
    hub.clear_seen();
    assert_eq!(plan_key(true).0, k1);
    assert!(hub.seen().is_empty(), "an offline plan made requests: {:?}", hub.seen());

    // The branch moves to different bytes: same key, same bytes, and `plan` says it moved.
    let c2 = hub.commit(RepoType::Model, "acme/tok", "main", vec![("tokenizer.json".into(), v2.clone(), false)]);
    let (k, stderr) = plan_key(false);
    assert_eq!(k, k1, "a moved branch must not change the key before `mmrun update`");
    assert!(stderr.contains("tokenizer tok: branch main of acme/tok has moved"), "{stderr}");
    assert!(stderr.contains(&c2[..12]) && stderr.contains("mmrun update"), "{stderr}");
    let (k, status, bytes) = run();
    assert_eq!((k.as_str(), status.as_str(), bytes == v1), (k1.as_str(), "cached", true));
    assert_eq!(LockFile::load(&lock_path(&recipe)).unwrap().unwrap().tokenizers["tok"].commit, c1);

    // `mmrun update` re-pins it: a new key, and the new bytes.
    let (stdout, _) = mmrun(&["update", "hubtok.toml"], false);
    assert!(stdout.contains("tokenizer tok: hf://acme/tok") && stdout.contains(&c2), "{stdout}");
    assert_eq!(LockFile::load(&lock_path(&recipe)).unwrap().unwrap().tokenizers["tok"].commit, c2);
    let (k2, stderr) = plan_key(false);
    assert_ne!(k2, k1);
    assert!(!stderr.contains("has moved"), "{stderr}");
    let (k, status, bytes) = run();
    assert_eq!((k.as_str(), status.as_str(), bytes == v2), (k2.as_str(), "ran", true));
}
