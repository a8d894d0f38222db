//! Kill-and-resume: SIGKILL or SIGINT in the middle of a stage, then run again. Finished stages
//! are skipped, the interrupted one continues from its checkpoint (its finished chunks are
//! reused, not rebuilt), and nothing half-written ever appears in `objects/`.

use crate::common;

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

/// `lines` lines of pseudo-random words (a few thousand distinct ones): long lines, so reading the
/// file is quick next to counting and merging its words, which takes the BPE trainer seconds.
fn corpus(lines: usize, words_per_line: usize) -> String {
    const SYLLABLES: [&str; 16] =
        ["ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "ban", "del", "fir", "gos", "hul", "jen", "kor", "lim"];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = String::new();
    for _ in 0..lines {
        for w in 0..words_per_line {
            if w > 0 {
                out.push(' ');
            }
            let r = next();
            for i in 0..(2 + r % 3) {
                out.push_str(SYLLABLES[((r >> (8 + 4 * i)) & 15) as usize]);
            }
        }
        out.push('\n');
    }
    out
}

/// Ctrl-C while the tokenizer trains: the stage stops (exit 130, nothing published, the record
/// says `interrupted`) instead of finishing first, and the next run trains it from the start.
/// Whether the stage finished is what is checked, not how long it took.
#[test]
fn sigint_while_training_a_tokenizer_stops_the_stage_then_a_rerun_trains_it() {
    let sb = Sandbox::new();
    sb.write("corpus.txt", &corpus(150, 8000));
    sb.write(
        "r.toml",
        "[recipe]\nname = \"tokint\"\n\n[datasets.corpus]\nsource = \"corpus.txt\"\nformat = \"text\"\n\n\
         [stages.tok]\nkind = \"tokenizer\"\ndata = [\"corpus\"]\nvocab_size = 3000\n",
    );
    let plan = sb.plan(&["r.toml"]);
    let key = plan["stages"][0]["key"].as_str().unwrap().to_string();
    let mut child = sb
        .command(&["r.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The record says `running` once the stage has started reading its data.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mmrun finished ({status}) before the stage started; make the corpus bigger");
        }
        if sb.runs_json().last().is_some_and(|r| r["stages"]["tok"]["status"] == "running") {
            break;
        }
        assert!(Instant::now() < deadline, "the stage did not start within 240 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { kill(child.id() as i32, 2) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "the stage ignored Ctrl-C; stderr:\n{stderr}");
    let rec = sb.last_run();
    assert_eq!(rec["status"], "interrupted");
    assert_eq!(rec["stages"]["tok"]["status"], "interrupted", "the stage finished instead of stopping");
    assert!(!sb.home().join("objects-v1").join(&key).exists(), "nothing is published");
    let leftovers: Vec<_> =
        std::fs::read_dir(sb.home().join("tmp-v1")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "the half-built artifact is discarded: {leftovers:?}");

    sb.run_ok(&["r.toml"]);
    let rec = sb.last_run();
    assert_eq!(rec["stages"]["tok"]["status"], "ran");
    assert!(sb.home().join("objects-v1").join(&key).join("manifest.json").is_file());
    assert_objects_complete(&sb.home());
}

/// The cache key of stage `name` in the plan of `r.toml`.
fn stage_key(sb: &Sandbox, name: &str) -> String {
    let plan = sb.plan(&["r.toml"]);
    plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["key"].as_str().unwrap().to_string()
}

/// Run `r.toml` and SIGKILL it once the stage with cache key `key` has written a complete
/// checkpoint (it must checkpoint after every step: `save_every_secs = 0`). Returns the newest
/// checkpoint's step, which survives the kill.
fn sigkill_after_first_checkpoint(sb: &Sandbox, key: &str) -> usize {
    let ckpts = sb.home().join("work-v1").join(key).join("checkpoints");
    let complete = || -> Vec<usize> {
        let mut v: Vec<usize> = std::fs::read_dir(&ckpts)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("state.json").is_file())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut child = sb
        .command(&["r.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    while complete().is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mmrun finished ({status}) before the stage wrote a checkpoint");
        }
        assert!(Instant::now() < deadline, "no checkpoint after 240 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!sb.home().join("objects-v1").join(key).exists(), "the killed stage must not be published");
    *complete().last().expect("the checkpoint survives the kill")
}

/// A recipe with a 2-step tiny `base` on arithmetic text (its tokenizer `tok`), then `rest`: the
/// datasets and the stage the SIGKILL tests interrupt.
fn killable_recipe(name: &str, rest: &str) -> String {
    format!(
        r#"[recipe]
name = "{name}"
seed = 3

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
max_steps = 2

{rest}"#
    )
}

/// A LoRA stage with the time-based checkpoint interval at 0 (after every step), killed with
/// SIGKILL once a checkpoint exists: the rerun continues from the newest checkpoint.
#[test]
fn sigkill_during_lora_then_rerun_resumes_from_its_last_checkpoint() {
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        &killable_recipe(
            "lorakill",
            r#"[datasets.chat]
source = "builtin:arithmetic"
format = "sharegpt"
builtin = { count = 200, seed = 2 }

[stages.adapt]
kind = "lora"
from = "base"
data = "chat"
rank = 4
max_seq_len = 64
batch_size = 2
max_steps = 60
save_every_secs = 0
"#,
        ),
    );
    let key = stage_key(&sb, "adapt");
    let newest = sigkill_after_first_checkpoint(&sb, &key);

    let o = sb.run_ok(&["r.toml"]);
    assert!(o.stderr.contains("resuming"), "{}", o.stderr);
    let rec = sb.last_run();
    assert_eq!(rec["stages"]["base"]["status"], "cached");
    assert_eq!(rec["stages"]["adapt"]["status"], "ran");
    assert_eq!(rec["stages"]["adapt"]["metrics"]["resumed_from"], newest, "continues from the newest checkpoint");
    assert_eq!(rec["stages"]["adapt"]["metrics"]["steps"], 60);
    assert!(!sb.home().join("work-v1").join(&key).exists(), "checkpoints are removed once published");
    assert_objects_complete(&sb.home());
}

/// An agent stage (multi-turn tool episodes sampled during training) killed with SIGKILL after a
/// checkpoint, then run again: it continues from the checkpoint and ends with exactly the weights
/// of an uninterrupted run (the episodes are re-sampled identically), byte for byte.
#[test]
fn sigkill_during_agent_then_rerun_gives_the_uninterrupted_weights() {
    let recipe = killable_recipe(
        "agentkill",
        r#"[datasets.tasks]
source = "builtin:tool_use"
format = "prompt_answer"
builtin = { count = 16, tools = ["calculator"] }

[stages.agent]
kind = "agent"
from = "base"
data = "tasks"
max_turns = 2
num_generations = 2
max_new_tokens = 8
batch_size = 1
max_steps = 8
lr = 1e-3
save_every_secs = 0
"#,
    );
    let (killed, whole) = (Sandbox::new(), Sandbox::new());
    killed.write("r.toml", &recipe);
    whole.write("r.toml", &recipe);
    let key = stage_key(&killed, "agent");
    let newest = sigkill_after_first_checkpoint(&killed, &key);
    assert!(newest < 8, "killed mid-stage");

    let o = killed.run_ok(&["r.toml"]);
    assert!(o.stderr.contains("resuming"), "{}", o.stderr);
    let rec = killed.last_run();
    assert_eq!(rec["stages"]["base"]["status"], "cached");
    assert_eq!(rec["stages"]["agent"]["status"], "ran");
    assert_eq!(rec["stages"]["agent"]["metrics"]["resumed_from"], newest, "continues from the newest checkpoint");
    assert_eq!(rec["stages"]["agent"]["metrics"]["steps"], 8);

    whole.run_ok(&["r.toml"]);
    assert_eq!(whole.last_run()["stages"]["agent"]["key"], key.as_str(), "the same stage");
    let weights =
        |sb: &Sandbox| std::fs::read(sb.home().join("objects-v1").join(&key).join("model.safetensors")).unwrap();
    assert!(weights(&killed) == weights(&whole), "the resumed agent's weights differ from an uninterrupted run's");
    assert_objects_complete(&killed.home());
}
