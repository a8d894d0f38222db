//! Data-parallel stages end to end (`world_size` on a training stage): mmrun starts the other
//! ranks as child processes on loopback, the result matches one rank with the global batch, and a
//! rank that dies fails the run by name, stops the others and leaves a stage that resumes.

use crate::common::Sandbox;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Documents of 60 pseudo-random letters: with `max_seq_len = 16` every row is truncated to
/// exactly 16 tokens, so every rank holds as many loss tokens and the mean of the ranks' means is
/// the global mean.
fn sandbox(max_steps: usize, world_size: usize, extra: &str) -> Sandbox {
    let sb = Sandbox::new();
    let mut x: u64 = 12345;
    let lines: String = (0..64)
        .map(|_| {
            let doc: String = (0..60)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (b'a' + ((x >> 33) % 26) as u8) as char
                })
                .collect();
            format!("{{\"text\": \"{doc}\"}}\n")
        })
        .collect();
    sb.write("text.jsonl", &lines);
    sb.write(
        "r.toml",
        &format!(
            r#"[recipe]
name = "dp"
seed = 5
device = "cpu"

[model]
preset = "tiny"

[datasets.text]
source = "text.jsonl"
format = "text"

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 16
batch_size = 2
world_size = {world_size}
max_steps = {max_steps}
lr = 1e-3
{extra}
"#
        ),
    );
    sb
}

fn key(sb: &Sandbox, args: &[&str], stage: &str) -> String {
    let plan = sb.plan(args);
    plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).unwrap()["key"].as_str().unwrap().into()
}

fn weights(home: &Path, key: &str) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(home.join("objects-v1").join(key).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<_> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = st.tensor(&n).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect()
}

#[test]
fn two_cpu_ranks_of_batch_b_match_one_rank_of_batch_2b() {
    let sb = sandbox(4, 2, "");
    let out = sb.run_ok(&["r.toml"]);
    assert!(out.stderr.contains("2 data-parallel ranks"), "{}", out.stderr);
    let dp = key(&sb, &["r.toml"], "base");
    let single_args = ["r.toml", "--set", "stages.base.world_size=1", "--set", "stages.base.batch_size=4"];
    let single = key(&sb, &single_args, "base");
    assert_ne!(dp, single, "the number of ranks changes the global batch, so it is in the key");
    sb.run_ok(&single_args);
    let (a, b) = (weights(&sb.home(), &dp), weights(&sb.home(), &single));
    assert_eq!(a.len(), b.len());
    assert_close(&a, &b);
    // Rank 1 logged into the run record; only rank 0 wrote metrics (one line per step).
    let run = only_run(&sb);
    assert!(std::fs::read_to_string(run.join("ranks/base.rank1.log")).unwrap().contains("rank 1: done"));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"stage\":\"base\"")).count(), 4, "{metrics}");
}

fn only_run(sb: &Sandbox) -> PathBuf {
    let mut runs: Vec<_> = std::fs::read_dir(sb.runs()).unwrap().map(|e| e.unwrap().path()).collect();
    runs.sort();
    runs.into_iter().next().expect("a run directory")
}

