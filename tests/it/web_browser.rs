//! The web page of `mmrun serve` in a real browser: headless Chromium driven over the Chrome
//! DevTools Protocol types a message, sees the streamed answer, and visits the runs pages.
//!
//! The CDP client is the few commands this needs over a WebSocket (tungstenite), instead of a
//! generated CDP crate whose bindings take minutes to compile. Without Chromium the test skips
//! with a notice, and fails under `MMRUN_REQUIRE_CHROMIUM=1` (CI installs it with
//! `scripts/install-chromium.sh`).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromium() -> Option<String> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(c.to_string());
        }
    }
    if std::env::var("MMRUN_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("Chromium is required (MMRUN_REQUIRE_CHROMIUM=1) but not installed; run scripts/install-chromium.sh");
    }
    eprintln!("SKIP: Chromium not found (scripts/install-chromium.sh installs it)");
    None
}

/// Start a child and return it with the first stderr line containing `marker` (the rest of stderr
/// is drained in the background).
fn start(mut cmd: Command, marker: &str) -> (Kill, String) {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(marker) => break l,
            Some(_) => continue,
            None => panic!("{cmd:?} exited before printing {marker:?}"),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (Kill(child), line)
}

/// A CDP session on one page.
struct Page {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
}

impl Page {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(tungstenite::Message::text(json!({"id": id, "method": method, "params": params}).to_string()))
            .unwrap();
        loop {
            let msg = self.ws.read().expect("CDP read");
            let Ok(text) = msg.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, js: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": js, "returnByValue": true, "awaitPromise": true}));
        r["result"]["value"].clone()
    }

    /// Evaluate `js` until it returns something truthy (the page works asynchronously).
    fn wait_for(&mut self, js: &str) -> Value {
        for _ in 0..400 {
            let v = self.eval(js);
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("timed out waiting for {js}; page text: {}", self.eval("document.body.innerText"));
    }
}

/// Type `text` into the chat box and press Enter; wait until the answer has finished streaming.
fn send(page: &mut Page, text: &str) {
    page.eval("document.querySelector('#input').focus()");
    page.call("Input.insertText", json!({"text": text}));
    for kind in ["keyDown", "keyUp"] {
        page.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}),
        );
    }
    page.wait_for(&format!("[...document.querySelectorAll('.msg.user')].some(m => m.textContent == {})", json!(text)));
    page.wait_for("document.querySelector('#go').textContent == 'Send'");
}

/// The last answer's parts, as the page shows them.
const LAST: &str = "(() => { const a = [...document.querySelectorAll('.msg.assistant')].pop(); \
    const d = a.querySelector('details'); \
    return {content: a.querySelector('.content').textContent, meta: a.querySelector('.meta').textContent, \
            thinking: d.hidden ? null : d.querySelector('.reasoning').textContent, open: d.open, \
            tools: [...a.querySelectorAll('.tool')].map(t => t.textContent)}; })()";

