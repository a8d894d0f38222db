//! Stub stage kinds for the loader's and planner's unit tests, so they do not depend on the real
//! stages (owned elsewhere and still moving). Shapes mirror the real ones in DESIGN.md §2.

use super::{DynStageKind, InputRef, StageKind, StageParams};
use crate::artifact::ArtifactKind;
use crate::data::spec::DataFormat;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Stub `tokenizer`.
pub(crate) struct Tok;
/// Stub `pretrain`.
pub(crate) struct Pretrain;
/// Stub `sft`.
pub(crate) struct Sft;
/// Stub `eval`.
pub(crate) struct Eval;

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokParams {
    data: Vec<String>,
    #[serde(default = "vocab")]
    vocab_size: usize,
}
fn vocab() -> usize {
    6400
}

impl StageParams for TokParams {
    fn inputs(&self) -> Vec<InputRef> {
        self.data
            .iter()
            .map(|d| InputRef::Dataset { param: "data", dataset: d.clone(), accepts: DataFormat::ALL })
            .collect()
    }
}

/// Pretraining params: `log_every` and `threads` are cosmetic.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PretrainParams {
    tokenizer: String,
    data: String,
    #[serde(default = "lr")]
    lr: f64,
    #[serde(default = "bs")]
    batch_size: usize,
    #[serde(default = "log_every")]
    log_every: usize,
    #[serde(default)]
    threads: usize,
}
fn lr() -> f64 {
    5e-4
}
fn bs() -> usize {
    32
}
fn log_every() -> usize {
    10
}

impl StageParams for PretrainParams {
    const COSMETIC: &'static [&'static str] = &["log_every", "threads"];
    fn inputs(&self) -> Vec<InputRef> {
        vec![
            InputRef::Stage {
                param: "tokenizer",
                stage: self.tokenizer.clone(),
                accepts: vec![ArtifactKind::Tokenizer],
            },
            InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::ALL },
        ]
    }
}

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SftParams {
    from: String,
    data: String,
    #[serde(default)]
    max_steps: Option<usize>,
    #[serde(default = "lr")]
    lr: f64,
    #[serde(default = "log_every")]
    log_every: usize,
}

impl StageParams for SftParams {
    const COSMETIC: &'static [&'static str] = &["log_every"];
    fn inputs(&self) -> Vec<InputRef> {
        vec![
            InputRef::Stage { param: "from", stage: self.from.clone(), accepts: vec![ArtifactKind::Model] },
            InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::ALL },
        ]
    }
}

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvalParams {
    models: Vec<String>,
    #[serde(default)]
    prompts: Vec<String>,
    #[serde(default)]
    print_samples: bool,
    #[serde(default)]
    generation: Generation,
}

#[derive(Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Generation {
    #[serde(default)]
    temperature: f64,
    #[serde(default)]
    max_new_tokens: usize,
}

impl StageParams for EvalParams {
    const COSMETIC: &'static [&'static str] = &["print_samples"];
    fn inputs(&self) -> Vec<InputRef> {
        self.models
            .iter()
            .map(|m| InputRef::Stage {
                param: "models",
                stage: m.clone(),
                accepts: vec![ArtifactKind::Model, ArtifactKind::Adapter],
            })
            .collect()
    }
}

macro_rules! stub {
    ($t:ty, $kind:literal, $out:expr, $params:ty, $ver:literal) => {
        impl StageKind for $t {
            const KIND: &'static str = $kind;
            const VERSION: u32 = $ver;
            const OUTPUT: ArtifactKind = $out;
            const DOC: &'static str = concat!("stub ", $kind);
            type Params = $params;
        }
    };
}

stub!(Tok, "tokenizer", ArtifactKind::Tokenizer, TokParams, 1);
stub!(Pretrain, "pretrain", ArtifactKind::Model, PretrainParams, 1);
stub!(Sft, "sft", ArtifactKind::Model, SftParams, 1);
stub!(Eval, "eval", ArtifactKind::EvalReport, EvalParams, 1);

/// The stub registry.
pub(crate) fn registry() -> Vec<&'static dyn DynStageKind> {
    vec![&Tok, &Pretrain, &Sft, &Eval]
}

/// A registry whose `pretrain` has another VERSION (to test "stage version 1 → 2").
pub(crate) struct PretrainV2;
stub!(PretrainV2, "pretrain", ArtifactKind::Model, PretrainParams, 2);

/// A valid recipe in the DESIGN.md shape, using the stubs.
pub(crate) const GOOD: &str = r#"[recipe]
name = "demo"
seed = 42
device = "cpu"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"

[datasets.chat]
source = "hf://datasets/owner/name@main/chat.jsonl"
format = "sharegpt"
columns = { messages = "conversations" }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 512

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
lr = 5e-4

[stages.sft]
kind = "sft"
from = "base"
data = "chat"

[stages.report]
kind = "eval"
models = ["base", "sft"]
prompts = ["1+1="]
"#;
