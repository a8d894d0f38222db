//! The typed records every reader produces and every stage consumes: [`Example`] (one per record,
//! by the dataset's format), [`Message`] (a chat turn as the chat template takes it) and the
//! [`ReadStats`] of a pass.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
