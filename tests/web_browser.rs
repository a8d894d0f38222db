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

#[test]
fn chat_page_streams_an_answer_and_runs_pages_show_a_run() {
    let Some(chrome) = chromium() else { return };
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    mmrun::infer::testmodels::script_model(&d.join("plain"), &["Hello", " there!"]).unwrap();
    // A real (tiny) run for the runs pages.
    std::fs::write(
        d.join("r.toml"),
        "[recipe]\nname = \"webrun\"\n[datasets.text]\nsource = \"builtin:arithmetic\"\nformat = \"text\"\n\
         builtin = { count = 50 }\n[stages.tok]\nkind = \"tokenizer\"\ndata = [\"text\"]\nvocab_size = 300\n",
    )
    .unwrap();
    let env = |c: &mut Command| {
        c.current_dir(d).env("MMRUN_HOME", d.join("home")).env("MMRUN_RUNS_DIR", d.join("runs"));
    };
    let mut run = Command::new(env!("CARGO_BIN_EXE_mmrun"));
    env(&mut run);
    assert!(run.arg("r.toml").output().unwrap().status.success());
    let run_id = std::fs::read_dir(d.join("runs")).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();

    let mut serve = Command::new(env!("CARGO_BIN_EXE_mmrun"));
    env(&mut serve);
    serve.args(["serve", "plain", "--port", "0"]);
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

    // Chat: the model list loads, we type a message and press Enter, the answer streams in.
    page.call("Page.navigate", json!({"url": format!("{base}/")}));
    page.wait_for("document.querySelector('#model') && document.querySelector('#model').options.length");
    assert_eq!(page.eval("document.querySelector('#model').value"), "plain");
    page.eval("document.querySelector('#temperature').value = '0'; document.querySelector('#input').focus()");
    page.call("Input.insertText", json!({"text": "hi there"}));
    for kind in ["keyDown", "keyUp"] {
        page.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}),
        );
    }
    page.wait_for(
        "document.querySelector('.msg.user') && document.querySelector('.msg.user').textContent == 'hi there'",
    );
    let answer = page.wait_for(
        "(() => { const c = document.querySelector('.assistant .content'); return c && c.textContent == 'Hello there!' && c.textContent })()",
    );
    assert_eq!(answer, "Hello there!");
    page.wait_for("document.querySelector('#go').textContent == 'Send'");
    assert!(page.eval("document.querySelector('.assistant .meta').textContent").as_str().unwrap().contains("2 tokens"));
    // Nothing was loaded from anywhere but the server.
    let hosts =
        page.eval("[...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).host))].join(',')");
    assert!(hosts.as_str().unwrap().split(',').all(|h| h.is_empty() || base.ends_with(h)), "{hosts}");

    // Runs: the list shows the run; its page shows the stages.
    page.call("Page.navigate", json!({"url": format!("{base}/#/runs")}));
    page.wait_for(&format!("document.body.innerText.includes('{run_id}')"));
    page.eval(&format!("location.hash = '#/run/{run_id}'"));
    page.wait_for("document.querySelector('h3') && document.body.innerText.includes('tokenizer')");
    assert!(page.eval("document.body.innerText").as_str().unwrap().contains("succeeded"));
    let _ = page.ws.close(None);
}
