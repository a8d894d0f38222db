//! Loader tests: good recipes, bad recipes with exact positions and hints, `--set` overrides.

use super::testing::{registry, GOOD};
use super::*;
use std::path::Path;

fn load_text(text: &str, overrides: &[&str]) -> Result<Recipe, RecipeError> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load_str(Path::new("r.toml"), text.to_string(), &o, &registry())
}

/// Replace the first occurrence of `from` in GOOD.
fn bad(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "fixture does not contain {from:?}");
    GOOD.replacen(from, to, 1)
}

/// The single diagnostic of a recipe that must fail.
fn one_error(text: &str, overrides: &[&str]) -> Diagnostic {
    let e = load_text(text, overrides).expect_err("recipe should be rejected");
    let d = e.diagnostics();
    assert_eq!(d.len(), 1, "expected exactly one problem, got:\n{e}");
    d[0].clone()
}

fn pos(d: &Diagnostic) -> (usize, usize) {
    (d.line().expect("points into the file"), d.column().expect("points into the file"))
}

#[test]
fn good_recipe_loads_in_file_order_with_canonical_params() {
    let r = load_text(GOOD, &[]).unwrap();
    assert_eq!(r.meta.name, "demo");
    assert_eq!(r.meta.seed, 42);
    assert_eq!(r.model.preset.as_deref(), Some("tiny"));
    assert_eq!(r.datasets.len(), 2);
    assert_eq!(r.datasets["chat"].columns["messages"], "conversations");
    let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["tok", "base", "sft", "report"]);
    let base = &r.stages[1];
    assert_eq!(base.kind, "pretrain");
    // Defaults are filled in, `kind` is not a param.
    assert_eq!(base.params["batch_size"], 32);
    assert_eq!(base.params["log_every"], 10);
    assert!(base.params.get("kind").is_none());
    assert_eq!(base.inputs.len(), 2);
    assert_eq!(r.source_text, GOOD);
    assert!(r.overrides.is_empty());
}

#[test]
fn unknown_key_points_at_it_with_did_you_mean() {
    let text = bad("lr = 5e-4", "lrr = 5e-4");
    let d = one_error(&text, &[]);
    assert_eq!(d.message, "unknown key 'lrr' in [stages.base] — did you mean 'lr'?");
    assert_eq!(pos(&d), (27, 1));
    assert_eq!(d.key.as_deref(), Some("stages.base.lrr"));
    assert!(d.hint.as_deref().unwrap().contains("batch_size"), "{d}");
    let shown = d.to_string();
    assert!(shown.contains("--> r.toml:27:1"), "{shown}");
    assert!(shown.contains("27 | lrr = 5e-4\n   | ^^^\n"), "{shown}");
}

#[test]
fn unknown_key_in_a_nested_table() {
    let d = one_error(&bad("prompts = [\"1+1=\"]", "prompts = [\"1+1=\"]\ngeneration = { temprature = 0.5 }"), &[]);
    assert_eq!(d.message, "unknown key 'temprature' in [stages.report.generation] — did you mean 'temperature'?");
    assert_eq!(pos(&d), (38, 16));
    let d =
        one_error(&bad("prompts = [\"1+1=\"]", "prompts = [\"1+1=\"]\ngeneration = { temperature = \"hot\" }"), &[]);
    assert_eq!(
        d.message,
        "wrong type for 'generation.temperature' in [stages.report]: expected f64, found string \"hot\""
    );
    assert_eq!(pos(&d), (38, 30));
}

#[test]
fn unknown_stage_kind_lists_known_kinds() {
    let d = one_error(&bad("kind = \"pretrain\"", "kind = \"pretrian\""), &[]);
    assert_eq!(
        d.message,
        "unknown stage kind 'pretrian' — did you mean 'pretrain'? known kinds: tokenizer, pretrain, sft, eval"
    );
    assert_eq!(pos(&d), (24, 8));
}

#[test]
fn unknown_stage_reference_suggests_the_closest() {
    let d = one_error(&bad("from = \"base\"", "from = \"bsae\""), &[]);
    assert_eq!(d.message, "stage 'sft' takes from = 'bsae', but there is no stage 'bsae' — did you mean 'base'?");
    assert_eq!(pos(&d), (31, 8));
    assert_eq!(d.hint.as_deref(), Some("stages in this recipe: tok, base, report"));
}

