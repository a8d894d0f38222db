//! Lock files: `recipes/x.toml` → `recipes/x.lock` pins, for every `hf://` dataset, the commit, the
//! file list, sizes and sha256s that a run used. Later runs fetch exactly that (even if the branch
//! moved); [`check_moved`] says when a branch has moved on, and [`update`] re-resolves.
//!
//! The lock never contains the access token (only URIs, commits, paths, sizes and hashes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{resolve_dataset, FetchedDataset, HubError, HubOptions, HubUri};
use crate::hub::client::Client;

/// Current lock format version.
pub const LOCK_VERSION: u32 = 1;

/// One pinned file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedFile {
    /// Path inside the repository.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the content.
    pub sha256: String,
}

/// One pinned `hf://` dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedDataset {
    /// The URI as written in the recipe (an entry whose URI differs from the recipe's is ignored).
    pub uri: String,
    /// The branch/tag/commit the URI names (`main` when none).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// The files used, sorted by path.
    pub files: Vec<LockedFile>,
}

impl LockedDataset {
    /// Check every name that becomes a path in the HF cache: the commit, each file's path and
    /// sha256. A lock is a file in the user's repository and may have been edited by hand.
    pub fn validate(&self) -> Result<(), super::names::UnsafeName> {
        super::names::commit(&self.commit)?;
        for f in &self.files {
            super::names::repo_path(&f.path)?;
            super::names::sha256(&f.sha256)?;
        }
        Ok(())
    }
}

/// The whole `recipes/x.lock`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Format version ([`LOCK_VERSION`]).
    pub version: u32,
    /// Dataset name in the recipe → what it was pinned to.
    #[serde(default)]
    pub datasets: BTreeMap<String, LockedDataset>,
}

/// Why a lock could not be read, written or updated.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Reading the lock or recipe failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The lock or recipe is not valid TOML of the expected shape.
    #[error("{path} is malformed: {reason}; fix it, or delete the lock and run `mmrun update` to regenerate it")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Writing the lock failed.
    #[error("cannot write {path}: {source}; check permissions next to the recipe")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `mmrun update recipe <dataset>` named no `hf://` dataset of the recipe.
    #[error("{recipe}: no Hub dataset named '{name}' (Hub datasets here: {known}); use one of those names")]
    UnknownDataset {
        /// The recipe.
        recipe: PathBuf,
        /// The name given.
        name: String,
        /// The `hf://` dataset names of the recipe.
        known: String,
    },
    /// A dataset's source is not a valid `hf://` URI.
    #[error("{recipe}: dataset {name}: {source}")]
    BadUri {
        /// The recipe.
        recipe: PathBuf,
        /// The dataset name.
        name: String,
        /// The parse error.
        source: super::uri::HubUriError,
    },
    /// Fetching failed.
    #[error("dataset {name}: {source}")]
    Hub {
        /// The dataset name.
        name: String,
        /// The Hub error (boxed: it is large and errors are rare).
        source: Box<HubError>,
    },
}

/// `recipes/x.toml` → `recipes/x.lock`.
pub fn lock_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

impl LockFile {
    /// Read a lock; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, LockError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LockError::Read { path: path.into(), source: e }),
        };
        let lock: LockFile =
            toml::from_str(&text).map_err(|e| LockError::Parse { path: path.into(), reason: e.to_string() })?;
        if lock.version != LOCK_VERSION {
            return Err(LockError::Parse {
                path: path.into(),
                reason: format!("lock version {} is not the supported {LOCK_VERSION}", lock.version),
            });
        }
        for (name, l) in &lock.datasets {
            l.validate().map_err(|e| LockError::Parse { path: path.into(), reason: format!("dataset {name}: {e}") })?;
        }
        Ok(Some(lock))
    }

    /// Write the lock atomically and durably ([`crate::durable::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), LockError> {
        let body =
            toml::to_string_pretty(self).map_err(|e| LockError::Parse { path: path.into(), reason: e.to_string() })?;
        let text = format!(
            "# mmrun lock file: the exact Hugging Face Hub data this recipe used (commits, files, sizes, sha256).\n\
             # Commit it next to the recipe. `mmrun update <recipe> [dataset]` re-resolves branches.\n{body}"
        );
        crate::durable::write_atomic(path, text.as_bytes())
            .map_err(|e| LockError::Write { path: path.into(), source: e })
    }
}

