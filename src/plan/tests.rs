//! Planner tests against stub stages and a temporary cache.

use super::*;
use crate::recipe::testing::{registry, Eval, PretrainV2, Sft, Tok, GOOD};
use crate::recipe::{load_str, StageSpec};
use std::path::Path;

fn recipe(text: &str, overrides: &[&str]) -> Recipe {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load_str(Path::new("r.toml"), text.to_string(), &o, &registry()).unwrap_or_else(|e| panic!("{e}"))
}

fn datasets(r: &Recipe, hash_suffix: &str) -> BTreeMap<String, ResolvedDataset> {
    r.datasets
        .iter()
        .map(|(n, spec)| {
            let rd = ResolvedDataset {
                name: n.clone(),
                spec: spec.clone(),
                files: vec![],
                content_hash: format!("{}{hash_suffix}", blake3::hash(n.as_bytes()).to_hex()),
            };
            (n.clone(), rd)
        })
        .collect()
}

/// The stub recipes run on the CPU.
const CPU: DeviceClass = DeviceClass::Cpu;

fn plan(cache: &Cache, text: &str, overrides: &[&str]) -> Plan {
    let r = recipe(text, overrides);
    build_with(&r, cache, &datasets(&r, ""), CPU, &registry()).unwrap()
}

/// What the executor does after a stage succeeds: publish the object, record the fingerprint.
fn publish_all(cache: &Cache, p: &Plan) {
    for s in &p.stages {
        let dir = cache.object_dir(&s.key);
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = crate::artifact::Manifest {
            kind: ArtifactKind::Model,
            stage_kind: s.kind.clone(),
            key: s.key.clone(),
            mmrun_version: crate::VERSION.into(),
            created_unix: 0,
            files: vec![],
            metrics: Default::default(),
        };
        std::fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        record_fingerprint(cache, "demo", s).unwrap();
    }
}

fn cache() -> (tempfile::TempDir, Cache) {
    let d = tempfile::tempdir().unwrap();
    let c = Cache::open(d.path().join("cache")).unwrap();
    (d, c)
}

fn statuses(p: &Plan) -> Vec<(&str, Status)> {
    p.stages.iter().map(|s| (s.name.as_str(), s.status)).collect()
}

fn reasons(p: &Plan, name: &str) -> Vec<String> {
    p.stage(name).unwrap().reasons.iter().map(ToString::to_string).collect()
}

#[test]
fn fresh_cache_everything_missing_in_topo_order() {
    let (_d, c) = cache();
    let p = plan(&c, GOOD, &[]);
    assert_eq!(
        statuses(&p),
        [("tok", Status::Missing), ("base", Status::Missing), ("sft", Status::Missing), ("report", Status::Missing)]
    );
    assert_eq!(reasons(&p, "base"), ["never built"]);
    let keys: std::collections::BTreeSet<&str> = p.stages.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys.len(), 4, "keys are distinct");
    // Deterministic.
    let again = plan(&c, GOOD, &[]);
    assert_eq!(
        p.stages.iter().map(|s| &s.key).collect::<Vec<_>>(),
        again.stages.iter().map(|s| &s.key).collect::<Vec<_>>()
    );
}

#[test]
fn published_stages_are_cached() {
    let (_d, c) = cache();
    publish_all(&c, &plan(&c, GOOD, &[]));
    let p = plan(&c, GOOD, &[]);
    assert!(p.stages.iter().all(|s| s.status == Status::Cached && s.reasons.is_empty()));
}

#[test]
fn cosmetic_param_change_keeps_every_key() {
    let (_d, c) = cache();
    let before = plan(&c, GOOD, &[]);
    let after =
        plan(&c, GOOD, &["stages.base.log_every=1", "stages.base.threads=4", "stages.report.print_samples=true"]);
    for (a, b) in before.stages.iter().zip(&after.stages) {
        assert_eq!(a.key, b.key, "{} changed key on a cosmetic edit", a.name);
    }
    let base = after.stage("base").unwrap();
    assert_eq!(base.excluded["log_every"], 1);
    assert!(base.fingerprint.params.get("log_every").is_none());
    // Writing a default explicitly is not a change either.
    let explicit = plan(&c, GOOD, &["stages.base.batch_size=32"]);
    assert_eq!(explicit.stage("base").unwrap().key, before.stage("base").unwrap().key);
}

