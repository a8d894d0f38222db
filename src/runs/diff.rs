//! `mmrun diff A B`: changed params, differing stage keys, metric deltas, loss curves and eval
//! generations side by side.

use super::{files, RunSummary};
use crate::cache::Cache;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// Options of [`diff_runs`].
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// The cache, to read eval reports' generations (skipped when absent).
    pub cache: Option<Cache>,
    /// How many loss points to show per stage.
    pub loss_points: usize,
}

/// Flatten nested JSON into `a.b.c = value` paths.
pub fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, child, out);
            }
        }
        serde_json::Value::Null if prefix.is_empty() => {}
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Render the difference between two runs as text.
pub fn diff_runs(a: &RunSummary, b: &RunSummary, opts: &DiffOptions) -> String {
    let (ra, rb) = (&a.record, &b.record);
    let mut s = String::new();
    let _ = writeln!(s, "A: {} ({}, {})", ra.id, ra.recipe_path, ra.effective_status());
    let _ = writeln!(s, "B: {} ({}, {})", rb.id, rb.recipe_path, rb.effective_status());

    // Params: effective values (recipe + overrides, defaults applied).
    let mut pa = BTreeMap::new();
    let mut pb = BTreeMap::new();
    flatten("", &ra.params, &mut pa);
    flatten("", &rb.params, &mut pb);
    let mut changed = Vec::new();
    for k in pa.keys().chain(pb.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (x, y) = (pa.get(k), pb.get(k));
        if x != y {
            changed.push(format!(
                "  {k}: {} -> {}",
                x.map(String::as_str).unwrap_or("(unset)"),
                y.map(String::as_str).unwrap_or("(unset)")
            ));
        }
    }
    let _ = writeln!(s, "\nparams:");
    if changed.is_empty() {
        let _ = writeln!(s, "  (no changes)");
    }
    for c in changed {
        let _ = writeln!(s, "{c}");
    }
    if ra.overrides != rb.overrides {
        let _ = writeln!(s, "  overrides: {:?} -> {:?}", ra.overrides, rb.overrides);
    }

    // Stage keys.
    let _ = writeln!(s, "\nstages:");
    let mut names: Vec<&str> = ra.stages.iter().map(|st| st.name.as_str()).collect();
    for st in &rb.stages {
        if !names.contains(&st.name.as_str()) {
            names.push(&st.name);
        }
    }
    for name in &names {
        let (x, y) = (ra.stage(name), rb.stage(name));
        let line = match (x, y) {
            (Some(x), Some(y)) if x.key == y.key => format!("  {name}: same key {}", short(&x.key)),
            (Some(x), Some(y)) => format!("  {name}: key differs {} -> {}", short(&x.key), short(&y.key)),
            (Some(_), None) => format!("  {name}: only in A"),
            (None, Some(_)) => format!("  {name}: only in B"),
            (None, None) => continue,
        };
        let status = format!(
            " [{} / {}]",
            x.map(|s| s.status.as_str()).unwrap_or("-"),
            y.map(|s| s.status.as_str()).unwrap_or("-")
        );
        let _ = writeln!(s, "{line}{status}");
    }

    // Final metric deltas.
    let mut metric_lines = Vec::new();
    for name in &names {
        let (Some(x), Some(y)) = (ra.stage(name), rb.stage(name)) else { continue };
        let keys: std::collections::BTreeSet<&String> = x.metrics.keys().chain(y.metrics.keys()).collect();
        for k in keys {
            let (mx, my) = (x.metrics.get(k).and_then(|v| v.as_f64()), y.metrics.get(k).and_then(|v| v.as_f64()));
            match (mx, my) {
                (Some(p), Some(q)) => {
                    metric_lines.push(format!("  {name}.{k}: {p:.4} -> {q:.4} ({:+.4})", q - p));
                }
                (p, q) if p.is_some() || q.is_some() => {
                    metric_lines.push(format!("  {name}.{k}: {} -> {}", fmt_opt(p), fmt_opt(q)));
                }
                _ => {}
            }
        }
    }
    let _ = writeln!(s, "\nmetrics:");
    if metric_lines.is_empty() {
        let _ = writeln!(s, "  (none recorded)");
    }
    for l in metric_lines {
        let _ = writeln!(s, "{l}");
    }

    // Loss curves.
    let la = read_losses(&a.dir);
    let lb = read_losses(&b.dir);
    let stages_with_loss: std::collections::BTreeSet<&String> = la.keys().chain(lb.keys()).collect();
    if !stages_with_loss.is_empty() {
        let _ = writeln!(s, "\nloss curves:");
        for st in stages_with_loss {
            let ca = la.get(st).cloned().unwrap_or_default();
            let cb = lb.get(st).cloned().unwrap_or_default();
            let _ = writeln!(s, "  {st}:");
            let _ = writeln!(s, "    A {}", sparkline(&ca));
            let _ = writeln!(s, "    B {}", sparkline(&cb));
            let table = loss_table(&ca, &cb, opts.loss_points.max(2));
            for l in table {
                let _ = writeln!(s, "    {l}");
            }
        }
    }
    for (label, dir) in [("A", &a.dir), ("B", &b.dir)] {
        for png in pngs(dir) {
            let _ = writeln!(s, "  plot {label}: {}", png.display());
        }
    }

    // Eval generations side by side.
    if let Some(cache) = &opts.cache {
        for name in &names {
            let (Some(x), Some(y)) = (ra.stage(name), rb.stage(name)) else { continue };
            let (Some(ga), Some(gb)) = (generations(cache, &x.key), generations(cache, &y.key)) else { continue };
            let _ = writeln!(s, "\ngenerations ({name}):");
            for (i, (p, outs_a)) in ga.iter().enumerate() {
                let outs_b = gb.iter().find(|(q, _)| q == p).map(|(_, o)| o.clone()).unwrap_or_default();
                let _ = writeln!(s, "  [{i}] prompt: {}", one_line(p));
                for (who, text) in outs_a {
                    let _ = writeln!(s, "      A {who}: {}", one_line(text));
                }
                for (who, text) in &outs_b {
                    let _ = writeln!(s, "      B {who}: {}", one_line(text));
                }
            }
        }
    }
    s
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

pub(super) fn one_line(t: &str) -> String {
    let t = t.replace('\n', "⏎");
    if t.chars().count() > 100 {
        format!("{}…", t.chars().take(100).collect::<String>())
    } else {
        t
    }
}

/// `(step, loss)` per stage from a run's `metrics.jsonl`.
fn read_losses(dir: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(dir.join(files::METRICS)) else { return out };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(stage), Some(step), Some(loss)) =
            (v["stage"].as_str(), v["step"].as_u64(), v.get("loss").and_then(|l| l.as_f64()))
        else {
            continue;
        };
        out.entry(stage.to_string()).or_default().push((step, loss));
    }
    out
}

