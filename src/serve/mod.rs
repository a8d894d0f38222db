//! `mmrun serve <model>…`: an OpenAI-compatible HTTP API (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`, `/health`) and the web page, on axum.
//!
//! The HTTP side is async (tokio); the candle models live on the [`crate::infer::engine`] thread,
//! which batches every active request into one forward per decoding step. Handlers render the
//! prompt, validate it, and queue it (a full queue is a 503 with `Retry-After`); the answer comes
//! back as engine events, which are turned into one JSON response or into server-sent events.
//! When a streaming client goes away, its event receiver is dropped and the engine stops that
//! request at its next step.

pub mod openai;
pub mod web;

use crate::infer::engine::{Engine, EngineLimits, GenEvent, GenRequest, SubmitError};
use crate::infer::parse::{OutputParser, Piece};
use crate::infer::ModelInfo;
use crate::model::generate::FinishReason;
use crate::model::sampling::SamplingParams;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use openai::{ApiError, ChatRequest, CommonFields, CompletionRequest};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// `mmrun serve` options.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Models to serve: `<run>:<stage>` (see `mmrun show`), model folders, or `hf://<owner>/<name>`.
    #[arg(required = true)]
    pub models: Vec<String>,
    /// Address to bind (127.0.0.1: only this machine; 0.0.0.0 exposes it, set --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8998)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/ requests.
    #[arg(long, env = "MMRUN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Largest `max_tokens` a request may ask for (also the default).
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Requests waiting to start before new ones get 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most sequences decoded together per model.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Compute precision of generation: `f32`, `bf16` (bf16 weights and KV cache, f32
    /// accumulation: faster, as decoding is bound by reading weights) or `auto` (bf16 where a
    /// recipe's `precision = "auto"` trains in bf16 on this CPU).
    #[arg(long, default_value = "f32", value_parser = crate::infer::parse_precision)]
    pub precision: crate::recipe::Precision,
}

/// What every handler shares.
pub struct AppState {
    engine: Engine,
    models: Vec<ModelInfo>,
    api_key: Option<String>,
    max_tokens: usize,
    created: u64,
    runs: Option<RunsDir>,
}

/// The runs directory the read-only runs pages show.
#[derive(Clone, Debug)]
pub struct RunsDir {
    /// Run records.
    pub runs_dir: std::path::PathBuf,
    /// The cache (eval reports).
    pub home: std::path::PathBuf,
}

/// Most choices one request may ask for.
const MAX_N: usize = 8;

/// The router over shared state.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(web::page))
        .route("/api/runs", get(web::list))
        .route("/api/runs/{id}", get(web::run))
        .route("/api/diff", get(web::diff))
        .route("/health", get(health))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(max_body, drain_oversized))
        .with_state(state)
}

/// The most of an oversized body [`drain_oversized`] reads before answering.
const DRAIN_CAP: usize = 64 << 20;

/// Answer a body declared larger than `--max-body` with 413 only after reading it (up to
/// [`DRAIN_CAP`]): answering and closing while the client is still sending made the client fail
/// its write (a broken pipe) or lose the answer to the connection's reset, instead of reading the
/// error.
async fn drain_oversized(
    State(max_body): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    match declared {
        Some(len) if len > max_body => {
            if len <= DRAIN_CAP {
                // Only to let the client finish sending; what it sent is not used.
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_CAP).await;
            }
            ApiError {
                status: 413,
                message: format!(
                    "the request body ({len} bytes) is larger than the server's --max-body ({max_body} bytes)"
                ),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// `mmrun serve`: load the models (`args.models`, resolved), start the engine, serve until Ctrl-C.
pub fn run(args: ServeArgs, models: &[crate::infer::ModelRef], runs: RunsDir) -> anyhow::Result<()> {
    let mut loaded = Vec::new();
    for r in models {
        if loaded.iter().any(|l: &crate::infer::LoadedModel| l.name == r.name) {
            anyhow::bail!("two models are named '{}'; serve them from separate processes or folders", r.name);
        }
        loaded.push(crate::infer::LoadedModel::load_in(r, args.precision)?);
    }
    let (engine, models, _worker) =
        crate::infer::start(loaded, EngineLimits { queue: args.queue, max_batch: args.max_batch })?;
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let state = Arc::new(AppState {
        engine,
        models,
        api_key: args.api_key.clone(),
        max_tokens: args.max_tokens,
        created,
        runs: Some(runs),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_io().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr}: {e} (is another server using the port? try --port)")
        })?;
        let local = listener.local_addr()?;
        eprintln!("serving {} on http://{local} (OpenAI API under /v1, web chat at /); Ctrl-C stops", names.join(", "));
        if args.api_key.is_none() && !local.ip().is_loopback() {
            eprintln!("warning: listening beyond this machine without --api-key; anyone who can reach it can use it");
        }
        let app = router(state, args.max_body);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.body())).into_response();
        if self.status == 503 {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError {
        status: 401,
        message: "missing or wrong API key: send `Authorization: Bearer <key>` with the server's --api-key".into(),
        kind: "authentication_error",
        param: None,
        code: Some("invalid_api_key"),
    })
}