#[test]
fn output_param_change_invalidates_the_stage_and_its_descendants_only() {
    let (_d, c) = cache();
    let before = plan(&c, GOOD, &[]);
    publish_all(&c, &before);
    let after = plan(&c, GOOD, &["stages.base.lr=3e-4"]);
    assert_eq!(
        statuses(&after),
        [("tok", Status::Cached), ("base", Status::Stale), ("sft", Status::Stale), ("report", Status::Stale)]
    );
    for name in ["base", "sft", "report"] {
        assert_ne!(before.stage(name).unwrap().key, after.stage(name).unwrap().key, "{name}");
    }
    assert_eq!(before.stage("tok").unwrap().key, after.stage("tok").unwrap().key);
    assert_eq!(reasons(&after, "base"), ["param lr 5e-4 → 3e-4"]);
    assert_eq!(reasons(&after, "sft"), ["input base is stale"]);
    assert_eq!(reasons(&after, "report"), ["input base is stale", "input sft is stale"]);
}

#[test]
fn seed_dataset_and_version_reasons() {
    let (_d, c) = cache();
    let r = recipe(GOOD, &[]);
    publish_all(&c, &build_with(&r, &c, &datasets(&r, ""), CPU, &registry()).unwrap());

    let p = plan(&c, GOOD, &["recipe.seed=7"]);
    assert!(p.stages.iter().all(|s| s.status == Status::Stale));
    assert_eq!(reasons(&p, "tok"), ["seed 42 → 7"]);

    let p = build_with(&r, &c, &datasets(&r, "-v2"), CPU, &registry()).unwrap();
    let why = reasons(&p, "tok");
    assert_eq!(why.len(), 1);
    assert!(why[0].starts_with("dataset text changed (content hash "), "{why:?}");
    assert!(why[0].contains(" → "), "{why:?}");

    let p = plan(&c, GOOD, &["datasets.chat.on_bad_record=skip"]);
    assert_eq!(statuses(&p)[..2], [("tok", Status::Cached), ("base", Status::Cached)]);
    assert_eq!(reasons(&p, "sft"), ["dataset chat on_bad_record error → skip"]);

    let v2: [&dyn crate::recipe::DynStageKind; 4] = [&Tok, &PretrainV2, &Sft, &Eval];
    let p = build_with(&r, &c, &datasets(&r, ""), CPU, &v2).unwrap();
    assert_eq!(reasons(&p, "base"), ["stage version 1 → 2"]);
    assert_eq!(p.stage("tok").unwrap().status, Status::Cached);
}

#[test]
fn model_change_reaches_only_the_stage_that_builds_the_model() {
    let (_d, c) = cache();
    publish_all(&c, &plan(&c, GOOD, &[]));
    let p = plan(&c, GOOD, &["model.hidden_size=128"]);
    assert_eq!(p.stage("tok").unwrap().status, Status::Cached);
    let why = reasons(&p, "base");
    assert!(why.contains(&"model hidden_size 64 → 128".to_string()), "{why:?}");
    // The vocabulary comes from the tokenizer (an input), not from the preset's placeholder.
    let Some(key::ModelInKey::Config(m)) = &p.stage("base").unwrap().fingerprint.model else { panic!("no model") };
    assert!(m.get("vocab_size").is_none());
    assert!(p.stage("sft").unwrap().fingerprint.model.is_none());
    assert_eq!(reasons(&p, "sft"), ["input base is stale"]);
}

#[test]
fn renaming_a_stage_keeps_keys() {
    let (_d, c) = cache();
    let a = plan(&c, GOOD, &[]);
    let renamed = GOOD.replace("[stages.base]", "[stages.foundation]").replace("\"base\"", "\"foundation\"");
    let b = plan(&c, &renamed, &[]);
    assert_eq!(a.stage("base").unwrap().key, b.stage("foundation").unwrap().key);
    assert_eq!(a.stage("report").unwrap().key, b.stage("report").unwrap().key);
}

#[test]
fn removed_object_is_missing_with_a_reason() {
    let (_d, c) = cache();
    let p = plan(&c, GOOD, &[]);
    publish_all(&c, &p);
    std::fs::remove_dir_all(c.object_dir(&p.stage("sft").unwrap().key)).unwrap();
    let p = plan(&c, GOOD, &[]);
    assert_eq!(p.stage("sft").unwrap().status, Status::Missing);
    assert!(reasons(&p, "sft")[0].contains("no longer in the cache"), "{:?}", reasons(&p, "sft"));
    assert_eq!(p.stage("report").unwrap().status, Status::Cached);
}

