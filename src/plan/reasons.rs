//! Why a stage has to run, as [`StaleReason`]s: one enum, one `Display` (the model is cargo's
//! `DirtyReason`), used by `mmrun plan`, `plan --why`, `plan --json` and the run record.
//! [`diff`] compares two [`Fingerprint`]s field by field.

use super::key::{Fingerprint, ModelInKey};
use super::{short, Status};
use crate::recipe::{DeviceClass, Precision};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// A value as a person would write it in the recipe: `5e-4` rather than `0.0005`, bare strings.
pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let a = f.abs();
            if a != 0.0 && !(1e-3..1e6).contains(&a) {
                format!("{f:e}")
            } else {
                format!("{f}")
            }
        }
        Value::Null => "(none)".into(),
        other => other.to_string(),
    }
}

/// How one named value (a param, a `[model]` field, a dataset setting) changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Set before and now, to different values.
    Changed {
        /// Before.
        old: Value,
        /// Now.
        new: Value,
    },
    /// Set now, not before.
    Added(Value),
    /// Set before, not now.
    Removed(Value),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Changed { old, new } => write!(f, "{} → {}", show(old), show(new)),
            Change::Added(new) => write!(f, "= {} (new)", show(new)),
            Change::Removed(old) => write!(f, "removed (was {})", show(old)),
        }
    }
}

/// Why a stage is stale or missing. `Display` is the sentence `mmrun plan` prints.
#[derive(Clone, Debug, PartialEq)]
pub enum StaleReason {
    /// No record of an earlier build.
    NeverBuilt,
    /// The record of the last build could not be read (I/O or not JSON).
    RecordUnreadable(String),
    /// The record of the last build is in a layout this mmrun does not know.
    RecordFromOtherVersion(String),
    /// Built before under this very key, but the object is gone.
    ObjectGone {
        /// The key.
        key: String,
    },
    /// The cached object failed verification.
    Damaged(String),
    /// mmrun changed what goes into keys.
    KeyFormat {
        /// Before.
        old: u32,
        /// Now.
        new: u32,
    },
    /// The stage's kind changed.
    Kind {
        /// Before.
        old: String,
        /// Now.
        new: String,
    },
    /// The kind's `VERSION` changed.
    Version {
        /// Before.
        old: u32,
        /// Now.
        new: u32,
    },
    /// `[recipe] seed` changed.
    Seed {
        /// Before.
        old: u64,
        /// Now.
        new: u64,
    },
    /// The device class changed (or started or stopped entering the key).
    Device {
        /// Before.
        old: Option<DeviceClass>,
        /// Now.
        new: Option<DeviceClass>,
    },
    /// The resolved precision changed (absent means f32).
    Precision {
        /// Before.
        old: Precision,
        /// Now.
        new: Precision,
    },
    /// An output-affecting param changed.
    Param {
        /// Its name.
        name: String,
        /// How.
        change: Change,
    },
    /// An input stage was added.
    InputAdded {
        /// The param.
        param: String,
        /// The stage.
        stage: String,
    },
    /// A param now names another stage (with another key).
    InputReplaced {
        /// The param.
        param: String,
        /// The stage named before.
        old: String,
        /// The stage named now.
        new: String,
    },
    /// An input stage is stale itself, so this one reruns after it.
    InputStale(String),
    /// An input stage is not built yet.
    InputNotBuilt(String),
    /// An input stage's key changed although it is cached.
    InputChanged {
        /// The stage.
        stage: String,
        /// Its key before.
        old: String,
        /// Its key now.
        new: String,
    },
    /// An input stage is no longer read.
    InputDropped {
        /// The param.
        param: String,
        /// The stage.
        stage: String,
    },
    /// A dataset is read that was not before.
    DatasetAdded {
        /// The dataset.
        dataset: String,
        /// The param.
        param: String,
    },
    /// A dataset's bytes changed.
    DatasetContent {
        /// The dataset.
        dataset: String,
        /// Content hash before.
        old: String,
        /// Content hash now.
        new: String,
    },
    /// How a dataset is read changed (`format`, `columns`, `on_bad_record`, `builtin`).
    DatasetSetting {
        /// The dataset.
        dataset: String,
        /// The setting.
        field: &'static str,
        /// Before.
        old: Value,
        /// Now.
        new: Value,
    },
    /// A dataset is no longer read.
    DatasetDropped(String),
    /// A local file is read that was not before.
    FileAdded {
        /// The file name.
        file: String,
        /// The param.
        param: String,
    },
    /// A local file's bytes changed.
    FileChanged {
        /// The file name.
        file: String,
        /// The param.
        param: String,
        /// Content hash before (`None`: unreadable).
        old: Option<String>,
        /// Content hash now.
        new: Option<String>,
    },
    /// A local file is no longer read.
    FileDropped {
        /// The file name.
        file: String,
        /// The param.
        param: String,
    },
    /// The stage names an `hf://` input it did not before (by param).
    RemoteAdded(String),
    /// The lock re-pinned an `hf://` input to other files (`mmrun update`).
    RemoteChanged(String),
    /// The stage no longer names an `hf://` input.
    RemoteDropped(String),
    /// A field of the resolved `[model]` changed.
    Model {
        /// The field.
        field: String,
        /// How.
        change: Change,
    },
    /// The stage builds its model from `[model]`, which it did not before.
    ModelNowFromTable,
    /// The stage no longer builds its model from `[model]`.
    ModelNoLongerFromTable,
    /// The key moved for a reason none of the above names.
    KeyChanged {
        /// Before.
        old: String,
        /// Now.
        new: String,
    },
}

