//! Planning: the stage DAG (petgraph), type checks, stage keys and staleness with reasons.
//!
//! [`build`] turns a validated [`Recipe`] plus its resolved datasets into a [`Plan`]: every stage in
//! topological order (file order for ties) with its key ([`key`]), whether `objects/<key>/` is
//! already in the cache, and — when it is not — why, by comparing the new fingerprint with the one
//! recorded the last time this recipe's stage succeeded ([`record_fingerprint`]).
//!
//! API boundary: this module reads the cache directory (manifests and fingerprint records) but
//! never writes artifacts and knows nothing of models or training.

pub mod key;
mod reasons;

pub use key::Fingerprint;
pub use reasons::{Change, StaleReason};

use crate::artifact::ArtifactKind;
use crate::cache::{Bucket, Cache, Depth, Lookup};
use crate::data::ResolvedDataset;
use crate::hub::Fetched;
use crate::recipe::{dag, did_you_mean, DeviceClass, DynStageKind, InputRef, Recipe};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Whether a stage has to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// `objects/<key>/manifest.json` exists: nothing to do.
    Cached,
    /// Built before under another key; the reasons say what changed.
    Stale,
    /// Never built by this recipe (or its object was removed from the cache).
    Missing,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Cached => "cached",
            Status::Stale => "stale",
            Status::Missing => "missing",
        })
    }
}

/// One stage of a plan.
#[derive(Clone, Debug)]
pub struct PlannedStage {
    /// Name in the recipe.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// The stage key (its object directory name).
    pub key: String,
    /// Cached, stale or missing.
    pub status: Status,
    /// Why it is stale or missing (empty when cached), e.g. "param lr 5e-4 → 3e-4".
    pub reasons: Vec<StaleReason>,
    /// The stage's inputs (upstream stages and datasets), as declared.
    pub inputs: Vec<InputRef>,
    /// What went into the key (see [`key`]); recorded after success for the next plan's reasons.
    pub fingerprint: Fingerprint,
    /// Cosmetic params and their values: deliberately *not* in the key.
    pub excluded: Map<String, Value>,
    /// Cached, and a stage that runs in this plan reads it: its object was checked against its
    /// manifest in full (blake3) while planning, and is checked again (memoised) before use.
    pub opened: bool,
}

/// Every stage of a recipe, in the order they run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Topological order, file order for ties.
    pub stages: Vec<PlannedStage>,
}

/// Why a plan could not be built. (Recipes from [`crate::recipe::load`] are already checked for
/// the structural errors with spans; these exist for recipes built in code and as a backstop.)
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A stage's kind is not registered.
    #[error("stage '{stage}' has unknown kind '{kind}' (known kinds: {known})")]
    UnknownKind {
        /// The stage.
        stage: String,
        /// Its kind.
        kind: String,
        /// Registered kinds, comma-separated.
        known: String,
    },
    /// An input names a stage that does not exist.
    #[error("stage '{stage}' takes {param} = '{target}', but there is no stage '{target}'")]
    UnknownStage {
        /// The reading stage.
        stage: String,
        /// The param naming the input.
        param: String,
        /// The missing stage.
        target: String,
    },
    /// An input names a dataset that is not declared.
    #[error("stage '{stage}' takes {param} = '{target}', but there is no dataset '{target}' in [datasets]")]
    UnknownDataset {
        /// The reading stage.
        stage: String,
        /// The param naming the input.
        param: String,
        /// The missing dataset.
        target: String,
    },
    /// An input's artifact kind is not accepted.
    #[error("stage '{stage}' takes {param} = '{target}', but '{target}' produces {produces}, not {wants}")]
    TypeMismatch {
        /// The reading stage.
        stage: String,
        /// The param naming the input.
        param: String,
        /// The upstream stage.
        target: String,
        /// What it produces.
        produces: String,
        /// What is accepted.
        wants: String,
    },
    /// An input dataset's format is not one the stage reads.
    #[error("stage '{stage}' takes {param} = '{target}', but dataset '{target}' has format {format}, not {wants}")]
    FormatMismatch {
        /// The reading stage.
        stage: String,
        /// The param naming the input.
        param: String,
        /// The dataset.
        target: String,
        /// Its format.
        format: &'static str,
        /// What is accepted.
        wants: String,
    },
    /// The stages form a cycle (names in data-flow order).
    #[error("stages depend on each other in a cycle: {}", cycle_text(.0))]
    Cycle(Vec<String>),
    /// A fingerprint could not be computed.
    #[error(transparent)]
    Fingerprint(#[from] key::FingerprintError),
    /// `--why` named a stage that is not in the plan.
    #[error("no stage '{name}' in this recipe{hint}")]
    NoSuchStage {
        /// The name given.
        name: String,
        /// " — did you mean 'x'?" and the list of stages.
        hint: String,
    },
}

