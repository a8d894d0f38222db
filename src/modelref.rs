//! Model references: the one way every command and stage names a model.
//!
//! A reference is, in the order tried:
//!
//! | form | example | what it is |
//! |---|---|---|
//! | `hf://<owner>/<name>[@<rev>]` | `hf://Qwen/Qwen3-0.6B@main` | a Hub model repository, fetched into the HF cache |
//! | `<stage>` | `sft` | a stage of this recipe (when a recipe is in context) |
//! | `<run>:<stage>` | `20261122T14:sft` | stage `stage` of a past run's record (unique run-name prefixes allowed) |
//! | a folder | `./exports/med` | a local transformers folder (`config.json` + safetensors) or PEFT adapter |
//!
//! [`Resolver::resolve`] turns a reference into a [`ResolvedModel`]: a directory holding a
//! transformers-style model folder (or a PEFT adapter, possibly with its merged model), plus where it
//! came from. When nothing matches, one [`ModelRefError::NotFound`] lists every form tried and why
//! it did not apply.
//!
//! This module sits below `exec` (it reads the cache, run records and the Hub, never plans or runs
//! anything) and knows nothing about candle: loading the weights is `model::weights`' job.

use crate::artifact::{layout, ArtifactKind, Manifest};
use crate::cache::Cache;
use crate::hub::{HubError, HubOptions, HubUri, RepoType};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a resolved model came from (recorded in model cards and messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A stage of the recipe in context.
    Stage {
        /// The stage name.
        stage: String,
        /// Its key (cache object).
        key: String,
    },
    /// A stage of a past run.
    Run {
        /// The run's id (directory name).
        run: String,
        /// The run directory.
        run_dir: PathBuf,
        /// The stage name.
        stage: String,
        /// Its key (cache object).
        key: String,
    },
    /// A local folder.
    Folder(PathBuf),
    /// A Hub model repository at a commit.
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The commit it resolved to.
        commit: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Stage { stage, key } => write!(f, "stage '{stage}' (key {key})"),
            Origin::Run { run, stage, key, .. } => write!(f, "stage '{stage}' of run {run} (key {key})"),
            Origin::Folder(p) => write!(f, "folder {}", p.display()),
            Origin::Hub { repo_id, revision, commit } => write!(f, "hf://{repo_id}@{revision} (commit {commit})"),
        }
    }
}

/// A model reference resolved to files on disk.
#[derive(Clone, Debug)]
pub struct ResolvedModel {
    /// The reference as the user wrote it.
    pub reference: String,
    /// Where it came from.
    pub origin: Origin,
    /// The folder: `config.json` + `model.safetensors` (or shards), or a PEFT adapter
    /// (`adapter_config.json` + `adapter_model.safetensors`, with the merged model beside it when the
    /// lora stage had `merge = true`), plus tokenizer files when known.
    pub dir: PathBuf,
    /// [`ArtifactKind::Model`], [`ArtifactKind::Adapter`] or [`ArtifactKind::RewardModel`].
    pub kind: ArtifactKind,
    /// The cache manifest, for stage and run references (metrics, producing stage kind).
    pub manifest: Option<Manifest>,
}

impl ResolvedModel {
    /// Whether the folder holds full model weights (a model, or an adapter with its merged model).
    pub fn has_full_model(&self) -> bool {
        has_weights(&self.dir)
    }

    /// The folder of a model that generates text (for chat, serve, GGUF and Ollama; `purpose`
    /// says which): a reward model is refused, since it has a score head instead of an LM head.
    pub fn text_model_dir(&self, purpose: &str) -> Result<&Path, ModelRefError> {
        if self.kind == ArtifactKind::RewardModel {
            return Err(ModelRefError::RewardModel {
                reference: self.reference.clone(),
                origin: self.origin.to_string(),
                purpose: purpose.to_string(),
            });
        }
        self.full_model_dir()
    }

