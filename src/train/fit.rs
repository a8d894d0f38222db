//! What the trainer stages (pretrain, SFT) share: hyper-parameters, tokenised data, the training
//! loop around a [`MiniMind`], and writing the `Model` artifact.

use super::batch::BatchSource;
use super::data_source::ShardSource;
use super::trainer::{train, LossOutput, TrainOptions, TrainSummary};
use crate::artifact::Artifact;
use crate::data::shards::ShardParams;
use crate::model::MiniMind;
use crate::stages::{StageContext, StageOutcome};
use anyhow::Context;
use std::path::Path;

/// Optimisation settings common to every trainer stage.
#[derive(Clone, Debug)]
pub struct Hyper {
    /// Longest sequence (tokens).
    pub max_seq_len: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Passes over the data.
    pub epochs: usize,
    /// Optimiser steps instead of epochs.
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup micro-steps.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm clip.
    pub grad_clip: f64,
    /// Micro-batches per optimiser step.
    pub accumulation_steps: usize,
    /// Checkpoint interval (steps).
    pub save_every: usize,
    /// Progress refresh interval (steps).
    pub log_every: usize,
    /// Seed override (else the recipe's).
    pub seed: Option<u64>,
    /// Pack short documents into rows.
    pub packing: bool,
    /// Pad every row to `max_seq_len` (the reference) instead of the batch's longest row.
    pub pad_to_max: bool,
}

/// The seed a stage uses: its own `seed` param, else the recipe's.
pub fn seed(ctx: &StageContext<'_>, h: &Hyper) -> u64 {
    h.seed.unwrap_or(ctx.recipe.meta.seed)
}

/// Tokenise (once, cached) dataset `data` with the tokenizer files of `tok` and wrap it as batches.
pub fn shard_source(
    ctx: &StageContext<'_>,
    data: &str,
    tok: &Artifact,
    h: &Hyper,
    shard: ShardParams,
) -> anyhow::Result<ShardSource> {
    let ds = ctx.inputs.dataset(data)?;
    let shards = crate::data::shards::tokenized(ctx.cache, ds, tok, &shard, ctx.cancel, Some(ctx.run))
        .with_context(|| format!("tokenising dataset '{data}' for stage '{}'", ctx.name))?;
    anyhow::ensure!(
        !shards.is_empty(),
        "dataset '{data}' has no usable examples after tokenisation (stage '{}'); check its format and content",
        ctx.name
    );
    Ok(ShardSource::new(shards, h.max_seq_len, h.packing, h.pad_to_max, seed(ctx, h)))
}

/// Train `model` on `source` inside stage `ctx` (checkpoints in its work dir, metrics and the loss
/// curve in its run), then write the `Model` artifact with the tokenizer files of `tokenizer_dir`.
pub fn fit_and_export(
    ctx: &StageContext<'_>,
    model: &MiniMind,
    source: &dyn BatchSource,
    h: &Hyper,
    tokenizer_dir: &Path,
) -> anyhow::Result<StageOutcome> {
    let mut o = TrainOptions::new(ctx.name, ctx.work_dir.to_path_buf());
    o.lr = h.lr;
    o.warmup_steps = h.warmup_steps;
    o.adamw.weight_decay = h.weight_decay;
    o.grad_clip = h.grad_clip;
    o.accumulation_steps = h.accumulation_steps.max(1);
    o.batch_size = h.batch_size.max(1);
    o.epochs = h.epochs;
    o.max_steps = h.max_steps;
    o.save_every = h.save_every;
    o.log_every = h.log_every;
    o.seed = seed(ctx, h);
    o.metrics_path = Some(ctx.run.dir().join("metrics.jsonl"));
    o.plot_path = Some(ctx.run.dir().join(format!("{}-loss.png", ctx.name)));
    o.progress = crate::progress::enabled();
    let device = model.device().clone();
    let summary: TrainSummary = train(model.params(), source, &o, ctx.cancel, |b| {
        let ids = b.input_tensor(&device)?;
        let labels = b.label_tensor(&device)?;
        let (ce, aux) = model.forward_train(&ids, &labels)?;
        Ok(LossOutput { loss: (ce + &aux)?, aux: Some(aux) })
    })?;
    crate::model::weights::export(model, Some(tokenizer_dir), ctx.out_dir)
        .with_context(|| format!("writing the model of stage '{}'", ctx.name))?;
    Ok(StageOutcome { metrics: summary.to_metrics() })
}

/// Vocabulary size and the ids of `<|im_start|>` / `<|im_end|>` (BOS / EOS of MiniMind tokenizers)
/// from a tokenizer (or model) artifact.
pub fn tokenizer_info(art: &Artifact) -> anyhow::Result<(usize, Option<u32>, Option<u32>)> {
    let path = art.tokenizer_json();
    let tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
    Ok((tok.get_vocab_size(true), tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")))
}
