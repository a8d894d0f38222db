//! Stage keys: when is a stage's cached artifact still the right answer?
//!
//! Every stage gets a [`Fingerprint`], a typed record of everything that can change its output
//! (one field per row of the table below), and a *key*, the blake3 of that record's canonical
//! JSON (sorted keys, no whitespace) minus the names that are there only to explain things to
//! people. The key names the cache object
//! (`objects/<key>/`): same key, same artifact, nothing to run. The fingerprint is kept per
//! (recipe, stage name) after a stage succeeds, so the next plan can say *why* a key moved
//! (`mmrun plan --why <stage>` prints it), the way cargo's fingerprint module records why a unit
//! is dirty: [`super::StaleReason`] is the one list of reasons. A record this mmrun cannot read
//! (written by an older or newer one) costs only the explanation, never correctness.
//!
//! | In the key                                   | Why                                                                                      |
//! |----------------------------------------------|------------------------------------------------------------------------------------------|
//! | stage `kind`                                 | different code path entirely                                                             |
//! | stage `VERSION`                              | bumped by a stage's author when its behaviour (and so its outputs) changes                |
//! | output-affecting params, canonical           | after serde defaults are applied, so writing a default explicitly changes nothing         |
//! | keys of input stages (per param, in order)   | an upstream change propagates down the DAG; order matters (`models = ["a", "b"]`)         |
//! | each input dataset's content hash            | the bytes read, not where they live: moving a file or re-downloading it changes nothing   |
//! | content hash of each local file a stage reads ([`crate::recipe::StageParams::local_files`]: an adopted tokenizer, a local model folder) | same rule as datasets (hashed through the `hashes-v1` memo, so an unchanged file is not read again): editing the file reruns the stage; the param naming the path is left out |
//! | path and sha256 of each file of an `hf://` input a stage names ([`crate::recipe::StageParams::remote_sources`]), as pinned by the recipe's lock | the bytes used: a moved branch changes nothing until `mmrun update` re-pins it; the URI string is left out, and so is the commit (a new commit with the same files must not retrain everything downstream) |
//! | each input dataset's `format`, `columns`, `on_bad_record`, `builtin` | they change which examples the bytes turn into                    |
//! | `recipe.seed`                                | init, data order and sampling depend on it; conservatively in every stage                 |
//! | resolved `[model]` config (stages that *build* a model: output is a model and no input is one) | architecture; downstream stages get it through that stage's key; `vocab_size` only when set explicitly (else the tokenizer input decides it) |
//! | device class `cpu` / `cuda` (stages producing models, adapters, reward models, eval reports) | numerics differ by class; the executor resolves `[recipe] device` to it once (`auto` may probe for a GPU), the planner never touches hardware |
//! | resolved `precision` when it is `bf16` (stages producing models, adapters and reward models) | bf16 mixed precision trains different weights than f32; `auto` enters as what it resolves to (`bf16` on CUDA, on AMX CPUs and on AMD Zen 4/5, else `f32`) |
//! | a training stage's `world_size` and `devices` (when set) | `batch_size` is per rank, so the number of ranks changes the global batch; `devices` enters as written (it sets the number of ranks) |
//! | [`KEY_FORMAT`]                               | lets a new mmrun invalidate keys whose recipe changed meaning                             |
//!
//! | Deliberately *not* in the key                | Why                                                                                      |
//! |----------------------------------------------|------------------------------------------------------------------------------------------|
//! | params a stage declares cosmetic ([`crate::recipe::StageParams::COSMETIC`]: log interval, progress, threads, sample printing) | they never change the artifact, so editing them must not rerun hours of training |
//! | params whose value is `null` (an unset optional) | unset is the default; a stage gaining a new optional param must not invalidate every cache |
//! | stage and dataset *names*, and params that only name inputs (`from = "base"`) | renaming is not a change; the input's key stands in for the name (names stay in the fingerprint, for explanations) |
//! | dataset `source` string                      | the content hash covers what was read                                                     |
//! | device index (`cuda:0` vs `cuda:1`), `auto` vs the class it resolves to | same hardware class, same result                              |
//! | `precision` when it resolves to `f32`, and `auto` vs what it resolves to | f32 is what every key meant before `precision` existed, so an absent field means f32 and those caches stay valid |
//! | `precision` of eval stages               | eval runs in f32 unless its own `precision` param (which keys like any param) says bf16; the models it reads carry their precision in their keys |
//! | tokenizer / dataset stages' device class     | they do not run numerics that depend on it                                               |
//! | recipe name, description, `--set` overrides as such, file path, mmrun version | only their *effect* on the values above matters                |
//! | wall clock, host name, run directory         | not inputs of the computation                                                             |

