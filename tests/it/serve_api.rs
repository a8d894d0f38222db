//! `mmrun serve` against a real OpenAI client (async-openai) and raw HTTP on 127.0.0.1: plain,
//! streamed, tools, thinking, concurrent (batched), cancelled and bad requests. The models are
//! tiny real MiniMinds built by `mmrun::testutil` (a scripted one with known answers, and a
//! random one that talks until `max_tokens`).

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse};
use async_openai::Client;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PLAIN: &[&str] = &["Hello", " there!"];
const TOOL: &[&str] =
    &["<tool_call>", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "</tool_call>"];
const THINK: &[&str] = &["Let me think.", "</think>", "The answer is 4."];

/// Build the four test models and start `mmrun serve` on a free port with `extra` flags.
fn serve(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    mmrun::infer::testmodels::script_model(&p("plain"), PLAIN).unwrap();
    mmrun::infer::testmodels::script_model(&p("tools"), TOOL).unwrap();
    mmrun::infer::testmodels::script_model(&p("think"), THINK).unwrap();
    mmrun::infer::testmodels::random_model(&p("noise")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmrun"))
        .arg("serve")
        .args(["plain", "tools", "think", "noise"].map(p))
        .args(["--port", "0"])
        .args(extra)
        .current_dir(dir.path())
        .env("MMRUN_HOME", dir.path().join("home"))
        .env("MMRUN_RUNS_DIR", dir.path().join("runs"))
        .env_remove("MMRUN_API_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mmrun serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("mmrun serve exited before listening").unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base, _dir: dir }
}

/// The OpenAI client's reqwest is built without a bundled TLS crypto provider (as mmrun's own, see
/// Cargo.toml): install ring's once per test process before building one.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn client(s: &Server) -> Client<OpenAIConfig> {
    install_tls_provider();
    Client::with_config(OpenAIConfig::new().with_api_base(format!("{}/v1", s.base)).with_api_key("unused"))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// Raw POST: (status, headers' Retry-After, body text).
fn post_raw(s: &Server, path: &str, body: &str, auth: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = agent().post(format!("{}{path}", s.base)).header("Content-Type", "application/json");
    if let Some(k) = auth {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body).expect("request");
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), retry, resp.body_mut().read_to_string().unwrap())
}

