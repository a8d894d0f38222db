//! Why a key moved: a field-by-field comparison of two fingerprints, in words.

use super::{short, Status};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A value as a person would write it in the recipe: `5e-4` rather than `0.0005`, bare strings.
pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let a = f.abs();
            if a != 0.0 && !(1e-3..1e6).contains(&a) {
                format!("{f:e}")
            } else {
                format!("{f}")
            }
        }
        Value::Null => "(none)".into(),
        other => other.to_string(),
    }
}

fn obj(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

fn arr(v: Option<&Value>) -> Vec<Value> {
    v.and_then(Value::as_array).cloned().unwrap_or_default()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Compare two flat objects, one reason per changed key: "`label` k a → b".
fn diff_map(label: &str, old: &Map<String, Value>, new: &Map<String, Value>, out: &mut Vec<String>) {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        match (old.get(k), new.get(k)) {
            (Some(a), Some(b)) if a != b => out.push(format!("{label} {k} {} → {}", show(a), show(b))),
            (None, Some(b)) => out.push(format!("{label} {k} = {} (new)", show(b))),
            (Some(a), None) => out.push(format!("{label} {k} removed (was {})", show(a))),
            _ => {}
        }
    }
}

/// Reasons `new` differs from `old`. `statuses` holds the already-planned upstream stages.
pub(crate) fn diff(old: &Value, new: &Value, statuses: &BTreeMap<String, Status>) -> Vec<String> {
    let mut out = Vec::new();
    if old.get("key_format") != new.get("key_format") {
        out.push(format!(
            "key format {} → {} (mmrun changed what goes into keys)",
            show(old.get("key_format").unwrap_or(&Value::Null)),
            show(new.get("key_format").unwrap_or(&Value::Null))
        ));
    }
    if old.get("kind") != new.get("kind") {
        out.push(format!("kind {} → {}", s(old, "kind"), s(new, "kind")));
    } else if old.get("version") != new.get("version") {
        out.push(format!(
            "stage version {} → {}",
            show(old.get("version").unwrap_or(&Value::Null)),
            show(new.get("version").unwrap_or(&Value::Null))
        ));
    }
    if old.get("seed") != new.get("seed") {
        out.push(format!(
            "seed {} → {}",
            show(old.get("seed").unwrap_or(&Value::Null)),
            show(new.get("seed").unwrap_or(&Value::Null))
        ));
    }
    if old.get("device") != new.get("device") {
        out.push(format!(
            "device class {} → {}",
            show(old.get("device").unwrap_or(&Value::Null)),
            show(new.get("device").unwrap_or(&Value::Null))
        ));
    }
    if old.get("precision") != new.get("precision") {
        // Absent means f32 (see plan::key).
        let p = |v: &Value| v.get("precision").and_then(Value::as_str).unwrap_or("f32").to_string();
        out.push(format!("precision {} → {}", p(old), p(new)));
    }
    diff_map("param", &obj(old.get("params")), &obj(new.get("params")), &mut out);

    // Inputs: matched by (param, position among that param's entries).
    let (oi, ni) = (arr(old.get("inputs")), arr(new.get("inputs")));
    let by_param = |v: &[Value]| {
        let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for e in v {
            m.entry(s(e, "param").to_string()).or_default().push(e.clone());
        }
        m
    };
    let (om, nm) = (by_param(&oi), by_param(&ni));
    for (param, news) in &nm {
        let olds = om.get(param).cloned().unwrap_or_default();
        for (i, n) in news.iter().enumerate() {
            let name = s(n, "stage");
            match olds.get(i) {
                None => out.push(format!("input {name} added ({param})")),
                Some(o) if s(o, "stage") != name && s(o, "key") != s(n, "key") => {
                    out.push(format!("input {param} is now {name} (was {})", s(o, "stage")))
                }
                Some(o) if s(o, "key") != s(n, "key") => out.push(match statuses.get(name) {
                    Some(Status::Stale) => format!("input {name} is stale"),
                    Some(Status::Missing) => format!("input {name} is not built"),
                    _ => format!("input {name} changed (key {} → {})", short(s(o, "key")), short(s(n, "key"))),
                }),
                _ => {}
            }
        }
        for o in olds.iter().skip(news.len()) {
            out.push(format!("input {} no longer used ({param})", s(o, "stage")));
        }
    }
    for (param, olds) in &om {
        if !nm.contains_key(param) {
            for o in olds {
                out.push(format!("input {} no longer used ({param})", s(o, "stage")));
            }
        }
    }

    // Datasets: matched by name.
    let (od, nd) = (arr(old.get("datasets")), arr(new.get("datasets")));
    for n in &nd {
        let name = s(n, "dataset");
        match od.iter().find(|o| s(o, "dataset") == name) {
            None => out.push(format!("dataset {name} added ({})", s(n, "param"))),
            Some(o) => {
                if o.get("content_hash") != n.get("content_hash") {
                    out.push(format!(
                        "dataset {name} changed (content hash {}… → {}…)",
                        short(s(o, "content_hash")),
                        short(s(n, "content_hash"))
                    ));
                }
                for field in ["format", "columns", "on_bad_record", "builtin"] {
                    if o.get(field) != n.get(field) {
                        out.push(format!(
                            "dataset {name} {field} {} → {}",
                            show(o.get(field).unwrap_or(&Value::Null)),
                            show(n.get(field).unwrap_or(&Value::Null))
                        ));
                    }
                }
            }
        }
    }
    for o in &od {
        if !nd.iter().any(|n| s(n, "dataset") == s(o, "dataset")) {
            out.push(format!("dataset {} no longer used", s(o, "dataset")));
        }
    }

    // Local files (an adopted tokenizer): matched by (param, file name).
    let (of, nf) = (arr(old.get("files")), arr(new.get("files")));
    let same_file = |a: &Value, b: &Value| s(a, "param") == s(b, "param") && s(a, "file") == s(b, "file");
    for n in &nf {
        let what = format!("{} ({})", s(n, "file"), s(n, "param"));
        match of.iter().find(|o| same_file(o, n)) {
            None => out.push(format!("now reads {what}")),
            Some(o) if o.get("content_hash") != n.get("content_hash") => out.push(format!(
                "{what} changed (content hash {}… → {}…)",
                short(s(o, "content_hash")),
                short(s(n, "content_hash"))
            )),
            Some(_) => {}
        }
    }
    for o in of.iter().filter(|o| !nf.iter().any(|n| same_file(o, n))) {
        out.push(format!("no longer reads {} ({})", s(o, "file"), s(o, "param")));
    }

    // `hf://` inputs, as pinned by the lock: matched by param.
    let (or, nr) = (arr(old.get("remote")), arr(new.get("remote")));
    for n in &nr {
        match or.iter().find(|o| s(o, "param") == s(n, "param")) {
            None => out.push(format!("now reads a Hub input ({})", s(n, "param"))),
            Some(o) if o.get("files") != n.get("files") => {
                out.push(format!("the Hub files of `{}` changed (re-pinned in the lock)", s(n, "param")))
            }
            Some(_) => {}
        }
    }
    for o in or.iter().filter(|o| !nr.iter().any(|n| s(n, "param") == s(o, "param"))) {
        out.push(format!("no longer reads a Hub input ({})", s(o, "param")));
    }

    let (om, nm) = (old.get("model").filter(|v| !v.is_null()), new.get("model").filter(|v| !v.is_null()));
    match (om, nm) {
        (Some(a), Some(b)) if a != b => diff_map("model", &obj(Some(a)), &obj(Some(b)), &mut out),
        (None, Some(_)) => out.push("now builds its model from [model]".into()),
        (Some(_), None) => out.push("no longer builds its model from [model]".into()),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_read_like_the_recipe() {
        assert_eq!(show(&json!(5e-4)), "5e-4");
        assert_eq!(show(&json!(3e-4)), "3e-4");
        assert_eq!(show(&json!(0.5)), "0.5");
        assert_eq!(show(&json!(32)), "32");
        assert_eq!(show(&json!("adamw")), "adamw");
    }

    #[test]
    fn each_field_gives_a_reason() {
        let old = json!({
            "key_format": 1, "kind": "pretrain", "version": 1, "seed": 42, "device": "cpu",
            "params": {"lr": 5e-4, "warmup": 10},
            "inputs": [{"param": "tokenizer", "stage": "tok", "key": "aaaaaaaaaaaaaaaa"}],
            "datasets": [{"param": "data", "dataset": "medical", "content_hash": "1a2b3c4d5e6f7a8b", "format": "text"}],
            "files": [{"param": "source", "file": "tokenizer.json", "content_hash": "0123456789abcdef"}],
            "model": {"hidden_size": 64}
        });
        let new = json!({
            "key_format": 1, "kind": "pretrain", "version": 2, "seed": 7, "device": "cuda", "precision": "bf16",
            "params": {"lr": 3e-4, "batch": 8},
            "inputs": [{"param": "tokenizer", "stage": "tok", "key": "bbbbbbbbbbbbbbbb"}],
            "datasets": [{"param": "data", "dataset": "medical", "content_hash": "3c4d5e6f7a8b9c0d", "format": "text"}],
            "files": [{"param": "source", "file": "tokenizer.json", "content_hash": "fedcba9876543210"},
                      {"param": "source", "file": "tokenizer_config.json", "content_hash": "00"}],
            "model": {"hidden_size": 128}
        });
        let st = BTreeMap::from([("tok".to_string(), Status::Stale)]);
        assert_eq!(
            diff(&old, &new, &st),
            [
                "stage version 1 → 2",
                "seed 42 → 7",
                "device class cpu → cuda",
                "precision f32 → bf16",
                "param batch = 8 (new)",
                "param lr 5e-4 → 3e-4",
                "param warmup removed (was 10)",
                "input tok is stale",
                "dataset medical changed (content hash 1a2b3c4d5e6f… → 3c4d5e6f7a8b…)",
                "tokenizer.json (source) changed (content hash 0123456789ab… → fedcba987654…)",
                "now reads tokenizer_config.json (source)",
                "model hidden_size 64 → 128",
            ]
        );
        let st = BTreeMap::from([("tok".to_string(), Status::Cached)]);
        assert!(diff(&old, &new, &st).contains(&"input tok changed (key aaaaaaaaaaaa → bbbbbbbbbbbb)".to_string()));
    }
}
