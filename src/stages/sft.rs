//! `kind = "sft"`: supervised fine-tuning of a model on conversations, with the loss on assistant
//! turns only (the chat template and masks of spec §7.2). Produces a `Model`.

use super::fit;
use super::training::training_params;
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::data::spec::DataFormat;
use anyhow::Context;

training_params! {
    /// Parameters of an `sft` stage. Defaults follow the reference's `train_full_sft.py` (spec §9)
    /// except the batch and sequence sizes, which are smaller for CPUs.
    pub struct SftParams {
        /// Stage whose model is fine-tuned.
        pub from: String,
        /// Stage whose tokenizer (and chat template) renders the data (default: the `from` model's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tokenizer: Option<String>,
        /// Dataset in a chat format (`sharegpt`, `openai`, `alpaca`).
        pub data: String,
        /// Longest conversation in tokens (longer ones are truncated).
        #[serde(default = "default_max_seq_len")]
        pub max_seq_len: usize,
        /// Probability of adding a random system prompt to a conversation without one (reference 0.2).
        #[serde(default)]
        pub system_prompt_ratio: f64,
        /// Probability of removing an empty `<think>` block (reference 0.8).
        #[serde(default)]
        pub drop_empty_think_ratio: f64,
        /// Pack several short conversations into each row of up to `max_seq_len` tokens (far
        /// fewer pad tokens). Each keeps its own causal attention and RoPE positions, as if alone
        /// in its row, and its first token is not predicted from the previous one, so every
        /// conversation's loss and gradient are exactly the unpacked ones; what changes is that a
        /// row (the unit of `batch_size` and of an epoch's steps) holds several conversations.
        #[serde(default = "crate::stages::training::yes")]
        pub packing: bool,
        /// Pad every row to `max_seq_len` like the reference, instead of to the batch's longest row.
        #[serde(default)]
        pub pad_to_max: bool,
    }
    defaults { lr: 1e-5, batch_size: 8, epochs: 2, save_every: 100, log_every: 10 }
}

fn default_max_seq_len() -> usize {
    512
}

impl StageParams for SftParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

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
        v.push(InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::ALL });
        v
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        self.validate_training()?;
        crate::stages::training::at_least("max_seq_len", self.max_seq_len, 2)
    }
}

/// The `sft` stage kind.
pub struct SftStage;

impl StageKind for SftStage {
    const KIND: &'static str = "sft";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str = "Supervised fine-tuning on conversations (loss on assistant turns only)";
    type Params = SftParams;
}

impl Stage for SftStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &SftParams) -> anyhow::Result<StageOutcome> {
        let compute = ctx.compute()?;
        let opts = p.train_options(ctx);
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
            seed: opts.seed,
            ..ShardParams::default()
        };
        let source = fit::shard_source(ctx, &p.data, &tok, &shard, p.packing, p.pad_to_max, opts.seed)?;
        fit::fit_and_export(ctx, &model, &source, &opts, &tok.dir)
    }
}
