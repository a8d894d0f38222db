//! `--executor slurm` against a real single-node Slurm cluster (`scripts/start-slurm.sh`): the
//! same artifacts as a local run, a failed stage cancels its dependents and the run resumes,
//! Ctrl-C cancels the jobs, a rerun submits only stale stages.
//!
//! Skips with a notice when `sbatch` is absent; fails instead under `MMRUN_REQUIRE_SLURM=1`.

use crate::common;

use common::{expect, statuses, Sandbox};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn slurm_available() -> bool {
    let ok = std::process::Command::new("sbatch").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("MMRUN_REQUIRE_SLURM").as_deref() != Ok("1"),
            "sbatch is required (MMRUN_REQUIRE_SLURM=1) but missing; run scripts/start-slurm.sh"
        );
        eprintln!("SKIP: sbatch not found (scripts/start-slurm.sh starts a single-node cluster)");
    }
    ok
}

/// tokenizer → pretrain → sft → eval on a tiny model and built-in data.
const RECIPE: &str = r#"[recipe]
name = "slurmtest"
seed = 5
device = "cpu"
resources = { cpus = 1 }

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 300 }

[datasets.chat]
source = "chat.jsonl"
format = "sharegpt"

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
max_steps = 4

[stages.sft]
kind = "sft"
from = "base"
data = "chat"
max_seq_len = 64
batch_size = 4
max_steps = 3

[stages.report]
kind = "eval"
models = ["base", "sft"]
prompts = ["What is 1 + 2?"]
generation = { max_new_tokens = 4 }
"#;

fn chat_records(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"conversations\":[{{\"from\":\"human\",\"value\":\"What is {i} + 1?\"}},{{\"from\":\"gpt\",\"value\":\"{}\"}}]}}\n",
                i + 1
            )
        })
        .collect()
}

fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write("r.toml", RECIPE);
    sb.write("chat.jsonl", &chat_records(40));
    sb
}

fn slurm(sb: &Sandbox, args: &[&str]) -> std::process::Command {
    let mut a = vec!["--executor", "slurm"];
    a.extend_from_slice(args);
    let mut c = sb.command(&a);
    c.env("MMRUN_SLURM_POLL_MS", "200");
    c
}

fn run_slurm(sb: &Sandbox, args: &[&str]) -> (Option<i32>, String) {
    let out = slurm(sb, args).output().expect("spawn mmrun");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `{path: blake3}` of every file of every object, by stage name.
fn artifacts(sb: &Sandbox, run: &serde_json::Value) -> BTreeMap<String, (String, Vec<(String, String)>)> {
    let mut out = BTreeMap::new();
    for (name, st) in run["stages"].as_object().unwrap() {
        let key = st["key"].as_str().unwrap().to_string();
        let text = std::fs::read_to_string(sb.home().join("objects-v1").join(&key).join("manifest.json")).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        let files = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["path"].as_str().unwrap().to_string(), f["blake3"].as_str().unwrap().to_string()))
            .collect();
        out.insert(name.clone(), (key, files));
    }
    out
}

fn job_ids(run: &serde_json::Value) -> BTreeMap<String, String> {
    run["stages"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(n, s)| s["job"].as_str().map(|j| (n.clone(), j.trim_start_matches("slurm:").to_string())))
        .collect()
}

