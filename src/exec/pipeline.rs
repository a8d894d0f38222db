//! The `run`, `plan` and `resume` commands end to end: load the recipe, resolve datasets, plan,
//! open a run record, execute, finalise the record.

use super::slurm::SlurmExecutor;
use super::{ExecCounts, ExecOutcome, Executor, Job};
use crate::cache::{Cache, Pushed, Remote};
use crate::cancel::CancelToken;
use crate::data::ResolvedDataset;
use crate::hub::{Fetched, HubUri, RemoteId, RemoteInput, RemoteKind};
use crate::plan::Plan;
use crate::recipe::{ExecutorKind, Recipe};
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

/// Every `hf://` input of the recipe: its datasets and the sources its stages name
/// ([`crate::recipe::StageParams::remote_sources`], under the stage's name).
pub fn remote_inputs(recipe: &Recipe) -> anyhow::Result<Vec<RemoteInput>> {
    let mut out = Vec::new();
    for (name, spec) in &recipe.datasets {
        let src = spec.source.trim();
        if src.starts_with("hf://") {
            // The loader checked the URI already, at the recipe's line and column.
            let uri = HubUri::parse(src).with_context(|| format!("dataset '{name}'"))?;
            out.push(RemoteInput { id: RemoteId::new(RemoteKind::Dataset, name.clone()), uri });
        }
    }
    let kinds = crate::stages::kinds();
    for stage in &recipe.stages {
        let Some(def) = kinds.iter().find(|k| k.kind() == stage.kind) else { continue };
        for src in def.remote_sources(&stage.params) {
            out.push(RemoteInput { id: RemoteId::new(src.kind, stage.name.clone()), uri: src.uri });
        }
    }
    Ok(out)
}

/// Resolve every `hf://` input of the recipe through its lock (written or extended on first use).
/// This is the only place a run reaches the Hub; everything after reads the returned map.
pub fn fetch_remote(recipe: &Recipe) -> anyhow::Result<Fetched> {
    let inputs = remote_inputs(recipe)?;
    if inputs.is_empty() {
        return Ok(Fetched::default());
    }
    let sp = crate::progress::spinner("resolving Hugging Face Hub inputs");
    let fetched = crate::hub::lock::fetch_all(&recipe.path, &inputs, &crate::hub::HubOptions::from_env())
        .context("fetching Hugging Face Hub inputs")?;
    sp.finish_and_clear();
    Ok(fetched)
}

/// `mmrun update <recipe> [name]`: re-pin the recipe's `hf://` inputs (all, or those called `only`)
/// to where their branches point now.
pub fn update(src: &RecipeSource, only: Option<&str>) -> anyhow::Result<crate::hub::lock::LockFile> {
    let recipe = load_recipe(src)?;
    let inputs = remote_inputs(&recipe)?;
    Ok(crate::hub::lock::update(&recipe.path, &inputs, only)?)
}

/// Resolve every dataset of the recipe to local files and content hashes; `hf://` datasets read
/// the files `fetched` holds.
pub fn resolve_datasets(
    recipe: &Recipe,
    cache: &Cache,
    fetched: &Fetched,
) -> anyhow::Result<BTreeMap<String, ResolvedDataset>> {
    let dir = recipe.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let mut out = BTreeMap::new();
    for (name, spec) in &recipe.datasets {
        let sp = crate::progress::spinner(&format!("resolving dataset {name}"));
        let files = fetched
            .get(RemoteKind::Dataset, name)
            .map(|repo| repo.files.iter().map(|f| f.local_path.clone()).collect::<Vec<_>>());
        let ds = crate::data::resolve_fetched(name, spec, &dir, cache, files)
            .with_context(|| format!("resolving dataset '{name}'"))?;
        sp.finish_and_clear();
        out.insert(name.clone(), ds);
    }
    Ok(out)
}

/// A recipe made ready to run: its remote inputs fetched, datasets resolved, stages planned.
pub struct Prepared {
    /// The recipe's `hf://` inputs, resolved through its lock.
    pub fetched: Fetched,
    /// Every dataset, resolved.
    pub datasets: BTreeMap<String, ResolvedDataset>,
    /// The plan.
    pub plan: Plan,
}

/// Load, resolve and plan without running anything.
pub fn make_plan(src: &RecipeSource, cache: &Cache) -> anyhow::Result<(Recipe, Prepared)> {
    let recipe = load_recipe(src)?;
    let prepared = prepare(&recipe, cache)?;
    Ok((recipe, prepared))
}

