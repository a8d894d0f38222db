//! Built-in tools a model may call: deterministic, sandboxed functions with JSON-schema
//! declarations in the OpenAI `tools` format.
//!
//! Nothing here evaluates model text as code: the calculator has its own parser over exact
//! decimals ([`decimal`]), unit conversion multiplies by fixed factors, and the lookup reads a
//! fixed table. Every tool is bounded in time (bounded input, bounded digits) and its output is
//! cut to [`MAX_OUTPUT_CHARS`]. Arguments are checked against the tool's schema ([`validate`])
//! before it runs; a bad call gets a structured `{"error": …}` result, never a panic.
//!
//! [`TOOLS`] is the one registry: recipes name tools from it (`builtin = { tools = [...] }`), the
//! `builtin:tool_use` generator runs them to write its conversations, and eval runs them when a
//! model calls one. This module is a leaf: it imports nothing from the crate.

pub mod decimal;

use decimal::Dec;
use serde_json::{json, Map, Value};

/// Longest tool result (in characters) fed back to a model, as the reference's agent loop cuts it.
pub const MAX_OUTPUT_CHARS: usize = 2048;

/// A built-in tool.
pub struct Tool {
    /// The name a model calls it by.
    pub name: &'static str,
    /// What it does (shown to the model).
    pub description: &'static str,
    parameters: fn() -> Value,
    run: fn(&Map<String, Value>) -> Result<Value, String>,
}

/// Every built-in tool.
pub static TOOLS: &[Tool] = &[
    Tool {
        name: "calculator",
        description: "Evaluate an arithmetic expression exactly (+ - * / ^ and parentheses).",
        parameters: || {
            json!({"type": "object", "properties": {
                "expression": {"type": "string", "description": "e.g. 48213 * 90731", "maxLength": decimal::MAX_EXPR_CHARS}
            }, "required": ["expression"], "additionalProperties": false})
        },
        run: |a| Ok(json!({"result": decimal::evaluate(str_arg(a, "expression"))?.to_string()})),
    },
    Tool {
        name: "convert_units",
        description: "Convert a value between units of length, mass, time, volume or temperature.",
        parameters: || {
            let units: Vec<&str> = UNITS.iter().map(|u| u.0).collect();
            json!({"type": "object", "properties": {
                "value": {"type": "number"},
                "from": {"type": "string", "enum": units},
                "to": {"type": "string", "enum": units}
            }, "required": ["value", "from", "to"], "additionalProperties": false})
        },
        run: convert_units,
    },
    Tool {
        name: "element_lookup",
        description: "Look up a chemical element (hydrogen to calcium) by name or symbol.",
        parameters: || {
            json!({"type": "object", "properties": {
                "element": {"type": "string", "description": "name or symbol, e.g. sodium or Na", "maxLength": 32}
            }, "required": ["element"], "additionalProperties": false})
        },
        run: |a| {
            let q = str_arg(a, "element").trim();
            let e = ELEMENTS
                .iter()
                .find(|e| e.0.eq_ignore_ascii_case(q) || e.1.eq_ignore_ascii_case(q))
                .ok_or_else(|| format!("unknown element '{q}' (the table holds hydrogen to calcium)"))?;
            Ok(json!({"name": e.0, "symbol": e.1, "atomic_number": e.2, "atomic_mass": e.3}))
        },
    },
];

/// The names of every built-in tool, in registry order.
pub fn names() -> Vec<&'static str> {
    TOOLS.iter().map(|t| t.name).collect()
}

/// The tool called `name`.
pub fn get(name: &str) -> Option<&'static Tool> {
    TOOLS.iter().find(|t| t.name == name)
}

/// A string argument the schema already required.
fn str_arg<'a>(a: &'a Map<String, Value>, k: &str) -> &'a str {
    a.get(k).and_then(Value::as_str).unwrap_or_default()
}

