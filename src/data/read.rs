//! Readers and formats: files (jsonl / json array / txt) → typed [`Example`]s.
//!
//! Framing is decided per file: `.txt` read as `text` gives one document per non-blank line; any other
//! combination parses JSON — a file whose first non-blank byte is `[` is a JSON array, otherwise JSON
//! Lines (so `.json` files that are really JSONL, and JSONL inside `.txt` read with a non-text format,
//! both work). A UTF-8 BOM and CRLF line endings are accepted. Invalid UTF-8 is never replaced: it
//! is a bad record naming the line and byte.
//!
//! Two kinds of problem:
//! * **malformed** records (invalid JSON or UTF-8, missing fields, wrong types, unknown roles, a DPO
//!   pair without a preference): an error `file:line: problem` by default, or with
//!   `on_bad_record = "skip"` skipped, counted and appended to the run's `rejects.jsonl`;
//! * **empty** records (well-formed but nothing to train on: no assistant reply, empty text): always
//!   skipped, counted, logged as a warning and appended to `rejects.jsonl` — real corpora contain
//!   them (e.g. a ShareGPT dialogue with only a user turn) and a training run should not stop for
//!   them, yet nothing is dropped silently.
//!
//! Conversation normalisation (documented choices): ShareGPT roles map `human→user`,
//! `gpt→assistant`, `function_call→assistant` with one tool call (the value must be a JSON
//! `{"name","arguments"}` object), `observation→tool`; `tools` may be a JSON string or an array.
//! Trailing user/tool turns after the last assistant turn are dropped (they carry no loss). A
//! conversation whose first non-system turn is an assistant turn is malformed. Consecutive user
//! turns are kept as they are (the template renders them; only assistant spans are trained).

use super::{DataError, RejectSink, ResolvedDataset};
use crate::data::spec::{DataFormat, OnBadRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;

/// One chat message, in the shape the chat template consumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text content.
    pub content: String,
    /// Reasoning text of an assistant turn (rendered inside `<think>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Tool calls of an assistant turn: `{"name", "arguments"}` objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

impl Message {
    /// A plain message.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), reasoning_content: None, tool_calls: None }
    }
}

/// A record, typed by the dataset's format.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Pretraining text.
    Text {
        /// The document.
        text: String,
    },
    /// A conversation (sharegpt / openai / alpaca).
    Chat {
        /// The messages, normalised to system/user/assistant/tool.
        messages: Vec<Message>,
        /// Tool definitions offered to the model, if any.
        tools: Option<Vec<Value>>,
    },
    /// A preference pair: a shared prompt and two continuations (usually one assistant turn each).
    Preference {
        /// The shared prompt turns.
        prompt: Vec<Message>,
        /// The preferred continuation.
        chosen: Vec<Message>,
        /// The dispreferred continuation.
        rejected: Vec<Message>,
        /// Tool definitions, if any.
        tools: Option<Vec<Value>>,
    },
    /// A prompt with a verifiable answer (GRPO, eval).
    PromptAnswer {
        /// The question.
        prompt: String,
        /// The answer as written (e.g. a GSM8K worked solution).
        answer: String,
        /// The normalised final answer (GSM8K `#### n` value without commas, or the bare one-line
        /// answer); `None` when it cannot be extracted, so rewards/eval score it as unparsable.
        final_answer: Option<String>,
    },
}

impl Example {
    /// The full chosen and rejected conversations of a [`Example::Preference`].
    pub fn preference_conversations(&self) -> Option<(Vec<Message>, Vec<Message>)> {
        match self {
            Example::Preference { prompt, chosen, rejected, .. } => {
                let c = prompt.iter().chain(chosen).cloned().collect();
                let r = prompt.iter().chain(rejected).cloned().collect();
                Some((c, r))
            }
            _ => None,
        }
    }
}

/// Counts from one pass over a dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadStats {
    /// Examples produced.
    pub examples: usize,
    /// Malformed records skipped (`on_bad_record = "skip"`).
    pub skipped_bad: usize,
    /// Well-formed records with nothing to train on, skipped.
    pub skipped_empty: usize,
}

/// Read every example of a dataset into memory. Fails on the first malformed record unless the
/// dataset says `on_bad_record = "skip"`; fails when no example remains.
pub fn read_examples(ds: &ResolvedDataset, sink: Option<&dyn RejectSink>) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for_each_example(ds, sink, |e| {
        out.push(e);
        Ok::<_, DataError>(())
    })?;
    Ok(out)
}

/// Stream the examples of a dataset in file order, calling `f` for each. Memory stays bounded by
/// the largest record. Errors when the dataset yields no example at all.
pub fn for_each_example<E: From<DataError>>(
    ds: &ResolvedDataset,
    sink: Option<&dyn RejectSink>,
    mut f: impl FnMut(Example) -> Result<(), E>,
) -> Result<ReadStats, E> {
    let mut stats = ReadStats::default();
    for file in &ds.files {
        read_file(ds, file, sink, &mut stats, &mut f)?;
    }
    if stats.examples == 0 {
        let files = ds.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(DataError::Empty {
            name: ds.name.clone(),
            files,
            skipped: stats.skipped_bad + stats.skipped_empty,
        }
        .into());
    }
    Ok(stats)
}

