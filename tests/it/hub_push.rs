//! `mmrun push` against the local test Hub (`mmrun::hub::testserver`) on 127.0.0.1: the binary
//! uploads through the Hub's real upload API (create, preupload, LFS batch + PUT + verify, NDJSON
//! commit), and the existing download client then returns the same bytes. A second push (or a push
//! rerun after an interrupted one) sends no LFS object again; a file above the Hub's multipart
//! threshold goes up in parts and is assembled to its sha256. Missing or refused tokens and bad
//! repository names fail with one line, the latter before any request.

use crate::common;

use common::{Output, Sandbox};
use mmrun::hub::push::{push_folder, PushOptions, PushTarget};
use mmrun::hub::testserver::{Faults, TestHub};
use mmrun::hub::{HubError, HubOptions, HubUri, RepoType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TOKEN: &str = "hf_test_write";

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

/// A transformers folder of the tiny golden Qwen3 (config, weights, tokenizer files).
fn model_folder(root: &Path) -> PathBuf {
    let dir = root.join("tiny");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen3_tiny").join(f), dir.join(f)).unwrap();
    }
    let cfg = serde_json::json!({ "eos_token": "<|im_end|>", "chat_template": mmrun::data::chat::REFERENCE_TEMPLATE });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    // In a subfolder, and empty: it goes as a regular file although its name asks for LFS.
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    std::fs::write(dir.join("extra/empty.safetensors"), b"").unwrap();
    dir
}

/// Every file under `dir` by its `/`-separated relative path.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn push(sb: &Sandbox, hub: &TestHub, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = sb.command(&[&["push"], args].concat());
    c.env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", sb.root().join("hf"))
        .env("HF_HUB_CACHE", sb.root().join("hf/hub"))
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_OFFLINE");
    match token {
        Some(t) => c.env("HF_TOKEN", t),
        None => c.env_remove("HF_TOKEN"),
    };
    let out = c.output().expect("spawn mmrun");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        seconds: 0.0,
    }
}