fn wait_for(what: &str, child: &mut std::process::Child, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mmrun finished ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "no {what} after 300 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pid_in_log(log: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(log).ok()?;
    let at = text.find("(pid ")? + 5;
    text[at..].split(')').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    // A zombie is dead; its parent has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn a_killed_rank_fails_the_run_by_name_stops_the_others_and_the_same_command_resumes() {
    let sb = sandbox(150, 3, "save_every_secs = 0");
    let mut child = sb
        .command(&["r.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs =
        |r: usize| sb.runs().read_dir().ok()?.next()?.ok().map(|e| e.path().join(format!("ranks/base.rank{r}.log")));
    let (mut p1, mut p2) = (None, None);
    wait_for("both ranks started", &mut child, || {
        p1 = logs(1).and_then(|l| pid_in_log(&l));
        p2 = logs(2).and_then(|l| pid_in_log(&l));
        p1.is_some() && p2.is_some()
    });
    let run = only_run(&sb);
    wait_for("two training steps", &mut child, || {
        std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.matches("\"stage\":\"base\"").count() >= 2)
    });
    let (p1, p2) = (p1.unwrap(), p2.unwrap());
    assert!(std::process::Command::new("kill").args(["-9", &p1.to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rank 1 closed its connection: it died or stopped"), "{stderr}");
    assert!(stderr.contains("base.rank1.log"), "{stderr}");
    // mmrun stopped rank 2 before it exited.
    assert!(!alive(p2), "rank 2 (pid {p2}) is still running");
    for e in std::fs::read_dir(sb.home().join("objects-v1")).unwrap().flatten() {
        assert!(e.path().join("manifest.json").is_file(), "{} has no manifest", e.path().display());
    }
    // The same command resumes from rank 0's last checkpoint and finishes.
    let again = sb.run_ok(&["r.toml"]);
    assert!(again.stderr.contains("3 data-parallel ranks"), "{}", again.stderr);
    let rec = sb.last_run();
    let base = &rec["stages"]["base"];
    assert!(base["metrics"]["resumed_from"].as_u64().unwrap() >= 2, "{base}");
    assert_eq!(base["metrics"]["steps"], 150);
}

/// A recipe on the arithmetic data: tokenizer and a 2-step pretrain `base`, then `rest` (the
/// stage under test and its dataset). f32, so the comparisons below are as tight on every CPU.
fn arith_recipe(name: &str, seed: u64, rest: &str) -> String {
    format!(
        r#"[recipe]
name = "{name}"
seed = {seed}
device = "cpu"
precision = "f32"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = {{ count = 100, seed = 1, max_operand = 12 }}

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 32
batch_size = 8
max_steps = 2
lr = 2e-3
{rest}"#
    )
}

/// Run `r.toml` (whose `stage` has `world_size = 2`), then the same with one rank and
/// `global_batch`, and assert both trained the same weights, and that they moved from `base`'s
/// (a zero update would make any comparison pass).
fn two_ranks_train_like_one(sb: &Sandbox, stage: &str, global_batch: usize) {
    let out = sb.run_ok(&["r.toml"]);
    assert!(out.stderr.contains("2 data-parallel ranks"), "{}", out.stderr);
    let (ws, bs) = (format!("stages.{stage}.world_size=1"), format!("stages.{stage}.batch_size={global_batch}"));
    let single_args = ["r.toml", "--set", &ws, "--set", &bs];
    sb.run_ok(&single_args);
    let (a, b) =
        (weights(&sb.home(), &key(sb, &["r.toml"], stage)), weights(&sb.home(), &key(sb, &single_args, stage)));
    assert_close(&a, &b);
    let base = weights(&sb.home(), &key(sb, &["r.toml"], "base"));
    assert!(a.iter().zip(&base).any(|((_, x), (_, y))| x.iter().zip(y).any(|(p, q)| (p - q).abs() > 1e-4)));
}

/// A preference stage shares the loop: DPO's loss is a mean over pairs, so 2 ranks × 4 pairs
/// train what 1 rank × 8 pairs does.
#[test]
fn dpo_on_two_ranks_matches_one_rank_with_the_global_batch() {
    let sb = Sandbox::new();
    let rest = r#"
[datasets.pairs]
source = "builtin:arithmetic"
format = "dpo"
builtin = { count = 24, seed = 4, max_operand = 12 }

[stages.dpo]
kind = "dpo"
from = "base"
data = "pairs"
max_seq_len = 48
batch_size = 4
world_size = 2
max_steps = 3
lr = 1e-3
"#;
    sb.write("r.toml", &arith_recipe("dp-dpo", 3, rest));
    two_ranks_train_like_one(&sb, "dpo", 8);
}

/// GRPO samples its rollouts inside the loop: each completion draws from the stream of its row in
/// the global micro-batch (rank 1's rows follow rank 0's), and the objective is a mean over
/// completions, so 2 ranks × 2 prompts sample and train what 1 rank × 4 prompts does.
#[test]
fn grpo_on_two_ranks_samples_and_trains_like_one_rank_with_the_global_batch() {
    let sb = Sandbox::new();
    let rest = r#"
[datasets.problems]
source = "builtin:arithmetic"
format = "prompt_answer"
builtin = { count = 16, seed = 5, max_operand = 12 }

[stages.rl]
kind = "grpo"
from = "base"
data = "problems"
rewards = [{ kind = "exact_match" }, { kind = "length", max_chars = 12 }]
num_generations = 2
max_new_tokens = 6
batch_size = 2
world_size = 2
max_steps = 2
lr = 1e-3
"#;
    sb.write("r.toml", &arith_recipe("dp-grpo", 11, rest));
    two_ranks_train_like_one(&sb, "rl", 4);
}

/// Equal to float tolerance (bitwise equality is not promised: the sums are ordered differently).
/// AdamW divides by the gradient's own scale, so a weight whose true gradient is near zero moves
/// by up to ±lr on rounding noise alone: at most 1 in 10 000 weights may differ by more, and none
/// by more than 1e-3. A data-parallel mistake (a rank's gradient lost, or not averaged) moves most
/// weights, so it still fails.
fn assert_close(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
    assert_eq!(a.len(), b.len());
    let (mut off, mut total) = (Vec::new(), 0usize);
    for ((n, x), (_, y)) in a.iter().zip(b) {
        total += x.len();
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-3, "{n}: {p} vs {q}");
            if (p - q).abs() > 1e-5 * (1.0 + p.abs()) {
                off.push(format!("{n}: {p} vs {q}"));
            }
        }
    }
    assert!(off.len() * 10_000 <= total, "{} of {total} weights differ: {:?}", off.len(), &off[..off.len().min(10)]);
}

/// Values that can never run are refused when the recipe loads, at their line.
#[test]
fn impossible_ranks_are_refused_when_the_recipe_loads() {
    for (extra, says) in [
        ("world_size = 3\ndevices = [\"cpu\", \"cpu\"]", "world_size = 3 but `devices` lists 2 devices"),
        ("devices = [\"cuda:0\", \"cuda:0\"]", "cuda:0 is listed twice"),
        ("devices = [\"auto\", \"cpu\"]", "`auto` does not say which device a rank gets"),
        ("world_size = 0", "world_size = 0 can never work"),
    ] {
        let sb = sandbox(2, 1, "");
        let text = std::fs::read_to_string(sb.root().join("r.toml")).unwrap().replace("world_size = 1", extra);
        sb.write("r.toml", &text);
        let o = sb.run(&["plan", "r.toml"]);
        assert_eq!(o.code, Some(2), "{extra}: {}", o.stderr);
        assert!(o.stderr.contains(says) && o.stderr.contains("r.toml:"), "{extra}: {}", o.stderr);
    }
    // PPO has its own loop, which does not run data parallel: refused, not ignored.
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        "[recipe]\nname = \"p\"\n[datasets.q]\nsource = \"builtin:arithmetic\"\nformat = \"prompt_answer\"\n\
         [models.m]\nsource = \"m\"\n[stages.p]\nkind = \"ppo\"\nfrom = \"m\"\ndata = \"q\"\n\
         rewards = [{ kind = \"exact_match\" }]\nworld_size = 2\n",
    );
    let o = sb.run(&["plan", "r.toml"]);
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("ppo stages do not train data parallel yet"), "{}", o.stderr);

    // GPUs asked of a build without CUDA: refused at load time like `[recipe] device = "cuda"`.
    if !cfg!(feature = "cuda") {
        let sb = sandbox(2, 2, "devices = [\"cuda:0\", \"cuda:1\"]");
        let o = sb.run(&["plan", "r.toml"]);
        assert_eq!(o.code, Some(2), "{}", o.stderr);
        assert!(o.stderr.contains("device 'cuda:0' needs CUDA, but this mmrun was built without it"), "{}", o.stderr);
    }
}

