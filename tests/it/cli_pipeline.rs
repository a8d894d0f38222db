//! End-to-end behaviour of `mmrun run/plan/runs/diff/gc/verify` on real stages (tokenizer, prepare)
//! over built-in data: caching, overrides, concurrency, records.

use crate::common;

use common::{expect, statuses, Sandbox, SMALL_RECIPE};

#[test]
fn second_run_is_fully_cached_and_overrides_rerun_exactly_what_changed() {
    let sb = Sandbox::new();
    sb.write("r.toml", SMALL_RECIPE);

    // First run builds everything.
    sb.run_ok(&["r.toml"]);
    let first = sb.last_run();
    assert_eq!(first["status"], "succeeded");
    assert_eq!(statuses(&first), expect(&[("tok", "ran"), ("pre", "ran"), ("sft_data", "ran")]));
    assert_eq!(first["recipe_text"], SMALL_RECIPE, "the recipe is recorded as given");
    assert_eq!(first["lock"]["mmrun_version"], env!("CARGO_PKG_VERSION"));
    assert!(first["lock"]["datasets"]["text"]["content_hash"].as_str().is_some_and(|h| !h.is_empty()));
    for st in ["tok", "pre", "sft_data"] {
        let key = first["stages"][st]["key"].as_str().unwrap();
        assert_eq!(first["lock"]["stages"][st], key);
        assert!(sb.home().join("objects-v1").join(key).join("manifest.json").is_file(), "{st} published");
    }

    // Second identical run: everything cached, quickly (the one timing assertion the spec asks for).
    let o = sb.run_ok(&["run", "r.toml"]);
    let second = sb.last_run();
    assert_eq!(statuses(&second), expect(&[("tok", "cached"), ("pre", "cached"), ("sft_data", "cached")]));
    eprintln!("cached rerun took {:.3}s", o.seconds);
    assert!(o.seconds < 2.0, "a fully cached run took {:.2}s", o.seconds);

    // A cosmetic change reruns nothing.
    sb.run_ok(&["--set", "recipe.description=\"renamed\"", "r.toml"]);
    let cosmetic = sb.last_run();
    assert_eq!(statuses(&cosmetic), expect(&[("tok", "cached"), ("pre", "cached"), ("sft_data", "cached")]));
    assert_eq!(cosmetic["overrides"][0], "recipe.description=\"renamed\"");

    // A change to one leaf stage reruns only it.
    sb.run_ok(&["r.toml", "--set", "stages.pre.max_seq_len=32"]);
    assert_eq!(statuses(&sb.last_run()), expect(&[("tok", "cached"), ("pre", "ran"), ("sft_data", "cached")]));

    // A change upstream reruns that stage and all its descendants.
    let plan = sb.plan(&["r.toml", "--set", "stages.tok.vocab_size=420"]);
    let by_name: std::collections::BTreeMap<&str, &serde_json::Value> =
        plan["stages"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap(), s)).collect();
    assert_eq!(by_name["tok"]["status"], "stale");
    assert!(!by_name["tok"]["reasons"].as_array().unwrap().is_empty(), "plan says why: {plan}");
    assert_ne!(by_name["pre"]["status"], "cached");
    sb.run_ok(&["r.toml", "--set", "stages.tok.vocab_size=420"]);
    assert_eq!(statuses(&sb.last_run()), expect(&[("tok", "ran"), ("pre", "ran"), ("sft_data", "ran")]));

    // `runs` lists every invocation; `diff` shows the changed param and the differing keys.
    let runs = sb.run_ok(&["runs"]).stdout;
    assert_eq!(runs.lines().filter(|l| l.contains("itest")).count(), 5, "{runs}");
    let all = sb.runs_json();
    let (a, b) = (all[0]["id"].as_str().unwrap(), all[4]["id"].as_str().unwrap());
    let d = sb.run_ok(&["diff", a, b]).stdout;
    assert!(d.contains("stages.tok.vocab_size: 400 -> 420"), "{d}");
    assert!(d.contains("tok: key differs"), "{d}");

    // gc keeps everything some run references; dropping the old runs frees their objects.
    let kept = gc_table(&sb.run_ok(&["gc"]).stdout);
    assert_eq!(kept["objects-v1"].0, 0, "{kept:?}");
    assert_eq!(kept["builtin-v1"], (0, 2), "the runs' builtin data is referenced: {kept:?}");
    for r in &all[..4] {
        std::fs::remove_dir_all(sb.run_dir(r["id"].as_str().unwrap())).unwrap();
    }
    let dry = gc_table(&sb.run_ok(&["gc", "--dry-run"]).stdout);
    let freed = gc_table(&sb.run_ok(&["gc"]).stdout);
    assert_eq!(dry, freed, "--dry-run reports what gc then does, bucket by bucket");
    assert_eq!(freed["objects-v1"].0, 4, "{freed:?}");
    assert_eq!(freed["builtin-v1"], (0, 2), "still used by the remaining run: {freed:?}");
    // What the remaining run references is still there: rerunning it is fully cached.
    sb.run_ok(&["r.toml", "--set", "stages.tok.vocab_size=420"]);
    assert_eq!(statuses(&sb.last_run()), expect(&[("tok", "cached"), ("pre", "cached"), ("sft_data", "cached")]));
    // With no run record left, the builtin data goes too.
    std::fs::remove_dir_all(sb.runs()).unwrap();
    let all_gone = gc_table(&sb.run_ok(&["gc"]).stdout);
    assert_eq!((all_gone["builtin-v1"], all_gone["objects-v1"].1), ((2, 0), 0), "{all_gone:?}");
    assert_eq!(std::fs::read_dir(sb.home().join("builtin-v1")).unwrap().count(), 0);
}

