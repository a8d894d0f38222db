//! The pretrain and SFT stages end to end on a tiny model: artifact layout, interruption and exact
//! resume (the resumed model's bytes equal an uninterrupted run's), and SFT from the result.

use crate::common;

use mmrun::artifact::{Artifact, ArtifactKind, Manifest};
use mmrun::cache::Cache;
use mmrun::cancel::{CancelToken, Interrupted};
use mmrun::data::spec::{DataFormat, DatasetSpec, OnBadRecord};
use mmrun::data::ResolvedDataset;
use mmrun::recipe::{Precision, Recipe};
use mmrun::runs::RunSink;
use mmrun::stages::{Inputs, StageContext};
use std::path::{Path, PathBuf};

fn artifact(dir: &Path, kind: ArtifactKind, stage_kind: &str, key: &str) -> Artifact {
    Artifact {
        dir: dir.to_path_buf(),
        manifest: Manifest {
            kind,
            stage_kind: stage_kind.into(),
            key: key.into(),
            mmrun_version: mmrun::VERSION.into(),
            created_unix: 0,
            files: vec![],
            metrics: Default::default(),
        },
    }
}

fn dataset(dir: &Path, name: &str, format: DataFormat, lines: &[String]) -> ResolvedDataset {
    let path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    ResolvedDataset {
        name: name.into(),
        spec: DatasetSpec {
            source: path.display().to_string(),
            format,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Error,
            builtin: Default::default(),
        },
        files: vec![path.clone()],
        content_hash: blake3::hash(&std::fs::read(&path).unwrap()).to_hex().to_string(),
    }
}

const RECIPE: &str = r#"
[recipe]
name = "t"
seed = 3
device = "cpu"

[model]
preset = "tiny"

[datasets.text]
source = "text.jsonl"
format = "text"

[datasets.chat]
source = "chat.jsonl"
format = "sharegpt"

[stages.tok]
kind = "pretrain"
data = "text"
"#;

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cache: Cache,
    recipe: Recipe,
    inputs: Inputs,
}

fn world(shared: &Path) -> World {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cache = Cache::open(root.join("cache")).unwrap();
    let rpath = root.join("r.toml");
    std::fs::write(&rpath, RECIPE).unwrap();
    let recipe = mmrun::recipe::load(&rpath, &[], &mmrun::stages::kinds()).unwrap();
    let texts: Vec<String> = (0..40)
        .map(|i| serde_json::json!({"text": format!("Sentence number {i}: the cat sat on mat {}.", i % 7)}).to_string())
        .collect();
    let chats: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"conversations": [
                {"role": "user", "content": format!("What is {i} plus 1?")},
                {"role": "assistant", "content": format!("{}", i + 1)}
            ]})
            .to_string()
        })
        .collect();
    let mut inputs = Inputs::default();
    inputs.datasets.insert("text".into(), dataset(&root, "text", DataFormat::Text, &texts));
    inputs.datasets.insert("chat".into(), dataset(&root, "chat", DataFormat::Sharegpt, &chats));
    let tok = artifact(&shared.join("minimind_tokenizer"), ArtifactKind::Tokenizer, "tokenizer", "tok-key");
    inputs.artifacts.insert("tok".into(), tok);
    World { _dir: dir, root, cache, recipe, inputs }
}

fn run_stage(
    w: &World,
    kind: &str,
    params: toml::Table,
    work: &str,
    out: &str,
    cancel: &CancelToken,
) -> (anyhow::Result<mmrun::stages::StageOutcome>, PathBuf) {
    let stage = mmrun::stages::find(kind).expect("registered");
    let canonical = stage.parse_params(&params).unwrap().canonical;
    let out_dir = w.root.join(out);
    let work_dir = w.root.join(work);
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::create_dir_all(&work_dir).unwrap();
    let run = RunSink::create(w.root.join(format!("run-{out}"))).unwrap();
    let mut ctx = StageContext {
        name: "stage",
        key: "k",
        recipe: &w.recipe,
        inputs: &w.inputs,
        out_dir: &out_dir,
        work_dir: &work_dir,
        cache: &w.cache,
        run: &run,
        cancel,
        rank: None,
    };
    (stage.run(&mut ctx, &canonical), out_dir)
}

