//! DPO training (spec §11) on top of the shared training loop: chosen and rejected answers share one
//! forward batch (chosen rows first), sequence scores are summed answer-token log-probs, the
//! reference is frozen, and TRL-style metrics are reported per micro-batch.

use super::losses::{dpo_loss, packed_sequence_logprobs, sequence_logprobs, DpoMetrics};
use crate::cancel::CancelToken;
use crate::data::shards::TokenShards;
use crate::data::tokenize::Sample;
use crate::model::lora::LoraAdapters;
use crate::model::MiniMind;
use crate::train::batch::Row;
use crate::train::trainer::LossOutput;
use crate::train::{train, Batch, BatchSource, TrainOptions, TrainSummary};
use candle_core::{Tensor, Var};

/// Tokenised preference pairs (each side: full conversation ids + answer-only mask).
///
/// Pairs read from shards stay in the memory-mapped shards: only the indices of the usable pairs
/// are held, and each batch copies out just its own rows, so memory does not grow with the
/// dataset (as the other stages' data sources).
#[derive(Debug)]
pub struct PairRows {
    pairs: Pairs,
    pad_id: u32,
    /// Pack each batch's sequences into rows of this many tokens.
    pack_to: Option<usize>,
}

#[derive(Debug)]
enum Pairs {
    /// In memory (tests, small in-process data).
    Owned(Vec<(Sample, Sample)>),
    /// Pairs `usable[i]` of DPO shards (each pair: chosen, then rejected).
    Shards { shards: Box<TokenShards>, usable: Vec<u32> },
}

/// Pairs left out of a DPO dataset, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkippedPairs {
    /// A side lost every answer token to truncation.
    pub no_answer: usize,
    /// Chosen and rejected are identical (after truncation).
    pub identical: usize,
}

impl PairRows {
    /// Pairs of (chosen, rejected) samples, right-padded with `pad_id` in batches.
    pub fn new(pairs: Vec<(Sample, Sample)>, pad_id: u32) -> Self {
        Self { pairs: Pairs::Owned(pairs), pad_id, pack_to: None }
    }

    /// The usable pairs of DPO shards, streamed from them; pairs whose answer was truncated away or
    /// whose sides are identical are left out and counted.
    pub fn from_shards(shards: TokenShards) -> (Self, SkippedPairs) {
        let mut skipped = SkippedPairs::default();
        let mut usable = Vec::new();
        for i in 0..shards.len() {
            let (c, r) = pair_of(&shards, i);
            if c.trained() == 0 || r.trained() == 0 {
                skipped.no_answer += 1;
            } else if c == r {
                skipped.identical += 1;
            } else {
                usable.push(u32::try_from(i).expect("fewer than 2^32 pairs"));
            }
        }
        let pad_id = shards.meta().pad_id;
        (Self { pairs: Pairs::Shards { shards: Box::new(shards), usable }, pad_id, pack_to: None }, skipped)
    }

    /// Pack the sequences of each batch (chosen ones, then rejected ones, in order) greedily into
    /// rows of `seq_len` tokens, each scored on its own ([`sequence_scores`]). Batches still hold
    /// `batch_size` pairs, so training is the unpacked one with fewer pad tokens.
    pub fn packed(mut self, seq_len: usize) -> Self {
        self.pack_to = Some(seq_len);
        self
    }

    /// The id padding rows carry.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Pair `i`: (chosen, rejected).
    fn pair(&self, i: usize) -> std::borrow::Cow<'_, (Sample, Sample)> {
        match &self.pairs {
            Pairs::Owned(v) => std::borrow::Cow::Borrowed(&v[i]),
            Pairs::Shards { shards, usable } => std::borrow::Cow::Owned(pair_of(shards, usable[i] as usize)),
        }
    }
}

fn pair_of(shards: &TokenShards, i: usize) -> (Sample, Sample) {
    let mut v = shards.get(i);
    let (r, c) = (v.pop().expect("dpo shards hold pairs"), v.pop().expect("dpo shards hold pairs"));
    (c, r)
}

impl BatchSource for PairRows {
    fn len(&self) -> usize {
        match &self.pairs {
            Pairs::Owned(v) => v.len(),
            Pairs::Shards { usable, .. } => usable.len(),
        }
    }

    /// The `k` chosen sequences, then the `k` rejected ones in the same order: one per row (`2k`
    /// rows), or packed in that order ([`PairRows::packed`]); padded to the longest row (padding is
    /// masked and label-ignored, so it changes nothing).
    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let pairs: Vec<_> = indices.iter().map(|&i| self.pair(i)).collect();
        let seqs: Vec<&Sample> = pairs.iter().map(|p| &p.0).chain(pairs.iter().map(|p| &p.1)).collect();
        let order: Vec<usize> = (0..seqs.len()).collect();
        let groups = match self.pack_to {
            Some(n) => crate::data::shards::pack_by(&order, n, |i| seqs[i].ids.len()).rows,
            None => order.iter().map(|&i| vec![i]).collect(),
        };
        let rows: Vec<Row> = groups
            .iter()
            .map(|g| {
                let mut row = Row::default();
                g.iter().for_each(|&i| row.push_doc(&seqs[i].ids, &seqs[i].labels(), usize::MAX));
                row
            })
            .collect();
        let seq_len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0).max(1);
        Batch::from_rows(&rows, seq_len, self.pad_id, indices)
    }
}

