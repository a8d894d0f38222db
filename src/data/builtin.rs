//! Built-in synthetic datasets (`source = "builtin:<name>"`), generated deterministically by mmrun
//! itself so the quickstart needs no download.
//!
//! `builtin:arithmetic`: one- and two-digit addition/subtraction word problems with verifiable
//! answers, written in the dataset's `format`:
//!
//! | format | record |
//! |---|---|
//! | `text` | `{"text": "Question: … Answer: 12 + 7 = 19. The answer is 19."}` |
//! | `sharegpt` | human question, gpt `"12 + 7 = 19. The answer is 19."` |
//! | `openai` | the same as `role`/`content` messages |
//! | `alpaca` | `instruction` = question, `output` = the reply |
//! | `dpo` | chosen = correct reply, rejected = the same reply with a wrong result |
//! | `prompt_answer` | `{"question", "answer": "12 + 7 = 19. The answer is 19."}` |
//!
//! Parameters (`[datasets.x] builtin = { … }`): `count` (default 1000), `seed` (default 1),
//! `split` (`"train"` | `"test"`, default train), `max_operand` (default 50, at most 999),
//! `solution` (how the reply works the problem out, default `"equation"`):
//!
//! | `solution` | reply |
//! |---|---|
//! | `"equation"` | `12 + 3 = 15. The answer is 15.` |
//! | `"counting"` | `12 + 3: 1:13 2:14 3:15. The answer is 15.` (`max_operand` at most 20) |
//!
//! Why counting: the test split holds out whole problems, so a model must *compute* `9 - 5` it
//! never saw. Written as one equation, that is recalling a fact it was never shown: a 0.5M-parameter
//! model interpolates between neighbouring facts and lands one off (held-out exact match stalls near
//! 0.5 whatever the steps or width). Counting on (or down) one step at a time needs only the
//! successor of a number and a step counter to compare with the second operand, both seen in every
//! training problem, so the same model reaches ≈ 1.0 on problems it never saw.
//!
//! Splits never overlap, whatever the seeds: a problem `(a, op, b)` belongs to the test split iff
//! a hash of it (independent of the seed) falls in the test bucket (1 in 8). Within a split,
//! problems are drawn from a ChaCha RNG seeded by `seed`. The generated file is written once into
//! `<cache>/builtin/<hash of name, format and params>/data.jsonl` (atomically).

use super::DataError;
use crate::cache::Bucket;
use crate::cache::Cache;
use crate::data::spec::{check_count, split_is_test, DataFormat, DatasetSpec};
use crate::durable::write_atomic;
use crate::fs_error::IoContext;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Bump when generated content changes for the same parameters.
const GENERATOR_VERSION: u32 = 2;

use super::builtin_tools::{tool_use, ToolUseParams};

/// Parameters of `builtin:arithmetic`.
#[derive(Clone, Debug, PartialEq)]
pub struct ArithmeticParams {
    /// Number of records.
    pub count: usize,
    /// RNG seed.
    pub seed: u64,
    /// Held-out test problems or training problems.
    pub test: bool,
    /// Largest operand.
    pub max_operand: u32,
    /// How replies work the problem out.
    pub solution: Solution,
}

/// How a `builtin:arithmetic` reply works its problem out (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solution {
    /// `12 + 3 = 15.`: the result in one step.
    Equation,
    /// `12 + 3: 1:13 2:14 3:15.`: one counted step per unit of the second operand.
    Counting,
}

/// The largest operand `solution = "counting"` accepts: a reply writes one step per unit.
const MAX_COUNTING_OPERAND: u32 = 20;

