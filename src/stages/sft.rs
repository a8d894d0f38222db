//! `kind = "sft"`: supervised fine-tuning of a model on conversations, with the loss on assistant
//! turns only (the chat template and masks of spec §7.2). Produces a `Model`.

use super::{InputRef, Stage, StageContext, StageOutcome, StageParams};
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::train::fit::{self, Hyper};
use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Parameters of an `sft` stage. Defaults follow the reference's `train_full_sft.py` (spec §9)
/// except the batch and sequence sizes, which are smaller for CPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SftParams {
    /// Stage whose model is fine-tuned.
    pub from: String,
    /// Stage whose tokenizer (and chat template) renders the data (default: the `from` model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Dataset in a chat format (`sharegpt`, `openai`, `alpaca`).
    pub data: String,
    /// Longest conversation in tokens (longer ones are truncated).
    #[serde(default = "d_seq")]
    pub max_seq_len: usize,
    /// Rows per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Passes over the data (ignored when `max_steps` is set).
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Stop after this many optimiser steps instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Peak learning rate (cosine to 10 % of it).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Linear warmup in micro-steps (the reference has none).
    #[serde(default)]
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Micro-batches per optimiser step.
    #[serde(default = "d_accum")]
    pub accumulation_steps: usize,
    /// Probability of adding a random system prompt to a conversation without one (reference 0.2).
    #[serde(default)]
    pub system_prompt_ratio: f64,
    /// Probability of removing an empty `<think>` block (reference 0.8).
    #[serde(default)]
    pub drop_empty_think_ratio: f64,
    /// Pad every row to `max_seq_len` like the reference, instead of to the batch's longest row.
    #[serde(default)]
    pub pad_to_max: bool,
    /// Seed for data order and the chat coins (default: the recipe's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Checkpoint every N optimiser steps (cosmetic).
    #[serde(default = "d_save")]
    pub save_every: usize,
    /// Progress refresh every N steps (cosmetic).
    #[serde(default = "d_log")]
    pub log_every: usize,
}

fn d_seq() -> usize {
    512
}
fn d_batch() -> usize {
    8
}
fn d_epochs() -> usize {
    2
}
fn d_lr() -> f64 {
    1e-5
}
fn d_wd() -> f64 {
    0.01
}
fn d_clip() -> f64 {
    1.0
}
fn d_accum() -> usize {
    1
}
fn d_save() -> usize {
    100
}
fn d_log() -> usize {
    10
}

impl SftParams {
    fn hyper(&self) -> Hyper {
        Hyper {
            max_seq_len: self.max_seq_len,
            batch_size: self.batch_size,
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            accumulation_steps: self.accumulation_steps,
            save_every: self.save_every,
            log_every: self.log_every,
            seed: self.seed,
            packing: false,
            pad_to_max: self.pad_to_max,
        }
    }
}

impl StageParams for SftParams {
    const COSMETIC: &'static [&'static str] = &["save_every", "log_every"];

    fn inputs(&self) -> Vec<InputRef> {
        let mut v =
            vec![InputRef::Stage { param: "from", stage: self.from.clone(), accepts: vec![ArtifactKind::Model] }];
        if let Some(t) = &self.tokenizer {
            v.push(InputRef::Stage {
                param: "tokenizer",
                stage: t.clone(),
                accepts: vec![ArtifactKind::Tokenizer, ArtifactKind::Model],
            });
        }
        v.push(InputRef::Dataset { param: "data", dataset: self.data.clone() });
        v
    }
}

/// The `sft` stage kind.
pub struct SftStage;

impl Stage for SftStage {
    const KIND: &'static str = "sft";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str = "Supervised fine-tuning on conversations (loss on assistant turns only)";
    type Params = SftParams;

    fn run(&self, ctx: &mut StageContext<'_>, p: &SftParams) -> anyhow::Result<StageOutcome> {
        let compute = crate::train::device::Compute::for_recipe(&ctx.recipe.meta)?;
        let h = p.hyper();
        let base = ctx.inputs.artifact(&p.from)?.clone();
        let tok = match &p.tokenizer {
            Some(t) => ctx.inputs.artifact(t)?.clone(),
            None => base.clone(),
        };
        let (vocab, _, _) = fit::tokenizer_info(&tok).with_context(|| {
            format!("sft stage '{}': the tokenizer comes from stage '{}'", ctx.name, tok.manifest.stage_kind)
        })?;
        let model =
            compute.load_model(&base.dir, true).with_context(|| format!("loading the model of stage '{}'", p.from))?;
        anyhow::ensure!(
            model.config().vocab_size >= vocab,
            "model of stage '{}' has {} embeddings but its tokenizer has {vocab} tokens",
            p.from,
            model.config().vocab_size
        );
        let shard = ShardParams {
            max_seq_len: p.max_seq_len,
            system_prompt_ratio: p.system_prompt_ratio,
            drop_empty_think_ratio: p.drop_empty_think_ratio,
            seed: fit::seed(ctx, &h),
            ..ShardParams::default()
        };
        let source = fit::shard_source(ctx, &p.data, &tok, &h, shard)?;
        fit::fit_and_export(ctx, &model, &source, &h, &tok.dir)
    }
}
