//! `kind = "pretrain"`: next-token training on plain text, from scratch (the recipe's `[model]`,
//! vocabulary from the tokenizer) or continuing `from` a model. Produces a `Model`.

use super::{InputRef, Stage, StageContext, StageOutcome, StageParams};
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::model::ModelConfig;
use crate::train::fit::{self, Hyper};
use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Parameters of a `pretrain` stage. Defaults follow the reference's `train_pretrain.py` (spec §9)
/// where that is sensible on a CPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PretrainParams {
    /// Stage producing the tokenizer (required unless `from` is given, whose tokenizer is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Continue from this stage's model instead of initialising the recipe's `[model]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Dataset (format `text`) to train on.
    pub data: String,
    /// Longest sequence in tokens (BOS + text + EOS; longer texts are truncated).
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
    /// Peak learning rate (cosine to 10 % of it, spec §8).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Linear warmup in micro-steps (the reference has none).
    #[serde(default)]
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay (PyTorch default, applied to every parameter).
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Micro-batches per optimiser step.
    #[serde(default = "d_accum")]
    pub accumulation_steps: usize,
    /// Pack several short documents into each row (fewer pad tokens; attention is not masked
    /// between packed documents).
    #[serde(default)]
    pub packing: bool,
    /// Pad every row to `max_seq_len` like the reference, instead of to the batch's longest row.
    #[serde(default)]
    pub pad_to_max: bool,
    /// Seed for initialisation and data order (default: the recipe's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Checkpoint every N optimiser steps (cosmetic: resuming is exact either way).
    #[serde(default = "d_save")]
    pub save_every: usize,
    /// Progress refresh every N steps (cosmetic; metrics are logged every step).
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
    1
}
fn d_lr() -> f64 {
    5e-4
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

impl PretrainParams {
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
            packing: self.packing,
            pad_to_max: self.pad_to_max,
        }
    }
}

impl StageParams for PretrainParams {
    const COSMETIC: &'static [&'static str] = &["save_every", "log_every"];

    fn inputs(&self) -> Vec<InputRef> {
        let mut v = Vec::new();
        if let Some(t) = &self.tokenizer {
            v.push(InputRef::Stage {
                param: "tokenizer",
                stage: t.clone(),
                accepts: vec![ArtifactKind::Tokenizer, ArtifactKind::Model],
            });
        }
        if let Some(f) = &self.from {
            v.push(InputRef::Stage { param: "from", stage: f.clone(), accepts: vec![ArtifactKind::Model] });
        }
        v.push(InputRef::Dataset { param: "data", dataset: self.data.clone() });
        v
    }
}

/// The `pretrain` stage kind.
pub struct PretrainStage;

/// The recipe's `[model]` with the tokenizer's vocabulary.
fn model_config(ctx: &StageContext<'_>, vocab: usize) -> anyhow::Result<ModelConfig> {
    let cfg = crate::recipe::resolve_model(&ctx.recipe.model, Some(vocab))
        .map_err(|e| anyhow::anyhow!("[model] in {}: {e}", ctx.recipe.path.display()))?;
    anyhow::ensure!(
        cfg.vocab_size >= vocab,
        "[model] vocab_size = {} is smaller than the tokenizer's vocabulary ({vocab}); remove it to use the tokenizer's",
        cfg.vocab_size
    );
    Ok(cfg)
}

impl Stage for PretrainStage {
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str = "Pretrain a MiniMind model on plain text (from scratch or from a model)";
    type Params = PretrainParams;

    fn run(&self, ctx: &mut StageContext<'_>, p: &PretrainParams) -> anyhow::Result<StageOutcome> {
        let compute = crate::train::device::Compute::for_recipe(&ctx.recipe.meta)?;
        let h = p.hyper();
        let tok_stage = match (&p.tokenizer, &p.from) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => f.clone(),
            (None, None) => bail!(
                "pretrain stage '{}' needs `tokenizer = \"<stage>\"` (or `from = \"<model stage>\"`) to tokenise its data",
                ctx.name
            ),
        };
        let tok = ctx.inputs.artifact(&tok_stage)?.clone();
        let (vocab, bos, eos) = fit::tokenizer_info(&tok)?;
        let model = match &p.from {
            Some(f) => {
                let art = ctx.inputs.artifact(f)?;
                let m = compute.load_model(&art.dir, true).with_context(|| format!("loading model of stage '{f}'"))?;
                anyhow::ensure!(
                    m.config().vocab_size >= vocab,
                    "model of stage '{f}' has {} embeddings but tokenizer '{tok_stage}' has {vocab} tokens",
                    m.config().vocab_size
                );
                m
            }
            None => {
                let mut cfg = model_config(ctx, vocab)?;
                cfg.bos_token_id = bos.unwrap_or(cfg.bos_token_id);
                cfg.eos_token_id = eos.unwrap_or(cfg.eos_token_id);
                compute.new_model(&cfg, fit::seed(ctx, &h))?
            }
        };
        let shard = ShardParams { max_seq_len: p.max_seq_len, ..ShardParams::default() };
        let source = fit::shard_source(ctx, &p.data, &tok, &h, shard)?;
        fit::fit_and_export(ctx, &model, &source, &h, &tok.dir)
    }
}
