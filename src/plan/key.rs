//! Stage keys: when is a stage's cached artifact still the right answer?
//!
//! Every stage gets a *fingerprint*, a JSON record of everything that can change its output, and a
//! *key*, the blake3 of that record's canonical form (sorted keys, no whitespace) minus the names
//! that are there only to explain things to people. The key names the cache object
//! (`objects/<key>/`): same key, same artifact, nothing to run. The fingerprint is kept per
//! (recipe, stage name) after a stage succeeds, so the next plan can say *why* a key moved
//! (`mmrun plan --why <stage>` prints it), the way cargo's fingerprint module records why a unit
//! is dirty.
//!
//! | In the key                                   | Why                                                                                      |
//! |----------------------------------------------|------------------------------------------------------------------------------------------|
//! | stage `kind`                                 | different code path entirely                                                             |
//! | stage `VERSION`                              | bumped by a stage's author when its behaviour (and so its outputs) changes                |
//! | output-affecting params, canonical           | after serde defaults are applied, so writing a default explicitly changes nothing         |
//! | keys of input stages (per param, in order)   | an upstream change propagates down the DAG; order matters (`models = ["a", "b"]`)         |
//! | each input dataset's content hash            | the bytes read, not where they live: moving a file or re-downloading it changes nothing   |
//! | content hash of each local file a stage reads ([`crate::recipe::StageParams::local_files`]: an adopted tokenizer) | same rule as datasets: editing the file reruns the stage; the param naming the path is left out |
//! | path and sha256 of each file of an `hf://` input a stage names ([`crate::recipe::StageParams::remote_sources`]), as pinned by the recipe's lock | the bytes used: a moved branch changes nothing until `mmrun update` re-pins it; the URI string is left out, and so is the commit (a new commit with the same files must not retrain everything downstream) |
//! | each input dataset's `format`, `columns`, `on_bad_record`, `builtin` | they change which examples the bytes turn into                    |
//! | `recipe.seed`                                | init, data order and sampling depend on it; conservatively in every stage                 |
//! | resolved `[model]` config (stages that *build* a model: output is a model and no input is one) | architecture; downstream stages get it through that stage's key; `vocab_size` only when set explicitly (else the tokenizer input decides it) |
//! | device class `cpu` / `cuda` (stages producing models, adapters, reward models, eval reports) | numerics differ by class |
//! | resolved `precision` when it is `bf16` (stages producing models, adapters and reward models) | bf16 mixed precision trains different weights than f32; `auto` enters as what it resolves to (`bf16` on CUDA and on CPUs with avx512_bf16, else `f32`) |
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
//! | `precision` of eval stages               | generation and scoring always run in f32; the models they read carry their precision in their keys |
//! | tokenizer / dataset stages' device class     | they do not run numerics that depend on it                                               |
//! | recipe name, description, `--set` overrides as such, file path, mmrun version | only their *effect* on the values above matters                |
//! | wall clock, host name, run directory         | not inputs of the computation                                                             |

use crate::artifact::ArtifactKind;
use crate::data::ResolvedDataset;
use crate::hub::Fetched;
use crate::recipe::{resolve_model, ModelSpec, Precision, Recipe, StageSpec};
use crate::recipe::{DynStageKind, InputRef};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Version of the fingerprint layout itself; bump when what goes into keys changes.
pub const KEY_FORMAT: u32 = 1;

/// Fingerprint fields that name things for people and are dropped before hashing.
const NAME_FIELDS: &[&str] = &["stage", "dataset"];

/// The device class that enters keys: `cpu` or `cuda` (the index does not matter; `auto`
/// resolves to what this build would use).
pub fn device_class(device: &str) -> &'static str {
    if device.starts_with("cuda") || (device == "auto" && auto_has_cuda()) {
        "cuda"
    } else {
        "cpu"
    }
}