    /// The folder of the full model, or an error that says how to get one.
    pub fn full_model_dir(&self) -> Result<&Path, ModelRefError> {
        if self.has_full_model() {
            Ok(&self.dir)
        } else {
            Err(ModelRefError::AdapterOnly { reference: self.reference.clone(), origin: self.origin.to_string() })
        }
    }
}

/// Why a reference could not be resolved. Each message is one line naming the model and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelRefError {
    /// No form matched; `tried` says why each did not.
    #[error("model '{reference}' not found; tried {}", tried.iter().map(|(form, why)| format!("{form}: {why}")).collect::<Vec<_>>().join("; "))]
    NotFound {
        /// The reference.
        reference: String,
        /// (form, why it did not apply), in the order tried.
        tried: Vec<(String, String)>,
    },
    /// The reference named something that exists but is not usable as a model.
    #[error("model '{reference}': {problem}; {fix}")]
    Unusable {
        /// The reference.
        reference: String,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// Only pickled weights (`*.bin`, `*.pth`): mmrun never unpickles.
    #[error("model '{reference}': only pickled weights ({files}); mmrun reads safetensors only, because unpickling can run arbitrary code; convert with `python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('<dir>').save_pretrained('<out>', safe_serialization=True)\"`")]
    Pickled {
        /// The reference.
        reference: String,
        /// The pickled files found.
        files: String,
    },
    /// An adapter without a merged model where a full model is needed.
    #[error("model '{reference}' ({origin}) is a LoRA adapter without a merged model; set `merge = true` on that lora stage and rerun, or use its base model")]
    AdapterOnly {
        /// The reference.
        reference: String,
        /// Where it came from.
        origin: String,
    },
    /// A reward model where a model that generates text is needed.
    #[error("model '{reference}' ({origin}) is a reward model (a scalar score head, no LM head), so it cannot be used to {purpose}; use the model it was trained from, or `mmrun export <model> --to hf` for its Qwen3ForSequenceClassification folder")]
    RewardModel {
        /// The reference.
        reference: String,
        /// Where it came from.
        origin: String,
        /// What it was asked for ("chat", "export to GGUF", …).
        purpose: String,
    },
    /// Fetching from the Hub failed (missing, gated, checksum, disk, network).
    #[error("model '{reference}': {source}")]
    Hub {
        /// The reference.
        reference: String,
        /// The Hub client's error.
        #[source]
        source: Box<HubError>,
    },
}

/// What a reference is resolved against. Every field is optional context: a form whose context is
/// missing is reported as "not available here" in [`ModelRefError::NotFound`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Resolver<'a> {
    /// The cache holding stage objects.
    pub cache: Option<&'a Cache>,
    /// The run records directory (for `<run>:<stage>`).
    pub runs_dir: Option<&'a Path>,
    /// The recipe in context: its path (for messages) and stage name -> key from its plan.
    pub recipe: Option<(&'a Path, &'a BTreeMap<String, String>)>,
    /// Relative folders resolve against this (default: the current directory).
    pub base_dir: Option<&'a Path>,
    /// Hub options (`None`: `hf://` references are not available).
    pub hub: Option<&'a HubOptions>,
}

/// Files of a model folder fetched from a Hub repository: configs, tokenizer, safetensors weights
/// and the chat template. Pickled weights and everything else are never downloaded.
const HUB_MODEL_PATTERNS: &[&str] = &["*.json", "*.safetensors", "*.jinja"];

