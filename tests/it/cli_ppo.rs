//! The `ppo` stage through the binary on built-in arithmetic: a tiny pretrained model, a reward
//! model trained on built-in preference pairs, and PPO with that reward model plus a rule reward.
//! The run records held-out reward before and after, logs every PPO metric per rollout step, and
//! a second run is fully cached.

use crate::common;

use common::{Sandbox, SMALL_RECIPE};

fn recipe() -> String {
    format!(
        "{SMALL_RECIPE}\n\
         [datasets.problems]\nsource = \"builtin:arithmetic\"\nformat = \"prompt_answer\"\nbuiltin = {{ count = 24, seed = 5 }}\n\n\
         [datasets.pairs]\nsource = \"builtin:arithmetic\"\nformat = \"dpo\"\nbuiltin = {{ count = 24, seed = 4 }}\n\n\
         [stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ndata = \"text\"\nmax_seq_len = 32\nbatch_size = 4\nmax_steps = 4\n\n\
         [stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"pairs\"\nmax_seq_len = 64\nbatch_size = 4\nmax_steps = 3\n\n\
         [stages.rl]\nkind = \"ppo\"\nfrom = \"base\"\ndata = \"problems\"\nreward_model = \"rm\"\n\
         rewards = [{{ kind = \"exact_match\" }}]\nmax_new_tokens = 6\nbatch_size = 4\nmini_batch_size = 2\n\
         max_steps = 3\nholdout = 0.25\nlr = 1e-3\n"
    )
}

#[test]
fn ppo_runs_through_the_cli_with_a_reward_model_and_reports_held_out_reward() {
    let sb = Sandbox::new();
    sb.write("ppo.toml", &recipe());
    sb.run_ok(&["ppo.toml"]);
    let run = sb.last_run();
    assert_eq!(run["stages"]["rl"]["status"], "ran", "{:#}", run["stages"]["rl"]);
    let m = &run["stages"]["rl"]["metrics"];
    assert_eq!(
        (m["steps"].as_u64(), m["prompts"].as_u64(), m["heldout_prompts"].as_u64()),
        (Some(3), Some(18), Some(6)),
        "{m:#}"
    );
    for k in ["heldout_before/reward", "heldout/reward", "reward_mean", "final_loss"] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} in {m:#}");
    }
    let lines = std::fs::read_to_string(sb.run_dir(run["id"].as_str().unwrap()).join("metrics.jsonl")).unwrap();
    let ppo: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["stage"] == "rl")
        .collect();
    assert_eq!(ppo.len(), 3, "one line per rollout step");
    for k in [
        "reward_mean",
        "reward/exact_match",
        "reward/reward_model",
        "kl",
        "approx_kl",
        "clip_fraction",
        "value_loss",
        "explained_variance",
        "response_len",
        "lr",
        "critic_lr",
    ] {
        assert!(ppo[0].get(k).is_some(), "no {k} in {}", ppo[0]);
    }
    // The reward model's term is its score clipped to ±3 (the default reward_clip).
    assert!(ppo.iter().all(|v| v["reward/reward_model"].as_f64().unwrap().abs() <= 3.0));

    sb.run_ok(&["ppo.toml"]);
    assert_eq!(sb.last_run()["stages"]["rl"]["status"], "cached");
}