#[test]
fn unknown_reference_inside_an_array_points_at_the_element() {
    let d = one_error(&bad("models = [\"base\", \"sft\"]", "models = [\"base\", \"stf\"]"), &[]);
    assert!(d.message.ends_with("there is no stage 'stf' — did you mean 'sft'?"), "{}", d.message);
    assert_eq!(pos(&d), (36, 19));
    assert_eq!(d.key.as_deref(), Some("stages.report.models[1]"));
}

#[test]
fn unknown_dataset_reference() {
    let d = one_error(&bad("data = \"chat\"", "data = \"caht\""), &[]);
    assert_eq!(d.message, "stage 'sft' takes data = 'caht', but there is no dataset 'caht' — did you mean 'chat'?");
    assert_eq!(pos(&d), (32, 8));
}

#[test]
fn wrong_type_names_key_and_expected_type() {
    let d = one_error(&bad("lr = 5e-4", "lr = \"fast\""), &[]);
    assert_eq!(d.message, "wrong type for 'lr' in [stages.base]: expected f64, found string \"fast\"");
    assert_eq!(pos(&d), (27, 6));

    let d = one_error(&bad("seed = 42", "seed = \"x\""), &[]);
    assert_eq!(d.message, "wrong type for 'seed' in [recipe]: expected u64, found string \"x\"");
    assert_eq!(pos(&d), (3, 8));

    let d = one_error(&bad("vocab_size = 512", "vocab_size = -5"), &[]);
    assert!(d.message.starts_with("wrong type for 'vocab_size' in [stages.tok]"), "{}", d.message);
    assert_eq!(pos(&d), (21, 14));
}

#[test]
fn missing_required_key_points_at_the_table() {
    let d = one_error(&bad("tokenizer = \"tok\"\n", ""), &[]);
    assert_eq!(d.message, "missing required key 'tokenizer' in [stages.base]");
    assert_eq!(d.line(), Some(23));
}

#[test]
fn unknown_enum_value_suggests() {
    let d = one_error(&bad("format = \"sharegpt\"", "format = \"sharegtp\""), &[]);
    assert_eq!(d.message, "unknown value 'sharegtp' for format in [datasets.chat] — did you mean 'sharegpt'?");
    assert_eq!(pos(&d), (15, 10));
}

#[test]
fn invalid_hub_uri() {
    let d = one_error(&bad("hf://datasets/owner/name@main/chat.jsonl", "hf://datasets/owner"), &[]);
    assert!(d.message.starts_with("invalid hf:// URI in [datasets.chat]: missing repository name"), "{}", d.message);
    assert_eq!(pos(&d), (14, 10));
}

#[test]
fn unknown_model_preset() {
    let d = one_error(&bad("preset = \"tiny\"", "preset = \"tinny\""), &[]);
    assert_eq!(d.message, "unknown model preset 'tinny' — did you mean 'tiny'?");
    assert_eq!(pos(&d), (7, 10));
    assert!(d.hint.unwrap().contains("minimind-small"));
}

#[test]
fn bad_model_shape() {
    let d = one_error(&bad("preset = \"tiny\"", "preset = \"tiny\"\nnum_key_value_heads = 3"), &[]);
    assert!(d.message.contains("num_key_value_heads = 3 does not divide"), "{}", d.message);
    assert_eq!(pos(&d), (8, 23));
}

#[test]
fn type_mismatch_between_stages() {
    let d = one_error(&bad("from = \"base\"", "from = \"tok\""), &[]);
    assert_eq!(
        d.message,
        "stage 'sft' takes from = 'tok', but 'tok' (kind tokenizer) produces a tokenizer, not a model"
    );
    assert_eq!(d.hint.as_deref(), Some("point from at a stage of kind pretrain or sft"));
    assert_eq!(pos(&d), (31, 8));
}

#[test]
fn cycles_name_the_stages() {
    let text = r#"[recipe]
name = "c"
[datasets.d]
source = "x.jsonl"
format = "sharegpt"
[stages.a]
kind = "sft"
from = "b"
data = "d"
[stages.b]
kind = "sft"
from = "a"
data = "d"
"#;
    let d = one_error(text, &[]);
    assert_eq!(d.message, "stages depend on each other in a cycle: a → b → a");
    assert_eq!(pos(&d), (8, 8));

    let d = one_error(&text.replace("from = \"b\"", "from = \"a\""), &[]);
    assert_eq!(d.message, "stage 'a' takes from = 'a', which is itself");
}

