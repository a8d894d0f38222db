//! The web page (chat + read-only runs pages) and the JSON it reads. The page is one HTML file
//! compiled into the binary: nothing is fetched from anywhere else.

use super::openai::ApiError;
use super::{AppState, RunsDir};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The page.
pub const PAGE: &str = include_str!("page.html");

/// `GET /`.
pub async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE)).into_response()
}

fn runs_dir(s: &AppState) -> Result<&RunsDir, ApiError> {
    s.runs.as_ref().ok_or_else(|| ApiError {
        status: 404,
        message: "this server shows no runs".into(),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })
}

/// A run by its exact directory name, among those listed (a name from the network never
/// becomes a path on its own).
fn find(s: &AppState, id: &str) -> Result<crate::runs::RunSummary, ApiError> {
    let rd = runs_dir(s)?;
    let runs = crate::runs::list_runs(&rd.runs_dir).map_err(internal)?;
    runs.into_iter().find(|r| r.record.id == id).ok_or_else(|| ApiError {
        status: 404,
        message: format!("no run '{id}'"),
        kind: "invalid_request_error",
        param: Some("run"),
        code: None,
    })
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError { status: 500, message: e.to_string(), kind: "server_error", param: None, code: None }
}

/// `GET /api/runs`: every run, newest first.
pub async fn list(State(s): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let rd = runs_dir(&s)?;
    let runs = crate::runs::list_runs(&rd.runs_dir).map_err(internal)?;
    let out: Vec<Value> = runs
        .iter()
        .rev()
        .map(|r| {
            json!({"id": r.record.id, "recipe": r.record.recipe_name, "status": r.record.effective_status(),
                   "started": r.record.started, "seconds": r.record.seconds,
                   "ran": r.count(crate::runs::StageStatus::Ran), "cached": r.count(crate::runs::StageStatus::Cached)})
        })
        .collect();
    Ok(axum::Json(out).into_response())
}

/// `GET /api/runs/<id>`: the `mmrun show` report plus every stage's metric curves.
pub async fn run(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = find(&s, &id)?;
    let cache = crate::cache::Cache::open(&runs_dir(&s)?.home).ok();
    let report = crate::runs::show_run(&run, cache.as_ref());
    Ok(axum::Json(json!({"report": report, "curves": curves(&run.dir)})).into_response())
}

/// `GET /api/diff?a=<id>&b=<id>`: `mmrun diff` as text.
pub async fn diff(
    State(s): State<Arc<AppState>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let get = |k: &'static str| q.get(k).ok_or_else(|| ApiError::bad(k, format!("missing ?{k}=<run>")));
    let (a, b) = (find(&s, get("a")?)?, find(&s, get("b")?)?);
    let cache = crate::cache::Cache::open(&runs_dir(&s)?.home).ok();
    let text = crate::runs::diff_runs(&a, &b, &crate::runs::DiffOptions { cache, loss_points: 8 });
    Ok(axum::Json(json!({"text": text})).into_response())
}

/// Per stage, per numeric metric: `[[step, value], …]` from `metrics.jsonl`.
fn curves(dir: &std::path::Path) -> Map<String, Value> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    let text = std::fs::read_to_string(dir.join(crate::runs::files::METRICS)).unwrap_or_default();
    for line in text.lines() {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) else { continue };
        let (Some(stage), Some(step)) = (m.get("stage").and_then(Value::as_str), m.get("step").and_then(Value::as_u64))
        else {
            continue;
        };
        for (k, v) in &m {
            if k == "stage" || k == "step" {
                continue;
            }
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                out.entry(stage.to_string()).or_default().entry(k.clone()).or_default().push(json!([step, x]));
            }
        }
    }
    out.into_iter().map(|(k, v)| (k, json!(v))).collect()
}
