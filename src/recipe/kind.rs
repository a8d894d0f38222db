//! What a stage kind declares, everything but how it runs: its `kind` string, version, output
//! artifact, doc line, params (serde + schemars), inputs (DAG edges), cosmetic names and
//! `validate`. The loader, the schema and the planner need only this; `stages` adds `run` on top
//! ([`crate::stages::Stage`]), so `recipe` never depends on the stage implementations and the list
//! of kinds is passed in (`crate::stages::REGISTRY`, wired by `crate::exec::pipeline`).

use crate::artifact::ArtifactKind;
use crate::data::spec::DataFormat;
use crate::hub::uri::{HubUri, RemoteKind};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What a stage consumes: an upstream stage's artifact or a recipe dataset. These are DAG edges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputRef {
    /// `param` (e.g. `"from"`) names stage `stage`, which must produce one of `accepts`.
    Stage {
        /// The parameter that names the input (for error messages).
        param: &'static str,
        /// The upstream stage's name in the recipe.
        stage: String,
        /// Artifact kinds this input accepts.
        accepts: Vec<ArtifactKind>,
    },
    /// `param` (e.g. `"data"`) names dataset `dataset` from `[datasets]`, which must have one of
    /// the formats `accepts` (checked at load time, like artifact kinds).
    Dataset {
        /// The parameter that names the input.
        param: &'static str,
        /// The dataset's name in the recipe.
        dataset: String,
        /// Record formats this input accepts.
        accepts: &'static [DataFormat],
    },
}

/// A stage kind's parameter struct.
pub trait StageParams: DeserializeOwned + Serialize + JsonSchema + Clone + Send + Sync {
    /// Top-level parameter names that never change the stage's output (log interval, progress
    /// style, threads, eval printing). They are excluded from the stage key, so editing them never
    /// invalidates the cache.
    const COSMETIC: &'static [&'static str] = &[];

    /// The artifacts and datasets this stage reads.
    fn inputs(&self) -> Vec<InputRef>;

    /// Files outside the cache that this stage reads, as `(param, file)` with relative paths
    /// resolved against `recipe_dir` (an adopted tokenizer). Their *content* enters the stage key
    /// in place of the param's value, like a dataset's content hash: editing the file reruns the
    /// stage, moving it does not.
    fn local_files(&self, _recipe_dir: &std::path::Path) -> Vec<(&'static str, std::path::PathBuf)> {
        Vec::new()
    }

    /// The `hf://` inputs this stage's params name (an adopted tokenizer's `source`). Exec resolves
    /// them through the recipe's lock before planning, under this stage's name; their fetched
    /// *content* enters the stage key in place of the param's value, and the stage reads the files
    /// from `Inputs::remote`. `validate` should have rejected a malformed URI already.
    fn remote_sources(&self) -> Vec<RemoteSource> {
        Vec::new()
    }

    /// Reject values that deserialise but can never work (`temperature = 0` for GRPO), so the
    /// recipe loader points at the key before any stage runs.
    fn validate(&self) -> Result<(), InvalidParam> {
        Ok(())
    }
}

/// An `hf://` input named by a stage param ([`StageParams::remote_sources`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSource {
    /// The param naming it.
    pub param: &'static str,
    /// What it is used as (which files are fetched).
    pub kind: RemoteKind,
    /// The parsed URI.
    pub uri: HubUri,
}

/// A parameter value no run can use, found by [`StageParams::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidParam {
    /// The offending top-level key of the stage table.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
    /// What to write instead.
    pub hint: String,
}

/// Why a stage table was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamsError {
    /// serde's message, e.g. "unknown field `lrr`, expected one of …".
    Serde(String),
    /// A value that parses but cannot work.
    Invalid(InvalidParam),
}

impl std::fmt::Display for ParamsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamsError::Serde(m) => f.write_str(m),
            ParamsError::Invalid(e) => write!(f, "`{}`: {} ({})", e.key, e.message, e.hint),
        }
    }
}

/// A stage kind's declaration (tokenizer, pretrain, sft, …), typed.
pub trait StageKind: Send + Sync + 'static {
    /// The `kind = "..."` string in recipes.
    const KIND: &'static str;
    /// Semantic version of this stage's behaviour: bump it whenever outputs would change, so
    /// every cached artifact of this kind becomes stale.
    const VERSION: u32;
    /// The artifact kind it produces.
    const OUTPUT: ArtifactKind;
    /// One line for `--help`, docs and the schema.
    const DOC: &'static str;
    /// Its parameters.
    type Params: StageParams;
}

