//! Executor tests with a toy stage (no ML): caching, failure, interrupt + resume, concurrency.

use super::*;
use crate::artifact::ArtifactKind;
use crate::recipe::{ModelSpec, RecipeMeta};
use crate::runs::{RunRecord, RunStatus, StageRecord};
use crate::stages::{Stage, StageKind, StageOutcome, StageParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Total `run` calls across all tests in this process, per key prefix is not needed: each test
/// uses its own cache and counts through the trace file instead.
static RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
struct ToyParams {
    text: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    steps: u32,
    /// Raise the cancel flag when reaching this step (simulates Ctrl-C).
    #[serde(default)]
    cancel_at: Option<u32>,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    sleep_ms: u64,
}

impl StageParams for ToyParams {
    fn inputs(&self) -> Vec<InputRef> {
        self.from
            .iter()
            .map(|s| InputRef::Stage { param: "from", stage: s.clone(), accepts: vec![ArtifactKind::Dataset] })
            .collect()
    }
}

struct Toy;

impl StageKind for Toy {
    const KIND: &'static str = "toy";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Dataset;
    const DOC: &'static str = "test stage";
    type Params = ToyParams;
}

impl Stage for Toy {
    fn run(&self, ctx: &mut StageContext<'_>, p: &ToyParams) -> anyhow::Result<StageOutcome> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        if p.fail {
            anyhow::bail!("toy failure on purpose");
        }
        let mut text = String::new();
        if let Some(from) = &p.from {
            text = std::fs::read_to_string(ctx.inputs.artifact(from)?.path("out.txt"))?;
        }
        let ckpt = ctx.work_dir.join("step");
        let start: u32 = std::fs::read_to_string(&ckpt).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        for step in start..p.steps {
            if p.cancel_at == Some(step) {
                ctx.cancel.cancel();
            }
            if ctx.cancel.is_cancelled() {
                std::fs::write(&ckpt, step.to_string())?;
                return Err(crate::cancel::Interrupted.into());
            }
            ctx.run.metric(ctx.name, serde_json::json!({"step": step, "loss": 1.0 / (step + 1) as f64}))?;
            std::thread::sleep(std::time::Duration::from_millis(p.sleep_ms));
        }
        text.push_str(&format!("{}[{}..{}]", p.text, start, p.steps));
        std::fs::write(ctx.out_dir.join("out.txt"), &text)?;
        let mut metrics = serde_json::Map::new();
        metrics.insert("resumed_from".into(), start.into());
        Ok(StageOutcome { metrics })
    }
}

fn recipe() -> Recipe {
    Recipe {
        path: "toy.toml".into(),
        source_text: String::new(),
        overrides: vec![],
        meta: RecipeMeta {
            name: "toy".into(),
            description: None,
            seed: 1,
            device: crate::recipe::DeviceSpec::Cpu,
            precision: Default::default(),
            executor: Default::default(),
            resources: Default::default(),
        },
        model: ModelSpec::default(),
        datasets: Default::default(),
        stages: vec![],
        cache: Default::default(),
    }
}

fn job(name: &str, key: &str, params: serde_json::Value) -> Job {
    let p: ToyParams = serde_json::from_value(params.clone()).unwrap();
    Job { name: name.into(), kind: "toy".into(), key: key.into(), inputs: p.inputs(), params, verify: true }
}

struct Env {
    _d: tempfile::TempDir,
    cache: Cache,
    runs: std::path::PathBuf,
}

fn env() -> Env {
    let d = tempfile::tempdir().unwrap();
    let cache = Cache::open(d.path().join("home")).unwrap();
    let runs = d.path().join("runs");
    Env { _d: d, cache, runs }
}

