//! Progress bars (indicatif) with rate and ETA; hidden when stderr is not a terminal, so test
//! output and CI logs stay clean. Every long step (hashing, tokenising, training) uses these.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// Whether progress bars are drawn: stderr is a terminal and `MMRUN_NO_PROGRESS` is not set.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("MMRUN_NO_PROGRESS").is_none()
}

fn target() -> ProgressDrawTarget {
    if enabled() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar over `total` items (`unit` e.g. "tok", "step", "rec") showing position, rate and ETA.
pub fn bar(total: u64, msg: &str, unit: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), target());
    let template = format!("{{msg:>12}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} ETA {{eta}}");
    pb.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    pb.set_message(msg.to_string());
    pb
}

/// A bar over `total` bytes with throughput and ETA (hashing, downloads).
pub fn bytes_bar(total: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), target());
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// A spinner for steps of unknown length.
pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, target());
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

#[cfg(test)]
mod tests {
    #[test]
    fn bars_are_usable_when_hidden() {
        // In tests stderr is not a terminal: bars must still count without drawing anything.
        let b = super::bar(10, "train", "step");
        b.inc(3);
        assert_eq!(b.position(), 3);
        let s = super::spinner("x");
        s.finish_and_clear();
        super::bytes_bar(5, "h").finish_and_clear();
    }
}
