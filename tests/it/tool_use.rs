//! Tool use end to end through the CLI: a tiny model is SFT-trained on `builtin:tool_use`
//! conversations, then trained by the `agent` stage on tool tasks (multi-turn episodes with the
//! calculator), and the eval stage reports tool selection, argument validity and final-answer
//! accuracy on held-out tool tasks for the untrained, the SFT and the agent model.
//!
//! The tokenizer is trained on the same conversations (`format = "text"`), which writes one in
//! ~260 tokens where the MiniMind tokenizer needed ~450, and operands have one digit
//! (`max_digits = 1`): the short rows make this test about three times cheaper than it was.
//! `recipes/quickstart_rl.toml` (tests/it/quickstart_rl.rs) holds the answers to a threshold.

use crate::common::Sandbox;

const RECIPE: &str = r#"[recipe]
name = "tooly"
seed = 3
device = "cpu"
precision = "f32"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:tool_use"
format = "text"
builtin = { count = 400, tools = ["calculator"], max_digits = 1 }

[datasets.calls]
source = "builtin:tool_use"
format = "openai"
builtin = { count = 400, seed = 2, tools = ["calculator"], max_digits = 1 }

[datasets.tasks]
source = "builtin:tool_use"
format = "prompt_answer"
builtin = { count = 8, split = "test", tools = ["calculator"], max_digits = 1 }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 600

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 64
batch_size = 8
max_steps = 5

# A conversation is ~260 tokens with this tokenizer (~155 of them the tools header): rows cut
# shorter lose the call's arguments, the tool result and the answer.
[stages.sft]
kind = "sft"
from = "base"
data = "calls"
max_seq_len = 320
batch_size = 8
max_steps = 100
lr = 5e-3

[datasets.train_tasks]
source = "builtin:tool_use"
format = "prompt_answer"
builtin = { count = 16, tools = ["calculator"], max_digits = 1 }

[stages.agent]
kind = "agent"
from = "sft"
data = "train_tasks"
heldout = "tasks"
tools = ["calculator"]
max_turns = 2
num_generations = 4
max_new_tokens = 48
batch_size = 2
max_steps = 3
lr = 1e-4

[stages.report]
kind = "eval"
models = ["base", "sft", "agent"]
data = ["tasks"]
generation = { max_new_tokens = 48 }
max_turns = 2
"#;

#[test]
fn sft_then_agent_on_builtin_tool_tasks_and_eval_reports_the_three_tool_metrics() {
    let sb = Sandbox::new();
    sb.write("tooly.toml", RECIPE);
    sb.run_ok(&["tooly.toml"]);
    let run = sb.last_run();
    let id = run["id"].as_str().unwrap();
    let metrics = std::fs::read_to_string(sb.run_dir(id).join("metrics.jsonl")).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["dataset"] == "tasks" {
            assert_eq!(v["n"], 8);
            let m = v["model"].as_str().unwrap().to_string();
            let vals: Vec<f64> = ["tool_selection", "tool_args_valid", "tool_answer"]
                .iter()
                .map(|k| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {v}")))
                .collect();
            assert!(vals.iter().all(|x| (0.0..=1.0).contains(x)), "{v}");
            seen.insert(m, vals);
        }
    }
    println!("tool metrics on 8 held-out calculator tasks [selection, args_valid, answer]:");
    for (m, v) in &seen {
        println!("  {m:<5} {v:?}");
    }
    // The agent stage ran its episodes and measured the held-out tasks before and after.
    let m = &run["stages"]["agent"]["metrics"];
    assert_eq!((m["steps"].as_u64(), m["tasks"].as_u64(), m["heldout_tasks"].as_u64()), (Some(3), Some(16), Some(8)));
    for k in ["heldout_before/tool_selection", "heldout/tool_selection", "heldout/tool_answer", "reward_mean"] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} in {m:#}");
    }
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["stage"] == "agent" && v.get("reward_mean").is_some())
        .collect();
    assert_eq!(lines.len(), 3, "one line per rollout step");
    for k in ["reward_mean", "reward/calls", "reward/answer", "tool_success", "turns", "kl", "response_len"] {
        assert!(lines[0].get(k).is_some(), "no {k} in {}", lines[0]);
    }
    assert!(lines.iter().all(|v| v["reward_mean"].as_f64().unwrap().abs() <= 3.0));
    let (base, sft) = (&seen["base"], &seen["sft"]);
    // An untrained model does not emit the call format; SFT teaches it.
    assert_eq!(base[0], 0.0, "{seen:?}");
    assert!(sft[0] > base[0], "SFT did not teach tool calls: {seen:?}");
    // Trained on whole conversations, its calls are well formed and validate against the schema,
    // and the agent stage keeps them (a valid call scores above none).
    assert!(sft[1] > 0.0, "SFT taught no valid call: {seen:?}");
    assert!(seen["agent"][1] > 0.0, "the agent stage lost the valid calls: {seen:?}");
    // The show command prints the tool metrics in the eval table.
    let out = sb.run_ok(&["show", id]).stdout;
    assert!(out.contains("tool_selection") && out.contains("tool_answer"), "{out}");
}
