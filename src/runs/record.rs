//! The `run.json` schema.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Overall state of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still going (or killed: see [`RunRecord::effective_status`]).
    #[default]
    Running,
    /// Every stage cached or ran.
    Succeeded,
    /// A stage failed.
    Failed,
    /// Stopped by Ctrl-C after checkpointing.
    Interrupted,
}

impl RunStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// State of one stage within a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Not started yet.
    #[default]
    Pending,
    /// Being built now (a killed run leaves this).
    Running,
    /// Its artifact was already in the cache.
    Cached,
    /// Built by this run.
    Ran,
    /// Returned an error.
    Failed,
    /// Stopped by Ctrl-C after saving a checkpoint.
    Interrupted,
    /// Not run because an earlier stage failed or was interrupted.
    Skipped,
    /// Submitted to a cluster scheduler, then cancelled before it ran (an upstream stage failed,
    /// or Ctrl-C).
    Cancelled,
}

impl StageStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
            StageStatus::Cached => "cached",
            StageStatus::Ran => "ran",
            StageStatus::Failed => "failed",
            StageStatus::Interrupted => "interrupted",
            StageStatus::Skipped => "skipped",
            StageStatus::Cancelled => "cancelled",
        }
    }
}

/// One stage's entry in `run.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name (the map key in JSON).
    #[serde(skip)]
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// What happened.
    pub status: StageStatus,
    /// Stage key (object directory name).
    pub key: String,
    /// Wall-clock seconds spent (0 for cached).
    pub seconds: f64,
    /// Final metrics.
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Why the planner considered it stale (empty when cached).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Error chain, for failed stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cluster job that built it (`slurm:<job id>`; its log is `slurm/<stage>.log` in the run
    /// directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// One dataset in the resolved lock.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetLock {
    /// `source` as written in the recipe.
    pub source: String,
    /// Content hash over the resolved files.
    pub content_hash: String,
    /// The resolved local files.
    #[serde(default)]
    pub files: Vec<String>,
}

/// What exactly this run used: enough to rebuild every artifact.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunLock {
    /// mmrun version.
    pub mmrun_version: String,
    /// Datasets by name.
    pub datasets: BTreeMap<String, DatasetLock>,
    /// Stage keys by stage name.
    pub stages: BTreeMap<String, String>,
}

/// `run.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's directory name.
    pub id: String,
    /// `[recipe] name`.
    pub recipe_name: String,
    /// The recipe file as given on the command line.
    pub recipe_path: String,
    /// The recipe text exactly as read.
    pub recipe_text: String,
    /// `--set` overrides, in order.
    pub overrides: Vec<String>,
    /// RFC 3339 UTC start time.
    pub started: String,
    /// RFC 3339 UTC end time (absent while running or if killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Process id of the mmrun that wrote it (to tell a live run from a killed one).
    pub pid: u32,
    /// Overall status.
    pub status: RunStatus,
    /// Total wall-clock seconds.
    #[serde(default)]
    pub seconds: f64,
    /// Resolved lock.
    pub lock: RunLock,
    /// Effective parameters (recipe + overrides, defaults applied) as nested JSON, for `diff`.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Per-stage records in execution order (a JSON object keyed by stage name).
    #[serde(with = "stage_map", default)]
    pub stages: Vec<StageRecord>,
    /// Skipped bad records per dataset (details in `rejects.jsonl`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejects: BTreeMap<String, u64>,
    /// The error that stopped the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Cache entries the run used outside `objects` (tokenised shards, builtin data): bucket →
    /// keys. `gc` keeps them, like the stage keys, while this record exists.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cache_entries: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Things the user should know about how the run went (e.g. a damaged cache entry rebuilt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl RunRecord {
    /// The stage record called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Mutable access to the stage record called `name`.
    pub fn stage_mut(&mut self, name: &str) -> Option<&mut StageRecord> {
        self.stages.iter_mut().find(|s| s.name == name)
    }

    /// The status, with a `running` run whose process is gone reported as `killed`.
    pub fn effective_status(&self) -> &'static str {
        if self.status == RunStatus::Running && !pid_alive(self.pid) {
            "killed"
        } else {
            self.status.as_str()
        }
    }

    /// Whether the run did not finish (failed, interrupted or killed) and so can be resumed.
    pub fn is_unfinished(&self) -> bool {
        self.status != RunStatus::Succeeded
    }
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `Vec<StageRecord>` <-> `{"<name>": {...}, ...}` keeping order (serde_json preserves it).
mod stage_map {
    use super::StageRecord;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[StageRecord], s: S) -> Result<S::Ok, S::Error> {
        let mut map = serde_json::Map::new();
        for st in v {
            map.insert(st.name.clone(), serde_json::to_value(st).map_err(serde::ser::Error::custom)?);
        }
        map.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StageRecord>, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        map.into_iter()
            .map(|(name, v)| {
                let mut st: StageRecord = serde_json::from_value(v).map_err(serde::de::Error::custom)?;
                st.name = name;
                Ok(st)
            })
            .collect()
    }
}