/// What `auto` resolves to, by the same rule as `train::device::select`: CUDA when this build has
/// it *and* device 0 opens. Probed once per process.
fn auto_has_cuda() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| candle_core::utils::cuda_is_available() && candle_core::Device::new_cuda(0).is_ok())
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
    /// `cpu` or `cuda`.
    pub device_class: &'a str,
    /// The recipe's precision resolved for `device_class` (never `Auto`).
    pub precision: Precision,
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
) -> Result<(Value, Map<String, Value>), FingerprintError> {
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
                inputs.push(json!({ "param": param, "stage": stage, "key": key }));
            }
            InputRef::Dataset { param, dataset, .. } => {
                let resolved = cx.datasets.get(dataset).ok_or_else(|| FingerprintError::DatasetNotResolved {
                    stage: spec.name.clone(),
                    dataset: dataset.clone(),
                })?;
                let ds = cx.recipe.datasets.get(dataset).unwrap_or(&resolved.spec);
                datasets.push(json!({
                    "param": param,
                    "dataset": dataset,
                    "content_hash": resolved.content_hash,
                    "format": ds.format,
                    "columns": ds.columns,
                    "on_bad_record": ds.on_bad_record,
                    "builtin": ds.builtin,
                }));
            }
        }
    }

    let output = def.output();
    let mut fp = Map::new();
    fp.insert("key_format".into(), json!(KEY_FORMAT));
    fp.insert("kind".into(), json!(def.kind()));
    fp.insert("version".into(), json!(def.version()));
    fp.insert("params".into(), Value::Object(params));
    fp.insert("inputs".into(), Value::Array(inputs));
    fp.insert("datasets".into(), Value::Array(datasets));
    if !local.is_empty() {
        let files = local
            .iter()
            .map(|(param, path)| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                json!({ "param": param, "file": name, "content_hash": file_hash(path) })
            })
            .collect();
        fp.insert("files".into(), Value::Array(files));
    }
    if !remote.is_empty() {
        let mut pinned = Vec::new();
        for r in &remote {
            let repo = cx.fetched.get(r.kind, &spec.name).ok_or_else(|| FingerprintError::RemoteNotFetched {
                stage: spec.name.clone(),
                param: r.param.into(),
                uri: r.uri.to_string(),
            })?;
            let files: Vec<Value> =
                repo.files.iter().map(|f| json!({ "path": f.repo_path, "sha256": f.sha256 })).collect();
            pinned.push(json!({ "param": r.param, "files": files }));
        }
        fp.insert("remote".into(), Value::Array(pinned));
    }
    fp.insert("seed".into(), json!(cx.recipe.meta.seed));
    if output == ArtifactKind::Model && !reads_model {
        let model = match resolve_model(&cx.recipe.model, None) {
            Ok(cfg) => {
                let mut v = serde_json::to_value(cfg).expect("ModelConfig serialises");
                if cx.recipe.model.vocab_size.is_none() {
                    // Taken from the tokenizer at run time, whose key is already an input.
                    v.as_object_mut().map(|o| o.remove("vocab_size"));
                }
                v
            }
            // No [model] at all: this kind evidently gets its architecture elsewhere (or will say
            // so when it runs); there is nothing to hash.
            Err(_) if cx.recipe.model == ModelSpec::default() => Value::Null,
            Err(source) => return Err(FingerprintError::Model { stage: spec.name.clone(), source }),
        };
        fp.insert("model".into(), model);
    }
    if matches!(
        output,
        ArtifactKind::Model | ArtifactKind::Adapter | ArtifactKind::RewardModel | ArtifactKind::EvalReport
    ) {
        fp.insert("device".into(), json!(cx.device_class));
    }
    // Only bf16 is written: f32 is what keys meant before precision existed (see the table above).
    let trains = matches!(output, ArtifactKind::Model | ArtifactKind::Adapter | ArtifactKind::RewardModel);
    if trains && cx.precision.resolve(cx.device_class) == Precision::Bf16 {
        fp.insert("precision".into(), json!(Precision::Bf16.as_str()));
    }
    Ok((Value::Object(fp), cosmetic))
}

/// blake3 of a file's bytes; `null` when it cannot be read (the stage itself then fails with the
/// reason, and the key changes once the file appears).
fn file_hash(path: &std::path::Path) -> Value {
    let mut h = blake3::Hasher::new();
    match std::fs::File::open(path).and_then(|f| h.update_reader(f).map(|_| ())) {
        Ok(()) => json!(h.finalize().to_hex().to_string()),
        Err(_) => Value::Null,
    }
}

/// The key of a fingerprint: blake3 of its canonical JSON without the name fields, hex.
pub fn key_of(fingerprint: &Value) -> String {
    blake3::hash(canonical_json(&strip_names(fingerprint)).as_bytes()).to_hex().to_string()
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

    #[test]
    fn canonical_json_ignores_key_order() {
        let a = json!({"b": 1, "a": {"y": [1, 2], "x": null}});
        let b = json!({"a": {"x": null, "y": [1, 2]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
        assert_eq!(key_of(&a), key_of(&b));
        assert_eq!(key_of(&a).len(), 64);
    }

    #[test]
    fn names_do_not_enter_the_key() {
        let a = json!({"inputs": [{"param": "from", "stage": "base", "key": "k1"}]});
        let b = json!({"inputs": [{"param": "from", "stage": "renamed", "key": "k1"}]});
        let c = json!({"inputs": [{"param": "from", "stage": "base", "key": "k2"}]});
        assert_eq!(key_of(&a), key_of(&b));
        assert_ne!(key_of(&a), key_of(&c));
    }

    #[test]
    fn device_class_ignores_the_index() {
        assert_eq!(device_class("cpu"), "cpu");
        assert_eq!(device_class("cuda:1"), "cuda");
        assert_eq!(device_class("cuda"), "cuda");
    }
}