/// Why a record was not turned into an example.
#[derive(Debug)]
pub(crate) struct Problem {
    msg: String,
    empty: bool,
}

fn bad(msg: impl Into<String>) -> Problem {
    Problem { msg: msg.into(), empty: false }
}

fn empty(msg: impl Into<String>) -> Problem {
    Problem { msg: msg.into(), empty: true }
}

fn format_name(f: DataFormat) -> String {
    serde_json::to_value(f).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn read_file<E: From<DataError>>(
    ds: &ResolvedDataset,
    path: &Path,
    sink: Option<&dyn RejectSink>,
    stats: &mut ReadStats,
    f: &mut impl FnMut(Example) -> Result<(), E>,
) -> Result<(), E> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let fmt = ds.spec.format;
    let mut emit = |line: usize, raw: &[u8], res: Result<Example, Problem>| -> Result<(), E> {
        match res {
            Ok(e) => {
                stats.examples += 1;
                f(e)
            }
            Err(p) => {
                let file = display_path(path);
                if !p.empty && ds.spec.on_bad_record == OnBadRecord::Error {
                    return Err(DataError::BadRecord {
                        dataset: ds.name.clone(),
                        file,
                        line,
                        problem: p.msg,
                        format: format_name(fmt),
                    }
                    .into());
                }
                if p.empty {
                    stats.skipped_empty += 1;
                    tracing::warn!("{file}:{line}: skipped: {}", p.msg);
                } else {
                    stats.skipped_bad += 1;
                    tracing::debug!("{file}:{line}: skipped bad record: {}", p.msg);
                }
                if let Some(sink) = sink {
                    write_reject(sink, &ds.name, &file, line, &p.msg, raw)
                        .map_err(|e| DataError::io(sink.location(), e))?;
                }
                Ok(())
            }
        }
    };
    if ext == "parquet" {
        // Rows are numbered from 1 in messages, like lines.
        let rows = match super::parquet::read_parquet_records(path) {
            Ok(rows) => rows,
            Err(e) => return emit(0, b"", Err(bad(e.to_string()))),
        };
        for row in rows {
            match row {
                Ok((i, v)) => {
                    let raw = serde_json::to_vec(&v).unwrap_or_default();
                    emit(i + 1, &raw, convert(&v, &ds.spec))?;
                }
                Err(e) => {
                    // A decoding error leaves the reader in an unknown state: stop this file.
                    emit(e.row.map_or(0, |r| r + 1), b"", Err(bad(e.reason)))?;
                    break;
                }
            }
        }
        return Ok(());
    }
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let text_lines = ext == "txt" && fmt == DataFormat::Text;
    if !text_lines && starts_with_array(&mut reader).map_err(|e| DataError::io(path, e))? {
        // A JSON array: parse it whole (such files are small; JSONL is the streaming format).
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut bytes).map_err(|e| DataError::io(path, e))?;
        let body = strip_bom(&bytes);
        let records: Vec<Value> = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return emit(e.line(), body, Err(bad(format!("invalid JSON array: {e}")))),
        };
        for (i, rec) in records.into_iter().enumerate() {
            let raw = serde_json::to_vec(&rec).unwrap_or_default();
            emit(i + 1, &raw, convert(&rec, &ds.spec))?;
        }
        return Ok(());
    }
    let mut buf = Vec::new();
    let mut lineno = 0usize;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let mut line: &[u8] = &buf;
        if lineno == 1 {
            line = strip_bom(line);
        }
        while let Some((&last, rest)) = line.split_last() {
            if last == b'\n' || last == b'\r' {
                line = rest;
            } else {
                break;
            }
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let s = match std::str::from_utf8(line) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!(
                    "invalid UTF-8 at byte offset {} of the line (re-encode the file as UTF-8)",
                    e.valid_up_to()
                );
                emit(lineno, line, Err(bad(msg)))?;
                continue;
            }
        };
        let res = if text_lines {
            Ok(Example::Text { text: s.to_string() })
        } else {
            match serde_json::from_str::<Value>(s) {
                Ok(v) => convert(&v, &ds.spec),
                Err(e) => Err(bad(format!("invalid JSON: {e}"))),
            }
        };
        emit(lineno, line, res)?;
    }
    Ok(())
}

/// A path as users want to see it in errors: relative to the working directory when inside it.
fn display_path(path: &Path) -> String {
    let rel = std::env::current_dir().ok().and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    rel.unwrap_or_else(|| path.to_path_buf()).display().to_string()
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

/// Whether the first non-blank byte (after a BOM) is `[`, without consuming anything.
fn starts_with_array(r: &mut BufReader<std::fs::File>) -> std::io::Result<bool> {
    let buf = r.fill_buf()?;
    let b = strip_bom(buf);
    Ok(b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'['))
}

/// Append one rejected record to the run's `rejects.jsonl` (the sink caps its size).
fn write_reject(
    sink: &dyn RejectSink,
    dataset: &str,
    file: &str,
    line: usize,
    reason: &str,
    raw: &[u8],
) -> std::io::Result<()> {
    sink.reject(dataset, Path::new(file), line, reason, raw)
}

// ---------------------------------------------------------------------------------------------
// Formats

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

