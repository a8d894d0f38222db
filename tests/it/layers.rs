//! The module graph of `src/` points only down the declared layer order, and has no import
//! circles, neither between top-level modules nor between the files of one module.
//!
//! It reads the sources, not the compiler: every `crate::…` and `super::…` path outside comments
//! and test-only code (`#[cfg(test)]` modules and the files they declare) is an edge from the file
//! that names it to the module it names. Test code may reach anywhere (it wires real parts
//! together). Run it alone with `cargo test --test layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules in its own layer or below, never above.
/// Entries are top-level modules, or a submodule that stands on its own below its parent (plain
/// vocabulary with no `crate::` imports of its own, which the recipe is written in).
const LAYERS: &[&[&str]] = &[
    // Leaves: no `crate::` imports at all.
    // `hub::names` checks names from the network and recipes before they become paths (`hub::uri`
    // validates a recipe's revision with it).
    // `tools`: the built-in tools models call, named by recipes, run by data generators and eval.
    &["artifact", "cancel", "cpu", "dist", "durable", "fs_error", "progress", "testutil", "tools", "hub::names"],
    // The vocabulary a recipe is written in, owned by the modules that give it meaning.
    &["data::spec", "cache::spec", "model::config", "hub::uri"],
    // TOML → `Recipe`, and the declaration-only `StageKind` trait.
    &["recipe"],
    // The content-addressed store (data builds its shards and builtin data through it).
    &["cache"],
    &["data"],
    &["hub"],
    // Uploads a folder as one Hub commit; nothing in `hub` depends on it (the CLI exports first).
    &["hub::push"],
    // Run records: implement data's `RejectSink`.
    &["runs"],
    // Model references (`hf://…`, a stage, `<run>:<stage>`, a folder) resolved to local weights.
    &["modelref"],
    &["model"],
    &["eval"],
    // Export to Hugging Face, GGUF and Ollama layouts.
    &["export"],
    &["train"],
    &["align"],
    &["stages"],
    // Talking to models: loading, the batching engine, chat; the HTTP server on top.
    &["infer"],
    &["serve"],
    &["plan"],
    &["exec"],
    &["cli"],
];

/// Upward edges that are known and scheduled to go, each with the reason. Empty it as they go.
const ALLOWED_UPWARD: &[(&str, &str, &str)] = &[];

/// File-level import circles inside one module that are known and scheduled to go.
const ALLOWED_CIRCLES: &[&str] = &[];

#[derive(Default)]
struct Crate {
    /// Module path (`["data", "read"]`) → file.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// Module paths that exist only under `cfg(test)`.
    test_only: BTreeSet<Vec<String>>,
}

fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut segs: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if segs.last().map(String::as_str) == Some("mod") || segs == ["lib"] {
        segs.pop();
    }
    segs
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn load(src: &Path) -> Crate {
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut c = Crate::default();
    for f in files {
        if f == src.join("main.rs") {
            continue; // the binary: it uses the library through `mmrun::`
        }
        c.files.insert(module_path(src, &f), f);
    }
    // `#[cfg(test)] mod x;` declares a test-only file.
    for (path, file) in &c.files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut pending_test = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with("#[cfg(test)]") {
                pending_test = true;
                continue;
            }
            if pending_test && !line.starts_with("#[") {
                let decl = line.trim_start_matches("pub(crate) ").trim_start_matches("pub ");
                if let Some(name) = decl.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                    let mut child = path.clone();
                    child.push(name.trim().to_string());
                    c.test_only.insert(child);
                }
                pending_test = false;
            }
        }
    }
    let test_only: Vec<Vec<String>> = c.test_only.iter().cloned().collect();
    for t in test_only {
        for p in c.files.keys() {
            if p.starts_with(&t) {
                c.test_only.insert(p.clone());
            }
        }
    }
    c
}

