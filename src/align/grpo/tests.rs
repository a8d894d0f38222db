//! GRPO on a tiny random model with a toy verifiable reward: rollouts are grouped and scored
//! correctly, training raises the reward, the reference stays frozen, LoRA trains only adapters,
//! and an interrupted run resumes bit-identically. The tiny model, prompts and reward are shared
//! with PPO's tests.

use super::*;
use crate::align::dpo::frozen_reference;
use crate::align::losses::PolicyLossKind;
use crate::align::rewards::RewardSpec;
use crate::model::lora::{LoraConfig, Targets};
use crate::model::ModelConfig;

const EOS: u32 = 2;

pub(crate) fn cfg() -> ModelConfig {
    let mut c = ModelConfig::dense(32, 2, 4, 2);
    c.vocab_size = 12;
    c.intermediate_size = 48;
    c.max_position_embeddings = 64;
    c
}

/// Token `k` decodes to the letter `a + k`, so a format regex can reward chosen tokens.
pub(crate) fn decode(ids: &[u32]) -> String {
    ids.iter().map(|&k| (b'a' + k as u8) as char).collect()
}

pub(crate) fn prompts(n: usize) -> PromptSet {
    let v = (0..n).map(|i| Prompt { ids: vec![1, 3 + (i % 5) as u32, 4 + (i % 3) as u32], answer: None }).collect();
    PromptSet::new(v, 0)
}

/// Reward: +1 when the completion starts with token 7 (`h`), which a random model rarely does.
pub(crate) fn rewards() -> RewardSet {
    RewardSet::new(&[RewardSpec::Format { pattern: "^h".into(), weight: 1.0 }]).unwrap()
}

pub(crate) fn rollout_cfg() -> RolloutConfig {
    let generation = GenerationConfig {
        max_new_tokens: 4,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        stop_token_ids: vec![EOS],
        seed: 0,
    };
    RolloutConfig { num_generations: 6, generation, pad_id: 0 }
}

fn opts(dir: &std::path::Path, lr: f64, steps: usize) -> TrainOptions {
    let mut o = TrainOptions::new("grpo", dir.to_path_buf());
    o.lr = lr;
    o.batch_size = 4;
    o.max_steps = Some(steps);
    o.seed = 5;
    o
}

fn grpo<'a>(
    policy: &'a MiniMind,
    params: &'a [(String, Var)],
    reference: &'a MiniMind,
    adapters: Option<&'a LoraAdapters>,
    rewards: &'a RewardSet,
) -> Grpo<'a> {
    Grpo {
        policy,
        params,
        reference,
        adapters,
        rewards,
        rollout: rollout_cfg(),
        loss: GrpoLossConfig { kind: PolicyLossKind::Grpo, clip_low: 0.2, clip_high: 0.2, beta: 0.02 },
        decode: &decode,
    }
}

pub(crate) fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn prompt_batches_carry_their_indices_and_pad_right() {
    let d = prompts(4);
    let b = d.batch(&[3, 0]).unwrap();
    assert_eq!(b.indices, vec![3, 0]);
    assert_eq!((b.batch_size, b.seq_len), (2, 3));
    assert_eq!(&b.input_ids[..3], &d.get(3).ids[..]);
    assert!(b.labels.iter().all(|&l| l == IGNORE), "prompts carry no loss targets");
}

#[test]
fn rollouts_are_grouped_per_prompt_scored_and_end_with_eos_when_stopped() {
    let policy = MiniMind::new(&cfg(), 1, &Device::Cpu).unwrap();
    let d = prompts(3);
    let ps: Vec<&Prompt> = (0..3).map(|i| d.get(i)).collect();
    let ro = rollout(&policy, &ps, 0, &rollout_cfg(), &rewards(), &decode, 9).unwrap();
    assert_eq!(ro.completions.len(), 18, "3 prompts x 6 generations");
    assert_eq!(ro.prompt_lens, vec![3; 18]);
    let mut stopped = 0;
    for (i, c) in ro.completions.iter().enumerate() {
        let ended = c.last() == Some(&EOS);
        stopped += ended as usize;
        assert!(c.len() <= 4 + ended as usize, "row {i}: {c:?}");
        assert!(!c[..c.len() - ended as usize].contains(&EOS), "eos only at the end");
        let text = &ro.texts[i];
        assert_eq!(ro.rewards[i], if text.starts_with('h') { 1.0 } else { 0.0 }, "row {i}: {text}");
    }
    assert_eq!(stopped + ro.truncated, 18);
    // Within a group the samples differ (distinct RNG streams per row).
    assert!(ro.completions[..6].windows(2).any(|w| w[0] != w[1]));
    let again = rollout(&policy, &ps, 0, &rollout_cfg(), &rewards(), &decode, 9).unwrap();
    assert_eq!(ro.completions, again.completions, "same seed, same rollout");
}

