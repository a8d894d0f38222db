//! `--set key.path=value`: edits applied to the recipe document before it is validated, so an
//! override is checked exactly like the same edit made in the file.

use super::diag::{suggestion, Diagnostic, Location};
use std::path::Path;

/// Top-level tables an override may create when the file does not have them.
const CREATABLE_ROOTS: &[&str] = &["recipe", "model", "datasets", "stages"];
/// Sub-tables of `[recipe]` an override may create (`--set recipe.resources.partition=gpu`).
const CREATABLE_IN_RECIPE: &[&str] = &["resources"];

/// An override that was applied: the path it set and the raw `--set` argument.
#[derive(Clone, Debug)]
pub(crate) struct Applied {
    pub(crate) path: Vec<String>,
    pub(crate) raw: String,
}

/// Split `a.b."c.d"` into segments (double quotes protect dots).
fn split_path(p: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in p.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    (!quoted && out.iter().all(|s| !s.trim().is_empty()))
        .then(|| out.into_iter().map(|s| s.trim().to_string()).collect())
}

/// Parse the right-hand side as a TOML value (`3e-4`, `7`, `true`, `["a","b"]`, `"x"`); anything
/// that is not valid TOML is taken as a bare string (`builtin:arith`, `hf://…`, `cpu`).
pub(crate) fn parse_value(raw: &str) -> toml::Value {
    let raw = raw.trim();
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// "an integer", "a string", … for messages.
pub(crate) fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Apply `overrides` in order. Every intermediate table must exist (or be a top-level section);
/// the last segment may be new, since validation then rejects it if the stage does not know it.
pub(crate) fn apply(file: &Path, doc: &mut toml::Table, overrides: &[String]) -> Result<Vec<Applied>, Vec<Diagnostic>> {
    let mut applied = Vec::new();
    let mut errors = Vec::new();
    for raw in overrides {
        let err = |message: String, hint: Option<String>| Diagnostic {
            file: file.to_path_buf(),
            location: Location::Override(raw.clone()),
            key: raw.split_once('=').map(|(k, _)| k.trim().to_string()),
            message,
            hint,
        };
        if raw.contains(['\n', '\r']) {
            // A TOML value parsed from it would silently stop at the line break.
            errors.push(err(
                format!("--set {:?} contains a line break", raw),
                Some("give one key=value per --set, on one line (use \\n inside a quoted TOML string)".into()),
            ));
            continue;
        }
        let Some((lhs, rhs)) = raw.split_once('=') else {
            errors.push(err(
                format!("--set '{raw}' has no '='"),
                Some("write --set key.path=value, e.g. --set stages.base.lr=3e-4".into()),
            ));
            continue;
        };
        let Some(path) = split_path(lhs.trim()) else {
            errors.push(err(
                format!("--set '{raw}': '{}' is not a key path", lhs.trim()),
                Some("use dotted keys such as stages.base.lr or recipe.seed".into()),
            ));
            continue;
        };
        let value = parse_value(rhs);
        if let Err((message, hint)) = set(doc, &path, 0, value, rhs) {
            errors.push(err(format!("--set {}: {message}", lhs.trim()), hint));
            continue;
        }
        applied.push(Applied { path, raw: raw.clone() });
    }
    if errors.is_empty() {
        Ok(applied)
    } else {
        Err(errors)
    }
}

/// Set `path[depth..]` inside `table` (recursive so each level's borrow ends before the next).
fn set(
    table: &mut toml::Table,
    path: &[String],
    depth: usize,
    value: toml::Value,
    rhs: &str,
) -> Result<(), (String, Option<String>)> {
    let seg = &path[depth];
    if depth + 1 == path.len() {
        // `--set recipe.name=123` means the string "123" when the key holds a string: shells make
        // quoting TOML strings awkward, and a number can never be right there.
        let value = match (table.get(seg), value) {
            (
                Some(toml::Value::String(_)),
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_),
            ) => toml::Value::String(rhs.trim().to_string()),
            (_, v) => v,
        };
        table.insert(seg.clone(), value);
        return Ok(());
    }
    if !table.contains_key(seg) {
        // Inside an existing stage or dataset table (depth >= 2) a missing sub-table such as
        // `stages.report.generation` is created: it is a param left at its default, and the kind's
        // own validation still rejects a misspelt key with a did-you-mean.
        if (depth == 0 && CREATABLE_ROOTS.contains(&seg.as_str()))
            || (depth == 1 && path[0] == "recipe" && CREATABLE_IN_RECIPE.contains(&seg.as_str()))
            || depth >= 2
        {
            table.insert(seg.clone(), toml::Value::Table(toml::Table::new()));
        } else {
            let here = if depth == 0 { "the recipe".to_string() } else { format!("[{}]", path[..depth].join(".")) };
            let keys: Vec<&str> =
                if depth == 0 { CREATABLE_ROOTS.to_vec() } else { table.keys().map(String::as_str).collect() };
            return Err((
                format!("there is no '{seg}' in {here}{}", suggestion(seg, keys.iter().copied())),
                Some(format!("existing keys there: {}", keys.join(", "))),
            ));
        }
    }
    match table.get_mut(seg) {
        Some(toml::Value::Table(t)) => set(t, path, depth + 1, value, rhs),
        Some(other) => Err((
            format!("'{}' is {}, not a table", path[..=depth].join("."), type_name(other)),
            Some(format!("set '{}' itself instead", path[..=depth].join("."))),
        )),
        None => unreachable!("inserted above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_then_fall_back_to_strings() {
        assert_eq!(parse_value("3e-4"), toml::Value::Float(3e-4));
        assert_eq!(parse_value("7"), toml::Value::Integer(7));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_value("\"x y\""), toml::Value::String("x y".into()));
        assert_eq!(parse_value("builtin:arith"), toml::Value::String("builtin:arith".into()));
        assert_eq!(parse_value("hf://datasets/a/b/c.jsonl"), toml::Value::String("hf://datasets/a/b/c.jsonl".into()));
        assert!(matches!(parse_value("[\"a\", \"b\"]"), toml::Value::Array(a) if a.len() == 2));
    }

    #[test]
    fn paths_split_on_unquoted_dots() {
        assert_eq!(split_path("a.\"b.c\".d").unwrap(), vec!["a", "b.c", "d"]);
        assert!(split_path("a..b").is_none());
    }

    #[test]
    fn missing_sub_table_inside_a_stage_is_created() {
        let mut doc: toml::Table = "[stages.report]\nkind = \"eval\"\n".parse().unwrap();
        apply(Path::new("r.toml"), &mut doc, &["stages.report.generation.max_new_tokens=8".into()]).unwrap();
        assert_eq!(doc["stages"]["report"]["generation"]["max_new_tokens"], toml::Value::Integer(8));
    }

    #[test]
    fn missing_intermediate_names_closest_key() {
        let mut doc: toml::Table = "[stages.base]\nlr = 1.0\n".parse().unwrap();
        let e = apply(Path::new("r.toml"), &mut doc, &["stages.bsae.lr=2".into()]).unwrap_err();
        assert_eq!(e[0].message, "--set stages.bsae.lr: there is no 'bsae' in [stages] — did you mean 'base'?");
        let ok = apply(Path::new("r.toml"), &mut doc, &["stages.base.lr=2e-3".into()]).unwrap();
        let mut named: toml::Table = "[recipe]\nname = \"x\"\n".parse().unwrap();
        apply(Path::new("r.toml"), &mut named, &["recipe.name=123".into()]).unwrap();
        assert_eq!(named["recipe"]["name"], toml::Value::String("123".into()));
        assert_eq!(ok[0].path, vec!["stages", "base", "lr"]);
        assert_eq!(doc["stages"]["base"]["lr"], toml::Value::Float(2e-3));
    }
}
