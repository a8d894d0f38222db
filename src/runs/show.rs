//! `mmrun show <run>` (also printed at the end of every successful run): what a run produced —
//! its stages, the eval table (models × metrics), a few generations, where the artifacts are, and
//! the commands to talk to them.

use super::diff::{generations, one_line};
use super::{RunSummary, StageStatus};
use crate::artifact::ArtifactKind;
use crate::cache::Cache;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Everything `mmrun show` reports; `--json` prints it as is.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The run's directory name.
    pub id: String,
    /// `[recipe] name`.
    pub recipe: String,
    /// `succeeded`, `failed`, `killed`, …
    pub status: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The run directory.
    pub run_dir: String,
    /// Every stage in execution order.
    pub stages: Vec<StageLine>,
    /// One table per eval stage.
    pub evals: Vec<EvalTable>,
    /// Models (and adapters with a merged model) this run left in the cache, by reference.
    pub models: Vec<ModelLine>,
    /// Loss plots written for the run.
    pub plots: Vec<String>,
}

/// One stage of the run.
#[derive(Clone, Debug, Serialize)]
pub struct StageLine {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// `ran`, `cached`, `failed`, …
    pub status: String,
    /// Seconds spent (0 when cached).
    pub seconds: f64,
    /// The artifact directory, when the object is in the cache.
    pub artifact: Option<String>,
}

/// An eval stage's report as a table.
#[derive(Clone, Debug, Serialize)]
pub struct EvalTable {
    /// The eval stage.
    pub stage: String,
    /// Metric names (the columns), in a stable order.
    pub metrics: Vec<String>,
    /// Rows: model name → metric → value.
    pub rows: Vec<(String, BTreeMap<String, f64>)>,
    /// `(prompt, model, output)` for the first few fixed prompts.
    pub generations: Vec<(String, String, String)>,
    /// `(metric, what it measures)` from the report's `about`, for the metrics in the table.
    pub about: Vec<(String, String)>,
}

/// A model the run produced.
#[derive(Clone, Debug, Serialize)]
pub struct ModelLine {
    /// The stage that produced it.
    pub stage: String,
    /// Model reference for `chat` / `serve` (`<run>:<stage>`).
    pub reference: String,
    /// Its directory in the cache (a transformers-loadable folder).
    pub path: String,
}

/// Generations shown per eval stage.
const SHOWN_GENERATIONS: usize = 6;

/// Build the report of `run`, reading artifacts from `cache` when given.
pub fn show_run(run: &RunSummary, cache: Option<&Cache>) -> RunReport {
    let rec = &run.record;
    let object = |key: &str| cache.and_then(|c| c.object(key));
    let mut stages = Vec::new();
    let mut evals = Vec::new();
    let mut models = Vec::new();
    for st in &rec.stages {
        let art = object(&st.key);
        stages.push(StageLine {
            name: st.name.clone(),
            kind: st.kind.clone(),
            status: st.status.as_str().into(),
            seconds: st.seconds,
            artifact: art.as_ref().map(|a| a.dir.display().to_string()),
        });
        let Some(art) = art else { continue };
        if !matches!(st.status, StageStatus::Ran | StageStatus::Cached) {
            continue;
        }
        match art.kind() {
            ArtifactKind::Model | ArtifactKind::Adapter if art.model_weights().is_file() => models.push(ModelLine {
                stage: st.name.clone(),
                reference: format!("{}:{}", rec.id, st.name),
                path: art.dir.display().to_string(),
            }),
            ArtifactKind::EvalReport => {
                if let Some(t) =
                    eval_table(&st.name, &art.report_json(), cache.expect("artifact implies a cache"), &st.key)
                {
                    evals.push(t);
                }
            }
            _ => {}
        }
    }
    let mut plots: Vec<String> = std::fs::read_dir(&run.dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| p.display().to_string())
        .collect();
    plots.sort();
    RunReport {
        id: rec.id.clone(),
        recipe: rec.recipe_name.clone(),
        status: rec.effective_status().to_string(),
        seconds: rec.seconds,
        run_dir: run.dir.display().to_string(),
        stages,
        evals,
        models,
        plots,
    }
}

