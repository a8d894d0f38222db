//! Lock files: `recipes/x.toml` → `recipes/x.lock` pins, for every `hf://` input of the recipe
//! (datasets, adopted tokenizers, released models), the commit, the file list, sizes and sha256s
//! that a run used. [`fetch_all`] fetches exactly that (even if the branch moved) and pins what is
//! not pinned yet; [`check_moved`] says when a branch has moved on, and [`update`] re-resolves.
//!
//! The lock never contains the access token (only URIs, commits, paths, sizes and hashes).

use crate::fs_error::IoError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{resolve, Fetched, FetchedRepo, HubError, HubOptions, HubUri, RemoteId, RemoteInput, RemoteKind};
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

/// One pinned `hf://` input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedRepo {
    /// The URI as written in the recipe (an entry whose URI differs from the recipe's is ignored).
    pub uri: String,
    /// The branch/tag/commit the URI names (`main` when none).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// The files used, sorted by path.
    pub files: Vec<LockedFile>,
}

impl LockedRepo {
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

/// The whole `recipes/x.lock`: one table per [`RemoteKind`], name in the recipe → pinned input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Format version ([`LOCK_VERSION`]).
    pub version: u32,
    /// `[datasets.<name>]`.
    #[serde(default)]
    pub datasets: BTreeMap<String, LockedRepo>,
    /// Tokenizer stages adopting an `hf://` source, by stage name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokenizers: BTreeMap<String, LockedRepo>,
    /// `[models.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, LockedRepo>,
}

/// Why a lock could not be read, written or updated.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Reading the lock or recipe failed.
    #[error(transparent)]
    Read(IoError),
    /// The lock or recipe is not valid TOML of the expected shape.
    #[error("{path} is malformed: {reason}; fix it, or delete the lock and run `mmrun update` to regenerate it")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Writing the lock failed.
    #[error("{0}; check permissions next to the recipe")]
    Write(IoError),
    /// `mmrun update recipe <name>` named no `hf://` input of the recipe.
    #[error("{recipe}: no Hub input named '{name}' (Hub inputs here: {known}); use one of those names")]
    UnknownInput {
        /// The recipe.
        recipe: PathBuf,
        /// The name given.
        name: String,
        /// The names of the recipe's `hf://` inputs.
        known: String,
    },
    /// Fetching failed.
    #[error("{id}: {source}")]
    Hub {
        /// The input.
        id: RemoteId,
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
            Err(e) => return Err(LockError::Read(IoError::new("reading", path, e))),
        };
        let lock: LockFile =
            toml::from_str(&text).map_err(|e| LockError::Parse { path: path.into(), reason: e.to_string() })?;
        if lock.version != LOCK_VERSION {
            return Err(LockError::Parse {
                path: path.into(),
                reason: format!("lock version {} is not the supported {LOCK_VERSION}", lock.version),
            });
        }
        for kind in RemoteKind::ALL {
            for (name, l) in lock.table(kind) {
                l.validate().map_err(|e| LockError::Parse {
                    path: path.into(),
                    reason: format!("{}: {e}", RemoteId::new(kind, name.clone())),
                })?;
            }
        }
        Ok(Some(lock))
    }

    /// The table pinning inputs of `kind`.
    pub fn table(&self, kind: RemoteKind) -> &BTreeMap<String, LockedRepo> {
        match kind {
            RemoteKind::Dataset => &self.datasets,
            RemoteKind::Tokenizer => &self.tokenizers,
            RemoteKind::Model => &self.models,
        }
    }

    /// [`Self::table`], mutably.
    pub fn table_mut(&mut self, kind: RemoteKind) -> &mut BTreeMap<String, LockedRepo> {
        match kind {
            RemoteKind::Dataset => &mut self.datasets,
            RemoteKind::Tokenizer => &mut self.tokenizers,
            RemoteKind::Model => &mut self.models,
        }
    }

    /// The entry pinning `input`, if it pins the same URI (an edited URI is a new input).
    pub fn entry(&self, input: &RemoteInput) -> Option<&LockedRepo> {
        self.table(input.id.kind).get(&input.id.name).filter(|l| l.uri == input.uri.to_string())
    }

    /// Write the lock atomically and durably ([`crate::durable::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), LockError> {
        let body =
            toml::to_string_pretty(self).map_err(|e| LockError::Parse { path: path.into(), reason: e.to_string() })?;
        let text = format!(
            "# mmrun lock file: the exact Hugging Face Hub files this recipe used (commits, files, sizes, sha256).\n\
             # Commit it next to the recipe. `mmrun update <recipe> [name]` re-resolves branches.\n{body}"
        );
        crate::durable::write_atomic(path, text.as_bytes())
            .map_err(|e| LockError::Write(IoError::new("writing", path, e)))
    }
}

fn load_or_new(path: &Path) -> Result<LockFile, LockError> {
    Ok(LockFile::load(path)?.unwrap_or(LockFile { version: LOCK_VERSION, ..Default::default() }))
}