#[test]
fn syntax_errors_have_positions() {
    let d = one_error(&bad("lr = 5e-4", "lr = = 5"), &[]);
    assert!(d.message.starts_with("TOML syntax error"), "{}", d.message);
    assert_eq!(d.line(), Some(27));
}

#[test]
fn unknown_top_level_and_missing_recipe() {
    let d = one_error(&bad("[model]", "[modle]"), &[]);
    assert_eq!(d.message, "unknown top-level key 'modle' — did you mean 'model'?");
    assert_eq!(pos(&d), (6, 2));

    let d = one_error(&GOOD.replacen("[recipe]\nname = \"demo\"\nseed = 42\ndevice = \"cpu\"\n", "", 1), &[]);
    assert_eq!(d.message, "the recipe has no [recipe] table");
}

#[test]
fn several_problems_are_all_reported() {
    let text = bad("lr = 5e-4", "lrr = 5e-4").replace("from = \"base\"", "from = \"bsae\"");
    let e = load_text(&text, &[]).unwrap_err();
    assert_eq!(e.diagnostics().len(), 2, "{e}");
    assert!(e.to_string().ends_with("2 problems in the recipe"));
}

#[test]
fn overrides_apply_before_validation_and_are_recorded() {
    let r = load_text(GOOD, &["stages.base.lr=3e-4", "recipe.seed=7", "datasets.text.source=other.jsonl"]).unwrap();
    assert_eq!(r.stages[1].params["lr"], 3e-4);
    assert_eq!(r.meta.seed, 7);
    assert_eq!(r.datasets["text"].source, "other.jsonl");
    assert_eq!(r.overrides, ["stages.base.lr=3e-4", "recipe.seed=7", "datasets.text.source=other.jsonl"]);
    // A param absent from the file but known to the stage may be set.
    let r = load_text(GOOD, &["stages.base.batch_size=8"]).unwrap();
    assert_eq!(r.stages[1].params["batch_size"], 8);
}

#[test]
fn override_errors_point_at_the_override() {
    let d = one_error(GOOD, &["stages.base.lrr=1"]);
    assert_eq!(d.message, "unknown key 'lrr' in [stages.base] — did you mean 'lr'?");
    assert_eq!(d.location, Location::Override("stages.base.lrr=1".into()));
    assert!(d.to_string().contains("--> --set stages.base.lrr=1"), "{d}");

    let d = one_error(GOOD, &["stages.bsae.lr=1"]);
    assert_eq!(d.message, "--set stages.bsae.lr: there is no 'bsae' in [stages] — did you mean 'base'?");

    let d = one_error(GOOD, &["stages.base.lr=fast"]);
    assert_eq!(d.message, "wrong type for 'lr' in [stages.base]: expected f64, found string \"fast\"");
    assert_eq!(d.location, Location::Override("stages.base.lr=fast".into()));

    let d = one_error(GOOD, &["stages.base.lr.x=1"]);
    assert_eq!(d.message, "--set stages.base.lr.x: 'stages.base.lr' is a float, not a table");
}

#[test]
fn missing_file_is_an_io_error() {
    let e = load(Path::new("/nonexistent/r.toml"), &[], &registry()).unwrap_err();
    assert!(matches!(e, RecipeError::Io(_)));
    assert!(e.to_string().contains("/nonexistent/r.toml"));
}

#[test]
fn fixtures_under_tests_dir_fail_as_documented() {
    // Each fixture's first line is `# expect: <line>:<col> <message prefix>`.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text.lines().next().unwrap().strip_prefix("# expect: ").expect("fixture has an expect line");
        let (at, msg) = expect.split_once(' ').unwrap();
        let e = load(&path, &[], &registry()).expect_err(&format!("{} should fail", path.display()));
        let d = &e.diagnostics()[0];
        assert_eq!(format!("{}:{}", d.line().unwrap(), d.column().unwrap()), at, "{}: {e}", path.display());
        assert!(d.message.starts_with(msg), "{}: {:?} does not start with {msg:?}", path.display(), d.message);
        n += 1;
    }
    assert!(n >= 3, "expected bad-recipe fixtures in {}", dir.display());
}