/// A cached object with a flipped byte (same size: only its blake3 shows it) or a deleted file is
/// reported by `mmrun verify`, planned as missing and rebuilt by the next run instead of used;
/// `verify --repair` removes what is damaged so the next run rebuilds it.
#[test]
fn damaged_cache_objects_are_reported_by_verify_and_rebuilt_instead_of_used() {
    let sb = Sandbox::new();
    sb.write("r.toml", SMALL_RECIPE);
    sb.run_ok(&["r.toml"]);
    let first = sb.last_run();
    let key = |st: &str| first["stages"][st]["key"].as_str().unwrap().to_string();
    let obj = |st: &str| sb.home().join("objects-v1").join(key(st));
    let clean = sb.run_ok(&["verify"]).stdout;
    assert!(clean.contains(": 0 damaged"), "{clean}");

    let tok_file = largest_payload_file(&obj("tok"));
    let original = std::fs::read(&tok_file).unwrap();
    flip_middle_byte(&tok_file);
    let gone = largest_payload_file(&obj("sft_data"));
    std::fs::remove_file(&gone).unwrap();

    let v = sb.run(&["verify"]);
    assert_eq!(v.code, Some(1), "damage makes verify fail\n{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains(&format!("objects-v1/{}: damaged", key("tok"))), "{}", v.stdout);
    assert!(v.stdout.contains(&format!("objects-v1/{}: damaged", key("sft_data"))), "{}", v.stdout);
    assert!(v.stdout.contains("missing"), "the deleted file is named: {}", v.stdout);
    assert!(v.stdout.contains("mmrun verify --repair"), "the fix is named: {}", v.stdout);

    // `pre` changes, so this run opens `tok`: the flipped byte is found before use.
    let set = ["--set", "stages.pre.max_seq_len=32"];
    let plan = sb.plan(&["r.toml", set[0], set[1]]);
    let tok_plan = plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == "tok").unwrap().clone();
    assert_eq!(tok_plan["status"], "missing", "{plan}");
    assert!(tok_plan["reasons"][0].as_str().unwrap().contains("damaged"), "{plan}");
    sb.run_ok(&["r.toml", set[0], set[1]]);
    let rebuilt = sb.last_run();
    assert_eq!(statuses(&rebuilt), expect(&[("tok", "ran"), ("pre", "ran"), ("sft_data", "ran")]));
    for st in ["tok", "sft_data"] {
        let why = rebuilt["stages"][st]["reasons"].to_string();
        assert!(why.contains("damaged"), "the run record says why {st} was rebuilt: {why}");
    }
    assert_eq!(std::fs::read(&tok_file).unwrap(), original, "rebuilt byte-identical");
    assert!(gone.is_file(), "the deleted file is back");
    assert!(sb.run_ok(&["verify"]).stdout.contains(": 0 damaged"));

    // --repair removes the damaged object (and exits 0); the next run rebuilds it.
    flip_middle_byte(&tok_file);
    let r = sb.run_ok(&["verify", "--repair"]).stdout;
    assert!(r.contains(&format!("objects-v1/{}: removed; the next run rebuilds it", key("tok"))), "{r}");
    assert!(!obj("tok").exists(), "the damaged object is gone");
    assert!(sb.run_ok(&["verify"]).stdout.contains(": 0 damaged"));
    sb.run_ok(&["r.toml"]);
    assert_eq!(statuses(&sb.last_run()), expect(&[("tok", "ran"), ("pre", "cached"), ("sft_data", "cached")]));
    assert_eq!(std::fs::read(&tok_file).unwrap(), original);
}

