//! `mmrun chat` through the binary: one-shot (`-p`, piped stdin), the interactive loop with
//! multi-turn history, `/reset`, `/save`, thinking and tool calls, sampling flags and seeds, and
//! Ctrl-C stopping an answer but not the session. The models are tiny real MiniMinds from
//! `mmrun::testutil`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

fn mmrun(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmrun"));
    c.current_dir(dir).env("MMRUN_HOME", dir.join("home")).env("MMRUN_RUNS_DIR", dir.join("runs"));
    c
}

fn run(dir: &std::path::Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child =
        mmrun(dir).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn one_shot_piped_and_interactive_chat() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    mmrun::infer::testmodels::script_model(&d.join("plain"), &["Hello", " there!"]).unwrap();
    mmrun::infer::testmodels::script_model(&d.join("think"), &["Let me think.", "</think>", "The answer is 4."])
        .unwrap();
    mmrun::infer::testmodels::script_model(
        &d.join("tools"),
        &["<tool_call>", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "</tool_call>"],
    )
    .unwrap();

    // One-shot with -p, and from piped stdin (not a terminal: no colour codes).
    let (code, out, err) = run(d, &["chat", "plain", "-p", "hi", "--temperature", "0"], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Hello there!\n");
    let (code, out, _) = run(d, &["chat", "plain", "--temperature", "0"], "a question\nover two lines\n");
    assert_eq!((code, out.as_str()), (0, "Hello there!\n"));

    // Thinking is marked (dimmed on a terminal), or hidden on request; tool calls shown as such.
    let (_, out, _) = run(d, &["chat", "think", "--think", "-p", "2+2?", "--temperature", "0"], "");
    assert_eq!(out, "<think>\nLet me think.\n</think>\nThe answer is 4.\n");
    let (_, out, _) = run(d, &["chat", "think", "--think", "--hide-thinking", "-p", "2+2?", "--temperature", "0"], "");
    assert_eq!(out, "The answer is 4.\n");
    let (_, out, _) = run(d, &["chat", "tools", "-p", "weather?", "--temperature", "0"], "");
    assert_eq!(out, "\n[tool call] get_weather({\"city\":\"Paris\"})\n\n");

    // Interactive: two turns, /save, /reset, another turn, /save again.
    let (code, out, err) = run(
        d,
        &["chat", "plain", "-i", "--system", "Be brief.", "--temperature", "0"],
        "hi\nhow are you?\n/save one.json\n/reset\nagain\n/save two.json\n/bogus\n/exit\n",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Hello there!\nHello there!\nHello there!\n");
    assert!(err.contains("unknown command /bogus"), "{err}");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("one.json")).unwrap()).unwrap();
    let roles: Vec<&str> = saved["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(saved["messages"][4]["content"], "Hello there!");
    let two: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("two.json")).unwrap()).unwrap();
    assert_eq!(two["messages"].as_array().unwrap().len(), 3, "after /reset only the system prompt stays: {two}");
    assert_eq!(two["messages"][1]["content"], "again");

    // A bad model reference says what it tried.
    let (code, _, err) = run(d, &["chat", "nowhere"], "");
    assert_eq!(code, 1);
    assert!(err.contains("model 'nowhere' not found; tried"), "{err}");
}

#[test]
fn seeds_reproduce_answers_and_ctrl_c_stops_only_the_answer() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    mmrun::infer::testmodels::random_model(&d.join("noise")).unwrap();
    let sample = |seed: &str| {
        let args = [
            "chat",
            "noise",
            "-p",
            "hello",
            "--temperature",
            "1",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--repetition-penalty",
            "1.1",
            "--max-tokens",
            "12",
            "--seed",
            seed,
        ];
        let (code, out, err) = run(d, &args, "");
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("[reached --max-tokens 12]"), "{err}");
        out
    };
    assert_eq!(sample("5"), sample("5"));
    assert_ne!(sample("5"), sample("6"));

    // Interactive, a long answer: Ctrl-C stops it, the session goes on, the partial answer is kept.
    let mut child = mmrun(d)
        .args(["chat", "noise", "-i", "--max-tokens", "30000", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"tell me everything\n").unwrap();
    stdin.flush().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap(); // the answer is streaming
                                            // Keep reading so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        rest
    });
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc_kill(child.id() as i32, 2) }, 0);
    let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let stopped = err_lines.by_ref().map(|l| l.unwrap()).find(|l| l.contains("[stopped]"));
    assert!(stopped.is_some(), "Ctrl-C stops the answer");
    stdin.write_all(b"/save s.json\n/exit\n").unwrap();
    drop(stdin);
    drain.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the session ends normally: {status}");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
    let answer = saved["messages"][1]["content"].as_str().unwrap();
    assert!(!answer.is_empty());
    assert!(answer.len() < 30000, "stopped well before max-tokens");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
