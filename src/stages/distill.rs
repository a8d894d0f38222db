//! `kind = "distill"`: knowledge distillation (spec §15). A student (`from`) is trained on
//! conversations with `alpha · CE + (1 − alpha) · T² · KL(teacher_T ‖ student_T)` over the
//! label-masked tokens (the assistant turns, as in SFT), where `teacher_T` and `student_T` are the
//! next-token distributions softened by `temperature`. The teacher is any model the recipe can
//! name (a bigger or MoE stage, or a released model) with the *same vocabulary*: a teacher whose
//! tokenizer maps any token differently, or whose embedding count differs, is refused with the
//! first differing token, because per-token KL between different vocabularies compares unrelated
//! ids. Produces a `Model`.
//!
//! Parity with the reference (`train_distillation.py`): the same loss, `kl_div(…, "batchmean")`
//! over the trained tokens (a per-token mean), the MoE aux loss of the student added, the teacher
//! in eval mode; defaults `alpha = 0.5`, `temperature = 1.5`. One deliberate difference: the
//! reference truncates the teacher's logits to the student's vocabulary size when they differ
//! (which silently misaligns ids if the tokenizers differ); mmrun refuses such a teacher instead.
//!
//! The stage also scores the first `eval_examples` examples before and after training
//! (`before/ce`, `before/kd`, `after/ce`, `after/kd`) and the teacher's own cross-entropy there
//! (`teacher/ce`), so a run says how much closer to the teacher the student came.
//!
//! Reasoning distillation, the other half of the reference's §15 course, needs no stage of its
//! own: it is SFT (or this stage) on conversations whose assistant turns carry the teacher's
//! reasoning, as `reasoning_content` fields or inline `<think>…</think>` blocks. The chat template
//! renders `reasoning_content` as a `<think>` block and the loss mask trains it with the answer
//! (spec §7.2); `drop_empty_think_ratio` thins out the empty blocks of samples without reasoning.

use super::fit;
use super::training::training_params;
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::align::distill::{evaluate_distill, train_distill, DistillConfig};
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::data::spec::DataFormat;
use crate::train::BatchSource;
use anyhow::Context;

training_params! {
    /// Parameters of a `distill` stage. Defaults follow the reference's
    /// `train_distillation.py` (spec §9, §15) except the batch size, which is smaller for CPUs.
    pub struct DistillParams {
        /// Stage whose model is the student (trained, and the stage's output).
        pub from: String,
        /// Stage whose model is the teacher (frozen; same tokenizer as the student).
        pub teacher: String,
        /// Dataset in a chat format (`sharegpt`, `openai`, `alpaca`), rendered with the student's
        /// chat template; the loss covers the assistant turns.
        pub data: String,
        /// Weight of the label cross-entropy; `1 − alpha` weighs the distillation term.
        #[serde(default = "default_alpha")]
        pub alpha: f64,
        /// Softmax temperature of the distillation term (its gradient is scaled back by `T²`).
        #[serde(default = "default_temperature")]
        pub temperature: f64,
        /// Longest conversation in tokens (longer ones are truncated).
        #[serde(default = "default_max_seq_len")]
        pub max_seq_len: usize,
        /// Probability of adding a random system prompt to a conversation without one.
        #[serde(default)]
        pub system_prompt_ratio: f64,
        /// Probability of removing an empty `<think>` block.
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
        /// Examples (the first ones) scored before and after training for the stage's metrics.
        #[serde(default = "default_eval_examples")]
        pub eval_examples: usize,
    }
    defaults { lr: 5e-6, batch_size: 8, epochs: 1, save_every: 100, log_every: 10 }
}

fn default_alpha() -> f64 {
    0.5
}
fn default_temperature() -> f64 {
    1.5
}
fn default_max_seq_len() -> usize {
    512
}
fn default_eval_examples() -> usize {
    64
}

