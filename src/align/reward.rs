//! Reward-model training on preference pairs (Bradley-Terry) on top of the shared training loop.
//! Batches are [`super::dpo::PairRows`] batches (chosen rows first, then rejected); each row is
//! scored at its last non-pad token ([`RewardModel::scores`]).

use super::losses::{bradley_terry_loss, RewardMetrics};
use crate::cancel::CancelToken;
use crate::model::reward::RewardModel;
use crate::train::trainer::LossOutput;
use crate::train::{train, Batch, BatchSource, TrainOptions, TrainSummary};
use serde::Serialize;

/// Train `model`'s parameters (backbone and head) on pairs with the Bradley-Terry loss
/// `−log σ(r_c − r_r − margin)` (+ the MoE aux loss). `on_metrics(i, m)` is called after every
/// micro-batch with its global 0-based index (continuing after a resume).
pub fn train_reward(
    model: &RewardModel,
    data: &dyn BatchSource,
    opts: &TrainOptions,
    margin: f64,
    cancel: &CancelToken,
    mut on_metrics: impl FnMut(usize, &RewardMetrics) + Send,
) -> anyhow::Result<TrainSummary> {
    anyhow::ensure!(margin.is_finite(), "reward_model: `margin` must be a finite number, got {margin}");
    let device = model.device().clone();
    let mut micro = crate::train::checkpoint::latest(&opts.work_dir)?.map(|(_, s)| s.micro_step).unwrap_or(0);
    train(model.params(), data, opts, cancel, |b: &Batch| {
        let ids = b.input_tensor(&device)?;
        let (s, aux) = model.scores(&ids, true)?;
        let k = b.batch_size / 2;
        let out = bradley_terry_loss(&s.narrow(0, 0, k)?, &s.narrow(0, k, k)?, margin)?;
        on_metrics(micro, &out.metrics);
        micro += 1;
        Ok(LossOutput { loss: (out.loss + &aux)?, aux: Some(aux) })
    })
}

/// How a reward model ranks a set of pairs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairEval {
    /// Pairs scored.
    pub pairs: usize,
    /// Fraction whose chosen answer scores strictly higher.
    pub accuracy: f64,
    /// Mean of chosen minus rejected score.
    pub margin: f64,
}

/// Score every pair of `data` (no gradients; host numbers per batch, so memory stays flat).
pub fn evaluate_pairs(model: &RewardModel, data: &dyn BatchSource, batch_size: usize) -> anyhow::Result<PairEval> {
    let n = data.len();
    let (mut right, mut margin) = (0usize, 0f64);
    for lo in (0..n).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (lo..(lo + batch_size.max(1)).min(n)).collect();
        let b = data.batch(&idx)?;
        let s: Vec<f32> = model.scores(&b.input_tensor(model.device())?, false)?.0.detach().to_vec1()?;
        let (c, r) = s.split_at(idx.len());
        right += c.iter().zip(r).filter(|(c, r)| c > r).count();
        margin += c.iter().zip(r).map(|(c, r)| f64::from(c - r)).sum::<f64>();
    }
    let d = n.max(1) as f64;
    Ok(PairEval { pairs: n, accuracy: right as f64 / d, margin: margin / d })
}