struct Cols<'a> {
    obj: &'a Map<String, Value>,
    spec: &'a crate::data::spec::DatasetSpec,
}

impl<'a> Cols<'a> {
    /// The source column for the format's field `name` (after `columns` remapping).
    fn name(&self, name: &'a str) -> &'a str {
        self.spec.columns.get(name).map(String::as_str).unwrap_or(name)
    }
    fn get(&self, name: &'a str) -> Option<&'a Value> {
        self.obj.get(self.name(name)).filter(|v| !v.is_null())
    }
    fn has(&self, name: &'a str) -> bool {
        self.spec.columns.contains_key(name) || self.obj.contains_key(name)
    }
    fn req_str(&self, name: &'a str) -> Result<&'a str, Problem> {
        match self.obj.get(self.name(name)) {
            None => Err(bad(format!("missing field '{}'", self.name(name)))),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(bad(format!("field '{}' must be a string, got {}", self.name(name), type_name(v)))),
        }
    }
    fn opt_str(&self, name: &'a str) -> Result<Option<&'a str>, Problem> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(bad(format!("field '{}' must be a string, got {}", self.name(name), type_name(v)))),
        }
    }
}

/// Turn one parsed record into an example per the dataset's format.
pub(crate) fn convert(v: &Value, spec: &crate::data::spec::DatasetSpec) -> Result<Example, Problem> {
    let obj = v.as_object().ok_or_else(|| bad(format!("record must be a JSON object, got {}", type_name(v))))?;
    let c = Cols { obj, spec };
    match spec.format {
        DataFormat::Text => {
            let text = c.req_str("text")?;
            if text.trim().is_empty() {
                return Err(empty("empty text"));
            }
            Ok(Example::Text { text: text.to_string() })
        }
        DataFormat::Sharegpt => chat(&c, &["conversations", "messages"]),
        DataFormat::Openai => chat(&c, &["messages", "conversations"]),
        DataFormat::Alpaca => alpaca(&c),
        DataFormat::Dpo => dpo(&c),
        DataFormat::PromptAnswer => prompt_answer(&c),
    }
}

/// Find the conversation list under the first present key of `keys` (or a `columns` remap).
fn conversation_field<'a>(c: &Cols<'a>, keys: &[&'a str]) -> Result<(&'a str, &'a Value), Problem> {
    for k in keys {
        if c.spec.columns.contains_key(*k) {
            let name = c.name(k);
            return c.obj.get(name).map(|v| (name, v)).ok_or_else(|| bad(format!("missing field '{name}'")));
        }
    }
    for k in keys {
        if let Some(v) = c.obj.get(*k) {
            return Ok((k, v));
        }
    }
    Err(bad(format!("missing field '{}'", keys[0])))
}

fn chat(c: &Cols<'_>, keys: &[&str]) -> Result<Example, Problem> {
    let (name, v) = conversation_field(c, keys)?;
    let mut messages = parse_messages(name, v)?;
    let tools = parse_tools(c)?;
    while messages.last().is_some_and(|m| m.role != "assistant") {
        messages.pop();
    }
    check_order(&messages)?;
    if !messages.iter().any(trainable) {
        return Err(empty("no assistant reply to train on"));
    }
    Ok(Example::Chat { messages, tools })
}

fn trainable(m: &Message) -> bool {
    m.role == "assistant" && (!m.content.trim().is_empty() || m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()))
}

fn check_order(messages: &[Message]) -> Result<(), Problem> {
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| m.role != "system") {
        if m.role == "assistant" {
            return Err(bad(format!("message {} is an assistant turn with no user turn before it", i + 1)));
        }
    }
    Ok(())
}

fn parse_messages(field: &str, v: &Value) -> Result<Vec<Message>, Problem> {
    let arr =
        v.as_array().ok_or_else(|| bad(format!("field '{field}' must be a list of messages, got {}", type_name(v))))?;
    arr.iter().enumerate().map(|(i, m)| parse_message(i + 1, m)).collect()
}