/// Fetch the remote inputs of a loaded recipe, resolve its datasets, then plan it.
fn prepare(recipe: &Recipe, cache: &Cache) -> anyhow::Result<Prepared> {
    let fetched = fetch_remote(recipe)?;
    let datasets = resolve_datasets(recipe, cache, &fetched)?;
    // The one place `auto` is resolved (it may open a GPU); the planner only sees the class.
    let device = crate::train::device::resolve_class(recipe.meta.device);
    let plan = crate::plan::build(recipe, cache, &datasets, &fetched, device).context("planning")?;
    Ok(Prepared { fetched, datasets, plan })
}

/// [`ranks::check_gpus`] for every stage of `plan` that will run, with this machine's GPUs.
fn check_gpus(recipe: &Recipe, plan: &Plan) -> anyhow::Result<()> {
    let gpus = std::sync::OnceLock::new();
    for p in plan.stages.iter().filter(|p| p.status != crate::plan::Status::Cached) {
        let (Some(spec), Some(kind)) = (
            recipe.stages.iter().find(|s| s.name == p.name),
            crate::stages::REGISTRY.iter().find(|k| k.kind() == p.kind),
        ) else {
            continue;
        };
        let ranks = kind.ranks(&spec.params);
        if ranks.world_size > 1 || !ranks.devices.is_empty() {
            super::ranks::check_gpus(
                recipe,
                &p.name,
                &ranks,
                *gpus.get_or_init(crate::train::device::cuda_device_count),
            )?;
        }
    }
    Ok(())
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

/// How to run a recipe beyond what it says itself.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `--executor`: overrides `[recipe] executor`.
    pub executor: Option<ExecutorKind>,
}

/// The executor's view of the plan's stages.
fn jobs_for(recipe: &Recipe, plan: &Plan) -> Vec<Job> {
    plan.stages
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
        .collect()
}

/// Build `jobs` in this process with the local executor, recording each published stage's
/// fingerprint (so a later `plan --why` can say what changed).
fn execute_here(
    cache: &Cache,
    sink: &RunSink,
    cancel: &CancelToken,
    recipe: &Recipe,
    prepared: &Prepared,
    remote: Option<&Remote>,
    jobs: &[Job],
) -> (ExecOutcome, ExecCounts) {
    let on_published = |job: &Job, _art: &crate::artifact::Artifact| {
        if let Some(p) = prepared.plan.stages.iter().find(|p| p.name == job.name) {
            if let Err(e) = crate::plan::record_fingerprint(cache, &recipe.meta.name, p) {
                tracing::warn!("could not record the fingerprint of stage '{}': {e}", job.name);
            }
        }
    };
    let exec = Executor {
        cache,
        run: sink,
        cancel,
        recipe,
        datasets: &prepared.datasets,
        fetched: &prepared.fetched,
        remote,
        registry: crate::stages::REGISTRY,
        on_published: &on_published,
    };
    exec.execute(jobs)
}

/// The recipe's remote cache (`[cache] remote`), if it names one. One that cannot even be set up
/// is a warning: the run goes on with the local cache.
fn open_remote(recipe: &Recipe) -> Option<Remote> {
    let url = recipe.cache.remote.as_deref()?;
    match Remote::open(url) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("warning: {e}; continuing with the local cache only");
            None
        }
    }
}

/// What `push-cache` / `pull-cache` did with a run's stage artifacts.
#[derive(Debug, Default)]
pub struct CacheSync {
    /// The remote.
    pub url: String,
    /// Uploaded or downloaded by this call.
    pub moved: usize,
    /// Already at the destination.
    pub already: usize,
    /// Not at the source (not built locally, or not on the remote).
    pub missing: usize,
}

/// The run `run`, this cache, and the remote: `remote` or else its recipe's `[cache] remote`.
fn run_and_remote(paths: &Paths, run: &str, remote: Option<&str>) -> anyhow::Result<(RunRecord, Cache, Remote)> {
    let rec = crate::runs::find_run(&paths.runs_dir, run)?.record;
    let url = match remote {
        Some(u) => u.to_string(),
        None => {
            let src = RecipeSource {
                path: rec.recipe_path.clone().into(),
                overrides: rec.overrides.clone(),
                text: Some(rec.recipe_text.clone()),
            };
            load_recipe(&src)?.cache.remote.ok_or_else(|| {
                anyhow::anyhow!(
                    "the recipe of run {} has no [cache] remote; name one with --remote s3://<bucket>/<prefix> \
                     or --remote file:///<path>",
                    rec.id
                )
            })?
        }
    };
    let cache = Cache::open(&paths.home).with_context(|| format!("opening the cache {}", paths.home.display()))?;
    let remote = Remote::open(&url)?;
    Ok((rec, cache, remote))
}

