//! What the full-model trainer stages (pretrain, SFT) share: tokenised data, the training loop
//! around a [`MiniMind`], and writing the `Model` artifact.

use super::{StageContext, StageOutcome};
use crate::artifact::Artifact;
use crate::data::shards::{ShardParams, TokenShards};
use crate::model::MiniMind;
use crate::train::batch::BatchSource;
use crate::train::data_source::ShardSource;
use crate::train::trainer::{train, LossOutput, TrainOptions, TrainSummary};
use anyhow::Context;
use std::path::Path;

/// Dataset `data` tokenised with the tokenizer files of `tok`: built once into the cache's
/// `shards-v1` bucket, its rejects recorded in this run. (Its format was checked against what the
/// stage declares when the recipe loaded, and again when it was planned.)
pub fn tokenize(
    ctx: &StageContext<'_>,
    data: &str,
    tok: &Artifact,
    shard: &ShardParams,
) -> anyhow::Result<TokenShards> {
    let ds = ctx.inputs.dataset(data)?;
    crate::data::shards::tokenized(ctx.cache, ds, tok, shard, ctx.cancel, Some(ctx.run as _))
        .with_context(|| format!("tokenising dataset '{data}' for stage '{}'", ctx.name))
}

/// Tokenise dataset `data` (see [`tokenize`]) and wrap it as batches of `shard.max_seq_len`
/// tokens at most (`packing` short documents together, padding each batch to its longest row or,
/// with `pad_to_max`, to `max_seq_len` like the reference).
pub fn shard_source(
    ctx: &StageContext<'_>,
    data: &str,
    tok: &Artifact,
    shard: &ShardParams,
    packing: bool,
    pad_to_max: bool,
    seed: u64,
) -> anyhow::Result<ShardSource> {
    let shards = tokenize(ctx, data, tok, shard)?;
    anyhow::ensure!(
        !shards.is_empty(),
        "dataset '{data}' has no usable examples after tokenisation (stage '{}'); check its format and content",
        ctx.name
    );
    let t = &shards.meta().totals;
    if t.truncated > 0 {
        // A cut conversation silently loses its later turns (e.g. a tool call's arguments, the
        // tool result and the answer behind a long tools header), so say it loudly.
        tracing::warn!(
            stage = ctx.name,
            "{} of {} conversations in '{data}' are longer than max_seq_len = {} and were cut: their later \
             turns are not trained; raise max_seq_len",
            t.truncated,
            t.samples,
            shard.max_seq_len
        );
    }
    Ok(ShardSource::new(shards, shard.max_seq_len, packing, pad_to_max, seed))
}

/// Train `model` on `source` with `opts` (see the stages' `train_options()`), then write the
/// `Model` artifact with the tokenizer files of `tokenizer_dir`.
pub fn fit_and_export(
    ctx: &StageContext<'_>,
    model: &MiniMind,
    source: &dyn BatchSource,
    opts: &TrainOptions,
    tokenizer_dir: &Path,
) -> anyhow::Result<StageOutcome> {
    let device = model.device().clone();
    let summary: TrainSummary = train(model.params(), source, opts, ctx.cancel, |b| {
        let ids = b.input_tensor(&device)?;
        let labels = b.label_tensor(&device)?;
        let (ce, aux) = model.forward_train_packed(&ids, &labels, b.doc_positions()?.as_ref())?;
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