fn parse_message(i: usize, v: &Value) -> Result<Message, Problem> {
    let o = v.as_object().ok_or_else(|| bad(format!("message {i} must be an object, got {}", type_name(v))))?;
    let str_field = |k: &str, role: &str| -> Result<String, Problem> {
        match o.get(k) {
            None => Err(bad(format!("message {i} ({role}) has no '{k}'"))),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(x) => Err(bad(format!("message {i} ({role}): '{k}' must be a string, got {}", type_name(x)))),
        }
    };
    if let Some(from) = o.get("from") {
        let from = from.as_str().ok_or_else(|| bad(format!("message {i}: 'from' must be a string")))?;
        let value = str_field("value", from)?;
        let role = match from {
            "human" | "user" => "user",
            "gpt" | "assistant" => "assistant",
            "system" => "system",
            "observation" | "tool" => "tool",
            "function_call" => {
                let call: Value = serde_json::from_str(&value)
                    .map_err(|e| bad(format!("message {i} (function_call): value is not JSON: {e}")))?;
                let ok = call.get("name").is_some_and(Value::is_string) && call.get("arguments").is_some();
                if !ok {
                    return Err(bad(format!("message {i} (function_call): expected {{\"name\", \"arguments\"}}")));
                }
                return Ok(Message { tool_calls: Some(vec![call]), ..Message::new("assistant", "") });
            }
            other => {
                return Err(bad(format!(
                    "message {i}: unknown role '{other}' (expected human, gpt, system, function_call or observation)"
                )))
            }
        };
        return Ok(Message::new(role, value));
    }
    let Some(role) = o.get("role") else {
        return Err(bad(format!("message {i} has no 'from' (or 'role')")));
    };
    let role = role.as_str().ok_or_else(|| bad(format!("message {i}: 'role' must be a string")))?;
    if !matches!(role, "system" | "user" | "assistant" | "tool") {
        return Err(bad(format!("message {i}: unknown role '{role}' (expected system, user, assistant or tool)")));
    }
    let tool_calls = match o.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => Some(a),
            Ok(o @ Value::Object(_)) => Some(vec![o]),
            _ => return Err(bad(format!("message {i}: 'tool_calls' is not a JSON list"))),
        },
        Some(x) => return Err(bad(format!("message {i}: 'tool_calls' must be a list, got {}", type_name(x)))),
    };
    let content = match o.get("content") {
        Some(Value::Null) | None if tool_calls.is_some() => String::new(),
        _ => str_field("content", role)?,
    };
    let reasoning_content = match o.get("reasoning_content") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    Ok(Message { role: role.to_string(), content, reasoning_content, tool_calls })
}

fn parse_tools(c: &Cols<'_>) -> Result<Option<Vec<Value>>, Problem> {
    match c.get("tools") {
        None => Ok(None),
        Some(Value::Array(a)) => Ok((!a.is_empty()).then(|| a.clone())),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => Ok((!a.is_empty()).then_some(a)),
            _ => Err(bad("field 'tools' is not a JSON list of tool definitions")),
        },
        Some(v) => Err(bad(format!("field 'tools' must be a list or a JSON string, got {}", type_name(v)))),
    }
}

/// Optional `history: [[question, answer], …]` turns (MedicalGPT legacy and Alpaca forms).
fn history(c: &Cols<'_>) -> Result<Vec<Message>, Problem> {
    let Some(h) = c.get("history") else { return Ok(vec![]) };
    let arr = h.as_array().ok_or_else(|| bad("field 'history' must be a list of [question, answer] pairs"))?;
    let mut out = Vec::new();
    for pair in arr {
        match pair.as_array().map(Vec::as_slice) {
            Some([Value::String(q), Value::String(a)]) => {
                out.push(Message::new("user", q.clone()));
                out.push(Message::new("assistant", a.clone()));
            }
            _ => return Err(bad("field 'history' must be a list of [question, answer] string pairs")),
        }
    }
    Ok(out)
}

fn system(c: &Cols<'_>) -> Result<Vec<Message>, Problem> {
    Ok(c.opt_str("system")?.filter(|s| !s.trim().is_empty()).map(|s| Message::new("system", s)).into_iter().collect())
}

fn alpaca(c: &Cols<'_>) -> Result<Example, Problem> {
    let instruction = c.req_str("instruction")?;
    let input = c.opt_str("input")?.unwrap_or("");
    let output = c.req_str("output")?;
    let mut messages = system(c)?;
    messages.extend(history(c)?);
    let user = if input.trim().is_empty() { instruction.to_string() } else { format!("{instruction}\n{input}") };
    if user.trim().is_empty() {
        return Err(empty("empty instruction"));
    }
    messages.push(Message::new("user", user));
    if output.trim().is_empty() {
        return Err(empty("empty output: nothing to train on"));
    }
    messages.push(Message::new("assistant", output));
    Ok(Example::Chat { messages, tools: None })
}

