//! The OpenAI wire format: request bodies (unknown fields ignored), responses, stream chunks and
//! error objects.

use crate::data::read::Message;
use serde::Deserialize;
use serde_json::{json, Value};

/// An HTTP error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`, …
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<&'static str>,
    /// Machine-readable code (`model_not_found`, `context_length_exceeded`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), kind: "invalid_request_error", param: Some(param), code: None }
    }

    /// The body as JSON.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// `"text"` or `["a", "b"]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `chat_template_kwargs` (vLLM / SGLang convention).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TemplateKwargs {
    /// Open a `<think>` block in the generation prompt.
    pub enable_thinking: Option<bool>,
}

/// The fields of `/v1/chat/completions` and `/v1/completions` that mmrun reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonFields {
    /// Model name (optional when one model is served).
    pub model: Option<String>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k filter (0 = off).
    pub top_k: Option<usize>,
    /// Seed (reproducible answers).
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Number of choices.
    pub n: Option<usize>,
    /// Mapped to a repetition penalty of `1 + p`.
    pub presence_penalty: Option<f32>,
    /// Mapped to a repetition penalty of `1 + p`.
    pub frequency_penalty: Option<f32>,
    /// Multiplicative repetition penalty (HF semantics; wins over the two above).
    pub repetition_penalty: Option<f32>,
    /// vLLM's extension: keep generating past end-of-sequence until `max_tokens` (for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// A chat message as clients send it.
#[derive(Clone, Debug, Deserialize)]
pub struct WireMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// A string, or a list of content parts (`{"type": "text", "text": …}`).
    #[serde(default)]
    pub content: Option<Value>,
    /// The assistant's earlier reasoning.
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// The assistant's earlier tool calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
}

/// `/v1/chat/completions` body.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<WireMessage>,
    /// Everything shared with completions.
    #[serde(flatten)]
    pub common: CommonFields,
    /// Tool definitions.
    pub tools: Option<Vec<Value>>,
    /// `none` hides the tools from the model; anything else offers them.
    pub tool_choice: Option<Value>,
    /// Template switches.
    pub chat_template_kwargs: Option<TemplateKwargs>,
}

/// `/v1/completions` body.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The text to continue.
    pub prompt: OneOrMany,
    /// Everything shared with chat.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// Our messages from the wire's (content parts joined; `developer` is a system message).
pub fn to_messages(wire: Vec<WireMessage>) -> Result<Vec<Message>, ApiError> {
    if wire.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    wire.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::bad(
                        "messages",
                        format!("messages[{i}].role '{other}' is not one of system, developer, user, assistant, tool"),
                    ))
                }
            };
            let content = match m.content {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s,
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match p.get("text").and_then(Value::as_str) {
                        Some(t) => Ok(t.to_string()),
                        None => Err(ApiError::bad(
                            "messages",
                            format!("messages[{i}]: only text content parts are supported"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                Some(_) => return Err(ApiError::bad("messages", format!("messages[{i}].content must be a string"))),
            };
            let mut msg = Message::new(role, content);
            msg.reasoning_content = m.reasoning_content;
            msg.tool_calls = m.tool_calls;
            Ok(msg)
        })
        .collect()
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}
