//! The `run`, `plan` and `resume` commands end to end: load the recipe, resolve datasets, plan,
//! open a run record, execute, finalise the record.

use super::{ExecCounts, ExecOutcome, Executor, Job};
use crate::cache::Cache;
use crate::cancel::CancelToken;
use crate::data::ResolvedDataset;
use crate::plan::Plan;
use crate::recipe::Recipe;
use crate::runs::{DatasetLock, RunLock, RunRecord, RunSink, RunStatus, StageRecord};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where mmrun keeps its state.
#[derive(Clone, Debug)]
pub struct Paths {
    /// `$MMRUN_HOME` (the cache).
    pub home: PathBuf,
    /// The runs directory.
    pub runs_dir: PathBuf,
}

/// What a recipe to run is: a file plus overrides, optionally with its text already in hand
/// (`resume` replays the text recorded in the run).
#[derive(Clone, Debug)]
pub struct RecipeSource {
    /// The recipe path (relative dataset paths resolve against its directory).
    pub path: PathBuf,
    /// `--set` overrides.
    pub overrides: Vec<String>,
    /// Recorded text to use instead of reading `path`.
    pub text: Option<String>,
}

/// How a run ended.
#[derive(Debug)]
pub enum RunEnd {
    /// All stages cached or built.
    Succeeded {
        /// The run directory.
        run_dir: PathBuf,
        /// Counts.
        counts: ExecCounts,
    },
    /// A stage failed.
    Failed {
        /// The run directory.
        run_dir: PathBuf,
        /// The error (with its chain).
        error: anyhow::Error,
    },
    /// Ctrl-C.
    Interrupted {
        /// The run directory.
        run_dir: PathBuf,
    },
}

/// Load a recipe (from its file or recorded text).
pub fn load_recipe(src: &RecipeSource) -> Result<Recipe, crate::recipe::RecipeError> {
    match &src.text {
        Some(text) => crate::recipe::load_str(&src.path, text.clone(), &src.overrides, &crate::stages::kinds()),
        None => crate::recipe::load(&src.path, &src.overrides, &crate::stages::kinds()),
    }
}

/// Resolve every dataset of the recipe to local files and content hashes.
pub fn resolve_datasets(recipe: &Recipe, cache: &Cache) -> anyhow::Result<BTreeMap<String, ResolvedDataset>> {
    let dir = recipe.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    // Hub datasets go through the recipe's lock (written on first use); data then reads the locked files.
    crate::hub::lock::fetch_recipe(&recipe.path, &recipe.datasets, &crate::hub::HubOptions::from_env())
        .context("fetching Hugging Face Hub datasets")?;
    let mut out = BTreeMap::new();
    for (name, spec) in &recipe.datasets {
        let sp = crate::progress::spinner(&format!("resolving dataset {name}"));
        let source = spec.source.trim();
        let fetched = if source.starts_with("hf://") {
            let files = crate::hub::fetch_for_data(name, source)
                .map_err(|e| crate::data::DataError::Hub { name: name.clone(), msg: e.to_string() })
                .with_context(|| format!("resolving dataset '{name}'"))?;
            Some(files)
        } else {
            None
        };
        let ds = crate::data::resolve_fetched(name, spec, &dir, cache, fetched)
            .with_context(|| format!("resolving dataset '{name}'"))?;
        sp.finish_and_clear();
        out.insert(name.clone(), ds);
    }
    Ok(out)
}

/// Load, resolve and plan without running anything.
pub fn make_plan(
    src: &RecipeSource,
    cache: &Cache,
) -> anyhow::Result<(Recipe, BTreeMap<String, ResolvedDataset>, Plan)> {
    let recipe = load_recipe(src)?;
    let (datasets, plan) = prepare(&recipe, cache)?;
    Ok((recipe, datasets, plan))
}

