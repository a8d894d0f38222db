//! Error behaviour of the CLI: bad recipes point at file:line:col; bad records name file:line
//! or, with `on_bad_record = "skip"`, are counted in the run and written to `rejects.jsonl`.

use crate::common;

use common::{shared_data, Sandbox, SMALL_RECIPE};

#[test]
fn bad_recipe_names_file_line_and_column() {
    let sb = Sandbox::new();
    // Line 26 (the `tokenizer = "tko"` line) references a stage that does not exist.
    let text = SMALL_RECIPE.replace("tokenizer = \"tok\"\ndata = \"text\"", "tokenizer = \"tko\"\ndata = \"text\"");
    let line = text.lines().position(|l| l.contains("\"tko\"")).unwrap() + 1;
    sb.write("bad.toml", &text);
    let o = sb.run(&["bad.toml"]);
    assert_eq!(o.code, Some(2), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains(&format!("bad.toml:{line}:")), "no file:line in:\n{}", o.stderr);
    assert!(o.stderr.contains("tok"), "suggests the right name:\n{}", o.stderr);
    assert!(!sb.runs().exists() || sb.runs_json().is_empty(), "no run record for a recipe that never loaded");

    // An unknown key is also pointed at.
    sb.write(
        "bad2.toml",
        &SMALL_RECIPE.replace("max_seq_len = 64\n\n[stages.sft_data]", "max_seq_lne = 64\n\n[stages.sft_data]"),
    );
    let o = sb.run(&["plan", "bad2.toml"]);
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("bad2.toml:") && o.stderr.contains("max_seq_lne"), "{}", o.stderr);

    // A missing file is an error too (exit 1, says which file).
    let o = sb.run(&["nope.toml"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("nope.toml"), "{}", o.stderr);
}

fn bad_record_recipe(data: &std::path::Path, policy: &str) -> String {
    format!(
        r#"[recipe]
name = "badrec"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = {{ count = 100 }}

[datasets.sft]
source = "{}"
format = "sharegpt"
on_bad_record = "{policy}"

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300

[stages.sft_data]
kind = "prepare"
tokenizer = "tok"
data = "sft"
"#,
        data.join("bad/missing_field_sft.jsonl").display()
    )
}

#[test]
fn bad_record_errors_with_file_and_line_or_is_skipped_and_counted() {
    let Some(data) = shared_data() else { return };
    let sb = Sandbox::new();
    sb.write("strict.toml", &bad_record_recipe(&data, "error"));
    let o = sb.run(&["strict.toml"]);
    assert_eq!(o.code, Some(1), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("missing_field_sft.jsonl:2"), "names file:line:\n{}", o.stderr);
    let rec = sb.last_run();
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["stages"]["sft_data"]["status"], "failed");
    assert!(rec["stages"]["sft_data"]["error"].as_str().unwrap().contains("missing_field_sft.jsonl:2"));

    sb.write("lenient.toml", &bad_record_recipe(&data, "skip"));
    sb.run_ok(&["lenient.toml"]);
    let rec = sb.last_run();
    assert_eq!(rec["status"], "succeeded");
    assert_eq!(rec["rejects"]["sft"], 4, "lines 2-5 are bad: {rec}");
    let rejects = std::fs::read_to_string(sb.run_dir(rec["id"].as_str().unwrap()).join("rejects.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = rejects.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["line"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3, 4, 5]);
    assert!(lines.iter().all(|l| l["dataset"] == "sft"));

    // A rerun on the cached shards records the same rejects: they are stored with the shards.
    sb.run_ok(&["lenient.toml"]);
    let again = sb.last_run();
    assert_eq!(again["stages"]["sft_data"]["status"], "cached");
    assert_eq!(again["rejects"], rec["rejects"], "{again}");
    let again = std::fs::read_to_string(sb.run_dir(again["id"].as_str().unwrap()).join("rejects.jsonl")).unwrap();
    assert_eq!(again, rejects);
}

/// A GRPO stage that could never learn is refused when the recipe loads (before anything trains),
/// pointing at the key; one that needs answers from a dataset without them fails with the reason.
#[test]
fn unusable_grpo_settings_are_refused_at_the_key() {
    let sb = Sandbox::new();
    let grpo = |extra: &str| {
        format!(
            "{SMALL_RECIPE}\n[stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ndata = \"text\"\nmax_seq_len = 32\n\
             batch_size = 4\nmax_steps = 2\n\n[stages.rl]\nkind = \"grpo\"\nfrom = \"base\"\ndata = \"chat\"\n{extra}\n"
        )
    };
    let text = grpo("rewards = [{ kind = \"length\", max_chars = 20 }]\ntemperature = 0.0");
    let line = text.lines().position(|l| l.starts_with("temperature = 0.0")).unwrap() + 1;
    sb.write("t0.toml", &text);
    let o = sb.run(&["plan", "t0.toml"]);
    assert_eq!(o.code, Some(2), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains(&format!("t0.toml:{line}:")), "no file:line in:\n{}", o.stderr);
    assert!(o.stderr.contains("positive temperature"), "says what to do:\n{}", o.stderr);

    sb.write("g1.toml", &grpo("rewards = [{ kind = \"exact_match\" }]\nnum_generations = 1"));
    let o = sb.run(&["plan", "g1.toml"]);
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("num_generations"), "{}", o.stderr);

    sb.write("nr.toml", &grpo("rewards = []"));
    let o = sb.run(&["plan", "nr.toml"]);
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("no rewards declared"), "{}", o.stderr);

    // Exact match against a chat dataset (no reference answers): stops at the GRPO stage, saying why.
    sb.write("em.toml", &grpo("rewards = [{ kind = \"exact_match\" }]\nmax_new_tokens = 4"));
    let o = sb.run(&["em.toml"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("needs reference answers") && o.stderr.contains("prompt_answer"), "{}", o.stderr);
}