fn opt_hash(h: &Option<String>) -> &str {
    h.as_deref().map(short).unwrap_or("(unreadable)")
}

impl fmt::Display for StaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use StaleReason::*;
        match self {
            NeverBuilt => write!(f, "never built"),
            RecordUnreadable(why) => {
                write!(f, "the record of its last build is unreadable ({why}), so what changed is unknown")
            }
            RecordFromOtherVersion(why) => write!(
                f,
                "the record of its last build was written by an older (or newer) mmrun ({why}), so what changed is unknown"
            ),
            ObjectGone { key } => {
                write!(f, "built before as {} but the object is no longer in the cache (deleted or gc'd)", short(key))
            }
            Damaged(damage) => write!(f, "its cached object is damaged ({damage}); it will be rebuilt"),
            KeyFormat { old, new } => write!(f, "key format {old} → {new} (mmrun changed what goes into keys)"),
            Kind { old, new } => write!(f, "kind {old} → {new}"),
            Version { old, new } => write!(f, "stage version {old} → {new}"),
            Seed { old, new } => write!(f, "seed {old} → {new}"),
            Device { old, new } => {
                let s = |d: &Option<DeviceClass>| d.map_or("(none)", DeviceClass::as_str);
                write!(f, "device class {} → {}", s(old), s(new))
            }
            Precision { old, new } => write!(f, "precision {} → {}", old.as_str(), new.as_str()),
            Param { name, change } => write!(f, "param {name} {change}"),
            InputAdded { param, stage } => write!(f, "input {stage} added ({param})"),
            InputReplaced { param, old, new } => write!(f, "input {param} is now {new} (was {old})"),
            InputStale(stage) => write!(f, "input {stage} is stale"),
            InputNotBuilt(stage) => write!(f, "input {stage} is not built"),
            InputChanged { stage, old, new } => write!(f, "input {stage} changed (key {} → {})", short(old), short(new)),
            InputDropped { param, stage } => write!(f, "input {stage} no longer used ({param})"),
            DatasetAdded { dataset, param } => write!(f, "dataset {dataset} added ({param})"),
            DatasetContent { dataset, old, new } => {
                write!(f, "dataset {dataset} changed (content hash {}… → {}…)", short(old), short(new))
            }
            DatasetSetting { dataset, field, old, new } => {
                write!(f, "dataset {dataset} {field} {} → {}", show(old), show(new))
            }
            DatasetDropped(dataset) => write!(f, "dataset {dataset} no longer used"),
            FileAdded { file, param } => write!(f, "now reads {file} ({param})"),
            FileChanged { file, param, old, new } => {
                write!(f, "{file} ({param}) changed (content hash {}… → {}…)", opt_hash(old), opt_hash(new))
            }
            FileDropped { file, param } => write!(f, "no longer reads {file} ({param})"),
            RemoteAdded(param) => write!(f, "now reads a Hub input ({param})"),
            RemoteChanged(param) => write!(f, "the Hub files of `{param}` changed (re-pinned in the lock)"),
            RemoteDropped(param) => write!(f, "no longer reads a Hub input ({param})"),
            Model { field, change } => write!(f, "model {field} {change}"),
            ModelNowFromTable => write!(f, "now builds its model from [model]"),
            ModelNoLongerFromTable => write!(f, "no longer builds its model from [model]"),
            KeyChanged { old, new } => write!(f, "key changed ({} → {})", short(old), short(new)),
        }
    }
}