/// `mmrun push-cache <run>`: upload every stage artifact of the run that this cache holds.
pub fn push_cache(paths: &Paths, run: &str, remote: Option<&str>) -> anyhow::Result<CacheSync> {
    let (rec, cache, remote) = run_and_remote(paths, run, remote)?;
    let mut out = CacheSync { url: remote.url().to_string(), ..Default::default() };
    for st in &rec.stages {
        let Some(art) = cache.object(&st.key) else {
            out.missing += 1;
            continue;
        };
        match remote.push(&cache, &art).with_context(|| format!("pushing stage '{}'", st.name))? {
            Pushed::Uploaded => out.moved += 1,
            Pushed::AlreadyThere => out.already += 1,
        }
    }
    Ok(out)
}

/// `mmrun pull-cache <run>`: download every stage artifact of the run this cache lacks (each file
/// checked against its blake3).
pub fn pull_cache(paths: &Paths, run: &str, remote: Option<&str>) -> anyhow::Result<CacheSync> {
    let (rec, cache, remote) = run_and_remote(paths, run, remote)?;
    let mut out = CacheSync { url: remote.url().to_string(), ..Default::default() };
    for st in &rec.stages {
        if cache.object(&st.key).is_some() {
            out.already += 1;
            continue;
        }
        let _lock = cache.lock(&st.key, || eprintln!("waiting for another mmrun building stage '{}'", st.name))?;
        match remote.pull(&cache, &st.key).with_context(|| format!("pulling stage '{}'", st.name))? {
            Some(_) => out.moved += 1,
            None => out.missing += 1,
        }
    }
    Ok(out)
}

/// Run a recipe with its own executor: see [`run_with`].
pub fn run(src: &RecipeSource, paths: &Paths) -> anyhow::Result<RunEnd> {
    run_with(src, paths, &RunOptions::default())
}

/// Run a recipe: plan, execute stale stages (here, or as cluster jobs), keep the run record current.
pub fn run_with(src: &RecipeSource, paths: &Paths, opts: &RunOptions) -> anyhow::Result<RunEnd> {
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
    let executor = opts.executor.unwrap_or(recipe.meta.executor);
    // Here, every stage's ranks run on this machine: refuse GPUs it lacks before anything runs
    // (a Slurm job checks on its node instead).
    let checked = prepare(&recipe, &cache).and_then(|p| match executor {
        ExecutorKind::Local => check_gpus(&recipe, &p.plan).map(|()| p),
        ExecutorKind::Slurm => Ok(p),
    });
    let prepared = match checked {
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
            datasets: prepared
                .datasets
                .iter()
                .map(|(n, d)| {
                    let files = d.files.iter().map(|f| f.display().to_string()).collect();
                    (
                        n.clone(),
                        DatasetLock { source: d.spec.source.clone(), content_hash: d.content_hash.clone(), files },
                    )
                })
                .collect(),
            stages: prepared.plan.stages.iter().map(|s| (s.name.clone(), s.key.clone())).collect(),
        };
        r.stages = prepared
            .plan
            .stages
            .iter()
            .map(|s| StageRecord {
                name: s.name.clone(),
                kind: s.kind.clone(),
                key: s.key.clone(),
                reasons: s.reasons.iter().map(ToString::to_string).collect(),
                ..Default::default()
            })
            .collect();
        // Builtin data generated while resolving the datasets.
        r.cache_entries = cache.pinned_entries();
    })?;
    let cancel = CancelToken::new();
    cancel.install_signal_handlers().context("installing the Ctrl-C handler")?;
    let jobs = jobs_for(&recipe, &prepared.plan);
    let (outcome, counts) = match executor {
        ExecutorKind::Local => {
            let remote = open_remote(&recipe);
            execute_here(&cache, &sink, &cancel, &recipe, &prepared, remote.as_ref(), &jobs)
        }
        ExecutorKind::Slurm => {
            // The job runs this very binary on the same cache, named so a node finds it.
            let exe = std::env::current_exe().context("locating the mmrun binary for the Slurm jobs")?;
            let home = std::fs::canonicalize(&paths.home).unwrap_or_else(|_| paths.home.clone());
            let exec = SlurmExecutor {
                cache: &cache,
                run: &sink,
                cancel: &cancel,
                recipe: &recipe,
                mmrun: vec![exe.display().to_string(), "--home".into(), home.display().to_string()],
                poll: slurm_poll_interval(),
            };
            exec.execute(&jobs)
        }
    };
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
            let (recipe, Prepared { plan, .. }) = make_plan(src, &cache)?;
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

