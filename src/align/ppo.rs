//! PPO training (spec §12): actor, frozen reference, critic, rewards at the end of each response.
//!
//! One rollout step takes `batch_size` prompts: the actor samples one completion per prompt with
//! the generation engine, the rewards score it (rule terms and/or a reward model, summed), and
//! without gradients the actor's own log-probs (`old`), the reference's and the critic's values are
//! read at the response tokens. The scalar reward sits on the last response token; GAE (γ, λ) runs
//! backwards over each response with the value after its end 0, and the advantages are whitened
//! over every response token of the batch. Then `update_iters` passes over shuffled minibatches of
//! `mini_batch_size` rows each optimise the clipped policy loss plus `kl_coef` · k3 KL to the
//! reference ([`ppo_policy_loss`]) and `vf_coef` · the clipped value loss ([`ppo_value_loss`]);
//! the actor and the critic each have their own AdamW, learning rate and global-norm clip. A
//! minibatch whose approximate KL to the rollout policy exceeds `early_stop_kl` ends the rollout
//! step's updates before it is applied.
//!
//! Fixes to the reference: on early stop it still steps both optimisers on a zeroed loss (AdamW's
//! momentum and weight decay keep moving the weights) for the rest of the pass; here nothing more
//! is applied. Its cosine schedules count the optimiser steps actually taken; here the learning
//! rate is a function of the step's *planned* position (rollout step, pass, minibatch), so an early
//! stop never shifts the schedule of later steps.
//!
//! Checkpoints are taken between rollout steps: the actor and critic weights, both optimisers'
//! moments and step counts, and the data position. Rollouts are seeded by (seed, rollout step) and
//! minibatch orders by (seed, rollout step, pass), so an interrupted run resumes bit-identically.

use super::grpo::{sample, scoring_batch, step_seed, Prompt, PromptSet, RolloutConfig, Samples};
use super::losses::{explained_variance, gae, masked_token_logprobs, ppo_policy_loss, ppo_value_loss, whiten};
use super::rewards::RewardSet;
use crate::cancel::{CancelToken, Interrupted};
use crate::model::reward::{Critic, RewardModel};
use crate::model::MiniMind;
use crate::train::batch::epoch_permutation;
use crate::train::checkpoint::{self, Cadence, Part};
use crate::train::metrics::MetricsFile;
use crate::train::optim::{clip_coefficient, global_norm, AdamW, GradAccumulator};
use crate::train::schedule::lr_at;
use crate::train::trainer::{finish, progress_bar};
use crate::train::{BatchSource, TrainError, TrainOptions, TrainSummary};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// PPO's hyper-parameters besides the shared loop's (reference values in brackets).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PpoConfig {
    /// Discount γ [1.0].
    pub gamma: f64,
    /// GAE λ [0.95].
    pub lambda: f64,
    /// Policy ratio clip ε [0.2].
    pub clip: f64,
    /// Value clip around the rollout-time values [0.2].
    pub clip_value: f64,
    /// Weight of the value loss [0.5].
    pub vf_coef: f64,
    /// Weight of the k3 KL to the reference [0.02].
    pub kl_coef: f64,
    /// Passes over the rollout batch [2].
    pub update_iters: usize,
    /// Rows per minibatch [2].
    pub mini_batch_size: usize,
    /// Stop a rollout step's updates when a minibatch's approximate KL exceeds this [0.25].
    pub early_stop_kl: f64,
    /// The critic's peak learning rate (the actor's is the loop's `lr`).
    pub critic_lr: f64,
}

/// A reward model scoring finished conversations.
pub struct ModelReward<'a> {
    /// The (frozen) reward model; same vocabulary as the actor.
    pub model: &'a RewardModel,
    /// Scores are clipped to `[-clip, clip]` (the reference clips to ±3).
    pub clip: f64,
    /// The ids that close an assistant turn (`<|im_end|>\n`): a completion that stopped on the
    /// first of them gets the rest, one that was cut gets all of them, so the reward model reads a
    /// finished conversation as in its training pairs.
    pub turn_end: Vec<u32>,
    /// Padding id of the scoring batch (the model scores each row at its last non-pad token).
    pub pad_id: u32,
}