#[test]
fn json_shape_and_explain() {
    let (_d, c) = cache();
    publish_all(&c, &plan(&c, GOOD, &[]));
    let p = plan(&c, GOOD, &["stages.base.lr=3e-4"]);
    let j = p.to_json();
    let base = &j["stages"][1];
    assert_eq!(base["name"], "base");
    assert_eq!(base["kind"], "pretrain");
    assert_eq!(base["status"], "stale");
    assert_eq!(base["reasons"], serde_json::json!(["param lr 5e-4 → 3e-4"]));
    assert_eq!(base["key"].as_str().unwrap().len(), 64);
    assert_eq!(j["stages"][0]["status"], "cached");
    assert_eq!(j["stages"].as_array().unwrap().len(), 4);

    let why = p.explain("base").unwrap();
    for needle in [
        "stage base (kind pretrain): stale",
        "lr = 3e-4",
        "batch_size = 32",
        "input      tokenizer = tok → key",
        "dataset    data = text → content",
        "cosmetic params: log_every = 10, threads = 0",
        "- param lr 5e-4 → 3e-4",
        "seed       42",
        "device     cpu",
    ] {
        assert!(why.contains(needle), "--why lacks {needle:?}:\n{why}");
    }
    let e = p.explain("bsae").unwrap_err().to_string();
    assert!(e.contains("did you mean 'base'?"), "{e}");
    let listing = p.to_string();
    assert!(listing.contains("base    pretrain   stale"), "{listing}");
    assert!(listing.contains("- param lr 5e-4 → 3e-4"), "{listing}");
}

#[test]
fn programmatic_recipes_get_structural_errors() {
    let (_d, c) = cache();
    let mut r = recipe(GOOD, &[]);
    let ds = datasets(&r, "");
    let sft = r.stages.iter_mut().find(|s| s.name == "sft").unwrap();
    sft.inputs[0] = InputRef::Stage { param: "from", stage: "tok".into(), accepts: vec![ArtifactKind::Model] };
    let e = build_with(&r, &c, &ds, CPU, &registry()).unwrap_err();
    assert_eq!(e.to_string(), "stage 'sft' takes from = 'tok', but 'tok' produces a tokenizer, not a model");

    let mut r = recipe(GOOD, &[]);
    let base: &mut StageSpec = r.stages.iter_mut().find(|s| s.name == "base").unwrap();
    base.inputs.push(InputRef::Stage { param: "from", stage: "sft".into(), accepts: vec![ArtifactKind::Model] });
    let e = build_with(&r, &c, &ds, CPU, &registry()).unwrap_err();
    assert_eq!(e.to_string(), "stages depend on each other in a cycle: base → sft → base");

    let mut r = recipe(GOOD, &[]);
    let sft = r.stages.iter_mut().find(|s| s.name == "sft").unwrap();
    sft.inputs[1] =
        InputRef::Dataset { param: "data", dataset: "chat".into(), accepts: &[crate::data::spec::DataFormat::Dpo] };
    let e = build_with(&r, &c, &ds, CPU, &registry()).unwrap_err();
    assert_eq!(e.to_string(), "stage 'sft' takes data = 'chat', but dataset 'chat' has format sharegpt, not dpo");

    let r = recipe(GOOD, &[]);
    let mut partial = ds.clone();
    partial.remove("chat");
    let e = build_with(&r, &c, &partial, CPU, &registry()).unwrap_err();
    assert!(e.to_string().contains("dataset 'chat', which was not resolved"), "{e}");
}

#[test]
fn absent_model_section_hashes_as_null() {
    let (_d, c) = cache();
    let text = GOOD.replace("[model]\npreset = \"tiny\"\n", "");
    let p = plan(&c, &text, &[]);
    assert_eq!(p.stage("base").unwrap().fingerprint.model, Some(key::ModelInKey::NoTable));
    publish_all(&c, &p);
    let p = plan(&c, &text, &["model.preset=tiny"]);
    assert_eq!(reasons(&p, "base"), ["now builds its model from [model]"]);
}

