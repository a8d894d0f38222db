use super::*;
use crate::data::RejectSink;

fn record(name: &str) -> RunRecord {
    RunRecord {
        recipe_name: name.into(),
        recipe_path: "r.toml".into(),
        recipe_text: "[recipe]\nname = \"x\"\n".into(),
        stages: vec![
            StageRecord { name: "tok".into(), kind: "tokenizer".into(), key: "k1".into(), ..Default::default() },
            StageRecord { name: "data".into(), kind: "prepare".into(), key: "k2".into(), ..Default::default() },
        ],
        ..Default::default()
    }
}

#[test]
fn run_json_is_written_at_start_and_on_update() {
    let d = tempfile::tempdir().unwrap();
    let sink = RunSink::start(d.path(), record("quick start")).unwrap();
    assert!(sink.id().ends_with("-quick_start"), "{}", sink.id());
    let rec = list::read_record(sink.dir()).unwrap();
    assert_eq!(rec.status, RunStatus::Running);
    assert_eq!(rec.stages.len(), 2);
    assert_eq!(rec.pid, std::process::id());
    sink.update(|r| {
        let s = r.stage_mut("tok").unwrap();
        s.status = StageStatus::Ran;
        s.seconds = 1.5;
    })
    .unwrap();
    let text = std::fs::read_to_string(sink.dir().join("run.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["stages"]["tok"]["status"], "ran");
    assert_eq!(v["stages"]["tok"]["seconds"], 1.5);
    assert_eq!(v["stages"]["data"]["status"], "pending");
    // Order of stages survives the round trip.
    let back = list::read_record(sink.dir()).unwrap();
    assert_eq!(back.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["tok", "data"]);
    assert!(!sink.dir().join("run.json.tmp").exists());
}

#[test]
fn metrics_and_rejects_are_appended_as_json_lines() {
    let d = tempfile::tempdir().unwrap();
    let sink = RunSink::start(d.path(), record("r")).unwrap();
    sink.metric("base", serde_json::json!({"step": 1, "loss": 3.5})).unwrap();
    sink.metric("base", serde_json::json!({"step": 2, "loss": 3.0})).unwrap();
    sink.reject("medical", std::path::Path::new("bad.jsonl"), 7, "missing field `conversations`", b"{}").unwrap();
    let counts = sink.count_rejects().unwrap();
    sink.update(|r| r.rejects = counts).unwrap();
    let m = std::fs::read_to_string(sink.dir().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = m.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["stage"], "base");
    assert_eq!(lines[1]["loss"], 3.0);
    let r = std::fs::read_to_string(sink.dir().join("rejects.jsonl")).unwrap();
    let rej: serde_json::Value = serde_json::from_str(r.lines().next().unwrap()).unwrap();
    assert_eq!(rej["line"], 7);
    assert_eq!(rej["file"], "bad.jsonl");
    assert_eq!(list::read_record(sink.dir()).unwrap().rejects["medical"], 1);
}

#[test]
fn list_find_by_prefix_and_referenced_keys() {
    let d = tempfile::tempdir().unwrap();
    let a = RunSink::start(d.path(), record("alpha")).unwrap();
    let b = RunSink::start(d.path(), record("beta")).unwrap();
    b.update(|r| r.lock.stages.insert("x".into(), "k9".into()).map(|_| ()).unwrap_or(())).unwrap();
    let runs = list_runs(d.path()).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(find_run(d.path(), &a.id()).unwrap().record.recipe_name, "alpha");
    // Both ids share the timestamp prefix's first characters: ambiguous.
    assert!(matches!(find_run(d.path(), "2"), Err(RunError::Ambiguous(..))));
    assert!(matches!(find_run(d.path(), "nope"), Err(RunError::NotFound(..))));
    let keys = referenced_keys(d.path()).unwrap();
    assert!(keys.contains("k1") && keys.contains("k2") && keys.contains("k9"));
    // A killed run (pid gone) reads as killed and unfinished.
    let mut rec = runs[0].record.clone();
    rec.pid = 999_999_999;
    assert_eq!(rec.effective_status(), "killed");
    assert!(rec.is_unfinished());
}

#[test]
fn diff_shows_params_keys_metrics_and_losses() {
    let d = tempfile::tempdir().unwrap();
    let mut ra = record("r");
    ra.params = serde_json::json!({"stages": {"base": {"lr": 0.0005, "log_every": 10}}});
    ra.stages[1].metrics.insert("loss".into(), 2.0.into());
    let mut rb = ra.clone();
    rb.params["stages"]["base"]["lr"] = 0.0003.into();
    rb.stages[1].key = "k2b".into();
    rb.stages[1].metrics.insert("loss".into(), 1.5.into());
    let a = RunSink::start(d.path(), ra).unwrap();
    let b = RunSink::start(d.path(), rb).unwrap();
    for (sink, base) in [(&a, 3.0), (&b, 2.5)] {
        for step in 0..5u64 {
            sink.metric("data", serde_json::json!({"step": step, "loss": base - step as f64 * 0.1})).unwrap();
        }
    }
    let sa = find_run(d.path(), &a.id()).unwrap();
    let sb = find_run(d.path(), &b.id()).unwrap();
    let out = diff_runs(&sa, &sb, &DiffOptions { cache: None, loss_points: 3 });
    assert!(out.contains("stages.base.lr: 0.0005 -> 0.0003"), "{out}");
    assert!(!out.contains("log_every"), "unchanged params are not listed: {out}");
    assert!(out.contains("tok: same key"), "{out}");
    assert!(out.contains("data: key differs k2 -> k2b"), "{out}");
    assert!(out.contains("data.loss: 2.0000 -> 1.5000 (-0.5000)"), "{out}");
    assert!(out.contains("loss curves:"), "{out}");
    assert!(out.contains("3.0000") && out.contains("2.5000"), "{out}");
}

#[test]
fn diff_reads_eval_generations_from_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let cache = crate::cache::Cache::open(d.path().join("home")).unwrap();
    let mut keys = vec![];
    for (i, text) in ["four", "five"].iter().enumerate() {
        let t = cache.tmp_dir().unwrap();
        let report = serde_json::json!({"generations": [{"prompt": "2+2=", "model": "sft", "output": text}]});
        std::fs::write(t.path().join("report.json"), report.to_string()).unwrap();
        let key = format!("ev{i}");
        cache.publish(t, &key, crate::artifact::ArtifactKind::EvalReport, "eval", Default::default()).unwrap();
        keys.push(key);
    }
    let runs = d.path().join("runs");
    let mut ra = record("r");
    ra.stages.push(StageRecord {
        name: "report".into(),
        kind: "eval".into(),
        key: keys[0].clone(),
        ..Default::default()
    });
    let mut rb = ra.clone();
    rb.stages[2].key = keys[1].clone();
    let a = RunSink::start(&runs, ra).unwrap();
    let b = RunSink::start(&runs, rb).unwrap();
    let out = diff_runs(
        &find_run(&runs, &a.id()).unwrap(),
        &find_run(&runs, &b.id()).unwrap(),
        &DiffOptions { cache: Some(cache), loss_points: 5 },
    );
    assert!(out.contains("prompt: 2+2="), "{out}");
    assert!(out.contains("A sft: four") && out.contains("B sft: five"), "{out}");
}

#[test]
fn last_unfinished_skips_runs_finished_later() {
    let d = tempfile::tempdir().unwrap();
    let mk = |status: RunStatus, overrides: &[&str]| {
        let mut r = record("r");
        r.status = status;
        r.overrides = overrides.iter().map(|s| s.to_string()).collect();
        let s = RunSink::start(d.path(), r).unwrap();
        // Pretend the writer is gone (not a live run).
        s.update(|r| r.pid = 999_999_999).unwrap();
        s.id()
    };
    let a = mk(RunStatus::Interrupted, &[]);
    let _b = mk(RunStatus::Failed, &["x=1"]);
    let _c = mk(RunStatus::Succeeded, &["x=1"]);
    let runs = list_runs(d.path()).unwrap();
    assert_eq!(last_unfinished(&runs).unwrap().record.id, a, "b was superseded by c");
    let _e = mk(RunStatus::Succeeded, &[]);
    assert!(last_unfinished(&list_runs(d.path()).unwrap()).is_none());
}

#[test]
fn rejected_lines_are_capped_and_adopted_rejects_recorded_once() {
    let d = tempfile::tempdir().unwrap();
    // Rejects stored with a shard set, as its build writes them.
    std::fs::create_dir_all(d.path().join("shards")).unwrap();
    let store = crate::data::RejectLog::open(d.path().join("shards/rejects.jsonl")).unwrap();
    let huge = "é".repeat(400_000);
    store.reject("corpus", std::path::Path::new("all.json"), 1, &"x".repeat(50_000), huge.as_bytes()).unwrap();
    store.reject("corpus", std::path::Path::new("all.json"), 9, "invalid JSON", b"{").unwrap();
    let stored = d.path().join("shards/rejects.jsonl");
    let text = std::fs::read_to_string(&stored).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(text.lines().next().unwrap().len() < crate::data::rejects::MAX_REJECT_RAW + 2048, "the line is capped");
    assert_eq!(first["raw_bytes"], huge.len());
    assert!(first["raw"].as_str().unwrap().chars().all(|c| c == 'é'), "cut at a character boundary");
    // Two stages of one run use the same shards: each reject is recorded once.
    let runs = d.path().join("runs");
    let sink = RunSink::start(&runs, record("r")).unwrap();
    sink.adopt_rejects(&stored).unwrap();
    sink.adopt_rejects(&stored).unwrap();
    sink.adopt_rejects(&d.path().join("absent.jsonl")).unwrap();
    assert_eq!(sink.count_rejects().unwrap()["corpus"], 2);
}
