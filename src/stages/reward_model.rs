//! `kind = "reward_model"`: a reward model (a causal LM backbone with a scalar `score` head) trained
//! on preference pairs with the Bradley-Terry loss `−log σ(r_chosen − r_rejected − margin)`.
//!
//! It starts `from` any model (a causal LM: the head starts at N(0, 0.02) from the stage seed; or
//! a reward model: training continues, head included) and reads a `dpo`-format dataset, tokenised
//! like DPO's (chat template, the same truncation and skipped pairs). Each side is scored at its
//! last non-pad token, as transformers' `Qwen3ForSequenceClassification` does, so the artifact
//! (kind `reward_model`) is a folder transformers loads with `AutoModelForSequenceClassification`
//! and scores identically: `config.json` (`architectures = ["Qwen3ForSequenceClassification"]`,
//! `num_labels = 1`), `model.safetensors` (`model.*` + `score.weight` `[1, hidden]`, no LM head)
//! and the tokenizer files.
//!
//! A deterministic `holdout` fraction of the pairs (drawn from the stage seed) is never trained on;
//! the stage reports pair accuracy and mean margin there before and after training
//! (`heldout_before/*`, `heldout/*`). Per micro-batch `metrics.jsonl` gets `rm_loss`, `accuracy`,
//! `margin`, `rewards/chosen`, `rewards/rejected`. The reference (spec §12) scores with an
//! external 1.8B reward model instead of training one; its value head (the PPO critic) applies
//! the final norm twice (spec §18 item 13, a bug), while this head reads the final normed hidden
//! state once, as transformers does.

use super::training::training_params;
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::align::dpo::PairRows;
use crate::align::reward::{evaluate_pairs, train_reward};
use crate::artifact::ArtifactKind;
use crate::data::shards::{tokenized, ShardParams};
use crate::data::spec::DataFormat;
use crate::model::reward::RewardModel;
use crate::train::batch::{holdout_split, Subset};
use crate::train::BatchSource;
use anyhow::{bail, Context};

training_params! {
    /// Parameters of a `reward_model` stage.
    pub struct RewardModelParams {
        /// Stage whose model is the starting point (a causal LM, a merged LoRA stage, or a reward
        /// model to train further).
        pub from: String,
        /// A dataset in `dpo` format (chosen/rejected pairs).
        pub data: String,
        /// How far the chosen score must exceed the rejected one before the loss stops pushing.
        #[serde(default)]
        pub margin: f64,
        /// Fraction of pairs held out for the accuracy and margin metrics (0 disables).
        #[serde(default = "default_holdout")]
        pub holdout: f64,
        /// Longest tokenised conversation (longer ones are truncated).
        #[serde(default = "default_max_len")]
        pub max_seq_len: usize,
    }
    defaults { lr: 1e-5, batch_size: 4, epochs: 1, save_every: 100, log_every: 10 }
}

fn default_holdout() -> f64 {
    0.1
}
fn default_max_len() -> usize {
    512
}

impl StageParams for RewardModelParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

    fn inputs(&self) -> Vec<InputRef> {
        let mut accepts = ArtifactKind::MODEL_INPUTS.to_vec();
        accepts.push(ArtifactKind::RewardModel);
        vec![
            InputRef::Stage { param: "from", stage: self.from.clone(), accepts },
            InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: &[DataFormat::Dpo] },
        ]
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        use crate::stages::training::{at_least, in_range};
        self.validate_training()?;
        at_least("max_seq_len", self.max_seq_len, 2)?;
        in_range(
            "margin",
            self.margin,
            |m| m >= 0.0,
            "use margin = 0 (plain Bradley-Terry) or a small positive number",
        )?;
        in_range(
            "holdout",
            self.holdout,
            |h| (0.0..1.0).contains(&h),
            "use a fraction in [0, 1), e.g. holdout = 0.1 (0 trains on every pair and reports no held-out metrics)",
        )
    }
}