impl ArithmeticParams {
    /// Parse `builtin = { … }` from a dataset declaration.
    pub fn from_spec(spec: &DatasetSpec) -> Result<Self, String> {
        let mut p =
            ArithmeticParams { count: 1000, seed: 1, test: false, max_operand: 50, solution: Solution::Equation };
        for (k, v) in &spec.builtin {
            let as_u64 = || v.as_u64().ok_or_else(|| format!("builtin parameter '{k}' must be a non-negative integer"));
            match k.as_str() {
                "count" => p.count = as_u64()? as usize,
                "seed" => p.seed = as_u64()?,
                "max_operand" => p.max_operand = as_u64()?.clamp(1, 999) as u32,
                "split" => p.test = split_is_test(v)?,
                "solution" => {
                    p.solution = match v.as_str() {
                        Some("equation") => Solution::Equation,
                        Some("counting") => Solution::Counting,
                        _ => return Err(format!("builtin parameter 'solution' must be \"equation\" or \"counting\", not {v}")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown builtin parameter '{other}' for builtin:arithmetic (expected count, seed, split, max_operand, solution)"
                    ))
                }
            }
        }
        if p.solution == Solution::Counting && p.max_operand > MAX_COUNTING_OPERAND {
            return Err(format!(
                "solution = \"counting\" writes one step per unit of the second operand, so max_operand must be at most {MAX_COUNTING_OPERAND} (it is {}); lower max_operand or use solution = \"equation\"",
                p.max_operand
            ));
        }
        check_count(p.count)?;
        Ok(p)
    }
}

/// One arithmetic problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The word problem.
    pub question: String,
    /// The worked reply, ending in "The answer is N."
    pub reply: String,
    /// The same reply with a wrong result.
    pub wrong_reply: String,
    /// The correct result.
    pub answer: i64,
}

/// Whether `(a, op, b)` is a held-out test problem (independent of any seed).
pub fn is_test_problem(a: u32, op: char, b: u32) -> bool {
    let h = blake3::hash(format!("{a}{op}{b}").as_bytes());
    h.as_bytes()[0].is_multiple_of(8)
}

const NAMES: &[&str] = &["Tom", "Anna", "Li", "Sara", "Ben", "Mia", "Omar", "Yuki"];
const THINGS: &[&str] = &["apples", "books", "coins", "marbles", "pencils", "stickers"];

/// Generate `p.count` problems.
pub fn arithmetic(p: &ArithmeticParams) -> Vec<Problem> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed ^ if p.test { 0x7e57 } else { 0x7a19 });
    let mut out = Vec::with_capacity(p.count);
    while out.len() < p.count {
        let op = if rng.random_bool(0.5) { '+' } else { '-' };
        let (mut a, mut b) = (rng.random_range(0..=p.max_operand), rng.random_range(0..=p.max_operand));
        if op == '-' && b > a {
            std::mem::swap(&mut a, &mut b);
        }
        if is_test_problem(a, op, b) != p.test {
            continue;
        }
        let answer = if op == '+' { a as i64 + b as i64 } else { a as i64 - b as i64 };
        let name = NAMES[rng.random_range(0..NAMES.len())];
        let thing = THINGS[rng.random_range(0..THINGS.len())];
        let question = match (op, rng.random_range(0..3)) {
            ('+', 0) => format!("What is {a} plus {b}?"),
            ('+', 1) => format!("{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"),
            ('+', _) => format!("Compute {a} + {b}."),
            (_, 0) => format!("What is {a} minus {b}?"),
            (_, 1) => format!("{name} has {a} {thing} and gives away {b}. How many {thing} are left?"),
            (_, _) => format!("Compute {a} - {b}."),
        };
        let mut wrong = answer + rng.random_range(1..=9) * if rng.random_bool(0.5) { 1 } else { -1 };
        if wrong < 0 {
            wrong = answer + rng.random_range(1..=9);
        }
        let work = |result: i64| match p.solution {
            Solution::Equation => format!("{a} {op} {b} = {result}."),
            Solution::Counting => format!("{a} {op} {b}: {}.", counting_steps(a, op, b)),
        };
        // A counted rejected reply keeps the (right) steps and gets the final value wrong, so a
        // preference pair teaches that the answer is where the counting ended.
        let reply = format!("{} The answer is {answer}.", work(answer));
        let wrong_reply = format!("{} The answer is {wrong}.", work(wrong));
        out.push(Problem { question, reply, wrong_reply, answer });
    }
    out
}

/// `1:13 2:14 3:15` for `12 + 3` (counting down for `-`), `0 steps` when `b` is 0.
fn counting_steps(a: u32, op: char, b: u32) -> String {
    if b == 0 {
        return "0 steps".to_string();
    }
    let step = |i: u32| if op == '+' { a + i } else { a - i };
    (1..=b).map(|i| format!("{i}:{}", step(i))).collect::<Vec<_>>().join(" ")
}