/// Ctrl-C reaches rank 0 alone: the flag travels with the next exchange, every rank stops after
/// the same step, rank 0 checkpoints, mmrun exits 130 with no rank left behind, and the same
/// command resumes.
#[test]
fn ctrl_c_stops_every_rank_after_the_same_step_and_the_stage_resumes() {
    let sb = sandbox(150, 2, "save_every_secs = 0");
    let mut child = sb
        .command(&["r.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = || sb.runs().read_dir().ok()?.next()?.ok().map(|e| e.path().join("ranks/base.rank1.log"));
    let mut p1 = None;
    wait_for("rank 1 started", &mut child, || {
        p1 = log().and_then(|l| pid_in_log(&l));
        p1.is_some()
    });
    let run = only_run(&sb);
    wait_for("two training steps", &mut child, || {
        std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.matches("\"stage\":\"base\"").count() >= 2)
    });
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(!alive(p1.unwrap()), "rank 1 is still running");
    let rank1 = std::fs::read_to_string(run.join("ranks/base.rank1.log")).unwrap();
    assert!(!rank1.contains("closed its connection"), "rank 1 stopped with the others, not by losing them: {rank1}");
    let again = sb.run_ok(&["r.toml"]);
    assert!(again.stderr.contains("2 data-parallel ranks"), "{}", again.stderr);
    let base = &sb.last_run()["stages"]["base"];
    assert!(base["metrics"]["resumed_from"].as_u64().unwrap() >= 2, "{base}");
    assert_eq!(base["metrics"]["steps"], 150);
}
