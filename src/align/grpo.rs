//! GRPO training (spec §13) on top of the shared training loop.
//!
//! Each micro-batch holds `batch_size` prompts. For every prompt the current policy samples
//! `num_generations` completions with the generation engine (KV cache, one batched call per
//! micro-batch), the recipe's rewards score them, advantages are normalised within each prompt's
//! group, and the clipped-ratio objective with a per-token k3 KL to the frozen reference is
//! back-propagated ([`super::losses::grpo_loss`]). Like the reference there is exactly one policy
//! update per rollout batch, so the rollout policy *is* the policy being updated (ratio 1).
//!
//! Rollouts are seeded from the run seed and the global micro-step, which a checkpoint restores:
//! an interrupted run resumes with the same rollouts and ends with the same weights.

use super::losses::{group_advantages, grpo_loss, masked_token_logprobs, GrpoLossConfig};
use super::rewards::RewardSet;
use crate::cancel::CancelToken;
use crate::model::generate::{generate_at, FinishReason, GenerationConfig};
use crate::model::lora::LoraAdapters;
use crate::model::MiniMind;
use crate::train::batch::IGNORE;
use crate::train::trainer::LossOutput;
use crate::train::{train, Batch, BatchSource, TrainOptions, TrainSummary};
use candle_core::{Device, Tensor, Var};
use serde::Serialize;
use std::ops::ControlFlow;

/// The GRPO advantage epsilon of the reference: `(r - mean) / (std + 1e-4)`.
pub const ADVANTAGE_EPS: f64 = 1e-4;

/// One training prompt: its generation-prompt token ids (chat template applied) and, when the data
/// has one, the normalised final answer that exact-match rewards compare against.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// Token ids ending with the assistant generation header.
    pub ids: Vec<u32>,
    /// Normalised final answer, if any.
    pub answer: Option<String>,
}

/// The prompts of a GRPO stage, visited by the training loop in its seeded order.
#[derive(Clone, Debug)]
pub struct PromptSet {
    prompts: Vec<Prompt>,
    pad_id: u32,
}

impl PromptSet {
    /// Prompts, right-padded with `pad_id` when the loop asks for a token batch.
    pub fn new(prompts: Vec<Prompt>, pad_id: u32) -> Self {
        Self { prompts, pad_id }
    }

    /// The prompt at `i`.
    pub fn get(&self, i: usize) -> &Prompt {
        &self.prompts[i]
    }
}

impl BatchSource for PromptSet {
    fn len(&self) -> usize {
        self.prompts.len()
    }

    /// The prompts as a token batch (no loss targets). The loop only counts its tokens; the GRPO
    /// loss looks the prompts up by `indices`.
    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let seq_len = indices.iter().map(|&i| self.prompts[i].ids.len()).max().unwrap_or(0).max(1);
        let mut input_ids = Vec::with_capacity(indices.len() * seq_len);
        for &i in indices {
            let ids = &self.prompts[i].ids;
            input_ids.extend_from_slice(ids);
            input_ids.extend(std::iter::repeat_n(self.pad_id, seq_len - ids.len()));
        }
        let labels = vec![IGNORE; input_ids.len()];
        Ok(Batch { batch_size: indices.len(), seq_len, input_ids, labels, indices: indices.to_vec(), docs: None })
    }
}

/// How rollouts are sampled and scored.
#[derive(Clone, Debug)]
pub struct RolloutConfig {
    /// Completions per prompt (the group size).
    pub num_generations: usize,
    /// Sampling settings; `stop_token_ids` must hold the eos id. `seed` is replaced per rollout.
    pub generation: GenerationConfig,
    /// Padding id for the scoring batch.
    pub pad_id: u32,
}

/// A scored rollout batch: `prompts × num_generations` rows, group after group.
#[derive(Clone, Debug)]
pub struct Rollout {
    /// Prompt length of each row.
    pub prompt_lens: Vec<usize>,
    /// Completion ids of each row, including the eos when the row stopped on it (the mask covers
    /// completion tokens up to and including the first eos, spec §13).
    pub completions: Vec<Vec<u32>>,
    /// The decoded completions (eos excluded).
    pub texts: Vec<String>,
    /// Total reward per row.
    pub rewards: Vec<f32>,
    /// Weighted value of each reward term per row (in [`RewardSet::names`] order).
    pub reward_parts: Vec<Vec<f64>>,
    /// Rows that hit `max_new_tokens` before an eos.
    pub truncated: usize,
}