fn pretrain_params() -> toml::Table {
    toml::toml! {
        tokenizer = "tok"
        data = "text"
        max_seq_len = 32
        batch_size = 4
        max_steps = 60
        lr = 3e-3
        save_every = 7
    }
}

#[test]
fn pretrain_resumes_exactly_and_sft_builds_on_it() {
    let Some(shared) = common::shared_data() else { return };
    let w = world(&shared);

    // Uninterrupted reference run.
    let (res, full) = run_stage(&w, "pretrain", pretrain_params(), "work-a", "out-a", &CancelToken::new());
    let outcome = res.unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(full.join(f).is_file(), "{f} missing from the pretrain artifact");
    }
    let final_loss = outcome.metrics["final_loss"].as_f64().unwrap();
    let metrics = std::fs::read_to_string(w.root.join("run-out-a/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(final_loss < first["loss"].as_f64().unwrap() - 1.0, "loss {} -> {final_loss}", first["loss"]);
    assert!(w.root.join("run-out-a/stage-loss.png").is_file());

    // Interrupted as soon as a few steps are logged, then resumed in the same work dir.
    let cancel = CancelToken::new();
    let watcher = {
        let (cancel, m) = (cancel.clone(), w.root.join("run-out-b/metrics.jsonl"));
        std::thread::spawn(move || loop {
            if std::fs::read_to_string(&m).map(|s| s.lines().count() >= 3).unwrap_or(false) {
                cancel.cancel();
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        })
    };
    let (res, _) = run_stage(&w, "pretrain", pretrain_params(), "work-b", "out-b", &cancel);
    watcher.join().unwrap();
    let err = res.expect_err("the run should have been interrupted");
    assert!(err.downcast_ref::<Interrupted>().is_some(), "{err:#}");
    let (res, resumed) = run_stage(&w, "pretrain", pretrain_params(), "work-b", "out-b2", &CancelToken::new());
    res.unwrap();
    assert_eq!(
        std::fs::read(full.join("model.safetensors")).unwrap(),
        std::fs::read(resumed.join("model.safetensors")).unwrap(),
        "resumed weights differ from the uninterrupted run"
    );

    // SFT from the pretrained model.
    let mut w = w;
    w.inputs.artifacts.insert("base".into(), artifact(&full, ArtifactKind::Model, "pretrain", "base-key"));
    let params = toml::toml! {
        from = "base"
        data = "chat"
        max_seq_len = 64
        batch_size = 4
        max_steps = 6
        lr = 1e-3
    };
    let (res, sft) = run_stage(&w, "sft", params, "work-s", "out-s", &CancelToken::new());
    let m = res.unwrap().metrics;
    assert!(m["final_loss"].as_f64().unwrap().is_finite());
    assert!(sft.join("model.safetensors").is_file() && sft.join("tokenizer.json").is_file());
    assert_ne!(
        std::fs::read(sft.join("model.safetensors")).unwrap(),
        std::fs::read(full.join("model.safetensors")).unwrap()
    );

    // One epoch with packing (the default) and with one conversation per row: the same trained
    // tokens (no label crosses a conversation), in fewer rows, so fewer steps.
    let one_epoch = |packing: Option<bool>| {
        let mut p = toml::toml! { from = "base" data = "chat" max_seq_len = 64 batch_size = 4 epochs = 1 lr = 1e-3 };
        if let Some(on) = packing {
            p.insert("packing".into(), toml::Value::Boolean(on));
        }
        let tag = format!("{packing:?}");
        let (res, dir) = run_stage(&w, "sft", p, &format!("work-e{tag}"), &format!("out-e{tag}"), &CancelToken::new());
        (res.unwrap().metrics, std::fs::read(dir.join("model.safetensors")).unwrap())
    };
    let (packed, packed_w) = one_epoch(None);
    let (plain, plain_w) = one_epoch(Some(false));
    let n = |m: &serde_json::Map<String, serde_json::Value>, k: &str| m[k].as_u64().unwrap();
    assert_eq!(n(&packed, "useful_tokens"), n(&plain, "useful_tokens"), "{packed:?} vs {plain:?}");
    assert!(n(&packed, "steps") < n(&plain, "steps"), "{packed:?} vs {plain:?}");
    assert!(packed["final_loss"].as_f64().unwrap().is_finite());
    assert_ne!(packed_w, plain_w);
    assert_eq!(one_epoch(Some(true)).1, packed_w, "packing = true is the default");
}

/// `[recipe] precision = "bf16"` reaches every training stage: pretrain, SFT, LoRA (merged) and DPO
/// each produce different weights than the same stage in f32 (so the policy was applied), stored
/// as f32 safetensors, with finite losses.
#[test]
fn bf16_precision_reaches_every_training_stage() {
    let Some(shared) = common::shared_data() else { return };
    let mut w = world(&shared);
    let pairs: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("What is {i} plus 1?"),
                "chosen": format!("{}", i + 1),
                "rejected": format!("{}", i + 7),
            })
            .to_string()
        })
        .collect();
    w.inputs.datasets.insert("pairs".into(), dataset(&w.root, "pairs", DataFormat::Dpo, &pairs));
    let stages: [(&str, toml::Table); 4] = [
        (
            "pretrain",
            toml::toml! { tokenizer = "tok" data = "text" max_seq_len = 32 batch_size = 4 max_steps = 6 lr = 3e-3 },
        ),
        ("sft", toml::toml! { from = "base" data = "chat" max_seq_len = 64 batch_size = 4 max_steps = 3 lr = 1e-3 }),
        (
            "lora",
            toml::toml! { from = "base" data = "chat" rank = 4 merge = true max_seq_len = 64 batch_size = 4 max_steps = 3 lr = 1e-2 },
        ),
        ("dpo", toml::toml! { from = "base" data = "pairs" max_seq_len = 64 batch_size = 4 max_steps = 3 lr = 1e-3 }),
    ];
    let weights = |dir: &Path, file: &str| -> (Vec<u8>, Vec<(String, safetensors::Dtype)>) {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let dtypes = st.tensors().into_iter().map(|(n, t)| (n, t.dtype())).collect();
        (bytes, dtypes)
    };
    // Downstream stages all start from the f32 pretrain output, so a difference between their f32
    // and bf16 outputs can only come from their own precision.
    for (kind, params) in &stages {
        let mut out = Vec::new();
        for precision in [Precision::F32, Precision::Bf16] {
            w.recipe.meta.precision = precision;
            let tag = format!("{kind}-{}", precision.as_str());
            let (res, dir) =
                run_stage(&w, kind, params.clone(), &format!("work-{tag}"), &format!("out-{tag}"), &CancelToken::new());
            let metrics = res.unwrap_or_else(|e| panic!("{tag}: {e:#}")).metrics;
            assert!(metrics["final_loss"].as_f64().is_some_and(f64::is_finite), "{tag}: {metrics:?}");
            let file = if *kind == "lora" { "adapter_model.safetensors" } else { "model.safetensors" };
            let (bytes, dtypes) = weights(&dir, file);
            assert!(dtypes.iter().all(|(_, d)| *d == safetensors::Dtype::F32), "{tag}: {dtypes:?}");
            out.push(bytes);
            if *kind == "pretrain" && precision == Precision::F32 {
                w.inputs.artifacts.insert("base".into(), artifact(&dir, ArtifactKind::Model, "pretrain", "base-key"));
            }
        }
        assert_ne!(out[0], out[1], "{kind} ignored precision = bf16");
    }
}

