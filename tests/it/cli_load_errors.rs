//! Recipes that can never work are refused when they load (exit 2, `file:line:col` and a hint),
//! before any stage runs: dataset formats a stage cannot read, values no run can use, bytes that
//! are not UTF-8, and `--set` values with line breaks.

use crate::common;

use common::{Sandbox, SMALL_RECIPE};

/// `SMALL_RECIPE` plus a pretrain stage `base` and a preference dataset `pairs`, so later stages
/// have something to start from.
fn base() -> String {
    format!(
        "{SMALL_RECIPE}\n[datasets.pairs]\nsource = \"builtin:arithmetic\"\nformat = \"dpo\"\nbuiltin = {{ count = 20 }}\n\n\
         [stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ndata = \"text\"\nmax_seq_len = 32\nbatch_size = 4\nmax_steps = 2\n"
    )
}

/// Load `text` with `mmrun plan`: exit 2, pointing at the last line that is exactly `line`, and
/// saying `says`.
fn refused(sb: &Sandbox, name: &str, text: &str, line: &str, says: &str) {
    let n = text
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| l.trim() == line)
        .unwrap_or_else(|| panic!("{name}: no line {line:?}"))
        + 1;
    let file = format!("{name}.toml");
    sb.write(&file, text);
    let o = sb.run(&["plan", &file]);
    assert_eq!(o.code, Some(2), "{name}: expected exit 2, stderr:\n{}", o.stderr);
    assert!(o.stderr.contains(&format!("{file}:{n}:")), "{name}: no {file}:{n}: in:\n{}", o.stderr);
    assert!(o.stderr.contains(says), "{name}: does not say {says:?}:\n{}", o.stderr);
    assert!(o.stderr.contains("hint") || o.stderr.contains("help"), "{name}: no hint in:\n{}", o.stderr);
}