/// Sampled completions of a rollout batch, before any reward: `prompts × num_generations` rows,
/// group after group.
#[derive(Clone, Debug)]
pub struct Samples {
    /// Prompt length of each row.
    pub prompt_lens: Vec<usize>,
    /// Completion ids of each row, including the eos when the row stopped on it.
    pub completions: Vec<Vec<u32>>,
    /// The decoded completions (eos excluded).
    pub texts: Vec<String>,
    /// Rows that hit `max_new_tokens` before an eos.
    pub truncated: usize,
}

/// Sample `num_generations` completions for each prompt with `policy` (one batched generation).
///
/// `first_prompt` is the position of `prompts[0]` in the global micro-batch (on rank `r` of a
/// data-parallel stage, the prompts of ranks `0..r` come first): each completion samples the
/// stream of its global row, so the ranks together sample what one rank with every prompt would.
pub fn sample(
    policy: &MiniMind,
    prompts: &[&Prompt],
    first_prompt: usize,
    cfg: &RolloutConfig,
    decode: &dyn Fn(&[u32]) -> String,
    seed: u64,
) -> anyhow::Result<Samples> {
    let g = cfg.num_generations;
    let rows: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.ids.clone(), g)).collect();
    let gen_cfg = GenerationConfig { seed, ..cfg.generation.clone() };
    let eos = *gen_cfg.stop_token_ids.first().expect("rollout config names the eos id");
    let outs = generate_at(policy, &rows, first_prompt * g, &gen_cfg, None, |_, _, _| ControlFlow::Continue(()))?;
    let mut out = Samples {
        prompt_lens: rows.iter().map(Vec::len).collect(),
        completions: Vec::with_capacity(rows.len()),
        texts: Vec::with_capacity(rows.len()),
        truncated: 0,
    };
    for o in outs {
        out.texts.push(decode(&o.tokens));
        let mut ids = o.tokens;
        match o.finish_reason {
            FinishReason::Stop => ids.push(eos),
            _ => out.truncated += 1,
        }
        out.completions.push(ids);
    }
    Ok(out)
}

/// Sample `num_generations` completions for each prompt with `policy` and score them.
/// `first_prompt` as for [`sample`].
pub fn rollout(
    policy: &MiniMind,
    prompts: &[&Prompt],
    first_prompt: usize,
    cfg: &RolloutConfig,
    rewards: &RewardSet,
    decode: &dyn Fn(&[u32]) -> String,
    seed: u64,
) -> anyhow::Result<Rollout> {
    let g = cfg.num_generations;
    let s = sample(policy, prompts, first_prompt, cfg, decode, seed)?;
    let (mut totals, mut reward_parts) = (Vec::with_capacity(s.texts.len()), Vec::with_capacity(s.texts.len()));
    for (i, text) in s.texts.iter().enumerate() {
        let (total, parts) = rewards.score(text, prompts[i / g].answer.as_deref(), i)?;
        totals.push(total as f32);
        reward_parts.push(parts);
    }
    Ok(Rollout {
        prompt_lens: s.prompt_lens,
        completions: s.completions,
        texts: s.texts,
        rewards: totals,
        reward_parts,
        truncated: s.truncated,
    })
}

/// Prompt + completion rows, right-padded with `pad_id`, with labels only on completion tokens
/// (aligned with the inputs, as the loss helpers expect): `(ids, labels)`, both `[N, T]`. Right
/// padding keeps RoPE positions exact (the reference left-pads and ignores the offset, spec quirk
/// 11).
pub fn scoring_batch(rows: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let joined: Vec<(Vec<u32>, Vec<bool>)> = rows
        .iter()
        .map(|(p, c)| {
            let trained = std::iter::repeat_n(false, p.len()).chain(std::iter::repeat_n(true, c.len())).collect();
            ([*p, *c].concat(), trained)
        })
        .collect();
    let rows: Vec<(&[u32], &[bool])> = joined.iter().map(|(i, m)| (&i[..], &m[..])).collect();
    labelled_batch(&rows, pad_id, device)
}

