//! Tool-call evaluation: held-out tool tasks run as a bounded agent loop.
//!
//! Per task the model sees the question with the offered tools' declarations; mmrun parses every
//! `<tool_call>` it generates, runs it through [`crate::tools`] (only the offered tools), feeds
//! the results back as `tool` turns and lets the model continue, for at most `max_turns`
//! generations (the reference's agent loop, spec §14.2; its `eval_toolcall.py` is a demo that
//! scores nothing, so the metrics follow the agent reward's parts, §14.3):
//!
//! * `tool_selection`: the first call names the expected tool (read leniently, so a call with
//!   broken arguments still counts its choice);
//! * `tool_args_valid`: the first call parses and its arguments validate against that tool's schema;
//! * `tool_answer`: the final answer (the last turn's text outside tool calls, none when the model
//!   was still calling tools after `max_turns`) matches the reference ([`super::answer`]).
//!
//! Each is a fraction of all tasks, so a model that never calls a tool scores 0 on the first two.

use super::{answer, CausalLm, Evaluator, PromptEncoder};
use crate::data::Message;
use crate::model::generate::{generate, FinishReason, GenerationConfig};
use crate::tools::{first_called_name, parse_tool_calls, strip_tool_calls, ToolCall, ToolResult};
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;

/// A held-out tool task (a `prompt_answer` record with `tools` and `tool_call`).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolTask {
    /// The question.
    pub question: String,
    /// The reference final answer.
    pub answer: String,
    /// The names of the offered tools (all in the registry).
    pub tools: Vec<&'static str>,
    /// The call that answers it.
    pub expected: ToolCall,
}

/// What a model did on one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolTrace {
    /// The question.
    pub prompt: String,
    /// Every generated turn, in order.
    pub turns: Vec<String>,
    /// The reference answer.
    pub reference: String,
    /// The first call named the expected tool.
    pub selected: bool,
    /// The first call's arguments validated.
    pub args_valid: bool,
    /// The final answer matched.
    pub correct: bool,
}

/// The three tool metrics over a task set (each in 0..1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ToolScores {
    /// Fraction of tasks whose first call names the expected tool.
    pub selection: f64,
    /// Fraction whose first call's arguments validate against the tool's schema.
    pub args_valid: f64,
    /// Fraction whose final answer is right.
    pub answer: f64,
}

impl<M: CausalLm, E: PromptEncoder> Evaluator<'_, M, E> {
    /// Run every task for at most `max_turns` generations; returns the scores and every trace.
    pub fn tool_use(
        &self,
        tasks: &[ToolTask],
        cfg: &GenerationConfig,
        max_turns: usize,
    ) -> anyhow::Result<(ToolScores, Vec<ToolTrace>)> {
        let mut traces = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(self.batch_size.max(1)) {
            traces.extend(self.tool_chunk(chunk, cfg, max_turns)?);
        }
        let n = tasks.len().max(1) as f64;
        let frac = |f: fn(&ToolTrace) -> bool| traces.iter().filter(|t| f(t)).count() as f64 / n;
        let scores = ToolScores {
            selection: frac(|t| t.selected),
            args_valid: frac(|t| t.args_valid),
            answer: frac(|t| t.correct),
        };
        Ok((scores, traces))
    }

    /// One batch of tasks, turn by turn (the unfinished ones generate together).
    fn tool_chunk(
        &self,
        tasks: &[ToolTask],
        cfg: &GenerationConfig,
        max_turns: usize,
    ) -> anyhow::Result<Vec<ToolTrace>> {
        let refs: Vec<&ToolTask> = tasks.iter().collect();
        let episodes = tool_episodes(self.model, self.enc, &refs, cfg, max_turns)?;
        Ok(tasks.iter().zip(episodes).map(|(t, ep)| ep.trace(t)).collect())
    }
}

/// One task worked through with tools: the token ids exactly as the model generated them, with
/// the tool turns fed back between its turns.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    /// Length of the prompt at the start of `ids`.
    pub prompt_len: usize,
    /// Prompt, then every generated turn (its eos included when it stopped on one) and the tool
    /// results fed back after it.
    pub ids: Vec<u32>,
    /// Per id after the prompt: `true` where the model generated it (what RL trains), `false`
    /// for template and tool-output tokens.
    pub generated: Vec<bool>,
    /// Every generated turn as text (special tokens kept), in order.
    pub turns: Vec<String>,
    /// The calls of every turn, parsed (a malformed call is an `Err`).
    pub calls: Vec<Vec<Result<ToolCall, String>>>,
    /// Per executed call: whether the tool returned a result (not an error).
    pub tool_ok: Vec<bool>,
    /// The model was still calling tools after `max_turns` (or the context was full).
    pub unfinished: bool,
}

impl Episode {
    /// The final answer: the last turn's text outside tool calls; empty when unfinished.
    pub fn final_text(&self) -> String {
        match self.turns.last() {
            Some(t) if !self.unfinished => strip_tool_calls(t),
            _ => String::new(),
        }
    }

    /// Generated tokens (eos included).
    pub fn generated_len(&self) -> usize {
        self.generated.iter().filter(|&&g| g).count()
    }