async fn health(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let st = &s.engine.stats;
    axum::Json(json!({
        "status": "ok",
        "models": s.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        "active": st.active.load(Ordering::Relaxed),
        "steps": st.steps.load(Ordering::Relaxed),
        "peak_batch": st.peak_batch.load(Ordering::Relaxed),
        "cancelled": st.cancelled.load(Ordering::Relaxed),
    }))
}

async fn list_models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(&s, &headers)?;
    let data: Vec<Value> = s
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": s.created, "owned_by": "mmrun"}))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// Parse a JSON body into `T`, with OpenAI errors for bad JSON and bad fields.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status().as_u16(),
        message: format!("could not read the request body: {}", e.body_text()),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError {
        status: 400,
        message: format!("the request body is not a valid request: {e}"),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })
}

/// Which model a request names.
fn pick_model<'a>(s: &'a AppState, name: &Option<String>) -> Result<(usize, &'a ModelInfo), ApiError> {
    match name.as_deref() {
        None | Some("") if s.models.len() == 1 => Ok((0, &s.models[0])),
        None | Some("") => {
            Err(ApiError::bad("model", "this server has several models; name one (GET /v1/models lists them)"))
        }
        Some(n) => s.models.iter().enumerate().find(|(_, m)| m.name == n).ok_or_else(|| ApiError {
            status: 404,
            message: format!(
                "the model '{n}' does not exist on this server; it serves: {}",
                s.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }),
    }
}

/// A validated generation job: what to run, `n` times.
struct Job {
    model: usize,
    name: String,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    seed: u64,
    stop_ids: Vec<u32>,
    stop: Vec<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
    thinking: bool,
}

fn make_job(
    s: &AppState,
    c: CommonFields,
    model: usize,
    info: &ModelInfo,
    prompt: Vec<u32>,
    thinking: bool,
) -> Result<Job, ApiError> {
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(s.max_tokens);
    if max_tokens == 0 || max_tokens > s.max_tokens {
        return Err(ApiError::bad("max_tokens", format!("max_tokens must be 1 to {} on this server", s.max_tokens)));
    }
    if prompt.len() >= info.max_positions {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(
                "messages",
                format!(
                    "the prompt is {} tokens; model '{}' takes at most {} tokens in all. Shorten the conversation",
                    prompt.len(),
                    info.name,
                    info.max_positions - 1
                ),
            )
        });
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "top_p must be in (0, 1]"));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::bad("n", format!("n must be 1 to {MAX_N}")));
    }
    // One penalty kind in the sampler: the OpenAI additive penalties map onto it.
    let additive = [c.presence_penalty, c.frequency_penalty].into_iter().flatten().reduce(f32::max);
    let repetition_penalty = match (c.repetition_penalty, additive) {
        (Some(r), _) if r > 0.0 => r,
        (Some(_), _) => return Err(ApiError::bad("repetition_penalty", "repetition_penalty must be positive")),
        (None, Some(p)) if p > 0.0 => 1.0 + p,
        _ => 1.0,
    };
    let stop = c.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::bad("stop", "at most 4 stop sequences"));
    }
    Ok(Job {
        model,
        name: info.name.clone(),
        prompt,
        max_tokens,
        sampling: SamplingParams { temperature, top_k: c.top_k.unwrap_or(0), top_p, repetition_penalty },
        seed: c.seed.unwrap_or_else(rand::random),
        stop_ids: if c.ignore_eos { Vec::new() } else { info.stop_ids() },
        stop,
        n,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        thinking,
    })
}