fn ok(o: Output) -> Output {
    assert_eq!(o.code, Some(0), "push failed\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    o
}

/// The one error line of a failed command.
fn error_line(o: &Output) -> String {
    assert_eq!(o.code, Some(1), "expected a failure\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{}", o.stderr);
    lines[0].to_string()
}

fn count(hub: &TestHub, method: &str, needle: &str) -> usize {
    hub.seen().iter().filter(|s| s.method == method && s.target.contains(needle)).count()
}

/// Download `hf://<repo>` with the existing client, as a model reference resolves it.
fn download(hub: &TestHub, repo: &str, cache: &Path) -> BTreeMap<String, Vec<u8>> {
    let opts = HubOptions { endpoint: hub.url(), token: None, cache_dir: cache.into(), ..HubOptions::from_env() };
    let m = mmrun::modelref::fetch_hub_model(&HubUri::parse(&format!("hf://{repo}")).unwrap(), &opts)
        .unwrap_or_else(|e| panic!("downloading {repo}: {e:?}"));
    m.files.iter().map(|f| (f.repo_path.clone(), std::fs::read(&f.local_path).unwrap())).collect()
}

#[test]
fn pushed_folder_downloads_byte_identical_and_a_second_push_sends_no_lfs_object() {
    let hub = TestHub::start();
    hub.set_write_token(TOKEN);
    let sb = Sandbox::new();
    let dir = model_folder(sb.root());
    let o = ok(push(&sb, &hub, Some(TOKEN), &[dir.to_str().unwrap(), "hf://me/tiny", "-m", "first"]));
    let commit = o.stdout.lines().find_map(|l| l.strip_prefix("commit ")).expect("commit line").to_string();
    assert!(o.stdout.contains(&format!("{}/me/tiny/commit/{commit}", hub.url())), "{}", o.stdout);
    assert!(o.stdout.contains("1 large files uploaded, 0 already on the Hub"), "{}", o.stdout);

    // What the Hub stores is the folder, byte for byte (plus the .gitattributes it created).
    let mut stored = hub.files(RepoType::Model, "me/tiny", "main").unwrap();
    assert!(stored.remove(".gitattributes").is_some());
    assert_eq!(stored, files_of(&dir));
    // The token went to the Hub, never to the presigned upload URL (the test CDN refuses it).
    let seen = hub.seen();
    let put = seen.iter().find(|s| s.method == "PUT").expect("one LFS upload");
    assert!(put.authorization.is_none() && put.status == 200, "{put:?}");
    assert!(seen
        .iter()
        .filter(|s| s.method == "POST")
        .all(|s| s.authorization.as_deref() == Some("Bearer hf_test_write")));
    assert_eq!(count(&hub, "POST", "/objects/verify"), 1);

    // Downloaded through the client a `hf://` model reference uses: the same bytes.
    let got = download(&hub, "me/tiny", &sb.root().join("dl"));
    let want = files_of(&dir);
    for (path, data) in &got {
        assert_eq!(Some(data), want.get(path), "{path} differs after the round trip");
    }
    assert!(got.contains_key("model.safetensors") && got.contains_key("config.json"), "{:?}", got.keys());

    // Pushing again: the repository exists (409 is fine) and the weights are not sent again.
    hub.clear_seen();
    let o = ok(push(&sb, &hub, Some(TOKEN), &[dir.to_str().unwrap(), "hf://me/tiny"]));
    assert!(o.stdout.contains("0 large files uploaded, 1 already on the Hub"), "{}", o.stdout);
    assert_eq!(count(&hub, "PUT", ""), 0);
    assert_eq!(count(&hub, "POST", "/api/models/me/tiny/commit/main"), 1);
    assert!(hub.seen().iter().any(|s| s.target == "/api/repos/create" && s.status == 409));
}

#[test]
fn a_push_interrupted_before_its_commit_resumes_without_uploading_again() {
    let hub = TestHub::start();
    hub.set_write_token(TOKEN);
    let sb = Sandbox::new();
    let dir = model_folder(sb.root());
    hub.set_faults(Faults { reject_commit: 1, ..Faults::default() });
    let e = error_line(&push(&sb, &hub, Some(TOKEN), &[dir.to_str().unwrap(), "hf://me/resume"]));
    assert!(e.contains("hf://me/resume") && e.contains("422") && e.contains("rerun `mmrun push`"), "{e}");
    assert_eq!(count(&hub, "PUT", ""), 1);
    assert!(hub.files(RepoType::Model, "me/resume", "main").unwrap().len() == 1, "nothing but .gitattributes yet");

    hub.clear_seen();
    let o = ok(push(&sb, &hub, Some(TOKEN), &[dir.to_str().unwrap(), "hf://me/resume"]));
    assert!(o.stdout.contains("0 large files uploaded, 1 already on the Hub"), "{}", o.stdout);
    assert_eq!(count(&hub, "PUT", ""), 0);
    let got = download(&hub, "me/resume", &sb.root().join("dl"));
    assert_eq!(got.get("model.safetensors"), files_of(&dir).get("model.safetensors"));
}

#[test]
fn a_hub_model_is_exported_then_pushed() {
    let hub = TestHub::start();
    hub.set_write_token(TOKEN);
    let sb = Sandbox::new();
    let src = files_of(&model_folder(sb.root()));
    hub.commit(
        RepoType::Model,
        "up/stream",
        "main",
        src.iter().map(|(p, d)| (p.clone(), d.clone(), p.ends_with(".safetensors"))).collect(),
    );
    let o = ok(push(&sb, &hub, Some(TOKEN), &["hf://up/stream", "hf://me/copy", "--private"]));
    assert!(o.stdout.contains("pushed hf://up/stream"), "{}", o.stdout);
    let stored = hub.files(RepoType::Model, "me/copy", "main").unwrap();
    // The export wrote a model card; the weights and config are the source's bytes.
    assert!(stored.get("README.md").is_some_and(|c| String::from_utf8_lossy(c).contains("hf://up/stream")));
    for f in ["model.safetensors", "config.json"] {
        assert_eq!(stored.get(f), src.get(f), "{f}");
    }
    // --private: reading it back needs the token.
    let opts =
        HubOptions { endpoint: hub.url(), token: None, cache_dir: sb.root().join("dl"), ..HubOptions::from_env() };
    assert!(mmrun::modelref::fetch_hub_model(&HubUri::parse("hf://me/copy").unwrap(), &opts).is_err());
}

#[test]
fn missing_or_refused_tokens_and_bad_names_fail_with_one_line() {
    let hub = TestHub::start();
    hub.set_write_token(TOKEN);
    let sb = Sandbox::new();
    let dir = model_folder(sb.root());
    let dir = dir.to_str().unwrap();

    // No token anywhere: refused before any request.
    let e = error_line(&push(&sb, &hub, None, &[dir, "hf://me/tiny"]));
    assert!(e.contains("hf://me/tiny") && e.contains("HF_TOKEN") && e.contains("write access"), "{e}");
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());

    // A token the Hub does not accept: 401, named with the repository and the fix.
    let e = error_line(&push(&sb, &hub, Some("hf_wrong"), &[dir, "hf://me/tiny"]));
    assert!(
        e.contains("hf://me/tiny") && e.contains("401") && e.contains("HF_TOKEN") && e.contains("write access"),
        "{e}"
    );
    assert!(hub.files(RepoType::Model, "me/tiny", "main").is_none());

    // Names that are not a model repository id: refused before any request.
    hub.clear_seen();
    for bad in
        ["hf://bad name/x", "hf://me/x/config.json", "hf://datasets/me/x", "me/x", "hf://me/x@..", "hf://me/-/.."]
    {
        let e = error_line(&push(&sb, &hub, Some(TOKEN), &[dir, bad]));
        assert!(e.contains(bad), "{e}");
    }
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());

    // An unreachable endpoint: the error names the URL (library call, to keep the retries short).
    let opts = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        token: Some(mmrun::hub::Token::new(TOKEN)),
        max_retries: 1,
        backoff_base: std::time::Duration::from_millis(10),
        ..HubOptions::from_env()
    };
    let target = PushTarget::parse("hf://me/tiny").unwrap();
    let e = push_folder(Path::new(dir), &target, &opts, &PushOptions::default()).unwrap_err();
    assert!(
        matches!(e, HubError::Network { .. }) && e.to_string().contains("http://127.0.0.1:9/api/repos/create"),
        "{e}"
    );
}