impl Resolver<'_> {
    /// Resolve `reference` (see the module docs for the forms and their order).
    pub fn resolve(&self, reference: &str) -> Result<ResolvedModel, ModelRefError> {
        let reference = reference.trim();
        if reference.starts_with("hf://") {
            return self.resolve_hub(reference);
        }
        let mut tried = Vec::new();
        match self.recipe {
            Some((path, stages)) => match stages.get(reference) {
                Some(key) => return self.resolve_stage(reference, key, path),
                None => {
                    let names: Vec<&str> = stages.keys().map(String::as_str).collect();
                    tried.push((
                        format!("a stage of {}", path.display()),
                        format!("no stage '{reference}' (stages: {})", names.join(", ")),
                    ));
                }
            },
            None => tried.push((
                "a stage of this recipe".to_string(),
                "no recipe given (pass --recipe <file> to name its stages)".to_string(),
            )),
        }

        match reference.rsplit_once(':') {
            Some((run, stage)) => match self.resolve_run_stage(reference, run, stage) {
                Ok(m) => return Ok(m),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Skip(why)) => tried.push((format!("run '{run}', stage '{stage}'"), why)),
            },
            None => tried.push(("<run>:<stage>".to_string(), "no ':' in the reference".to_string())),
        }

        let folder = match self.base_dir {
            Some(b) if Path::new(reference).is_relative() => b.join(reference),
            _ => PathBuf::from(reference),
        };
        if folder.is_dir() {
            return self.resolve_folder(reference, &folder);
        }
        tried.push((format!("folder {}", folder.display()), "does not exist".to_string()));
        tried.push(("hf://<owner>/<name>[@rev]".to_string(), "the reference does not start with hf://".to_string()));
        Err(ModelRefError::NotFound { reference: reference.to_string(), tried })
    }

    fn resolve_folder(&self, reference: &str, dir: &Path) -> Result<ResolvedModel, ModelRefError> {
        let kind = if dir.join(layout::ADAPTER_CONFIG).is_file() {
            ArtifactKind::Adapter
        } else if dir.join(layout::MODEL_CONFIG_JSON).is_file() {
            model_kind(dir)
        } else {
            return Err(ModelRefError::Unusable {
                reference: reference.to_string(),
                problem: format!("folder {} has no config.json (nor adapter_config.json)", dir.display()),
                fix: "point at a transformers model folder (config.json + model.safetensors)".into(),
            });
        };
        check_weights(reference, dir, kind)?;
        let manifest = std::fs::read(dir.join(layout::MANIFEST)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        Ok(ResolvedModel {
            reference: reference.to_string(),
            origin: Origin::Folder(dir.to_path_buf()),
            dir: dir.to_path_buf(),
            kind,
            manifest,
        })
    }

    fn resolve_run_stage(&self, reference: &str, run: &str, stage: &str) -> Result<ResolvedModel, Attempt> {
        let runs_dir = self.runs_dir.ok_or_else(|| Attempt::Skip("no runs directory here".into()))?;
        let found = crate::runs::find_run(runs_dir, run).map_err(|e| Attempt::Skip(e.to_string()))?;
        let record = &found.record;
        let Some(st) = record.stages.iter().find(|s| s.name == stage) else {
            let names: Vec<&str> = record.stages.iter().map(|s| s.name.as_str()).collect();
            return Err(Attempt::Fatal(ModelRefError::Unusable {
                reference: reference.to_string(),
                problem: format!("run {} has no stage '{stage}'", record.id),
                fix: format!("its stages are: {}", names.join(", ")),
            }));
        };
        let art = self.object(reference, &st.key).map_err(Attempt::Fatal)?.ok_or_else(|| {
            Attempt::Fatal(ModelRefError::Unusable {
                reference: reference.to_string(),
                problem: format!(
                    "stage '{stage}' of run {} ({}) is not in the cache (key {})",
                    record.id,
                    st.status.as_str(),
                    st.key
                ),
                fix: format!("rebuild it with `mmrun resume {}` or by rerunning its recipe", record.id),
            })
        })?;
        let origin = Origin::Run {
            run: record.id.clone(),
            run_dir: found.dir.clone(),
            stage: stage.into(),
            key: st.key.clone(),
        };
        model_artifact(reference, origin, art).map_err(Attempt::Fatal)
    }

    fn resolve_stage(&self, reference: &str, key: &str, recipe: &Path) -> Result<ResolvedModel, ModelRefError> {
        let art = self.object(reference, key)?.ok_or_else(|| ModelRefError::Unusable {
            reference: reference.to_string(),
            problem: format!("stage '{reference}' of {} is not built yet", recipe.display()),
            fix: format!("run `mmrun {}` first", recipe.display()),
        })?;
        model_artifact(reference, Origin::Stage { stage: reference.into(), key: key.into() }, art)
    }

    fn object(&self, reference: &str, key: &str) -> Result<Option<crate::artifact::Artifact>, ModelRefError> {
        let cache = self.cache.ok_or_else(|| ModelRefError::Unusable {
            reference: reference.to_string(),
            problem: "no cache to read stage outputs from".into(),
            fix: "pass --home (or set MMRUN_HOME) to the cache the run used".into(),
        })?;
        Ok(cache.object(key))
    }

    fn resolve_hub(&self, reference: &str) -> Result<ResolvedModel, ModelRefError> {
        let unusable = |problem: String, fix: &str| ModelRefError::Unusable {
            reference: reference.to_string(),
            problem,
            fix: fix.to_string(),
        };
        let uri = HubUri::parse(reference).map_err(|e| unusable(e.to_string(), "write hf://<owner>/<name>[@<rev>]"))?;
        if uri.repo_type != RepoType::Model || !uri.path.is_empty() {
            return Err(unusable(
                "a model reference names a whole model repository".into(),
                "write hf://<owner>/<name>[@<rev>] without datasets/ or a file path",
            ));
        }
        let opts = self.hub.ok_or_else(|| unusable("Hub access is not available here".into(), "use a local folder"))?;
        let fetched = fetch_hub_model(&uri, opts).map_err(|e| match e {
            FetchError::Hub(source) => {
                ModelRefError::Hub { reference: reference.to_string(), source: Box::new(source) }
            }
            FetchError::Pickled(files) => ModelRefError::Pickled { reference: reference.to_string(), files },
        })?;
        let dir = fetched.dir;
        let kind = if dir.join(layout::MODEL_CONFIG_JSON).is_file() {
            model_kind(&dir)
        } else if dir.join(layout::ADAPTER_CONFIG).is_file() {
            ArtifactKind::Adapter
        } else {
            return Err(unusable(
                format!("repository {} has no config.json at commit {}", uri.repo_id, fetched.commit),
                "check that it is a transformers model repository",
            ));
        };
        Ok(ResolvedModel {
            reference: reference.to_string(),
            origin: Origin::Hub { repo_id: uri.repo_id.clone(), revision: fetched.revision, commit: fetched.commit },
            dir,
            kind,
            manifest: None,
        })
    }
}

