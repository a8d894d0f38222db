//! Helpers shared by the integration tests: a sandbox per test (own `MMRUN_HOME`, runs dir and
//! recipe), running the built `mmrun` binary, and reading run records.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// One definition of the skip-or-require rule, shared with the unit tests; not every test binary uses it.
#[allow(unused_imports)]
pub use mmrun::testutil::shared_data;

/// A temporary directory with its own cache, runs dir and recipe file.
pub struct Sandbox {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
}

/// What a finished `mmrun` invocation produced.
#[derive(Debug)]
pub struct Output {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Sandbox {
    /// A fresh sandbox.
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir") }
    }

    /// The sandbox root (also the working directory of every command).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `MMRUN_HOME`.
    pub fn home(&self) -> PathBuf {
        self.root().join("home")
    }

    /// The runs directory.
    pub fn runs(&self) -> PathBuf {
        self.root().join("runs")
    }

    /// Write a file relative to the sandbox and return its path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A `mmrun` command with this sandbox's home, runs dir and working directory.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mmrun"));
        c.args(args)
            .current_dir(self.root())
            .env("MMRUN_HOME", self.home())
            .env("MMRUN_RUNS_DIR", self.runs())
            .env_remove("RUST_LOG")
            .env("MMRUN_NO_PROGRESS", "1");
        c
    }

    /// Run `mmrun args…` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        let start = std::time::Instant::now();
        let out = self.command(args).output().expect("spawn mmrun");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    /// Run and assert success, returning the output.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let o = self.run(args);
        assert_eq!(o.code, Some(0), "mmrun {args:?} failed\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
        o
    }

    /// All run records, oldest first.
    pub fn runs_json(&self) -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = std::fs::read_dir(self.runs())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("run.json")).ok())
                    .map(|t| serde_json::from_str(&t).expect("run.json parses"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| {
            a["started"].as_str().cmp(&b["started"].as_str()).then(a["id"].as_str().cmp(&b["id"].as_str()))
        });
        v
    }

    /// The newest run record.
    pub fn last_run(&self) -> serde_json::Value {
        self.runs_json().pop().expect("at least one run record")
    }

    /// The directory of run `id`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.runs().join(id)
    }

    /// Stage keys from `mmrun plan --json`.
    pub fn plan(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["plan", "--json"];
        a.extend_from_slice(args);
        let o = self.run_ok(&a);
        serde_json::from_str(&o.stdout).expect("plan --json prints JSON")
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

/// `{stage: status}` of a run record.
pub fn statuses(run: &serde_json::Value) -> BTreeMap<String, String> {
    run["stages"]
        .as_object()
        .expect("stages object")
        .iter()
        .map(|(k, v)| (k.clone(), v["status"].as_str().unwrap_or("?").to_string()))
        .collect()
}

/// `[(name, status)]` literal helper.
pub fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// A small pipeline on built-in data: a BPE tokenizer and two tokenised datasets, one of them
/// downstream of a second dataset. Fast enough for tests, real stages throughout.
pub const SMALL_RECIPE: &str = r#"[recipe]
name = "itest"
seed = 7
description = "integration test"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 300 }

[datasets.chat]
source = "builtin:arithmetic"
format = "sharegpt"
builtin = { count = 200, seed = 2 }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 400

[stages.pre]
kind = "prepare"
tokenizer = "tok"
data = "text"
max_seq_len = 64

[stages.sft_data]
kind = "prepare"
tokenizer = "tok"
data = "chat"
max_seq_len = 64
"#;
