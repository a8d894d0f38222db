//! Agent RL: the §14.3 reward on hand-built episodes, the loss over generated tokens only (value
//! and gradient, tool-output tokens exactly zero), multi-turn episodes on a tiny random model with
//! a tiny tool language, and an interrupted run that resumes bit-identically.

use super::*;
use crate::align::dpo::frozen_reference;
use crate::align::grpo::tests::{cfg, flat};
use crate::align::losses::{grpo_loss, masked_token_logprobs, PolicyLossKind};
use crate::tools::{parse_tool_calls, ToolCall};
use candle_core::{Device, Tensor};
use serde_json::json;

const CALL: &str = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+3\"}}</tool_call>";

fn task() -> ToolTask {
    ToolTask {
        question: "What is 2+3?".into(),
        answer: "5".into(),
        tools: vec!["calculator"],
        expected: ToolCall { name: "calculator".into(), arguments: json!({"expression": "2+3"}) },
    }
}

/// An episode with these turns (calls parsed from them), as the loop would record it.
fn episode(turns: &[&str], unfinished: bool) -> Episode {
    Episode {
        prompt_len: 0,
        ids: vec![],
        generated: vec![],
        turns: turns.iter().map(|t| t.to_string()).collect(),
        calls: turns.iter().map(|t| parse_tool_calls(t)).collect(),
        tool_ok: vec![],
        unfinished,
    }
}

#[test]
fn the_reward_terms_match_hand_computed_values() {
    let t = task();
    let r = |turns: &[&str], unfinished| {
        let r = agent_reward(&episode(turns, unfinished), &t);
        (r.parts(), r.total)
    };
    // One valid call, then the right answer: +0.5 (no gap) + 2.5 (answer found).
    assert_eq!(r(&[CALL, "<think>\n\n</think>\n\nThe answer is 5."], false), ([0.0, 0.5, 2.5, 0.0, -0.0], 3.0));
    // No call at all: the expected call is missing (gap 1: −0.5), the answer still counts.
    assert_eq!(r(&["It is 5."], false), ([0.0, -0.5, 2.5, 0.0, -0.0], 2.0));
    // A call to an unoffered tool, then an unclosed block, still calling at max_turns:
    // gap = |0 valid − 1| + (2 calls − 0 valid) = 3 → −1.5; one unbalanced marker → −0.5;
    // unfinished → −0.5 and no final answer; "<tool_call>oops" has 2 distinct 3-grams → 0.
    let rm = "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>";
    assert_eq!(r(&[rm, "<tool_call>oops"], true), ([-0.5, -1.5, 0.0, -0.5, -0.0], -2.5));
    // Invalid arguments make a call invalid: gap = 1 + 1 = 2 → −1.0; the wrong answer gets 0.
    let bad_args = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expr\": \"2+3\"}}</tool_call>";
    assert_eq!(r(&[bad_args, "It is 6."], false), ([0.0, -1.0, 0.0, 0.0, -0.0], -1.0));
    // Repetition of the final answer: "a b c a b c a b c" → 4/7 capped at 0.5.
    assert_eq!(r(&[CALL, "5 a b c a b c a b c"], false), ([0.0, 0.5, 2.5, 0.0, -0.5], 2.5));
    // The sum is clipped to −3: three turns of "<tool_call><tool_call>" (2 unbalanced each: −3),
    // three malformed calls (gap 4: −2), unfinished (−0.5), repetition 1/4 (−0.25) = −5.75.
    let twice = "<tool_call><tool_call>";
    let (parts, total) = r(&[twice, twice, twice], true);
    assert_eq!(parts, [-3.0, -2.0, 0.0, -0.5, -0.25]);
    assert_eq!(total, -REWARD_CLIP);
}

#[test]
fn answers_are_found_as_numbers_or_case_insensitive_text() {
    assert!(answer_found("The answer is 1,234.5.", "1234.5"));
    assert!(answer_found("x = -7", "-7.0000000001"));
    assert!(!answer_found("The answer is 150.", "5"), "a number is not found inside another one");
    assert!(answer_found("the symbol is NA", "Na"));
    assert!(!answer_found("anything", ""));
}