/// Fetch and resolve the datasets of a loaded recipe, then plan it.
fn prepare(recipe: &Recipe, cache: &Cache) -> anyhow::Result<(BTreeMap<String, ResolvedDataset>, Plan)> {
    let datasets = resolve_datasets(recipe, cache)?;
    let plan = crate::plan::build(recipe, cache, &datasets).context("planning")?;
    Ok((datasets, plan))
}

/// `mmrun plan` as JSON: `{"stages":[{"name","kind","key","status","reasons"}]}`.
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    plan.to_json()
}

/// `mmrun plan` as a table.
pub fn plan_text(recipe: &Recipe, plan: &Plan) -> String {
    format!("plan for {} ({} stages)\n{plan}", recipe.path.display(), plan.stages.len())
}

/// `mmrun plan --why <stage>`: the reasons and everything that enters (and does not enter) the key.
pub fn plan_why(plan: &Plan, stage: &str) -> anyhow::Result<String> {
    Ok(plan.explain(stage)?)
}

/// Effective parameters as nested JSON (what `diff` compares).
fn effective_params(recipe: &Recipe) -> serde_json::Value {
    let stages: serde_json::Map<String, serde_json::Value> = recipe
        .stages
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({ "kind": s.kind });
            if let (Some(o), Some(p)) = (v.as_object_mut(), s.params.as_object()) {
                o.extend(p.clone());
            }
            (s.name.clone(), v)
        })
        .collect();
    serde_json::json!({
        "recipe": recipe.meta,
        "model": recipe.model,
        "datasets": recipe.datasets,
        "stages": stages,
    })
}

