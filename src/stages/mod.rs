//! Stage plugins: one file per stage kind, all behind one trait.
//!
//! A stage kind declares its parameters once ([`crate::recipe::StageKind`]: a serde + schemars
//! struct implementing [`StageParams`]); the JSON Schema, `--set` paths, the stage key and the DAG
//! edges all come from that declaration. This module adds how each kind runs ([`Stage`]), and
//! [`REGISTRY`] lists every kind once. The executor only sees the object-safe [`DynStage`].

pub mod agent;
mod context;
pub mod distill;
pub mod dpo;
pub mod eval;
mod fit;
pub mod grpo;
pub mod lora;
pub mod model;
pub mod ppo;
pub mod prepare;
pub mod pretrain;
pub mod reward_model;
pub mod sft;
pub mod tokenizer;
mod training;

pub use crate::recipe::{DynStageKind, InputRef, InvalidParam, ParamsError, ParsedParams, StageKind, StageParams};
pub use context::{Inputs, Rank, StageContext, StageOutcome};

/// A stage kind that can run: its declaration ([`StageKind`]) plus `run`.
pub trait Stage: StageKind {
    /// Run the stage: read `ctx.inputs`, write the artifact's files into `ctx.out_dir`, keep
    /// resumable checkpoints in `ctx.work_dir`, poll `ctx.cancel`.
    fn run(&self, ctx: &mut StageContext<'_>, params: &Self::Params) -> anyhow::Result<StageOutcome>;
}

/// The object-safe face of [`Stage`], used by the planner and executor.
pub trait DynStage: DynStageKind {
    /// Run with canonical params produced by [`DynStageKind::parse_params`].
    fn run(&self, ctx: &mut StageContext<'_>, canonical: &serde_json::Value) -> anyhow::Result<StageOutcome>;
}

impl<S: Stage> DynStage for S {
    fn run(&self, ctx: &mut StageContext<'_>, canonical: &serde_json::Value) -> anyhow::Result<StageOutcome> {
        let params: S::Params = serde_json::from_value(canonical.clone())?;
        Stage::run(self, ctx, &params)
    }
}

/// Every stage kind mmrun knows, in pipeline order: the one list that the loader, the schema,
/// `--help` and the executor all read.
pub static REGISTRY: &[&dyn DynStage] = &[
    &model::ModelStage,
    &tokenizer::TokenizerStage,
    &prepare::PrepareStage,
    &pretrain::PretrainStage,
    &sft::SftStage,
    &lora::LoraStage,
    &dpo::DpoStage,
    &reward_model::RewardModelStage,
    &grpo::GrpoStage,
    &ppo::PpoStage,
    &agent::AgentStage,
    &distill::DistillStage,
    &eval::EvalStage,
];

/// [`REGISTRY`] as declarations, for [`crate::recipe::load`] and the schema.
pub fn kinds() -> Vec<&'static dyn DynStageKind> {
    REGISTRY.iter().map(|s| *s as &dyn DynStageKind).collect()
}

/// Look a stage kind up by its `kind` string.
pub fn find(kind: &str) -> Option<&'static dyn DynStage> {
    REGISTRY.iter().copied().find(|s| s.kind() == kind)
}
