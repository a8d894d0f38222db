//! Agent RL (spec §14) on top of the shared training loop: GRPO over multi-turn tool episodes.
//!
//! Each micro-batch holds `batch_size` tool tasks. For every task the current policy works through
//! `num_generations` episodes ([`tool_episodes`], the eval stage's tool loop: batched generation,
//! calls run by [`crate::tools`], results fed back as `tool` turns, at most `max_turns`). Each
//! episode is scored by [`agent_reward`], advantages are normalised within each task's group, and
//! the GRPO/CISPO objective ([`super::grpo::policy_loss`]) is taken over the tokens the model
//! generated only: tool results and template text are in the sequence (the model conditions on
//! them) but carry no loss, so they get exactly zero gradient.
//!
//! Rollouts are seeded from the run seed and the global micro-step, which a checkpoint restores:
//! an interrupted run resumes with the same episodes and ends with the same weights.

use super::grpo::{ext, labelled_batch, policy_loss, step_seed, ADVANTAGE_EPS};
use super::losses::{group_advantages, GrpoLossConfig, GrpoLossMetrics};
use super::rewards::repetition_penalty;
use crate::cancel::CancelToken;
use crate::eval::toolcall::{call_is_valid, tool_episodes, Episode, ToolTask};
use crate::eval::PromptEncoder;
use crate::model::generate::GenerationConfig;
use crate::model::lora::LoraAdapters;
use crate::model::MiniMind;
use crate::train::batch::IGNORE;
use crate::train::trainer::LossOutput;
use crate::train::{train, Batch, BatchSource, TrainOptions, TrainSummary};
use candle_core::Var;
use serde::Serialize;
use std::collections::BTreeMap;

/// The reward is clipped to `[-REWARD_CLIP, REWARD_CLIP]` (spec §14.3).
pub const REWARD_CLIP: f64 = 3.0;

/// The reward terms of one episode (spec §14.3) before clipping, and their clipped sum.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentReward {
    /// `-0.5 · Σ_turns |#<tool_call> − #</tool_call>|`: unbalanced call markers.
    pub format: f64,
    /// `+0.5` when the calls match the ground truth (as many valid calls as expected, none
    /// invalid), else `-0.5 · gap` with `gap = |valid − expected| + (calls − valid)`.
    pub calls: f64,
    /// `2.5 ×` the fraction of the reference answers found in the final answer.
    pub answer: f64,
    /// `-0.5` when the episode was still calling tools after `max_turns`.
    pub unfinished: f64,
    /// `-` the 3-gram repetition penalty of the final answer (of the last turn when unfinished).
    pub repetition: f64,
    /// The sum, clipped to ±[`REWARD_CLIP`].
    pub total: f64,
}