/// The loss of one episode whose ids are `prompt (3) | generated (3, eos last) | tool output (3) |
/// generated (2)`: only the generated positions carry loss, so the logits that predict the
/// prompt and the tool output get exactly zero gradient, and each trained row's gradient is
/// `-(A/n)·(onehot(y) − softmax)` (ratio 1, reference equal to the policy, so k3 = 0).
#[test]
fn tool_output_tokens_get_exactly_zero_gradient() {
    let ep = Episode {
        prompt_len: 3,
        ids: vec![1, 3, 4, 5, 6, 2, 7, 8, 9, 6, 2],
        generated: vec![true, true, true, false, false, false, true, true],
        turns: vec![],
        calls: vec![],
        tool_ok: vec![],
        unfinished: false,
    };
    let v = 10;
    let dev = Device::Cpu;
    let mask = trained_mask(&ep);
    let (_, labels) = labelled_batch(&[(&ep.ids[..], &mask[..])], 0, &dev).unwrap();
    let t = ep.ids.len();
    let init: Vec<f32> = (0..t * v).map(|i| ((i * 7919) % 23) as f32 / 7.0 - 1.5).collect();
    let logits = candle_core::Var::from_tensor(&Tensor::from_vec(init, (1, t, v), &dev).unwrap()).unwrap();
    let (logp, m) = masked_token_logprobs(logits.as_tensor(), &labels).unwrap();
    let (ref_logp, _) = masked_token_logprobs(&logits.as_tensor().detach(), &labels).unwrap();
    let a = 1.5f32;
    let cfg = GrpoLossConfig { kind: PolicyLossKind::Grpo, clip_low: 0.2, clip_high: 0.2, beta: 0.1 };
    let out = grpo_loss(&logp, None, &ref_logp, &Tensor::new(&[a], &dev).unwrap(), &m, &cfg).unwrap();
    // Value: −(mean over the 5 generated tokens of r·A − β·k3) with r = 1, k3 = 0.
    assert!((out.metrics.loss + a).abs() < 1e-6, "{}", out.metrics.loss);
    let grads = out.loss.backward().unwrap();
    let g: Vec<Vec<f32>> = grads.get(logits.as_tensor()).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let x: Vec<Vec<f32>> = logits.as_tensor().squeeze(0).unwrap().to_vec2().unwrap();
    // Row p predicts ids[p + 1]; it trains iff that token was generated.
    for p in 0..t {
        let trains = p + 1 < t && mask[p + 1];
        if !trains {
            assert!(g[p].iter().all(|&d| d == 0.0), "row {p} (target not generated) has gradient {:?}", g[p]);
            continue;
        }
        let z: f32 = x[p].iter().map(|l| l.exp()).sum();
        for k in 0..v {
            let onehot = f32::from(k as u32 == ep.ids[p + 1]);
            let want = -(a / 5.0) * (onehot - x[p][k].exp() / z);
            assert!((g[p][k] - want).abs() < 1e-6, "row {p} logit {k}: {} vs {want}", g[p][k]);
        }
    }
    // The rows predicting the tool output (positions 5, 6, 7) and the prompt (0, 1) are the zeros.
    assert_eq!(mask.iter().filter(|&&m| m).count(), 5);
}

/// A tiny tool language over the tiny model's 12 tokens, so a random policy makes calls, answers
/// and mistakes often: token 3 is a whole valid calculator call, 4 a call to an unoffered tool, 5
/// an unclosed call, 6 the answer "5"; prompts are `[1, 9, 10]` and tool results come back as
/// `[11, 1]`.
struct TinyEnc;

const PIECES: [&str; 12] = [
    "",
    "",
    "",
    CALL,
    "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
    "<tool_call>",
    " 5",
    " the",
    " so",
    " hm",
    " ?",
    "",
];

impl PromptEncoder for TinyEnc {
    fn prompt_ids(&self, _: &str) -> anyhow::Result<Vec<u32>> {
        Ok(vec![1, 9, 10])
    }
    fn encode(&self, _: &str) -> anyhow::Result<Vec<u32>> {
        anyhow::bail!("not used")
    }
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| PIECES[i as usize]).collect()
    }
    fn eos_id(&self) -> u32 {
        2
    }
    fn chat_ids(&self, _: &[crate::data::Message], _: &[serde_json::Value]) -> anyhow::Result<Vec<u32>> {
        Ok(vec![1, 9, 10])
    }
    fn tool_results_ids(&self, results: &[String]) -> anyhow::Result<Vec<u32>> {
        assert!(!results.is_empty());
        Ok(vec![11, 1])
    }
}

fn episodes_cfg() -> EpisodeConfig {
    let generation = GenerationConfig {
        max_new_tokens: 5,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        stop_token_ids: vec![2],
        seed: 0,
    };
    EpisodeConfig { num_generations: 4, max_turns: 3, generation, pad_id: 0 }
}