/// The source without comments and without `#[cfg(test)]` items (an inline `mod tests { … }`).
fn strip(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        // A `//` that starts a comment follows whitespace or starts the line (URLs in strings,
        // `hf://…`, follow a `:`).
        let mut cut = line.len();
        let b = line.as_bytes();
        for i in 0..b.len().saturating_sub(1) {
            if b[i] == b'/' && b[i + 1] == b'/' && (i == 0 || b[i - 1].is_ascii_whitespace()) {
                cut = i;
                break;
            }
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    // Drop each `#[cfg(test)]` item: up to its `;`, or its balanced `{ … }`.
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        let semi = rest.find(';').unwrap_or(rest.len());
        let brace = rest.find('{').unwrap_or(rest.len());
        let end = if semi < brace {
            semi + 1
        } else {
            let mut depth = 0usize;
            let mut end = rest.len();
            for (i, ch) in rest.char_indices().skip(brace) {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        };
        out.replace_range(at..at + end, "");
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path named after `crate::` or `super::` in `text`, made absolute from module `here`.
/// `use crate::{a::X, b::{Y, Z}}` yields `a::X`, `b::Y`, `b::Z`.
fn references(text: &str, here: &[String]) -> Vec<Vec<String>> {
    fn expand(prefix: Vec<String>, s: &str, out: &mut Vec<Vec<String>>) {
        // `s` starts right after `prefix::`.
        let mut segs = prefix;
        let mut rest = s;
        loop {
            if let Some(inner) = rest.strip_prefix('{') {
                let mut depth = 1usize;
                let mut end = inner.len();
                for (i, ch) in inner.char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let body = &inner[..end];
                let mut depth = 0usize;
                let mut start = 0;
                for (i, ch) in body.char_indices().chain([(body.len(), ',')]) {
                    match ch {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            let item = body[start..i].trim();
                            if !item.is_empty() && item != "self" {
                                expand(segs.clone(), item, out);
                            }
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                return;
            }
            let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
            if len == 0 {
                break;
            }
            segs.push(rest[..len].to_string());
            rest = &rest[len..];
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        out.push(segs);
    }
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let at_word = i == 0 || !is_ident(bytes[i - 1] as char);
        if at_word && text[i..].starts_with("crate::") {
            expand(Vec::new(), &text[i + "crate::".len()..], &mut out);
            i += "crate::".len();
        } else if at_word && text[i..].starts_with("super::") {
            // In module `a::b` (`src/a/b.rs` or `src/a/b/mod.rs`) `super` is `a`; chains climb.
            let mut base: Vec<String> = here.to_vec();
            let mut j = i;
            while text[j..].starts_with("super::") {
                base.pop();
                j += "super::".len();
            }
            expand(base, &text[j..], &mut out);
            i = j;
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    out
}

/// The longest prefix of `path` that is a module with a file.
fn resolve<'a>(c: &'a Crate, path: &[String]) -> Option<&'a Vec<String>> {
    (1..=path.len()).rev().find_map(|n| c.files.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// File-level edges (`from module` → `to module`) of non-test code.
fn edges(c: &Crate) -> BTreeSet<(Vec<String>, Vec<String>)> {
    let mut e = BTreeSet::new();
    for (path, file) in &c.files {
        if c.test_only.contains(path) {
            continue;
        }
        let text = strip(&std::fs::read_to_string(file).unwrap());
        for r in references(&text, path) {
            if let Some(to) = resolve(c, &r) {
                if to != path && !c.test_only.contains(to) {
                    e.insert((path.clone(), to.clone()));
                }
            }
        }
    }
    e
}

/// The layer node a module belongs to: a listed submodule, else its top-level module.
fn node(path: &[String]) -> Option<String> {
    let full = path.join("::");
    LAYERS
        .iter()
        .flat_map(|l| l.iter())
        .filter(|n| n.contains("::"))
        .find(|n| full == **n || full.starts_with(&format!("{n}::")))
        .map(|n| n.to_string())
        .or_else(|| path.first().cloned())
}

fn layer_of(node: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&node))
}

/// One cycle in `g`, if any (DFS with colours), as the nodes along it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn dfs(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match colour.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cyc = stack[at..].to_vec();
                    cyc.push(m.clone());
                    return Some(cyc);
                }
                0 => {
                    if let Some(c) = dfs(m, g, colour, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for n in g.keys() {
        if colour.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = dfs(n, g, &mut colour, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn krate() -> Crate {
    load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn every_module_has_a_layer() {
    let c = krate();
    let missing: BTreeSet<String> =
        c.files.keys().filter(|p| !p.is_empty()).filter_map(|p| node(p)).filter(|n| layer_of(n).is_none()).collect();
    assert!(missing.is_empty(), "modules without a layer in tests/layers.rs LAYERS: {missing:?}");
    // A module listed twice would silently take its first layer: say where it belongs once.
    let mut seen = BTreeSet::new();
    let twice: Vec<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).filter(|n| !seen.insert(*n)).collect();
    assert!(twice.is_empty(), "modules listed in more than one layer of LAYERS: {twice:?}");
}

#[test]
fn modules_only_point_down() {
    let c = krate();
    let mut bad = Vec::new();
    let mut allowed_seen = BTreeSet::new();
    for (from, to) in edges(&c) {
        let (Some(a), Some(b)) = (node(&from), node(&to)) else { continue };
        if from.is_empty() || to.is_empty() || a == b {
            continue;
        }
        let (Some(la), Some(lb)) = (layer_of(&a), layer_of(&b)) else { continue };
        if lb > la {
            if ALLOWED_UPWARD.iter().any(|(x, y, _)| *x == a && *y == b) {
                allowed_seen.insert((a.clone(), b.clone()));
                continue;
            }
            bad.push(format!("{} → {} ({a} is below {b})", from.join("::"), to.join("::")));
        }
    }
    assert!(bad.is_empty(), "imports that point up the layer order:\n  {}", bad.join("\n  "));
    let stale: Vec<_> =
        ALLOWED_UPWARD.iter().filter(|(a, b, _)| !allowed_seen.contains(&(a.to_string(), b.to_string()))).collect();
    assert!(stale.is_empty(), "ALLOWED_UPWARD lists edges that are gone; remove them: {stale:?}");
}

#[test]
fn no_import_circles() {
    let c = krate();
    let e = edges(&c);
    // Between top-level modules (and the standalone submodules of LAYERS).
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in &e {
        let (Some(a), Some(b)) = (node(from), node(to)) else { continue };
        if !from.is_empty() && !to.is_empty() && a != b {
            top.entry(a).or_default().insert(b);
        }
    }
    if let Some(cyc) = find_cycle(&top) {
        panic!("import circle between modules: {}", cyc.join(" → "));
    }
    // Between sibling files of one module: an edge a::x::… → a::y::… counts as a::x → a::y. A
    // parent and its own children (`mod.rs` re-exports, `super::Type`) are one unit, not a circle.
    let mut siblings: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in &e {
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        if common == 0 || common == from.len() || common == to.len() {
            continue; // across top-level modules (checked above), or an ancestor and its child
        }
        let a = from[..=common].join("::");
        let b = to[..=common].join("::");
        siblings.entry(a).or_default().insert(b);
    }
    for allowed in ALLOWED_CIRCLES {
        let (a, b) = allowed.split_once(" ↔ ").unwrap();
        siblings.entry(a.to_string()).or_default().remove(b);
    }
    if let Some(cyc) = find_cycle(&siblings) {
        panic!("import circle between files: {}", cyc.join(" → "));
    }
}

/// The parser itself: grouped imports, `super::` chains, comments and test code.
#[test]
fn parser_reads_grouped_relative_and_skips_comments_and_tests() {
    let here = vec!["data".to_string(), "read".to_string()];
    let text = strip(
        "use crate::{a::X, b::{Y, c::Z}};\nuse super::super::cache::Cache; // crate::ignored\nlet u = \"hf://x\";\n\
         #[cfg(test)]\nmod tests { use crate::exec::Y; }\nfn f() { crate::model::f() }\n",
    );
    let refs: Vec<String> = references(&text, &here).iter().map(|r| r.join("::")).collect();
    assert_eq!(refs, ["a::X", "b::Y", "b::c::Z", "cache::Cache", "model::f"]);
}