impl AgentReward {
    /// The term names, in metric order.
    pub const NAMES: [&'static str; 5] = ["format", "calls", "answer", "unfinished", "repetition"];

    /// The terms in [`Self::NAMES`] order.
    pub fn parts(&self) -> [f64; 5] {
        [self.format, self.calls, self.answer, self.unfinished, self.repetition]
    }
}

/// Spec §14.3's reward of `ep` on `task`: the task expects one valid call (`task.expected`) and the
/// final answer `task.answer`. Unlike the reference, an episode without any call is scored by the
/// same terms (it misses the expected call, and its answer still counts): the reference's no-tool
/// branch scores length, thinking and a reward model instead and never checks the answer there.
pub fn agent_reward(ep: &Episode, task: &ToolTask) -> AgentReward {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let answers: Vec<&str> = ep.turns.iter().map(|t| after_think(t)).collect();
    let unbalanced: usize = answers.iter().map(|a| a.matches(OPEN).count().abs_diff(a.matches(CLOSE).count())).sum();
    let calls: Vec<_> = ep.calls.iter().flatten().collect();
    let valid = calls.iter().filter(|c| c.as_ref().is_ok_and(|c| call_is_valid(c, &task.tools))).count();
    let expected = 1usize;
    let gap = valid.abs_diff(expected) + (calls.len() - valid);
    let final_text = ep.final_text();
    let found = usize::from(answer_found(&final_text, &task.answer));
    let rep_text = if ep.unfinished { answers.last().map(|a| a.trim()).unwrap_or_default() } else { &final_text };
    let mut r = AgentReward {
        format: -0.5 * unbalanced as f64,
        calls: if gap == 0 { 0.5 } else { -0.5 * gap as f64 },
        answer: 2.5 * found as f64,
        unfinished: if ep.unfinished { -0.5 } else { 0.0 },
        repetition: -repetition_penalty(rep_text),
        total: 0.0,
    };
    r.total = r.parts().iter().sum::<f64>().clamp(-REWARD_CLIP, REWARD_CLIP);
    r
}

/// A turn's text after its first `</think>` (the whole text without one), trimmed.
fn after_think(turn: &str) -> &str {
    turn.split_once("</think>").map_or(turn, |(_, a)| a).trim()
}

/// Spec §14.3's match of one reference answer: a numeric reference equals (within 1e-6) a number
/// in the text (commas removed); any other reference is a case-insensitive substring. QUIRK
/// (fixed): the reference also accepts a numeric answer as a substring, so "5" is found in "150".
pub fn answer_found(text: &str, reference: &str) -> bool {
    static NUM: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let num = NUM.get_or_init(|| regex::Regex::new(r"-?\d+(?:\.\d+)?").expect("static regex"));
    let reference = reference.trim();
    match reference.replace(',', "").parse::<f64>() {
        Ok(v) => num
            .find_iter(&text.replace(',', ""))
            .filter_map(|m| m.as_str().parse::<f64>().ok())
            .any(|x| (x - v).abs() <= 1e-6),
        Err(_) => !reference.is_empty() && text.to_lowercase().contains(&reference.to_lowercase()),
    }
}

/// The tool tasks of an agent stage with their prompts, visited by the training loop in its
/// seeded order.
#[derive(Clone, Debug)]
pub struct TaskSet {
    tasks: Vec<ToolTask>,
    prompts: Vec<Vec<u32>>,
    pad_id: u32,
}

impl TaskSet {
    /// Tasks and the prompt ids `enc` renders for them (tools offered); `pad_id` pads the loop's
    /// token batches.
    pub fn new(tasks: Vec<ToolTask>, enc: &impl PromptEncoder, pad_id: u32) -> anyhow::Result<Self> {
        let prompts = tasks
            .iter()
            .map(|t| {
                let decls: Vec<_> =
                    t.tools.iter().filter_map(|n| crate::tools::get(n)).map(|t| t.declaration()).collect();
                enc.chat_ids(&[crate::data::Message::new("user", t.question.clone())], &decls)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { tasks, prompts, pad_id })
    }

    /// The task at `i`.
    pub fn get(&self, i: usize) -> &ToolTask {
        &self.tasks[i]
    }

    /// Whether there is no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The tasks whose prompt has at most `max` tokens, and how many were left out.
    pub fn without_longer_than(self, max: usize) -> (Self, usize) {
        let n = self.tasks.len();
        let (mut tasks, mut prompts) = (vec![], vec![]);
        for (t, p) in self.tasks.into_iter().zip(self.prompts) {
            if p.len() <= max {
                tasks.push(t);
                prompts.push(p);
            }
        }
        let skipped = n - tasks.len();
        (Self { tasks, prompts, pad_id: self.pad_id }, skipped)
    }
}

impl BatchSource for TaskSet {
    fn len(&self) -> usize {
        self.tasks.len()
    }

