//! Knowledge distillation (spec §15) on top of the shared training loop: the student learns the
//! labels and the teacher's temperature-softened next-token distribution on the trained (label-
//! masked) tokens of SFT batches. The teacher is frozen and runs in eval mode (no MoE aux loss).

use super::losses::{distill_loss, DistillMetrics};
use crate::cancel::CancelToken;
use crate::model::{shift_labels, MiniMind};
use crate::train::trainer::LossOutput;
use crate::train::{train, Batch, BatchSource, TrainOptions, TrainSummary};
use candle_core::Tensor;
use serde::Serialize;

/// The distillation hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillConfig {
    /// Weight of the label cross-entropy; `1 − alpha` weighs the distillation term.
    pub alpha: f64,
    /// Softmax temperature of both distributions in the distillation term.
    pub temperature: f64,
}

/// The loss of one batch: student logits (with gradients), teacher logits (constants).
fn batch_loss(
    student: &MiniMind,
    teacher: &MiniMind,
    b: &Batch,
    cfg: DistillConfig,
    train: bool,
) -> candle_core::Result<(super::losses::DistillOutput, Tensor)> {
    let device = student.device();
    let ids = b.input_tensor(device)?;
    let targets = shift_labels(&b.label_tensor(device)?)?;
    let docs = b.doc_positions()?;
    let (h, aux) = student.forward_hidden_packed(&ids, docs.as_ref(), train)?;
    let v = student.config().vocab_size;
    let s = student.logits(&h)?.reshape((b.batch_size * b.seq_len, v))?;
    let (th, _) = teacher.forward_hidden_packed(&ids, docs.as_ref(), false)?;
    let t = teacher.logits(&th)?.detach().reshape((b.batch_size * b.seq_len, v))?;
    Ok((distill_loss(&s, &t, &targets, cfg.alpha, cfg.temperature)?, aux))
}

/// Train `student` towards `teacher` (frozen, same vocabulary). `on_metrics(i, m)` is called after
/// every micro-batch with its global 0-based index (continuing after a resume).
pub fn train_distill(
    student: &MiniMind,
    teacher: &MiniMind,
    data: &dyn BatchSource,
    opts: &TrainOptions,
    cfg: DistillConfig,
    cancel: &CancelToken,
    mut on_metrics: impl FnMut(usize, &DistillMetrics) + Send,
) -> anyhow::Result<TrainSummary> {
    anyhow::ensure!((0.0..=1.0).contains(&cfg.alpha), "distill: `alpha` must be in [0, 1], got {}", cfg.alpha);
    anyhow::ensure!(
        cfg.temperature > 0.0 && cfg.temperature.is_finite(),
        "distill: `temperature` must be positive, got {}",
        cfg.temperature
    );
    anyhow::ensure!(teacher.params().is_empty(), "distill: the teacher must be frozen");
    anyhow::ensure!(
        student.config().vocab_size == teacher.config().vocab_size,
        "distill: the student has {} embeddings but the teacher {}",
        student.config().vocab_size,
        teacher.config().vocab_size
    );
    let mut micro = crate::train::checkpoint::latest(&opts.work_dir)?.map(|(_, s)| s.micro_step).unwrap_or(0);
    train(student.params(), data, opts, cancel, |b: &Batch| {
        let (out, aux) = batch_loss(student, teacher, b, cfg, true)?;
        on_metrics(micro, &out.metrics);
        micro += 1;
        Ok(LossOutput { loss: (out.loss + &aux)?, aux: Some(aux) })
    })
}

/// Token-weighted means of a model pair on some examples (no gradients).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistillEval {
    /// Trained tokens scored.
    pub tokens: usize,
    /// The student's cross-entropy on the labels.
    pub ce: f64,
    /// `T² · KL(teacher_T ‖ student_T)` per token.
    pub kd: f64,
}

/// Score `examples` of `data` (in batches of `batch_size`): how well the student predicts the
/// labels and how far it is from the teacher. With `student = teacher`, `ce` is the teacher's.
pub fn evaluate_distill(
    student: &MiniMind,
    teacher: &MiniMind,
    data: &dyn BatchSource,
    examples: &[usize],
    batch_size: usize,
    cfg: DistillConfig,
) -> anyhow::Result<DistillEval> {
    let (mut tokens, mut ce, mut kd) = (0usize, 0f64, 0f64);
    for chunk in examples.chunks(batch_size.max(1)) {
        let (out, _) = batch_loss(student, teacher, &data.batch(chunk)?, cfg, false)?;
        let m = &out.metrics;
        tokens += m.tokens;
        ce += f64::from(m.ce) * m.tokens as f64;
        kd += f64::from(m.kd) * m.tokens as f64;
    }
    let d = tokens.max(1) as f64;
    Ok(DistillEval { tokens, ce: ce / d, kd: kd / d })
}