/// The headline metrics of every model in an eval report (`report.json`).
fn eval_table(stage: &str, report: &std::path::Path, cache: &Cache, key: &str) -> Option<EvalTable> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report).ok()?).ok()?;
    let mut metrics: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for (model, mr) in v.get("models")?.as_object()? {
        let mut row = BTreeMap::new();
        for (k, x) in mr.as_object()? {
            if let Some(f) = x.as_f64() {
                if !metrics.contains(k) {
                    metrics.push(k.clone());
                }
                row.insert(k.clone(), f);
            }
        }
        rows.push((model.clone(), row));
    }
    // Keep the recipe's model order when the report lists it (`generations` follows it).
    let gens = generations(cache, key).unwrap_or_default();
    let order: Vec<String> = gens.iter().flat_map(|(_, o)| o.iter().map(|(m, _)| m.clone())).collect();
    rows.sort_by_key(|(m, _)| order.iter().position(|o| o == m).unwrap_or(usize::MAX));
    let generations = gens
        .into_iter()
        .flat_map(|(p, outs)| outs.into_iter().map(move |(m, o)| (p.clone(), m, o)))
        .take(SHOWN_GENERATIONS)
        .collect();
    let about =
        metrics.iter().filter_map(|m| Some((m.clone(), v.get("about")?.get(m)?.as_str()?.to_string()))).collect();
    Some(EvalTable { stage: stage.into(), metrics, rows, generations, about })
}

/// The report as text: stages, eval tables, generations, models with the commands to use them.
pub fn render_text(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "run {} ({}, {}, {:.1}s)", r.id, r.recipe, r.status, r.seconds);
    for e in &r.evals {
        let _ = writeln!(s, "\neval '{}':", e.stage);
        let w = e.rows.iter().map(|(m, _)| m.len()).max().unwrap_or(5).max(5);
        let mut head = format!("  {:w$}", "model");
        for m in &e.metrics {
            let _ = write!(head, "  {m:>12}");
        }
        let _ = writeln!(s, "{head}");
        for (model, row) in &e.rows {
            let _ = write!(s, "  {model:w$}");
            for m in &e.metrics {
                match row.get(m) {
                    Some(v) => write!(s, "  {v:>12.4}"),
                    None => write!(s, "  {:>12}", "-"),
                }
                .ok();
            }
            let _ = writeln!(s);
        }
        for (m, what) in &e.about {
            let _ = writeln!(s, "  {m}: {what}");
        }
        if !e.generations.is_empty() {
            let _ = writeln!(s, "  generations:");
            let mut last_prompt = None;
            for (p, m, o) in &e.generations {
                if last_prompt != Some(p) {
                    let _ = writeln!(s, "    {}", one_line(p));
                    last_prompt = Some(p);
                }
                let _ = writeln!(s, "      {m:w$} → {}", one_line(o));
            }
        }
    }
    if !r.models.is_empty() {
        let _ = writeln!(s, "\nmodels:");
        let w = r.models.iter().map(|m| m.stage.len()).max().unwrap_or(0);
        for m in &r.models {
            let _ = writeln!(s, "  {:w$}  {}", m.stage, m.path);
        }
        let last = &r.models[r.models.len() - 1].reference;
        let _ = writeln!(s, "\ntalk to a model:");
        let _ = writeln!(s, "  mmrun chat {last}");
        let _ = writeln!(s, "  mmrun serve {last}      # OpenAI-compatible API + web chat on http://127.0.0.1:8998");
    }
    for p in &r.plots {
        let _ = writeln!(s, "plot: {p}");
    }
    let _ = writeln!(s, "run record: {}", r.run_dir);
    s
}