/// How often the Slurm executor polls its jobs: `MMRUN_SLURM_POLL_MS`, default 2 s (one
/// `scontrol` call per unfinished job each time, which a busy controller can take).
fn slurm_poll_interval() -> std::time::Duration {
    let ms = std::env::var("MMRUN_SLURM_POLL_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    std::time::Duration::from_millis(ms)
}

/// How a `stage-job` ended (its process exit code: 0, 1, 130).
#[derive(Debug)]
pub enum StageJobEnd {
    /// The stage's artifact is in the cache (built here, or found there).
    Done,
    /// The stage failed (the error is printed by the caller).
    Failed(anyhow::Error),
    /// SIGTERM/SIGINT (e.g. `scancel`): the stage checkpointed and stopped.
    Interrupted,
}

/// `mmrun stage-job <run dir> <stage> --key <key>`: what a Slurm job runs. It replays the recipe
/// text and overrides recorded in `<run dir>/run.json`, plans, checks the stage still has the key
/// it was submitted under, and builds it (and any upstream stage missing from the cache) with the
/// local executor, appending metrics and rejects to the run's files. It never touches `run.json`:
/// the submitting mmrun owns it.
pub fn run_stage_job(run_dir: &Path, stage: &str, key: &str, home: &Path) -> anyhow::Result<StageJobEnd> {
    let rec_path = run_dir.join(crate::runs::files::RUN_JSON);
    let text = std::fs::read_to_string(&rec_path).with_context(|| format!("reading {}", rec_path.display()))?;
    let rec: RunRecord = serde_json::from_str(&text).with_context(|| format!("parsing {}", rec_path.display()))?;
    let src = RecipeSource {
        path: rec.recipe_path.clone().into(),
        overrides: rec.overrides.clone(),
        text: Some(rec.recipe_text.clone()),
    };
    let cache = Cache::open(home).with_context(|| format!("opening the cache {}", home.display()))?;
    let (recipe, prepared) = make_plan(&src, &cache)?;
    let Some(target) = prepared.plan.stages.iter().find(|p| p.name == stage) else {
        anyhow::bail!("run {} has no stage '{stage}'", rec.id);
    };
    if target.key != key {
        anyhow::bail!(
            "stage '{stage}' now has key {} but was submitted as {key}: its recipe, data or mmrun changed since \
             submission; run the recipe again",
            target.key
        );
    }
    // The stage and everything upstream of it, in plan order (upstream stages are normally cached).
    let all = jobs_for(&recipe, &prepared.plan);
    let mut needed: std::collections::BTreeSet<String> = [stage.to_string()].into();
    for j in all.iter().rev() {
        if needed.contains(&j.name) {
            for i in &j.inputs {
                if let crate::stages::InputRef::Stage { stage, .. } = i {
                    needed.insert(stage.clone());
                }
            }
        }
    }
    let cancel = CancelToken::new();
    cancel.install_signal_handlers().context("installing the signal handlers")?;
    if let Some(env) = crate::dist::RankEnv::from_env().map_err(anyhow::Error::msg)?.filter(|e| e.rank > 0) {
        // Another rank of a data-parallel stage: its records (metrics, rejects) are rank 0's to
        // write, so it reports into a scratch record.
        let scratch = tempfile::tempdir().context("creating a scratch run record")?;
        let sink = RunSink::create(scratch.path()).context("creating a scratch run record")?;
        let job = all.iter().find(|j| j.name == stage).expect("planned above");
        let keys: BTreeMap<String, String> =
            prepared.plan.stages.iter().map(|s| (s.name.clone(), s.key.clone())).collect();
        let exec = Executor {
            cache: &cache,
            run: &sink,
            cancel: &cancel,
            recipe: &recipe,
            datasets: &prepared.datasets,
            fetched: &prepared.fetched,
            remote: None,
            registry: crate::stages::REGISTRY,
            on_published: &|_, _| {},
        };
        return Ok(match super::ranks::run_worker(&exec, job, &keys, &env) {
            Ok(()) => StageJobEnd::Done,
            Err(e) if e.chain().any(|c| c.is::<crate::cancel::Interrupted>()) => StageJobEnd::Interrupted,
            Err(e) => StageJobEnd::Failed(e),
        });
    }
    let jobs: Vec<Job> = all.into_iter().filter(|j| needed.contains(&j.name)).collect();
    let sink = RunSink::create(run_dir).context("opening the run directory")?;
    Ok(match execute_here(&cache, &sink, &cancel, &recipe, &prepared, open_remote(&recipe).as_ref(), &jobs).0 {
        ExecOutcome::Succeeded => StageJobEnd::Done,
        ExecOutcome::Failed { error, .. } => StageJobEnd::Failed(error),
        ExecOutcome::Interrupted { .. } => StageJobEnd::Interrupted,
    })
}