/// Fetch dataset `name` (`uri`) of `recipe`, using and maintaining `recipe`'s lock: a locked entry
/// for the same URI is fetched exactly; otherwise the URI is resolved and the entry is written.
pub fn fetch_locked(recipe: &Path, name: &str, uri: &HubUri, opts: &HubOptions) -> Result<FetchedDataset, LockError> {
    let path = lock_path(recipe);
    let lock = LockFile::load(&path)?.unwrap_or(LockFile { version: LOCK_VERSION, datasets: BTreeMap::new() });
    let entry = lock.datasets.get(name).filter(|l| l.uri == uri.to_string());
    let fetched =
        resolve_dataset(uri, entry, opts).map_err(|e| LockError::Hub { name: name.into(), source: Box::new(e) })?;
    let locked = fetched.to_locked();
    if entry != Some(&locked) {
        // Re-read just before writing so datasets fetched by a concurrent call are kept.
        let mut fresh = LockFile::load(&path)?.unwrap_or(lock);
        fresh.datasets.insert(name.to_string(), locked);
        fresh.save(&path)?;
    }
    Ok(fetched)
}

/// A branch or tag that now points at a different commit than the lock pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchMoved {
    /// Dataset name in the recipe.
    pub dataset: String,
    /// `owner/name`.
    pub repo_id: String,
    /// The branch or tag.
    pub revision: String,
    /// The locked commit.
    pub locked: String,
    /// Where the branch points now.
    pub now: String,
    /// The recipe path (for the suggested command).
    pub recipe: PathBuf,
}

impl std::fmt::Display for BranchMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dataset {}: branch {} of {} has moved: locked {}, now {} — run `mmrun update {} {}` to use it",
            self.dataset,
            self.revision,
            self.repo_id,
            short(&self.locked),
            short(&self.now),
            self.recipe.display(),
            self.dataset
        )
    }
}

fn short(c: &str) -> &str {
    &c[..c.len().min(12)]
}

/// Whether the branch/tag of locked dataset `name` still points at the locked commit. `Ok(None)`
/// when it does, when the revision is a commit id, or when offline.
pub fn check_moved(
    recipe: &Path,
    name: &str,
    locked: &LockedDataset,
    opts: &HubOptions,
) -> Result<Option<BranchMoved>, LockError> {
    if opts.offline || super::names::is_commit_id(&locked.revision) {
        return Ok(None);
    }
    let uri = HubUri::parse(&locked.uri).map_err(|e| LockError::BadUri {
        recipe: recipe.into(),
        name: name.into(),
        source: e,
    })?;
    let now = Client::new(&uri, opts)
        .resolve_revision(&locked.revision)
        .map_err(|e| LockError::Hub { name: name.into(), source: Box::new(e) })?;
    Ok((now != locked.commit).then(|| BranchMoved {
        dataset: name.into(),
        repo_id: uri.repo_id.clone(),
        revision: locked.revision.clone(),
        locked: locked.commit.clone(),
        now,
        recipe: recipe.into(),
    }))
}

