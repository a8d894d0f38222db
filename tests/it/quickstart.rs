//! Quickstart quality: `recipes/quickstart.toml` runs tokenizer → pretrain → sft → lora → dpo →
//! grpo → eval end to end through the binary (fixed seed, CPU: deterministic, so not flaky). The SFT
//! and final models answer at least 0.8 of held-out arithmetic problems (problems never seen in
//! training) exactly, clearly better than the pretrained one; DPO ranks the correct answers above
//! the wrong ones, and neither DPO nor GRPO loses what SFT taught.

use std::path::{Path, PathBuf};

/// The pipeline's stages, in order.
const STAGES: [&str; 7] = ["tok", "base", "sft", "lora", "dpo", "grpo", "report"];

fn find_reports(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            find_reports(&p, out);
        } else if p.file_name().is_some_and(|n| n == "report.json") && p.with_file_name("manifest.json").exists() {
            out.push(p);
        }
    }
}

#[test]
fn quickstart_stages_each_improve_what_they_optimise() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let home = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = assert_cmd::Command::cargo_bin("mmrun").unwrap();
        cmd.current_dir(home.path())
            .env("MMRUN_HOME", home.path().join("mmrun"))
            .env("MMRUN_RUNS_DIR", home.path().join("runs"))
            .arg(root.join("recipes/quickstart.toml"))
            // The figures below were measured in f32. `precision = "auto"` is bf16 on some CPUs
            // (AMD Zen 4/5) and f32 on others, and bf16 trains other (not worse) weights, so the
            // test pins f32 to mean the same on every machine CI may draw.
            .args(["--set", "recipe.precision=f32"]);
        for o in extra {
            cmd.arg("--set").arg(o);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "quickstart failed:\nstdout:\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    run(&[]);

    let mut reports = vec![];
    find_reports(home.path(), &mut reports);
    assert_eq!(reports.len(), 1, "expected exactly one eval report under {}: {reports:?}", home.path().display());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&reports[0]).unwrap()).unwrap();
    let em = |m: &str| {
        report["models"][m]["exact_match"].as_f64().unwrap_or_else(|| panic!("no {m}.exact_match in {report:#}"))
    };
    let (base, sft, dpo, grpo) = (em("base"), em("sft"), em("dpo"), em("grpo"));
    eprintln!("quickstart exact match: base {base:.3}, sft {sft:.3}, dpo {dpo:.3}, grpo {grpo:.3}");
    // Measured (seed 42, f32, counting replies): base 0.47, sft 0.98, dpo 0.95, grpo 0.96 on 100
    // held-out problems (none of them seen in training). The goal is 0.8 for the final model.
    assert!(sft >= base + 0.2, "SFT ({sft:.3}) should beat the base model ({base:.3}) by at least 0.2 exact match");
    for (m, v) in [("sft", sft), ("grpo", grpo)] {
        assert!(v >= 0.8, "{m} exact match {v:.3} on held-out problems is below the quickstart's 0.8 goal");
    }
    // DPO and GRPO start near the ceiling, so they are held to not losing what SFT taught.
    assert!(dpo >= sft - 0.1, "DPO ({dpo:.3}) lost too much of the SFT model's exact match ({sft:.3})");
    assert!(grpo >= dpo, "GRPO ({grpo:.3}) should not fall below its starting point, the DPO model ({dpo:.3})");
    let ppl = |m: &str| report["models"][m]["perplexity"].as_f64().unwrap();
    eprintln!(
        "quickstart answer perplexity: base {:.2}, sft {:.2}, lora {:.2}, dpo {:.2}, grpo {:.2}",
        ppl("base"),
        ppl("sft"),
        ppl("lora"),
        ppl("dpo"),
        ppl("grpo")
    );
    // Scored as SFT trains the reply (not the bare number after the prompt), the chat models'
    // answer perplexity is a few nats' worth, far below the 400-token vocabulary.
    for m in ["sft", "lora", "dpo", "grpo"] {
        assert!(ppl(m) < 20.0, "{m}: answer perplexity {} should be far below the vocabulary size", ppl(m));
    }
    for m in ["base", "sft", "lora", "dpo", "grpo"] {
        let ppl = ppl(m);
        assert!(ppl.is_finite() && ppl >= 1.0, "{m} perplexity {ppl}");
        assert!(!report["models"][m]["generations"].as_array().unwrap().is_empty(), "{m} has no generations");
    }
    let metrics = |stage: &str| last_run(&home.path().join("runs"))["stages"][stage]["metrics"].clone();
    let dpo_acc = metrics("dpo")["final/rewards/accuracy"].as_f64().unwrap();
    assert!(dpo_acc >= 0.6, "DPO should rank the correct answer above the wrong one: reward accuracy {dpo_acc}");
    let g = metrics("grpo");
    let (before, after) = (g["reward_before"].as_f64().unwrap(), g["reward_after"].as_f64().unwrap());
    eprintln!("quickstart dpo reward accuracy {dpo_acc:.3}; grpo mean reward {before:.3} -> {after:.3}");
    // Measured 0.992 -> 0.990: SFT leaves GRPO at the ceiling, so it is held to not losing reward.
    assert!(after >= before - 0.02, "GRPO lowered the mean reward: {before:.3} -> {after:.3}");

    // Cosmetic stage params (log/checkpoint intervals, eval batch size) rebuild nothing ...
    run(&[
        "stages.base.log_every=3",
        "stages.sft.save_every=17",
        "stages.grpo.log_every=5",
        "stages.report.batch_size=3",
    ]);
    assert_eq!(last_statuses(&home.path().join("runs")), statuses(&["cached"; 7]));
    // ... while an output-affecting one reruns exactly that stage and its descendants.
    run(&["stages.grpo.lr=1e-5", "stages.grpo.max_steps=5"]);
    let expect = ["cached", "cached", "cached", "cached", "cached", "ran", "ran"];
    assert_eq!(last_statuses(&home.path().join("runs")), statuses(&expect));
}

/// `(stage, status)` of the pipeline with the given statuses.
fn statuses(s: &[&str]) -> Vec<(String, String)> {
    STAGES.iter().zip(s).map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The newest run record (run directories start with a sortable timestamp).
fn last_run(runs: &Path) -> serde_json::Value {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(runs).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    serde_json::from_str(&std::fs::read_to_string(dirs.last().unwrap().join("run.json")).unwrap()).unwrap()
}

/// Stage statuses of the newest run record.
fn last_statuses(runs: &Path) -> Vec<(String, String)> {
    let rec = last_run(runs);
    let stages = rec["stages"].as_object().unwrap_or_else(|| panic!("no stages map in {rec:#}"));
    STAGES.iter().map(|s| (s.to_string(), stages[*s]["status"].as_str().unwrap_or("?").to_string())).collect()
}