/// The largest file of a cache object other than its manifest.
fn largest_payload_file(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().unwrap() != "manifest.json")
        .max_by_key(|p| (p.metadata().unwrap().len(), p.clone()))
        .unwrap_or_else(|| panic!("{} has no payload file", dir.display()))
}

/// Flip one bit of the middle byte, keeping the size (a new file, in case it is hard-linked).
fn flip_middle_byte(p: &std::path::Path) {
    let mut bytes = std::fs::read(p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::remove_file(p).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// `mmrun gc`'s table: bucket -> (removed, kept).
fn gc_table(out: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // bucket removed <n> <unit> kept <n> <unit>
            if f.len() != 7 {
                return None;
            }
            Some((f[0].to_string(), (f[1].parse().ok()?, f[4].parse().ok()?)))
        })
        .collect()
}

#[test]
fn plan_json_and_why() {
    let sb = Sandbox::new();
    sb.write("r.toml", SMALL_RECIPE);
    let plan = sb.plan(&["r.toml"]);
    let stages = plan["stages"].as_array().unwrap();
    assert_eq!(stages.iter().map(|s| s["name"].as_str().unwrap()).collect::<Vec<_>>(), ["tok", "pre", "sft_data"]);
    for s in stages {
        assert_eq!(s["status"], "missing", "{plan}");
        assert!(s["key"].as_str().is_some_and(|k| k.len() >= 16));
    }
    assert!(!sb.runs().exists() || sb.runs_json().is_empty(), "plan is a dry run");
    sb.run_ok(&["r.toml"]);
    let plan = sb.plan(&["r.toml"]);
    assert!(plan["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"), "{plan}");
    let why = sb.run_ok(&["plan", "r.toml", "--why", "pre"]).stdout;
    assert!(why.contains("pre"), "{why}");
}