/// Parameters validated by a stage kind: canonical JSON (defaults filled in) and DAG edges.
#[derive(Clone, Debug)]
pub struct ParsedParams {
    /// All params, defaults applied, as canonical JSON (object).
    pub canonical: serde_json::Value,
    /// Declared inputs.
    pub inputs: Vec<InputRef>,
}

/// The object-safe face of [`StageKind`], used by the loader, the schema and the planner.
pub trait DynStageKind: Send + Sync {
    /// See [`StageKind::KIND`].
    fn kind(&self) -> &'static str;
    /// See [`StageKind::VERSION`].
    fn version(&self) -> u32;
    /// See [`StageKind::OUTPUT`].
    fn output(&self) -> ArtifactKind;
    /// See [`StageKind::DOC`].
    fn doc(&self) -> &'static str;
    /// See [`StageParams::COSMETIC`].
    fn cosmetic(&self) -> &'static [&'static str];
    /// Deserialize (with `deny_unknown_fields`), validate and canonicalise a stage table, `kind`
    /// removed.
    fn parse_params(&self, table: &toml::Table) -> Result<ParsedParams, ParamsError>;
    /// JSON Schema of the params.
    fn params_schema(&self, gen: &mut schemars::SchemaGenerator) -> schemars::Schema;
    /// See [`StageParams::local_files`], for canonical params.
    fn local_files(
        &self,
        canonical: &serde_json::Value,
        recipe_dir: &std::path::Path,
    ) -> Vec<(&'static str, std::path::PathBuf)>;
    /// See [`StageParams::remote_sources`], for canonical params.
    fn remote_sources(&self, canonical: &serde_json::Value) -> Vec<RemoteSource>;
    /// The data-parallel ranks a stage asks for, from its canonical params' `world_size` and
    /// `devices` (declared by every training stage's shared params; a kind without them runs as
    /// one rank).
    fn ranks(&self, canonical: &serde_json::Value) -> Ranks {
        let devices: Vec<super::DeviceSpec> =
            canonical.get("devices").and_then(|d| serde_json::from_value(d.clone()).ok()).unwrap_or_default();
        let world_size = canonical
            .get("world_size")
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(devices.len())
            .max(1);
        Ranks { world_size, devices }
    }
}

/// How many processes train a stage together, and on which devices ([`DynStageKind::ranks`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranks {
    /// The number of ranks (1: no data parallelism).
    pub world_size: usize,
    /// `devices[rank]`, when the stage lists them.
    pub devices: Vec<super::DeviceSpec>,
}

impl<S: StageKind> DynStageKind for S {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn output(&self) -> ArtifactKind {
        S::OUTPUT
    }
    fn doc(&self) -> &'static str {
        S::DOC
    }
    fn cosmetic(&self) -> &'static [&'static str] {
        S::Params::COSMETIC
    }
    fn parse_params(&self, table: &toml::Table) -> Result<ParsedParams, ParamsError> {
        let params: S::Params = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ParamsError::Serde(e.message().to_string()))?;
        params.validate().map_err(ParamsError::Invalid)?;
        let canonical = serde_json::to_value(&params).map_err(|e| ParamsError::Serde(e.to_string()))?;
        Ok(ParsedParams { canonical, inputs: params.inputs() })
    }
    fn params_schema(&self, gen: &mut schemars::SchemaGenerator) -> schemars::Schema {
        S::Params::json_schema(gen)
    }
    fn local_files(
        &self,
        canonical: &serde_json::Value,
        recipe_dir: &std::path::Path,
    ) -> Vec<(&'static str, std::path::PathBuf)> {
        // Canonical params were produced by this kind's own parser, so they always deserialise.
        serde_json::from_value::<S::Params>(canonical.clone()).map(|p| p.local_files(recipe_dir)).unwrap_or_default()
    }
    fn remote_sources(&self, canonical: &serde_json::Value) -> Vec<RemoteSource> {
        serde_json::from_value::<S::Params>(canonical.clone()).map(|p| p.remote_sources()).unwrap_or_default()
    }
}
