//! What a running stage is handed: where to write, what it reads, and how to report.

use crate::artifact::Artifact;
use crate::cache::Cache;
use crate::cancel::CancelToken;
use crate::data::ResolvedDataset;
use crate::hub::FetchedRepo;
use crate::recipe::Recipe;
use crate::runs::RunSink;
use std::collections::BTreeMap;
use std::path::Path;

/// The typed inputs of a stage, by the names used in the recipe.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Upstream artifacts, by stage name.
    pub artifacts: BTreeMap<String, Artifact>,
    /// Datasets, by dataset name.
    pub datasets: BTreeMap<String, ResolvedDataset>,
    /// The `hf://` inputs the stage's params name ([`crate::recipe::StageParams::remote_sources`]),
    /// by param, as resolved through the recipe's lock before planning.
    pub remote: BTreeMap<&'static str, FetchedRepo>,
}

impl Inputs {
    /// The artifact produced by stage `name` (the planner guarantees it is present and typed).
    pub fn artifact(&self, name: &str) -> anyhow::Result<&Artifact> {
        self.artifacts.get(name).ok_or_else(|| anyhow::anyhow!("internal: input stage '{name}' was not provided"))
    }

    /// The full model produced by stage `name`: a model artifact, or an adapter artifact that also
    /// holds its merged model (`merge = true`). `who` names the asking stage in the error.
    pub fn model(&self, name: &str, who: &str) -> anyhow::Result<&Artifact> {
        let art = self.artifact(name)?;
        if !art.model_weights().is_file() {
            anyhow::bail!(
                "stage '{who}': stage '{name}' produced an adapter without a merged model; set `merge = true` there"
            );
        }
        Ok(art)
    }

    /// The locked files of the `hf://` input named by param `param`.
    pub fn remote(&self, param: &str) -> anyhow::Result<&FetchedRepo> {
        self.remote.get(param).ok_or_else(|| anyhow::anyhow!("internal: the hf:// input of `{param}` was not fetched"))
    }

    /// The dataset called `name`.
    pub fn dataset(&self, name: &str) -> anyhow::Result<&ResolvedDataset> {
        self.datasets.get(name).ok_or_else(|| anyhow::anyhow!("internal: dataset '{name}' was not provided"))
    }
}

/// Everything a stage may touch while it runs.
pub struct StageContext<'a> {
    /// The stage's name in the recipe.
    pub name: &'a str,
    /// The stage key (its object directory name).
    pub key: &'a str,
    /// The whole recipe (seed, device, `[model]`).
    pub recipe: &'a Recipe,
    /// Typed inputs.
    pub inputs: &'a Inputs,
    /// Write the artifact's files here; it becomes `objects/<key>/` only if the stage succeeds.
    pub out_dir: &'a Path,
    /// Persistent across interruptions: checkpoints live here (`work/<key>/`).
    pub work_dir: &'a Path,
    /// The cache, for derived products such as tokenised shards.
    pub cache: &'a Cache,
    /// Metrics, rejects and plots of the current run.
    pub run: &'a RunSink,
    /// Raised on Ctrl-C: save a checkpoint and return [`crate::cancel::Interrupted`].
    pub cancel: &'a CancelToken,
    /// This process's place among the ranks of a data-parallel stage (`world_size` > 1).
    pub rank: Option<Rank>,
}

/// One rank of a data-parallel stage: the collective joining it to the others, and its device.
#[derive(Clone, Debug)]
pub struct Rank {
    /// Connected to every other rank.
    pub collective: std::sync::Arc<dyn crate::dist::Collective>,
    /// The stage's `devices[rank]`, if it lists devices.
    pub device: Option<crate::recipe::DeviceSpec>,
}

impl StageContext<'_> {
    /// Where and in which precision this stage trains: the recipe's `device` and `precision`, or
    /// on rank `r` of a data-parallel stage its listed device (else the `r`-th GPU after the
    /// recipe's, see [`crate::train::device::for_rank`]).
    pub fn compute(&self) -> anyhow::Result<crate::train::device::Compute> {
        use crate::train::device::{for_rank, resolve_class, Compute};
        let meta = &self.recipe.meta;
        let Some(rank) = &self.rank else { return Ok(Compute::for_recipe(meta)?) };
        let device = match rank.device {
            Some(d) => {
                if resolve_class(d) != resolve_class(meta.device) {
                    anyhow::bail!(
                        "stage '{}' lists device {d} but [recipe] device = \"{}\" is another kind of device (and \
                         the stage keys were computed for it); set [recipe] device to match `devices`",
                        self.name,
                        meta.device
                    );
                }
                d
            }
            None => for_rank(meta.device, rank.collective.rank()),
        };
        Ok(Compute::new(device, meta.precision)?)
    }
}

/// What a successful stage reports besides its files.
#[derive(Clone, Debug, Default)]
pub struct StageOutcome {
    /// Final metrics (recorded in the run and the manifest).
    pub metrics: serde_json::Map<String, serde_json::Value>,
}