/// A one-line unicode sparkline of up to 40 points.
pub fn sparkline(points: &[(u64, f64)]) -> String {
    if points.is_empty() {
        return "(no data)".into();
    }
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let n = points.len().min(40);
    let sample: Vec<f64> = (0..n).map(|i| points[i * points.len() / n].1).collect();
    let (lo, hi) = sample.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    let line: String = sample
        .iter()
        .map(|&x| {
            let t = if hi > lo { (x - lo) / (hi - lo) } else { 0.5 };
            BARS[((t * 7.0).round() as usize).min(7)]
        })
        .collect();
    format!("{line}  {:.3} .. {:.3}", sample[0], sample[n - 1])
}

/// Loss at up to `k` steps present in both curves (or in either, when they share none).
fn loss_table(a: &[(u64, f64)], b: &[(u64, f64)], k: usize) -> Vec<String> {
    let ma: BTreeMap<u64, f64> = a.iter().copied().collect();
    let mb: BTreeMap<u64, f64> = b.iter().copied().collect();
    let mut steps: Vec<u64> = ma.keys().filter(|s| mb.contains_key(s)).copied().collect();
    if steps.is_empty() {
        steps = ma.keys().chain(mb.keys()).copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    }
    if steps.is_empty() {
        return vec![];
    }
    let n = steps.len().min(k);
    let picked: Vec<u64> = (0..n).map(|i| steps[i * (steps.len() - 1) / (n - 1).max(1)]).collect();
    let mut rows = vec![format!("{:>8}  {:>10}  {:>10}", "step", "A loss", "B loss")];
    let mut last = None;
    for st in picked {
        if last == Some(st) {
            continue;
        }
        last = Some(st);
        let f = |m: &BTreeMap<u64, f64>| m.get(&st).map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
        rows.push(format!("{st:>8}  {:>10}  {:>10}", f(&ma), f(&mb)));
    }
    rows
}

fn pngs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}

/// One prompt and each model's answer to it.
type Generation = (String, Vec<(String, String)>);

/// `(prompt, [(model, text)])` from an eval report's `generations`, when the object exists.
/// Accepts either `{"prompt", "model", "output"|"completion"|"text"|"response"}` entries or
/// `{"prompt", "outputs": {model: text}}`.
pub(super) fn generations(cache: &Cache, key: &str) -> Option<Vec<Generation>> {
    let art = cache.object(key)?;
    let text = std::fs::read_to_string(art.report_json()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let gens = v.get("generations")?.as_array()?;
    let mut out: Vec<Generation> = Vec::new();
    for g in gens {
        let prompt = g.get("prompt").map(as_text).unwrap_or_default();
        let mut outs = Vec::new();
        if let Some(m) = g.get("outputs").and_then(|o| o.as_object()) {
            for (model, t) in m {
                outs.push((model.clone(), as_text(t)));
            }
        } else {
            let model = g.get("model").map(as_text).unwrap_or_default();
            let text = ["output", "completion", "text", "response"].iter().find_map(|f| g.get(*f)).map(as_text);
            outs.push((model, text.unwrap_or_default()));
        }
        match out.iter_mut().find(|(p, _)| *p == prompt) {
            Some((_, o)) => o.extend(outs),
            None => out.push((prompt, outs)),
        }
    }
    Some(out)
}

fn as_text(v: &serde_json::Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}