/// Add the `problems` dataset (16 prompt/answer pairs) and a briefly pretrained model `base`.
fn add_problems_and_base(w: &mut World) {
    let problems: Vec<String> = (0..16)
        .map(|i| {
            serde_json::json!({"question": format!("What is {i} plus 2?"), "answer": format!("{}", i + 2)}).to_string()
        })
        .collect();
    w.inputs.datasets.insert("problems".into(), dataset(&w.root, "problems", DataFormat::PromptAnswer, &problems));
    let base = toml::toml! { tokenizer = "tok" data = "text" max_seq_len = 32 batch_size = 4 max_steps = 4 lr = 3e-3 };
    let (res, dir) = run_stage(w, "pretrain", base, "work-base", "out-base", &CancelToken::new());
    res.unwrap();
    w.inputs.artifacts.insert("base".into(), artifact(&dir, ArtifactKind::Model, "pretrain", "base-key"));
}

/// Run stage `kind` once uninterrupted and once interrupted after a few logged steps and resumed
/// in the same work dir; the resumed artifact's `file` must equal the uninterrupted one byte for
/// byte.
fn assert_resumes_exactly(w: &World, kind: &str, params: toml::Table, file: &str) {
    let (res, full) =
        run_stage(w, kind, params.clone(), &format!("work-{kind}-a"), &format!("out-{kind}-a"), &CancelToken::new());
    res.unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    let cancel = CancelToken::new();
    let watcher = {
        let (cancel, m) = (cancel.clone(), w.root.join(format!("run-out-{kind}-b/metrics.jsonl")));
        std::thread::spawn(move || loop {
            if std::fs::read_to_string(&m).map(|s| s.lines().count() >= 3).unwrap_or(false) {
                cancel.cancel();
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        })
    };
    let work = format!("work-{kind}-b");
    let (res, _) = run_stage(w, kind, params.clone(), &work, &format!("out-{kind}-b"), &cancel);
    watcher.join().unwrap();
    let err = res.expect_err("the run should have been interrupted");
    assert!(err.downcast_ref::<Interrupted>().is_some(), "{kind}: {err:#}");
    let (res, resumed) = run_stage(w, kind, params, &work, &format!("out-{kind}-b2"), &CancelToken::new());
    res.unwrap_or_else(|e| panic!("{kind} resumed: {e:#}"));
    assert_eq!(
        std::fs::read(full.join(file)).unwrap(),
        std::fs::read(resumed.join(file)).unwrap(),
        "{kind}: resumed {file} differs from the uninterrupted run"
    );
}

/// The alignment stages stop mid-way on an interrupt and resume to exactly the weights of an
/// uninterrupted run: LoRA (its adapter), DPO and GRPO (rollouts are re-sampled identically).
#[test]
fn lora_dpo_and_grpo_stages_resume_exactly() {
    let Some(shared) = common::shared_data() else { return };
    let mut w = world(&shared);
    let pairs: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"prompt": format!("What is {i} plus 1?"), "chosen": format!("{}", i + 1),
                "rejected": format!("{}", i + 7)})
            .to_string()
        })
        .collect();
    w.inputs.datasets.insert("pairs".into(), dataset(&w.root, "pairs", DataFormat::Dpo, &pairs));
    add_problems_and_base(&mut w);

    let lora = toml::toml! { from = "base" data = "chat" rank = 4 dropout = 0.1 max_seq_len = 64 batch_size = 2 max_steps = 40 lr = 1e-2 };
    assert_resumes_exactly(&w, "lora", lora, "adapter_model.safetensors");
    let dpo = toml::toml! { from = "base" data = "pairs" max_seq_len = 64 batch_size = 2 max_steps = 40 lr = 1e-3 };
    assert_resumes_exactly(&w, "dpo", dpo, "model.safetensors");
    let grpo = toml::toml! {
        from = "base" data = "problems" rewards = [{ kind = "exact_match" }, { kind = "length", max_chars = 6 }]
        num_generations = 4 max_new_tokens = 6 batch_size = 2 max_steps = 12 lr = 1e-3
    };
    assert_resumes_exactly(&w, "grpo", grpo, "model.safetensors");
}