/// One [`Change`] per differing key of two flat objects, in key order.
fn diff_map(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<(String, Change)> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let change = match (old.get(k), new.get(k)) {
                (Some(a), Some(b)) if a != b => Change::Changed { old: a.clone(), new: b.clone() },
                (None, Some(b)) => Change::Added(b.clone()),
                (Some(a), None) => Change::Removed(a.clone()),
                _ => return None,
            };
            Some((k.clone(), change))
        })
        .collect()
}

/// Reasons `new` differs from `old`. `statuses` holds the already-planned upstream stages.
pub(crate) fn diff(old: &Fingerprint, new: &Fingerprint, statuses: &BTreeMap<String, Status>) -> Vec<StaleReason> {
    use StaleReason as R;
    let mut out = Vec::new();
    if old.key_format != new.key_format {
        out.push(R::KeyFormat { old: old.key_format, new: new.key_format });
    }
    if old.kind != new.kind {
        out.push(R::Kind { old: old.kind.clone(), new: new.kind.clone() });
    } else if old.version != new.version {
        out.push(R::Version { old: old.version, new: new.version });
    }
    if old.seed != new.seed {
        out.push(R::Seed { old: old.seed, new: new.seed });
    }
    if old.device != new.device {
        out.push(R::Device { old: old.device, new: new.device });
    }
    if old.precision != new.precision {
        // Absent means f32 (see plan::key).
        let p = |p: Option<Precision>| p.unwrap_or(Precision::F32);
        out.push(R::Precision { old: p(old.precision), new: p(new.precision) });
    }
    out.extend(diff_map(&old.params, &new.params).into_iter().map(|(name, change)| R::Param { name, change }));

    // Inputs: matched by (param, position among that param's entries).
    let by_param = |v: &[super::key::StageInput]| {
        let mut m: BTreeMap<String, Vec<super::key::StageInput>> = BTreeMap::new();
        for e in v {
            m.entry(e.param.clone()).or_default().push(e.clone());
        }
        m
    };
    let (om, nm) = (by_param(&old.inputs), by_param(&new.inputs));
    for (param, news) in &nm {
        let olds = om.get(param).cloned().unwrap_or_default();
        for (i, n) in news.iter().enumerate() {
            match olds.get(i) {
                None => out.push(R::InputAdded { param: param.clone(), stage: n.stage.clone() }),
                Some(o) if o.stage != n.stage && o.key != n.key => {
                    out.push(R::InputReplaced { param: param.clone(), old: o.stage.clone(), new: n.stage.clone() })
                }
                Some(o) if o.key != n.key => out.push(match statuses.get(&n.stage) {
                    Some(Status::Stale) => R::InputStale(n.stage.clone()),
                    Some(Status::Missing) => R::InputNotBuilt(n.stage.clone()),
                    _ => R::InputChanged { stage: n.stage.clone(), old: o.key.clone(), new: n.key.clone() },
                }),
                _ => {}
            }
        }
        for o in olds.iter().skip(news.len()) {
            out.push(R::InputDropped { param: param.clone(), stage: o.stage.clone() });
        }
    }
    for (param, olds) in &om {
        if !nm.contains_key(param) {
            for o in olds {
                out.push(R::InputDropped { param: param.clone(), stage: o.stage.clone() });
            }
        }
    }

    // Datasets: matched by name.
    for n in &new.datasets {
        match old.datasets.iter().find(|o| o.dataset == n.dataset) {
            None => out.push(R::DatasetAdded { dataset: n.dataset.clone(), param: n.param.clone() }),
            Some(o) => {
                if o.content_hash != n.content_hash {
                    out.push(R::DatasetContent {
                        dataset: n.dataset.clone(),
                        old: o.content_hash.clone(),
                        new: n.content_hash.clone(),
                    });
                }
                for ((field, a), (_, b)) in o.reading().into_iter().zip(n.reading()) {
                    if a != b {
                        out.push(R::DatasetSetting { dataset: n.dataset.clone(), field, old: a, new: b });
                    }
                }
            }
        }
    }
    for o in old.datasets.iter().filter(|o| !new.datasets.iter().any(|n| n.dataset == o.dataset)) {
        out.push(R::DatasetDropped(o.dataset.clone()));
    }

    // Local files (an adopted tokenizer): matched by (param, file name).
    let same_file = |a: &super::key::LocalFile, b: &super::key::LocalFile| a.param == b.param && a.file == b.file;
    for n in &new.files {
        match old.files.iter().find(|o| same_file(o, n)) {
            None => out.push(R::FileAdded { file: n.file.clone(), param: n.param.clone() }),
            Some(o) if o.content_hash != n.content_hash => out.push(R::FileChanged {
                file: n.file.clone(),
                param: n.param.clone(),
                old: o.content_hash.clone(),
                new: n.content_hash.clone(),
            }),
            Some(_) => {}
        }
    }
    for o in old.files.iter().filter(|o| !new.files.iter().any(|n| same_file(o, n))) {
        out.push(R::FileDropped { file: o.file.clone(), param: o.param.clone() });
    }

    // `hf://` inputs, as pinned by the lock: matched by param.
    for n in &new.remote {
        match old.remote.iter().find(|o| o.param == n.param) {
            None => out.push(R::RemoteAdded(n.param.clone())),
            Some(o) if o.files != n.files => out.push(R::RemoteChanged(n.param.clone())),
            Some(_) => {}
        }
    }
    for o in old.remote.iter().filter(|o| !new.remote.iter().any(|n| n.param == o.param)) {
        out.push(R::RemoteDropped(o.param.clone()));
    }

    let config = |m: &Option<ModelInKey>| match m {
        Some(ModelInKey::Config(c)) => Some(c.clone()),
        _ => None,
    };
    match (config(&old.model), config(&new.model)) {
        (Some(a), Some(b)) => {
            out.extend(diff_map(&a, &b).into_iter().map(|(field, change)| R::Model { field, change }))
        }
        (None, Some(_)) => out.push(R::ModelNowFromTable),
        (Some(_), None) => out.push(R::ModelNoLongerFromTable),
        (None, None) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_read_like_the_recipe() {
        assert_eq!(show(&json!(5e-4)), "5e-4");
        assert_eq!(show(&json!(3e-4)), "3e-4");
        assert_eq!(show(&json!(0.5)), "0.5");
        assert_eq!(show(&json!(32)), "32");
        assert_eq!(show(&json!("adamw")), "adamw");
    }

    #[test]
    fn each_field_gives_a_reason() {
        let old: Fingerprint = serde_json::from_value(json!({
            "key_format": 1, "kind": "pretrain", "version": 1, "seed": 42, "device": "cpu",
            "params": {"lr": 5e-4, "warmup": 10},
            "inputs": [{"param": "tokenizer", "stage": "tok", "key": "aaaaaaaaaaaaaaaa"}],
            "datasets": [{"param": "data", "dataset": "medical", "content_hash": "1a2b3c4d5e6f7a8b", "format": "text"}],
            "files": [{"param": "source", "file": "tokenizer.json", "content_hash": "0123456789abcdef"}],
            "model": {"hidden_size": 64}
        }))
        .unwrap();
        let new: Fingerprint = serde_json::from_value(json!({
            "key_format": 1, "kind": "pretrain", "version": 2, "seed": 7, "device": "cuda", "precision": "bf16",
            "params": {"lr": 3e-4, "batch": 8},
            "inputs": [{"param": "tokenizer", "stage": "tok", "key": "bbbbbbbbbbbbbbbb"}],
            "datasets": [{"param": "data", "dataset": "medical", "content_hash": "3c4d5e6f7a8b9c0d", "format": "text"}],
            "files": [{"param": "source", "file": "tokenizer.json", "content_hash": "fedcba9876543210"},
                      {"param": "source", "file": "tokenizer_config.json", "content_hash": "00"}],
            "model": {"hidden_size": 128}
        }))
        .unwrap();
        let st = BTreeMap::from([("tok".to_string(), Status::Stale)]);
        let text = |r: Vec<StaleReason>| r.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            text(diff(&old, &new, &st)),
            [
                "stage version 1 → 2",
                "seed 42 → 7",
                "device class cpu → cuda",
                "precision f32 → bf16",
                "param batch = 8 (new)",
                "param lr 5e-4 → 3e-4",
                "param warmup removed (was 10)",
                "input tok is stale",
                "dataset medical changed (content hash 1a2b3c4d5e6f… → 3c4d5e6f7a8b…)",
                "tokenizer.json (source) changed (content hash 0123456789ab… → fedcba987654…)",
                "now reads tokenizer_config.json (source)",
                "model hidden_size 64 → 128",
            ]
        );
        let st = BTreeMap::from([("tok".to_string(), Status::Cached)]);
        assert!(
            text(diff(&old, &new, &st)).contains(&"input tok changed (key aaaaaaaaaaaa → bbbbbbbbbbbb)".to_string())
        );
    }
}