/// A recipe small enough for a test, with curves (pretraining) and an eval table with generations.
const RUN_RECIPE: &str = r#"[recipe]
name = "webrun"
seed = 3
device = "cpu"
[model]
preset = "tiny"
[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 100 }
[datasets.test]
source = "builtin:arithmetic"
format = "prompt_answer"
builtin = { count = 4, seed = 3, split = "test" }
[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 300
[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 32
batch_size = 4
max_steps = 6
[stages.report]
kind = "eval"
models = ["base"]
data = ["test"]
prompts = ["What is 2 plus 3?"]
generation = { max_new_tokens = 4 }
"#;

#[test]
fn chat_page_streams_answers_and_runs_pages_show_runs_and_a_diff() {
    let Some(chrome) = chromium() else { return };
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let models = mmrun::infer::testmodels::script_model;
    models(&d.join("plain"), &["Hello", " there!"]).unwrap();
    models(&d.join("think"), &["Let me think.", "</think>", "The answer is 4."]).unwrap();
    models(
        &d.join("tools"),
        &["<tool_call>", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "</tool_call>"],
    )
    .unwrap();
    // Two real (tiny) runs for the runs pages: the second trains two more steps.
    std::fs::write(d.join("r.toml"), RUN_RECIPE).unwrap();
    let env = |c: &mut Command| {
        c.current_dir(d).env("MMRUN_HOME", d.join("home")).env("MMRUN_RUNS_DIR", d.join("runs"));
    };
    for set in ["stages.base.max_steps=6", "stages.base.max_steps=8"] {
        let mut run = Command::new(env!("CARGO_BIN_EXE_mmrun"));
        env(&mut run);
        let out = run.args(["r.toml", "--set", set]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut runs: Vec<String> =
        std::fs::read_dir(d.join("runs")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "{runs:?}");

    let mut serve = Command::new(env!("CARGO_BIN_EXE_mmrun"));
    env(&mut serve);
    serve.args(["serve", "plain", "think", "tools", "--port", "0"]);
    let (_server, line) = start(serve, " on http://");
    let base = format!("http://{}", line.split(" on http://").nth(1).unwrap().split_whitespace().next().unwrap());

    let mut browser = Command::new(chrome);
    browser.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-port=0",
        &format!("--user-data-dir={}", d.join("profile").display()),
        "about:blank",
    ]);
    let (_browser, line) = start(browser, "DevTools listening on ");
    let ws_browser = line.split("DevTools listening on ").nth(1).unwrap().trim().to_string();
    let http = ws_browser.replace("ws://", "http://");
    let http = &http[..http.find("/devtools").unwrap()];
    let list: Value = serde_json::from_str(
        &ureq::get(format!("{http}/json/list")).call().unwrap().body_mut().read_to_string().unwrap(),
    )
    .unwrap();
    let page_ws = list.as_array().unwrap().iter().find(|t| t["type"] == "page").unwrap()["webSocketDebuggerUrl"]
        .as_str()
        .unwrap()
        .to_string();
    let (ws, _) = tungstenite::connect(page_ws).expect("CDP websocket");
    let mut page = Page { ws, next: 0 };

    // A phone screen: the page must fit its width.
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": true}),
    );

    // Chat: the model list loads, we type a message and press Enter, the answer streams in.
    page.call("Page.navigate", json!({"url": format!("{base}/")}));
    page.wait_for("document.querySelector('#model') && document.querySelector('#model').options.length == 3");
    assert_eq!(page.eval("document.querySelector('#model').value"), "plain");
    assert!(page.eval("document.documentElement.scrollWidth").as_u64().unwrap() <= 390, "wider than a phone");
    page.eval("document.querySelector('#temperature').value = '0'");
    send(&mut page, "hi there");
    let last = page.eval(LAST);
    assert_eq!(last["content"], "Hello there!");
    assert!(last["meta"].as_str().unwrap().contains("2 tokens"), "{last}");
    assert_eq!(last["thinking"], Value::Null);

    // Thinking arrives in a collapsed block above the answer.
    page.eval("document.querySelector('#model').value = 'think'; document.querySelector('#thinking').checked = true");
    send(&mut page, "what is 2 plus 2?");
    let last = page.eval(LAST);
    assert_eq!(last["thinking"], "Let me think.", "{last}");
    assert_eq!(last["open"], false);
    assert_eq!(last["content"], "The answer is 4.");

    // A tool call is shown as a card with its name and arguments.
    page.eval(
        r#"document.querySelector('#model').value = 'tools'; document.querySelector('#thinking').checked = false;
           document.querySelector('#tools').value = '[{"type":"function","function":{"name":"get_weather","parameters":{}}}]'"#,
    );
    send(&mut page, "weather in Paris?");
    let last = page.eval(LAST);
    let cards = last["tools"].as_array().unwrap();
    assert_eq!(cards.len(), 1, "{last}");
    let card = cards[0].as_str().unwrap();
    assert!(card.contains("get_weather") && card.contains("Paris"), "{card}");

    // Nothing was loaded from anywhere but the server.
    let hosts =
        page.eval("[...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).host))].join(',')");
    assert!(hosts.as_str().unwrap().split(',').all(|h| h.is_empty() || base.ends_with(h)), "{hosts}");

    // Runs: the list shows both runs; a run's page shows its stages, curves, eval table and
    // generations.
    page.call("Page.navigate", json!({"url": format!("{base}/#/runs")}));
    page.wait_for(&format!(
        "document.body.innerText.includes('{}') && document.body.innerText.includes('{}')",
        runs[0], runs[1]
    ));
    page.eval(&format!("location.hash = '#/run/{}'", runs[1]));
    page.wait_for("document.querySelector('h3') && document.body.innerText.includes('tokenizer')");
    let text = page.eval("document.body.innerText").as_str().unwrap().to_string();
    assert!(text.contains("succeeded") && text.contains("eval report") && text.contains("What is 2 plus 3?"), "{text}");
    let charts = page.eval("[...document.querySelectorAll('svg[aria-label]')].map(s => s.getAttribute('aria-label'))");
    assert!(charts.as_array().unwrap().iter().any(|c| c.as_str().unwrap().starts_with("base loss")), "{charts}");

    // Diff: the text diff and both runs side by side.
    page.eval(&format!("location.hash = '#/diff/{}/{}'", runs[0], runs[1]));
    page.wait_for("document.querySelectorAll('.grid > .panel').length == 3");
    let diff = page.eval("document.querySelector('.grid pre').textContent").as_str().unwrap().to_string();
    assert!(diff.contains(&format!("A: {}", runs[0])) && diff.contains(&format!("B: {}", runs[1])), "{diff}");
    assert!(diff.contains("max_steps"), "{diff}");
    let _ = page.ws.close(None);
}