impl StageParams for DistillParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

    fn inputs(&self) -> Vec<InputRef> {
        let models = ArtifactKind::MODEL_INPUTS.to_vec();
        vec![
            InputRef::Stage { param: "from", stage: self.from.clone(), accepts: models.clone() },
            InputRef::Stage { param: "teacher", stage: self.teacher.clone(), accepts: models },
            InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::CHAT },
        ]
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        use crate::stages::training::{at_least, in_range};
        self.validate_training()?;
        at_least("max_seq_len", self.max_seq_len, 2)?;
        in_range(
            "alpha",
            self.alpha,
            |a| (0.0..=1.0).contains(&a),
            "use a weight in [0, 1]: 1 is plain SFT, 0 is pure distillation (the reference uses 0.5)",
        )?;
        in_range(
            "temperature",
            self.temperature,
            |t| t > 0.0,
            "use a positive temperature, e.g. temperature = 1.5 (the reference's); 1 compares the raw distributions",
        )?;
        for (key, v) in
            [("system_prompt_ratio", self.system_prompt_ratio), ("drop_empty_think_ratio", self.drop_empty_think_ratio)]
        {
            in_range(key, v, |r| (0.0..=1.0).contains(&r), "use a probability in [0, 1]")?;
        }
        Ok(())
    }
}

/// The `distill` stage kind.
pub struct DistillStage;

impl StageKind for DistillStage {
    const KIND: &'static str = "distill";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str = "Distil a teacher into a student: alpha·CE + (1−alpha)·T²·KL on assistant tokens";
    type Params = DistillParams;
}

impl Stage for DistillStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &DistillParams) -> anyhow::Result<StageOutcome> {
        let stage = ctx.name.to_string();
        let compute = ctx.compute()?;
        let opts = p.train_options(ctx);
        let from = ctx.inputs.model(&p.from, &stage)?.clone();
        let teacher_art = ctx.inputs.model(&p.teacher, &stage)?.clone();
        let why = "distillation compares next-token distributions id by id, so use a teacher trained with the \
                   student's tokenizer";
        super::training::same_vocabulary((&from, "student"), (&teacher_art, "teacher"), why)
            .with_context(|| format!("distill stage '{stage}': teacher '{}', student '{}'", p.teacher, p.from))?;
        let student = compute
            .load_model(&from.dir, true)
            .with_context(|| format!("distill stage '{stage}': loading the student from stage '{}'", p.from))?;
        let teacher = compute
            .load_model(&teacher_art.dir, false)
            .with_context(|| format!("distill stage '{stage}': loading the teacher from stage '{}'", p.teacher))?;
        let (sv, tv) = (student.config().vocab_size, teacher.config().vocab_size);
        anyhow::ensure!(
            sv == tv,
            "distill stage '{stage}': the student has {sv} token embeddings but the teacher {tv}; both must have the \
             same vocabulary size (same tokenizer and vocab_size)"
        );

        let shard = ShardParams {
            max_seq_len: p.max_seq_len,
            system_prompt_ratio: p.system_prompt_ratio,
            drop_empty_think_ratio: p.drop_empty_think_ratio,
            seed: opts.seed,
            ..ShardParams::default()
        };
        let source = fit::shard_source(ctx, &p.data, &from, &shard, p.packing, p.pad_to_max, opts.seed)?;
        let cfg = DistillConfig { alpha: p.alpha, temperature: p.temperature };
        let probe: Vec<usize> = (0..source.len().min(p.eval_examples)).collect();
        // Before any checkpoint is restored (train() does that): the starting student's numbers.
        let before = evaluate_distill(&student, &teacher, &source, &probe, p.batch_size, cfg)?;

        let run = ctx.run;
        let summary = train_distill(&student, &teacher, &source, &opts, cfg, ctx.cancel, |i, m| {
            let mut point = serde_json::to_value(m).expect("metrics serialise");
            if let Some(o) = point.as_object_mut() {
                let loss = o.remove("loss");
                o.insert("micro_step".into(), (i + 1).into());
                o.insert("distill_loss".into(), loss.unwrap_or_default());
            }
            // Metrics are best effort: a full disk must not kill a training run.
            let _ = run.metric(&stage, point);
        })?;
        crate::model::weights::export(&student, Some(&from.dir), ctx.out_dir)
            .with_context(|| format!("distill stage '{stage}': writing the model"))?;

        let after = evaluate_distill(&student, &teacher, &source, &probe, p.batch_size, cfg)?;
        let of_teacher = evaluate_distill(&teacher, &teacher, &source, &probe, p.batch_size, cfg)?;
        let mut metrics = summary.to_metrics();
        for (prefix, e) in [("before", &before), ("after", &after)] {
            metrics.insert(format!("{prefix}/ce"), e.ce.into());
            metrics.insert(format!("{prefix}/kd"), e.kd.into());
        }
        metrics.insert("teacher/ce".into(), of_teacher.ce.into());
        metrics.insert("eval_tokens".into(), after.tokens.into());
        Ok(StageOutcome { metrics })
    }
}