fn agent<'a>(policy: &'a MiniMind, params: &'a [(String, Var)], reference: &'a MiniMind) -> Agent<'a, TinyEnc> {
    Agent {
        policy,
        params,
        reference,
        adapters: None,
        enc: &TinyEnc,
        episodes: episodes_cfg(),
        loss: GrpoLossConfig { kind: PolicyLossKind::Cispo, clip_low: 0.2, clip_high: 5.0, beta: 0.02 },
    }
}

#[test]
fn episodes_keep_the_generated_ids_and_feed_tool_results_back_untrained() {
    let policy = MiniMind::new(&cfg(), 3, &Device::Cpu).unwrap();
    let reference = frozen_reference(&policy).unwrap();
    let t = task();
    let tasks = vec![&t; 4];
    let (eps, rewards) = agent(&policy, &[], &reference).rollout(&tasks, 11).unwrap();
    assert_eq!((eps.len(), rewards.len()), (16, 16));
    let (mut multi, mut ran) = (0, 0);
    for (e, r) in eps.iter().zip(&rewards) {
        assert_eq!(&e.ids[..3], &[1, 9, 10]);
        assert_eq!(e.generated.len(), e.ids.len() - 3);
        // Split the tail into runs: generated runs are the turns, token for token; every
        // fed-back run is the tool results (after an end marker when the turn was cut).
        let (mut turns, mut k) = (vec![], 3);
        while k < e.ids.len() {
            let on = e.generated[k - 3];
            let mut j = k;
            while j < e.ids.len() && e.generated[j - 3] == on {
                j += 1;
            }
            let run = &e.ids[k..j];
            if on {
                turns.push(TinyEnc.decode(run));
            } else {
                assert!(run == [11, 1] || run == [2, 11, 1], "fed back {run:?}");
            }
            k = j;
        }
        assert_eq!(turns, e.turns, "the turns are the generated ids");
        assert!((1..=3).contains(&e.turns.len()));
        let last_calls = !e.calls.last().unwrap().is_empty();
        assert_eq!(e.unfinished, last_calls, "unfinished iff still calling on the last turn");
        assert_eq!(e.unfinished, e.turns.len() == 3 && last_calls);
        ran += e.tool_ok.len();
        multi += usize::from(e.turns.len() > 1);
        assert!(r.total.abs() <= REWARD_CLIP);
        assert_eq!(r, &agent_reward(e, &t));
    }
    assert!(multi > 0 && ran > 0, "the random policy called tools in some episodes");
    let again = agent(&policy, &[], &reference).rollout(&tasks, 11).unwrap();
    assert_eq!(again.0, eps, "same seed, same episodes");
}

fn opts(dir: &std::path::Path, steps: usize) -> TrainOptions {
    let mut o = TrainOptions::new("agent", dir.to_path_buf());
    o.lr = 2e-2;
    o.batch_size = 2;
    o.max_steps = Some(steps);
    o.seed = 5;
    o
}

#[test]
fn interrupted_agent_training_resumes_bit_identically() {
    let data = TaskSet::new(vec![task(); 6], &TinyEnc, 0).unwrap();
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let policy = MiniMind::new(&cfg(), 4, &Device::Cpu).unwrap();
        let reference = frozen_reference(&policy).unwrap();
        let params = policy.params().to_vec();
        let a = agent(&policy, &params, &reference);
        let cancel = CancelToken::new();
        let mut seen = Vec::new();
        let res = a.train(&data, &opts(dir, 5), &cancel, |i, m| {
            seen.push((i, m.reward_mean, m.kl));
            if Some(i) == stop_after {
                cancel.cancel();
            }
        });
        (res.map(|s| s.losses), policy.named_tensors().iter().map(|(_, t)| flat(t)).collect::<Vec<_>>(), seen)
    };
    let a = tempfile::tempdir().unwrap();
    let (la, wa, sa) = run(a.path(), None);
    assert!(sa.iter().any(|s| s.2 > 0.0), "the policy moved: {sa:?}");
    let b = tempfile::tempdir().unwrap();
    let (lb, _, sb1) = run(b.path(), Some(1));
    assert!(lb.unwrap_err().downcast_ref::<crate::cancel::Interrupted>().is_some());
    let (lb, wb, sb2) = run(b.path(), None);
    assert_eq!(sb2.first().map(|x| x.0), Some(2), "resumes at the micro-step after the checkpoint");
    let sb: Vec<_> = sb1.into_iter().chain(sb2).collect();
    assert_eq!(sa, sb, "identical episodes, rewards and KL");
    assert_eq!(la.unwrap(), lb.unwrap());
    assert_eq!(wa, wb, "resumed weights are bit-identical");
}
