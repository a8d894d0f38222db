//! The remote cache (`[cache] remote`) against real stores: a `file://` store on a temp dir and
//! moto's S3 server on loopback (`scripts/start-s3.sh`; the S3 tests skip with a notice when it
//! does not answer and fail instead under `MMRUN_REQUIRE_S3=1`). Two caches share artifacts
//! through the remote (both stores), a corrupted remote object is refused (`file://`: the check
//! runs on downloaded bytes, whatever the store), an unreachable remote degrades to local work
//! with a warning, and `push-cache` / `pull-cache` move a whole run.

use crate::common;

use common::{expect, statuses, Sandbox};
use std::path::Path;

/// tokenizer → pretrain on a tiny model and built-in data, with a remote cache.
fn recipe(remote: &str) -> String {
    format!(
        r#"[recipe]
name = "remote"
seed = 7
device = "cpu"
precision = "f32"

[cache]
remote = "{remote}"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = {{ count = 200 }}

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 400

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 32
batch_size = 4
max_steps = 3
"#
    )
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Training steps this run logged (a stage served from a cache logs none).
fn trained_steps(sb: &Sandbox) -> usize {
    let run = sb.last_run();
    let m = std::fs::read_to_string(sb.run_dir(run["id"].as_str().unwrap()).join("metrics.jsonl")).unwrap_or_default();
    m.lines().filter(|l| l.contains("\"step\"")).count()
}

/// `(path, blake3)` of every file of the stage's object in `sb`'s cache.
fn object_files(sb: &Sandbox, stage: &str) -> Vec<(String, String)> {
    let run = sb.last_run();
    let key = run["stages"][stage]["key"].as_str().unwrap();
    let text = std::fs::read_to_string(sb.home().join("objects-v1").join(key).join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["blake3"].as_str().unwrap().to_string()))
        .collect()
}

/// Machine A builds and pushes; machine B (another cache, same remote) downloads instead of
/// training, and gets the same files.
fn two_caches_share(remote: &str, env: &[(&str, &str)]) {
    let a = Sandbox::new();
    a.write("r.toml", &recipe(remote));
    let out = a.command(&["r.toml"]).envs(env.iter().copied()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("pushed to the remote cache"), "{err}");
    assert!(trained_steps(&a) > 0);

    let b = Sandbox::new();
    b.write("r.toml", &recipe(remote));
    let out = b.command(&["r.toml"]).envs(env.iter().copied()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("downloaded from the remote cache"), "{err}");
    assert_eq!(statuses(&b.last_run()), expect(&[("tok", "cached"), ("base", "cached")]));
    assert_eq!(trained_steps(&b), 0, "machine B trained although the remote had the model: {err}");
    for stage in ["tok", "base"] {
        assert_eq!(object_files(&a, stage), object_files(&b, stage), "{stage}");
    }
    // B verifies what it downloaded like anything else in its cache.
    b.run_ok(&["verify"]);
}

#[test]
fn two_caches_share_artifacts_through_a_file_remote() {
    let remote = tempfile::tempdir().unwrap();
    two_caches_share(&file_url(remote.path()), &[]);
}

#[test]
fn a_corrupted_remote_object_is_refused_and_built_locally() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = Sandbox::new();
    a.write("r.toml", &recipe(&url));
    a.run_ok(&["r.toml"]);
    // Flip a byte of the pretrained weights (same size, different content); the tokenizer files
    // the model carries are the tokenizer stage's blobs too and stay intact.
    let model = object_files(&a, "base");
    for (_, blake3) in model.iter().filter(|(p, _)| p.ends_with(".safetensors")) {
        let p = remote.path().join("blobs-v1").join(blake3);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
    }

    let b = Sandbox::new();
    b.write("r.toml", &recipe(&url));
    let out = b.run_ok(&["r.toml"]);
    assert!(out.stderr.contains("refused") && out.stderr.contains("blake3"), "{}", out.stderr);
    assert_eq!(statuses(&b.last_run()), expect(&[("tok", "cached"), ("base", "ran")]));
    assert!(trained_steps(&b) > 0);
    b.run_ok(&["verify"]);
}

#[test]
fn an_unreachable_remote_degrades_to_local_work_with_a_warning() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sb = Sandbox::new();
    sb.write("r.toml", &recipe("s3://nowhere/cache"));
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = sb
        .command(&["r.toml"])
        .envs(s3_env(&endpoint))
        .env("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("warning: remote cache s3://nowhere/cache"), "{err}");
    assert!(err.contains("continuing with the local cache only"), "{err}");
    assert!(!err.contains("do-not-print-me"), "a credential was printed: {err}");
    assert_eq!(statuses(&sb.last_run()), expect(&[("tok", "ran"), ("base", "ran")]));
    // Said once, not once per stage.
    assert_eq!(err.matches("continuing with the local cache only").count(), 1, "{err}");
}

#[test]
fn push_cache_and_pull_cache_move_a_whole_run() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let sb = Sandbox::new();
    // Built without a remote, then pushed by hand.
    sb.write("r.toml", &recipe(&url).replace("[cache]\nremote", "[cache]\n# remote"));
    sb.run_ok(&["r.toml"]);
    let run = sb.last_run();
    let id = run["id"].as_str().unwrap();
    let out = sb.run_ok(&["push-cache", id, "--remote", &url]);
    assert!(out.stderr.contains("2 pushed"), "{}", out.stderr);
    let out = sb.run_ok(&["push-cache", id, "--remote", &url]);
    assert!(out.stderr.contains("0 pushed, 2 already there"), "{}", out.stderr);

    // Another cache pulls the whole run into itself.
    let other = sb.root().join("other-home");
    let out = sb.command(&["--home", other.to_str().unwrap(), "pull-cache", id, "--remote", &url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("2 downloaded"), "{err}");
    for stage in ["tok", "base"] {
        let key = run["stages"][stage]["key"].as_str().unwrap();
        assert!(other.join("objects-v1").join(key).join("manifest.json").is_file(), "{stage}");
    }
}

/// moto's endpoint (`MMRUN_TEST_S3_ENDPOINT`, default the one `scripts/start-s3.sh` starts), or
/// `None` (a printed skip) when nothing answers there and S3 is not required.
fn s3_endpoint() -> Option<String> {
    let endpoint = std::env::var("MMRUN_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5123".into());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    if agent.get(&endpoint).call().is_ok() {
        return Some(endpoint);
    }
    assert!(
        std::env::var("MMRUN_REQUIRE_S3").as_deref() != Ok("1"),
        "an S3 server is required (MMRUN_REQUIRE_S3=1) but none answers at {endpoint}; run scripts/start-s3.sh"
    );
    eprintln!("SKIP: no S3 server at {endpoint} (scripts/start-s3.sh starts moto on loopback)");
    None
}

/// A fresh bucket on `endpoint` (moto accepts unsigned requests), unique to this test process.
fn s3_bucket(endpoint: &str, tag: &str) -> String {
    let bucket = format!("mmrun-{tag}-{}", std::process::id());
    let resp = ureq::put(format!("{endpoint}/{bucket}")).send_empty().unwrap();
    assert!(resp.status().is_success(), "creating bucket {bucket}: {}", resp.status());
    bucket
}

#[test]
fn two_caches_share_artifacts_through_s3() {
    let Some(endpoint) = s3_endpoint() else { return };
    let bucket = s3_bucket(&endpoint, "share");
    let env = s3_env(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    two_caches_share(&format!("s3://{bucket}/team/cache"), &env);
}

fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}
