//! A mixture-of-experts model (`preset = "tiny-moe"`) trains through pretrain, SFT, GRPO and PPO from
//! one recipe, and its router's load-balancing loss is logged at every step of each stage and is
//! part of the loss that trains: the same run with `router_aux_loss_coef = 0` logs an aux loss of 0
//! and a first pretraining loss lower by exactly the aux loss the first run logged.

use crate::common;

use common::Sandbox;
use serde_json::Value;

const RECIPE: &str = r#"[recipe]
name = "moe"
seed = 7
device = "cpu"
precision = "f32"

[model]
preset = "tiny-moe"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 200 }

[datasets.chat]
source = "builtin:arithmetic"
format = "sharegpt"
builtin = { count = 100, seed = 2 }

[datasets.problems]
source = "builtin:arithmetic"
format = "prompt_answer"
builtin = { count = 16, seed = 5 }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 32
batch_size = 4
max_steps = 3
lr = 2e-3

[stages.sft]
kind = "sft"
from = "base"
data = "chat"
max_seq_len = 64
batch_size = 4
max_steps = 3
lr = 1e-3

[stages.rl]
kind = "grpo"
from = "sft"
data = "problems"
rewards = [{ kind = "exact_match" }]
num_generations = 2
max_new_tokens = 6
batch_size = 2
max_steps = 2
lr = 1e-4

[stages.ppo]
kind = "ppo"
from = "sft"
data = "problems"
rewards = [{ kind = "exact_match" }, { kind = "length", max_chars = 20 }]
max_new_tokens = 6
batch_size = 2
mini_batch_size = 1
max_steps = 2
lr = 1e-4
"#;

/// The training stages, in order.
const STAGES: [&str; 4] = ["base", "sft", "rl", "ppo"];

/// The training loop's metrics lines (those with a `loss`; GRPO also logs rollout lines) of the
/// newest run, by stage.
fn lines(sb: &Sandbox, stage: &str) -> Vec<Value> {
    let run = sb.last_run();
    let text = std::fs::read_to_string(sb.run_dir(run["id"].as_str().unwrap()).join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["stage"] == stage && v.get("loss").is_some())
        .collect()
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn a_moe_model_trains_through_pretrain_sft_grpo_and_ppo_with_its_aux_loss_in_the_loss() {
    let sb = Sandbox::new();
    sb.write("moe.toml", RECIPE);
    sb.run_ok(&["moe.toml"]);
    let run = sb.last_run();
    for s in STAGES {
        assert_eq!(run["stages"][s]["status"], "ran", "{s}: {:#}", run["stages"][s]);
    }
    let with: Vec<Vec<Value>> = STAGES.iter().map(|s| lines(&sb, s)).collect();
    for (stage, ls) in STAGES.iter().zip(&with) {
        assert!(!ls.is_empty(), "{stage}: no metrics");
        for l in ls {
            let aux = num(l, "aux_loss");
            // The reference's loss per layer: coef · E · Σ_e p_e f_e, which is coef (5e-4) for a
            // perfectly balanced router and at most coef · E; 2 layers, and for PPO two models
            // (actor and critic).
            let most = 5e-4 * 4.0 * 2.0 * if *stage == "ppo" { 2.0 } else { 1.0 };
            assert!(aux.is_finite() && aux > 0.0 && aux <= most + 1e-9, "{stage}: aux_loss {aux} in {l}");
            assert!(num(l, "loss").is_finite(), "{stage}: {l}");
        }
    }
    // The config travels with the model: the SFT model is still an MoE.
    let sft_key = run["stages"]["sft"]["key"].as_str().unwrap();
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(sb.home().join("objects-v1").join(sft_key).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen3MoeForCausalLM", "{cfg:#}");
    assert_eq!(cfg["num_experts"], 4, "{cfg:#}");

    // Without the coefficient the router is trained by the task loss alone: aux 0 everywhere, and
    // at the first step (same initial weights, same batch) the loss lacks exactly the aux term.
    sb.run_ok(&["moe.toml", "--set", "model.router_aux_loss_coef=0"]);
    let without: Vec<Vec<Value>> = STAGES.iter().map(|s| lines(&sb, s)).collect();
    for ls in &without {
        assert!(ls.iter().all(|l| num(l, "aux_loss") == 0.0), "{ls:?}");
    }
    let (first_with, first_without) = (&with[0][0], &without[0][0]);
    let (aux, diff) = (num(first_with, "aux_loss"), num(first_with, "loss") - num(first_without, "loss"));
    assert!((diff - aux).abs() < 1e-5 * num(first_with, "loss"), "loss with − without = {diff}, aux = {aux}");
    assert_ne!(
        num(with[0].last().unwrap(), "loss"),
        num(without[0].last().unwrap(), "loss"),
        "the aux loss's gradient should change the trained weights"
    );
}
