//! PPO on a tiny random model with a toy verifiable reward: training raises the reward and fills
//! every metric, the reference stays frozen, a reward model's term is its clipped score of the
//! finished conversation, the approximate-KL early stop applies nothing more, and an interrupted
//! run resumes bit-identically (actor, critic and metrics).

use super::*;
use crate::align::dpo::frozen_reference;
use crate::align::grpo::tests::{self as grpo_tests, cfg, decode, flat, prompts, rewards as rules};
use candle_core::Device;

const EOS: u32 = 2;

fn rollout_cfg() -> RolloutConfig {
    RolloutConfig { num_generations: 1, ..grpo_tests::rollout_cfg() }
}

fn ppo_cfg() -> PpoConfig {
    PpoConfig {
        gamma: 1.0,
        lambda: 0.95,
        clip: 0.2,
        clip_value: 0.2,
        vf_coef: 0.5,
        kl_coef: 0.02,
        update_iters: 2,
        mini_batch_size: 4,
        early_stop_kl: 10.0,
        critic_lr: 2e-2,
    }
}

fn opts(dir: &std::path::Path, steps: usize) -> TrainOptions {
    let mut o = TrainOptions::new("ppo", dir.to_path_buf());
    o.lr = 2e-2;
    o.batch_size = 8;
    o.max_steps = Some(steps);
    o.seed = 5;
    o
}

/// The critic of `actor`: its weights, a head drawn from seed 9.
fn critic_of(actor: &MiniMind) -> Critic {
    let named = actor.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    Critic::new(RewardModel::from_tensors(&cfg(), named, &Device::Cpu, true, 9, 0).unwrap()).unwrap()
}

fn ppo<'a>(actor: &'a MiniMind, params: &'a [(String, Var)], parts: &'a Parts<'a>, cfg: PpoConfig) -> Ppo<'a> {
    Ppo {
        actor,
        actor_params: params,
        reference: &parts.reference,
        critic: &parts.critic,
        rewards: &parts.rewards,
        rollout: rollout_cfg(),
        cfg,
        decode: &decode,
    }
}

/// The frozen reference and the critic of an actor, and rule rewards.
struct Parts<'a> {
    reference: MiniMind,
    critic: Critic,
    rewards: Rewards<'a>,
}

fn parts<'a>(actor: &MiniMind, rules: &'a RewardSet) -> Parts<'a> {
    Parts {
        reference: frozen_reference(actor).unwrap(),
        critic: critic_of(actor),
        rewards: Rewards { rules: Some(rules), model: None },
    }
}

fn weights(p: &[(String, Var)]) -> Vec<Vec<f32>> {
    p.iter().map(|(_, v)| flat(v.as_tensor())).collect()
}

#[test]
fn ppo_raises_the_reward_fills_every_metric_and_keeps_the_reference_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let actor = MiniMind::new(&cfg(), 2, &Device::Cpu).unwrap();
    let r = rules();
    let p = parts(&actor, &r);
    let (reference, critic) = (&p.reference, &p.critic);
    let params = actor.params().to_vec();
    let ppo = ppo(&actor, &params, &p, ppo_cfg());
    let d = prompts(16);
    let all: Vec<&Prompt> = (0..16).map(|i| d.get(i)).collect();
    let before = ppo.mean_reward(&all, 8, 77).unwrap();
    let probe = d.batch(&[0]).unwrap().input_tensor(&Device::Cpu).unwrap();
    let ref_logits = flat(&reference.forward_logits(&probe, None).unwrap());
    let critic_before = weights(critic.params());
    let mut mut_opts = opts(dir.path(), 16);
    mut_opts.metrics_path = Some(dir.path().join("metrics.jsonl"));
    let mut seen = Vec::new();
    let s = ppo.train(&d, &mut_opts, &CancelToken::new(), |m| seen.push(m.clone())).unwrap();
    assert_eq!(s.steps, 16);
    assert_eq!(seen.iter().map(|m| m.step).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
    let after = ppo.mean_reward(&all, 8, 77).unwrap();
    assert!(after > before + 0.3, "mean reward {before} -> {after}");
    let m = seen.last().unwrap();
    assert_eq!(m.updates, 4, "2 passes x 2 minibatches of 4: {m:?}");
    assert!(!m.early_stopped);
    assert!(m.kl > 0.0 && m.approx_kl > 0.0, "the actor moved: {m:?}");
    assert!(seen.iter().any(|m| m.clip_fraction > 0.0), "the second pass reuses samples, so the clip acts");
    assert!(seen.iter().all(|m| m.value_loss.is_finite() && m.response_len >= 1.0 && m.grad_norm > 0.0));
    assert!(m.lr < 2e-2 && m.critic_lr < 2e-2 && m.lr > 0.0, "cosine schedule: {m:?}");
    assert_eq!(m.rewards.keys().collect::<Vec<_>>(), vec!["format"]);
    assert_ne!(weights(critic.params()), critic_before, "the critic trained");
    let line = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for k in ["step", "reward_mean", "reward/format", "kl", "approx_kl", "clip_fraction", "value_loss", "loss"] {
        assert!(first.get(k).is_some(), "metrics line lacks {k}: {first}");
    }
    assert_eq!(flat(&reference.forward_logits(&probe, None).unwrap()), ref_logits, "reference frozen");
}