/// [`check_moved`] for every locked dataset of `recipe` (for `mmrun plan`).
pub fn check_recipe(recipe: &Path, opts: &HubOptions) -> Result<Vec<BranchMoved>, LockError> {
    let Some(lock) = LockFile::load(&lock_path(recipe))? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (name, l) in &lock.datasets {
        if let Some(m) = check_moved(recipe, name, l, opts)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// The `hf://` datasets of a recipe (name → URI), read straight from its TOML so this works
/// without the full recipe loader.
pub fn recipe_hub_datasets(recipe: &Path) -> Result<BTreeMap<String, HubUri>, LockError> {
    let text = std::fs::read_to_string(recipe).map_err(|e| LockError::Read { path: recipe.into(), source: e })?;
    let v: toml::Table =
        toml::from_str(&text).map_err(|e| LockError::Parse { path: recipe.into(), reason: e.to_string() })?;
    let mut out = BTreeMap::new();
    if let Some(ds) = v.get("datasets").and_then(|d| d.as_table()) {
        for (name, spec) in ds {
            if let Some(src) = spec.get("source").and_then(|s| s.as_str()).filter(|s| s.starts_with("hf://")) {
                let uri = HubUri::parse(src).map_err(|e| LockError::BadUri {
                    recipe: recipe.into(),
                    name: name.clone(),
                    source: e,
                })?;
                out.insert(name.clone(), uri);
            }
        }
    }
    Ok(out)
}

/// `mmrun update <recipe> [dataset]` with options from the environment.
pub fn update(recipe: &Path, dataset: Option<&str>) -> Result<LockFile, LockError> {
    update_with(recipe, dataset, &HubOptions::from_env())
}

/// Re-resolve the `hf://` datasets of `recipe` (all, or only `dataset`) to their branches' current
/// commits, fetch them, and rewrite the lock. Entries of datasets no longer in the recipe are dropped.
pub fn update_with(recipe: &Path, dataset: Option<&str>, opts: &HubOptions) -> Result<LockFile, LockError> {
    let hub = recipe_hub_datasets(recipe)?;
    if let Some(n) = dataset {
        if !hub.contains_key(n) {
            return Err(LockError::UnknownDataset {
                recipe: recipe.into(),
                name: n.into(),
                known: if hub.is_empty() { "none".into() } else { hub.keys().cloned().collect::<Vec<_>>().join(", ") },
            });
        }
    }
    let path = lock_path(recipe);
    let mut lock = LockFile::load(&path)?.unwrap_or(LockFile { version: LOCK_VERSION, datasets: BTreeMap::new() });
    lock.datasets.retain(|k, _| hub.contains_key(k));
    for (name, uri) in &hub {
        if dataset.is_some_and(|d| d != name) {
            continue;
        }
        let fetched =
            resolve_dataset(uri, None, opts).map_err(|e| LockError::Hub { name: name.clone(), source: Box::new(e) })?;
        lock.datasets.insert(name.clone(), fetched.to_locked());
    }
    lock.save(&path)?;
    Ok(lock)
}

/// Datasets fetched through [`fetch_recipe`] in this process, by URI, so that the data layer's
/// `hf://` resolution ([`super::fetch_for_data`]) uses exactly the locked files.
fn session() -> &'static std::sync::Mutex<BTreeMap<String, FetchedDataset>> {
    static S: std::sync::OnceLock<std::sync::Mutex<BTreeMap<String, FetchedDataset>>> = std::sync::OnceLock::new();
    S.get_or_init(Default::default)
}

/// The dataset fetched for `uri` by [`fetch_recipe`] earlier in this process, if any.
pub fn session_lookup(uri: &str) -> Option<FetchedDataset> {
    session().lock().unwrap_or_else(|p| p.into_inner()).get(uri).cloned()
}

/// Fetch every `hf://` dataset of a loaded recipe through its lock (`recipe.lock` next to
/// `recipe`, written or extended on first use), and remember the results for this process so that
/// `data::resolve` sees the locked files. The engine calls this once per run, before resolving
/// datasets. Returns name → fetched dataset (commit, files, sha256s) for the run record.
pub fn fetch_recipe(
    recipe: &Path,
    datasets: &BTreeMap<String, crate::data::spec::DatasetSpec>,
    opts: &HubOptions,
) -> Result<BTreeMap<String, FetchedDataset>, LockError> {
    let mut out = BTreeMap::new();
    for (name, spec) in datasets {
        let src = spec.source.trim();
        if !src.starts_with("hf://") {
            continue;
        }
        let uri = HubUri::parse(src).map_err(|e| LockError::BadUri {
            recipe: recipe.into(),
            name: name.clone(),
            source: e,
        })?;
        let fetched = fetch_locked(recipe, name, &uri, opts)?;
        session().lock().unwrap_or_else(|p| p.into_inner()).insert(uri.to_string(), fetched.clone());
        out.insert(name.clone(), fetched);
    }
    Ok(out)
}