use crate::artifact::ArtifactKind;
use crate::data::spec::{DataFormat, OnBadRecord};
use crate::data::ResolvedDataset;
use crate::hub::Fetched;
use crate::recipe::{resolve_model, DeviceClass, ModelSpec, Precision, Recipe, StageSpec};
use crate::recipe::{DynStageKind, InputRef};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Version of the fingerprint layout itself; bump when what goes into keys changes.
pub const KEY_FORMAT: u32 = 1;

/// Fingerprint fields that name things for people and are dropped before hashing.
const NAME_FIELDS: &[&str] = &["stage", "dataset"];

/// Everything that can change a stage's output: the rows of the table above, one field each.
///
/// Its key ([`key_of`]) is the blake3 of its canonical JSON without the name fields, so the
/// serialised shape *is* the key format: a field that is absent from the JSON (the `Option`s and
/// `files` skip when empty) keeps the keys written before the field existed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// [`KEY_FORMAT`].
    pub key_format: u32,
    /// The stage kind.
    pub kind: String,
    /// The kind's `VERSION`.
    pub version: u32,
    /// Output-affecting params, canonical (defaults applied; cosmetic, input-naming, local-file
    /// and unset params left out), in declaration order.
    pub params: Map<String, Value>,
    /// Input stages, per param, in order.
    pub inputs: Vec<StageInput>,
    /// Input datasets, in declaration order.
    pub datasets: Vec<DatasetInput>,
    /// Local files the stage reads (an adopted tokenizer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<LocalFile>,
    /// The files of each `hf://` input the stage names, as the recipe's lock pins them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteInputKey>,
    /// `[recipe] seed`.
    pub seed: u64,
    /// The resolved `[model]`, for stages that build a model; absent for the others.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub model: Option<ModelInKey>,
    /// The device class, for stages that produce models, adapters or eval reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceClass>,
    /// `bf16` for training stages that resolve to it; absent means f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

/// A field that is there deserialises as `Some` even when it is `null` (`model = null` means
/// "no [model] table", which is not the same as no `model` field).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// One input stage: the param naming it, its name (not in the key) and its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageInput {
    /// The param (`from`, `models`, …).
    pub param: String,
    /// The stage's name: for explanations only.
    pub stage: String,
    /// Its key.
    pub key: String,
}

/// One input dataset: what was read and how it turns into examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInput {
    /// The param (`data`, …).
    pub param: String,
    /// The dataset's name: for explanations only.
    pub dataset: String,
    /// blake3 over the bytes read.
    pub content_hash: String,
    /// How records are read.
    pub format: DataFormat,
    /// Column renames.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// The bad-record policy.
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// `builtin:` generator params.
    #[serde(default)]
    pub builtin: BTreeMap<String, Value>,
}

impl DatasetInput {
    /// The fields besides the content that change which examples the bytes turn into, by their
    /// recipe names, as the recipe writes them.
    pub fn reading(&self) -> [(&'static str, Value); 4] {
        let v = |x: Result<Value, serde_json::Error>| x.unwrap_or(Value::Null);
        [
            ("format", Value::String(self.format.as_str().into())),
            ("columns", v(serde_json::to_value(&self.columns))),
            ("on_bad_record", v(serde_json::to_value(self.on_bad_record))),
            ("builtin", v(serde_json::to_value(&self.builtin))),
        ]
    }
}

/// One local file a stage reads: the param naming its folder, the file's name, its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// The param (`source`).
    pub param: String,
    /// The file name (`tokenizer.json`).
    pub file: String,
    /// blake3 of its bytes; `None` when it cannot be read (the stage then fails with the reason,
    /// and the key changes once the file appears).
    pub content_hash: Option<String>,
}

/// An `hf://` input of a stage: the param naming it and its pinned files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteInputKey {
    /// The param (`source`).
    pub param: String,
    /// Each file by its path in the repository and its sha256.
    pub files: Vec<PinnedFile>,
}

/// One file of a pinned `hf://` input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedFile {
    /// Path in the repository.
    pub path: String,
    /// Its sha256.
    pub sha256: String,
}

/// What a model-building stage hashes of `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelInKey {
    /// The resolved config's fields (`vocab_size` only when the recipe sets it).
    Config(Map<String, Value>),
    /// No `[model]` table: the kind gets its architecture elsewhere. (JSON `null`.)
    NoTable,
}

/// What a stage's fingerprint needs besides its own spec.
pub struct KeyContext<'a> {
    /// The whole recipe (seed, model, dataset specs).
    pub recipe: &'a Recipe,
    /// Keys of stages planned so far, by name.
    pub stage_keys: &'a BTreeMap<String, String>,
    /// Output kinds of the recipe's stages, by name.
    pub stage_outputs: &'a BTreeMap<String, ArtifactKind>,
    /// Resolved datasets, by name.
    pub datasets: &'a BTreeMap<String, ResolvedDataset>,
    /// The recipe's `hf://` inputs, resolved through its lock.
    pub fetched: &'a Fetched,
    /// The class the recipe's device resolved to (by the executor).
    pub device_class: DeviceClass,
    /// The recipe's precision resolved for `device_class` (never `Auto`).
    pub precision: Precision,
    /// Hashes local input files through its memo (`hashes-v1`), so an unchanged model folder is
    /// not read again on every plan.
    pub cache: &'a crate::cache::Cache,
}

