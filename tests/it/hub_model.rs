//! Released models as pipeline inputs (issue 12): the local test Hub serves the tiny random Qwen3
//! made by transformers (tests/fixtures/qwen3_tiny, with a small tokenizer added) and a sharded
//! copy; a recipe with `[models.base] source = "hf://…"` runs sft → lora → eval from it, its lock
//! pins the model (commit, files, sha256s), and the imported model's first forward equals the
//! golden logits. Pickled weights are refused, locally and on the Hub.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::Sandbox;
use mmrun::hub::lock::{lock_path, LockFile};
use mmrun::hub::testserver::{Faults, TestHub};
use mmrun::hub::RepoType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_tiny").join(file)
}

/// A character-level tokenizer within the fixture's 128 embeddings: the three chat markers, `<unk>`
/// and every character the arithmetic data uses.
fn tokenizer_json() -> Vec<u8> {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    vocab.insert("<unk>".into(), 3.into());
    let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?:!+-=*/<>|_'\n";
    for c in chars.chars() {
        let n = vocab.len();
        vocab.insert(c.to_string(), n.into());
    }
    assert!(vocab.len() <= 128);
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    serde_json::to_vec_pretty(&tok).unwrap()
}

/// The fixture's files plus the tokenizer, as a Hub commit.
fn model_files(sharded: bool) -> Vec<(String, Vec<u8>, bool)> {
    let mut files = vec![
        ("config.json".to_string(), std::fs::read(fixture("config.json")).unwrap(), false),
        ("generation_config.json".to_string(), std::fs::read(fixture("generation_config.json")).unwrap(), false),
        ("tokenizer.json".to_string(), tokenizer_json(), false),
        ("tokenizer_config.json".to_string(), br#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#.to_vec(), false),
    ];
    let weights = std::fs::read(fixture("model.safetensors")).unwrap();
    if !sharded {
        files.push(("model.safetensors".into(), weights, true));
        return files;
    }
    // Two shards and an index, as `save_pretrained(max_shard_size=…)` writes them.
    let all = candle_core::safetensors::load(fixture("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let dir = tempfile::tempdir().unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
        files.push((file.clone(), std::fs::read(dir.path().join(&file)).unwrap(), true));
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    files.push(("model.safetensors.index.json".into(), serde_json::to_vec(&index).unwrap(), false));
    files
}

const RECIPE: &str = r#"[recipe]
name = "from_hub"
seed = 7
device = "cpu"

[models.base]
source = "hf://acme/qwen3-tiny-sharded"

[datasets.chat]
source = "builtin:arithmetic"
format = "sharegpt"
builtin = { count = 64, seed = 2, max_operand = 9 }

[datasets.test]
source = "builtin:arithmetic"
format = "prompt_answer"
builtin = { count = 4, seed = 3, split = "test", max_operand = 9 }

[stages.sft]
kind = "sft"
from = "base"
data = "chat"
max_seq_len = 64
batch_size = 4
max_steps = 2

[stages.lora]
kind = "lora"
from = "sft"
data = "chat"
rank = 4
merge = true
max_seq_len = 64
batch_size = 4
max_steps = 2

[stages.report]
kind = "eval"
models = ["base", "lora"]
data = ["test"]
max_samples = 4
generation = { max_new_tokens = 4 }
"#;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn hub_env(c: &mut std::process::Command, hub: &TestHub, hf_home: &Path) {
    c.env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE");
}

#[test]
fn a_hub_model_runs_sft_lora_eval_is_locked_and_loads_to_the_golden_logits() {
    let hub = TestHub::start();
    let single = hub.commit(RepoType::Model, "acme/qwen3-tiny", "main", model_files(false));
    let sharded = hub.commit(RepoType::Model, "acme/qwen3-tiny-sharded", "main", model_files(true));
    let sb = Sandbox::new();
    let recipe = sb.write("from_hub.toml", RECIPE);
    let hf_home = sb.root().join("hf");
    let run = |sets: &[&str]| {
        let mut args = vec!["from_hub.toml"];
        args.extend_from_slice(sets);
        let mut c = sb.command(&args);
        hub_env(&mut c, &hub, &hf_home);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "mmrun failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        sb.last_run()
    };
    let golden = candle_core::safetensors::load(fixture("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let first_forward = |key: &str| {
        let m = mmrun::model::weights::load_dir(&sb.home().join("objects-v1").join(key), &Device::Cpu, false).unwrap();
        max_abs_diff(&m.forward_logits(&ids, None).unwrap(), &golden["logits"])
    };

    let rec = run(&[]);
    for stage in ["base", "sft", "lora", "report"] {
        assert_eq!(rec["stages"][stage]["status"], "ran", "{stage}: {rec:#}");
    }
    let base_key = rec["stages"]["base"]["key"].as_str().unwrap().to_string();
    let d = first_forward(&base_key);
    assert!(d < 1e-4, "sharded Hub model: max |logit diff| = {d}");
    let art = sb.home().join("objects-v1").join(&base_key);
    assert_eq!(
        std::fs::read(art.join("tokenizer.json")).unwrap(),
        tokenizer_json(),
        "the model's tokenizer comes along"
    );

    let lock = LockFile::load(&lock_path(&recipe)).unwrap().expect("the run writes the lock");
    let pinned = &lock.models["base"];
    assert_eq!((pinned.commit.as_str(), pinned.revision.as_str()), (sharded.as_str(), "main"));
    let paths: Vec<&str> = pinned.files.iter().map(|f| f.path.as_str()).collect();
    assert!(paths.contains(&"model.safetensors.index.json") && paths.contains(&"model-00002-of-00002.safetensors"));
    assert!(pinned.files.iter().all(|f| f.sha256.len() == 64));

    // The single-file copy: the same weights, so the same logits, under another key (other files).
    let rec = run(&["--set", "models.base.source=hf://acme/qwen3-tiny"]);
    let key = rec["stages"]["base"]["key"].as_str().unwrap().to_string();
    assert_ne!(key, base_key);
    assert!(first_forward(&key) < 1e-4);
    assert_eq!(LockFile::load(&lock_path(&recipe)).unwrap().unwrap().models["base"].commit, single);

    // Everything cached now; the key follows the pinned content, not the branch.
    hub.commit(RepoType::Model, "acme/qwen3-tiny", "main", vec![("README.md".into(), b"moved".to_vec(), false)]);
    let again = run(&["--set", "models.base.source=hf://acme/qwen3-tiny"]);
    assert_eq!(again["stages"]["base"]["key"].as_str().unwrap(), key);
    assert_eq!(again["stages"]["report"]["status"], "cached");
}

#[test]
fn pickled_weights_are_refused_with_the_conversion() {
    let hub = TestHub::start();
    hub.commit(
        RepoType::Model,
        "acme/pickled",
        "main",
        vec![
            ("config.json".into(), std::fs::read(fixture("config.json")).unwrap(), false),
            ("pytorch_model.bin".into(), vec![0x80, 2, 0x7d], true),
        ],
    );
    let sb = Sandbox::new();
    let recipe = "[recipe]\nname = \"p\"\n\n[models.m]\nsource = \"SRC\"\n\n[stages.report]\nkind = \"eval\"\nmodels = [\"m\"]\nprompts = [\"hi\"]\n";
    sb.write("local/config.json", &std::fs::read_to_string(fixture("config.json")).unwrap());
    sb.write("local/pytorch_model.bin", "\u{80}");
    for src in ["local", "hf://acme/pickled"] {
        sb.write("p.toml", &recipe.replace("SRC", src));
        let mut c = sb.command(&["p.toml"]);
        hub_env(&mut c, &hub, &sb.root().join("hf"));
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{src}: {stderr}");
        assert!(
            stderr.contains("pytorch_model.bin")
                && stderr.contains("pickled")
                && stderr.contains("safe_serialization=True"),
            "{src}: {stderr}"
        );
    }
    assert!(!sb.root().join("hf/hub/models--acme--pickled/blobs").exists(), "nothing of the pickle was downloaded");
}

/// `mmrun <args>` against the test Hub (with `token` as HF_TOKEN); returns the one `error:` line of
/// its failure.
fn error_line(sb: &Sandbox, hub: &TestHub, token: Option<&str>, args: &[&str]) -> String {
    let mut c = sb.command(args);
    hub_env(&mut c, hub, &sb.root().join("hf"));
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one error line expected:\n{stderr}");
    lines[0].to_string()
}

/// A recipe whose only model is `[models.qwen] source = "<src>"`, evaluated on one prompt.
fn model_recipe(src: &str) -> String {
    format!(
        "[recipe]\nname = \"errs\"\ndevice = \"cpu\"\n\n[models.qwen]\nsource = \"{src}\"\n\n\
         [stages.report]\nkind = \"eval\"\nmodels = [\"qwen\"]\nprompts = [\"hi\"]\n"
    )
}

/// No stage output was published and no half-written object is left in the cache.
fn nothing_published(sb: &Sandbox) {
    for bucket in ["objects-v1", "tmp-v1"] {
        let dir = sb.home().join(bucket);
        let left: Vec<_> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{bucket}: {left:?}");
    }
}

#[test]
fn local_model_errors_name_the_model_and_the_fix() {
    let hub = TestHub::start();
    let sb = Sandbox::new();

    // A folder that is not there.
    sb.write("absent.toml", &model_recipe("no/such/folder"));
    let e = error_line(&sb, &hub, None, &["absent.toml"]);
    assert!(e.contains("qwen") && e.contains("no/such/folder"), "{e}");
    assert!(e.contains("does not exist") && e.contains("transformers folder"), "says what to point at: {e}");
    nothing_published(&sb);
    // A folder without a model in it.
    std::fs::create_dir_all(sb.root().join("empty")).unwrap();
    sb.write("empty.toml", &model_recipe("empty"));
    let e = error_line(&sb, &hub, None, &["empty.toml"]);
    assert!(e.contains("qwen") && e.contains("has no config.json") && e.contains("transformers folder"), "{e}");
    nothing_published(&sb);

    // An architecture mmrun cannot run: the error names the field.
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "llama".into();
    sb.write("llama/config.json", &cfg.to_string());
    std::fs::copy(fixture("model.safetensors"), sb.root().join("llama/model.safetensors")).unwrap();
    sb.write("llama.toml", &model_recipe("llama"));
    let e = error_line(&sb, &hub, None, &["llama.toml"]);
    assert!(e.contains("qwen") && e.contains("model_type") && e.contains("llama"), "{e}");
    nothing_published(&sb);
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("config.json")).unwrap()).unwrap();
    cfg["hidden_act"] = "gelu".into();
    sb.write("llama/config.json", &cfg.to_string());
    let e = error_line(&sb, &hub, None, &["llama.toml"]);
    assert!(e.contains("qwen") && e.contains("hidden_act"), "{e}");
    nothing_published(&sb);
}

#[test]
fn hub_model_errors_missing_gated_and_corrupt_are_one_line_and_leave_nothing() {
    let hub = TestHub::start();
    hub.commit(RepoType::Model, "acme/gated", "main", model_files(false));
    hub.set_token(RepoType::Model, "acme/gated", "hf_granted");
    hub.commit(RepoType::Model, "acme/tiny", "main", model_files(false));
    let sb = Sandbox::new();

    sb.write("missing.toml", &model_recipe("hf://acme/missing"));
    let e = error_line(&sb, &hub, None, &["missing.toml"]);
    assert!(e.contains("hf://acme/missing") && e.contains("not found") && e.contains("owner/name"), "{e}");

    // Gated: 401 without a token, 403 with one that was not granted access.
    sb.write("gated.toml", &model_recipe("hf://acme/gated"));
    for (token, status) in [(None, "401"), (Some("hf_other"), "403")] {
        let e = error_line(&sb, &hub, token, &["gated.toml"]);
        assert!(e.contains("hf://acme/gated") && e.contains(status), "{e}");
        assert!(e.contains("accept its conditions") && e.contains("HF_TOKEN"), "{e}");
        assert!(!e.contains("hf_other"), "the token never appears: {e}");
    }
    // Every retry gets flipped bytes: a checksum mismatch, and no file of the model is kept.
    hub.set_faults(Faults { corrupt: 100, ..Faults::default() });
    sb.write("corrupt.toml", &model_recipe("hf://acme/tiny"));
    let e = error_line(&sb, &hub, None, &["corrupt.toml"]);
    assert!(e.contains("hf://acme/tiny") && e.contains("checksum mismatch") && e.contains("retry"), "{e}");
    let snapshots = sb.root().join("hf/hub/models--acme--tiny/snapshots");
    let kept: Vec<_> = walk(&snapshots);
    assert!(kept.iter().all(|p| !p.ends_with("model.safetensors")), "an unverified file was kept: {kept:?}");
    nothing_published(&sb);
    assert!(!sb.root().join("corrupt.lock").exists(), "nothing unverified is pinned");

    // The same model, served intact: it loads.
    hub.set_faults(Faults::default());
    let mut c = sb.command(&["corrupt.toml"]);
    hub_env(&mut c, &hub, &sb.root().join("hf"));
    assert!(c.output().unwrap().status.success());
}

#[test]
fn an_export_onto_an_existing_folder_is_refused_and_leaves_it_alone() {
    let sb = Sandbox::new();
    let hub = TestHub::start();
    let out = sb.root().join("out");
    sb.write("out/keep.txt", "mine");
    let model = fixture("").to_string_lossy().into_owned();
    let e = error_line(&sb, &hub, None, &["export", &model, "--to", "hf", out.to_str().unwrap()]);
    assert!(e.contains("already exists") && e.contains("--force") && e.contains("qwen3_tiny"), "{e}");
    assert_eq!(walk(&out), vec![out.join("keep.txt")], "the folder is untouched");
    let siblings: Vec<_> = std::fs::read_dir(sb.root()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(
        siblings.iter().all(|n| !n.to_string_lossy().starts_with(".out") && !n.to_string_lossy().contains("tmp")),
        "no temporary sibling left: {siblings:?}"
    );
}

/// Every file under `dir` (empty when it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