    /// The prompts as a token batch (no loss targets). The loop only counts its tokens; the agent
    /// loss looks the tasks up by `indices`.
    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let seq_len = indices.iter().map(|&i| self.prompts[i].len()).max().unwrap_or(0).max(1);
        let mut input_ids = Vec::with_capacity(indices.len() * seq_len);
        for &i in indices {
            input_ids.extend_from_slice(&self.prompts[i]);
            input_ids.extend(std::iter::repeat_n(self.pad_id, seq_len - self.prompts[i].len()));
        }
        let labels = vec![IGNORE; input_ids.len()];
        Ok(Batch { batch_size: indices.len(), seq_len, input_ids, labels, indices: indices.to_vec(), docs: None })
    }
}

/// How episodes are sampled.
#[derive(Clone, Debug)]
pub struct EpisodeConfig {
    /// Episodes per task (the group size).
    pub num_generations: usize,
    /// Most generations per episode.
    pub max_turns: usize,
    /// Sampling of each turn; `seed` is replaced per rollout.
    pub generation: GenerationConfig,
    /// Padding id of the scoring batch.
    pub pad_id: u32,
}

/// What one agent micro-step reports (the loop's own line adds loss, lr and grad norm).
#[derive(Clone, Debug, Serialize)]
pub struct AgentStepMetrics {
    /// Mean clipped reward of the episodes.
    pub reward_mean: f64,
    /// Standard deviation of the reward over all episodes.
    pub reward_std: f64,
    /// Mean of each reward term, by name.
    pub rewards: BTreeMap<String, f64>,
    /// Mean within-group reward standard deviation.
    pub group_std: f32,
    /// Groups whose episodes all got the same reward (no policy signal).
    pub zero_std_groups: usize,
    /// Groups (tasks) in the micro-batch.
    pub groups: usize,
    /// Fraction of executed tool calls that returned a result (0 when none ran).
    pub tool_success: f64,
    /// Tool calls executed per episode.
    pub tool_calls: f64,
    /// Generated turns per episode.
    pub turns: f64,
    /// Fraction of episodes still calling tools after `max_turns`.
    pub unfinished_fraction: f64,
    /// Generated tokens per episode (the tokens that carry loss).
    pub response_len: f64,
    /// Tokens per episode after the prompt (generated, tool results and template).
    pub episode_len: f64,
    /// Mean k3 KL to the reference per generated token.
    pub kl: f32,
    /// Fraction of generated tokens where the clip (or CISPO truncation) is active.
    pub clip_fraction: f32,
    /// The policy objective's value (without the MoE aux loss).
    pub policy_loss: f32,
}

fn mean(it: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = it.len();
    if n == 0 {
        0.0
    } else {
        it.sum::<f64>() / n as f64
    }
}

/// The fixed pieces of an agent run.
pub struct Agent<'a, E: PromptEncoder + Sync> {
    /// The policy being trained.
    pub policy: &'a MiniMind,
    /// Its trainable tensors (all weights, or the adapters).
    pub params: &'a [(String, Var)],
    /// The frozen reference for the KL term.
    pub reference: &'a MiniMind,
    /// LoRA adapters on the policy, if training adapters.
    pub adapters: Option<&'a LoraAdapters>,
    /// The tokenizer side: prompts, tool results, decoding.
    pub enc: &'a E,
    /// Episode sampling.
    pub episodes: EpisodeConfig,
    /// The objective's hyper-parameters.
    pub loss: GrpoLossConfig,
}