fn cycle_text(c: &[String]) -> String {
    let mut ring = c.to_vec();
    if let Some(first) = c.first() {
        ring.push(first.clone());
    }
    ring.join(" → ")
}

/// Plan `recipe` against the stage kinds mmrun ships.
///
/// `fetched` holds the recipe's `hf://` inputs as resolved through its lock; their content enters
/// the keys of the stages that name them. `device` is the class the recipe's `[recipe] device`
/// resolved to: the executor resolves it (probing for a GPU when it says `auto`), so the planner
/// never touches hardware.
pub fn build(
    recipe: &Recipe,
    cache: &Cache,
    datasets: &BTreeMap<String, ResolvedDataset>,
    fetched: &Fetched,
    device: DeviceClass,
) -> Result<Plan, PlanError> {
    build_fetched(recipe, cache, datasets, fetched, device, &crate::stages::kinds())
}

/// [`build`] against an explicit set of stage kinds, for a recipe without `hf://` stage inputs.
pub fn build_with(
    recipe: &Recipe,
    cache: &Cache,
    datasets: &BTreeMap<String, ResolvedDataset>,
    device: DeviceClass,
    registry: &[&dyn DynStageKind],
) -> Result<Plan, PlanError> {
    build_fetched(recipe, cache, datasets, &Fetched::default(), device, registry)
}

/// [`build`] against an explicit set of stage kinds.
pub fn build_fetched(
    recipe: &Recipe,
    cache: &Cache,
    datasets: &BTreeMap<String, ResolvedDataset>,
    fetched: &Fetched,
    device: DeviceClass,
    registry: &[&dyn DynStageKind],
) -> Result<Plan, PlanError> {
    let defs: Vec<&dyn DynStageKind> = recipe
        .stages
        .iter()
        .map(|s| {
            registry.iter().copied().find(|r| r.kind() == s.kind).ok_or_else(|| PlanError::UnknownKind {
                stage: s.name.clone(),
                kind: s.kind.clone(),
                known: registry.iter().map(|r| r.kind()).collect::<Vec<_>>().join(", "),
            })
        })
        .collect::<Result<_, _>>()?;
    let outputs: BTreeMap<String, ArtifactKind> =
        recipe.stages.iter().zip(&defs).map(|(s, d)| (s.name.clone(), d.output())).collect();
    check_edges(recipe, &outputs)?;
    let order = dag::topo_order(&recipe.stages).map_err(PlanError::Cycle)?;

    let precision = recipe.meta.precision.resolve(device);
    let mut keys = BTreeMap::new();
    let mut statuses: BTreeMap<String, Status> = BTreeMap::new();
    let mut planned = Vec::with_capacity(order.len());
    for i in order {
        let spec = &recipe.stages[i];
        let cx = key::KeyContext {
            recipe,
            stage_keys: &keys,
            stage_outputs: &outputs,
            datasets,
            fetched,
            device_class: device,
            precision,
            cache,
        };
        let (fingerprint, excluded) = key::fingerprint(spec, defs[i], &cx)?;
        let k = key::key_of(&fingerprint);
        let (status, reasons) = match cache.lookup(&k, Depth::Sizes) {
            Lookup::Found(_) => (Status::Cached, Vec::new()),
            Lookup::Damaged(damage) => (Status::Missing, vec![StaleReason::Damaged(damage.to_string())]),
            Lookup::Absent => match read_record(cache, &recipe.meta.name, &spec.name) {
                Err(why) => (Status::Missing, vec![*why]),
                Ok(prev) if prev.key == k => (Status::Missing, vec![StaleReason::ObjectGone { key: k.clone() }]),
                Ok(prev) => {
                    let mut r = reasons::diff(&prev.fingerprint, &fingerprint, &statuses);
                    if r.is_empty() {
                        r.push(StaleReason::KeyChanged { old: prev.key, new: k.clone() });
                    }
                    (Status::Stale, r)
                }
            },
        };
        keys.insert(spec.name.clone(), k.clone());
        statuses.insert(spec.name.clone(), status);
        planned.push(PlannedStage {
            name: spec.name.clone(),
            kind: spec.kind.clone(),
            key: k,
            status,
            reasons,
            inputs: spec.inputs.clone(),
            fingerprint,
            excluded,
            opened: false,
        });
    }
    verify_opened(cache, &mut planned);
    Ok(Plan { stages: planned })
}