fn dpo(c: &Cols<'_>) -> Result<Example, Problem> {
    let chosen_key =
        if c.has("chosen") || !c.obj.contains_key("response_chosen") { "chosen" } else { "response_chosen" };
    let rejected_key =
        if c.has("rejected") || !c.obj.contains_key("response_rejected") { "rejected" } else { "response_rejected" };
    let chosen_v = c.get(chosen_key).ok_or_else(|| bad(format!("missing field '{}'", c.name(chosen_key))))?;
    let rejected_v = c.get(rejected_key).ok_or_else(|| bad(format!("missing field '{}'", c.name(rejected_key))))?;
    let tools = parse_tools(c)?;
    let (prompt, chosen, rejected) = if let (Value::Array(_), Value::Array(_)) = (chosen_v, rejected_v) {
        // Conversation form: each side holds the whole dialogue; the prompt is what precedes the
        // last assistant turn and must be the same on both sides.
        let ch = parse_messages(c.name(chosen_key), chosen_v)?;
        let rj = parse_messages(c.name(rejected_key), rejected_v)?;
        let split = |m: &[Message], side: &str| -> Result<usize, Problem> {
            m.iter().rposition(|m| m.role == "assistant").ok_or_else(|| bad(format!("'{side}' has no assistant turn")))
        };
        let (kc, kr) = (split(&ch, "chosen")?, split(&rj, "rejected")?);
        if ch[..kc] != rj[..kr] {
            return Err(bad("'chosen' and 'rejected' start with different prompts"));
        }
        (ch[..kc].to_vec(), ch[kc..].to_vec(), rj[kr..].to_vec())
    } else {
        let side = |v: &Value, key: &str| -> Result<Vec<Message>, Problem> {
            match v {
                Value::String(s) => Ok(vec![Message::new("assistant", s.clone())]),
                Value::Object(_) => {
                    let m = parse_message(1, v).map_err(|p| bad(format!("'{key}': {}", p.msg)))?;
                    if m.role != "assistant" {
                        return Err(bad(format!("'{key}' must be an assistant (gpt) message, got role '{}'", m.role)));
                    }
                    Ok(vec![m])
                }
                other => Err(bad(format!("field '{key}' must be a string, message or list, got {}", type_name(other)))),
            }
        };
        let chosen = side(chosen_v, c.name(chosen_key))?;
        let rejected = side(rejected_v, c.name(rejected_key))?;
        let mut prompt = Vec::new();
        if let Ok((name, conv)) = conversation_field(c, &["conversations", "messages"]) {
            prompt = parse_messages(name, conv)?;
        } else if let Some(p) = c.opt_str("prompt")? {
            prompt.push(Message::new("user", p));
        } else if let Some(q) = c.opt_str("question")? {
            prompt.extend(system(c)?);
            prompt.extend(history(c)?);
            prompt.push(Message::new("user", q));
        } else {
            return Err(bad(format!("missing field '{}' (the prompt)", c.name("conversations"))));
        }
        (prompt, chosen, rejected)
    };
    if prompt.iter().all(|m| m.role == "system") {
        return Err(bad("the prompt has no user turn"));
    }
    check_order(&prompt)?;
    if !chosen.iter().any(trainable) {
        return Err(bad("'chosen' is empty"));
    }
    if !rejected.iter().any(trainable) {
        return Err(bad("'rejected' is empty"));
    }
    if chosen == rejected {
        return Err(bad("'chosen' equals 'rejected': no preference to learn from"));
    }
    Ok(Example::Preference { prompt, chosen, rejected, tools })
}

fn prompt_answer(c: &Cols<'_>) -> Result<Example, Problem> {
    let qkey = if c.has("question") || !c.obj.contains_key("prompt") { "question" } else { "prompt" };
    let prompt = c.req_str(qkey)?;
    let answer = match c.obj.get(c.name("answer")) {
        None => return Err(bad(format!("missing field '{}'", c.name("answer")))),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(v) => return Err(bad(format!("field '{}' must be a string, got {}", c.name("answer"), type_name(v)))),
    };
    if prompt.trim().is_empty() {
        return Err(empty("empty question"));
    }
    let final_answer = normalize_answer(&answer);
    Ok(Example::PromptAnswer { prompt: prompt.to_string(), answer, final_answer })
}

/// The checkable final answer: the value after GSM8K's `#### ` (which must be a number; thousands
/// commas removed), or a bare one-line answer (commas removed when it is a number). Multi-line text
/// without `####` has no extractable answer.
pub fn normalize_answer(answer: &str) -> Option<String> {
    if let Some(idx) = answer.rfind("####") {
        let v = answer[idx + 4..].trim();
        return normalize_number(v);
    }
    let t = answer.trim();
    if t.is_empty() || t.contains('\n') {
        return None;
    }
    Some(normalize_number(t).unwrap_or_else(|| t.to_string()))
}

/// The final answer in a model's generated text: the number after "The answer is" (the
/// `builtin:arithmetic` form), GSM8K's `#### n`, or `\boxed{…}` — the last such occurrence; else
/// `None`. Numbers are normalised like [`normalize_number`], so the result compares with
/// `Example::PromptAnswer::final_answer`.
pub fn extract_answer(generated: &str) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    let mut consider = |at: usize, raw: &str| {
        let raw = raw.trim();
        let v = normalize_number(raw).unwrap_or_else(|| raw.to_string());
        if !v.is_empty() && best.as_ref().is_none_or(|(b, _)| at >= *b) {
            best = Some((at, v));
        }
    };
    for marker in ["The answer is", "the answer is", "####"] {
        for (at, _) in generated.match_indices(marker) {
            let rest = &generated[at + marker.len()..];
            let end = rest.find('\n').unwrap_or(rest.len());
            let line = rest[..end].trim().trim_start_matches(':').trim();
            let token: String = line
                .chars()
                .take_while(|c| c.is_ascii_digit() || matches!(c, '-' | '\u{2212}' | ',' | '.' | '$'))
                .collect();
            consider(at, if token.is_empty() { line.trim_end_matches('.') } else { &token });
        }
    }
    for (at, _) in generated.match_indices("\\boxed{") {
        let rest = &generated[at + 7..];
        let mut depth = 1;
        if let Some(end) = rest.char_indices().find_map(|(i, c)| {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            (depth == 0).then_some(i)
        }) {
            consider(at, &rest[..end]);
        }
    }
    best.map(|(_, v)| v)
}

