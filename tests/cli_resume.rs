//! Kill-and-resume: SIGKILL or SIGINT in the middle of a stage, then run again. Finished stages
//! are skipped, the interrupted one continues from its checkpoint (its finished chunks are
//! reused, not rebuilt), and nothing half-written ever appears in `objects/`.

mod common;

use common::Sandbox;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Big enough that tokenising takes a while, in small chunks so checkpoints appear early.
fn recipe() -> String {
    r#"[recipe]
name = "resume"
seed = 3

[datasets.small]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 200 }

[datasets.big]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 300000, max_operand = 999, seed = 5 }

[stages.tok]
kind = "tokenizer"
data = ["small"]
vocab_size = 300

[stages.big_data]
kind = "prepare"
tokenizer = "tok"
data = "big"
max_seq_len = 64
chunk_records = 2000
"#
    .to_string()
}

fn first_chunk(work: &Path) -> PathBuf {
    work.join("shards").join("chunk-00000.ids")
}

/// Start a run and wait until the `prepare` stage has written its first complete chunk.
fn start_and_wait_for_checkpoint(sb: &Sandbox, work: &Path) -> std::process::Child {
    let mut child = sb
        .command(&["r.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !work.join("shards").join("chunk-00000.json").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mmrun finished ({status}) before the first checkpoint; make the dataset bigger");
        }
        assert!(Instant::now() < deadline, "no checkpoint after 240 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn keys(sb: &Sandbox) -> (String, String) {
    let plan = sb.plan(&["r.toml"]);
    let key = |n: &str| {
        plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == n).unwrap()["key"].as_str().unwrap().to_string()
    };
    (key("tok"), key("big_data"))
}

fn assert_objects_complete(home: &Path) {
    for e in std::fs::read_dir(home.join("objects-v1")).unwrap().flatten() {
        assert!(e.path().join("manifest.json").is_file(), "{} has no manifest", e.path().display());
    }
}

#[test]
fn sigkill_mid_stage_then_rerun_continues_from_checkpoint() {
    let sb = Sandbox::new();
    sb.write("r.toml", &recipe());
    let (tok_key, data_key) = keys(&sb);
    let work = sb.home().join("work-v1").join(&data_key);
    let mut child = start_and_wait_for_checkpoint(&sb, &work);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert!(sb.home().join("objects-v1").join(&tok_key).join("manifest.json").is_file());
    assert!(!sb.home().join("objects-v1").join(&data_key).exists(), "the killed stage must not be published");
    assert_objects_complete(&sb.home());
    let killed = sb.last_run();
    assert_eq!(killed["stages"]["tok"]["status"], "ran");
    assert_eq!(killed["stages"]["big_data"]["status"], "running", "the record is valid and says how far it got");
    let listing = sb.run_ok(&["runs"]).stdout;
    assert!(listing.contains("killed"), "{listing}");

    let ino = std::fs::metadata(first_chunk(&work)).unwrap().ino();
    sb.run_ok(&["r.toml"]);
    let rec = sb.last_run();
    assert_eq!(rec["stages"]["tok"]["status"], "cached");
    assert_eq!(rec["stages"]["big_data"]["status"], "ran");
    let obj = sb.home().join("objects-v1").join(&data_key);
    assert_eq!(
        std::fs::metadata(obj.join("chunk-00000.ids")).unwrap().ino(),
        ino,
        "the chunk finished before the kill is reused, not rebuilt"
    );
    assert!(!work.exists(), "checkpoints are removed once published");
    assert_objects_complete(&sb.home());
}

#[test]
fn sigint_mid_stage_exits_130_then_resume_continues() {
    let sb = Sandbox::new();
    sb.write("r.toml", &recipe());
    let (_, data_key) = keys(&sb);
    let work = sb.home().join("work-v1").join(&data_key);
    let child = start_and_wait_for_checkpoint(&sb, &work);
    let pid = child.id() as i32;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { kill(pid, 2) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr:\n{stderr}");
    assert!(stderr.contains("interrupted; run the same command or `mmrun resume` to continue"), "{stderr}");
    let rec = sb.last_run();
    assert_eq!(rec["status"], "interrupted");
    assert_eq!(rec["stages"]["big_data"]["status"], "interrupted");
    assert!(!sb.home().join("objects-v1").join(&data_key).exists());
    assert!(first_chunk(&work).exists(), "the checkpoint survives");
    let ino = std::fs::metadata(first_chunk(&work)).unwrap().ino();

    let o = sb.run_ok(&["resume"]);
    assert!(o.stderr.contains("resuming"), "{}", o.stderr);
    let rec = sb.last_run();
    assert_eq!(rec["status"], "succeeded");
    assert_eq!(rec["stages"]["tok"]["status"], "cached");
    assert_eq!(rec["stages"]["big_data"]["status"], "ran");
    let obj = sb.home().join("objects-v1").join(&data_key);
    assert_eq!(std::fs::metadata(obj.join("chunk-00000.ids")).unwrap().ino(), ino);
    // Nothing left to resume.
    let o = sb.run(&["resume"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("no unfinished run"), "{}", o.stderr);
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