/// Preference pairs whose chosen answers share a style the rejected ones lack, so a tiny reward
/// model can learn the difference within a few dozen steps.
fn styled_pairs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            serde_json::json!({"prompt": format!("What is {i} plus 1?"), "chosen": format!("The answer is {}.", i + 1),
                "rejected": format!("{}!!! {}??", i + 7, i)})
            .to_string()
        })
        .collect()
}

/// The reward_model stage: the artifact is a `Qwen3ForSequenceClassification` folder, held-out
/// pair accuracy rises from the untrained head's, and an interrupted run resumes to the same bytes.
#[test]
fn reward_model_learns_held_out_pairs_exports_the_classifier_layout_and_resumes_exactly() {
    let Some(shared) = common::shared_data() else { return };
    let mut w = world(&shared);
    w.inputs.datasets.insert("pairs".into(), dataset(&w.root, "pairs", DataFormat::Dpo, &styled_pairs(32)));
    let base = toml::toml! { tokenizer = "tok" data = "text" max_seq_len = 32 batch_size = 4 max_steps = 4 lr = 3e-3 };
    let (res, dir) = run_stage(&w, "pretrain", base, "work-base", "out-base", &CancelToken::new());
    res.unwrap();
    w.inputs.artifacts.insert("base".into(), artifact(&dir, ArtifactKind::Model, "pretrain", "base-key"));

    let params = toml::toml! { from = "base" data = "pairs" holdout = 0.25 margin = 0.1 max_seq_len = 64 batch_size = 4 max_steps = 30 lr = 2e-3 };
    let (res, rm) = run_stage(&w, "reward_model", params.clone(), "work-rm", "out-rm", &CancelToken::new());
    let m = res.unwrap().metrics;
    assert_eq!((m["train_pairs"].as_u64(), m["heldout_pairs"].as_u64()), (Some(24), Some(8)), "{m:?}");
    let (before, after) = (m["heldout_before/accuracy"].as_f64().unwrap(), m["heldout/accuracy"].as_f64().unwrap());
    assert!(after >= 0.75 && after > before, "held-out accuracy {before} -> {after}: {m:?}");
    assert!(m["heldout/margin"].as_f64().unwrap() > m["heldout_before/margin"].as_f64().unwrap(), "{m:?}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(rm.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["Qwen3ForSequenceClassification"]));
    assert_eq!(cfg["num_labels"], 1);
    let bytes = std::fs::read(rm.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("score.weight").unwrap().shape(), &[1, cfg["hidden_size"].as_u64().unwrap() as usize]);
    assert!(st.names().iter().all(|n| n.starts_with("model.") || *n == "score.weight"), "{:?}", st.names());
    assert!(rm.join("tokenizer.json").is_file());
    let line = std::fs::read_to_string(w.root.join("run-out-rm/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert!(first["rm_loss"].is_number() && first["accuracy"].is_number(), "{first}");

    // A reward model can continue from a reward model (its head is kept, not re-drawn).
    w.inputs.artifacts.insert("rm".into(), artifact(&rm, ArtifactKind::RewardModel, "reward_model", "rm-key"));
    let more = toml::toml! { from = "rm" data = "pairs" holdout = 0.25 max_seq_len = 64 batch_size = 4 max_steps = 1 lr = 1e-9 };
    let (res, _) = run_stage(&w, "reward_model", more, "work-rm2", "out-rm2", &CancelToken::new());
    let m2 = res.unwrap().metrics;
    assert_eq!(m2["heldout_before/accuracy"], m["heldout/accuracy"], "{m2:?}");

    assert_resumes_exactly(&w, "reward_model", params, "model.safetensors");
}

/// The ppo stage with a reward model (which also initialises the critic) and a rule reward: it
/// reports held-out reward before and after and every PPO metric, and an interrupted run resumes
/// to exactly the uninterrupted run's weights.
#[test]
fn ppo_with_a_reward_model_reports_held_out_reward_and_resumes_exactly() {
    let Some(shared) = common::shared_data() else { return };
    let mut w = world(&shared);
    w.inputs.datasets.insert("pairs".into(), dataset(&w.root, "pairs", DataFormat::Dpo, &styled_pairs(16)));
    add_problems_and_base(&mut w);
    let rm = toml::toml! { from = "base" data = "pairs" max_seq_len = 64 batch_size = 4 max_steps = 4 lr = 2e-3 };
    let (res, dir) = run_stage(&w, "reward_model", rm, "work-rm", "out-rm", &CancelToken::new());
    res.unwrap();
    w.inputs.artifacts.insert("rm".into(), artifact(&dir, ArtifactKind::RewardModel, "reward_model", "rm-key"));

    let params = toml::toml! {
        from = "base" data = "problems" reward_model = "rm" rewards = [{ kind = "length", max_chars = 8 }]
        max_new_tokens = 6 batch_size = 4 mini_batch_size = 2 max_steps = 6 holdout = 0.25 lr = 1e-3
    };
    let (res, out) = run_stage(&w, "ppo", params.clone(), "work-ppo", "out-ppo", &CancelToken::new());
    let m = res.unwrap().metrics;
    assert_eq!(
        (m["prompts"].as_u64(), m["heldout_prompts"].as_u64(), m["steps"].as_u64()),
        (Some(12), Some(4), Some(6))
    );
    assert!(m["heldout_before/reward"].is_number() && m["heldout/reward"].is_number(), "{m:?}");
    assert!(out.join("model.safetensors").is_file() && out.join("tokenizer.json").is_file());
    let lines = std::fs::read_to_string(w.root.join("run-out-ppo/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in ["reward/length", "reward/reward_model", "approx_kl", "clip_fraction", "value_loss", "explained_variance"]
    {
        assert!(first.get(k).is_some(), "no {k} in {first}");
    }
    assert_resumes_exactly(&w, "ppo", params, "model.safetensors");
}

/// The distill stage: the student comes closer to the teacher (KD on the probe examples falls), a
/// teacher with another vocabulary is refused, and an interrupted run resumes to the same bytes.
#[test]
fn distill_moves_the_student_towards_the_teacher_refuses_other_vocabularies_and_resumes_exactly() {
    let Some(shared) = common::shared_data() else { return };
    let mut w = world(&shared);
    let base = toml::toml! { tokenizer = "tok" data = "text" max_seq_len = 32 batch_size = 4 max_steps = 4 lr = 3e-3 };
    let (res, dir) = run_stage(&w, "pretrain", base, "work-base", "out-base", &CancelToken::new());
    res.unwrap();
    w.inputs.artifacts.insert("base".into(), artifact(&dir, ArtifactKind::Model, "pretrain", "base-key"));
    let sft = toml::toml! { from = "base" data = "chat" max_seq_len = 64 batch_size = 4 max_steps = 12 lr = 3e-3 };
    let (res, teacher) = run_stage(&w, "sft", sft, "work-t", "out-t", &CancelToken::new());
    res.unwrap();
    w.inputs.artifacts.insert("teacher".into(), artifact(&teacher, ArtifactKind::Model, "sft", "t-key"));

    let params = toml::toml! { from = "base" teacher = "teacher" data = "chat" alpha = 0.3 temperature = 2.0 eval_examples = 8 max_seq_len = 64 batch_size = 4 max_steps = 12 lr = 3e-3 };
    let (res, out) = run_stage(&w, "distill", params.clone(), "work-d", "out-d", &CancelToken::new());
    let m = res.unwrap().metrics;
    let kd = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k} in {m:?}"));
    assert!(kd("after/kd") < 0.5 * kd("before/kd"), "{m:?}");
    assert!(kd("after/ce") < kd("before/ce"), "{m:?}");
    assert!(kd("teacher/ce") > 0.0 && m["eval_tokens"].as_u64().unwrap() > 0, "{m:?}");
    assert!(out.join("model.safetensors").is_file() && out.join("tokenizer.json").is_file());
    let line = std::fs::read_to_string(w.root.join("run-out-d/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert!(first["distill_loss"].is_number() && first["kd"].is_number() && first["ce"].is_number(), "{first}");

    // The same teacher with two tokens' ids swapped in its tokenizer is refused, naming a token.
    let other = w.root.join("other-teacher");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(teacher.join(f), other.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(teacher.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["a"].clone(), vocab["b"].clone());
    vocab.insert("a".into(), b);
    vocab.insert("b".into(), a);
    std::fs::write(other.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    w.inputs.artifacts.insert("other".into(), artifact(&other, ArtifactKind::Model, "sft", "o-key"));
    let bad =
        toml::toml! { from = "base" teacher = "other" data = "chat" max_seq_len = 64 batch_size = 4 max_steps = 1 };
    let (res, _) = run_stage(&w, "distill", bad, "work-bad", "out-bad", &CancelToken::new());
    let err = format!("{:#}", res.expect_err("a teacher with another vocabulary must be refused"));
    assert!(err.contains("vocabulary differs") && err.contains("\"a\""), "{err}");

    assert_resumes_exactly(&w, "distill", params, "model.safetensors");
}
