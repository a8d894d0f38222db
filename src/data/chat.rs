//! Chat templates: the Jinja `chat_template` of a `tokenizer_config.json`, rendered with
//! `minijinja` the way Hugging Face `transformers` renders it (`trim_blocks`, `lstrip_blocks`,
//! Python string methods, `tojson` as `json.dumps(ensure_ascii=False)` keeping key order), so any
//! HF model's template works — the reference MiniMind template (spec §6.3) included, which mmrun's
//! own tokenizers store ([`REFERENCE_TEMPLATE`]).
//!
//! We implement the few Python methods HF templates call (`startswith`, `endswith`, `split`,
//! `strip`/`lstrip`/`rstrip`, `lower`, `upper`, `replace`, and `items`/`keys`/`values`/`get` on
//! maps) in [`py_method`] rather than pulling in `minijinja-contrib`, which is not vendored here.

use super::read::Message;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, State};
use serde_json::Value as Json;
use std::path::Path;

/// The MiniMind reference chat template (identical to the shipped `tokenizer_config.json`).
pub const REFERENCE_TEMPLATE: &str = include_str!("minimind_chat_template.jinja");

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The config file could not be read or parsed.
    #[error("{path}: cannot read tokenizer config: {msg}")]
    Config {
        /// The file.
        path: String,
        /// What failed.
        msg: String,
    },
    /// The config has no `chat_template`.
    #[error("{path}: no 'chat_template' in the tokenizer config; add one (e.g. the MiniMind template) to chat with or fine-tune this model")]
    NoTemplate {
        /// The file.
        path: String,
    },
    /// Template syntax error or render failure.
    #[error("chat template: {0:#}")]
    Template(#[from] Error),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("len", &self.source.len()).finish()
    }
}