/// Where the rewards come from: rule terms, a reward model, or both (summed).
pub struct Rewards<'a> {
    /// Rule rewards (exact match, format, length, repetition).
    pub rules: Option<&'a RewardSet>,
    /// A reward model.
    pub model: Option<ModelReward<'a>>,
}

/// Name of the reward model's term in the metrics (`reward/reward_model`).
pub const MODEL_TERM: &str = "reward_model";

impl Rewards<'_> {
    /// Names of the terms, in the order of [`Rewards::score`]'s parts.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = self.rules.map(RewardSet::names).unwrap_or_default();
        if self.model.is_some() {
            v.push(MODEL_TERM);
        }
        v
    }

    /// Total reward and each term's value per row of `s` (one completion per prompt).
    pub fn score(&self, prompts: &[&Prompt], s: &Samples) -> anyhow::Result<(Vec<f32>, Vec<Vec<f64>>)> {
        let n = s.texts.len();
        let mut parts = vec![Vec::new(); n];
        if let Some(rules) = self.rules {
            for (i, text) in s.texts.iter().enumerate() {
                parts[i] = rules.score(text, prompts[i].answer.as_deref(), i)?.1;
            }
        }
        if let Some(m) = &self.model {
            for (i, score) in m.scores(prompts, s)?.into_iter().enumerate() {
                super::rewards::check_finite(MODEL_TERM, score, i)?;
                parts[i].push(score.clamp(-m.clip, m.clip));
            }
        }
        let totals = parts.iter().map(|p| p.iter().sum::<f64>() as f32).collect();
        Ok((totals, parts))
    }
}

impl ModelReward<'_> {
    /// Raw scores of prompt + completion + the rest of the turn end, one per row.
    fn scores(&self, prompts: &[&Prompt], s: &Samples) -> anyhow::Result<Vec<f64>> {
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&s.completions)
            .map(|(p, c)| {
                let mut ids = p.ids.clone();
                ids.extend_from_slice(c);
                let closed = !self.turn_end.is_empty() && c.last() == self.turn_end.first();
                ids.extend_from_slice(if closed { &self.turn_end[1..] } else { &self.turn_end[..] });
                ids
            })
            .collect();
        let t = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut flat = Vec::with_capacity(rows.len() * t);
        for r in &rows {
            flat.extend_from_slice(r);
            flat.extend(std::iter::repeat_n(self.pad_id, t - r.len()));
        }
        let ids = Tensor::from_vec(flat, (rows.len(), t), self.model.device())?;
        let (scores, _) = self.model.scores(&ids, false)?;
        Ok(scores.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
    }
}

/// What one rollout step reports (one line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PpoStepMetrics {
    /// 1-based rollout step.
    pub step: usize,
    /// Mean total reward of the rollouts.
    pub reward_mean: f64,
    /// Its standard deviation over the batch.
    pub reward_std: f64,
    /// Mean value of each reward term (`reward/<name>` in the metrics file).
    #[serde(skip)]
    pub rewards: BTreeMap<String, f64>,
    /// Mean k3 KL to the reference per response token (over the minibatches evaluated).
    pub kl: f32,
    /// Mean `0.5 · (logp − old)²` per token (over the minibatches evaluated).
    pub approx_kl: f32,
    /// Fraction of response tokens whose ratio left `1 ± clip`.
    pub clip_fraction: f32,
    /// The clipped surrogate.
    pub policy_loss: f32,
    /// The clipped value loss (over the minibatches applied).
    pub value_loss: f32,
    /// The actor's and critic's MoE load-balancing loss (0 for dense models), mean over the
    /// minibatches applied; part of `loss`.
    pub aux_loss: f32,
    /// `policy + kl_coef · kl + vf_coef · value + aux`, mean over the minibatches applied.
    pub loss: f32,
    /// How much of the returns' variance the rollout-time values explain (`None`: constant returns).
    pub explained_variance: Option<f64>,
    /// Mean response length in tokens (eos included).
    pub response_len: f64,
    /// Fraction of responses cut by `max_new_tokens`.
    pub truncated_fraction: f64,
    /// Optimiser steps taken on this rollout batch.
    pub updates: usize,
    /// Whether the approximate-KL early stop ended the updates.
    pub early_stopped: bool,
    /// The actor's learning rate at the last update.
    pub lr: f64,
    /// The critic's learning rate at the last update.
    pub critic_lr: f64,
    /// The actor's gradient norm at the last update (before clipping).
    pub grad_norm: f64,
    /// The critic's gradient norm at the last update (before clipping).
    pub critic_grad_norm: f64,
}