impl Tool {
    /// The JSON schema of the arguments.
    pub fn parameters(&self) -> Value {
        (self.parameters)()
    }

    /// The declaration in the OpenAI `tools` format (`{"type": "function", "function": {…}}`).
    pub fn declaration(&self) -> Value {
        json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters()}})
    }

    /// Check `args` (an object, or a JSON string holding one) against the schema.
    pub fn check_args(&self, args: &Value) -> Result<Map<String, Value>, String> {
        let owned;
        let args = match args {
            Value::String(s) => {
                owned = serde_json::from_str::<Value>(s).map_err(|e| format!("arguments are not JSON: {e}"))?;
                &owned
            }
            v => v,
        };
        validate(&self.parameters(), args).map_err(|e| format!("invalid arguments for {}: {e}", self.name))?;
        Ok(args.as_object().cloned().unwrap_or_default())
    }

    /// Validate and run; a bad call or a failing tool is an [`ToolResult::Error`].
    pub fn call(&self, args: &Value) -> ToolResult {
        match self.check_args(args).and_then(|a| (self.run)(&a)) {
            Ok(v) => ToolResult::Ok(v),
            Err(e) => ToolResult::Error(e),
        }
    }
}

/// What a tool call returned.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolResult {
    /// The tool's JSON result.
    Ok(Value),
    /// Why the call failed (unknown tool, invalid arguments, the tool's own error).
    Error(String),
}

impl ToolResult {
    /// The `tool` message content: the JSON result or `{"error": …}`, cut to [`MAX_OUTPUT_CHARS`].
    pub fn content(&self) -> String {
        let s = match self {
            ToolResult::Ok(v) => v.to_string(),
            ToolResult::Error(e) => json!({"error": e}).to_string(),
        };
        match s.char_indices().nth(MAX_OUTPUT_CHARS) {
            Some((i, _)) => s[..i].to_string(),
            None => s,
        }
    }
}

/// A call a model made: `{"name": …, "arguments": …}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The tool name.
    pub name: String,
    /// The arguments as given (an object, or a JSON string).
    pub arguments: Value,
}

impl ToolCall {
    /// Read a call object; OpenAI's `{"function": {…}}` wrapper is unwrapped.
    pub fn from_value(v: &Value) -> Result<Self, String> {
        let v = v.get("function").unwrap_or(v);
        let name = v.get("name").and_then(Value::as_str).ok_or("a tool call needs a string \"name\"")?;
        let arguments = v.get("arguments").cloned().ok_or("a tool call needs \"arguments\"")?;
        Ok(ToolCall { name: name.to_string(), arguments })
    }

    /// As a message's `tool_calls` entry.
    pub fn to_value(&self) -> Value {
        json!({"name": self.name, "arguments": self.arguments})
    }

    /// Run it against the tools `offered` (a call to any other tool is an error result).
    pub fn execute(&self, offered: &[&str]) -> ToolResult {
        match get(&self.name).filter(|t| offered.contains(&t.name)) {
            Some(t) => t.call(&self.arguments),
            None => ToolResult::Error(format!("tool not found: '{}' (offered: {})", self.name, offered.join(", "))),
        }
    }
}

/// Every `<tool_call>…</tool_call>` body of a model's output, parsed (a body that is not a call
/// object is an `Err` with the reason). An unclosed last block counts as a failed call.
pub fn parse_tool_calls(text: &str) -> Vec<Result<ToolCall, String>> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut out = vec![];
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        let body = &rest[i + OPEN.len()..];
        let Some(j) = body.find(CLOSE) else {
            out.push(Err("a <tool_call> block is not closed".into()));
            break;
        };
        out.push(
            serde_json::from_str::<Value>(body[..j].trim())
                .map_err(|e| format!("the tool call is not JSON: {e}"))
                .and_then(|v| ToolCall::from_value(&v)),
        );
        rest = &body[j + CLOSE.len()..];
    }
    out
}