/// Resolve every remote input of `recipe` through its lock into one [`Fetched`] map: a locked entry
/// for the same URI is fetched exactly (from the HF cache alone when it is there, so this works
/// offline), anything else is resolved now and pinned. The lock is written once, only if it changed.
pub fn fetch_all(recipe: &Path, inputs: &[RemoteInput], opts: &HubOptions) -> Result<Fetched, LockError> {
    let path = lock_path(recipe);
    let lock = load_or_new(&path)?;
    let mut fetched = Fetched::default();
    let mut pinned = Vec::new();
    for input in inputs {
        let entry = lock.entry(input);
        let repo = resolve(&input.uri, input.id.kind, entry, opts)
            .map_err(|e| LockError::Hub { id: input.id.clone(), source: Box::new(e) })?;
        let locked = repo.to_locked();
        if entry != Some(&locked) {
            pinned.push((input.id.clone(), locked));
        }
        fetched.insert(input.id.clone(), repo);
    }
    if !pinned.is_empty() {
        // Re-read just before writing so entries pinned by a concurrent run are kept.
        let mut fresh = load_or_new(&path)?;
        for (id, locked) in pinned {
            fresh.table_mut(id.kind).insert(id.name, locked);
        }
        fresh.save(&path)?;
    }
    Ok(fetched)
}

/// [`fetch_all`] for the single dataset `name`.
pub fn fetch_locked(recipe: &Path, name: &str, uri: &HubUri, opts: &HubOptions) -> Result<FetchedRepo, LockError> {
    let input = RemoteInput { id: RemoteId::new(RemoteKind::Dataset, name), uri: uri.clone() };
    let mut all = fetch_all(recipe, std::slice::from_ref(&input), opts)?;
    Ok(all.remove(&input.id).expect("fetch_all returns every input"))
}

/// A branch or tag that now points at a different commit than the lock pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchMoved {
    /// The input of the recipe.
    pub id: RemoteId,
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
            "{}: branch {} of {} has moved: locked {}, now {}; this recipe keeps using the locked commit \
             until you run `mmrun update {} {}`",
            self.id,
            self.revision,
            self.repo_id,
            short(&self.locked),
            short(&self.now),
            self.recipe.display(),
            self.id.name
        )
    }
}

fn short(c: &str) -> &str {
    &c[..c.len().min(12)]
}

/// Whether the branch/tag of locked input `id` still points at the locked commit. `Ok(None)` when
/// it does, when the revision is a commit id, or when offline. One small request per input.
pub fn check_moved(
    recipe: &Path,
    id: &RemoteId,
    locked: &LockedRepo,
    opts: &HubOptions,
) -> Result<Option<BranchMoved>, LockError> {
    if opts.offline || super::names::is_commit_id(&locked.revision) {
        return Ok(None);
    }
    let uri = HubUri::parse(&locked.uri)
        .map_err(|e| LockError::Parse { path: lock_path(recipe), reason: format!("{id}: {e}") })?;
    let now = Client::new(&uri, opts)
        .resolve_revision(&locked.revision)
        .map_err(|e| LockError::Hub { id: id.clone(), source: Box::new(e) })?;
    Ok((now != locked.commit).then(|| BranchMoved {
        id: id.clone(),
        repo_id: uri.repo_id.clone(),
        revision: locked.revision.clone(),
        locked: locked.commit.clone(),
        now,
        recipe: recipe.into(),
    }))
}

/// [`check_moved`] for every locked input of `recipe` (for `mmrun plan`).
pub fn check_recipe(recipe: &Path, opts: &HubOptions) -> Result<Vec<BranchMoved>, LockError> {
    let Some(lock) = LockFile::load(&lock_path(recipe))? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for kind in RemoteKind::ALL {
        for (name, l) in lock.table(kind) {
            if let Some(m) = check_moved(recipe, &RemoteId::new(kind, name.clone()), l, opts)? {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// `mmrun update <recipe> [name]` with options from the environment.
pub fn update(recipe: &Path, inputs: &[RemoteInput], only: Option<&str>) -> Result<LockFile, LockError> {
    update_with(recipe, inputs, only, &HubOptions::from_env())
}

/// Re-resolve the remote `inputs` of `recipe` (all, or only those named `only`) to their branches'
/// current commits, fetch them, and rewrite the lock. Entries of inputs no longer in the recipe are
/// dropped.
pub fn update_with(
    recipe: &Path,
    inputs: &[RemoteInput],
    only: Option<&str>,
    opts: &HubOptions,
) -> Result<LockFile, LockError> {
    if let Some(n) = only {
        if !inputs.iter().any(|i| i.id.name == n) {
            let known: Vec<String> = inputs.iter().map(|i| i.id.to_string()).collect();
            return Err(LockError::UnknownInput {
                recipe: recipe.into(),
                name: n.into(),
                known: if known.is_empty() { "none".into() } else { known.join(", ") },
            });
        }
    }
    let path = lock_path(recipe);
    let mut lock = load_or_new(&path)?;
    for kind in RemoteKind::ALL {
        lock.table_mut(kind).retain(|name, _| inputs.iter().any(|i| i.id.kind == kind && &i.id.name == name));
    }
    for input in inputs.iter().filter(|i| only.is_none_or(|n| n == i.id.name)) {
        let repo = resolve(&input.uri, input.id.kind, None, opts)
            .map_err(|e| LockError::Hub { id: input.id.clone(), source: Box::new(e) })?;
        lock.table_mut(input.id.kind).insert(input.id.name.clone(), repo.to_locked());
    }
    lock.save(&path)?;
    Ok(lock)
}