enum Attempt {
    /// This form does not apply; try the next one.
    Skip(String),
    /// This form applies but the model is unusable: stop here.
    Fatal(ModelRefError),
}

fn model_artifact(
    reference: &str,
    origin: Origin,
    art: crate::artifact::Artifact,
) -> Result<ResolvedModel, ModelRefError> {
    let kind = art.kind();
    if !matches!(kind, ArtifactKind::Model | ArtifactKind::Adapter | ArtifactKind::RewardModel) {
        return Err(ModelRefError::Unusable {
            reference: reference.to_string(),
            problem: format!("{origin} produced {}, not a model", kind.describe()),
            fix: "name a stage that produces a model (pretrain, sft, lora, dpo, grpo, ppo, distill, reward_model)"
                .into(),
        });
    }
    Ok(ResolvedModel { reference: reference.to_string(), origin, dir: art.dir, kind, manifest: Some(art.manifest) })
}

/// A model folder's kind: a reward model when its config says so, else a causal LM.
fn model_kind(dir: &Path) -> ArtifactKind {
    if layout::is_reward_model(dir) {
        ArtifactKind::RewardModel
    } else {
        ArtifactKind::Model
    }
}

fn has_weights(dir: &Path) -> bool {
    dir.join(layout::MODEL_CONFIG_JSON).is_file()
        && (dir.join(layout::MODEL_WEIGHTS).is_file() || dir.join("model.safetensors.index.json").is_file())
}

