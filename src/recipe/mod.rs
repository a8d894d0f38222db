//! Recipes: TOML → a validated, typed [`Recipe`].
//!
//! Loading is two phases (validate, then resolve): the TOML is parsed with spans so that every
//! error names file, line, column, the offending key and a fix; stage tables are handed to their
//! stage kind's parameter struct (`deny_unknown_fields`) and canonicalised.

pub mod dag;
mod device;
mod diag;
mod kind;
mod load;
mod model;
mod overrides;
mod resources;
pub mod schema;
mod spans;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use crate::cache::spec::{check_remote_url, CacheSpec};
pub use device::{DeviceClass, DeviceSpec, UnknownDevice};
pub use diag::{did_you_mean, Diagnostic, Location};
pub use kind::{
    DynStageKind, InputRef, InvalidParam, ParamsError, ParsedParams, Ranks, RemoteSource, StageKind, StageParams,
};
pub use load::{load, load_str, RecipeError};
pub use model::{resolve_model, ModelSpecError};
pub use resources::{ExecutorKind, ResourceError, Resources};

use crate::data::spec::DatasetSpec;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A loaded and validated recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// The file it was read from.
    pub path: PathBuf,
    /// The TOML exactly as given (recorded in runs).
    pub source_text: String,
    /// `--set key.path=value` overrides applied on top of the file, in order.
    pub overrides: Vec<String>,
    /// `[recipe]`.
    pub meta: RecipeMeta,
    /// `[model]`.
    pub model: ModelSpec,
    /// `[datasets.<name>]`.
    pub datasets: BTreeMap<String, DatasetSpec>,
    /// `[stages.<name>]`, in file order.
    pub stages: Vec<StageSpec>,
    /// `[cache]`.
    pub cache: CacheSpec,
}

/// `[recipe]`: identity and global settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeMeta {
    /// Recipe name (used in run directory names).
    pub name: String,
    /// Optional free-text description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Global seed: weight init, data order, sampling.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `auto` (CUDA if built with it and present, else CPU), `cpu`, or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Training numerics: `auto` (bf16 mixed precision on CUDA and on CPUs with fast bf16 matmuls,
    /// Intel's with AMX and AMD Zen 4/5; f32 on other CPUs), `f32`, or `bf16` (mixed precision: f32 master
    /// weights and optimizer state, bf16 matmuls).
    #[serde(default)]
    pub precision: Precision,
    /// Who runs the stale stages: `local` (default) or `slurm`; `--executor` overrides it.
    #[serde(default)]
    pub executor: ExecutorKind,
    /// `[recipe.resources]`: defaults for every stage's `[stages.<name>.resources]`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub resources: Resources,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// `[recipe] precision`: the numeric policy of the training stages.
///
/// `bf16` is *mixed* precision: weights, gradients and AdamW moments stay f32; the matmuls of the
/// linear layers and the head take bf16 operands and accumulate in f32 (on the CPU through
/// `model::ops::gemm`, natively with AMX or on AMD Zen 4/5; on CUDA the activations between matmuls
/// are bf16 too); RMSNorm statistics, RoPE, softmax, the cross-entropy and the MoE router run in
/// f32. Saved weights are f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CUDA and on CPUs where bf16 matmuls outrun f32 ones: AMX (Intel Sapphire Rapids
    /// and later) or an avx512_bf16 dot product at the FMA rate (AMD Zen 4/5) (the loss curve
    /// tracks f32: `train::tests::bf16_training_tracks_the_f32_loss_curve`); f32 on other CPUs.
    #[default]
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 mixed precision, on any device (on CPUs without AMX or a fast avx512_bf16 it runs the
    /// f32 kernels on bf16-rounded operands: the same numbers, no faster).
    Bf16,
}

impl Precision {
    /// What this resolves to on a device of class `device_class` of this machine: never `Auto`.
    /// Used both by the stage keys and at run time, so `auto` keys like its resolution (a CPU with
    /// avx512_bf16 and one without key `auto` differently, as they compute differently).
    pub fn resolve(self, device_class: DeviceClass) -> Precision {
        match self {
            Precision::Auto if device_class == DeviceClass::Cuda || crate::cpu::bf16_matmul_is_fast() => {
                Precision::Bf16
            }
            Precision::Auto => Precision::F32,
            p => p,
        }
    }

    /// The recipe spelling (`"auto"`, `"f32"`, `"bf16"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

fn default_seed() -> u64 {
    42
}

/// `[model]`: a preset name and/or explicit architecture fields (explicit fields win).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// One of the presets in [`crate::model::config::PRESETS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Model width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    /// Number of decoder blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (GQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width (default hidden_size / num_attention_heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// SwiGLU width (default ceil(hidden*pi/64)*64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// Vocabulary size (normally taken from the tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// RoPE table length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// Share embedding and LM head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Dropout probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Mixture-of-experts feed-forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_moe: Option<bool>,
    /// Experts per MoE layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    /// Top-k experts per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    /// Expert FFN width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    /// Renormalise the selected top-k gate probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// MoE load-balancing loss coefficient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    /// YaRN RoPE scaling with the reference's values (its `inference_rope_scaling`): longer
    /// contexts than the model was trained at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_rope_scaling: Option<bool>,
}

/// `[stages.<name>]` after its kind validated it.
#[derive(Clone, Debug)]
pub struct StageSpec {
    /// Name in the recipe (the table key).
    pub name: String,
    /// `kind = "..."`.
    pub kind: String,
    /// Canonical params (defaults applied).
    pub params: serde_json::Value,
    /// Declared inputs (DAG edges).
    pub inputs: Vec<InputRef>,
    /// `[stages.<name>.resources]` over `[recipe.resources]` (what a cluster job asks for; not
    /// part of the key).
    pub resources: Resources,
}
