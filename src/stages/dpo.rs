//! `kind = "dpo"`: Direct Preference Optimisation (spec §11) of a model on a `dpo`-format dataset.
//!
//! The policy starts `from` a model; the frozen reference is the same starting weights unless
//! `reference` names another stage. Chosen and rejected answers share one forward batch and only
//! assistant-answer tokens are scored (summed log-probs, like the reference). With `lora = { … }` only
//! adapters are trained and merged into the output model. Per micro-batch the run's `metrics.jsonl`
//! gets TRL's `rewards/chosen`, `rewards/rejected`, `rewards/accuracy`, `rewards/margin`.
//!
//! Bad pairs (missing or empty answer, chosen identical to rejected) are rejected by the data reader
//! per `on_bad_record` with file:line; pairs whose answer is truncated away by `max_seq_len`, or
//! whose two sides become identical after truncation, are skipped and counted in the stage metrics.

use super::training::{training_params, LoraParams, Policy};
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::align::dpo::{evaluate_dpo, train_dpo, PairRows};
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::data::spec::DataFormat;
use crate::model::weights;
use crate::train::BatchSource;
use anyhow::{bail, Context};

training_params! {
    /// Parameters of a `dpo` stage.
    pub struct DpoParams {
        /// Stage whose model is the starting policy (and, by default, the frozen reference).
        pub from: String,
        /// Stage whose model is the frozen reference (default: the starting policy's weights).
        #[serde(default)]
        pub reference: Option<String>,
        /// A dataset in `dpo` format.
        pub data: String,
        /// DPO temperature (the reference trains with 0.15).
        #[serde(default = "default_beta")]
        pub beta: f64,
        /// Longest tokenised conversation (longer ones are truncated).
        #[serde(default = "default_max_len")]
        pub max_seq_len: usize,
        /// Pack the chosen and rejected sequences of each batch into rows of up to `max_seq_len`
        /// tokens (fewer pad tokens). Each sequence keeps its own attention and positions and is
        /// scored on its own, and a batch still holds `batch_size` pairs, so the training is
        /// exactly the unpacked one.
        #[serde(default = "crate::stages::training::yes")]
        pub packing: bool,
        /// Train LoRA adapters instead of all weights (merged into the output model).
        #[serde(default)]
        pub lora: Option<LoraParams>,
    }
    defaults { lr: 4e-8, batch_size: 4, epochs: 1, save_every: 0, log_every: 10 }
}

fn default_beta() -> f64 {
    0.15
}
fn default_max_len() -> usize {
    1024
}

impl StageParams for DpoParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

    fn inputs(&self) -> Vec<InputRef> {
        super::training::policy_inputs(&self.from, self.reference.as_deref(), &self.data, &[DataFormat::Dpo])
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        self.validate_training()?;
        crate::stages::training::at_least("max_seq_len", self.max_seq_len, 2)?;
        crate::stages::training::in_range("beta", self.beta, |b| b > 0.0, "use a positive beta, e.g. beta = 0.1")
    }
}

/// The `dpo` stage kind.
pub struct DpoStage;

impl StageKind for DpoStage {
    const KIND: &'static str = "dpo";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str = "Direct Preference Optimisation against a frozen reference (full fine-tuning or LoRA)";
    type Params = DpoParams;
}

impl Stage for DpoStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &DpoParams) -> anyhow::Result<StageOutcome> {
        let stage = ctx.name.to_string();
        // Device and precision policy; every model below is built through it.
        let compute = ctx.compute()?;
        let seed = p.seed_or(ctx.recipe.meta.seed);
        let from = ctx.inputs.model(&p.from, &stage)?;
        let sp = ShardParams { max_seq_len: p.max_seq_len, seed, ..ShardParams::default() };
        let shards = super::fit::tokenize(ctx, &p.data, from, &sp)?;
        let (mut data, skipped) = PairRows::from_shards(shards);
        if p.packing {
            data = data.packed(p.max_seq_len);
        }
        if data.len() == 0 {
            bail!(
                "dpo stage '{stage}': no usable pairs in '{}' ({} lost their answer to max_seq_len = {}, \
                 {} identical after truncation); raise max_seq_len or check the data",
                p.data,
                skipped.no_answer,
                p.max_seq_len,
                skipped.identical
            );
        }

        let Policy { model: mut policy, adapters, reference, params } =
            Policy::load(ctx, &compute, &p.from, p.reference.as_deref(), p.lora.as_ref(), seed)?;

        let opts = p.train_options(ctx);

        let run = ctx.run;
        let summary =
            train_dpo(&policy, &params, &reference, adapters.as_ref(), &data, &opts, p.beta, ctx.cancel, |i, m| {
                let mut point = serde_json::to_value(m).expect("metrics serialise");
                if let Some(o) = point.as_object_mut() {
                    let loss = o.remove("loss");
                    o.insert("micro_step".into(), (i + 1).into());
                    o.insert("dpo_loss".into(), loss.unwrap_or_default());
                }
                // Metrics are best effort: a full disk must not kill a training run.
                let _ = run.metric(&stage, point);
            })?;

        if let Some(a) = adapters {
            a.merge(&mut policy)?;
        }
        let fin = evaluate_dpo(&policy, &reference, &data, p.beta, p.batch_size)?;
        weights::export(&policy, Some(&from.dir), ctx.out_dir)
            .with_context(|| format!("dpo stage '{stage}': writing the model"))?;

        let mut metrics = summary.to_metrics();
        for (k, v) in serde_json::to_value(&fin)?.as_object().expect("object") {
            metrics.insert(format!("final/{k}"), v.clone());
        }
        metrics.insert("pairs".into(), data.len().into());
        metrics.insert("skipped_no_answer".into(), skipped.no_answer.into());
        metrics.insert("skipped_identical".into(), skipped.identical.into());
        Ok(StageOutcome { metrics })
    }
}