/// The summed answer log-probs of every sequence of a [`PairRows`] batch (chosen ones, then
/// rejected ones), `[2k]`, from the logits of its rows.
pub fn sequence_scores(logits: &Tensor, labels: &Tensor, b: &Batch) -> candle_core::Result<Tensor> {
    match &b.docs {
        Some(docs) => packed_sequence_logprobs(logits, labels, docs),
        None => sequence_logprobs(logits, labels),
    }
}

/// The logits of a batch's rows, each packed document on its own.
fn batch_logits(m: &MiniMind, ids: &Tensor, b: &Batch, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
    let (h, aux) = m.forward_hidden_packed(ids, b.doc_positions()?.as_ref(), train)?;
    Ok((m.logits(&h)?, aux))
}

/// A frozen reference built from the policy's current weights: deep copies for full fine-tuning
/// (the policy's `Var`s change in place), shared tensors when the base is already frozen (LoRA: the
/// reference is the base without adapters, at no extra memory). It computes in the policy's dtype,
/// so that at step 0 the policy's and the reference's log-probs agree exactly.
pub fn frozen_reference(policy: &MiniMind) -> anyhow::Result<MiniMind> {
    let shared = policy.params().is_empty();
    let mut named = std::collections::HashMap::new();
    for (n, t) in policy.named_tensors() {
        let t = if shared && !t.is_variable() { t } else { t.copy()? };
        named.insert(n, t);
    }
    let mut reference = MiniMind::from_tensors(policy.config(), named, policy.device(), false)?;
    reference.set_compute_dtype(policy.compute_dtype())?;
    Ok(reference)
}

/// Train `policy` with DPO. `params` are the trainable tensors (the policy's own for full
/// fine-tuning, or `adapters.params()` for LoRA); `reference` must be frozen. `on_metrics(i, m)` is
/// called after every micro-batch with its global 0-based index (continuing after a resume).
#[allow(clippy::too_many_arguments)]
pub fn train_dpo(
    policy: &MiniMind,
    params: &[(String, Var)],
    reference: &MiniMind,
    adapters: Option<&LoraAdapters>,
    data: &PairRows,
    opts: &TrainOptions,
    beta: f64,
    cancel: &CancelToken,
    mut on_metrics: impl FnMut(usize, &DpoMetrics) + Send,
) -> anyhow::Result<TrainSummary> {
    anyhow::ensure!(beta > 0.0 && beta.is_finite(), "dpo: `beta` must be a positive number, got {beta}");
    anyhow::ensure!(reference.params().is_empty(), "dpo: the reference model must be frozen");
    let device = policy.device().clone();
    let mut micro = crate::train::checkpoint::latest(&opts.work_dir)?.map(|(_, s)| s.micro_step).unwrap_or(0);
    if let Some(a) = adapters {
        a.set_training(true);
    }
    let result = train(params, data, opts, cancel, |b: &Batch| {
        let ids = b.input_tensor(&device)?;
        let labels = b.label_tensor(&device)?;
        if let Some(a) = adapters {
            // Masks depend only on the batch content and position: resumed runs are identical.
            a.reseed_dropout(b.seed(opts.seed));
        }
        let (logits, aux) = batch_logits(policy, &ids, b, true)?;
        let lp = sequence_scores(&logits, &labels, b)?;
        let ref_lp = sequence_scores(&batch_logits(reference, &ids, b, false)?.0, &labels, b)?.detach();
        let k = b.indices.len();
        let out = dpo_loss(
            &lp.narrow(0, 0, k)?,
            &lp.narrow(0, k, k)?,
            &ref_lp.narrow(0, 0, k)?,
            &ref_lp.narrow(0, k, k)?,
            beta,
        )?;
        on_metrics(micro, &out.metrics);
        micro += 1;
        let loss = (out.loss + &aux)?;
        Ok(LossOutput { loss, aux: Some(aux) })
    });
    if let Some(a) = adapters {
        a.set_training(false);
    }
    result
}

/// DPO metrics of `policy` against `reference` on every pair (no gradients), as batch means.
///
/// Each batch's sequence scores are copied to the host before the next batch: a tensor computed
/// from the policy's `Var`s keeps its whole autograd graph (every activation of the batch) alive,
/// and keeping those per batch made memory grow with the number of pairs (about 5 MB a pair).
pub fn evaluate_dpo(
    policy: &MiniMind,
    reference: &MiniMind,
    data: &PairRows,
    beta: f64,
    batch_size: usize,
) -> anyhow::Result<DpoMetrics> {
    let n = data.len();
    let (mut pc, mut pr, mut rc, mut rr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let dev = policy.device();
    for lo in (0..n).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (lo..(lo + batch_size.max(1)).min(n)).collect();
        let b = data.batch(&idx)?;
        let ids = b.input_tensor(dev)?;
        let labels = b.label_tensor(dev)?;
        let k = idx.len();
        let host = |m: &MiniMind| -> anyhow::Result<Vec<f32>> {
            Ok(sequence_scores(&batch_logits(m, &ids, &b, false)?.0, &labels, &b)?.detach().to_vec1()?)
        };
        let (lp, rl) = (host(policy)?, host(reference)?);
        pc.extend_from_slice(&lp[..k]);
        pr.extend_from_slice(&lp[k..]);
        rc.extend_from_slice(&rl[..k]);
        rr.extend_from_slice(&rl[k..]);
    }
    let t = |v: Vec<f32>| Tensor::from_vec(v, n, dev);
    Ok(dpo_loss(&t(pc)?, &t(pr)?, &t(rc)?, &t(rr)?, beta)?.metrics)
}

#[cfg(test)]
mod tests;