/// Queue the job's `n` requests; their events arrive on one channel, tagged by choice index.
fn submit(s: &AppState, job: &Job) -> Result<UnboundedReceiver<(usize, GenEvent)>, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..job.n {
        let req = GenRequest {
            model: job.model,
            prompt: job.prompt.clone(),
            max_tokens: job.max_tokens,
            sampling: job.sampling.clone(),
            seed: job.seed.wrapping_add(i as u64),
            stop_ids: job.stop_ids.clone(),
            stop_strings: job.stop.clone(),
            events: tx.clone(),
            tag: i,
            cancel: Default::default(),
        };
        s.engine.submit(req).map_err(|e| match e {
            SubmitError::Full => ApiError {
                status: 503,
                message: "the server is busy (its queue is full); retry after a second".into(),
                kind: "server_error",
                param: None,
                code: Some("overloaded"),
            },
            SubmitError::Closed => ApiError {
                status: 500,
                message: "the generation engine stopped; restart the server".into(),
                kind: "server_error",
                param: None,
                code: None,
            },
        })?;
    }
    Ok(rx)
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    check_key(&s, &headers)?;
    let req: ChatRequest = parse_body(body)?;
    let (model, info) = pick_model(&s, &req.common.model)?;
    let messages = openai::to_messages(req.messages)?;
    let thinking = req.chat_template_kwargs.and_then(|k| k.enable_thinking).unwrap_or(false);
    let offer_tools = !matches!(&req.tool_choice, Some(Value::String(c)) if c == "none");
    let tools = req.tools.filter(|t| offer_tools && !t.is_empty());
    let prompt = info
        .chat_prompt(&messages, tools.as_deref(), thinking)
        .map_err(|e| ApiError::bad("messages", format!("could not apply the chat template: {e:#}")))?;
    let job = make_job(&s, req.common, model, info, prompt, thinking)?;
    let rx = submit(&s, &job)?;
    Ok(if job.stream { stream_response(job, rx, Kind::Chat) } else { collect_response(job, rx, Kind::Chat).await })
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    check_key(&s, &headers)?;
    let req: CompletionRequest = parse_body(body)?;
    let (model, info) = pick_model(&s, &req.common.model)?;
    let prompts = req.prompt.into_vec();
    let [text] = prompts.as_slice() else {
        return Err(ApiError::bad("prompt", "send one prompt per request"));
    };
    let prompt = info.raw_prompt(text).map_err(|e| ApiError::bad("prompt", format!("{e:#}")))?;
    let job = make_job(&s, req.common, model, info, prompt, false)?;
    let rx = submit(&s, &job)?;
    Ok(if job.stream {
        stream_response(job, rx, Kind::Completion)
    } else {
        collect_response(job, rx, Kind::Completion).await
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

fn finish_name(f: FinishReason, tool_calls: bool) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ if tool_calls => "tool_calls",
        _ => "stop",
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One choice being assembled.
struct Choice {
    parser: OutputParser,
    content: String,
    reasoning: String,
    tool_calls: Vec<Value>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
}

impl Choice {
    fn new(job: &Job) -> Self {
        Self {
            parser: OutputParser::new(job.thinking),
            content: String::new(),
            reasoning: String::new(),
            tool_calls: vec![],
            finish: None,
            completion_tokens: 0,
        }
    }
}

async fn collect_response(job: Job, mut rx: UnboundedReceiver<(usize, GenEvent)>, kind: Kind) -> Response {
    let mut choices: Vec<Choice> = (0..job.n).map(|_| Choice::new(&job)).collect();
    let mut done = 0;
    while done < job.n {
        let Some((i, ev)) = rx.recv().await else { break };
        let c = &mut choices[i];
        let pieces = match ev {
            GenEvent::Text(t) if kind == Kind::Completion => {
                c.content.push_str(&t);
                continue;
            }
            GenEvent::Text(t) => c.parser.push(&t),
            GenEvent::Done { finish, completion_tokens, .. } => {
                c.finish = Some(finish);
                c.completion_tokens = completion_tokens;
                done += 1;
                c.parser.finish()
            }
            GenEvent::Error(e) => {
                return ApiError { status: 500, message: e, kind: "server_error", param: None, code: None }
                    .into_response()
            }
        };
        for p in pieces {
            match p {
                Piece::Content(t) => c.content.push_str(&t),
                Piece::Reasoning(t) => c.reasoning.push_str(&t),
                Piece::ToolCall { name, arguments } => c.tool_calls.push(json!({
                    "id": new_id("call"), "type": "function",
                    "function": {"name": name, "arguments": arguments}
                })),
            }
        }
    }
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let out: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = finish_name(c.finish.unwrap_or(FinishReason::Stop), !c.tool_calls.is_empty());
            if kind == Kind::Completion {
                return json!({"index": i, "text": c.content, "logprobs": null, "finish_reason": finish});
            }
            let mut msg = json!({"role": "assistant", "content": c.content});
            if !c.reasoning.is_empty() {
                msg["reasoning_content"] = json!(c.reasoning);
            }
            if !c.tool_calls.is_empty() {
                if c.content.is_empty() {
                    msg["content"] = Value::Null;
                }
                msg["tool_calls"] = json!(c.tool_calls);
            }
            json!({"index": i, "message": msg, "logprobs": null, "finish_reason": finish})
        })
        .collect();
    let (id, object) = match kind {
        Kind::Chat => (new_id("chatcmpl"), "chat.completion"),
        Kind::Completion => (new_id("cmpl"), "text_completion"),
    };
    axum::Json(json!({
        "id": id, "object": object, "created": now(), "model": job.name,
        "choices": out, "usage": openai::usage(job.prompt.len(), completion)
    }))
    .into_response()
}

