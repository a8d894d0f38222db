//! The recipe's remote inputs, resolved once per run and handed down explicitly.
//!
//! Before planning, `exec` lists every `hf://` source of the recipe as a [`RemoteInput`] (a
//! dataset, a tokenizer stage's `source`, a `[models.<name>]`), and [`super::lock::fetch_all`] resolves them
//! through the recipe's lock into one [`Fetched`] map. The planner keys stages by the fetched
//! content (sha256s, never the URI string), data resolution reads the fetched local files, and
//! stages adopt them. There is no process-wide state: what a run uses is exactly what this map
//! holds, so a branch that moves upstream changes nothing until `mmrun update` rewrites the lock.

use std::collections::BTreeMap;
use std::fmt;

use super::{FetchedFile, FetchedRepo, HubUri, RemoteKind};

impl RemoteKind {
    /// Whether repository file `path` belongs to this input, for the URI's path `pattern`.
    pub fn selects(self, pattern: &str, path: &str) -> bool {
        match self {
            RemoteKind::Dataset => super::path_matches(pattern, path),
            // What loading needs: configs, tokenizer files, chat templates and safetensors; never
            // pickled weights, which mmrun refuses to load anyway.
            RemoteKind::Model => {
                super::path_matches(pattern, path)
                    && [".json", ".safetensors", ".jinja"].iter().any(|x| path.ends_with(x))
            }
            RemoteKind::Tokenizer => {
                let pattern = pattern.trim_matches('/');
                let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
                let (pdir, pfile) = pattern.rsplit_once('/').unwrap_or(("", pattern));
                if pfile.ends_with(".json") {
                    path == pattern || (dir == pdir && file == TOKENIZER_CONFIG)
                } else {
                    dir == pattern && (file == TOKENIZER || file == TOKENIZER_CONFIG)
                }
            }
        }
    }
}

const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// One remote input of a recipe: its kind and the name the recipe gives it (the dataset's name,
/// the tokenizer stage's name, the model's name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteId {
    /// What it is used as.
    pub kind: RemoteKind,
    /// Its name in the recipe.
    pub name: String,
}

impl RemoteId {
    /// A remote input called `name` of kind `kind`.
    pub fn new(kind: RemoteKind, name: impl Into<String>) -> Self {
        Self { kind, name: name.into() }
    }
}

impl fmt::Display for RemoteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.name)
    }
}

/// A remote input to resolve: who names it, and the URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteInput {
    /// Kind and name.
    pub id: RemoteId,
    /// The parsed `hf://` URI.
    pub uri: HubUri,
}

/// Every remote input of a run, resolved: local files in the HF cache with their commit and
/// sha256s. Built once by [`super::lock::fetch_all`] and passed down by reference.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched(BTreeMap<RemoteId, FetchedRepo>);

impl Fetched {
    /// What input `name` of `kind` resolved to.
    pub fn get(&self, kind: RemoteKind, name: &str) -> Option<&FetchedRepo> {
        self.0.get(&RemoteId::new(kind, name))
    }

    /// Record what `id` resolved to.
    pub fn insert(&mut self, id: RemoteId, repo: FetchedRepo) {
        self.0.insert(id, repo);
    }

    /// Take what `id` resolved to out of the map.
    pub fn remove(&mut self, id: &RemoteId) -> Option<FetchedRepo> {
        self.0.remove(id)
    }

    /// Every entry, ordered by kind then name.
    pub fn iter(&self) -> impl Iterator<Item = (&RemoteId, &FetchedRepo)> {
        self.0.iter()
    }

    /// Whether nothing remote was fetched.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FetchedRepo {
    /// The fetched file whose repository path ends in `/<name>` (or is `name`).
    pub fn file_named(&self, name: &str) -> Option<&FetchedFile> {
        self.files.iter().find(|f| f.repo_path.rsplit('/').next() == Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_selects_only_the_tokenizer_files() {
        let t = RemoteKind::Tokenizer;
        for (pattern, yes, no) in [
            ("", &["tokenizer.json", "tokenizer_config.json"][..], &["model.safetensors", "sub/tokenizer.json"][..]),
            ("tok", &["tok/tokenizer.json", "tok/tokenizer_config.json"], &["tokenizer.json", "tok/vocab.json"]),
            ("tok/tokenizer.json", &["tok/tokenizer.json", "tok/tokenizer_config.json"], &["tok/x.json"]),
            ("tok/custom.json", &["tok/custom.json", "tok/tokenizer_config.json"], &["tok/tokenizer.json"]),
        ] {
            for p in yes {
                assert!(t.selects(pattern, p), "{pattern}: {p}");
            }
            for p in no {
                assert!(!t.selects(pattern, p), "{pattern}: not {p}");
            }
        }
        assert!(RemoteKind::Dataset.selects("data/*.jsonl", "data/a.jsonl"));
        assert_eq!(RemoteId::new(RemoteKind::Tokenizer, "tok").to_string(), "tokenizer tok");
    }
}