/// The JSON record of a problem in `format`.
pub fn record(pr: &Problem, format: DataFormat) -> Value {
    match format {
        DataFormat::Text => json!({"text": format!("Question: {} Answer: {}", pr.question, pr.reply)}),
        DataFormat::Sharegpt => json!({"conversations": [
            {"from": "human", "value": pr.question}, {"from": "gpt", "value": pr.reply}]}),
        DataFormat::Openai => json!({"messages": [
            {"role": "user", "content": pr.question}, {"role": "assistant", "content": pr.reply}]}),
        DataFormat::Alpaca => json!({"instruction": pr.question, "input": "", "output": pr.reply}),
        DataFormat::Dpo => json!({"conversations": [{"from": "human", "value": pr.question}],
            "chosen": pr.reply, "rejected": pr.wrong_reply}),
        // The worked reply, as SFT trains it, so eval's answer perplexity scores what the model
        // learned to write; its final value ("The answer is N.") is what rewards and exact match check.
        DataFormat::PromptAnswer => json!({"question": pr.question, "answer": pr.reply}),
    }
}

/// The generated file inside a `builtin-v1/<key>/` entry.
const DATA_FILE: &str = "data.jsonl";

/// Generate (once) the file of a `builtin:` dataset into the cache (`builtin-v1/<key>/`) and
/// return its path.
pub fn materialize(name: &str, generator: &str, spec: &DatasetSpec, cache: &Cache) -> Result<PathBuf, DataError> {
    let err = |msg: String| DataError::Builtin { name: name.to_string(), msg };
    let records: Box<dyn FnOnce() -> Vec<Value>> = match generator {
        "arithmetic" => {
            let params = ArithmeticParams::from_spec(spec).map_err(err)?;
            Box::new(move || arithmetic(&params).iter().map(|pr| record(pr, spec.format)).collect())
        }
        "tool_use" => {
            let params = ToolUseParams::from_spec(spec).map_err(err)?;
            let formats = crate::data::spec::builtin_formats(generator).unwrap_or_default();
            if !formats.contains(&spec.format) {
                let names: Vec<&str> = formats.iter().map(|f| f.as_str()).collect();
                return Err(err(format!(
                    "builtin:tool_use cannot write format '{}'; use {}",
                    spec.format.as_str(),
                    names.join(", ")
                )));
            }
            Box::new(move || {
                let template = crate::data::chat::ChatTemplate::reference();
                tool_use(&params).iter().map(|t| t.record(spec.format, &template)).collect()
            })
        }
        _ => {
            let all: Vec<String> =
                crate::data::spec::BUILTIN_GENERATORS.iter().map(|g| format!("builtin:{g}")).collect();
            return Err(err(format!("unknown builtin dataset 'builtin:{generator}' (available: {})", all.join(", "))));
        }
    };
    let ident = json!({
        "generator": generator, "version": GENERATOR_VERSION, "format": spec.format,
        "params": spec.builtin,
    });
    let hash = blake3::hash(ident.to_string().as_bytes()).to_hex();
    let entry = cache.derived(Bucket::Builtin, &hash[..32], |dir| {
        let mut body = String::new();
        for r in records() {
            body.push_str(&r.to_string());
            body.push('\n');
        }
        let path = dir.join(DATA_FILE);
        write_atomic(&path, body.as_bytes()).ctx("writing", &path).map_err(DataError::from)
    })?;
    Ok(entry.dir.join(DATA_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read::{read_examples, Example};
    use crate::data::spec::OnBadRecord;
    use std::collections::HashSet;

    fn spec(format: DataFormat, params: Value) -> DatasetSpec {
        DatasetSpec {
            source: "builtin:arithmetic".into(),
            format,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Error,
            builtin: serde_json::from_value(params).unwrap(),
        }
    }

    #[test]
    fn deterministic_and_splits_disjoint() {
        let tr = ArithmeticParams { count: 3000, seed: 1, test: false, max_operand: 50, solution: Solution::Equation };
        let te = ArithmeticParams { count: 300, seed: 1, test: true, ..tr.clone() };
        assert_eq!(arithmetic(&tr), arithmetic(&tr));
        let train: HashSet<String> = arithmetic(&tr).into_iter().map(|p| p.reply).collect();
        let test: Vec<Problem> = arithmetic(&te);
        assert!(test.iter().all(|p| !train.contains(&p.reply)));
        for p in arithmetic(&tr).iter().chain(&test) {
            assert!(p.reply.ends_with(&format!("The answer is {}.", p.answer)));
            assert_ne!(p.reply, p.wrong_reply);
            assert!(p.answer >= 0 && p.answer <= 100);
        }
        let other_seed = ArithmeticParams { seed: 2, ..tr.clone() };
        assert_ne!(arithmetic(&other_seed), arithmetic(&tr));
    }

    #[test]
    fn counting_replies_count_each_step_and_refuse_long_counts() {
        let p = ArithmeticParams { count: 400, seed: 1, test: false, max_operand: 12, solution: Solution::Counting };
        let equation = arithmetic(&ArithmeticParams { solution: Solution::Equation, ..p.clone() });
        let counting = arithmetic(&p);
        for (e, c) in equation.iter().zip(&counting) {
            // Same problems, answers and wrong answers: only the worked reply differs.
            assert_eq!((&e.question, e.answer), (&c.question, c.answer));
            let (a, op, b) = {
                let w: Vec<&str> = e.reply.split(' ').collect();
                (w[0].parse::<i64>().unwrap(), w[1], w[2].parse::<i64>().unwrap())
            };
            let steps: Vec<String> =
                (1..=b).map(|i| format!("{i}:{}", if op == "+" { a + i } else { a - i })).collect();
            let body = if b == 0 { "0 steps".to_string() } else { steps.join(" ") };
            assert_eq!(c.reply, format!("{a} {op} {b}: {body}. The answer is {}.", c.answer));
            assert!(c.wrong_reply.starts_with(&format!("{a} {op} {b}: {body}. The answer is ")));
            assert_ne!(c.reply, c.wrong_reply);
        }
        assert_eq!(counting_steps(12, '+', 3), "1:13 2:14 3:15");
        assert_eq!(counting_steps(5, '-', 2), "1:4 2:3");
        let long = spec(DataFormat::Text, json!({"solution": "counting", "max_operand": 50}));
        let e = ArithmeticParams::from_spec(&long).unwrap_err();
        assert!(e.contains("max_operand must be at most 20") && e.contains("solution = \"equation\""), "{e}");
        let typo = spec(DataFormat::Text, json!({"solution": "steps"}));
        assert!(ArithmeticParams::from_spec(&typo).unwrap_err().contains("\"equation\" or \"counting\""));
    }

    #[test]
    fn every_format_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        for fmt in [
            DataFormat::Text,
            DataFormat::Sharegpt,
            DataFormat::Openai,
            DataFormat::Alpaca,
            DataFormat::Dpo,
            DataFormat::PromptAnswer,
        ] {
            let s = spec(fmt, json!({"count": 50, "seed": 3, "split": "test"}));
            let ds = crate::data::resolve("arith", &s, tmp.path(), &cache).unwrap();
            let again = crate::data::resolve("arith", &s, tmp.path(), &cache).unwrap();
            assert_eq!(ds.content_hash, again.content_hash);
            assert!(ds.files[0].starts_with(tmp.path().join("builtin-v1")));
            let ex = read_examples(&ds, None).unwrap();
            assert_eq!(ex.len(), 50, "{fmt:?}");
            if let Example::PromptAnswer { answer, final_answer, .. } = &ex[0] {
                let n = final_answer.as_ref().unwrap();
                assert!(n.parse::<i64>().is_ok(), "{answer} → {n}");
                assert!(answer.ends_with(&format!("The answer is {n}.")), "{answer}");
            }
        }
        let bad = spec(DataFormat::Text, json!({"cnt": 5}));
        let e = crate::data::resolve("arith", &bad, tmp.path(), &cache).unwrap_err().to_string();
        assert!(e.contains("unknown builtin parameter 'cnt'"), "{e}");
    }
}