/// `"1,234"` → `"1234"`, `"−3"` → `"-3"`, `"5.0"` stays; `None` if not a number.
pub fn normalize_number(s: &str) -> Option<String> {
    let cleaned: String = s.trim().replace('\u{2212}', "-").chars().filter(|c| *c != ',' && *c != '$').collect();
    let cleaned = cleaned.trim_end_matches('.');
    cleaned.parse::<f64>().ok().filter(|x| x.is_finite())?;
    Some(cleaned.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::spec::DatasetSpec;
    use crate::data::{shared_data, ResolvedDataset};

    fn ds_for(path: &Path, format: DataFormat, skip: bool) -> ResolvedDataset {
        ResolvedDataset {
            name: "t".into(),
            spec: DatasetSpec {
                source: path.display().to_string(),
                format,
                columns: Default::default(),
                on_bad_record: if skip { OnBadRecord::Skip } else { OnBadRecord::Error },
                builtin: Default::default(),
            },
            files: vec![path.to_path_buf()],
            content_hash: String::new(),
        }
    }

    fn read(path: &Path, format: DataFormat) -> Result<(Vec<Example>, ReadStats), DataError> {
        let ds = ds_for(path, format, false);
        let mut v = Vec::new();
        let st = for_each_example(&ds, None, |e| {
            v.push(e);
            Ok::<_, DataError>(())
        })?;
        Ok((v, st))
    }

    fn read_skip(path: &Path, format: DataFormat, cols: &[(&str, &str)]) -> (Vec<Example>, ReadStats, Vec<Value>) {
        let tmp = tempfile::tempdir().unwrap();
        let sink = crate::runs::RunSink::create(tmp.path()).unwrap();
        let mut ds = ds_for(path, format, true);
        ds.spec.columns = cols.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let mut v = Vec::new();
        let st = for_each_example(&ds, Some(&sink as &dyn RejectSink), |e| {
            v.push(e);
            Ok::<_, DataError>(())
        })
        .unwrap_or_default();
        let rejects = std::fs::read_to_string(tmp.path().join("rejects.jsonl")).unwrap_or_default();
        let rejects = rejects.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (v, st, rejects)
    }

    fn err_of(path: &Path, format: DataFormat) -> String {
        read(path, format).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn every_real_file_reads_in_its_format() {
        let Some(d) = shared_data() else { return };
        use DataFormat::*;
        // (file, format, examples, skipped_empty)
        let cases: &[(&str, DataFormat, usize, usize)] = &[
            ("medicalgpt/pretrain/fever.txt", Text, 985, 0),
            ("medicalgpt/pretrain/en_article_tail500.txt", Text, 426, 0),
            ("medicalgpt/sft/medical_sft_1K_format.jsonl", Sharegpt, 1000, 0),
            ("medicalgpt/sft/sharegpt_zh_1K_format.jsonl", Sharegpt, 999, 1),
            ("medicalgpt/sft/glaive_toolcall_zh_demo.jsonl", Sharegpt, 300, 0),
            ("medicalgpt/reward/dpo_zh_500.jsonl", Dpo, 500, 0),
            ("medicalgpt/reward/toolcall_dpo_zh_demo.jsonl", Dpo, 11, 0),
            ("medicalgpt/grpo/sample.jsonl", PromptAnswer, 32, 0),
            ("medicalgpt_history/reward/dpo_zh_500.jsonl", Dpo, 500, 0),
            ("medicalgpt_history/reward/test.json", Dpo, 100, 0),
            ("medicalgpt_history/reward/toolcall_dpo_zh_demo.json", Dpo, 11, 0),
            ("medicalgpt_history/sft/glaive_toolcall_zh_demo.json", Sharegpt, 300, 0),
            ("medicalgpt_history/finetune/Belle_open_source_1k.json", Alpaca, 1000, 0),
            ("medicalgpt_history/finetune/numina_cot_sharegpt_data_1k.jsonl", Sharegpt, 1000, 0),
            ("gsm8k/test.jsonl", PromptAnswer, 1319, 0),
            ("gsm8k/train_first1000.jsonl", PromptAnswer, 1000, 0),
            ("tinyshakespeare/input.txt", Text, 32777, 0),
            ("minimind_pr802/tiny_pretrain.jsonl", Text, 4, 0),
            ("minimind_pr802/tiny_sft.jsonl", Sharegpt, 3, 0),
            ("minimind_pr802/tiny_sft.jsonl", Openai, 3, 0),
            ("minimind_pr802/tiny_dpo.jsonl", Dpo, 2, 0),
        ];
        for (f, fmt, n, n_empty) in cases {
            let (ex, st) = read(&d.join(f), *fmt).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!((ex.len(), st.skipped_empty), (*n, *n_empty), "{f}");
        }
        // JSONL inside a .txt, read with columns remapping.
        let (ex, st, _) = read_skip(
            &d.join("medicalgpt/rag/medical_corpus.txt"),
            PromptAnswer,
            &[("question", "问"), ("answer", "答")],
        );
        assert_eq!((ex.len(), st.skipped_bad), (87, 0));
        assert!(matches!(&ex[0], Example::PromptAnswer { prompt, final_answer: Some(a), .. }
            if prompt.contains("肛门病变") && a == "食管克罗恩病"));
    }

    #[test]
    fn real_file_shapes_are_normalised() {
        let Some(d) = shared_data() else { return };
        // JSON array and JSONL copies of the glaive tool-call data give identical examples.
        let (a, _) = read(&d.join("medicalgpt/sft/glaive_toolcall_zh_demo.jsonl"), DataFormat::Sharegpt).unwrap();
        let (b, _) =
            read(&d.join("medicalgpt_history/sft/glaive_toolcall_zh_demo.json"), DataFormat::Sharegpt).unwrap();
        assert_eq!(a, b);
        let with_call = a
            .iter()
            .find_map(|e| match e {
                Example::Chat { messages, tools } => messages
                    .iter()
                    .find(|m| m.tool_calls.is_some())
                    .map(|m| (m.clone(), tools.clone(), messages.iter().any(|m| m.role == "tool"))),
                _ => None,
            })
            .unwrap();
        assert!(with_call.0.tool_calls.unwrap()[0].get("arguments").unwrap().is_object());
        assert!(with_call.1.is_some() && with_call.2);

        // GSM8K: final answers normalised, commas removed.
        let (g, _) = read(&d.join("gsm8k/test.jsonl"), DataFormat::PromptAnswer).unwrap();
        assert!(matches!(&g[0], Example::PromptAnswer { final_answer: Some(a), .. } if a == "18"));
        let commas = g
            .iter()
            .filter(
                |e| matches!(e, Example::PromptAnswer { answer, .. } if answer.lines().last().unwrap().contains(',')),
            )
            .count();
        assert_eq!(commas, 14);
        assert!(g.iter().all(|e| matches!(e, Example::PromptAnswer { final_answer: Some(a), .. } if !a.contains(','))));
        // The answer extractor (for generated text) agrees with the reader on every gold solution.
        for e in &g {
            let Example::PromptAnswer { answer, final_answer, .. } = e else { unreachable!() };
            assert_eq!(&extract_answer(answer), final_answer, "{answer}");
        }

        // DPO forms: string (with system prompt), legacy flat, message objects, conversation form.
        let (c, _) = read(&d.join("medicalgpt/reward/dpo_zh_500.jsonl"), DataFormat::Dpo).unwrap();
        let (f, _) = read(&d.join("medicalgpt_history/reward/dpo_zh_500.jsonl"), DataFormat::Dpo).unwrap();
        let sys = |v: &[Example]| {
            v.iter().filter(|e| matches!(e, Example::Preference { prompt, .. } if prompt[0].role == "system")).count()
        };
        assert_eq!((sys(&c), sys(&f)), (84, 84));
        let (m, _) = read(&d.join("medicalgpt_history/reward/toolcall_dpo_zh_demo.json"), DataFormat::Dpo).unwrap();
        let (s, _) = read(&d.join("medicalgpt/reward/toolcall_dpo_zh_demo.jsonl"), DataFormat::Dpo).unwrap();
        let conts = |v: &[Example]| {
            v.iter()
                .map(|e| match e {
                    Example::Preference { chosen, rejected, .. } => {
                        (chosen[0].content.clone(), rejected[0].content.clone())
                    }
                    _ => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(conts(&m), conts(&s));
        let (t, _) = read(&d.join("minimind_pr802/tiny_dpo.jsonl"), DataFormat::Dpo).unwrap();
        match &t[1] {
            Example::Preference { prompt, chosen, rejected, .. } => {
                assert_eq!(prompt.len(), 1);
                assert_eq!(prompt[0].role, "user");
                assert_eq!((chosen.len(), rejected.len()), (1, 1));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn every_bad_file_has_its_expected_behaviour() {
        let Some(d) = shared_data() else { return };
        let b = |f: &str| d.join("bad").join(f);
        use DataFormat::*;

        let e = err_of(&b("truncated_last_line.jsonl"), Sharegpt);
        assert!(e.contains("truncated_last_line.jsonl:4: invalid JSON"), "{e}");
        assert!(e.contains("on_bad_record = \"skip\""), "{e}");
        let (ex, st, rj) = read_skip(&b("truncated_last_line.jsonl"), Sharegpt, &[]);
        assert_eq!((ex.len(), st.skipped_bad, rj.len()), (3, 1, 1));
        assert_eq!(rj[0]["line"], 4);

        let e = err_of(&b("non_utf8.jsonl"), Sharegpt);
        assert!(e.contains("non_utf8.jsonl:2: invalid UTF-8 at byte offset 43"), "{e}");
        let (ex, st, rj) = read_skip(&b("non_utf8.jsonl"), Sharegpt, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (1, 2));
        assert!(rj[1]["reason"].as_str().unwrap().contains("byte offset 110"), "{rj:?}");
        let e = err_of(&b("non_utf8.txt"), Text);
        assert!(e.contains("non_utf8.txt:2: invalid UTF-8"), "{e}");
        let (ex, st, _) = read_skip(&b("non_utf8.txt"), Text, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (2, 1));

        let e = err_of(&b("missing_field_sft.jsonl"), Sharegpt);
        assert!(e.contains(":2: missing field 'conversations' (format sharegpt)"), "{e}");
        let (ex, _, rj) = read_skip(&b("missing_field_sft.jsonl"), Sharegpt, &[]);
        assert_eq!(ex.len(), 1);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert!(reasons[0].contains("missing field 'conversations'"));
        assert!(reasons[1].contains("has no 'value'"), "{reasons:?}");
        assert!(reasons[2].contains("has no 'from'"), "{reasons:?}");
        assert!(reasons[3].contains("missing field"), "{reasons:?}");

        let (ex, _, rj) = read_skip(&b("missing_field_dpo.jsonl"), Dpo, &[]);
        assert_eq!(ex.len(), 1);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert!(reasons[0].contains("'rejected'") && reasons[1].contains("'chosen'"), "{reasons:?}");
        assert!(reasons[2].contains("the prompt"), "{reasons:?}");

        // GSM8K: a missing answer key is malformed; a missing or non-numeric `####` is unparsable.
        let e = err_of(&b("missing_field_gsm8k.jsonl"), PromptAnswer);
        assert!(e.contains(":3: missing field 'answer'"), "{e}");
        let (ex, _, _) = read_skip(&b("missing_field_gsm8k.jsonl"), PromptAnswer, &[]);
        let finals: Vec<_> = ex
            .iter()
            .map(|e| match e {
                Example::PromptAnswer { final_answer, .. } => final_answer.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert!(finals[0].is_some());
        assert_eq!(&finals[1..], &[None, None]);

        // Nothing to train on: skipped even in error mode, never an example with no loss tokens.
        let (ex, st) = read(&b("empty_conversations.jsonl"), Sharegpt).unwrap();
        assert_eq!((ex.len(), st.skipped_empty), (2, 4));

        let huge = read(&b("huge_record_1mb.jsonl"), Sharegpt).unwrap().0;
        assert_eq!(huge.len(), 2);

        for f in ["empty.jsonl", "empty.txt", "blank_lines_only.jsonl"] {
            let e = err_of(&b(f), if f.ends_with("txt") { Text } else { Sharegpt });
            assert!(e.contains("no records"), "{f}: {e}");
        }

        let e = err_of(&b("dpo_chosen_equals_rejected.jsonl"), Dpo);
        assert!(e.contains(":2: 'chosen' equals 'rejected'"), "{e}");
        let (ex, _, rj) = read_skip(&b("dpo_chosen_equals_rejected.jsonl"), Dpo, &[]);
        assert_eq!(ex.len(), 1);
        assert!(rj[1]["reason"].as_str().unwrap().contains("'chosen' is empty"), "{rj:?}");
        let (ex, _, rj) = read_skip(&b("dpo_chosen_equals_rejected_conv.jsonl"), Dpo, &[]);
        assert_eq!(ex.len(), 1);
        assert!(rj[0]["reason"].as_str().unwrap().contains("equals"), "{rj:?}");
        assert!(rj[1]["reason"].as_str().unwrap().contains("no assistant turn"), "{rj:?}");

        let (ex, _) = read(&b("bom_crlf.jsonl"), Sharegpt).unwrap();
        assert_eq!(ex.len(), 3);
        assert!(matches!(&ex[0], Example::Chat { messages, .. } if !messages[0].content.ends_with('\r')));

        // One schema per file, chosen by `format`: other shapes are bad records.
        let e = err_of(&b("mixed_schema.jsonl"), Sharegpt);
        assert!(e.contains(":3: missing field 'conversations'"), "{e}");
        let (ex, st, _) = read_skip(&b("mixed_schema.jsonl"), Sharegpt, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (2, 2));
        let (ex, st, _) = read_skip(&b("mixed_schema.jsonl"), Text, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (1, 3));

        let (ex, _, rj) = read_skip(&b("wrong_types.jsonl"), Sharegpt, &[]);
        assert_eq!(ex.len(), 1);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert_eq!(reasons.len(), 6, "{reasons:?}");
        assert!(reasons[0].contains("must be a list of messages, got a string"), "{reasons:?}");
        assert!(reasons[1].contains("must be a string, got"), "{reasons:?}");
        assert!(reasons[3].contains("must be a JSON object, got a list"), "{reasons:?}");
        assert!(reasons[4].contains("got a string"), "{reasons:?}");
        assert!(reasons[5].contains("invalid JSON"), "{reasons:?}");

        let (ex, _, rj) = read_skip(&b("bad_roles.jsonl"), Sharegpt, &[]);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert!(reasons[0].contains("unknown role 'narrator'"), "{reasons:?}");
        assert!(reasons[1].contains("assistant turn with no user turn"), "{reasons:?}");
        // Two user turns in a row are accepted (only assistant spans are trained).
        assert_eq!((ex.len(), reasons.len()), (2, 2));
    }

    #[test]
    fn answers_normalise() {
        assert_eq!(normalize_answer("a\nb\n#### 1,234").as_deref(), Some("1234"));
        assert_eq!(normalize_answer("x\n#### seven"), None);
        assert_eq!(normalize_answer("x\ny"), None);
        assert_eq!(normalize_answer(" 56 ").as_deref(), Some("56"));
        assert_eq!(normalize_answer("−3").as_deref(), Some("-3"));
        assert_eq!(normalize_answer("食管克罗恩病").as_deref(), Some("食管克罗恩病"));
        assert_eq!(extract_answer("12 + 7 = 19. The answer is 19.").as_deref(), Some("19"));
        assert_eq!(extract_answer("The answer is 3. Wait, the answer is 1,200.").as_deref(), Some("1200"));
        assert_eq!(extract_answer("so\n#### 18").as_deref(), Some("18"));
        assert_eq!(extract_answer("thus $\\boxed{\\frac{1}{2}}$").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(extract_answer("no idea"), None);
    }
}