/// The `reward_model` stage kind.
pub struct RewardModelStage;

impl StageKind for RewardModelStage {
    const KIND: &'static str = "reward_model";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::RewardModel;
    const DOC: &'static str =
        "Train a reward model (backbone + scalar head, Bradley-Terry on preference pairs; Qwen3ForSequenceClassification layout)";
    type Params = RewardModelParams;
}

impl Stage for RewardModelStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &RewardModelParams) -> anyhow::Result<StageOutcome> {
        let stage = ctx.name.to_string();
        let compute = ctx.compute()?;
        let seed = p.seed_or(ctx.recipe.meta.seed);
        let ds = ctx.inputs.dataset(&p.data)?;
        if ds.spec.format != DataFormat::Dpo {
            bail!(
                "reward_model stage '{stage}': dataset '{}' has format {:?}; it needs format = \"dpo\" (chosen/rejected pairs)",
                p.data,
                ds.spec.format
            );
        }
        let from = ctx.inputs.model(&p.from, &stage)?;
        let sp = ShardParams { max_seq_len: p.max_seq_len, seed, ..ShardParams::default() };
        let shards = tokenized(ctx.cache, ds, from, &sp, ctx.cancel, Some(ctx.run as _))
            .with_context(|| format!("reward_model stage '{stage}': tokenising dataset '{}'", p.data))?;
        let (pairs, skipped) = PairRows::from_shards(shards);
        let (train_idx, held_idx) = holdout_split(pairs.len(), p.holdout, seed);
        if train_idx.is_empty() {
            bail!(
                "reward_model stage '{stage}': no usable pairs to train on in '{}' ({} usable, {} lost their answer to \
                 max_seq_len = {}, {} identical after truncation); raise max_seq_len or check the data",
                p.data,
                pairs.len(),
                skipped.no_answer,
                p.max_seq_len,
                skipped.identical
            );
        }
        let (train_set, held) = (Subset::new(&pairs, train_idx), Subset::new(&pairs, held_idx));

        let mut model = RewardModel::load_dir(&from.dir, &compute.device, true, seed, pairs.pad_id())
            .with_context(|| format!("reward_model stage '{stage}': loading the model of stage '{}'", p.from))?;
        compute.apply(model.backbone_mut())?;
        // Before any checkpoint is restored (train() does that): the starting point's numbers.
        let before = (!held.is_empty()).then(|| evaluate_pairs(&model, &held, p.batch_size)).transpose()?;

        let opts = p.train_options(ctx);
        let run = ctx.run;
        let summary = train_reward(&model, &train_set, &opts, p.margin, ctx.cancel, |i, m| {
            let mut point = serde_json::to_value(m).expect("metrics serialise");
            if let Some(o) = point.as_object_mut() {
                let loss = o.remove("loss");
                o.insert("micro_step".into(), (i + 1).into());
                o.insert("rm_loss".into(), loss.unwrap_or_default());
            }
            // Metrics are best effort: a full disk must not kill a training run.
            let _ = run.metric(&stage, point);
        })?;
        model
            .export(Some(&from.dir), ctx.out_dir)
            .with_context(|| format!("reward_model stage '{stage}': writing the reward model"))?;

        let after = (!held.is_empty()).then(|| evaluate_pairs(&model, &held, p.batch_size)).transpose()?;
        let mut metrics = summary.to_metrics();
        for (prefix, eval) in [("heldout_before", before), ("heldout", after)] {
            if let Some(e) = eval {
                metrics.insert(format!("{prefix}/accuracy"), e.accuracy.into());
                metrics.insert(format!("{prefix}/margin"), e.margin.into());
            }
        }
        metrics.insert("train_pairs".into(), train_set.len().into());
        metrics.insert("heldout_pairs".into(), held.len().into());
        metrics.insert("skipped_no_answer".into(), skipped.no_answer.into());
        metrics.insert("skipped_identical".into(), skipped.identical.into());
        Ok(StageOutcome { metrics })
    }
}