fn health(s: &Server) -> Value {
    serde_json::from_str(
        &agent().get(format!("{}/health", s.base)).call().unwrap().body_mut().read_to_string().unwrap(),
    )
    .unwrap()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

async fn chat(c: &Client<OpenAIConfig>, body: Value) -> CreateChatCompletionResponse {
    c.chat().create_byot(body).await.expect("chat completion")
}

async fn chat_stream(c: &Client<OpenAIConfig>, body: Value) -> Vec<CreateChatCompletionStreamResponse> {
    let mut s = c.chat().create_stream_byot::<Value, CreateChatCompletionStreamResponse>(body).await.expect("stream");
    let mut out = vec![];
    while let Some(chunk) = s.next().await {
        out.push(chunk.expect("chunk"));
    }
    out
}

/// Raw streamed chunks (for fields the typed client does not model, like `reasoning_content`),
/// checking the SSE framing and the final `[DONE]`.
fn stream_raw(s: &Server, body: Value) -> Vec<Value> {
    let (status, _, text) = post_raw(s, "/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 200, "{text}");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_streamed_completions_seeds_and_stops() {
    let s = serve(&[]);
    let c = client(&s);
    let models = c.models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["plain", "tools", "think", "noise"]);

    // Plain: the scripted answer, with usage.
    let r = chat(&c, json!({"model": "plain", "messages": user("hi"), "temperature": 0})).await;
    assert_eq!(r.choices[0].message.content.as_deref(), Some("Hello there!"));
    assert_eq!(format!("{:?}", r.choices[0].finish_reason), "Some(Stop)");
    let u = r.usage.unwrap();
    assert_eq!(u.completion_tokens, 2);
    assert!(u.prompt_tokens > 3);
    assert_eq!(u.total_tokens, u.prompt_tokens + 2);

    // Streamed: role first, content deltas, finish, then usage when asked.
    let chunks = chat_stream(
        &c,
        json!({"model": "plain", "messages": user("hi"), "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(format!("{:?}", chunks[0].choices[0].delta.role), "Some(Assistant)");
    let text: String = chunks.iter().flat_map(|c| &c.choices).filter_map(|ch| ch.delta.content.clone()).collect();
    assert_eq!(text, "Hello there!");
    let fin: Vec<_> = chunks.iter().flat_map(|c| &c.choices).filter_map(|ch| ch.finish_reason).collect();
    assert_eq!(format!("{fin:?}"), "[Stop]");
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    assert_eq!(last.usage.as_ref().unwrap().completion_tokens, 2);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.usage.is_none()));

    // vLLM's `ignore_eos` keeps generating past the end of sequence, up to max_tokens.
    let r = chat(
        &c,
        json!({"model": "plain", "messages": user("hi"), "temperature": 0, "max_tokens": 6, "ignore_eos": true}),
    )
    .await;
    assert_eq!(format!("{:?}", r.choices[0].finish_reason), "Some(Length)");
    assert_eq!(r.usage.unwrap().completion_tokens, 6);

    // Completions on the random model: length-limited, usage counted.
    let (st, _, body) = post_raw(
        &s,
        "/v1/completions",
        &json!({"model": "noise", "prompt": "hello", "max_tokens": 5, "temperature": 0}).to_string(),
        None,
    );
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let greedy = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!greedy.is_empty());

    // A seed makes a sampled answer reproducible; n gives several choices.
    let sampled = |seed: u64| json!({"model": "noise", "messages": user("hello"), "max_tokens": 12, "temperature": 1.0, "seed": seed, "n": 2});
    let a = chat(&c, sampled(7)).await;
    let b = chat(&c, sampled(7)).await;
    let d = chat(&c, sampled(8)).await;
    let texts = |r: &CreateChatCompletionResponse| {
        r.choices.iter().map(|ch| ch.message.content.clone().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(texts(&a).len(), 2);
    assert_eq!(texts(&a), texts(&b));
    assert_ne!(texts(&a), texts(&d));
    assert_ne!(texts(&a)[0], texts(&a)[1], "each choice draws its own stream");

    // A stop string cuts the answer where it starts, even across token boundaries.
    let full = chat(&c, json!({"model": "noise", "messages": user("hello"), "max_tokens": 16, "temperature": 0})).await;
    let full = full.choices[0].message.content.clone().unwrap();
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = chat(
        &c,
        json!({"model": "noise", "messages": user("hello"), "max_tokens": 16, "temperature": 0, "stop": [stop]}),
    )
    .await;
    let want = &full[..full.find(&stop).unwrap()];
    assert_eq!(cut.choices[0].message.content.as_deref(), Some(want));
    assert_eq!(format!("{:?}", cut.choices[0].finish_reason), "Some(Stop)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_thinking_as_openai_sends_them() {
    let s = serve(&[]);
    let c = client(&s);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let r =
        chat(&c, json!({"model": "tools", "messages": user("Weather in Paris?"), "tools": tools, "temperature": 0}))
            .await;
    let ch = &r.choices[0];
    assert_eq!(format!("{:?}", ch.finish_reason), "Some(ToolCalls)");
    assert_eq!(ch.message.content, None);
    let calls = serde_json::to_value(ch.message.tool_calls.as_ref().unwrap()).unwrap();
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call"));

    // Streamed: a tool_calls delta with index, id and name, then the arguments; finish tool_calls.
    let chunks = chat_stream(
        &c,
        json!({"model": "tools", "messages": user("Weather?"), "tools": tools, "temperature": 0, "stream": true}),
    )
    .await;
    let deltas: Vec<Value> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|ch| ch.delta.tool_calls.as_ref())
        .flat_map(|t| serde_json::to_value(t).unwrap().as_array().unwrap().clone())
        .collect();
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert!(deltas[0]["id"].is_string());
    let args: String = deltas.iter().filter_map(|d| d["function"]["arguments"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"city": "Paris"}));
    let fin: Vec<_> = chunks.iter().flat_map(|c| &c.choices).filter_map(|ch| ch.finish_reason).collect();
    assert_eq!(format!("{fin:?}"), "[ToolCalls]");

    // The tool's answer goes back in a `tool` message; the conversation continues.
    let follow = json!({"model": "plain", "temperature": 0, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"sky\": \"sunny\"}"}]});
    assert_eq!(chat(&c, follow).await.choices[0].message.content.as_deref(), Some("Hello there!"));

    // Thinking on: reasoning_content apart from the answer, streamed and not.
    let think = json!({"model": "think", "messages": user("2+2?"), "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": true}});
    let (st, _, body) = post_raw(&s, "/v1/chat/completions", &think.to_string(), None);
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["reasoning_content"], "Let me think.");
    assert_eq!(v["choices"][0]["message"]["content"], "The answer is 4.");
    let mut streamed = think.clone();
    streamed["stream"] = json!(true);
    let chunks = stream_raw(&s, streamed);
    let field = |f: &str| -> String {
        chunks.iter().filter_map(|c| c["choices"][0]["delta"][f].as_str()).collect::<Vec<_>>().concat()
    };
    assert_eq!(field("reasoning_content"), "Let me think.");
    assert_eq!(field("content"), "The answer is 4.");
    let first_content =
        chunks.iter().position(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()));
    let last_reasoning = chunks.iter().rposition(|c| c["choices"][0]["delta"]["reasoning_content"].is_string());
    assert!(last_reasoning < first_content, "reasoning streams before the answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_join_one_batch_and_cancelled_ones_stop() {
    let s = serve(&[]);
    let c = client(&s);
    let prompts = ["hello", "what is the answer", "world 3", "hi"];
    let ask = |p: &str| json!({"model": "noise", "messages": user(p), "max_tokens": 24, "temperature": 0});
    let mut alone = vec![];
    for p in prompts {
        alone.push(chat(&c, ask(p)).await.choices[0].message.content.clone().unwrap());
    }
    assert_eq!(health(&s)["peak_batch"], 1, "one at a time so far");

    // A long streaming request is decoding; the others join its batch while it runs.
    let long =
        json!({"model": "noise", "messages": user("a long one"), "max_tokens": 1000, "temperature": 0, "stream": true});
    let mut stream = c.chat().create_stream_byot::<Value, CreateChatCompletionStreamResponse>(long).await.unwrap();
    stream.next().await.unwrap().unwrap();
    stream.next().await.unwrap().unwrap();
    let together = futures_util::future::join_all(prompts.iter().map(|p| chat(&c, ask(p)))).await;
    for (r, a) in together.iter().zip(&alone) {
        assert_eq!(r.choices[0].message.content.as_ref(), Some(a), "batched answers equal the answers alone");
    }
    let h = health(&s);
    assert!(h["peak_batch"].as_u64().unwrap() >= 2, "requests shared a forward: {h}");

    // The client goes away mid-answer: the server stops generating for it.
    drop(stream);
    let mut h = health(&s);
    for _ in 0..600 {
        if h["active"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        h = health(&s);
    }
    assert_eq!(h["active"], 0, "{h}");
    assert_eq!(h["cancelled"], 1, "{h}");
    let steps = h["steps"].as_u64().unwrap();
    assert!(steps < 1000, "the long request did not run to its 1000 tokens: {h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = serve(&["--max-tokens", "64", "--max-body", "100000"]);
    let c = client(&s);
    let err = |body: &str| -> (u16, Value) {
        let (st, _, text) = post_raw(&s, "/v1/chat/completions", body, None);
        (st, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    };
    let (st, v) = err("{not json");
    assert_eq!(st, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("not a valid request"), "{v}");

    // Through the real client: unknown model (404, model_not_found).
    let e = c.chat().create_byot::<Value, Value>(json!({"model": "gpt-9", "messages": user("hi")})).await.unwrap_err();
    match e {
        async_openai::error::OpenAIError::ApiError(a) => {
            assert_eq!(a.status_code.as_u16(), 404);
            assert_eq!(a.api_error.code.as_deref(), Some("model_not_found"));
            assert!(a.api_error.message.contains("plain, tools, think, noise"), "{}", a.api_error.message);
        }
        other => panic!("expected an API error, got {other}"),
    }
    let (st, v) = err(&json!({"model": "plain", "messages": user("hi"), "max_tokens": 65}).to_string());
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("max_tokens")), "{v}");
    let (st, v) = err(&json!({"model": "plain", "messages": []}).to_string());
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("messages")), "{v}");
    let (st, v) = err(&json!({"model": "plain", "messages": [{"role": "wizard", "content": "x"}]}).to_string());
    assert_eq!(st, 400, "{v}");
    let (st, v) = err(&json!({"model": "plain", "messages": user("hi"), "temperature": 5}).to_string());
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("temperature")), "{v}");
    // Longer than the model's positions (byte tokens: 'q' is not in the test tokenizer's merges).
    let (st, v) = err(&json!({"model": "plain", "messages": user(&"q ".repeat(33_000))}).to_string());
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("context_length_exceeded")), "{v}");
    // Bigger than --max-body.
    let (st, v) = err(&json!({"model": "plain", "messages": user(&"q".repeat(200_000))}).to_string());
    assert_eq!(st, 413, "{v}");
    assert!(v["error"]["message"].is_string());
    // Unknown fields are ignored.
    let r = chat(&c, json!({"model": "plain", "messages": user("hi"), "temperature": 0, "logit_bias": {}, "user": "me", "whatever": 1})).await;
    assert_eq!(r.choices[0].message.content.as_deref(), Some("Hello there!"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_a_full_queue() {
    let s = serve(&["--api-key", "sekret", "--queue", "1", "--max-batch", "1"]);
    let body = json!({"model": "plain", "messages": user("hi"), "temperature": 0}).to_string();
    let (st, _, text) = post_raw(&s, "/v1/chat/completions", &body, None);
    assert_eq!(st, 401, "{text}");
    assert!(text.contains("invalid_api_key"));
    let (st, _, _) = post_raw(&s, "/v1/chat/completions", &body, Some("wrong"));
    assert_eq!(st, 401);
    let (st, _, text) = post_raw(&s, "/v1/chat/completions", &body, Some("sekret"));
    assert_eq!(st, 200, "{text}");
    assert!(agent().get(format!("{}/health", s.base)).call().unwrap().status() == 200, "health needs no key");

    // One request decoding (batch of 1), one waiting in the queue of 1: the next gets 503.
    install_tls_provider();
    let c = Client::with_config(OpenAIConfig::new().with_api_base(format!("{}/v1", s.base)).with_api_key("sekret"));
    let long =
        |p: &str| json!({"model": "noise", "messages": user(p), "max_tokens": 1000, "temperature": 0, "stream": true});
    let mut a = c.chat().create_stream_byot::<Value, CreateChatCompletionStreamResponse>(long("a")).await.unwrap();
    a.next().await.unwrap().unwrap();
    a.next().await.unwrap().unwrap();
    let b = c.chat().create_stream_byot::<Value, CreateChatCompletionStreamResponse>(long("b")).await.unwrap();
    let (st, retry, text) = post_raw(&s, "/v1/chat/completions", &body, Some("sekret"));
    assert_eq!(st, 503, "{text}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(text.contains("\"overloaded\""), "{text}");
    drop(a);
    drop(b);
    // Once they are gone the server answers again.
    let mut last = (0, None, String::new());
    for _ in 0..600 {
        last = post_raw(&s, "/v1/chat/completions", &body, Some("sekret"));
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 200, "{}", last.2);
}
