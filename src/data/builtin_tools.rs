//! `builtin:tool_use`: tasks with verifiable answers that need a tool from [`crate::tools`] —
//! arithmetic on numbers too long to do in the head (`calculator`), unit conversions
//! (`convert_units`) and facts from a table (`element_lookup`). Each record is produced by
//! actually running the tool, so the tool result in a conversation is what the registry returns.
//!
//! | format | record |
//! |---|---|
//! | `openai` | user → assistant with `tool_calls` → `tool` result → assistant final answer, plus `tools` (the offered declarations) |
//! | `sharegpt` | the same as human → function_call → observation → gpt (the glaive layout) |
//! | `prompt_answer` | `{"question", "answer", "tools": [names], "tool_call": {"name", "arguments"}}`: what eval's tool metrics read |
//! | `text` | `{"text": …}`: the `openai` conversation rendered with the reference chat template, tools header included |
//!
//! Parameters: `count` (default 1000), `seed` (default 1), `split` (`"train"` | `"test"`),
//! `tools` (the tools offered and used, default all) and `max_digits` (1 to 15: the most digits of
//! a calculator operand; powers keep their result within twice that). Splits are disjoint by the
//! expected call: a task is a test task iff a seed-independent hash of its call falls in the test
//! bucket (1 in 8).
//!
//! Why `max_digits` and `text`: by default the calculator's operands run to 15 digits, which a
//! ~0.5M-parameter model does not copy from the question into its call nor from the tool's result
//! into its answer: its held-out answer accuracy stays 0, and still 0 with `max_digits = 2` after
//! 300 SFT steps. With `max_digits = 1` it answers 0.44 of held-out tasks
//! (`recipes/quickstart_rl.toml`). `text` is what a tokenizer should be trained on: a BPE that has
//! seen the tools header and the call syntax writes them in far fewer tokens.

use crate::data::chat::ChatTemplate;
use crate::data::spec::{DataFormat, DatasetSpec};
use crate::data::Message;
use crate::tools::{ToolCall, ToolResult};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Parameters of `builtin:tool_use`.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolUseParams {
    /// Number of records.
    pub count: usize,
    /// RNG seed.
    pub seed: u64,
    /// Held-out test tasks or training tasks.
    pub test: bool,
    /// Tools offered in every task (and drawn from for the task's call).
    pub tools: Vec<&'static str>,
    /// Most digits of a calculator operand (`None`: the default ranges, up to 15).
    pub max_digits: Option<u32>,
}

/// The longest calculator operand the default ranges draw, and so the largest `max_digits`.
const MAX_DIGITS: u64 = 15;

impl ToolUseParams {
    /// Parse `builtin = { … }` from a dataset declaration.
    pub fn from_spec(spec: &DatasetSpec) -> Result<Self, String> {
        let mut p = ToolUseParams { count: 1000, seed: 1, test: false, tools: crate::tools::names(), max_digits: None };
        for (k, v) in &spec.builtin {
            let as_u64 = || v.as_u64().ok_or_else(|| format!("builtin parameter '{k}' must be a non-negative integer"));
            match k.as_str() {
                "count" => p.count = as_u64()? as usize,
                "seed" => p.seed = as_u64()?,
                "split" => p.test = crate::data::spec::split_is_test(v)?,
                "tools" => p.tools = parse_tool_names(v)?,
                "max_digits" => match as_u64()? {
                    d @ 1..=MAX_DIGITS => p.max_digits = Some(d as u32),
                    d => return Err(format!("builtin parameter 'max_digits' must be from 1 to {MAX_DIGITS}, not {d}")),
                },
                other => {
                    return Err(format!(
                        "unknown builtin parameter '{other}' for builtin:tool_use (expected count, seed, split, tools, max_digits)"
                    ))
                }
            }
        }
        crate::data::spec::check_count(p.count)?;
        Ok(p)
    }
}

/// A `tools = [...]` list of registry names (the recipe loader reports the same errors with spans).
pub fn parse_tool_names(v: &Value) -> Result<Vec<&'static str>, String> {
    let known = crate::tools::names().join(", ");
    let arr = v.as_array().filter(|a| !a.is_empty());
    let arr = arr.ok_or_else(|| format!("'tools' must be a non-empty list of tool names (known tools: {known})"))?;
    arr.iter()
        .map(|t| {
            let name = t.as_str().unwrap_or_default();
            crate::tools::get(name).map(|t| t.name).ok_or_else(|| format!("unknown tool {t} (known tools: {known})"))
        })
        .collect()
}