#[test]
fn a_dpo_stage_fed_a_text_dataset_fails_at_load_time() {
    let sb = Sandbox::new();
    let text = format!("{}\n[stages.pref]\nkind = \"dpo\"\nfrom = \"base\"\ndata = \"text\"\n", base());
    refused(&sb, "dpo_text", &text, "data = \"text\"", "has format text; a dpo stage reads dpo");
    // The same stage on preference pairs loads.
    sb.write("dpo_ok.toml", &text.replace("from = \"base\"\ndata = \"text\"", "from = \"base\"\ndata = \"pairs\""));
    let o = sb.run(&["plan", "dpo_ok.toml"]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
}

#[test]
fn a_reward_model_stage_fed_a_chat_dataset_fails_at_load_time() {
    let sb = Sandbox::new();
    let text = format!("{}\n[stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"chat\"\n", base());
    refused(&sb, "rm_chat", &text, "data = \"chat\"", "a reward_model stage reads dpo");
    let ok = format!("{}\n[stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"pairs\"\n", base());
    sb.write("rm_ok.toml", &ok);
    let o = sb.run(&["plan", "rm_ok.toml"]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
}

#[test]
fn a_distill_stage_fed_preference_pairs_fails_at_load_time() {
    let sb = Sandbox::new();
    let kd = |data: &str| {
        format!("{}\n[stages.kd]\nkind = \"distill\"\nfrom = \"base\"\nteacher = \"base\"\ndata = \"{data}\"\n", base())
    };
    refused(&sb, "kd_pairs", &kd("pairs"), "data = \"pairs\"", "a distill stage reads");
    sb.write("kd_ok.toml", &kd("chat"));
    let o = sb.run(&["plan", "kd_ok.toml"]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
}

#[test]
fn values_that_can_never_work_fail_at_load_time() {
    let sb = Sandbox::new();
    let b = base();
    let with_base = |from: &str, to: &str| {
        assert!(b.contains(from), "{from:?}");
        b.replacen(from, to, 1)
    };
    let stage = |body: &str| format!("{b}\n{body}\n");
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("batch0", with_base("batch_size = 4", "batch_size = 0"), "batch_size = 0", "batch_size = 0"),
        ("seq0", with_base("max_seq_len = 32", "max_seq_len = 0"), "max_seq_len = 0", "max_seq_len = 0"),
        ("steps0", with_base("max_steps = 2", "max_steps = 0"), "max_steps = 0", "max_steps = 0"),
        ("lr_neg", with_base("max_steps = 2", "max_steps = 2\nlr = -1e-3"), "lr = -1e-3", "cannot train"),
        ("lr_nan", with_base("max_steps = 2", "max_steps = 2\nlr = nan"), "lr = nan", "cannot train"),
        ("lr_inf", with_base("max_steps = 2", "max_steps = 2\nlr = inf"), "lr = inf", "cannot train"),
        (
            "ckpt_day",
            with_base("max_steps = 2", "max_steps = 2\nsave_every_secs = 864000"),
            "save_every_secs = 864000",
            "more than a day",
        ),
        ("vocab1", b.replacen("vocab_size = 400", "vocab_size = 1", 1), "vocab_size = 1", "vocab_size = 1"),
        ("vocab0", b.replacen("vocab_size = 400", "vocab_size = 0", 1), "vocab_size = 0", "vocab_size = 0"),
        (
            "vocab291",
            b.replacen("vocab_size = 400", "vocab_size = 291", 1),
            "vocab_size = 291",
            "use 292 or more (36 special + 256 byte tokens",
        ),
        ("tok_nodata", b.replacen("data = [\"text\"]", "data = []", 1), "data = []", "data is empty"),
        (
            "eval_nomodels",
            stage("[stages.ev]\nkind = \"eval\"\nmodels = []\ndata = [\"text\"]"),
            "models = []",
            "models is empty",
        ),
        (
            "eval_nodata",
            stage("[stages.ev]\nkind = \"eval\"\nmodels = [\"base\"]\ndata = []"),
            "data = []",
            "data is empty",
        ),
        (
            "lora_rank0",
            stage("[stages.ft]\nkind = \"lora\"\nfrom = \"base\"\ndata = \"chat\"\nrank = 0"),
            "rank = 0",
            "rank = 0",
        ),
        (
            "dpo_beta",
            stage("[stages.pref]\nkind = \"dpo\"\nfrom = \"base\"\ndata = \"pairs\"\nbeta = -0.1"),
            "beta = -0.1",
            "beta = -0.1",
        ),
        (
            "rm_margin",
            stage("[stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"pairs\"\nmargin = -1.0"),
            "margin = -1.0",
            "margin = -1 is out of range",
        ),
        (
            "rm_holdout",
            stage("[stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"pairs\"\nholdout = 1.0"),
            "holdout = 1.0",
            "holdout = 1 is out of range",
        ),
        (
            "distill_alpha",
            stage("[stages.kd]\nkind = \"distill\"\nfrom = \"base\"\nteacher = \"base\"\ndata = \"chat\"\nalpha = 1.5"),
            "alpha = 1.5",
            "alpha = 1.5 is out of range",
        ),
        (
            "distill_temperature",
            stage("[stages.kd]\nkind = \"distill\"\nfrom = \"base\"\nteacher = \"base\"\ndata = \"chat\"\ntemperature = 0.0"),
            "temperature = 0.0",
            "temperature = 0 is out of range",
        ),
        (
            "grpo_top_p",
            stage(
                "[stages.rl]\nkind = \"grpo\"\nfrom = \"base\"\ndata = \"chat\"\n\
                 rewards = [{ kind = \"length\", max_chars = 20 }]\ntop_p = 1.5",
            ),
            "top_p = 1.5",
            "top_p = 1.5",
        ),
        (
            "builtin_unknown",
            b.replacen("source = \"builtin:arithmetic\"", "source = \"builtin:arithmetc\"", 1),
            "source = \"builtin:arithmetc\"",
            "unknown builtin dataset",
        ),
        (
            "builtin_unknown_tool",
            format!("{b}\n[datasets.tasks]\nsource = \"builtin:tool_use\"\nformat = \"openai\"\nbuiltin = {{ tools = [\"calculator\", \"shell\"] }}\n"),
            "builtin = { tools = [\"calculator\", \"shell\"] }",
            "unknown tool \"shell\" in [datasets.tasks]",
        ),
        (
            "builtin_tool_format",
            format!("{b}\n[datasets.tasks]\nsource = \"builtin:tool_use\"\nformat = \"alpaca\"\n"),
            "format = \"alpaca\"",
            "builtin:tool_use in [datasets.tasks] cannot write format 'alpaca'",
        ),
        (
            "builtin_count0",
            b.replacen("builtin = { count = 300 }", "builtin = { count = 0 }", 1),
            "builtin = { count = 0 }",
            "builtin count 0",
        ),
        (
            "builtin_count_huge",
            b.replacen("builtin = { count = 300 }", "builtin = { count = 10000000000000 }", 1),
            "builtin = { count = 10000000000000 }",
            "10000000",
        ),
    ];
    for (name, text, line, says) in &cases {
        refused(&sb, name, text, line, says);
    }
    // Fixed prompts alone are something to evaluate (recipes/medical_sft.toml's report does this).
    sb.write("eval_prompts.toml", &stage("[stages.ev]\nkind = \"eval\"\nmodels = [\"base\"]\nprompts = [\"1+1=\"]"));
    let o = sb.run(&["plan", "eval_prompts.toml"]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
    if !cfg!(feature = "cuda") {
        let text = b.replacen("seed = 7", "seed = 7\ndevice = \"cuda:0\"", 1);
        refused(&sb, "cuda", &text, "device = \"cuda:0\"", "built without");
    }
}

#[test]
fn a_recipe_that_is_not_utf8_names_the_byte_offset() {
    let sb = Sandbox::new();
    let mut bytes = SMALL_RECIPE.as_bytes().to_vec();
    let at = SMALL_RECIPE.find("integration").unwrap();
    bytes[at] = 0xff;
    std::fs::write(sb.root().join("latin1.toml"), &bytes).unwrap();
    let o = sb.run(&["plan", "latin1.toml"]);
    assert_eq!(o.code, Some(2), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("latin1.toml:4:"), "no file:line in:\n{}", o.stderr);
    assert!(o.stderr.contains(&format!("byte offset {at}")), "no byte offset in:\n{}", o.stderr);
}

#[test]
fn a_set_value_with_a_line_break_is_an_error() {
    let sb = Sandbox::new();
    sb.write("r.toml", SMALL_RECIPE);
    let o = sb.run(&["plan", "r.toml", "--set", "recipe.description=one\nrecipe.seed=9"]);
    assert_eq!(o.code, Some(2), "stderr:\n{}", o.stderr);
    assert!(o.stderr.contains("line break"), "{}", o.stderr);
}

/// PPO values no run can use, and a missing or mistyped reward source, are refused at their key
/// (a missing key: at the stage's table) before anything trains.
#[test]
fn unusable_ppo_settings_fail_at_load_time() {
    let sb = Sandbox::new();
    let ppo = |body: &str| {
        format!(
            "{}\n[stages.rl]\nkind = \"ppo\"\nfrom = \"base\"\ndata = \"chat\"\n{body}\n",
            base().replace(
                "[stages.base]",
                "[stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"pairs\"\n\n[stages.base]"
            )
        )
    };
    let rules = "rewards = [{ kind = \"length\", max_chars = 20 }]";
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("ppo_no_reward", ppo(""), "[stages.rl]", "no reward source"),
        ("ppo_clip0", ppo(&format!("{rules}\nclip = 0.0")), "clip = 0.0", "clip = 0 is out of range"),
        (
            "ppo_clip_neg",
            ppo(&format!("{rules}\nvalue_clip = -0.2")),
            "value_clip = -0.2",
            "value_clip = -0.2 is out of range",
        ),
        ("ppo_gamma", ppo(&format!("{rules}\ngamma = 1.5")), "gamma = 1.5", "gamma = 1.5 is out of range"),
        ("ppo_lam", ppo(&format!("{rules}\nlam = -0.1")), "lam = -0.1", "lam = -0.1 is out of range"),
        ("ppo_iters0", ppo(&format!("{rules}\nppo_update_iters = 0")), "ppo_update_iters = 0", "ppo_update_iters = 0"),
        ("ppo_mb0", ppo(&format!("{rules}\nmini_batch_size = 0")), "mini_batch_size = 0", "mini_batch_size = 0"),
        ("ppo_kl_stop", ppo(&format!("{rules}\nearly_stop_kl = 0.0")), "early_stop_kl = 0.0", "early_stop_kl = 0"),
        ("ppo_critic_lr", ppo(&format!("{rules}\ncritic_lr = -1.0")), "critic_lr = -1.0", "critic_lr = -1"),
        ("ppo_temp", ppo(&format!("{rules}\ntemperature = 0.0")), "temperature = 0.0", "positive temperature"),
        ("ppo_rm_kind", ppo("reward_model = \"base\""), "reward_model = \"base\"", "reward model"),
        ("ppo_rm_missing", ppo("reward_model = \"nope\""), "reward_model = \"nope\"", "nope"),
        (
            "ppo_actor_rm",
            ppo(rules).replace("kind = \"ppo\"\nfrom = \"base\"", "kind = \"ppo\"\nfrom = \"rm\""),
            "from = \"rm\"",
            "a reward model",
        ),
    ];
    for (name, text, line, says) in &cases {
        refused(&sb, name, text, line, says);
    }
    // Either source alone loads: rule rewards, or a reward model stage.
    for (name, body) in [("ppo_rules", rules), ("ppo_rm", "reward_model = \"rm\"")] {
        sb.write(&format!("{name}.toml"), &ppo(body));
        let o = sb.run(&["plan", &format!("{name}.toml")]);
        assert_eq!(o.code, Some(0), "{name}: stderr:\n{}", o.stderr);
    }
}

#[test]
fn unusable_agent_settings_fail_at_load_time() {
    let sb = Sandbox::new();
    let agent = |body: &str| {
        format!(
            "{}\n[datasets.tasks]\nsource = \"builtin:tool_use\"\nformat = \"prompt_answer\"\nbuiltin = {{ count = 8 }}\n\n\
             [stages.rl]\nkind = \"agent\"\nfrom = \"base\"\ndata = \"tasks\"\n{body}\n",
            base()
        )
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("agent_turns0", agent("max_turns = 0"), "max_turns = 0", "max_turns"),
        ("agent_group1", agent("num_generations = 1"), "num_generations = 1", "one sample per group"),
        (
            "agent_tool",
            agent("tools = [\"calculator\", \"shell\"]"),
            "tools = [\"calculator\", \"shell\"]",
            "unknown tool 'shell'",
        ),
        ("agent_no_tools", agent("tools = []"), "tools = []", "offers no tool"),
        ("agent_temp", agent("temperature = 0.0"), "temperature = 0.0", "positive temperature"),
        ("agent_tokens0", agent("max_new_tokens = 0"), "max_new_tokens = 0", "generates nothing"),
        ("agent_beta", agent("beta = -1.0"), "beta = -1.0", "beta"),
        (
            "agent_chat",
            agent("").replace("data = \"tasks\"", "data = \"chat\""),
            "data = \"chat\"",
            "agent stage reads",
        ),
        ("agent_heldout", agent("heldout = \"nope\""), "heldout = \"nope\"", "nope"),
    ];
    for (name, text, line, says) in &cases {
        refused(&sb, name, text, line, says);
    }
    sb.write(
        "agent_ok.toml",
        &agent("tools = [\"calculator\", \"convert_units\", \"element_lookup\"]\nheldout = \"tasks\""),
    );
    let o = sb.run(&["plan", "agent_ok.toml"]);
    assert_eq!(o.code, Some(0), "stderr:\n{}", o.stderr);
}