impl PpoStepMetrics {
    /// The metrics-file record: every field, with the reward terms as `reward/<name>`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("metrics serialise");
        if let Some(o) = v.as_object_mut() {
            for (k, x) in &self.rewards {
                o.insert(format!("reward/{k}"), (*x).into());
            }
        }
        v
    }
}

/// Bumped when [`PpoState`] or the checkpoint's parts change.
const STATE_FORMAT: u32 = 1;
/// The checkpoint part holding the critic.
const CRITIC_PART: &str = "critic";

/// Everything but tensors needed to continue a PPO run exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PpoState {
    /// `"ppo"` and [`STATE_FORMAT`]: another loop's checkpoint is refused.
    kind: String,
    format: u32,
    /// Rollout steps completed.
    step: usize,
    /// Current epoch over the prompts and the next batch within it.
    epoch: usize,
    batch_in_epoch: usize,
    /// Optimiser steps taken by each of the two AdamWs (they step together).
    updates: u64,
    /// Tokens processed (prompt + response rows, padding included) and response tokens.
    tokens: u64,
    useful_tokens: u64,
    /// Mean loss of every rollout step (the loss curve).
    losses: Vec<f32>,
    actor_params: Vec<String>,
    critic_params: Vec<String>,
}

/// The fixed pieces of a PPO run.
pub struct Ppo<'a> {
    /// The actor (policy) being trained.
    pub actor: &'a MiniMind,
    /// Its trainable tensors.
    pub actor_params: &'a [(String, Var)],
    /// The frozen reference for the KL term.
    pub reference: &'a MiniMind,
    /// The critic being trained.
    pub critic: &'a Critic,
    /// The rewards.
    pub rewards: &'a Rewards<'a>,
    /// Rollout sampling (`num_generations` must be 1).
    pub rollout: RolloutConfig,
    /// PPO's hyper-parameters.
    pub cfg: PpoConfig,
    /// Token ids → text for the rule rewards.
    pub decode: &'a dyn Fn(&[u32]) -> String,
}

/// Seed salt of the minibatch orders (apart from the rollout seeds drawn from the same run seed).
const MINIBATCH_SALT: u64 = 0x6d69_6e69_6261_7463;

/// Running sums over a rollout step's minibatches.
#[derive(Default)]
struct Sums {
    evaluated: usize,
    applied: usize,
    kl: f64,
    approx_kl: f64,
    clip_fraction: f64,
    policy_loss: f64,
    value_loss: f64,
    aux_loss: f64,
    loss: f64,
}

/// The last optimiser step's numbers.
#[derive(Default)]
struct LastUpdate {
    lr: f64,
    critic_lr: f64,
    grad_norm: f64,
    critic_grad_norm: f64,
}

/// A rollout batch ready for the updates: rows and every per-token constant, `[B, T]`.
struct Batch {
    ids: Tensor,
    labels: Tensor,
    mask: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
}