/// One tool task, its expected call, the tool's result and the final reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolTask {
    /// The user's question.
    pub question: String,
    /// The tools offered.
    pub tools: Vec<&'static str>,
    /// The call that answers it.
    pub call: ToolCall,
    /// The `tool` message content the registry returned for `call`.
    pub result: String,
    /// The assistant's final reply, ending in "The answer is X."
    pub reply: String,
    /// The verifiable final answer.
    pub answer: String,
}

/// Whether a task with this call is held out (independent of any seed).
pub fn is_test_call(call: &ToolCall) -> bool {
    blake3::hash(call.to_value().to_string().as_bytes()).as_bytes()[0].is_multiple_of(8)
}

fn digits(rng: &mut impl Rng, (lo, hi): (u32, u32)) -> u64 {
    let n = rng.random_range(lo..=hi);
    rng.random_range(10u64.pow(n - 1)..10u64.pow(n))
}

/// A question, the call that answers it, and how the reply states the result.
type Draft = (String, ToolCall, Box<dyn Fn(&str) -> String>);

/// Operands of up to 15 digits, or of at most `max_digits` (and a power's result of at most twice
/// that). Without `max_digits` the draws are those of the first generator version.
fn calculator(rng: &mut impl Rng, max_digits: Option<u32>) -> Draft {
    let cap = |lo: u32, hi: u32| max_digits.map_or((lo, hi), |d| (lo.min(d), hi.min(d)));
    let (q, expr) = match rng.random_range(0..4) {
        0 => {
            let (a, b) = (digits(rng, cap(3, 6)), digits(rng, cap(3, 6)));
            (format!("What is {a} times {b}?"), format!("{a} * {b}"))
        }
        1 => {
            let (a, b) = (digits(rng, cap(9, 15)), digits(rng, cap(9, 15)));
            (format!("What is {a} plus {b}?"), format!("{a} + {b}"))
        }
        2 => {
            let (a, b) = (digits(rng, cap(9, 15)), digits(rng, cap(6, 12)));
            (format!("Compute {a} - {b}."), format!("{a} - {b}"))
        }
        _ => {
            // i32 draws, as the first generator version made them.
            let b: i32 = rng.random_range(2..=9);
            let e: i32 = match max_digits {
                // Up to the largest exponent whose power has at most 2 × max_digits digits.
                Some(d) => {
                    let fits = |e: i32| f64::from(b).powi(e) < 10f64.powi(2 * d as i32);
                    let top = (2..=30).take_while(|&e| fits(e)).last().unwrap_or(2);
                    rng.random_range(2..=top)
                }
                None => rng.random_range(12..=30),
            };
            (format!("What is {b} to the power of {e}?"), format!("{b}^{e}"))
        }
    };
    let call = ToolCall { name: "calculator".into(), arguments: json!({ "expression": expr }) };
    (q, call, Box::new(move |r| format!("{expr} = {r}. The answer is {r}.")))
}

fn convert(rng: &mut impl Rng) -> Draft {
    use crate::tools::UNITS;
    let from = UNITS[rng.random_range(0..UNITS.len())];
    let same: Vec<_> = UNITS.iter().filter(|u| u.1 == from.1 && u.0 != from.0).collect();
    let to = same[rng.random_range(0..same.len())];
    let whole = rng.random_range(1..=500u32);
    let value: Value = if rng.random_bool(0.3) { json!(whole as f64 + 0.5) } else { json!(whole) };
    let q = match rng.random_range(0..2) {
        0 => format!("Convert {value} {} to {}.", from.0, to.0),
        _ => format!("How many {} is {value} {}?", to.0, from.0),
    };
    let call =
        ToolCall { name: "convert_units".into(), arguments: json!({"value": value, "from": from.0, "to": to.0}) };
    let (f, t) = (from.0, to.0);
    (q, call, Box::new(move |r| format!("{value} {f} is {r} {t}. The answer is {r}.")))
}

fn lookup(rng: &mut impl Rng) -> Draft {
    let e = crate::tools::ELEMENTS[rng.random_range(0..crate::tools::ELEMENTS.len())];
    let call = ToolCall { name: "element_lookup".into(), arguments: json!({ "element": e.0 }) };
    let (name, what) = (e.0, rng.random_range(0..3));
    let q = match what {
        0 => format!("What is the atomic number of {name}?"),
        1 => format!("What is the chemical symbol of {name}?"),
        _ => format!("What is the atomic mass of {name}?"),
    };
    (
        q,
        call,
        Box::new(move |r| {
            format!("The {} of {name} is {r}. The answer is {r}.", ["atomic number", "symbol", "atomic mass"][what])
        }),
    )
}