/// Server-sent events, chunk for chunk as OpenAI streams them.
fn stream_response(job: Job, rx: UnboundedReceiver<(usize, GenEvent)>, kind: Kind) -> Response {
    let (id, object) = match kind {
        Kind::Chat => (new_id("chatcmpl"), "chat.completion.chunk"),
        Kind::Completion => (new_id("cmpl"), "text_completion"),
    };
    let created = now();
    let n = job.n;
    let choices: Vec<Choice> = (0..n).map(|_| Choice::new(&job)).collect();
    // Every chunk carries `usage: null` when usage was asked for, as OpenAI does.
    let chunk = {
        let (id, name, usage) = (id.clone(), job.name.clone(), job.include_usage);
        move |choices: Vec<Value>, filled: Option<Value>| {
            let mut v = json!({"id": id, "object": object, "created": created, "model": name, "choices": choices});
            if usage {
                v["usage"] = filled.unwrap_or(Value::Null);
            }
            Event::default().data(v.to_string())
        }
    };
    let mut first: Vec<Event> = vec![];
    if kind == Kind::Chat {
        for i in 0..n {
            first.push(chunk(
                vec![json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})],
                None,
            ));
        }
    }
    struct St<F> {
        rx: UnboundedReceiver<(usize, GenEvent)>,
        choices: Vec<Choice>,
        tool_index: Vec<usize>,
        done: usize,
        pending: std::collections::VecDeque<Event>,
        finished: bool,
        chunk: F,
    }
    let st = St { rx, choices, tool_index: vec![0; n], done: 0, pending: first.into(), finished: false, chunk };
    let (prompt_tokens, include_usage) = (job.prompt.len(), job.include_usage);
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<Event, std::convert::Infallible>(e), st));
            }
            if st.finished {
                return None;
            }
            if st.done == st.choices.len() {
                st.finished = true;
                if include_usage {
                    let completion: usize = st.choices.iter().map(|c| c.completion_tokens).sum();
                    st.pending.push_back((st.chunk)(vec![], Some(openai::usage(prompt_tokens, completion))));
                }
                st.pending.push_back(Event::default().data("[DONE]"));
                continue;
            }
            let Some((i, ev)) = st.rx.recv().await else {
                st.finished = true;
                continue;
            };
            let c = &mut st.choices[i];
            let delta_chunk =
                |delta: Value| json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": null});
            match ev {
                GenEvent::Text(t) if kind == Kind::Completion => {
                    st.pending.push_back((st.chunk)(
                        vec![json!({"index": i, "text": t, "logprobs": null, "finish_reason": null})],
                        None,
                    ));
                }
                GenEvent::Text(t) => {
                    for p in c.parser.push(&t) {
                        let ev = piece_chunks(p, i, &mut st.tool_index[i], &mut c.tool_calls);
                        st.pending.extend(ev.into_iter().map(|d| (st.chunk)(vec![delta_chunk(d)], None)));
                    }
                }
                GenEvent::Done { finish, completion_tokens, .. } => {
                    if kind == Kind::Chat {
                        for p in c.parser.finish() {
                            let ev = piece_chunks(p, i, &mut st.tool_index[i], &mut c.tool_calls);
                            st.pending.extend(ev.into_iter().map(|d| (st.chunk)(vec![delta_chunk(d)], None)));
                        }
                    }
                    c.completion_tokens = completion_tokens;
                    st.done += 1;
                    let reason = finish_name(finish, !c.tool_calls.is_empty());
                    let fin = if kind == Kind::Chat {
                        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason})
                    } else {
                        json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason})
                    };
                    st.pending.push_back((st.chunk)(vec![fin], None));
                }
                GenEvent::Error(e) => {
                    let err = ApiError { status: 500, message: e, kind: "server_error", param: None, code: None };
                    st.pending.push_back(Event::default().data(err.body().to_string()));
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.finished = true;
                }
            }
        }
    });
    Sse::new(stream).into_response()
}

/// The deltas for one parsed piece: content, reasoning, or a tool call (its id and name first,
/// then the arguments).
fn piece_chunks(p: Piece, _choice: usize, next_tool: &mut usize, calls: &mut Vec<Value>) -> Vec<Value> {
    match p {
        Piece::Content(t) => vec![json!({"content": t})],
        Piece::Reasoning(t) => vec![json!({"reasoning_content": t})],
        Piece::ToolCall { name, arguments } => {
            let index = *next_tool;
            *next_tool += 1;
            let id = new_id("call");
            calls.push(json!({"id": id, "name": name}));
            vec![
                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}),
            ]
        }
    }
}
