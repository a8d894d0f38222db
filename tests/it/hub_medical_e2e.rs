//! `recipes/medical_sft.toml` end to end against the local test Hub serving `../shared/data`'s
//! medical files at the shibing624/medical paths, with overrides that shrink the model and the
//! data; checks the lock it writes and that a second run reuses the locked, cached files offline.

use crate::common;

use common::Sandbox;
use mmrun::hub::lock::{lock_path, LockFile};
use mmrun::hub::testserver::TestHub;
use mmrun::hub::RepoType;

const SETS: &[&str] = &[
    "--set",
    "model.preset=tiny",
    "--set",
    "stages.tok.vocab_size=320",
    "--set",
    "stages.base.max_seq_len=64",
    "--set",
    "stages.base.batch_size=8",
    "--set",
    "stages.base.max_steps=3",
    "--set",
    "stages.sft.max_seq_len=64",
    "--set",
    "stages.sft.batch_size=8",
    "--set",
    "stages.sft.max_steps=3",
    "--set",
    "stages.lora.max_seq_len=64",
    "--set",
    "stages.lora.batch_size=8",
    "--set",
    "stages.lora.max_steps=2",
    "--set",
    "stages.dpo.max_seq_len=64",
    "--set",
    "stages.dpo.batch_size=2",
    "--set",
    "stages.dpo.max_steps=2",
    "--set",
    "stages.grpo.max_prompt_len=256",
    "--set",
    "stages.grpo.max_new_tokens=8",
    "--set",
    "stages.grpo.num_generations=2",
    "--set",
    "stages.grpo.max_steps=2",
    "--set",
    "stages.report.generation.max_new_tokens=8",
];

#[test]
fn medical_sft_recipe_runs_against_local_hub_and_writes_lock() {
    let Some(shared) = common::shared_data() else { return };
    let hub = TestHub::start();
    let commit = hub.add_medical_repo(&shared).unwrap();
    let sb = Sandbox::new();
    let recipe = sb.write("recipes/medical_sft.toml", include_str!("../../recipes/medical_sft.toml"));
    let hf_home = sb.root().join("hf");
    let run = |offline: bool| {
        let mut args = vec!["recipes/medical_sft.toml"];
        args.extend_from_slice(SETS);
        let mut c = sb.command(&args);
        c.env("HF_ENDPOINT", hub.url()).env("HF_HOME", &hf_home).env_remove("HF_TOKEN").env_remove("HF_HUB_CACHE");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "mmrun failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(false);
    let first = sb.last_run();
    for stage in ["tok", "base", "sft", "lora", "dpo", "grpo", "report"] {
        assert_eq!(first["stages"][stage]["status"], "ran", "{stage}: {first:#}");
    }
    let lock = LockFile::load(&lock_path(&recipe)).unwrap().expect("the first run writes recipes/medical_sft.lock");
    assert_eq!(lock.datasets.len(), 3, "{lock:?}");
    for (name, l) in &lock.datasets {
        assert_eq!(l.commit, commit, "{name}");
        assert_eq!(l.revision, "main");
        assert_eq!(l.files.len(), 1);
    }
    let pref = &lock.datasets["medical_pref"].files[0];
    assert_eq!(pref.path, "reward/test.json");
    assert_eq!(pref.sha256, "7966ec39a4ecabc27ffa70ee9a6b1f2a14b9f3d61b11a719b54751054b3b9ab5");
    assert!(hf_home.join("hub/datasets--shibing624--medical/snapshots").join(&commit).is_dir());

    // Everything is locked and cached: a second run works offline and leaves the lock unchanged.
    let before = std::fs::read_to_string(lock_path(&recipe)).unwrap();
    hub.clear_seen();
    run(true);
    assert!(hub.seen().is_empty(), "offline run made requests: {:?}", hub.seen());
    assert_eq!(std::fs::read_to_string(lock_path(&recipe)).unwrap(), before);

    // The branch moves upstream: `mmrun plan` says so (and how to adopt it), the lock stays put.
    let moved =
        hub.commit(RepoType::Dataset, "shibing624/medical", "main", vec![("NEWS.md".into(), b"v2".to_vec(), false)]);
    let mut args = vec!["plan", "recipes/medical_sft.toml"];
    args.extend_from_slice(SETS);
    let out = sb
        .command(&args)
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", &hf_home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("branch main of shibing624/medical has moved"), "{stderr}");
    assert!(stderr.contains(&moved[..12]) && stderr.contains("mmrun update"), "{stderr}");
    assert_eq!(std::fs::read_to_string(lock_path(&recipe)).unwrap(), before);
}

#[test]
fn failed_hub_fetch_leaves_a_failed_run_record() {
    let hub = TestHub::start();
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        "[recipe]\nname = \"nohub\"\n\n[datasets.d]\nsource = \"hf://datasets/acme/missing/x.jsonl\"\nformat = \"text\"\n\n[stages.tok]\nkind = \"tokenizer\"\ndata = [\"d\"]\nvocab_size = 320\n",
    );
    let out = sb
        .command(&["r.toml"])
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", sb.root().join("hf"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("repository not found") && stderr.contains("run record:"), "{stderr}");
    let run = sb.last_run();
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["recipe_name"], "nohub");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(error.contains("acme/missing") && error.contains("repository not found"), "{error}");
    assert!(run["finished"].is_string(), "{run:#}");
}