/// The tool name the first `<tool_call>` block asks for, read leniently (`"name": "…"` in the
/// body), so a call whose arguments are broken still shows which tool was chosen.
pub fn first_called_name(text: &str) -> Option<String> {
    let body = &text[text.find("<tool_call>")? + "<tool_call>".len()..];
    let body = body.split("</tool_call>").next().unwrap_or(body);
    if let Some(Ok(call)) = parse_tool_calls(text).into_iter().next() {
        return Some(call.name);
    }
    let rest = body[body.find("\"name\"")? + "\"name\"".len()..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

/// The text of a model's output outside `<tool_call>` blocks (and its `<think>` block), trimmed.
pub fn strip_tool_calls(text: &str) -> String {
    let text = text.rsplit_once("</think>").map_or(text, |(_, t)| t);
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("<tool_call>") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("</tool_call>").map_or("", |j| &rest[i + j + "</tool_call>".len()..]);
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// Check `v` against the JSON-schema subset the declarations use: `type` (object, string, number,
/// integer, boolean, array), `properties`, `required`, `additionalProperties: false`, `enum`,
/// `maxLength`.
pub fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    validate_at(schema, v, "arguments")
}

fn validate_at(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "object" => v.is_object(),
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_i64() || v.is_u64(),
            "boolean" => v.is_boolean(),
            "array" => v.is_array(),
            _ => true,
        };
        if !ok {
            return Err(format!(
                "{at} must be {} {ty}, got {v}",
                if ty == "object" || ty == "integer" { "an" } else { "a" }
            ));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return Err(format!("{at} is {v}, expected one of {}", list.join(", ")));
        }
    }
    if let (Some(max), Some(s)) = (schema.get("maxLength").and_then(Value::as_u64), v.as_str()) {
        if s.chars().count() as u64 > max {
            return Err(format!("{at} is longer than {max} characters"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if let Some(k) = req.as_str().filter(|k| !obj.contains_key(*k)) {
                return Err(format!("{at} lacks the required '{k}'"));
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate_at(s, x, &format!("'{k}'"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at} has an unknown field '{k}'"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Units by symbol: (symbol, quantity, size of one unit in the quantity's base unit). Temperatures
/// are affine and converted through kelvin instead (their factor is unused).
pub const UNITS: &[(&str, &str, &str)] = &[
    ("mm", "length", "0.001"),
    ("cm", "length", "0.01"),
    ("m", "length", "1"),
    ("km", "length", "1000"),
    ("in", "length", "0.0254"),
    ("ft", "length", "0.3048"),
    ("yd", "length", "0.9144"),
    ("mi", "length", "1609.344"),
    ("g", "mass", "0.001"),
    ("kg", "mass", "1"),
    ("t", "mass", "1000"),
    ("lb", "mass", "0.45359237"),
    ("oz", "mass", "0.028349523125"),
    ("s", "time", "1"),
    ("min", "time", "60"),
    ("h", "time", "3600"),
    ("day", "time", "86400"),
    ("week", "time", "604800"),
    ("ml", "volume", "0.001"),
    ("l", "volume", "1"),
    ("gal", "volume", "3.785411784"),
    ("C", "temperature", ""),
    ("F", "temperature", ""),
    ("K", "temperature", ""),
];

fn convert_units(a: &Map<String, Value>) -> Result<Value, String> {
    let unit = |k: &str| UNITS.iter().find(|u| u.0 == str_arg(a, k)).expect("the schema's enum");
    let (from, to) = (unit("from"), unit("to"));
    if from.1 != to.1 {
        return Err(format!("cannot convert {} ({}) to {} ({})", from.0, from.1, to.0, to.1));
    }
    let value = Dec::parse(&a["value"].to_string())?;
    let d = |s: &str| Dec::parse(s).expect("a constant");
    let out = if from.1 == "temperature" {
        let (c0, five, nine, f0) = (d("273.15"), d("5"), d("9"), d("32"));
        let kelvin = match from.0 {
            "C" => value.add(&c0)?,
            "F" => value.sub(&f0)?.mul(&five)?.div(&nine)?.add(&c0)?,
            _ => value,
        };
        match to.0 {
            "C" => kelvin.sub(&c0)?,
            "F" => kelvin.sub(&c0)?.mul(&nine)?.div(&five)?.add(&f0)?,
            _ => kelvin,
        }
    } else {
        value.mul(&d(from.2))?.div(&d(to.2))?
    };
    Ok(json!({"value": out.to_string(), "unit": to.0}))
}

/// The lookup table: (name, symbol, atomic number, standard atomic mass).
pub const ELEMENTS: &[(&str, &str, u32, &str)] = &[
    ("hydrogen", "H", 1, "1.008"),
    ("helium", "He", 2, "4.0026"),
    ("lithium", "Li", 3, "6.94"),
    ("beryllium", "Be", 4, "9.0122"),
    ("boron", "B", 5, "10.81"),
    ("carbon", "C", 6, "12.011"),
    ("nitrogen", "N", 7, "14.007"),
    ("oxygen", "O", 8, "15.999"),
    ("fluorine", "F", 9, "18.998"),
    ("neon", "Ne", 10, "20.180"),
    ("sodium", "Na", 11, "22.990"),
    ("magnesium", "Mg", 12, "24.305"),
    ("aluminium", "Al", 13, "26.982"),
    ("silicon", "Si", 14, "28.085"),
    ("phosphorus", "P", 15, "30.974"),
    ("sulfur", "S", 16, "32.06"),
    ("chlorine", "Cl", 17, "35.45"),
    ("argon", "Ar", 18, "39.95"),
    ("potassium", "K", 19, "39.098"),
    ("calcium", "Ca", 20, "40.078"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: Value) -> ToolResult {
        get(name).unwrap().call(&args)
    }

    #[test]
    fn every_tool_declares_an_openai_function_and_runs() {
        for t in TOOLS {
            let d = t.declaration();
            assert_eq!(d["type"], "function");
            assert_eq!(d["function"]["name"], t.name);
            assert_eq!(d["function"]["parameters"]["type"], "object");
        }
        assert_eq!(
            call("calculator", json!({"expression": "48213 * 90731"})),
            ToolResult::Ok(json!({"result": "4374413703"}))
        );
        // Arguments given as a JSON string (how chat templates may carry them) work too.
        assert_eq!(call("calculator", json!("{\"expression\": \"2^10\"}")).content(), "{\"result\":\"1024\"}");
        let conv =
            |v: Value, f: &str, t: &str| call("convert_units", json!({"value": v, "from": f, "to": t})).content();
        assert_eq!(conv(json!(12.5), "km", "m"), r#"{"value":"12500","unit":"m"}"#);
        assert_eq!(conv(json!(1), "mi", "ft"), r#"{"value":"5280","unit":"ft"}"#);
        assert_eq!(conv(json!(100), "C", "F"), r#"{"value":"212","unit":"F"}"#);
        assert_eq!(conv(json!(-40), "F", "C"), r#"{"value":"-40","unit":"C"}"#);
        assert_eq!(conv(json!(0), "C", "K"), r#"{"value":"273.15","unit":"K"}"#);
        assert_eq!(conv(json!(2), "lb", "kg"), r#"{"value":"0.90718474","unit":"kg"}"#);
        assert_eq!(conv(json!(3), "h", "min"), r#"{"value":"180","unit":"min"}"#);
        assert!(conv(json!(3), "kg", "m").contains("cannot convert kg (mass) to m (length)"));
        let na = call("element_lookup", json!({"element": "Sodium"}));
        assert_eq!(
            na,
            ToolResult::Ok(json!({"name": "sodium", "symbol": "Na", "atomic_number": 11, "atomic_mass": "22.990"}))
        );
        assert_eq!(
            call("element_lookup", json!({"element": "fe"})).content(),
            r#"{"error":"unknown element 'fe' (the table holds hydrogen to calcium)"}"#
        );
    }

    #[test]
    fn bad_arguments_are_structured_errors() {
        for (name, args, msg) in [
            ("calculator", json!({}), "lacks the required 'expression'"),
            ("calculator", json!({"expression": 5}), "'expression' must be a string"),
            ("calculator", json!({"expression": "1", "x": 1}), "unknown field 'x'"),
            ("calculator", json!([1]), "arguments must be an object"),
            ("calculator", json!("not json"), "arguments are not JSON"),
            ("calculator", json!({"expression": "1/0"}), "division by zero"),
            ("calculator", json!({"expression": "9".repeat(300)}), "longer than 256"),
            ("convert_units", json!({"value": "3", "from": "m", "to": "km"}), "'value' must be a number"),
            ("convert_units", json!({"value": 3, "from": "parsec", "to": "km"}), "expected one of"),
        ] {
            let r = call(name, args.clone());
            let ToolResult::Error(e) = &r else { panic!("{name} {args}: {r:?}") };
            assert!(e.contains(msg), "{name} {args}: {e}");
            assert!(r.content().starts_with("{\"error\":"), "{}", r.content());
        }
        let c = ToolCall { name: "rm".into(), arguments: json!({}) };
        assert!(matches!(c.execute(&["calculator"]), ToolResult::Error(e) if e.contains("tool not found: 'rm'")));
        let c = ToolCall { name: "calculator".into(), arguments: json!({"expression": "1+1"}) };
        assert!(matches!(c.execute(&["element_lookup"]), ToolResult::Error(_)), "only offered tools run");
        assert_eq!(c.execute(&["calculator"]), ToolResult::Ok(json!({"result": "2"})));
    }

    #[test]
    fn validation_covers_the_schema_subset() {
        let s = json!({"type": "object", "properties": {"n": {"type": "integer"}, "b": {"type": "boolean"}}, "required": ["n"]});
        assert!(validate(&s, &json!({"n": 3, "extra": 1})).is_ok());
        assert!(validate(&s, &json!({"n": 3.5})).unwrap_err().contains("'n' must be an integer"));
        assert!(validate(&s, &json!({"n": 1, "b": "yes"})).unwrap_err().contains("'b' must be a boolean"));
        assert!(validate(&s, &json!({"b": true})).unwrap_err().contains("lacks the required 'n'"));
    }

    #[test]
    fn tool_calls_are_parsed_from_model_output() {
        let text = "<think>\n\n</think>\n\nLet me compute.\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+2\"}}\n</tool_call>\n<tool_call>{\"function\": {\"name\": \"x\", \"arguments\": \"{}\"}}</tool_call><tool_call>oops</tool_call><tool_call>{\"name\":1";
        let calls = parse_tool_calls(text);
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[0].as_ref().unwrap().name, "calculator");
        assert_eq!(calls[1].as_ref().unwrap().arguments, json!("{}"));
        assert!(calls[2].as_ref().unwrap_err().contains("not JSON"));
        assert!(calls[3].as_ref().unwrap_err().contains("not closed"));
        assert_eq!(strip_tool_calls(text), "Let me compute.");
        assert!(parse_tool_calls("The answer is 4.").is_empty());
        assert_eq!(first_called_name(text).as_deref(), Some("calculator"));
        let broken = "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"5^^^";
        assert_eq!(first_called_name(broken).as_deref(), Some("calculator"));
        assert_eq!(first_called_name("{\"name\": \"calculator\"}"), None);
        let long = ToolResult::Ok(json!({"result": "9".repeat(5000)}));
        assert_eq!(long.content().chars().count(), MAX_OUTPUT_CHARS);
    }
}