/// Token rows with a per-token "carries loss" flag, right-padded with `pad_id`: `(ids, labels)`,
/// both `[N, T]`, labels aligned with the inputs ([`IGNORE`] where the flag is off and on padding).
pub fn labelled_batch(
    rows: &[(&[u32], &[bool])],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = rows.len();
    let t = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1).max(2);
    let mut ids = Vec::with_capacity(n * t);
    let mut labels = Vec::with_capacity(n * t);
    for (row, trained) in rows {
        debug_assert_eq!(row.len(), trained.len(), "one flag per token");
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad_id, t - row.len()));
        labels.extend(row.iter().zip(*trained).map(|(&x, &on)| if on { x as i64 } else { IGNORE }));
        labels.extend(std::iter::repeat_n(IGNORE, t - row.len()));
    }
    Ok((Tensor::from_vec(ids, (n, t), device)?, Tensor::from_vec(labels, (n, t), device)?))
}

/// The GRPO/CISPO objective of one scored batch (`ids`, aligned `labels` from [`labelled_batch`]),
/// one advantage per row: the policy's log-probs (with gradient) against the frozen reference's.
/// Returns the loss, the MoE aux loss of the policy forward and the loss metrics.
pub(crate) fn policy_loss(
    policy: &MiniMind,
    reference: &MiniMind,
    ids: &Tensor,
    labels: &Tensor,
    advantages: &[f32],
    cfg: &GrpoLossConfig,
) -> candle_core::Result<(Tensor, Tensor, super::losses::GrpoLossMetrics)> {
    let (h, aux) = policy.forward_hidden(ids, None, 0, None, true)?;
    let (logp, mask) = masked_token_logprobs(&policy.logits(&h)?, labels)?;
    let (ref_logp, _) = masked_token_logprobs(&reference.forward_logits(ids, None)?, labels)?;
    let adv = Tensor::from_slice(advantages, advantages.len(), policy.device())?;
    let out = grpo_loss(&logp, None, &ref_logp.detach(), &adv, &mask, cfg)?;
    Ok((out.loss, aux, out.metrics))
}

impl Rollout {
    fn scoring_batch(
        &self,
        prompts: &[&Prompt],
        g: usize,
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let rows: Vec<(&[u32], &[u32])> =
            self.completions.iter().enumerate().map(|(i, c)| (&prompts[i / g].ids[..], &c[..])).collect();
        scoring_batch(&rows, pad_id, device)
    }

    /// Mean total reward.
    pub fn mean_reward(&self) -> f64 {
        mean(self.rewards.iter().map(|&r| r as f64))
    }
}

fn mean(it: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = it.len();
    if n == 0 {
        0.0
    } else {
        it.sum::<f64>() / n as f64
    }
}

/// What one GRPO micro-step reports (the loop's own line adds loss, lr and grad norm).
#[derive(Clone, Debug, Serialize)]
pub struct GrpoStepMetrics {
    /// Mean total reward of the rollouts.
    pub reward_mean: f64,
    /// Standard deviation of the total reward over all rollouts.
    pub reward_std: f64,
    /// Mean within-group reward standard deviation.
    pub group_std: f32,
    /// Groups whose completions all got the same reward: zero advantage, no policy signal.
    pub zero_std_groups: usize,
    /// Groups (prompts) in the micro-batch.
    pub groups: usize,
    /// Mean weighted value of each reward term, by name.
    pub rewards: std::collections::BTreeMap<String, f64>,
    /// Mean k3 KL to the reference per completion token.
    pub kl: f32,
    /// Fraction of completion tokens where the clip is active.
    pub clip_fraction: f32,
    /// Mean completion length in tokens (eos included).
    pub completion_len: f64,
    /// Fraction of completions cut by `max_new_tokens`.
    pub truncated_fraction: f64,
    /// The GRPO objective's value (without the MoE aux loss).
    pub grpo_loss: f32,
}

/// The fixed pieces of a GRPO run.
pub struct Grpo<'a> {
    /// The policy being trained.
    pub policy: &'a MiniMind,
    /// Its trainable tensors (all weights, or the adapters).
    pub params: &'a [(String, Var)],
    /// The frozen reference for the KL term.
    pub reference: &'a MiniMind,
    /// LoRA adapters on the policy, if training adapters.
    pub adapters: Option<&'a LoraAdapters>,
    /// The reward functions.
    pub rewards: &'a RewardSet,
    /// Rollout sampling.
    pub rollout: RolloutConfig,
    /// The objective's hyper-parameters.
    pub loss: GrpoLossConfig,
    /// Token ids → text for the rewards.
    pub decode: &'a (dyn Fn(&[u32]) -> String + Sync),
}

