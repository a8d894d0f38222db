//! `mmrun show` and the summary printed after a run: eval table, generations, models and the
//! commands to talk to them, as text and JSON.

use crate::common;

use common::Sandbox;

/// Tokenizer → 20 pretraining steps → 10 SFT steps → eval of both, on built-in data (seconds).
pub const TALK_RECIPE: &str = r#"[recipe]
name = "talk"
seed = 3
device = "cpu"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 200 }

[datasets.chat]
source = "builtin:arithmetic"
format = "sharegpt"
builtin = { count = 100, seed = 2 }

[datasets.test]
source = "builtin:arithmetic"
format = "prompt_answer"
builtin = { count = 8, seed = 3, split = "test" }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 48
batch_size = 8
max_steps = 20

[stages.sft]
kind = "sft"
from = "base"
data = "chat"
max_seq_len = 64
batch_size = 8
max_steps = 10

[stages.report]
kind = "eval"
models = ["base", "sft"]
data = ["test"]
prompts = ["What is 2 plus 3?"]
generation = { max_new_tokens = 8 }
"#;

#[test]
fn a_run_ends_with_what_it_produced_and_show_prints_it_again() {
    let sb = Sandbox::new();
    sb.write("talk.toml", TALK_RECIPE);
    let out = sb.run_ok(&["talk.toml"]);
    let id = sb.runs_json().last().unwrap()["id"].as_str().unwrap().to_string();
    let text = out.stdout;
    assert!(text.contains(&format!("run {id} (talk, succeeded")), "{text}");
    // The eval table: a header with the metrics, one row per model in recipe order.
    let header = text.lines().find(|l| l.trim_start().starts_with("model ")).unwrap_or_else(|| panic!("{text}"));
    assert!(header.contains("exact_match") && header.contains("perplexity"), "{header}");
    let base_row = text.lines().position(|l| l.trim_start().starts_with("base ")).unwrap();
    let sft_row = text.lines().position(|l| l.trim_start().starts_with("sft ")).unwrap();
    assert!(base_row < sft_row, "{text}");
    assert!(text.contains("What is 2 plus 3?"), "generations are shown: {text}");
    // What the perplexity column is over, in words, under the table.
    assert!(text.contains("perplexity: per token of the 'test' reference answers"), "{text}");
    // The models, where they are, and how to talk to them.
    assert!(text.contains(&format!("mmrun chat {id}:sft")), "{text}");
    assert!(text.contains(&format!("mmrun serve {id}:sft")), "{text}");

    // `show` prints the same again; `--json` has the same content typed.
    let again = sb.run_ok(&["show", &id[..10]]).stdout;
    assert_eq!(again, text);
    let last = sb.run_ok(&["show"]).stdout;
    assert_eq!(last, text, "without a name, the last run");
    let j: serde_json::Value = serde_json::from_str(&sb.run_ok(&["show", &id, "--json"]).stdout).unwrap();
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["status"], "succeeded");
    let models: Vec<&str> = j["models"].as_array().unwrap().iter().map(|m| m["stage"].as_str().unwrap()).collect();
    assert_eq!(models, ["base", "sft"]);
    for m in j["models"].as_array().unwrap() {
        assert!(std::path::Path::new(m["path"].as_str().unwrap()).join("model.safetensors").is_file());
    }
    let ev = &j["evals"][0];
    assert_eq!(ev["stage"], "report");
    assert_eq!(ev["rows"][0][0], "base");
    assert!(ev["rows"][1][1]["exact_match"].as_f64().is_some(), "{ev}");

    // The printed reference works: a one-shot chat with the run's SFT model.
    let chat = sb.run_ok(&[
        "chat",
        &format!("{}:sft", &id[..12]),
        "-p",
        "What is 2 plus 3?",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]);
    // (A 30-step model may answer with blank lines only; it must answer, and say why it stopped.)
    assert!(chat.stderr.contains("[reached --max-tokens 8]") || !chat.stdout.trim().is_empty(), "{chat:?}");

    let missing = sb.run(&["show", "nope"]);
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("no run named 'nope'"), "{}", missing.stderr);
}
