//! Every recipe in `recipes/` loads and plans without the network. A copy of each (so its lock is
//! written beside the copy, never into the repository) is planned against the local test Hub,
//! which serves the repositories the recipe names: `shibing624/medical` built from
//! `../shared/data`, and the tiny golden Qwen3 under the name of each `[models.*]` Hub source.
//! The released models the recipes start from must be ones mmrun runs: their real `config.json`
//! (`tests/fixtures/<name>/config.json`) parses as a Qwen3 mmrun can build.

use crate::common;

use common::Sandbox;
use mmrun::exec::pipeline::{load_recipe, remote_inputs, RecipeSource};
use mmrun::hub::testserver::TestHub;
use mmrun::hub::{RemoteKind, RepoType};
use std::path::{Path, PathBuf};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny golden Qwen3's files, as a Hub commit.
fn tiny_model() -> Vec<(String, Vec<u8>, bool)> {
    ["config.json", "generation_config.json", "model.safetensors"]
        .iter()
        .map(|f| {
            let data = std::fs::read(manifest_dir().join("tests/fixtures/qwen3_tiny").join(f)).unwrap();
            (f.to_string(), data, f.ends_with(".safetensors"))
        })
        .collect()
}

#[test]
fn every_recipe_in_recipes_loads_and_plans_offline() {
    let Some(shared) = common::shared_data() else { return };
    let hub = TestHub::start();
    hub.add_medical_repo(&shared).unwrap();
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(manifest_dir().join("recipes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    recipes.sort();
    assert!(recipes.iter().any(|p| p.ends_with("qwen3_medical_lora.toml")), "{recipes:?}");
    let mut released = 0;
    for path in &recipes {
        let shown = path.display();
        let recipe = load_recipe(&RecipeSource { path: path.clone(), overrides: Vec::new(), text: None })
            .unwrap_or_else(|e| panic!("{shown}: {e}"));
        for input in remote_inputs(&recipe).unwrap() {
            let repo = &input.uri.repo_id;
            match input.id.kind {
                RemoteKind::Model => {
                    let config = manifest_dir().join("tests/fixtures").join(fixture_name(repo)).join("config.json");
                    let text = std::fs::read_to_string(&config).unwrap_or_else(|e| {
                        panic!("{shown}: {repo} needs its config.json at {}: {e}", config.display())
                    });
                    let cfg = mmrun::model::config::ModelConfig::from_hf_json(&serde_json::from_str(&text).unwrap())
                        .unwrap_or_else(|e| panic!("{shown}: mmrun cannot run {repo}: {e}"));
                    assert!(cfg.num_params() > 0);
                    hub.commit(RepoType::Model, repo, input.uri.revision_or_main(), tiny_model());
                    released += 1;
                }
                _ => assert_eq!(repo, "shibing624/medical", "{shown}: the test Hub does not serve {repo}"),
            }
        }
        let sb = Sandbox::new();
        let file = path.file_name().unwrap().to_str().unwrap();
        sb.write(file, &std::fs::read_to_string(path).unwrap());
        let mut c = sb.command(&["plan", "--json", file]);
        c.env("HF_ENDPOINT", hub.url())
            .env("HF_HOME", sb.root().join("hf"))
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE");
        let out = c.output().unwrap();
        assert!(out.status.success(), "{shown}: {}", String::from_utf8_lossy(&out.stderr));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stages = plan["stages"].as_array().unwrap();
        assert_eq!(stages.len(), recipe.stages.len(), "{shown}");
        assert!(stages.iter().all(|s| s["status"] == "missing"), "{shown}: {plan:#}");
    }
    assert!(released >= 1, "at least one recipe starts from a released model");
}

/// `Qwen/Qwen3-0.6B` → `qwen3_0.6b`.
fn fixture_name(repo: &str) -> String {
    repo.rsplit('/').next().unwrap().replace('-', "_").to_lowercase()
}