fn job_state(id: &str) -> String {
    let out = std::process::Command::new("scontrol").args(["show", "job", "-o", id]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().find_map(|kv| kv.strip_prefix("JobState=")).unwrap_or("GONE").to_string()
}

#[test]
fn slurm_builds_the_same_artifacts_as_local_and_reruns_submit_only_stale_stages() {
    if !slurm_available() {
        return;
    }
    let local = sandbox();
    local.run_ok(&["r.toml"]);
    let sb = sandbox();
    let (code, err) = run_slurm(&sb, &["r.toml"]);
    assert_eq!(code, Some(0), "{err}");
    let run = sb.last_run();
    assert_eq!(statuses(&run), expect(&[("tok", "ran"), ("base", "ran"), ("sft", "ran"), ("report", "ran")]));
    assert_eq!(artifacts(&sb, &run), artifacts(&local, &local.last_run()), "slurm and local artifacts differ");
    assert_eq!(job_ids(&run).len(), 4);
    let run_dir = sb.run_dir(run["id"].as_str().unwrap());
    let log = std::fs::read_to_string(run_dir.join("slurm/base.log")).unwrap();
    assert!(log.contains("base (pretrain): ran"), "{log}");
    assert!(err.contains("  [base] "), "job logs are streamed: {err}");
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"stage\":\"base\"") && metrics.contains("\"stage\":\"sft\""), "{metrics}");

    // Everything cached: nothing is submitted.
    let (code, err) = run_slurm(&sb, &["r.toml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("submitted"), "{err}");
    assert!(job_ids(&sb.last_run()).is_empty());

    // A change to sft resubmits sft and its dependent only, chained after nothing cached.
    let (code, err) = run_slurm(&sb, &["r.toml", "--set", "stages.sft.max_steps=2"]);
    assert_eq!(code, Some(0), "{err}");
    let run = sb.last_run();
    assert_eq!(statuses(&run), expect(&[("tok", "cached"), ("base", "cached"), ("sft", "ran"), ("report", "ran")]));
    assert_eq!(job_ids(&run).keys().collect::<Vec<_>>(), ["report", "sft"]);
}

#[test]
fn a_failed_stage_cancels_its_dependents_and_the_same_command_resumes() {
    if !slurm_available() {
        return;
    }
    let sb = sandbox();
    sb.write("chat.jsonl", &(chat_records(5) + "{\"conversations\": [\n"));
    let (code, err) = run_slurm(&sb, &["r.toml"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("chat.jsonl:6"), "the job's error reaches the user: {err}");
    let run = sb.last_run();
    assert_eq!(run["status"], "failed");
    assert_eq!(statuses(&run), expect(&[("tok", "ran"), ("base", "ran"), ("sft", "failed"), ("report", "cancelled")]));
    assert!(run["stages"]["sft"]["error"].as_str().unwrap().contains("chat.jsonl:6"));
    let report = &job_ids(&run)["report"];
    assert_eq!(job_state(report), "CANCELLED", "the dependent job is cancelled in Slurm too");

    // Fix the data, run the same command: only the stale stages are submitted.
    sb.write("chat.jsonl", &chat_records(40));
    let (code, err) = run_slurm(&sb, &["r.toml"]);
    assert_eq!(code, Some(0), "{err}");
    let run = sb.last_run();
    assert_eq!(statuses(&run), expect(&[("tok", "cached"), ("base", "cached"), ("sft", "ran"), ("report", "ran")]));
    assert_eq!(job_ids(&run).keys().collect::<Vec<_>>(), ["report", "sft"]);
}

/// Whether the stage's training loop has logged a step into the run's `metrics.jsonl` (the job
/// appends there): from then on Ctrl-C makes it save a checkpoint before it stops.
fn training_has_begun(sb: &Sandbox, stage: &str) -> bool {
    let Some(run) = sb.runs_json().pop() else { return false };
    let metrics = sb.run_dir(run["id"].as_str().unwrap()).join("metrics.jsonl");
    std::fs::read_to_string(metrics).is_ok_and(|t| {
        t.lines().filter(|l| l.ends_with('}')).any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["stage"] == stage && v.get("step").is_some())
        })
    })
}

#[test]
fn ctrl_c_cancels_the_submitted_jobs() {
    if !slurm_available() {
        return;
    }
    let sb = sandbox();
    // A pretrain that cannot end on its own before the interrupt: the test waits on what the job
    // has observably done, never on how long it took.
    let mut child = slurm(&sb, &["r.toml", "--set", "stages.base.max_steps=100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupting when Slurm merely reports the job RUNNING raced with the job's own start-up
    // (loading the recipe, planning, opening the data): a SIGTERM before the training loop left
    // no checkpoint. Wait until the loop has logged a step instead.
    let hang_guard = Instant::now() + Duration::from_secs(600);
    while !training_has_begun(&sb, "base") {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mmrun ended ({status}) before the pretrain job began training");
        }
        assert!(Instant::now() < hang_guard, "the pretrain job never began training (is the Slurm node up?)");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id() as i32;
    // SAFETY: kill(2) on the child we spawned.
    assert_eq!(unsafe { libc_kill(pid, 2) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let run = sb.last_run();
    assert_eq!(run["status"], "interrupted");
    assert_eq!(
        statuses(&run),
        expect(&[("tok", "ran"), ("base", "interrupted"), ("sft", "cancelled"), ("report", "cancelled")])
    );
    // mmrun returns only once every job it submitted has ended, so Slurm's view is final here.
    for (stage, id) in job_ids(&run) {
        if stage != "tok" {
            assert_eq!(job_state(&id), "CANCELLED", "job {id} of stage {stage}");
        }
    }
    // The interrupted stage kept its checkpoint for the next run.
    let key = run["stages"]["base"]["key"].as_str().unwrap();
    let work = sb.home().join("work-v1").join(key);
    assert!(work.read_dir().is_ok_and(|mut d| d.next().is_some()), "no checkpoint kept in {}", work.display());
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
