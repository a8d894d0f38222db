//! Record formats: one parsed JSON record → an [`Example`], per the dataset's `format` and
//! `columns`, or the [`Problem`] with it.
//!
//! Conversation normalisation (documented choices): ShareGPT roles map `human→user`,
//! `gpt→assistant`, `function_call→assistant` with one tool call (the value must be a JSON
//! `{"name","arguments"}` object), `observation→tool`; `tools` may be a JSON string or an array.
//! Trailing user/tool turns after the last assistant turn are dropped (they carry no loss). A
//! conversation whose first non-system turn is an assistant turn is malformed. Consecutive user
//! turns are kept as they are (the template renders them; only assistant spans are trained).

use super::answer::normalize_answer;
use super::example::{Example, Message};
use crate::data::spec::DataFormat;
use serde_json::{Map, Value};

/// Why a record was not turned into an example.
#[derive(Debug)]
pub(crate) struct Problem {
    /// What is wrong, for `file:line: …`.
    pub msg: String,
    /// Well-formed but with nothing to train on (always skipped), rather than malformed.
    pub empty: bool,
}

pub(crate) fn bad(msg: impl Into<String>) -> Problem {
    Problem { msg: msg.into(), empty: false }
}

fn empty(msg: impl Into<String>) -> Problem {
    Problem { msg: msg.into(), empty: true }
}

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