#[test]
fn two_concurrent_runs_on_one_cache_build_each_stage_once() {
    let sb = Sandbox::new();
    sb.write("r.toml", SMALL_RECIPE);
    let spawn = || {
        sb.command(&["r.toml"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (oa, ob) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&oa, &ob] {
        assert!(o.status.success(), "stderr:\n{}", String::from_utf8_lossy(&o.stderr));
    }
    let runs = sb.runs_json();
    assert_eq!(runs.len(), 2);
    for stage in ["tok", "pre", "sft_data"] {
        let ran = runs.iter().filter(|r| r["stages"][stage]["status"] == "ran").count();
        let cached = runs.iter().filter(|r| r["stages"][stage]["status"] == "cached").count();
        assert_eq!((ran, cached), (1, 1), "stage {stage} must be built exactly once: {runs:?}");
    }
    let objects = std::fs::read_dir(sb.home().join("objects-v1")).unwrap().count();
    assert_eq!(objects, 3, "one object per stage");
    assert_eq!(std::fs::read_dir(sb.home().join("tmp-v1")).unwrap().count(), 0, "no leftovers in tmp/");
}

/// `mmrun gc` while another run is using cached objects: what that run planned to use survives,
/// though no run record gc can see references it (the other run's records live in another
/// project's runs dir), and the run succeeds. The run is frozen (SIGSTOP) mid-stage while gc runs,
/// so the order of the two is fixed without any timing.
#[test]
fn gc_never_deletes_what_a_live_run_planned_to_use() {
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        r#"[recipe]
name = "gcrace"
seed = 3

[datasets.small]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 200 }

[datasets.big]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 60000, max_operand = 999, seed = 5 }

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
"#,
    );
    // A first run builds `tok` and a small variant of `big_data`.
    let small = ["--set", "datasets.big.builtin.count=500"];
    sb.run_ok(&["r.toml", small[0], small[1]]);
    let first = sb.last_run();
    let tok = sb.home().join("objects-v1").join(first["stages"]["tok"]["key"].as_str().unwrap());
    let unused = sb.home().join("objects-v1").join(first["stages"]["big_data"]["key"].as_str().unwrap());
    let plan = sb.plan(&["r.toml"]);
    let big_key = plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == "big_data").unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();

    // The second run finds `tok` cached and builds the big `big_data`; freeze it mid-stage.
    let child = sb
        .command(&["r.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let frozen = Frozen(Some(child));
    let chunk = sb.home().join("work-v1").join(&big_key).join("shards").join("chunk-00000.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    while !chunk.exists() {
        assert!(std::time::Instant::now() < deadline, "big_data wrote no chunk within 240 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { kill(frozen.pid(), SIGSTOP) }, 0);

    // gc from another project: its runs dir is empty, so only the live run's lease protects `tok`.
    let other_runs = sb.root().join("other-project-runs");
    let o = sb.command(&["gc"]).env("MMRUN_RUNS_DIR", &other_runs).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!unused.exists(), "gc did run: the object nobody uses is freed");
    assert!(tok.join("manifest.json").is_file(), "gc deleted the object a live run planned to use");
    assert!(chunk.exists(), "gc deleted the checkpoint of the stage being built");

    let out = frozen.resume().wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec = sb.last_run();
    assert_eq!(statuses(&rec), expect(&[("tok", "cached"), ("big_data", "ran")]));
    assert!(sb.run_ok(&["verify"]).stdout.contains(": 0 damaged"));
}

const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// A child that may be stopped: continued (and, on a failed test, killed) when dropped.
struct Frozen(Option<std::process::Child>);

impl Frozen {
    fn pid(&self) -> i32 {
        self.0.as_ref().expect("not resumed yet").id() as i32
    }

    fn resume(mut self) -> std::process::Child {
        // SAFETY: plain kill(2) on our own child.
        unsafe { kill(self.pid(), SIGCONT) };
        self.0.take().expect("not resumed yet")
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            // SAFETY: plain kill(2) on our own child.
            unsafe { kill(child.id() as i32, SIGCONT) };
            let _ = child.wait();
        }
    }
}

/// A `shards-v1` set damaged on disk is never trained on: bytes that no longer match its
/// manifest (offsets swapped so they decrease) are reported as damaged, and a set that matches
/// its manifest yet holds token ids beyond the vocabulary (as a buggy build would write) is
/// reported as corrupt; either way the next run rebuilds it, says so and succeeds.
#[test]
fn corrupted_shards_are_reported_and_rebuilt_by_the_next_run() {
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        r#"[recipe]
name = "shards"
seed = 7

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 300 }

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
"#,
    );
    sb.run_ok(&["r.toml"]);
    let sets: Vec<_> = std::fs::read_dir(sb.home().join("shards-v1")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = &sets[0];
    let (idx, ids) = (set.join("chunk-00000.idx"), set.join("chunk-00000.ids"));
    let (idx_bytes, ids_bytes) = (std::fs::read(&idx).unwrap(), std::fs::read(&ids).unwrap());
    let rerun = |steps: u32, says: &[&str]| {
        let set = format!("stages.base.max_steps={steps}");
        let o = sb.run_ok(&["r.toml", "--set", &set]);
        let rec = sb.last_run();
        assert_eq!(statuses(&rec), expect(&[("tok", "cached"), ("base", "ran")]));
        let notes = rec["notes"].to_string();
        for s in says {
            assert!(notes.contains(s), "the run record does not say {s:?}: {notes}");
            assert!(o.stderr.contains(s), "the run does not say {s:?}: {}", o.stderr);
        }
        assert_eq!(std::fs::read(&idx).unwrap(), idx_bytes, "rebuilt identical");
        assert_eq!(std::fs::read(&ids).unwrap(), ids_bytes, "rebuilt identical");
    };

    // Offsets 1 and 2 swapped: they decrease, the size is unchanged, the blake3 is not.
    let mut bad = idx_bytes.clone();
    let (a, b) = (bad[8..16].to_vec(), bad[16..24].to_vec());
    bad[8..16].copy_from_slice(&b);
    bad[16..24].copy_from_slice(&a);
    replace_file(&idx, &bad);
    rerun(3, &["damaged", "rebuilt"]);

    // Every id beyond the vocabulary, the manifest updated to match.
    replace_file(&ids, &vec![0xff; ids_bytes.len()]);
    let mpath = set.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let entry = manifest["files"].as_array_mut().unwrap().iter_mut().find(|f| f["path"] == "chunk-00000.ids").unwrap();
    entry["blake3"] = blake3::hash(&std::fs::read(&ids).unwrap()).to_hex().to_string().into();
    replace_file(&mpath, &serde_json::to_vec(&manifest).unwrap());
    rerun(4, &["corrupt", "outside the vocabulary", "rebuilding"]);
}

/// Replace a file's content with a new file (it may be hard-linked elsewhere).
fn replace_file(p: &std::path::Path, bytes: &[u8]) {
    std::fs::remove_file(p).unwrap();
    std::fs::write(p, bytes).unwrap();
}