#[test]
fn structural_oddities_are_reported_not_panicked_on() {
    let d = one_error("[recipe]\nname = \"x\"\n[[stages]]\nkind = \"sft\"\n", &[]);
    assert_eq!(d.message, "'stages' must be a table of tables, found an array");
    assert_eq!(pos(&d), (3, 1));

    let d = one_error(&bad("kind = \"sft\"", "kind = 3"), &[]);
    assert_eq!(d.message, "'kind' of stage 'sft' must be a string, found an integer");

    let d = one_error(&bad("device = \"cpu\"", "device = \"gpu:0\""), &[]);
    assert_eq!(d.message, "unknown device 'gpu:0'");
    assert_eq!(pos(&d), (4, 10));

    let e = load_text(&bad("[stages.sft]", "[stages.\"s f t\"]"), &[]).unwrap_err();
    let d = &e.diagnostics()[0];
    assert!(d.message.starts_with("stage name 's f t' has characters"), "{}", d.message);
    assert_eq!(pos(d), (29, 9));

    // Inline stage tables work like header tables.
    let inline = GOOD.replace(
        "[stages.report]\nkind = \"eval\"\nmodels = [\"base\", \"sft\"]\nprompts = [\"1+1=\"]\n",
        "[stages]\nreport = { kind = \"eval\", models = [\"base\", \"sfx\"] }\n",
    );
    let d = one_error(&inline, &[]);
    assert!(d.message.contains("no stage 'sfx' — did you mean 'sft'?"), "{}", d.message);
    assert_eq!(pos(&d), (35, 45));
}

/// "Recipe loading never panics": every truncation and every single-line deletion of a valid
/// recipe loads or fails with diagnostics.
#[test]
fn loading_never_panics_on_mangled_recipes() {
    let lines: Vec<&str> = GOOD.lines().collect();
    for i in 0..lines.len() {
        let text: String = lines.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, l)| format!("{l}\n")).collect();
        if let Err(e) = load_text(&text, &[]) {
            assert!(!e.diagnostics().is_empty());
        }
    }
    for (cut, _) in GOOD.char_indices() {
        if let Err(e) = load_text(&GOOD[..cut], &[]) {
            assert!(!e.diagnostics().is_empty());
            let _ = e.to_string();
        }
    }
}

#[test]
fn stage_resources_merge_over_recipe_defaults_and_stay_out_of_params() {
    let text = GOOD.replace(
        "device = \"cpu\"\n",
        "device = \"cpu\"\nexecutor = \"slurm\"\nresources = { partition = \"gpu\", time = \"1:00:00\" }\n",
    ) + "\n[stages.base.resources]\ngpus = 2\ntime = \"30\"\n";
    let r = load_text(&text, &["stages.sft.resources.mem=8G"]).unwrap();
    assert_eq!(r.meta.executor, ExecutorKind::Slurm);
    let base = r.stages.iter().find(|s| s.name == "base").unwrap();
    assert_eq!(base.resources.sbatch_args(), ["--partition=gpu", "--gres=gpu:2", "--time=30"]);
    assert!(base.params.get("resources").is_none(), "resources are not stage params");
    let sft = r.stages.iter().find(|s| s.name == "sft").unwrap();
    assert_eq!(sft.resources.sbatch_args(), ["--partition=gpu", "--mem=8G", "--time=1:00:00"]);
}

#[test]
fn bad_resources_and_executor_point_at_the_key() {
    let d = one_error(&(GOOD.to_string() + "\n[stages.base.resources]\ntime = \"2h\"\n"), &[]);
    assert_eq!(d.key.as_deref(), Some("stages.base.resources.time"));
    assert!(d.message.contains("not a Slurm time limit"), "{d}");
    assert!(d.hint.as_deref().unwrap().contains("HH:MM:SS"), "{d}");
    assert_eq!(pos(&d).0, GOOD.lines().count() + 3);

    let d = one_error(&(GOOD.to_string() + "\n[stages.base.resources]\ngpu = 1\n"), &[]);
    assert_eq!(d.key.as_deref(), Some("stages.base.resources.gpu"));
    assert!(d.message.contains("did you mean 'gpus'?"), "{d}");

    let d = one_error(GOOD, &["recipe.resources.mem=lots"]);
    assert_eq!(d.key.as_deref(), Some("recipe.resources.mem"));

    let d = one_error(&GOOD.replace("device = \"cpu\"\n", "device = \"cpu\"\nexecutor = \"slurn\"\n"), &[]);
    assert!(d.message.contains("did you mean 'slurm'?"), "{d}");
}