/// Refuse folders whose weights are only pickled.
fn check_weights(reference: &str, dir: &Path, kind: ArtifactKind) -> Result<(), ModelRefError> {
    let weights = match kind {
        ArtifactKind::Adapter => dir.join(layout::ADAPTER_WEIGHTS).is_file() || has_weights(dir),
        _ => has_weights(dir),
    };
    if weights {
        return Ok(());
    }
    let pickled: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| crate::hub::names::is_pickled(n))
                .collect()
        })
        .unwrap_or_default();
    if !pickled.is_empty() {
        return Err(ModelRefError::Pickled { reference: reference.to_string(), files: pickled.join(", ") });
    }
    Err(ModelRefError::Unusable {
        reference: reference.to_string(),
        problem: format!("folder {} has no model.safetensors (nor model.safetensors.index.json)", dir.display()),
        fix: "point at a complete transformers model folder".into(),
    })
}

/// A Hub model repository in the HF cache.
#[derive(Clone, Debug)]
pub struct FetchedModel {
    /// `snapshots/<commit>/` in the HF cache.
    pub dir: PathBuf,
    /// The revision asked for.
    pub revision: String,
    /// The commit used.
    pub commit: String,
    /// Every fetched file (repository path, local path, size, sha256).
    pub files: Vec<crate::hub::FetchedFile>,
}

/// Why [`fetch_hub_model`] failed.
#[derive(Debug)]
pub enum FetchError {
    /// The Hub client's error.
    Hub(HubError),
    /// The repository has only pickled weights (their names).
    Pickled(String),
}

/// Fetch the model files of a Hub repository (configs, tokenizer, chat template, safetensors) at
/// one commit into the HF cache, verified.
pub fn fetch_hub_model(uri: &HubUri, opts: &HubOptions) -> Result<FetchedModel, FetchError> {
    let pattern_uri = |revision: Option<String>, pattern: &str| HubUri {
        repo_type: RepoType::Model,
        repo_id: uri.repo_id.clone(),
        revision,
        path: pattern.to_string(),
    };
    // The first pattern resolves the revision; the others are pinned to the same commit.
    let first = crate::hub::resolve_dataset(&pattern_uri(uri.revision.clone(), HUB_MODEL_PATTERNS[0]), None, opts)
        .map_err(FetchError::Hub)?;
    let commit = first.commit.clone();
    let mut files = first.files;
    for pattern in &HUB_MODEL_PATTERNS[1..] {
        match crate::hub::resolve_dataset(&pattern_uri(Some(commit.clone()), pattern), None, opts) {
            Ok(f) => files.extend(f.files),
            Err(HubError::FileNotFound { .. }) if *pattern == "*.safetensors" => {
                let listing = crate::hub::client::Client::new(uri, opts).list_files(&commit, "").unwrap_or_default();
                let pickled: Vec<String> =
                    listing.into_iter().map(|f| f.path).filter(|p| crate::hub::names::is_pickled(p)).collect();
                if !pickled.is_empty() {
                    return Err(FetchError::Pickled(pickled.join(", ")));
                }
            }
            Err(HubError::FileNotFound { .. }) => {}
            Err(e) => return Err(FetchError::Hub(e)),
        }
    }
    files.sort_by(|a, b| a.repo_path.cmp(&b.repo_path));
    let rc = crate::hub::cache::RepoCache::new(&opts.cache_dir, RepoType::Model, &uri.repo_id);
    // The commit came back from the client, which accepts only 40-hex ids.
    let dir = rc.snapshot_dir(&commit).map_err(|e| {
        FetchError::Hub(HubError::Io {
            dataset: uri.to_string(),
            source: crate::fs_error::IoError::new("creating a snapshot in", &opts.cache_dir, e),
        })
    })?;
    Ok(FetchedModel { dir, revision: uri.revision_or_main().to_string(), commit, files })
}

#[cfg(test)]
mod tests;