#[test]
fn corrupt_record_costs_only_the_explanation() {
    let (_d, c) = cache();
    let p = plan(&c, GOOD, &[]);
    record_fingerprint(&c, "demo", p.stage("tok").unwrap()).unwrap();
    let rec = c.bucket(crate::cache::Bucket::Fingerprints).join("demo/tok.json");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rec).unwrap()).unwrap();
    assert_eq!(saved["key"], serde_json::json!(p.stage("tok").unwrap().key));
    assert_eq!(saved["fingerprint"]["kind"], "tokenizer");
    std::fs::write(&rec, "{not json").unwrap();
    let p = plan(&c, GOOD, &[]);
    assert_eq!(p.stage("tok").unwrap().status, Status::Missing);
    assert!(
        reasons(&p, "tok")[0].starts_with("the record of its last build is unreadable"),
        "{:?}",
        reasons(&p, "tok")
    );
}

#[test]
fn unset_optional_params_stay_out_of_the_key() {
    let (_d, c) = cache();
    let p = plan(&c, GOOD, &[]);
    let sft = p.stage("sft").unwrap();
    assert!(sft.fingerprint.params.get("max_steps").is_none(), "{:?}", sft.fingerprint);
    publish_all(&c, &p);
    let p = plan(&c, GOOD, &["stages.sft.max_steps=100"]);
    assert_eq!(reasons(&p, "sft"), ["param max_steps = 100 (new)"]);
}

#[test]
fn precision_enters_model_keys_and_auto_keys_like_its_resolution() {
    let (_d, c) = cache();
    let keys = |p: &Plan| p.stages.iter().map(|s| (s.name.clone(), s.key.clone())).collect::<BTreeMap<_, _>>();
    // GOOD runs on the CPU, where `auto` (the default) keys like what it resolves to on this
    // machine: bf16 with avx512_bf16, f32 without.
    let auto = plan(&c, GOOD, &[]);
    let resolved = crate::recipe::Precision::Auto.resolve(crate::recipe::DeviceClass::Cpu).as_str();
    assert_eq!(keys(&auto), keys(&plan(&c, GOOD, &["recipe.precision=auto"])));
    assert_eq!(keys(&auto), keys(&plan(&c, GOOD, &[&format!("recipe.precision={resolved}")])));
    let auto = plan(&c, GOOD, &["recipe.precision=f32"]);
    assert!(auto.stage("base").unwrap().fingerprint.precision.is_none());

    publish_all(&c, &auto);
    let bf16 = plan(&c, GOOD, &["recipe.precision=bf16"]);
    assert_eq!(bf16.stage("tok").unwrap().key, auto.stage("tok").unwrap().key, "a tokenizer has no numerics");
    for name in ["base", "sft", "report"] {
        assert_ne!(bf16.stage(name).unwrap().key, auto.stage(name).unwrap().key, "{name}");
    }
    assert_eq!(bf16.stage("base").unwrap().fingerprint.precision, Some(crate::recipe::Precision::Bf16));
    assert_eq!(reasons(&bf16, "base"), ["precision f32 → bf16"]);
    assert!(bf16.explain("base").unwrap().contains("precision  bf16"));
    // Eval runs in f32 whatever the policy; it moves only because its models did.
    assert!(bf16.stage("report").unwrap().fingerprint.precision.is_none());
    assert_eq!(reasons(&bf16, "report"), ["input base is stale", "input sft is stale"]);

    // On CUDA `auto` is bf16: it keys like explicit bf16, and explicit f32 differs from both.
    // (The loader refuses `cuda` on a CPU-only build; the planner only sees the resolved class.)
    let on_cuda = |p: &str| {
        let r = recipe(GOOD, &[&format!("recipe.precision={p}")]);
        build_with(&r, &c, &datasets(&r, ""), DeviceClass::Cuda, &registry()).unwrap()
    };
    let cuda = |p: &str| keys(&on_cuda(p));
    assert_eq!(cuda("auto"), cuda("bf16"));
    assert_ne!(cuda("auto")["base"], cuda("f32")["base"]);
    // ...and a CUDA f32 run keys exactly as CUDA runs did before precision existed (no field).
    let cuda_f32 = on_cuda("f32");
    assert!(cuda_f32.stage("base").unwrap().fingerprint.precision.is_none());
}

#[test]
fn unknown_precision_is_a_recipe_error() {
    let o = vec!["recipe.precision=fp16".to_string()];
    let e = load_str(Path::new("r.toml"), GOOD.to_string(), &o, &registry()).unwrap_err().to_string();
    assert!(e.contains("precision") && e.contains("bf16"), "{e}");
}