impl Ppo<'_> {
    /// Train on `data`. `on_metrics` sees every rollout step's metrics (after a resume, from the
    /// first step this call runs); they are also appended to `opts.metrics_path`.
    pub fn train(
        &self,
        data: &PromptSet,
        opts: &TrainOptions,
        cancel: &CancelToken,
        mut on_metrics: impl FnMut(&PpoStepMetrics),
    ) -> anyhow::Result<TrainSummary> {
        anyhow::ensure!(self.reference.params().is_empty(), "ppo: the reference model must be frozen");
        anyhow::ensure!(self.rollout.num_generations == 1, "ppo: one completion per prompt");
        anyhow::ensure!(self.cfg.update_iters >= 1 && self.cfg.mini_batch_size >= 1, "ppo: no updates planned");
        let n = data.len();
        if n == 0 {
            return Err(TrainError::Empty.into());
        }
        let bs = opts.batch_size.max(1);
        let iters = n.div_ceil(bs);
        let total_steps = opts.max_steps.unwrap_or(opts.epochs * iters);
        let accum = opts.accumulation_steps.max(1);
        let per_pass = bs.div_ceil(self.cfg.mini_batch_size.min(bs)).div_ceil(accum);
        let plan = Plan { per_pass, per_rollout: per_pass * self.cfg.update_iters, total_steps, accum };

        let critic_params = self.critic.params();
        let mut actor_opt = AdamW::new(self.actor_params.to_vec(), opts.adamw)?;
        let mut critic_opt = AdamW::new(critic_params.to_vec(), opts.adamw)?;
        let names = |p: &[(String, Var)]| p.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let mut st = PpoState {
            kind: "ppo".into(),
            format: STATE_FORMAT,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            updates: 0,
            tokens: 0,
            useful_tokens: 0,
            losses: Vec::new(),
            actor_params: names(self.actor_params),
            critic_params: names(critic_params),
        };
        let mut resumed_from = None;
        if let Some((dir, saved)) = checkpoint::latest_state::<PpoState>(&opts.work_dir)? {
            anyhow::ensure!(
                saved.kind == st.kind && saved.format == STATE_FORMAT,
                "checkpoint {} is not a PPO checkpoint of this mmrun (kind {:?}, format {}); delete it to start over",
                dir.display(),
                saved.kind,
                saved.format
            );
            let (a, c) = (&saved.actor_params, &saved.critic_params);
            checkpoint::restore_part(&dir, "", a, self.actor_params, &mut actor_opt, saved.updates)?;
            checkpoint::restore_part(&dir, CRITIC_PART, c, critic_params, &mut critic_opt, saved.updates)?;
            tracing::info!(stage = %opts.stage, step = saved.step, "resuming from checkpoint {}", dir.display());
            resumed_from = Some(saved.step);
            st = saved;
        }
        let save = |st: &PpoState, actor_opt: &AdamW, critic_opt: &AdamW| {
            let parts = [
                Part { name: "", params: self.actor_params, opt: actor_opt },
                Part { name: CRITIC_PART, params: critic_params, opt: critic_opt },
            ];
            checkpoint::save_parts(&opts.work_dir, st.step, &parts, st)
        };
        let mut cadence = Cadence::new(opts.save_every, opts.save_interval, Instant::now());
        let mut metrics = opts.metrics_path.as_deref().map(MetricsFile::open).transpose()?;
        let bar = progress_bar(opts, total_steps, st.step);
        let started = Instant::now();
        let tokens_at_start = st.tokens;
        let mut perm: Option<(usize, Vec<usize>)> = None;

        while st.step < total_steps {
            if cancel.is_cancelled() {
                let dir = save(&st, &actor_opt, &critic_opt)?;
                bar.abandon_with_message(format!("interrupted; checkpoint at step {}", st.step));
                tracing::info!(stage = %opts.stage, step = st.step, "checkpoint saved to {}", dir.display());
                return Err(Interrupted.into());
            }
            if st.batch_in_epoch >= iters {
                st.epoch += 1;
                st.batch_in_epoch = 0;
            }
            if perm.as_ref().is_none_or(|(e, _)| *e != st.epoch) {
                perm = Some((st.epoch, epoch_permutation(opts.seed, st.epoch, n)));
            }
            let order = &perm.as_ref().expect("set above").1;
            let lo = st.batch_in_epoch * bs;
            let prompts: Vec<&Prompt> = order[lo..(lo + bs).min(n)].iter().map(|&i| data.get(i)).collect();
            let m = self.rollout_step(&prompts, &mut st, opts, &plan, &mut actor_opt, &mut critic_opt)?;
            st.batch_in_epoch += 1;
            st.step += 1;
            st.losses.push(m.loss);
            if let Some(f) = metrics.as_mut() {
                f.write(&opts.stage, &m.to_json())?;
            }
            on_metrics(&m);
            bar.set_position(st.step as u64);
            bar.set_message(format!("reward {:.3}  kl {:.4}", m.reward_mean, m.kl));
            // The last step is followed by publishing, which makes a checkpoint pointless.
            if st.step < total_steps && cadence.due(st.step, Instant::now()) {
                save(&st, &actor_opt, &critic_opt)?;
                cadence.saved(Instant::now());
            }
        }
        bar.finish_and_clear();
        let tokens = (st.tokens, st.useful_tokens);
        Ok(finish(opts, st.step, st.losses, tokens, resumed_from, started, tokens_at_start))
    }

    /// Sample, score and prepare one rollout batch, then run the updates on it.
    fn rollout_step(
        &self,
        prompts: &[&Prompt],
        st: &mut PpoState,
        opts: &TrainOptions,
        plan: &Plan,
        actor_opt: &mut AdamW,
        critic_opt: &mut AdamW,
    ) -> anyhow::Result<PpoStepMetrics> {
        let samples = sample(self.actor, prompts, 0, &self.rollout, self.decode, step_seed(opts.seed, st.step))?;
        let (rewards, parts) = self.rewards.score(prompts, &samples)?;
        let (batch, ev) = self.prepare(prompts, &samples, &rewards)?;
        let (b, t) = batch.ids.dims2()?;
        st.tokens += (b * t) as u64;
        st.useful_tokens += samples.completions.iter().map(Vec::len).sum::<usize>() as u64;

        let device = self.actor.device().clone();
        let mut acc_a = GradAccumulator::new(self.actor_params.len());
        let mut acc_c = GradAccumulator::new(self.critic.params().len());
        let (mut sums, mut last, mut pending, mut stopped) = (Sums::default(), LastUpdate::default(), 0usize, false);
        let mut updates = 0usize;
        let mb = self.cfg.mini_batch_size.min(b).max(1);
        'passes: for pass in 0..self.cfg.update_iters {
            let order = epoch_permutation(step_seed(opts.seed ^ MINIBATCH_SALT, st.step), pass, b);
            let chunks: Vec<&[usize]> = order.chunks(mb).collect();
            for (j, rows) in chunks.iter().enumerate() {
                let sel = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect(), rows.len(), &device)?;
                let pick = |x: &Tensor| x.index_select(&sel, 0);
                let (ids, mask) = (pick(&batch.ids)?, pick(&batch.mask)?);
                let (h, aux) = self.actor.forward_hidden(&ids, None, 0, None, true)?;
                let (logp, _) = masked_token_logprobs(&self.actor.logits(&h)?, &pick(&batch.labels)?)?;
                let (c, k) = (self.cfg.clip, self.cfg.kl_coef);
                let (ref_logp, adv) = (pick(&batch.ref_logp)?, pick(&batch.advantages)?);
                let (policy, pm) = ppo_policy_loss(&logp, &pick(&batch.old_logp)?, &ref_logp, &adv, &mask, c, k)?;
                sums.evaluated += 1;
                sums.kl += pm.kl as f64;
                sums.approx_kl += pm.approx_kl as f64;
                sums.clip_fraction += pm.clip_fraction as f64;
                sums.policy_loss += pm.policy_loss as f64;
                if pm.approx_kl as f64 > self.cfg.early_stop_kl {
                    stopped = true;
                    break 'passes;
                }
                let (values, caux) = self.critic.values(&ids, true)?;
                let (old_v, ret) = (pick(&batch.old_values)?, pick(&batch.returns)?);
                let value = ppo_value_loss(&values, &old_v, &ret, &mask, self.cfg.clip_value)?;
                let aux = (aux + caux)?;
                let loss = ((policy + (&value * self.cfg.vf_coef)?)? + &aux)?;
                let loss_val = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_val.is_finite() {
                    return Err(non_finite("the loss", loss_val, st, updates).into());
                }
                sums.applied += 1;
                sums.value_loss += value.to_scalar::<f32>()? as f64;
                sums.aux_loss += aux.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                sums.loss += loss_val;
                let grads = (loss / plan.accum as f64)?.backward()?;
                acc_a.add(self.actor_params, &grads)?;
                acc_c.add(self.critic.params(), &grads)?;
                drop(grads);
                pending += 1;
                if pending == plan.accum || j + 1 == chunks.len() {
                    let at = st.step * plan.per_rollout + pass * plan.per_pass + j / plan.accum + 1;
                    last = self.apply(&mut acc_a, &mut acc_c, actor_opt, critic_opt, opts, plan, at, st, updates)?;
                    (pending, updates) = (0, updates + 1);
                }
            }
        }
        if pending > 0 {
            // Stopped mid-accumulation: what was accumulated passed the KL check, so it is applied.
            let at = st.step * plan.per_rollout + updates + 1;
            last = self.apply(&mut acc_a, &mut acc_c, actor_opt, critic_opt, opts, plan, at, st, updates)?;
            updates += 1;
        }

        let n = rewards.len().max(1) as f64;
        let reward_mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
        let reward_std = (rewards.iter().map(|&r| (r as f64 - reward_mean).powi(2)).sum::<f64>() / n).sqrt();
        let by_name = self
            .rewards
            .names()
            .into_iter()
            .enumerate()
            .map(|(k, name)| (name.to_string(), parts.iter().map(|p| p[k]).sum::<f64>() / n))
            .collect();
        let (e, a) = (sums.evaluated.max(1) as f64, sums.applied.max(1) as f64);
        Ok(PpoStepMetrics {
            step: st.step + 1,
            reward_mean,
            reward_std,
            rewards: by_name,
            kl: (sums.kl / e) as f32,
            approx_kl: (sums.approx_kl / e) as f32,
            clip_fraction: (sums.clip_fraction / e) as f32,
            policy_loss: (sums.policy_loss / e) as f32,
            value_loss: (sums.value_loss / a) as f32,
            aux_loss: (sums.aux_loss / a) as f32,
            loss: (sums.loss / a) as f32,
            explained_variance: ev,
            response_len: samples.completions.iter().map(|c| c.len() as f64).sum::<f64>() / n,
            truncated_fraction: samples.truncated as f64 / n,
            updates,
            early_stopped: stopped,
            lr: last.lr,
            critic_lr: last.critic_lr,
            grad_norm: last.grad_norm,
            critic_grad_norm: last.critic_grad_norm,
        })
    }

    /// The rollout batch's rows and, without gradients, the old log-probs, reference log-probs
    /// and values at the response tokens, then GAE and whitened advantages. Also the explained
    /// variance of the returns by the values.
    fn prepare(&self, prompts: &[&Prompt], s: &Samples, rewards: &[f32]) -> anyhow::Result<(Batch, Option<f64>)> {
        let device = self.actor.device();
        let rows: Vec<(&[u32], &[u32])> =
            prompts.iter().zip(&s.completions).map(|(p, c)| (&p.ids[..], &c[..])).collect();
        let (ids, labels) = scoring_batch(&rows, self.rollout.pad_id, device)?;
        let (b, t) = ids.dims2()?;
        let (old_logp, mask) = masked_token_logprobs(&self.actor.forward_logits(&ids, None)?, &labels)?;
        let (ref_logp, _) = masked_token_logprobs(&self.reference.forward_logits(&ids, None)?, &labels)?;
        let (values, _) = self.critic.values(&ids, false)?;
        let values = (values.detach() * &mask)?;
        let vh: Vec<f32> = values.flatten_all()?.to_vec1()?;

        // Response token k of row r is predicted at position prompt_len − 1 + k (labels are aligned
        // with the inputs and shifted by one, see `masked_token_logprobs`).
        let (mut adv, mut ret) = (vec![0f32; b * t], vec![0f32; b * t]);
        let mut spans = Vec::with_capacity(b);
        for (r, (p, c)) in rows.iter().enumerate() {
            let (start, len) = (r * t + p.len() - 1, c.len());
            let mut token_rewards = vec![0f32; len];
            if let Some(last) = token_rewards.last_mut() {
                *last = rewards[r];
            }
            let g = gae(&token_rewards, &vh[start..start + len], self.cfg.gamma, self.cfg.lambda);
            adv[start..start + len].copy_from_slice(&g.advantages);
            ret[start..start + len].copy_from_slice(&g.returns);
            spans.push(start..start + len);
        }
        let flat = |x: &[f32]| spans.iter().flat_map(|s| x[s.clone()].to_vec()).collect::<Vec<f32>>();
        let ev = explained_variance(&flat(&vh), &flat(&ret));
        let white = whiten(&flat(&adv));
        let mut k = 0;
        for s in &spans {
            adv[s.clone()].copy_from_slice(&white[k..k + s.len()]);
            k += s.len();
        }
        let batch = Batch {
            ids,
            labels,
            old_logp: old_logp.detach(),
            ref_logp: ref_logp.detach(),
            old_values: values,
            advantages: Tensor::from_vec(adv, (b, t), device)?,
            returns: Tensor::from_vec(ret, (b, t), device)?,
            mask,
        };
        Ok((batch, ev))
    }

    /// One optimiser step of both models at planned update `at` (1-based, of `plan.total()`).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        acc_a: &mut GradAccumulator,
        acc_c: &mut GradAccumulator,
        actor_opt: &mut AdamW,
        critic_opt: &mut AdamW,
        opts: &TrainOptions,
        plan: &Plan,
        at: usize,
        st: &mut PpoState,
        updates: usize,
    ) -> anyhow::Result<LastUpdate> {
        let total = plan.total();
        let lr = lr_at(at, total, opts.lr, opts.warmup_steps);
        let critic_lr = lr_at(at, total, self.cfg.critic_lr, opts.warmup_steps);
        let (grad_norm, critic_grad_norm) = (global_norm(acc_a.grads())?, global_norm(acc_c.grads())?);
        for (what, v) in [("the actor's gradient norm", grad_norm), ("the critic's gradient norm", critic_grad_norm)] {
            if !v.is_finite() {
                return Err(non_finite(what, v, st, updates).into());
            }
        }
        actor_opt.step(acc_a.grads(), lr, clip_coefficient(grad_norm, opts.grad_clip))?;
        critic_opt.step(acc_c.grads(), critic_lr, clip_coefficient(critic_grad_norm, opts.grad_clip))?;
        acc_a.clear();
        acc_c.clear();
        st.updates += 1;
        Ok(LastUpdate { lr, critic_lr, grad_norm, critic_grad_norm })
    }

    /// Mean reward of the actor as it is now on `prompts` (one completion each, the rollout's
    /// sampling with a fixed `seed`): the before/after figure of a stage.
    pub fn mean_reward(&self, prompts: &[&Prompt], batch: usize, seed: u64) -> anyhow::Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for (k, chunk) in prompts.chunks(batch.max(1)).enumerate() {
            let s = sample(self.actor, chunk, 0, &self.rollout, self.decode, step_seed(seed, k))?;
            let (r, _) = self.rewards.score(chunk, &s)?;
            sum += r.iter().map(|&x| x as f64).sum::<f64>();
            n += r.len();
        }
        Ok(if n == 0 { 0.0 } else { sum / n as f64 })
    }
}

/// How many optimiser steps the run plans, for the position-based learning-rate schedule.
struct Plan {
    /// Per pass over a full rollout batch.
    per_pass: usize,
    /// Per rollout step (`update_iters` passes).
    per_rollout: usize,
    /// Rollout steps in the run.
    total_steps: usize,
    /// Minibatches per optimiser step.
    accum: usize,
}

impl Plan {
    fn total(&self) -> usize {
        self.total_steps * self.per_rollout
    }
}

fn non_finite(what: &'static str, value: f64, st: &PpoState, updates: usize) -> TrainError {
    TrainError::NonFinite {
        what,
        value,
        step: st.step + 1,
        micro_step: updates + 1,
        kept: "the last checkpoint (if any) is kept".into(),
    }
}

#[cfg(test)]
mod tests;