/// Why a fingerprint could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// An input stage has no key yet (not planned, or not in the recipe).
    #[error("stage '{stage}' reads '{input}', which is not planned before it")]
    InputNotPlanned {
        /// The reading stage.
        stage: String,
        /// The missing input.
        input: String,
    },
    /// A dataset was not resolved (its content hash is unknown).
    #[error("stage '{stage}' reads dataset '{dataset}', which was not resolved (its content hash is unknown)")]
    DatasetNotResolved {
        /// The reading stage.
        stage: String,
        /// The dataset.
        dataset: String,
    },
    /// A stage names an `hf://` input that exec did not fetch.
    #[error("stage '{stage}' reads {uri} (`{param}`), which was not fetched through the recipe's lock")]
    RemoteNotFetched {
        /// The reading stage.
        stage: String,
        /// The param naming it.
        param: String,
        /// The URI.
        uri: String,
    },
    /// `[model]` is needed by this stage but cannot be resolved.
    #[error("stage '{stage}' builds a model but [model] is invalid: {source}")]
    Model {
        /// The stage.
        stage: String,
        /// Why.
        #[source]
        source: crate::recipe::ModelSpecError,
    },
}

/// Compute the fingerprint of one stage and the excluded (cosmetic) params.
pub fn fingerprint(
    spec: &StageSpec,
    def: &dyn DynStageKind,
    cx: &KeyContext<'_>,
) -> Result<(Fingerprint, Map<String, Value>), FingerprintError> {
    let ref_params: Vec<&str> = spec
        .inputs
        .iter()
        .map(|i| match i {
            InputRef::Stage { param, .. } | InputRef::Dataset { param, .. } => *param,
        })
        .collect();
    let recipe_dir = cx.recipe.path.parent().unwrap_or(std::path::Path::new("."));
    let local = def.local_files(&spec.params, recipe_dir);
    let remote = def.remote_sources(&spec.params);
    let mut params = Map::new();
    let mut cosmetic = Map::new();
    if let Value::Object(all) = &spec.params {
        for (k, v) in all {
            if def.cosmetic().contains(&k.as_str()) {
                cosmetic.insert(k.clone(), v.clone());
            } else if !ref_params.contains(&k.as_str())
                && !local.iter().any(|(p, _)| p == k)
                && !remote.iter().any(|r| r.param == k)
                && !v.is_null()
            {
                params.insert(k.clone(), v.clone());
            }
        }
    }

    let mut inputs = Vec::new();
    let mut datasets = Vec::new();
    let mut reads_model = false;
    for i in &spec.inputs {
        match i {
            InputRef::Stage { param, stage, .. } => {
                let key = cx.stage_keys.get(stage).ok_or_else(|| FingerprintError::InputNotPlanned {
                    stage: spec.name.clone(),
                    input: stage.clone(),
                })?;
                reads_model |= matches!(
                    cx.stage_outputs.get(stage),
                    Some(ArtifactKind::Model | ArtifactKind::Adapter | ArtifactKind::RewardModel)
                );
                inputs.push(StageInput { param: param.to_string(), stage: stage.clone(), key: key.clone() });
            }
            InputRef::Dataset { param, dataset, .. } => {
                let resolved = cx.datasets.get(dataset).ok_or_else(|| FingerprintError::DatasetNotResolved {
                    stage: spec.name.clone(),
                    dataset: dataset.clone(),
                })?;
                let ds = cx.recipe.datasets.get(dataset).unwrap_or(&resolved.spec);
                datasets.push(DatasetInput {
                    param: param.to_string(),
                    dataset: dataset.clone(),
                    content_hash: resolved.content_hash.clone(),
                    format: ds.format,
                    columns: ds.columns.clone(),
                    on_bad_record: ds.on_bad_record,
                    builtin: ds.builtin.clone(),
                });
            }
        }
    }
    let files = local
        .iter()
        .map(|(param, path)| LocalFile {
            param: param.to_string(),
            file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            // `None` when unreadable: the stage itself then says what is missing.
            content_hash: cx.cache.hash_file(path).ok(),
        })
        .collect();

    let output = def.output();
    let mut remote_keys = Vec::new();
    for r in &remote {
        let repo = cx.fetched.get(r.kind, &spec.name).ok_or_else(|| FingerprintError::RemoteNotFetched {
            stage: spec.name.clone(),
            param: r.param.into(),
            uri: r.uri.to_string(),
        })?;
        let files =
            repo.files.iter().map(|f| PinnedFile { path: f.repo_path.clone(), sha256: f.sha256.clone() }).collect();
        remote_keys.push(RemoteInputKey { param: r.param.to_string(), files });
    }
    let model = if output == ArtifactKind::Model && !reads_model {
        Some(match resolve_model(&cx.recipe.model, None) {
            Ok(cfg) => {
                let Ok(Value::Object(mut fields)) = serde_json::to_value(cfg) else {
                    unreachable!("ModelConfig serialises to an object")
                };
                if cx.recipe.model.vocab_size.is_none() {
                    // Taken from the tokenizer at run time, whose key is already an input.
                    fields.remove("vocab_size");
                }
                ModelInKey::Config(fields)
            }
            // No [model] at all: this kind evidently gets its architecture elsewhere (or will say
            // so when it runs); there is nothing to hash.
            Err(_) if cx.recipe.model == ModelSpec::default() => ModelInKey::NoTable,
            Err(source) => return Err(FingerprintError::Model { stage: spec.name.clone(), source }),
        })
    } else {
        None
    };
    let numeric = matches!(
        output,
        ArtifactKind::Model | ArtifactKind::Adapter | ArtifactKind::RewardModel | ArtifactKind::EvalReport
    );
    // Only bf16 is written: f32 is what keys meant before precision existed (see the table above).
    let trains = matches!(output, ArtifactKind::Model | ArtifactKind::Adapter | ArtifactKind::RewardModel);
    let precision = cx.precision.resolve(cx.device_class);
    let fp = Fingerprint {
        key_format: KEY_FORMAT,
        kind: def.kind().to_string(),
        version: def.version(),
        params,
        inputs,
        datasets,
        files,
        remote: remote_keys,
        seed: cx.recipe.meta.seed,
        model,
        device: numeric.then_some(cx.device_class),
        precision: (trains && precision == Precision::Bf16).then_some(Precision::Bf16),
    };
    Ok((fp, cosmetic))
}