#[test]
fn a_reward_model_term_is_its_clipped_score_of_the_finished_turn() {
    let actor = MiniMind::new(&cfg(), 3, &Device::Cpu).unwrap();
    let named = actor.named_tensors().into_iter().collect();
    let rm = RewardModel::from_tensors(&cfg(), named, &Device::Cpu, false, 4, 0).unwrap();
    let r = rules();
    let turn_end = vec![EOS, 10];
    let rewards = Rewards {
        rules: Some(&r),
        model: Some(ModelReward { model: &rm, clip: 1e-3, turn_end: turn_end.clone(), pad_id: 0 }),
    };
    assert_eq!(rewards.names(), vec!["format", MODEL_TERM]);
    let d = prompts(4);
    let ps: Vec<&Prompt> = (0..4).map(|i| d.get(i)).collect();
    let s = sample(&actor, &ps, 0, &rollout_cfg(), &decode, 11).unwrap();
    let (totals, parts) = rewards.score(&ps, &s).unwrap();
    let unclipped = Rewards { rules: None, model: Some(ModelReward { model: &rm, clip: 1e9, turn_end, pad_id: 0 }) };
    let (raw, _) = unclipped.score(&ps, &s).unwrap();
    for i in 0..4 {
        // Scored alone: prompt, completion, and the rest of `<|im_end|>\n` (all of it when cut).
        let mut row = ps[i].ids.clone();
        row.extend(&s.completions[i]);
        if s.completions[i].last() != Some(&EOS) {
            row.push(EOS);
        }
        row.push(10);
        let alone =
            rm.scores(&Tensor::new(row.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), false).unwrap();
        let want = alone.0.to_vec1::<f32>().unwrap()[0];
        assert!((raw[i] - want).abs() < 1e-5, "row {i}: {} vs {want}", raw[i]);
        assert_eq!(parts[i][1], (want as f64).clamp(-1e-3, 1e-3), "clipped");
        assert!((totals[i] as f64 - parts[i][0] - parts[i][1]).abs() < 1e-6, "the terms add up");
    }
}

#[test]
fn the_approx_kl_early_stop_applies_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let actor = MiniMind::new(&cfg(), 4, &Device::Cpu).unwrap();
    let r = rules();
    let p = parts(&actor, &r);
    let params = actor.params().to_vec();
    // Minibatches of 1: the first is on-policy (ratio 1) and applied; the actor has moved by the
    // second, whose approximate KL is then far above the threshold.
    let cfg = PpoConfig { mini_batch_size: 1, update_iters: 3, early_stop_kl: 1e-9, ..ppo_cfg() };
    let ppo = ppo(&actor, &params, &p, cfg);
    let mut seen = Vec::new();
    ppo.train(&prompts(8), &opts(dir.path(), 2), &CancelToken::new(), |m| seen.push(m.clone())).unwrap();
    for m in &seen {
        assert!(m.early_stopped && m.updates == 1, "one update, then the stop: {m:?}");
        assert!(m.approx_kl > 0.0);
    }
}

#[test]
fn interrupted_ppo_resumes_bit_identically() {
    let d = prompts(8);
    let r = rules();
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let actor = MiniMind::new(&cfg(), 6, &Device::Cpu).unwrap();
        let p = parts(&actor, &r);
        let params = actor.params().to_vec();
        let mut o = opts(dir, 5);
        o.batch_size = 4;
        let ppo = ppo(&actor, &params, &p, PpoConfig { mini_batch_size: 2, ..ppo_cfg() });
        let cancel = CancelToken::new();
        let mut seen = Vec::new();
        let res = ppo.train(&d, &o, &cancel, |m| {
            seen.push(m.clone());
            if Some(m.step) == stop_after {
                cancel.cancel();
            }
        });
        (res.map(|s| s.losses), weights(&params), weights(p.critic.params()), seen)
    };
    let a = tempfile::tempdir().unwrap();
    let (la, aa, ca, ma) = run(a.path(), None);
    let b = tempfile::tempdir().unwrap();
    let (lb, _, _, mb1) = run(b.path(), Some(2));
    assert!(lb.unwrap_err().downcast_ref::<Interrupted>().is_some());
    let (lb, ab, cb, mb2) = run(b.path(), None);
    assert_eq!(mb1.len(), 2);
    assert_eq!(mb2.first().map(|m| m.step), Some(3), "resumes at the rollout step after the checkpoint");
    let mb: Vec<_> = mb1.into_iter().chain(mb2).collect();
    assert_eq!(ma, mb, "identical rollouts, rewards and updates");
    assert_eq!(la.unwrap(), lb.unwrap());
    assert_eq!(aa, ab, "resumed actor is bit-identical");
    assert_eq!(ca, cb, "resumed critic is bit-identical");
}
