use super::*;
use crate::hub::testserver::TestHub;
use crate::runs::{RunRecord, RunSink, StageRecord, StageStatus};
use std::time::Duration;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn hub_opts(hub: &TestHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.url(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
        max_retries: 1,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        retry_after_max: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(10),
    }
}

/// Publish a fake model object (a copy of the tiny fixture) under `key`.
fn publish_model(cache: &Cache, key: &str, kind: ArtifactKind) {
    let tmp = cache.tmp_dir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen3_tiny").join(f), tmp.path().join(f)).unwrap();
    }
    cache.publish(tmp, key, kind, "sft", Default::default()).unwrap();
}

#[test]
fn local_folder_and_pickled_folder() {
    let r = Resolver::default();
    let m = r.resolve(fixture("qwen3_tiny").to_str().unwrap()).unwrap();
    assert_eq!(m.kind, ArtifactKind::Model);
    assert!(m.has_full_model());
    assert!(matches!(m.origin, Origin::Folder(_)));

    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("qwen3_tiny").join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let e = r.resolve(tmp.path().to_str().unwrap()).unwrap_err();
    assert!(matches!(e, ModelRefError::Pickled { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("pytorch_model.bin") && msg.contains("safe_serialization=True"), "{msg}");

    // A relative folder resolves against base_dir.
    let base = fixture("");
    let r = Resolver { base_dir: Some(&base), ..Resolver::default() };
    assert_eq!(r.resolve("qwen3_moe_tiny").unwrap().dir, base.join("qwen3_moe_tiny"));
}

#[test]
fn recipe_stage_and_run_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path().join("home")).unwrap();
    let runs_dir = tmp.path().join("runs");
    publish_model(&cache, "k-sft", ArtifactKind::Model);
    let stages =
        BTreeMap::from([("sft".to_string(), "k-sft".to_string()), ("later".to_string(), "k-unbuilt".to_string())]);
    let recipe = Path::new("recipes/x.toml");
    let record = RunRecord {
        recipe_name: "x".into(),
        stages: vec![
            StageRecord {
                name: "sft".into(),
                kind: "sft".into(),
                key: "k-sft".into(),
                status: StageStatus::Ran,
                ..Default::default()
            },
            StageRecord {
                name: "gone".into(),
                kind: "sft".into(),
                key: "k-gone".into(),
                status: StageStatus::Ran,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let sink = RunSink::start(&runs_dir, record).unwrap();
    let run_id = sink.id();
    let r = Resolver {
        cache: Some(&cache),
        runs_dir: Some(&runs_dir),
        recipe: Some((recipe, &stages)),
        ..Resolver::default()
    };

    let m = r.resolve("sft").unwrap();
    assert_eq!(m.origin, Origin::Stage { stage: "sft".into(), key: "k-sft".into() });
    assert_eq!(m.manifest.as_ref().unwrap().stage_kind, "sft");
    let e = r.resolve("later").unwrap_err().to_string();
    assert!(e.contains("not built yet") && e.contains("mmrun recipes/x.toml"), "{e}");

    // A unique prefix of the run name, then the stage.
    let m = r.resolve(&format!("{}:sft", &run_id[..8])).unwrap();
    assert!(matches!(&m.origin, Origin::Run { run, stage, .. } if *run == run_id && stage == "sft"));
    let e = r.resolve(&format!("{run_id}:nope")).unwrap_err().to_string();
    assert!(e.contains("no stage 'nope'") && e.contains("sft, gone"), "{e}");
    let e = r.resolve(&format!("{run_id}:gone")).unwrap_err().to_string();
    assert!(e.contains("not in the cache") && e.contains("mmrun resume"), "{e}");

    // Nothing matches: one error listing every form tried.
    let e = r.resolve("nosuch:thing").unwrap_err();
    let msg = e.to_string();
    for part in ["a stage of recipes/x.toml", "run 'nosuch'", "folder nosuch:thing", "hf://"] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
    let ModelRefError::NotFound { tried, .. } = e else { panic!("{e}") };
    assert_eq!(tried.len(), 4);
}

#[test]
fn adapter_without_merge_is_not_a_full_model() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(layout::ADAPTER_CONFIG), "{}").unwrap();
    std::fs::write(tmp.path().join(layout::ADAPTER_WEIGHTS), b"x").unwrap();
    let m = Resolver::default().resolve(tmp.path().to_str().unwrap()).unwrap();
    assert_eq!(m.kind, ArtifactKind::Adapter);
    let e = m.full_model_dir().unwrap_err().to_string();
    assert!(e.contains("merge = true"), "{e}");
}

#[test]
fn reward_models_resolve_but_are_refused_where_text_is_generated() {
    let tmp = tempfile::tempdir().unwrap();
    // A folder whose config names a sequence classifier (what a reward_model stage writes).
    let dir = tmp.path().join("rm");
    std::fs::create_dir(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3_tiny").join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["Qwen3ForSequenceClassification"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixture("qwen3_tiny").join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let m = Resolver::default().resolve(dir.to_str().unwrap()).unwrap();
    assert_eq!(m.kind, ArtifactKind::RewardModel);
    assert_eq!(m.full_model_dir().unwrap(), dir, "the transformers export copies it as it is");
    let e = m.text_model_dir("chat or serve").unwrap_err().to_string();
    for part in ["is a reward model", "cannot be used to chat or serve", "--to hf", "folder "] {
        assert!(e.contains(part), "{part} missing from: {e}");
    }
    assert!(!e.contains('\n'), "one line: {e}");

    // A reward_model stage's artifact resolves as one too, and the refusal names the stage.
    let cache = Cache::open(tmp.path().join("home")).unwrap();
    publish_model(&cache, "k-rm", ArtifactKind::RewardModel);
    let stages = BTreeMap::from([("rm".to_string(), "k-rm".to_string())]);
    let r = Resolver { cache: Some(&cache), recipe: Some((Path::new("x.toml"), &stages)), ..Resolver::default() };
    let m = r.resolve("rm").unwrap();
    assert_eq!(m.kind, ArtifactKind::RewardModel);
    let e = m.text_model_dir("export to GGUF").unwrap_err().to_string();
    assert!(e.contains("stage 'rm'") && e.contains("export to GGUF"), "{e}");
    // A causal LM passes.
    let m = Resolver::default().resolve(fixture("qwen3_tiny").to_str().unwrap()).unwrap();
    assert!(m.text_model_dir("chat").is_ok());
}

#[test]
fn hub_model_is_fetched_at_one_commit_and_pickles_refused() {
    let hub = TestHub::start();
    let files: Vec<(String, Vec<u8>, bool)> = ["config.json", "model.safetensors", "generation_config.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(fixture("qwen3_tiny").join(f)).unwrap(), f.ends_with(".safetensors")))
        .chain([("pytorch_model.bin".to_string(), b"never fetched".to_vec(), true)])
        .collect();
    let commit = hub.commit(RepoType::Model, "acme/tiny", "main", files);
    hub.commit(
        RepoType::Model,
        "acme/pickled",
        "main",
        vec![("config.json".into(), b"{}".to_vec(), false), ("pytorch_model.bin".into(), b"pickle".to_vec(), true)],
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = hub_opts(&hub, cache.path());
    let r = Resolver { hub: Some(&opts), ..Resolver::default() };

    let m = r.resolve("hf://acme/tiny").unwrap();
    assert_eq!(m.kind, ArtifactKind::Model);
    assert!(matches!(&m.origin, Origin::Hub { commit: c, revision, .. } if *c == commit && revision == "main"));
    assert!(m.has_full_model());
    assert!(!m.dir.join("pytorch_model.bin").exists(), "pickled files are never downloaded");
    assert_eq!(
        std::fs::read(m.dir.join("model.safetensors")).unwrap(),
        std::fs::read(fixture("qwen3_tiny").join("model.safetensors")).unwrap()
    );
    // Pinned to a commit.
    let again = r.resolve(&format!("hf://acme/tiny@{commit}")).unwrap();
    assert_eq!(again.dir, m.dir);

    let e = r.resolve("hf://acme/pickled").unwrap_err().to_string();
    assert!(e.contains("pytorch_model.bin") && e.contains("safetensors only"), "{e}");
    let e = r.resolve("hf://acme/missing").unwrap_err().to_string();
    assert!(e.starts_with("model 'hf://acme/missing'") && e.contains("not found"), "{e}");
    let e = r.resolve("hf://datasets/acme/tiny").unwrap_err().to_string();
    assert!(e.contains("whole model repository"), "{e}");
}