/// The key of a fingerprint: blake3 of its canonical JSON without the name fields, hex.
pub fn key_of(fingerprint: &Fingerprint) -> String {
    let v = serde_json::to_value(fingerprint).expect("a fingerprint serialises");
    blake3::hash(canonical_json(&strip_names(&v)).as_bytes()).to_hex().to_string()
}

fn strip_names(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !NAME_FIELDS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), strip_names(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_names).collect()),
        other => other.clone(),
    }
}

/// JSON with object keys sorted at every level and no whitespace: equal values, equal bytes.
pub fn canonical_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp(v: Value) -> Fingerprint {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> Value {
        json!({"key_format": 1, "kind": "sft", "version": 1, "params": {}, "inputs": [], "datasets": [], "seed": 1})
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a = json!({"b": 1, "a": {"y": [1, 2], "x": null}});
        let b = json!({"a": {"x": null, "y": [1, 2]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
    }

    #[test]
    fn names_do_not_enter_the_key() {
        let with = |stage: &str, key: &str| {
            let mut v = base();
            v["inputs"] = json!([{"param": "from", "stage": stage, "key": key}]);
            fp(v)
        };
        let a = with("base", "k1");
        assert_eq!(key_of(&a), key_of(&with("renamed", "k1")));
        assert_ne!(key_of(&a), key_of(&with("base", "k2")));
        assert_eq!(key_of(&a).len(), 64);
    }

    /// The typed record serialises to exactly the JSON keys were computed from before it was
    /// typed (a field absent, `null` and present are three different things), so no key moved.
    #[test]
    fn the_serialised_shape_is_the_key_format() {
        let mut v = base();
        v["model"] = Value::Null;
        v["device"] = json!("cuda");
        v["precision"] = json!("bf16");
        v["datasets"] = json!([{"param": "data", "dataset": "d", "content_hash": "h", "format": "prompt_answer",
                                "columns": {}, "on_bad_record": "skip", "builtin": {"count": 3}}]);
        v["files"] = json!([{"param": "source", "file": "tokenizer.json", "content_hash": null}]);
        let f = fp(v.clone());
        assert_eq!(f.model, Some(ModelInKey::NoTable));
        assert_eq!(serde_json::to_value(&f).unwrap(), v);
        assert_eq!(key_of(&f), blake3::hash(canonical_json(&strip_names(&v)).as_bytes()).to_hex().to_string());
        let f = fp(base());
        assert_eq!(f.model, None);
        assert_eq!(serde_json::to_value(&f).unwrap(), base(), "absent fields stay absent");
        let mut v = base();
        v["model"] = json!({"hidden_size": 64});
        assert!(matches!(fp(v).model, Some(ModelInKey::Config(m)) if m["hidden_size"] == 64));
    }
}
