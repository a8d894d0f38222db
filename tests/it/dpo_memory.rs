//! DPO's memory does not grow with the number of preference pairs: the pairs stream from the
//! memory-mapped shards, and the final evaluation keeps host numbers, not autograd graphs (which
//! cost about 6 MB a pair before: 730 MB peak at 100 pairs, 5.2 GB at 800).
//!
//! Peak RSS is measured per child process with `wait4`, so tests running in parallel do not mix.

use crate::common;

use common::Sandbox;

const RECIPE: &str = r#"
[recipe]
name = "dpomem"
seed = 1
device = "cpu"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 300, seed = 1, max_operand = 12 }

[datasets.pairs]
source = "builtin:arithmetic"
format = "dpo"
builtin = { count = 50, seed = 4, max_operand = 12 }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 64
batch_size = 8
max_steps = 1

[stages.dpo]
kind = "dpo"
from = "base"
data = "pairs"
max_seq_len = 96
batch_size = 8
max_steps = 2
"#;

/// Run `mmrun args…` to completion; its exit code and peak resident set in MiB.
fn peak_rss_mib(sb: &Sandbox, args: &[&str]) -> (i32, f64) {
    let child = sb.command(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn();
    let pid = child.expect("spawn mmrun").id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: `rusage` is plain data filled in by the kernel; `pid` is our own unreaped child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "mmrun died by a signal");
    (libc::WEXITSTATUS(status), usage.ru_maxrss as f64 / 1024.0)
}

#[test]
fn dpo_peak_memory_does_not_grow_with_the_number_of_pairs() {
    let sb = Sandbox::new();
    sb.write("r.toml", RECIPE);
    // Build tokenizer and base model first, so the two measured runs run the DPO stage alone.
    assert_eq!(peak_rss_mib(&sb, &["r.toml"]).0, 0);
    let (code, small) = peak_rss_mib(&sb, &["r.toml", "--set", "stages.dpo.beta=0.2"]);
    assert_eq!(code, 0);
    let (code, large) = peak_rss_mib(&sb, &["r.toml", "--set", "datasets.pairs.builtin.count=400"]);
    assert_eq!(code, 0);
    eprintln!("dpo peak RSS: {small:.0} MiB at 50 pairs, {large:.0} MiB at 400 pairs");
    // 350 more pairs cost ~2 GiB before the fix; allocator noise is a few MiB.
    assert!(
        large - small < 64.0,
        "DPO memory grew with the dataset: {small:.0} MiB at 50 pairs, {large:.0} MiB at 400"
    );
}