impl ChatTemplate {
    /// Compile a template.
    pub fn new(source: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(py_method);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self { env, source: source.to_string() })
    }

    /// The reference MiniMind template.
    pub fn reference() -> Self {
        Self::new(REFERENCE_TEMPLATE).expect("the reference template compiles")
    }

    /// The `chat_template` of a `tokenizer_config.json`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, ChatError> {
        let err = |msg: String| ChatError::Config { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Json = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        match cfg.get("chat_template") {
            Some(Json::String(s)) => Self::new(s),
            // Newer configs may hold a list of named templates; take "default".
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(Self::new)
                .unwrap_or_else(|| Err(ChatError::NoTemplate { path: path.display().to_string() })),
            _ => Err(ChatError::NoTemplate { path: path.display().to_string() }),
        }
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation. `tools` are tool definitions (JSON objects); `open_thinking` only
    /// matters with `add_generation_prompt` (an open `<think>\n` instead of the closed empty block).
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        open_thinking: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat")?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            open_thinking => open_thinking,
            bos_token => "<|im_start|>",
            eos_token => "<|im_end|>",
        };
        Ok(tmpl.render(ctx)?)
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)` — `", "` / `": "` separators, insertion order kept, no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys == Some(true) {
        sort(&mut json);
    }
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn sort(v: &mut Json) {
    match v {
        Json::Object(m) => {
            let mut entries: Vec<(String, Json)> = std::mem::take(m).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, mut v) in entries {
                sort(&mut v);
                m.insert(k, v);
            }
        }
        Json::Array(a) => a.iter_mut().for_each(sort),
        _ => {}
    }
}

/// Python `json.dumps` layout (serde_json's string escaping equals Python's with
/// `ensure_ascii=False`).
fn write_py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let (open_sep, item_sep, close_sep) = match indent {
        None => (String::new(), ", ".to_string(), String::new()),
        Some(n) => {
            let inner = format!("\n{}", " ".repeat(n * (depth + 1)));
            (inner.clone(), format!(",{inner}"), format!("\n{}", " ".repeat(n * depth)))
        }
    };
    match v {
        Json::Array(a) if !a.is_empty() => {
            out.push('[');
            out.push_str(&open_sep);
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                write_py_json(x, indent, depth + 1, out);
            }
            out.push_str(&close_sep);
            out.push(']');
        }
        Json::Object(m) if !m.is_empty() => {
            out.push('{');
            out.push_str(&open_sep);
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(x, indent, depth + 1, out);
            }
            out.push_str(&close_sep);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn strip_set(args: &[Value]) -> Option<Vec<char>> {
    args.first().and_then(|a| a.as_str()).map(|s| s.chars().collect())
}

/// Python methods HF chat templates call on strings and dicts.
fn py_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let arg_str = |i: usize| -> Result<&str, Error> {
        args.get(i)
            .and_then(|a| a.as_str())
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, format!("{method}() expects a string argument")))
    };
    if let Some(s) = value.as_str() {
        return Ok(match method {
            "startswith" => Value::from(s.starts_with(arg_str(0)?)),
            "endswith" => Value::from(s.ends_with(arg_str(0)?)),
            "strip" => Value::from(match strip_set(args) {
                Some(set) => s.trim_matches(set.as_slice()),
                None => s.trim(),
            }),
            "lstrip" => Value::from(match strip_set(args) {
                Some(set) => s.trim_start_matches(set.as_slice()),
                None => s.trim_start(),
            }),
            "rstrip" => Value::from(match strip_set(args) {
                Some(set) => s.trim_end_matches(set.as_slice()),
                None => s.trim_end(),
            }),
            "split" => {
                let parts: Vec<Value> = match args.first().and_then(|a| a.as_str()) {
                    Some(sep) => s.split(sep).map(Value::from).collect(),
                    None => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "lower" => Value::from(s.to_lowercase()),
            "upper" => Value::from(s.to_uppercase()),
            "replace" => Value::from(s.replace(arg_str(0)?, arg_str(1)?)),
            _ => return Err(Error::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == minijinja::value::ValueKind::Map {
        let pairs = || -> Result<Vec<(Value, Value)>, Error> {
            value.try_iter()?.map(|k| Ok((k.clone(), value.get_item(&k)?))).collect()
        };
        return Ok(match method {
            "items" => Value::from(pairs()?.into_iter().map(|(k, v)| Value::from(vec![k, v])).collect::<Vec<_>>()),
            "keys" => Value::from(value.try_iter()?.collect::<Vec<_>>()),
            "values" => Value::from(pairs()?.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
            "get" => {
                let v = value.get_item(args.first().unwrap_or(&Value::UNDEFINED))?;
                if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                }
            }
            _ => return Err(Error::from(ErrorKind::UnknownMethod)),
        });
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shared_data;
    use serde_json::json;

    fn m(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    fn templates() -> Vec<ChatTemplate> {
        let mut v = vec![ChatTemplate::reference()];
        if let Some(d) = shared_data() {
            v.push(ChatTemplate::from_tokenizer_config(&d.join("minimind_tokenizer/tokenizer_config.json")).unwrap());
        }
        v
    }

    /// Cases rendered by Jinja2 the way transformers does (`testdata/make_chat_golden.py`).
    #[test]
    fn matches_jinja2_golden_renderings() {
        let t = ChatTemplate::reference();
        let golden = include_str!("testdata/chat_golden.jsonl");
        let mut n = 0;
        for line in golden.lines() {
            let case: Json = serde_json::from_str(line).unwrap();
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let tools: Option<Vec<Json>> = serde_json::from_value(case["tools"].clone()).unwrap();
            let out = t
                .render(
                    &messages,
                    tools.as_deref(),
                    case["add_generation_prompt"].as_bool().unwrap(),
                    case["open_thinking"].as_bool().unwrap(),
                )
                .unwrap();
            assert_eq!(out, case["rendered"].as_str().unwrap(), "case {n}");
            n += 1;
        }
        assert!(n >= 13);
    }

    #[test]
    fn reference_template_equals_the_shipped_one() {
        let Some(d) = shared_data() else { return };
        let t = ChatTemplate::from_tokenizer_config(&d.join("minimind_tokenizer/tokenizer_config.json")).unwrap();
        assert_eq!(t.source(), REFERENCE_TEMPLATE);
    }

    #[test]
    fn spec_example_and_generation_prompt() {
        for t in templates() {
            let msgs = [m("system", "S"), m("user", "Hi"), m("assistant", "Yo")];
            assert_eq!(
                t.render(&msgs, None, false, false).unwrap(),
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nYo<|im_end|>\n"
            );
            let p = t.render(&msgs[..2], None, true, false).unwrap();
            assert!(
                p.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                "{p:?}"
            );
            let p = t.render(&msgs[1..2], None, true, true).unwrap();
            assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");
        }
    }

    #[test]
    fn reasoning_tools_calls_and_responses() {
        for t in templates() {
            // Reasoning from the field and from inline <think> tags.
            let mut a = m("assistant", "42");
            a.reasoning_content = Some("\nthink hard\n".into());
            let out = t.render(&[m("user", "q"), a], None, false, false).unwrap();
            assert!(out.ends_with("<|im_start|>assistant\n<think>\nthink hard\n</think>\n\n42<|im_end|>\n"), "{out:?}");
            let inline = m("assistant", "<think>\nplan\n</think>\n\nanswer");
            let out = t.render(&[m("user", "q"), inline], None, false, false).unwrap();
            assert!(out.ends_with("<|im_start|>assistant\n<think>\nplan\n</think>\n\nanswer<|im_end|>\n"), "{out:?}");

            // Tools header with the system prompt folded in; tool call; grouped tool responses.
            let tools = vec![json!({"name": "get_weather", "description": "天气", "parameters": {"type": "object"}})];
            let mut call = m("assistant", "");
            call.tool_calls = Some(vec![
                json!({"name": "get_weather", "arguments": {"city": "北京"}}),
                json!({"function": {"name": "f2", "arguments": "{\"x\": 1}"}}),
            ]);
            let msgs = [
                m("system", "S"),
                m("user", "天气?"),
                call,
                m("tool", "晴"),
                m("tool", "25度"),
                m("assistant", "晴天"),
            ];
            let out = t.render(&msgs, Some(&tools), false, false).unwrap();
            let expected = concat!(
                "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
                "{\"name\": \"get_weather\", \"description\": \"天气\", \"parameters\": {\"type\": \"object\"}}\n</tools>\n\n",
                "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
                "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
                "<|im_start|>user\n天气?<|im_end|>\n",
                "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>",
                "\n<tool_call>\n{\"name\": \"f2\", \"arguments\": {\"x\": 1}}\n</tool_call><|im_end|>\n",
                "<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\n25度\n</tool_response><|im_end|>\n",
                "<|im_start|>assistant\n<think>\n\n</think>\n\n晴天<|im_end|>\n",
            );
            assert_eq!(out, expected);
        }
    }
}
