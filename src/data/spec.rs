//! The data vocabulary a recipe declares: `[datasets.<name>]` ([`DatasetSpec`]), record formats
//! ([`DataFormat`]) and the bad-record policy ([`OnBadRecord`]).
//!
//! These types belong to `data` (they say how data is read) but sit below `recipe` in the layer
//! order, so the recipe loader can parse them without `data`'s readers, and `data`'s readers never
//! reach up into `recipe`. This file must stay free of other `crate::` imports.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `builtin:<name>` generators mmrun ships.
pub const BUILTIN_GENERATORS: &[&str] = &["arithmetic", "tool_use"];

/// The formats a `builtin:` generator writes, when it cannot write them all.
pub fn builtin_formats(generator: &str) -> Option<&'static [DataFormat]> {
    (generator == "tool_use").then_some(&[
        DataFormat::Openai,
        DataFormat::Sharegpt,
        DataFormat::PromptAnswer,
        DataFormat::Text,
    ])
}

/// The most records a `builtin:` dataset may ask for: they are generated in memory, and ten
/// million short problems (about a gigabyte) is far beyond what a small model needs.
pub const MAX_BUILTIN_COUNT: u64 = 10_000_000;

/// A `builtin:` generator's `split = "train" | "test"` → whether it is the test split.
pub fn split_is_test(v: &serde_json::Value) -> Result<bool, String> {
    match v.as_str() {
        Some("train") => Ok(false),
        Some("test") => Ok(true),
        _ => Err("builtin parameter 'split' must be \"train\" or \"test\"".into()),
    }
}

/// A record count a `builtin:` generator can make.
pub fn check_count(count: usize) -> Result<(), String> {
    if count == 0 || count as u64 > MAX_BUILTIN_COUNT {
        return Err(format!("builtin parameter 'count' must be between 1 and {}", MAX_BUILTIN_COUNT));
    }
    Ok(())
}

/// Record formats a dataset can be read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// `{"text": ...}` records or plain text lines.
    Text,
    /// `{"conversations": [{"from","value"} | {"role","content"}]}`.
    Sharegpt,
    /// `{"messages": [{"role","content"}]}`.
    Openai,
    /// `{"instruction","input","output"}`.
    Alpaca,
    /// Preference pairs: prompt + chosen + rejected strings, or chosen/rejected conversations.
    Dpo,
    /// `{"question","answer"}` with a verifiable answer (GSM8K `#### n` supported).
    PromptAnswer,
}

impl DataFormat {
    /// Every format.
    pub const ALL: &'static [DataFormat] = &[
        DataFormat::Text,
        DataFormat::Sharegpt,
        DataFormat::Openai,
        DataFormat::Alpaca,
        DataFormat::Dpo,
        DataFormat::PromptAnswer,
    ];
    /// The conversation formats (SFT, LoRA).
    pub const CHAT: &'static [DataFormat] = &[DataFormat::Sharegpt, DataFormat::Openai, DataFormat::Alpaca];

    /// The recipe spelling (`format = "prompt_answer"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Text => "text",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::Openai => "openai",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Dpo => "dpo",
            DataFormat::PromptAnswer => "prompt_answer",
        }
    }
}

/// What to do with a record that cannot be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRecord {
    /// Stop with an error naming file:line (default).
    #[default]
    Error,
    /// Skip it, count it in the run record and write it to the run's `rejects.jsonl`.
    Skip,
}

/// `[datasets.<name>]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// A local file, directory or glob (relative to the recipe), an `hf://` URI, or `builtin:<name>`.
    pub source: String,
    /// How records are read.
    pub format: DataFormat,
    /// Rename source columns to the names the format expects, e.g. `{ messages = "conversations" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    /// `error` (default) or `skip`.
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// Parameters of a `builtin:` generator (e.g. `{ count = 2000 }`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub builtin: BTreeMap<String, serde_json::Value>,
}