#[test]
fn a_large_file_goes_up_in_parts_assembles_to_its_sha256_and_a_second_push_sends_nothing() {
    use sha2::Digest;
    let hub = TestHub::start();
    hub.set_write_token(TOKEN);
    let sb = Sandbox::new();
    let dir = model_folder(sb.root());
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    // Three parts, the last one shorter; a small LFS file stays a single PUT.
    let chunk = weights.len() as u64 / 3 + 1;
    hub.set_multipart(1000, chunk);
    // The storage fails one part once: that part alone is sent again.
    hub.set_faults(Faults { fail_parts: 1, ..Faults::default() });
    std::fs::write(dir.join("small.safetensors"), [7u8; 100]).unwrap();
    let opts = HubOptions {
        endpoint: hub.url(),
        token: Some(mmrun::hub::Token::new(TOKEN)),
        cache_dir: sb.root().join("hf/hub"),
        backoff_base: std::time::Duration::from_millis(5),
        backoff_max: std::time::Duration::from_millis(20),
        ..HubOptions::from_env()
    };
    let target = PushTarget::parse("hf://me/big").unwrap();
    let pushed = push_folder(&dir, &target, &opts, &PushOptions { message: "parts".into(), ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((pushed.uploaded, pushed.already_there), (2, 0));
    assert_eq!(count(&hub, "PUT", "/lfs-part/"), 4, "three parts, one of them twice");
    assert_eq!(count(&hub, "PUT", "/lfs-upload/"), 1, "below the threshold: one PUT");
    let seen = hub.seen();
    let puts: Vec<_> = seen.iter().filter(|s| s.method == "PUT").collect();
    assert!(puts.iter().all(|s| s.authorization.is_none()), "{puts:?}");
    assert_eq!(puts.iter().filter(|s| s.status == 500).count(), 1, "{puts:?}");
    let failed = puts.iter().find(|s| s.status == 500).unwrap();
    assert_eq!(puts.iter().filter(|s| s.target == failed.target).count(), 2, "the failed part is retried: {puts:?}");
    let done: Vec<_> = seen.iter().filter(|s| s.target.starts_with("/api/complete_multipart")).collect();
    assert_eq!(done.len(), 1, "{seen:?}");
    assert_eq!(done[0].status, 200, "the Hub accepted the parts' ETags and the assembled sha256");
    let stored = hub.files(RepoType::Model, "me/big", "main").unwrap();
    let assembled = &stored["model.safetensors"];
    assert_eq!(hex::encode(sha2::Sha256::digest(assembled)), hex::encode(sha2::Sha256::digest(&weights)));
    assert_eq!(assembled, &weights);

    // Everything is on the Hub now: a second push uploads nothing, in parts or whole.
    hub.clear_seen();
    let again = push_folder(&dir, &target, &opts, &PushOptions { message: "again".into(), ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.uploaded, again.already_there), (0, 2));
    assert_eq!(count(&hub, "PUT", ""), 0);
    assert_eq!(count(&hub, "POST", "complete_multipart"), 0);
}