/// GRPO prompts longer than `max_prompt_len` are skipped and counted (a truncated question may no
/// longer determine its answer); when none is left the stage says so and how to fix it.
#[test]
fn grpo_skips_and_counts_prompts_longer_than_max_prompt_len() {
    let sb = Sandbox::new();
    let long = "Please read this long story carefully before answering. ".repeat(12);
    let mut lines: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({"question": format!("What is {i} plus 1?"), "answer": format!("{}", i + 1)}).to_string()
        })
        .collect();
    lines.push(serde_json::json!({"question": format!("{long} What is 2 plus 2?"), "answer": "4"}).to_string());
    lines.push(serde_json::json!({"question": format!("{long} What is 3 plus 3?"), "answer": "6"}).to_string());
    sb.write("problems.jsonl", &(lines.join("\n") + "\n"));
    let recipe = |max_prompt_len: usize| {
        format!(
            "{SMALL_RECIPE}\n[datasets.problems]\nsource = \"problems.jsonl\"\nformat = \"prompt_answer\"\n\n\
             [stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ndata = \"text\"\nmax_seq_len = 32\nbatch_size = 4\n\
             max_steps = 2\n\n[stages.rl]\nkind = \"grpo\"\nfrom = \"base\"\ndata = \"problems\"\n\
             rewards = [{{ kind = \"exact_match\" }}]\nnum_generations = 2\nmax_new_tokens = 4\nbatch_size = 2\n\
             max_steps = 2\nmax_prompt_len = {max_prompt_len}\n"
        )
    };
    sb.write("some.toml", &recipe(64));
    let o = sb.run(&["some.toml"]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    let m = &sb.last_run()["stages"]["rl"]["metrics"];
    assert_eq!(m["skipped_long_prompts"], 2, "{m:#}");
    assert_eq!(m["prompts"], 6, "{m:#}");
    assert_eq!(m["steps"], 2, "{m:#}");

    sb.write("none.toml", &recipe(3));
    let o = sb.run(&["none.toml"]);
    assert_ne!(o.code, Some(0));
    assert!(
        o.stderr.contains("no usable prompts") && o.stderr.contains("8 longer than max_prompt_len = 3"),
        "{}",
        o.stderr
    );
}