fn exec(env: &Env, jobs: &[Job], cancel: &CancelToken) -> (ExecOutcome, ExecCounts, RunRecord) {
    let record = RunRecord {
        recipe_name: "toy".into(),
        stages: jobs
            .iter()
            .map(|j| StageRecord {
                name: j.name.clone(),
                kind: j.kind.clone(),
                key: j.key.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let sink = RunSink::start(&env.runs, record).unwrap();
    let registry: [&dyn DynStage; 1] = [&Toy];
    let recipe = recipe();
    let datasets = BTreeMap::new();
    let published = std::cell::RefCell::new(vec![]);
    let on_pub = |j: &Job, _: &Artifact| published.borrow_mut().push(j.name.clone());
    let ex = Executor {
        cache: &env.cache,
        run: &sink,
        cancel,
        recipe: &recipe,
        datasets: &datasets,
        fetched: &Default::default(),
        remote: None,
        registry: &registry,
        on_published: &on_pub,
    };
    let (out, counts) = ex.execute(jobs);
    assert_eq!(published.borrow().len(), counts.ran, "fingerprint recorded once per built stage");
    (out, counts, sink.record().unwrap())
}

fn status(r: &RunRecord, name: &str) -> StageStatus {
    r.stage(name).unwrap().status
}

#[test]
fn builds_then_reuses_from_cache() {
    let e = env();
    let jobs = [
        job("a", "ka", serde_json::json!({"text": "A", "steps": 2})),
        job("b", "kb", serde_json::json!({"text": "B", "from": "a"})),
    ];
    let (out, counts, rec) = exec(&e, &jobs, &CancelToken::new());
    assert!(matches!(out, ExecOutcome::Succeeded));
    assert_eq!(counts, ExecCounts { ran: 2, cached: 0 });
    assert_eq!(status(&rec, "a"), StageStatus::Ran);
    assert_eq!(std::fs::read_to_string(e.cache.object("kb").unwrap().path("out.txt")).unwrap(), "A[0..2]B[0..0]");
    let (_, counts, rec) = exec(&e, &jobs, &CancelToken::new());
    assert_eq!(counts, ExecCounts { ran: 0, cached: 2 });
    assert_eq!(status(&rec, "b"), StageStatus::Cached);
    assert_eq!(rec.stage("a").unwrap().metrics["resumed_from"], 0, "cached stages carry their metrics");
}

#[test]
fn failure_records_error_and_skips_downstream() {
    let e = env();
    let jobs = [
        job("a", "ka", serde_json::json!({"text": "A", "fail": true})),
        job("b", "kb", serde_json::json!({"text": "B", "from": "a"})),
    ];
    let (out, _, rec) = exec(&e, &jobs, &CancelToken::new());
    let ExecOutcome::Failed { stage, error } = out else { panic!("expected failure") };
    assert_eq!(stage, "a");
    assert!(format!("{error:#}").contains("toy failure on purpose"));
    assert_eq!(status(&rec, "a"), StageStatus::Failed);
    assert!(rec.stage("a").unwrap().error.as_deref().unwrap().contains("stage 'a' (toy): toy failure on purpose"));
    assert_eq!(status(&rec, "b"), StageStatus::Skipped);
    assert!(e.cache.object("ka").is_none());
    assert_eq!(
        std::fs::read_dir(e.cache.bucket(crate::cache::Bucket::Tmp)).unwrap().count(),
        0,
        "failed tmp dir removed"
    );
    assert_eq!(rec.status, RunStatus::Running, "the caller finalises the run status");
}

#[test]
fn interrupt_keeps_checkpoint_and_resume_continues_from_it() {
    let e = env();
    let first = [
        job("a", "ka", serde_json::json!({"text": "A", "steps": 1})),
        job("b", "kb", serde_json::json!({"text": "B", "from": "a", "steps": 10, "cancel_at": 4})),
        job("c", "kc", serde_json::json!({"text": "C", "from": "b"})),
    ];
    let (out, _, rec) = exec(&e, &first, &CancelToken::new());
    assert!(matches!(out, ExecOutcome::Interrupted { ref stage } if stage == "b"), "{out:?}");
    assert_eq!(status(&rec, "a"), StageStatus::Ran);
    assert_eq!(status(&rec, "b"), StageStatus::Interrupted);
    assert_eq!(status(&rec, "c"), StageStatus::Skipped);
    assert!(e.cache.object("kb").is_none(), "nothing half-built is published");
    assert_eq!(std::fs::read_to_string(e.cache.bucket(crate::cache::Bucket::Work).join("kb/step")).unwrap(), "4");
    // Same keys, no cancel this time: a is cached, b resumes at step 4.
    let second = [
        first[0].clone(),
        job("b", "kb", serde_json::json!({"text": "B", "from": "a", "steps": 10})),
        first[2].clone(),
    ];
    let (out, counts, rec) = exec(&e, &second, &CancelToken::new());
    assert!(matches!(out, ExecOutcome::Succeeded));
    assert_eq!(counts, ExecCounts { ran: 2, cached: 1 });
    assert_eq!(status(&rec, "a"), StageStatus::Cached);
    assert_eq!(rec.stage("b").unwrap().metrics["resumed_from"], 4);
    assert_eq!(
        std::fs::read_to_string(e.cache.object("kc").unwrap().path("out.txt")).unwrap(),
        "A[0..1]B[4..10]C[0..0]"
    );
    assert!(!e.cache.bucket(crate::cache::Bucket::Work).join("kb").exists(), "checkpoints dropped after publish");
}

#[test]
fn cancel_before_a_stage_skips_it() {
    let e = env();
    let cancel = CancelToken::new();
    cancel.cancel();
    let (out, counts, rec) = exec(&e, &[job("a", "ka", serde_json::json!({"text": "A"}))], &cancel);
    assert!(matches!(out, ExecOutcome::Interrupted { .. }));
    assert_eq!(counts, ExecCounts::default());
    assert_eq!(status(&rec, "a"), StageStatus::Skipped);
}

#[test]
fn concurrent_executions_build_each_stage_once() {
    let e = env();
    let jobs = vec![
        job("a", "ka", serde_json::json!({"text": "A", "steps": 5, "sleep_ms": 20})),
        job("b", "kb", serde_json::json!({"text": "B", "from": "a", "steps": 3, "sleep_ms": 10})),
    ];
    let before = RUNS.load(Ordering::SeqCst);
    let results: Vec<ExecCounts> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2).map(|_| s.spawn(|| exec(&e, &jobs, &CancelToken::new()).1)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Other tests run in parallel and also bump RUNS, so count built stages via the results.
    let total_ran: usize = results.iter().map(|c| c.ran).sum();
    let total_cached: usize = results.iter().map(|c| c.cached).sum();
    assert_eq!(total_ran, 2, "each stage built exactly once: {results:?}");
    assert_eq!(total_cached, 2);
    assert!(RUNS.load(Ordering::SeqCst) >= before + 2);
    assert_eq!(std::fs::read_to_string(e.cache.object("kb").unwrap().path("out.txt")).unwrap(), "A[0..5]B[0..3]");
}