impl Grpo<'_> {
    /// Train on `data`. `on_metrics(i, m)` is called after every micro-batch with its global
    /// 0-based index (continuing after a resume).
    pub fn train(
        &self,
        data: &PromptSet,
        opts: &TrainOptions,
        cancel: &CancelToken,
        mut on_metrics: impl FnMut(usize, &GrpoStepMetrics) + Send,
    ) -> anyhow::Result<TrainSummary> {
        anyhow::ensure!(self.reference.params().is_empty(), "grpo: the reference model must be frozen");
        anyhow::ensure!(self.rollout.num_generations >= 2, "grpo: `num_generations` must be at least 2");
        let device = self.policy.device().clone();
        let mut micro = crate::train::checkpoint::latest(&opts.work_dir)?.map(|(_, s)| s.micro_step).unwrap_or(0);
        let g = self.rollout.num_generations;
        // This rank's prompts follow those of the lower ranks in each global micro-batch (a rank
        // that has rows has a full share before it; see `train::parallel::rank_rows`).
        let first_prompt = opts.collective.rank() * opts.batch_size.max(1);
        train(self.params, data, opts, cancel, |b: &Batch| {
            let prompts: Vec<&Prompt> = b.indices.iter().map(|&i| data.get(i)).collect();
            let seed = step_seed(opts.seed, micro);
            self.set_training(false);
            let ro = rollout(self.policy, &prompts, first_prompt, &self.rollout, self.rewards, self.decode, seed)
                .map_err(ext)?;
            self.set_training(true);
            if let Some(a) = self.adapters {
                a.reseed_dropout(seed);
            }
            let adv = group_advantages(&ro.rewards, g, ADVANTAGE_EPS).map_err(ext)?;
            let (ids, labels) = ro.scoring_batch(&prompts, g, self.rollout.pad_id, &device)?;
            let (loss, aux, lm) = policy_loss(self.policy, self.reference, &ids, &labels, &adv.advantages, &self.loss)?;
            on_metrics(micro, &step_metrics(&ro, &adv, self.rewards, &lm));
            micro += 1;
            Ok(LossOutput { loss: (loss + &aux)?, aux: Some(aux) })
        })
    }

    fn set_training(&self, on: bool) {
        if let Some(a) = self.adapters {
            a.set_training(on);
        }
    }

    /// Mean reward of the policy as it is now on `prompts` (same sampling, `num_generations` each,
    /// fixed `seed`): the before/after figure of a stage.
    pub fn mean_reward(&self, prompts: &[&Prompt], batch: usize, seed: u64) -> anyhow::Result<f64> {
        self.set_training(false);
        let (mut sum, mut n) = (0f64, 0usize);
        for (k, chunk) in prompts.chunks(batch.max(1)).enumerate() {
            let ro = rollout(self.policy, chunk, 0, &self.rollout, self.rewards, self.decode, step_seed(seed, k))?;
            sum += ro.rewards.iter().map(|&r| r as f64).sum::<f64>();
            n += ro.rewards.len();
        }
        Ok(if n == 0 { 0.0 } else { sum / n as f64 })
    }
}

fn step_metrics(
    ro: &Rollout,
    adv: &super::losses::GroupAdvantages,
    rewards: &RewardSet,
    loss: &super::losses::GrpoLossMetrics,
) -> GrpoStepMetrics {
    let n = ro.rewards.len().max(1) as f64;
    let m = ro.mean_reward();
    let var = ro.rewards.iter().map(|&r| (r as f64 - m).powi(2)).sum::<f64>() / n;
    let by_name = rewards
        .names()
        .into_iter()
        .enumerate()
        .map(|(k, name)| (name.to_string(), mean(ro.reward_parts.iter().map(|p| p[k]))))
        .collect();
    GrpoStepMetrics {
        reward_mean: m,
        reward_std: var.sqrt(),
        group_std: adv.mean_group_std,
        zero_std_groups: adv.zero_std_groups,
        groups: adv.groups,
        rewards: by_name,
        kl: loss.kl,
        clip_fraction: loss.clip_fraction,
        completion_len: mean(ro.completions.iter().map(|c| c.len() as f64)),
        truncated_fraction: ro.truncated as f64 / n,
        grpo_loss: loss.loss,
    }
}

/// The sampling seed of global micro-step `micro` (SplitMix64 of the pair, so consecutive steps
/// get unrelated streams).
pub(crate) fn step_seed(seed: u64, micro: usize) -> u64 {
    let mut z = seed ^ (micro as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Carry a non-candle error through the loss closure's `candle_core::Result`.
pub(crate) fn ext(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

#[cfg(test)]
pub(crate) mod tests;