/// Run a recipe: plan, execute stale stages, keep the run record current.
pub fn run(src: &RecipeSource, paths: &Paths) -> anyhow::Result<RunEnd> {
    let started = Instant::now();
    let cache = Cache::open(&paths.home).with_context(|| format!("opening the cache {}", paths.home.display()))?;
    let recipe = load_recipe(src)?;
    let recipe_path = std::fs::canonicalize(&recipe.path).unwrap_or_else(|_| recipe.path.clone());
    // The record starts before anything is fetched, so a run that fails fetching Hub data or
    // planning still leaves one (status failed, with the error), like a failed stage does.
    let record = RunRecord {
        recipe_name: recipe.meta.name.clone(),
        recipe_path: recipe_path.display().to_string(),
        recipe_text: recipe.source_text.clone(),
        overrides: recipe.overrides.clone(),
        status: RunStatus::Running,
        params: effective_params(&recipe),
        ..Default::default()
    };
    let sink = RunSink::start(&paths.runs_dir, record).context("creating the run record")?;
    let (datasets, plan) = match prepare(&recipe, &cache) {
        Ok(p) => p,
        Err(error) => {
            let finished = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).ok();
            let secs = started.elapsed().as_secs_f64();
            sink.update(|r| {
                r.status = RunStatus::Failed;
                r.finished = finished;
                r.seconds = secs;
                r.error = Some(format!("{error:#}"));
            })?;
            return Ok(RunEnd::Failed { run_dir: sink.dir().to_path_buf(), error });
        }
    };
    sink.update(|r| {
        r.lock = RunLock {
            mmrun_version: crate::VERSION.to_string(),
            datasets: datasets
                .iter()
                .map(|(n, d)| {
                    let files = d.files.iter().map(|f| f.display().to_string()).collect();
                    (
                        n.clone(),
                        DatasetLock { source: d.spec.source.clone(), content_hash: d.content_hash.clone(), files },
                    )
                })
                .collect(),
            stages: plan.stages.iter().map(|s| (s.name.clone(), s.key.clone())).collect(),
        };
        r.stages = plan
            .stages
            .iter()
            .map(|s| StageRecord {
                name: s.name.clone(),
                kind: s.kind.clone(),
                key: s.key.clone(),
                reasons: s.reasons.clone(),
                ..Default::default()
            })
            .collect();
        // Builtin data generated while resolving the datasets.
        r.cache_entries = cache.pinned_entries();
    })?;
    let cancel = CancelToken::new();
    cancel.install_signal_handlers().context("installing the Ctrl-C handler")?;
    let jobs: Vec<Job> = plan
        .stages
        .iter()
        .map(|p| {
            let spec = recipe.stages.iter().find(|s| s.name == p.name);
            Job {
                name: p.name.clone(),
                kind: p.kind.clone(),
                key: p.key.clone(),
                params: spec.map(|s| s.params.clone()).unwrap_or_default(),
                inputs: spec.map(|s| s.inputs.clone()).unwrap_or_default(),
                verify: p.opened,
            }
        })
        .collect();
    let on_published = |job: &Job, _art: &crate::artifact::Artifact| {
        if let Some(p) = plan.stages.iter().find(|p| p.name == job.name) {
            if let Err(e) = crate::plan::record_fingerprint(&cache, &recipe.meta.name, p) {
                tracing::warn!("could not record the fingerprint of stage '{}': {e}", job.name);
            }
        }
    };
    let exec = Executor {
        cache: &cache,
        run: &sink,
        cancel: &cancel,
        recipe: &recipe,
        datasets: &datasets,
        registry: crate::stages::REGISTRY,
        on_published: &on_published,
    };
    let (outcome, counts) = exec.execute(&jobs);
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).ok();
    let secs = started.elapsed().as_secs_f64();
    let run_dir = sink.dir().to_path_buf();
    let (status, error) = match &outcome {
        ExecOutcome::Succeeded => (RunStatus::Succeeded, None),
        ExecOutcome::Failed { error, .. } => (RunStatus::Failed, Some(format!("{error:#}"))),
        ExecOutcome::Interrupted { .. } => (RunStatus::Interrupted, None),
    };
    let rejects = sink.count_rejects();
    sink.update(|r| {
        r.status = status;
        r.finished = now;
        r.seconds = secs;
        r.error = error;
        if let Some(c) = rejects {
            r.rejects = c;
        }
        r.cache_entries = cache.pinned_entries();
    })?;
    Ok(match outcome {
        ExecOutcome::Succeeded => {
            eprintln!(
                "done in {secs:.2}s: {} ran, {} cached; run record {}",
                counts.ran,
                counts.cached,
                run_dir.display()
            );
            RunEnd::Succeeded { run_dir, counts }
        }
        ExecOutcome::Failed { error, .. } => RunEnd::Failed { run_dir, error },
        ExecOutcome::Interrupted { .. } => RunEnd::Interrupted { run_dir },
    })
}

/// Resolve a model reference for a command (`export`, `push`, `chat`, `serve`): a stage of
/// `recipe` (when given; planned to find its key, nothing is run), `<run>:<stage>` from the run
/// records, a local folder, or `hf://<owner>/<name>[@rev]` (see [`crate::modelref`]).
pub fn resolve_model(
    reference: &str,
    paths: &Paths,
    recipe: Option<&RecipeSource>,
) -> anyhow::Result<crate::modelref::ResolvedModel> {
    let cache = Cache::open(&paths.home).with_context(|| format!("opening the cache {}", paths.home.display()))?;
    let stages: Option<(PathBuf, BTreeMap<String, String>)> = match recipe {
        Some(src) => {
            let (recipe, _, plan) = make_plan(src, &cache)?;
            Some((recipe.path, plan.stages.iter().map(|s| (s.name.clone(), s.key.clone())).collect()))
        }
        None => None,
    };
    let hub = crate::hub::HubOptions::from_env();
    let resolver = crate::modelref::Resolver {
        cache: Some(&cache),
        runs_dir: Some(&paths.runs_dir),
        recipe: stages.as_ref().map(|(p, s)| (p.as_path(), s)),
        base_dir: None,
        hub: Some(&hub),
    };
    Ok(resolver.resolve(reference)?)
}
