//! `kind = "pretrain"`: next-token training on plain text, from scratch (the recipe's `[model]`,
//! vocabulary from the tokenizer) or continuing `from` a model. Produces a `Model`.

use super::fit;
use super::training::training_params;
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::data::spec::DataFormat;
use crate::model::ModelConfig;
use anyhow::{bail, Context};

training_params! {
    /// Parameters of a `pretrain` stage. Defaults follow the reference's `train_pretrain.py`
    /// (spec §9) where that is sensible on a CPU.
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
        #[serde(default = "default_max_seq_len")]
        pub max_seq_len: usize,
        /// Pack several short documents into each row (fewer pad tokens). Each document keeps its
        /// own causal attention and RoPE positions and is not predicted from the one before, as
        /// in sft. Off by default: the reference pretrains one document per padded row, and
        /// staying with that keeps loss curves and step counts comparable with it.
        #[serde(default)]
        pub packing: bool,
        /// Pad every row to `max_seq_len` like the reference, instead of to the batch's longest row.
        #[serde(default)]
        pub pad_to_max: bool,
    }
    defaults { lr: 5e-4, batch_size: 8, epochs: 1, save_every: 100, log_every: 10 }
}

fn default_max_seq_len() -> usize {
    512
}

impl StageParams for PretrainParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

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
        v.push(InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::ALL });
        v
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        self.validate_training()?;
        crate::stages::training::at_least("max_seq_len", self.max_seq_len, 2)
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

impl StageKind for PretrainStage {
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str = "Pretrain a MiniMind model on plain text (from scratch or from a model)";
    type Params = PretrainParams;
}

impl Stage for PretrainStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &PretrainParams) -> anyhow::Result<StageOutcome> {
        let compute = ctx.compute()?;
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
                compute.new_model(&cfg, p.seed_or(ctx.recipe.meta.seed))?
            }
        };
        let shard = ShardParams { max_seq_len: p.max_seq_len, ..ShardParams::default() };
        let opts = p.train_options(ctx);
        let source = fit::shard_source(ctx, &p.data, &tok, &shard, p.packing, p.pad_to_max, opts.seed)?;
        fit::fit_and_export(ctx, &model, &source, &opts, &tok.dir)
    }
}