#[test]
fn an_adopted_tokenizer_is_keyed_by_its_content_not_its_path() {
    let (d, c) = cache();
    let dir = d.path();
    let write = |file: &str, body: &str| {
        let p = dir.join(file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    write("a/tokenizer.json", "{\"v\": 1}");
    write("b/tokenizer.json", "{\"v\": 1}");
    let key = |src: &str| {
        let text = format!("[recipe]\nname = \"t\"\n\n[stages.tok]\nkind = \"tokenizer\"\nsource = \"{src}\"\n");
        let reg = crate::stages::kinds();
        let r = load_str(&dir.join("r.toml"), text, &[], &reg).unwrap_or_else(|e| panic!("{e}"));
        build_with(&r, &c, &BTreeMap::new(), CPU, &reg).unwrap().stage("tok").unwrap().key.clone()
    };
    let k = key("a");
    assert_eq!(key("b"), k, "the same bytes somewhere else: same key");
    assert_eq!(key("a/tokenizer.json"), k, "naming the folder or the file is the same input");
    write("a/tokenizer.json", "{\"v\": 2}");
    assert_ne!(key("a"), k, "an edited tokenizer must not be served from the cache");
    write("b/tokenizer_config.json", "{}");
    assert_ne!(key("b"), k, "its tokenizer_config.json (chat template) is read too");
}

#[test]
fn a_local_model_folder_is_read_once_across_plans_and_rehashed_when_it_changes() {
    let (d, c) = cache();
    let m = d.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("config.json"), "{}").unwrap();
    std::fs::write(m.join("model.safetensors"), [1u8; 4096]).unwrap();
    let text = "[recipe]\nname = \"t\"\n\n[models.base]\nsource = \"m\"\n\n\
                [stages.ev]\nkind = \"eval\"\nmodels = [\"base\"]\nprompts = [\"hi\"]\n";
    let reg = crate::stages::kinds();
    let r = load_str(&d.path().join("r.toml"), text.into(), &[], &reg).unwrap_or_else(|e| panic!("{e}"));
    let key = || build_with(&r, &c, &BTreeMap::new(), CPU, &reg).unwrap().stage("base").unwrap().key.clone();
    let k = key();
    assert_eq!(c.files_hashed(), 2, "config and weights read once");
    assert_eq!(key(), k);
    assert_eq!(c.files_hashed(), 2, "an unchanged folder is not read again");

    // Touched: read again, and the same bytes keep the key.
    let weights = m.join("model.safetensors");
    let later = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    std::fs::File::options().write(true).open(&weights).unwrap().set_modified(later).unwrap();
    assert_eq!(key(), k);
    assert_eq!(c.files_hashed(), 3);
    // Edited: a new key.
    std::fs::write(&weights, [2u8; 4096]).unwrap();
    assert_ne!(key(), k, "edited weights must not be served from the cache");
    assert_eq!(c.files_hashed(), 4);
}

#[test]
fn a_record_in_another_layout_is_a_reason_not_a_crash() {
    let (_d, c) = cache();
    let p = plan(&c, GOOD, &[]);
    record_fingerprint(&c, "demo", p.stage("tok").unwrap()).unwrap();
    let rec = c.bucket(crate::cache::Bucket::Fingerprints).join("demo/tok.json");
    // What a future (or long-gone) mmrun might have written: valid JSON, unknown fields.
    std::fs::write(&rec, r#"{"key": "00", "fingerprint": {"kind": "tokenizer", "recipe_hash": "x"}}"#).unwrap();
    let p = plan(&c, GOOD, &[]);
    assert_eq!(p.stage("tok").unwrap().status, Status::Missing);
    let why = reasons(&p, "tok");
    assert!(why[0].starts_with("the record of its last build was written by an older (or newer) mmrun"), "{why:?}");
    assert!(matches!(p.stage("tok").unwrap().reasons[0], StaleReason::RecordFromOtherVersion(_)));
}

#[test]
fn executor_and_resources_are_not_in_any_key() {
    let (_d, c) = cache();
    let before = plan(&c, GOOD, &[]);
    let after =
        plan(&c, GOOD, &["recipe.executor=slurm", "recipe.resources.partition=gpu", "stages.base.resources.gpus=2"]);
    for (a, b) in before.stages.iter().zip(&after.stages) {
        assert_eq!(a.key, b.key, "{} changed key when only where it runs changed", a.name);
    }
}