impl<E: PromptEncoder + Sync> Agent<'_, E> {
    /// `num_generations` episodes per task (group after group) with their rewards, sampled with
    /// `seed` by the policy as it is now.
    pub fn rollout(&self, tasks: &[&ToolTask], seed: u64) -> anyhow::Result<(Vec<Episode>, Vec<AgentReward>)> {
        let g = self.episodes.num_generations;
        let rows: Vec<&ToolTask> = tasks.iter().flat_map(|t| std::iter::repeat_n(*t, g)).collect();
        let cfg = GenerationConfig { seed, ..self.episodes.generation.clone() };
        self.set_training(false);
        let eps = tool_episodes(self.policy, self.enc, &rows, &cfg, self.episodes.max_turns);
        self.set_training(true);
        let eps = eps?;
        let rewards = eps.iter().zip(&rows).map(|(e, t)| agent_reward(e, t)).collect();
        Ok((eps, rewards))
    }

    /// Train on `data`. `on_metrics(i, m)` is called after every micro-batch with its global
    /// 0-based index (continuing after a resume).
    pub fn train(
        &self,
        data: &TaskSet,
        opts: &TrainOptions,
        cancel: &CancelToken,
        mut on_metrics: impl FnMut(usize, &AgentStepMetrics) + Send,
    ) -> anyhow::Result<TrainSummary> {
        anyhow::ensure!(self.reference.params().is_empty(), "agent: the reference model must be frozen");
        anyhow::ensure!(self.episodes.num_generations >= 2, "agent: `num_generations` must be at least 2");
        let device = self.policy.device().clone();
        let mut micro = crate::train::checkpoint::latest(&opts.work_dir)?.map(|(_, s)| s.micro_step).unwrap_or(0);
        let g = self.episodes.num_generations;
        train(self.params, data, opts, cancel, |b: &Batch| {
            let tasks: Vec<&ToolTask> = b.indices.iter().map(|&i| data.get(i)).collect();
            let seed = step_seed(opts.seed, micro);
            let (eps, rewards) = self.rollout(&tasks, seed).map_err(ext)?;
            if let Some(a) = self.adapters {
                a.reseed_dropout(seed);
            }
            let totals: Vec<f32> = rewards.iter().map(|r| r.total as f32).collect();
            let adv = group_advantages(&totals, g, ADVANTAGE_EPS).map_err(ext)?;
            let rows: Vec<(&[u32], Vec<bool>)> = eps.iter().map(|e| (&e.ids[..], trained_mask(e))).collect();
            let rows: Vec<(&[u32], &[bool])> = rows.iter().map(|(i, m)| (*i, &m[..])).collect();
            let (ids, labels) = labelled_batch(&rows, self.episodes.pad_id, &device)?;
            let (loss, aux, lm) = policy_loss(self.policy, self.reference, &ids, &labels, &adv.advantages, &self.loss)?;
            on_metrics(micro, &step_metrics(&eps, &rewards, &adv, &lm));
            micro += 1;
            Ok(LossOutput { loss: (loss + &aux)?, aux: Some(aux) })
        })
    }

    fn set_training(&self, on: bool) {
        if let Some(a) = self.adapters {
            a.set_training(on);
        }
    }
}

/// Per id of the episode: whether it carries loss (the model generated it; never the prompt).
pub fn trained_mask(e: &Episode) -> Vec<bool> {
    let mut m = vec![false; e.prompt_len];
    m.extend_from_slice(&e.generated);
    m
}

fn step_metrics(
    eps: &[Episode],
    rewards: &[AgentReward],
    adv: &super::losses::GroupAdvantages,
    loss: &GrpoLossMetrics,
) -> AgentStepMetrics {
    let n = rewards.len().max(1) as f64;
    let m = mean(rewards.iter().map(|r| r.total));
    let var = rewards.iter().map(|r| (r.total - m).powi(2)).sum::<f64>() / n;
    let by_name = AgentReward::NAMES
        .iter()
        .enumerate()
        .map(|(k, name)| (name.to_string(), mean(rewards.iter().map(|r| r.parts()[k]))))
        .collect();
    let (ok, ran) = eps.iter().flat_map(|e| &e.tool_ok).fold((0usize, 0usize), |(o, r), &x| (o + x as usize, r + 1));
    AgentStepMetrics {
        reward_mean: m,
        reward_std: var.sqrt(),
        rewards: by_name,
        group_std: adv.mean_group_std,
        zero_std_groups: adv.zero_std_groups,
        groups: adv.groups,
        tool_success: if ran == 0 { 0.0 } else { ok as f64 / ran as f64 },
        tool_calls: ran as f64 / n,
        turns: mean(eps.iter().map(|e| e.turns.len() as f64)),
        unfinished_fraction: eps.iter().filter(|e| e.unfinished).count() as f64 / n,
        response_len: mean(eps.iter().map(|e| e.generated_len() as f64)),
        episode_len: mean(eps.iter().map(|e| e.generated.len() as f64)),
        kl: loss.kl,
        clip_fraction: loss.clip_fraction,
        policy_loss: loss.loss,
    }
}

#[cfg(test)]
mod tests;
