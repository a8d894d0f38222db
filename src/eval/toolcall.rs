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
use crate::model::generate::{generate, GenerationConfig};
use crate::tools::{first_called_name, parse_tool_calls, strip_tool_calls, ToolCall};
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
        let decls: Vec<Vec<serde_json::Value>> = tasks
            .iter()
            .map(|t| t.tools.iter().filter_map(|n| crate::tools::get(n)).map(|t| t.declaration()).collect())
            .collect();
        let mut convs: Vec<Vec<Message>> =
            tasks.iter().map(|t| vec![Message::new("user", t.question.clone())]).collect();
        let mut traces: Vec<ToolTrace> = tasks
            .iter()
            .map(|t| ToolTrace {
                prompt: t.question.clone(),
                turns: vec![],
                reference: t.answer.clone(),
                selected: false,
                args_valid: false,
                correct: false,
            })
            .collect();
        let mut open: Vec<usize> = (0..tasks.len()).collect();
        for turn in 0..max_turns.max(1) {
            if open.is_empty() {
                break;
            }
            let prompts =
                open.iter().map(|&i| self.enc.chat_ids(&convs[i], &decls[i])).collect::<anyhow::Result<Vec<_>>>()?;
            let gens = generate(self.model, &prompts, cfg, None, |_, _, _| ControlFlow::Continue(()))?;
            let mut still = vec![];
            for (&i, g) in open.iter().zip(gens) {
                let text = self.enc.decode_with_specials(&g.tokens);
                let calls = parse_tool_calls(&text);
                let tr = &mut traces[i];
                if turn == 0 {
                    if let Some(first) = calls.first() {
                        let t = &tasks[i];
                        tr.selected = first_called_name(&text).is_some_and(|n| n == t.expected.name);
                        tr.args_valid = first.as_ref().is_ok_and(|c| {
                            t.tools.contains(&c.name.as_str())
                                && crate::tools::get(&c.name).is_some_and(|tool| tool.check_args(&c.arguments).is_ok())
                        });
                    }
                }
                tr.turns.push(text.clone());
                if calls.is_empty() {
                    tr.correct = answer::is_correct(&strip_tool_calls(&text), &tr.reference);
                    continue;
                }
                let ok: Vec<ToolCall> = calls.iter().filter_map(|c| c.as_ref().ok().cloned()).collect();
                let mut msg = Message::new("assistant", strip_tool_calls(&text));
                msg.tool_calls = Some(ok.iter().map(ToolCall::to_value).collect());
                convs[i].push(msg);
                for c in &calls {
                    let content = match c {
                        Ok(c) => c.execute(&tasks[i].tools).content(),
                        Err(e) => serde_json::json!({ "error": e }).to_string(),
                    };
                    convs[i].push(Message::new("tool", content));
                }
                still.push(i);
            }
            open = still;
        }
        Ok(traces)
    }
}