#[test]
fn grpo_raises_the_reward_and_keeps_the_reference_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let policy = MiniMind::new(&cfg(), 2, &Device::Cpu).unwrap();
    let reference = frozen_reference(&policy).unwrap();
    let r = rewards();
    let params = policy.params().to_vec();
    let g = grpo(&policy, &params, &reference, None, &r);
    let d = prompts(8);
    let all: Vec<&Prompt> = (0..8).map(|i| d.get(i)).collect();
    let before = g.mean_reward(&all, 4, 77).unwrap();
    let probe = d.batch(&[0]).unwrap().input_tensor(&Device::Cpu).unwrap();
    let ref_logits = flat(&reference.forward_logits(&probe, None).unwrap());
    let mut seen = Vec::new();
    let s = g.train(&d, &opts(dir.path(), 2e-2, 20), &CancelToken::new(), |i, m| seen.push((i, m.clone()))).unwrap();
    assert_eq!(s.steps, 20);
    assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
    let after = g.mean_reward(&all, 4, 77).unwrap();
    assert!(after > before + 0.3, "mean reward {before} -> {after}");
    let m = &seen.last().unwrap().1;
    assert_eq!(m.groups, 4);
    assert!(m.kl > 0.0, "the policy moved away from the reference: {m:?}");
    assert_eq!(m.rewards.keys().collect::<Vec<_>>(), vec!["format"]);
    assert_eq!(flat(&reference.forward_logits(&probe, None).unwrap()), ref_logits, "reference frozen");
}

#[test]
fn lora_grpo_trains_only_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let init = MiniMind::new(&cfg(), 3, &Device::Cpu).unwrap();
    let named = init.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    let mut policy = MiniMind::from_tensors(&cfg(), named, &Device::Cpu, false).unwrap();
    let lc = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, seed: 1 };
    let ad = LoraAdapters::attach(&mut policy, &lc).unwrap();
    let reference = frozen_reference(&policy).unwrap();
    let base_before: Vec<Vec<f32>> = policy.named_tensors().iter().map(|(_, t)| flat(t)).collect();
    let r = rewards();
    let params = ad.params();
    let adapters_before: Vec<Vec<f32>> = params.iter().map(|(_, v)| flat(v.as_tensor())).collect();
    let g = grpo(&policy, &params, &reference, Some(&ad), &r);
    g.train(&prompts(8), &opts(dir.path(), 2e-2, 6), &CancelToken::new(), |_, _| {}).unwrap();
    let base_after: Vec<Vec<f32>> = policy.named_tensors().iter().map(|(_, t)| flat(t)).collect();
    assert_eq!(base_before, base_after, "base weights are frozen under LoRA");
    let adapters_after: Vec<Vec<f32>> = params.iter().map(|(_, v)| flat(v.as_tensor())).collect();
    assert_ne!(adapters_before, adapters_after, "adapters trained");
}

#[test]
fn interrupted_grpo_resumes_bit_identically() {
    let d = prompts(8);
    let r = rewards();
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let policy = MiniMind::new(&cfg(), 4, &Device::Cpu).unwrap();
        let reference = frozen_reference(&policy).unwrap();
        let params = policy.params().to_vec();
        let g = grpo(&policy, &params, &reference, None, &r);
        let cancel = CancelToken::new();
        let mut rewards_seen = Vec::new();
        let res = g.train(&d, &opts(dir, 2e-2, 6), &cancel, |i, m| {
            rewards_seen.push((i, m.reward_mean));
            if Some(i) == stop_after {
                cancel.cancel();
            }
        });
        (res.map(|s| s.losses), policy.named_tensors().iter().map(|(_, t)| flat(t)).collect::<Vec<_>>(), rewards_seen)
    };
    let a = tempfile::tempdir().unwrap();
    let (la, wa, ra) = run(a.path(), None);
    let b = tempfile::tempdir().unwrap();
    let (lb, _, rb1) = run(b.path(), Some(2));
    assert!(lb.unwrap_err().downcast_ref::<crate::cancel::Interrupted>().is_some());
    let (lb, wb, rb2) = run(b.path(), None);
    assert_eq!(rb1.len(), 3);
    assert_eq!(rb2.first().map(|x| x.0), Some(3), "resumes at the micro-step after the checkpoint");
    let rb: Vec<_> = rb1.into_iter().chain(rb2).collect();
    assert_eq!(ra, rb, "identical rollouts and rewards");
    assert_eq!(la.unwrap(), lb.unwrap());
    assert_eq!(wa, wb, "resumed weights are bit-identical");
}

#[test]
fn a_group_with_equal_rewards_is_reported_and_carries_no_advantage() {
    let policy = MiniMind::new(&cfg(), 1, &Device::Cpu).unwrap();
    let d = prompts(2);
    let ps: Vec<&Prompt> = (0..2).map(|i| d.get(i)).collect();
    // A reward every completion earns: every group has zero std.
    let all = RewardSet::new(&[RewardSpec::Format { pattern: ".*".into(), weight: 1.0 }]).unwrap();
    let ro = rollout(&policy, &ps, 0, &rollout_cfg(), &all, &decode, 1).unwrap();
    let adv = group_advantages(&ro.rewards, 6, ADVANTAGE_EPS).unwrap();
    assert_eq!(adv.zero_std_groups, 2);
    assert!(adv.advantages.iter().all(|&a| a == 0.0));
}
