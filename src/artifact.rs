//! Typed artifacts: what a stage produces and what downstream stages consume.
//!
//! Every artifact lives in one cache directory (`objects/<key>/`) whose `manifest.json` says what
//! kind it is. Stages never read another stage's directory directly; they receive an [`Artifact`]
//! and use the typed accessors below, so the file layout of each kind is defined in one place.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The kinds of artifact stages exchange. The planner type-checks DAG edges with these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// `tokenizer.json` + `tokenizer_config.json` (with the chat template).
    Tokenizer,
    /// Pre-tokenised, memory-mappable shards of one dataset.
    Dataset,
    /// `config.json` + `model.safetensors` + tokenizer files (a transformers-loadable folder).
    Model,
    /// LoRA weights (`adapter_model.safetensors` + `adapter_config.json`) for a base model.
    Adapter,
    /// Metrics and generations (`report.json`).
    EvalReport,
    /// A causal LM backbone with a scalar `score` head: `config.json` (architectures
    /// `Qwen3ForSequenceClassification`, `num_labels = 1`) + `model.safetensors` + tokenizer files.
    RewardModel,
}

impl ArtifactKind {
    /// What a stage that needs a full model accepts: a model, or an adapter whose stage also wrote
    /// its merged model (`merge = true`; checked when the stage runs, by `Inputs::model`).
    pub const MODEL_INPUTS: [ArtifactKind; 2] = [ArtifactKind::Model, ArtifactKind::Adapter];

    /// Human-readable name used in error messages ("a model", "a tokenizer").
    pub fn describe(self) -> &'static str {
        match self {
            ArtifactKind::Tokenizer => "a tokenizer",
            ArtifactKind::Dataset => "a tokenised dataset",
            ArtifactKind::Model => "a model",
            ArtifactKind::Adapter => "a LoRA adapter",
            ArtifactKind::EvalReport => "an eval report",
            ArtifactKind::RewardModel => "a reward model",
        }
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).expect("enum serialises");
        write!(f, "{}", s.as_str().unwrap_or("?"))
    }
}

/// One file inside an artifact directory, with its size and content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the artifact directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the content, hex.
    pub blake3: String,
}

/// `manifest.json`: written last, so an object directory is complete iff its manifest exists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// What this artifact is.
    pub kind: ArtifactKind,
    /// The stage kind that produced it (`"pretrain"`, …).
    pub stage_kind: String,
    /// The stage key (the object's directory name).
    pub key: String,
    /// mmrun version that produced it.
    pub mmrun_version: String,
    /// Unix seconds when it was published.
    pub created_unix: u64,
    /// Every file of the artifact except the manifest itself.
    pub files: Vec<FileEntry>,
    /// Final metrics the stage reported.
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// A finished artifact in the cache.
#[derive(Clone, Debug)]
pub struct Artifact {
    /// Its directory (`objects/<key>/`).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Artifact {
    /// The artifact kind.
    pub fn kind(&self) -> ArtifactKind {
        self.manifest.kind
    }

    /// The stage key that produced it.
    pub fn key(&self) -> &str {
        &self.manifest.key
    }

    /// A file inside the artifact directory.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }

    /// `tokenizer.json` of a `Tokenizer` or `Model` artifact.
    pub fn tokenizer_json(&self) -> PathBuf {
        self.path(layout::TOKENIZER_JSON)
    }

    /// `tokenizer_config.json` (chat template, special tokens) of a `Tokenizer` or `Model`.
    pub fn tokenizer_config_json(&self) -> PathBuf {
        self.path(layout::TOKENIZER_CONFIG_JSON)
    }

    /// `config.json` of a `Model` or `RewardModel`.
    pub fn model_config_json(&self) -> PathBuf {
        self.path(layout::MODEL_CONFIG_JSON)
    }

    /// `model.safetensors` of a `Model` (or a `RewardModel`: the backbone plus `score.weight`).
    pub fn model_weights(&self) -> PathBuf {
        self.path(layout::MODEL_WEIGHTS)
    }

    /// `report.json` of an `EvalReport`.
    pub fn report_json(&self) -> PathBuf {
        self.path(layout::REPORT_JSON)
    }
}

/// File names inside artifact directories; the one place the layout is spelled out.
pub mod layout {
    /// The manifest, written last.
    pub const MANIFEST: &str = "manifest.json";
    /// HF tokenizer.
    pub const TOKENIZER_JSON: &str = "tokenizer.json";
    /// HF tokenizer config (chat template, special tokens).
    pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
    /// HF model config (Qwen3 layout).
    pub const MODEL_CONFIG_JSON: &str = "config.json";
    /// Model weights with Qwen3 key names.
    pub const MODEL_WEIGHTS: &str = "model.safetensors";
    /// LoRA adapter weights (PEFT layout).
    pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
    /// LoRA adapter config (PEFT layout).
    pub const ADAPTER_CONFIG: &str = "adapter_config.json";
    /// Eval report.
    pub const REPORT_JSON: &str = "report.json";

    /// Whether the model folder `dir` holds a reward model: its `config.json` names a
    /// `*ForSequenceClassification` architecture (what a `reward_model` stage writes, and what
    /// transformers writes for `AutoModelForSequenceClassification`). Such a folder has a scalar
    /// `score` head instead of an LM head, so it cannot generate text.
    pub fn is_reward_model(dir: &std::path::Path) -> bool {
        let Ok(text) = std::fs::read_to_string(dir.join(MODEL_CONFIG_JSON)) else { return false };
        let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
        cfg["architectures"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.ends_with("ForSequenceClassification"))))
    }
}
