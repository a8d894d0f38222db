//! Tool use end to end through the CLI: a tiny model is SFT-trained on `builtin:tool_use`
//! conversations and the eval stage reports tool selection, argument validity and final-answer
//! accuracy on held-out tool tasks, for the untrained and the trained model.

use crate::common::{self, Sandbox};

fn recipe(tokenizer: &std::path::Path) -> String {
    format!(
        r#"[recipe]
name = "tooly"
seed = 3
device = "cpu"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = {{ count = 200 }}

[datasets.calls]
source = "builtin:tool_use"
format = "openai"
builtin = {{ count = 400, tools = ["calculator"] }}

[datasets.tasks]
source = "builtin:tool_use"
format = "prompt_answer"
builtin = {{ count = 8, split = "test", tools = ["calculator"] }}

[stages.tok]
kind = "tokenizer"
source = "{}"

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 48
batch_size = 8
max_steps = 5

[stages.sft]
kind = "sft"
from = "base"
data = "calls"
max_seq_len = 320
batch_size = 8
max_steps = 100
lr = 3e-3

[stages.report]
kind = "eval"
models = ["base", "sft"]
data = ["tasks"]
generation = {{ max_new_tokens = 40 }}
max_turns = 2
"#,
        tokenizer.display()
    )
}

#[test]
fn sft_on_builtin_tool_calls_then_eval_reports_the_three_tool_metrics() {
    let Some(shared) = common::shared_data() else { return };
    let sb = Sandbox::new();
    sb.write("tooly.toml", &recipe(&shared.join("minimind_tokenizer")));
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
    let (base, sft) = (&seen["base"], &seen["sft"]);
    // An untrained model does not emit the call format; SFT teaches it.
    assert_eq!(base[0], 0.0, "{seen:?}");
    assert!(sft[0] > base[0], "SFT did not teach tool calls: {seen:?}");
    // The show command prints the tool metrics in the eval table.
    let out = sb.run_ok(&["show", id]).stdout;
    assert!(out.contains("tool_selection") && out.contains("tool_answer"), "{out}");
}