/// The answer inside a tool's JSON result: the calculator's `result`, the conversion's `value`,
/// or the lookup field the question asks for.
fn answer_of(result: &Value, question: &str) -> Option<String> {
    let field = if question.contains("atomic number") {
        "atomic_number"
    } else if question.contains("symbol") {
        "symbol"
    } else if question.contains("atomic mass") {
        "atomic_mass"
    } else if result.get("result").is_some() {
        "result"
    } else {
        "value"
    };
    result.get(field).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
}

/// Generate `p.count` tasks.
pub fn tool_use(p: &ToolUseParams) -> Vec<ToolTask> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed ^ if p.test { 0x7e57_7001 } else { 0x7a19_7001 });
    let mut out = Vec::with_capacity(p.count);
    // The element table is small: its test split has only a few tasks, so give up on a tool that
    // keeps landing in the other split rather than loop forever.
    let mut misses = 0usize;
    while out.len() < p.count {
        let tool = p.tools[rng.random_range(0..p.tools.len())];
        let (question, call, reply) = match tool {
            "calculator" => calculator(&mut rng, p.max_digits),
            "convert_units" => convert(&mut rng),
            _ => lookup(&mut rng),
        };
        if is_test_call(&call) != p.test {
            misses += 1;
            assert!(misses < 1_000_000 + 100 * p.count, "builtin:tool_use cannot find tasks for this split");
            continue;
        }
        let ToolResult::Ok(result) = call.execute(&p.tools) else {
            unreachable!("generated calls are valid: {call:?}")
        };
        let answer = answer_of(&result, &question).expect("the result holds the answer");
        out.push(ToolTask {
            reply: reply(&answer),
            question,
            tools: p.tools.clone(),
            result: ToolResult::Ok(result).content(),
            call,
            answer,
        });
    }
    out
}