/// Check in full every cached object that a stage of the plan will open (the inputs of stages
/// that run), so a damaged one is planned as missing, with the damage as its reason. Walking
/// backwards, a stage found damaged here has its own inputs checked in turn.
fn verify_opened(cache: &Cache, planned: &mut [PlannedStage]) {
    for i in (0..planned.len()).rev() {
        if planned[i].status == Status::Cached {
            continue;
        }
        let inputs: Vec<String> = planned[i]
            .inputs
            .iter()
            .filter_map(|inp| match inp {
                InputRef::Stage { stage, .. } => Some(stage.clone()),
                InputRef::Dataset { .. } => None,
            })
            .collect();
        for name in inputs {
            let Some(up) = planned[..i].iter_mut().find(|p| p.name == name) else { continue };
            if up.status != Status::Cached || up.opened {
                continue;
            }
            up.opened = true;
            if let Lookup::Damaged(damage) = cache.lookup(&up.key, Depth::Content) {
                up.status = Status::Missing;
                up.reasons = vec![StaleReason::Damaged(damage.to_string())];
            }
        }
    }
}

/// Reference and type checks on the edges (the loader does these with spans; this is the
/// backstop for recipes built in code).
fn check_edges(recipe: &Recipe, outputs: &BTreeMap<String, ArtifactKind>) -> Result<(), PlanError> {
    for s in &recipe.stages {
        for i in &s.inputs {
            match i {
                InputRef::Stage { param, stage, accepts } => {
                    let out = outputs.get(stage).ok_or_else(|| PlanError::UnknownStage {
                        stage: s.name.clone(),
                        param: param.to_string(),
                        target: stage.clone(),
                    })?;
                    if !accepts.contains(out) {
                        return Err(PlanError::TypeMismatch {
                            stage: s.name.clone(),
                            param: param.to_string(),
                            target: stage.clone(),
                            produces: out.describe().into(),
                            wants: accepts.iter().map(|a| a.describe()).collect::<Vec<_>>().join(" or "),
                        });
                    }
                }
                InputRef::Dataset { param, dataset, accepts } => {
                    let spec = recipe.datasets.get(dataset).ok_or_else(|| PlanError::UnknownDataset {
                        stage: s.name.clone(),
                        param: param.to_string(),
                        target: dataset.clone(),
                    })?;
                    if !accepts.contains(&spec.format) {
                        return Err(PlanError::FormatMismatch {
                            stage: s.name.clone(),
                            param: param.to_string(),
                            target: dataset.clone(),
                            format: spec.format.as_str(),
                            wants: accepts.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(" or "),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// First 12 hex digits of a key or hash, for messages.
pub(crate) fn short(k: &str) -> &str {
    &k[..k.len().min(12)]
}

/// The record kept per (recipe, stage) after a stage succeeds.
#[derive(Serialize, Deserialize)]
struct Record<F> {
    key: String,
    fingerprint: F,
}

fn record_path(cache: &Cache, recipe: &str, stage: &str) -> PathBuf {
    cache.bucket(Bucket::Fingerprints).join(recipe).join(format!("{stage}.json"))
}

/// The record of the last build of `stage`, or the reason it cannot explain anything.
fn read_record(cache: &Cache, recipe: &str, stage: &str) -> Result<Record<Fingerprint>, Box<StaleReason>> {
    // An unreadable, corrupt or foreign record only costs the explanation, never correctness:
    // the key alone decides what runs.
    let text = match std::fs::read_to_string(record_path(cache, recipe, stage)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Box::new(StaleReason::NeverBuilt)),
        Err(e) => return Err(Box::new(StaleReason::RecordUnreadable(e.to_string()))),
    };
    let raw: Record<Value> =
        serde_json::from_str(&text).map_err(|e| Box::new(StaleReason::RecordUnreadable(e.to_string())))?;
    let fingerprint = serde_json::from_value(raw.fingerprint)
        .map_err(|e| Box::new(StaleReason::RecordFromOtherVersion(e.to_string())))?;
    Ok(Record { key: raw.key, fingerprint })
}

/// Remember what `stage` was built from, so the next plan can explain what changed. The executor
/// calls this after the stage's object is published.
pub fn record_fingerprint(cache: &Cache, recipe_name: &str, stage: &PlannedStage) -> std::io::Result<()> {
    let rec = Record { key: stage.key.clone(), fingerprint: stage.fingerprint.clone() };
    let text = serde_json::to_string_pretty(&rec).map_err(std::io::Error::other)?;
    crate::durable::write_atomic(&record_path(cache, recipe_name, &stage.name), text.as_bytes())
}

impl Plan {
    /// A stage by name.
    pub fn stage(&self, name: &str) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// `{"stages":[{"name","kind","key","status","reasons":[...]}]}` for `mmrun plan --json`.
    pub fn to_json(&self) -> Value {
        json!({
            "stages": self.stages.iter().map(|s| json!({
                "name": s.name,
                "kind": s.kind,
                "key": s.key,
                "status": s.status,
                "reasons": s.reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()
        })
    }

    /// The `--why <stage>` record: what went into the key, what was left out, and each reason.
    pub fn explain(&self, stage: &str) -> Result<String, PlanError> {
        let s = self.stage(stage).ok_or_else(|| {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            let dym = did_you_mean(stage, names.iter().copied()).map(|c| format!(" — did you mean '{c}'?"));
            PlanError::NoSuchStage {
                name: stage.to_string(),
                hint: format!("{} (stages: {})", dym.unwrap_or_default(), names.join(", ")),
            }
        })?;
        Ok(explain_stage(s))
    }
}

impl std::fmt::Display for Plan {
    /// The human listing of `mmrun plan`: one line per stage, reasons indented below.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &self.stages {
            writeln!(f, "{:<w$}  {:<10} {:<8} {}", s.name, s.kind, s.status.to_string(), short(&s.key))?;
            for r in &s.reasons {
                writeln!(f, "{:<w$}    - {r}", "")?;
            }
        }
        Ok(())
    }
}

fn explain_stage(s: &PlannedStage) -> String {
    let fp = &s.fingerprint;
    let mut o = String::new();
    let _ = writeln!(o, "stage {} (kind {}): {}", s.name, s.kind, s.status);
    let _ = writeln!(o, "key {}", s.key);
    let _ = writeln!(o, "\nin the key (blake3 of this record, names excluded):");
    let mut field = |name: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(o, "  {name:<10} {v}");
    };
    field("kind", &fp.kind);
    field("version", &fp.version);
    field("key_format", &fp.key_format);
    field("seed", &fp.seed);
    if let Some(d) = fp.device {
        field("device", &d);
    }
    if let Some(p) = fp.precision {
        field("precision", &p.as_str());
    }
    if fp.params.is_empty() {
        let _ = writeln!(o, "  params     (none)");
    } else {
        let _ = writeln!(o, "  params");
        for (k, v) in &fp.params {
            let _ = writeln!(o, "    {k} = {}", reasons::show(v));
        }
    }
    for i in &fp.inputs {
        let _ = writeln!(o, "  input      {} = {} → key {}", i.param, i.stage, short(&i.key));
    }
    for d in &fp.datasets {
        let columns = if d.columns.is_empty() {
            String::new()
        } else {
            format!(", columns {}", serde_json::to_string(&d.columns).unwrap_or_default())
        };
        let _ = writeln!(
            o,
            "  dataset    {} = {} → content {}, format {}{columns}",
            d.param,
            d.dataset,
            short(&d.content_hash),
            d.format.as_str()
        );
    }
    for f in &fp.files {
        let hash = f.content_hash.as_deref().map_or("(unreadable)", short);
        let _ = writeln!(o, "  file       {} = {} → content {hash}", f.param, f.file);
    }
    match &fp.model {
        Some(key::ModelInKey::Config(m)) => {
            let _ = writeln!(o, "  model");
            for (k, v) in m {
                let _ = writeln!(o, "    {k} = {}", reasons::show(v));
            }
        }
        Some(key::ModelInKey::NoTable) => {
            let _ = writeln!(o, "  model      (no [model] table)");
        }
        None => {}
    }
    let _ = writeln!(o, "\nnot in the key:");
    if s.excluded.is_empty() {
        let _ = writeln!(o, "  cosmetic params: (none set)");
    } else {
        let c: Vec<String> = s.excluded.iter().map(|(k, v)| format!("{k} = {}", reasons::show(v))).collect();
        let _ = writeln!(o, "  cosmetic params: {}", c.join(", "));
    }
    let _ = writeln!(o, "  stage/dataset names, dataset locations, recipe name, device index (see plan::key)");
    let _ = writeln!(o, "\nstatus: {}", s.status);
    if s.reasons.is_empty() {
        let _ = writeln!(o, "  objects/{} is in the cache", short(&s.key));
    }
    for r in &s.reasons {
        let _ = writeln!(o, "  - {r}");
    }
    o
}

#[cfg(test)]
mod tests;