    /// The eval's view of the episode.
    fn trace(&self, t: &ToolTask) -> ToolTrace {
        let (mut selected, mut args_valid) = (false, false);
        if let (Some(text), Some(Some(first))) = (self.turns.first(), self.calls.first().map(|c| c.first())) {
            selected = first_called_name(text).is_some_and(|n| n == t.expected.name);
            args_valid = first.as_ref().is_ok_and(|c| call_is_valid(c, &t.tools));
        }
        ToolTrace {
            prompt: t.question.clone(),
            turns: self.turns.clone(),
            reference: t.answer.clone(),
            selected,
            args_valid,
            correct: !self.unfinished && answer::is_correct(&self.final_text(), &t.answer),
        }
    }
}

/// The call names one of the `offered` tools and its arguments validate against its schema.
pub fn call_is_valid(c: &ToolCall, offered: &[&str]) -> bool {
    offered.contains(&c.name.as_str()) && crate::tools::get(&c.name).is_some_and(|t| t.check_args(&c.arguments).is_ok())
}

/// Run each task as a bounded agent loop (spec §14.2): generate; parse every `<tool_call>`; none
/// ends the episode, otherwise run the calls through [`crate::tools`] (only the task's tools) and
/// append the results as `tool` turns plus the next generation prompt; at most `max_turns`
/// generations, and an episode still calling tools after them is unfinished (its last calls are
/// not run: nothing would read their results). The open episodes generate together (one batched
/// call per turn, turn `k` sampled with `cfg.seed` mixed with `k`).
///
/// The ids are kept as generated: each turn is appended token for token and the fed-back part is
/// tokenised on its own ([`PromptEncoder::tool_results_ids`]), never the whole conversation
/// re-rendered and re-tokenised, so what RL trains on is what the model produced.
pub fn tool_episodes<M: CausalLm, E: PromptEncoder>(
    model: &M,
    enc: &E,
    tasks: &[&ToolTask],
    cfg: &GenerationConfig,
    max_turns: usize,
) -> anyhow::Result<Vec<Episode>> {
    let eos = enc.eos_id();
    let gen_cfg = |turn: usize| GenerationConfig {
        stop_token_ids: if cfg.stop_token_ids.is_empty() { vec![eos] } else { cfg.stop_token_ids.clone() },
        seed: turn_seed(cfg.seed, turn),
        ..cfg.clone()
    };
    let mut eps = Vec::with_capacity(tasks.len());
    for t in tasks {
        let decls: Vec<serde_json::Value> =
            t.tools.iter().filter_map(|n| crate::tools::get(n)).map(|t| t.declaration()).collect();
        let ids = enc.chat_ids(&[Message::new("user", t.question.clone())], &decls)?;
        eps.push(Episode {
            prompt_len: ids.len(),
            ids,
            generated: vec![],
            turns: vec![],
            calls: vec![],
            tool_ok: vec![],
            unfinished: false,
        });
    }
    let mut open: Vec<usize> = (0..tasks.len()).collect();
    for turn in 0..max_turns.max(1) {
        if open.is_empty() {
            break;
        }
        let prompts: Vec<Vec<u32>> = open.iter().map(|&i| eps[i].ids.clone()).collect();
        let gens = generate(model, &prompts, &gen_cfg(turn), None, |_, _, _| ControlFlow::Continue(()))?;
        let mut still = vec![];
        for (&i, g) in open.iter().zip(gens) {
            let ep = &mut eps[i];
            let text = enc.decode_with_specials(&g.tokens);
            let stopped = g.finish_reason == FinishReason::Stop;
            ep.generated.extend(std::iter::repeat_n(true, g.tokens.len() + stopped as usize));
            ep.ids.extend(g.tokens);
            if stopped {
                ep.ids.push(eos);
            }
            let calls = parse_tool_calls(&text);
            ep.turns.push(text);
            let has_calls = !calls.is_empty();
            ep.calls.push(calls);
            if !has_calls {
                continue;
            }
            if turn + 1 >= max_turns {
                ep.unfinished = true;
                continue;
            }
            let mut contents = vec![];
            for c in ep.calls.last().expect("just pushed") {
                contents.push(match c {
                    Ok(c) => {
                        let r = c.execute(&tasks[i].tools);
                        ep.tool_ok.push(matches!(r, ToolResult::Ok(_)));
                        r.content()
                    }
                    Err(e) => serde_json::json!({ "error": e }).to_string(),
                });
            }
            // A turn cut by max_new_tokens still needs its end marker, as template text.
            let mut fed = if stopped { vec![] } else { vec![eos] };
            fed.extend(enc.tool_results_ids(&contents)?);
            if ep.ids.len() + fed.len() >= model.max_positions() {
                ep.unfinished = true;
                continue;
            }
            ep.generated.extend(std::iter::repeat_n(false, fed.len()));
            ep.ids.extend(fed);
            still.push(i);
        }
        open = still;
    }
    Ok(eps)
}

/// The sampling seed of turn `turn` (SplitMix64-style mixing, so turns get unrelated streams).
fn turn_seed(seed: u64, turn: usize) -> u64 {
    let mut z = seed ^ (turn as u64).wrapping_add(1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z ^ (z >> 32)
}