impl ToolTask {
    /// The JSON record in `format` (one of `spec::builtin_formats("tool_use")`); `text` is the
    /// conversation rendered with `template`.
    pub fn record(&self, format: DataFormat, template: &ChatTemplate) -> Value {
        let decls: Vec<Value> =
            self.tools.iter().filter_map(|t| crate::tools::get(t)).map(|t| t.declaration()).collect();
        match format {
            DataFormat::Text => {
                let mut call = Message::new("assistant", "");
                call.tool_calls = Some(vec![self.call.to_value()]);
                let messages = [
                    Message::new("user", self.question.as_str()),
                    call,
                    Message::new("tool", self.result.as_str()),
                    Message::new("assistant", self.reply.as_str()),
                ];
                let text = template
                    .render(&messages, Some(&decls[..]), false, false)
                    .expect("the reference template renders every generated conversation");
                json!({ "text": text })
            }
            DataFormat::Sharegpt => json!({"conversations": [
                {"from": "human", "value": self.question},
                {"from": "function_call", "value": self.call.to_value().to_string()},
                {"from": "observation", "value": self.result},
                {"from": "gpt", "value": self.reply}], "tools": decls}),
            DataFormat::PromptAnswer => json!({"question": self.question, "answer": self.answer,
                "tools": self.tools, "tool_call": self.call.to_value()}),
            _ => json!({"messages": [
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": "", "tool_calls": [self.call.to_value()]},
                {"role": "tool", "content": self.result},
                {"role": "assistant", "content": self.reply}], "tools": decls}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn deterministic_verified_and_splits_disjoint() {
        let tr = ToolUseParams { count: 2000, seed: 1, test: false, tools: crate::tools::names(), max_digits: None };
        let te = ToolUseParams { count: 200, test: true, ..tr.clone() };
        let train = tool_use(&tr);
        assert_eq!(train, tool_use(&tr));
        assert_ne!(train, tool_use(&ToolUseParams { seed: 2, ..tr.clone() }));
        let calls: HashSet<String> = train.iter().map(|t| t.call.to_value().to_string()).collect();
        let test = tool_use(&te);
        assert!(test.iter().all(|t| !calls.contains(&t.call.to_value().to_string())));
        for t in train.iter().chain(&test) {
            // The result is what running the call gives, and the reply states the answer.
            assert_eq!(t.call.execute(&t.tools).content(), t.result);
            assert!(t.result.contains(&t.answer), "{t:?}");
            assert!(t.reply.ends_with(&format!("The answer is {}.", t.answer)), "{t:?}");
        }
        let used: HashSet<&str> = train.iter().map(|t| t.call.name.as_str()).collect();
        assert_eq!(used.len(), 3);
        let only = tool_use(&ToolUseParams { tools: vec!["calculator"], count: 50, ..tr });
        assert!(only.iter().all(|t| t.call.name == "calculator" && t.tools == ["calculator"]));
    }

    #[test]
    fn records_read_back_with_their_tool_turns() {
        let t = &tool_use(&ToolUseParams {
            count: 1,
            seed: 5,
            test: false,
            tools: crate::tools::names(),
            max_digits: None,
        })[0];
        let template = ChatTemplate::reference();
        let spec = |format| DatasetSpec {
            source: "builtin:tool_use".into(),
            format,
            columns: Default::default(),
            on_bad_record: Default::default(),
            builtin: Default::default(),
        };
        for format in [DataFormat::Openai, DataFormat::Sharegpt] {
            let ex = crate::data::formats::convert(&t.record(format, &template), &spec(format)).unwrap();
            let crate::data::Example::Chat { messages, tools } = ex else { panic!() };
            let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
            assert_eq!(roles, ["user", "assistant", "tool", "assistant"], "{format:?}");
            assert_eq!(ToolCall::from_value(&messages[1].tool_calls.as_ref().unwrap()[0]).unwrap(), t.call);
            assert_eq!(tools.unwrap().len(), 3);
        }
        let r = t.record(DataFormat::PromptAnswer, &template);
        assert_eq!(r["tool_call"], t.call.to_value());
        assert_eq!(r["answer"], t.answer.as_str());
        // `text` is exactly what SFT renders from the `openai` record: header, call, result, reply.
        let crate::data::Example::Chat { messages, tools } =
            crate::data::formats::convert(&t.record(DataFormat::Openai, &template), &spec(DataFormat::Openai)).unwrap()
        else {
            panic!()
        };
        let rendered = template.render(&messages, tools.as_deref(), false, false).unwrap();
        let text = t.record(DataFormat::Text, &template);
        assert_eq!(text["text"], rendered.as_str());
        for part in ["# Tools", "<tool_call>", "<tool_response>", t.reply.as_str()] {
            assert!(rendered.contains(part), "{part} not in {rendered}");
        }
    }

    #[test]
    fn max_digits_bounds_the_calculator_numbers() {
        let p = ToolUseParams { count: 400, seed: 7, test: false, tools: vec!["calculator"], max_digits: Some(2) };
        let tasks = tool_use(&p);
        let ops: HashSet<&str> = tasks
            .iter()
            .filter_map(|t| {
                ["*", "+", "-", "^"].into_iter().find(|o| t.call.arguments["expression"].as_str().unwrap().contains(o))
            })
            .collect();
        assert_eq!(ops.len(), 4, "every operation is drawn");
        for t in &tasks {
            let expr = t.call.arguments["expression"].as_str().unwrap();
            let numbers: Vec<&str> = expr.split(|c: char| !c.is_ascii_digit()).filter(|n| !n.is_empty()).collect();
            assert!(numbers.iter().all(|n| n.len() <= 2), "{expr}");
            // Results stay within twice the operand digits (a sign aside), so they can be copied.
            assert!(t.answer.trim_start_matches('-').len() <= 4, "{expr} = {}", t.answer);
            assert!(t.reply.ends_with(&format!("The answer is {}.", t.answer)));
        }
        // Held out by the call as before, and the default ranges are untouched.
        let test = tool_use(&ToolUseParams { test: true, count: 50, ..p.clone() });
        assert!(test.iter().all(|t| is_test_call(&t.call)));
        let wide = tool_use(&ToolUseParams { max_digits: None, ..p });
        assert!(wide.iter().any(|t| t.answer.len() > 8));
    }

    #[test]
    fn unknown_tools_and_params_are_refused() {
        let spec = |b: Value| DatasetSpec {
            source: "builtin:tool_use".into(),
            format: DataFormat::Openai,
            columns: Default::default(),
            on_bad_record: Default::default(),
            builtin: serde_json::from_value(b).unwrap(),
        };
        let e = ToolUseParams::from_spec(&spec(json!({"tools": ["calculator", "shell"]}))).unwrap_err();
        assert!(e.contains("unknown tool \"shell\" (known tools: calculator, convert_units, element_lookup)"), "{e}");
        assert!(ToolUseParams::from_spec(&spec(json!({"tools": []}))).is_err());
        assert!(ToolUseParams::from_spec(&spec(json!({"max_operand": 3})))
            .unwrap_err()
            .contains("unknown builtin parameter"));
        assert!(ToolUseParams::from_spec(&spec(json!({"split": "dev"}))).is_err());
        for bad in [0, 16] {
            let e = ToolUseParams::from_spec(&spec(json!({"max_digits": bad}))).unwrap_err();
            assert!(e.contains("'max_digits' must be from 1 to 15"), "{e}");
        }
        assert_eq!(ToolUseParams::from_spec(&spec(json!({"max_digits": 3}))).unwrap().max_digits, Some(3));
    }
}
