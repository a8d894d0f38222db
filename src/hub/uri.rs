//! `hf://` dataset and model URIs.

use std::fmt;

/// Which kind of Hub repository a URI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RepoType {
    /// `hf://datasets/<owner>/<name>/...`
    Dataset,
    /// `hf://<owner>/<name>/...`
    Model,
}

impl RepoType {
    /// The path segment the Hub API uses (`datasets` / `models`).
    pub fn api_segment(self) -> &'static str {
        match self {
            RepoType::Dataset => "datasets",
            RepoType::Model => "models",
        }
    }
}

/// What a remote input of a recipe is used as. It decides which files of its URI are fetched
/// (`hub::fetched`) and which table of the lock file pins it. It lives with the URI because
/// stage kinds declare their remote inputs with it (`recipe::RemoteSource`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RemoteKind {
    /// `[datasets.<name>] source = "hf://datasets/…"`: the files the path or glob selects.
    Dataset,
    /// A tokenizer stage's `source = "hf://…"`: `tokenizer.json` and `tokenizer_config.json` of the
    /// folder the URI names, or the `.json` file it names and the config next to it. Nothing else
    /// of a model repository is downloaded.
    Tokenizer,
    /// A released model (`[models.<name>] source = "hf://…"`): the files the path selects, the
    /// whole repository when the path is empty.
    Model,
}

impl RemoteKind {
    /// Every kind, in lock-file order.
    pub const ALL: [RemoteKind; 3] = [RemoteKind::Dataset, RemoteKind::Tokenizer, RemoteKind::Model];

    /// `dataset`, `tokenizer`, `model` (for messages).
    pub fn noun(self) -> &'static str {
        match self {
            RemoteKind::Dataset => "dataset",
            RemoteKind::Tokenizer => "tokenizer",
            RemoteKind::Model => "model",
        }
    }
}

/// A parsed `hf://[datasets/]<owner>/<name>[@<revision>]/<path-or-glob>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HubUri {
    /// Dataset or model repository.
    pub repo_type: RepoType,
    /// `owner/name`.
    pub repo_id: String,
    /// Branch, tag or commit; `None` means `main`. `%2F` in the URI decodes to `/`
    /// (as in `@refs%2Fconvert%2Fparquet`).
    pub revision: Option<String>,
    /// Path or glob inside the repository (may be empty: the whole repository).
    pub path: String,
}

/// Why an `hf://` URI was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid Hub URI '{uri}': {problem} (expected hf://datasets/<owner>/<name>[@<revision>]/<path-or-glob> or hf://<owner>/<name>[@<revision>]/<path>)")]
pub struct HubUriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong.
    pub problem: String,
}

impl HubUri {
    /// Parse an `hf://` URI.
    pub fn parse(uri: &str) -> Result<Self, HubUriError> {
        let err = |problem: &str| HubUriError { uri: uri.to_string(), problem: problem.to_string() };
        let rest = uri.strip_prefix("hf://").ok_or_else(|| err("it does not start with hf://"))?;
        let (repo_type, rest) = match rest.strip_prefix("datasets/") {
            Some(r) => (RepoType::Dataset, r),
            None => (RepoType::Model, rest.strip_prefix("models/").unwrap_or(rest)),
        };
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().unwrap_or_default();
        let name_rev = parts.next().ok_or_else(|| err("missing repository name after the owner"))?;
        let path = parts.next().unwrap_or_default().to_string();
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) => {
                if r.is_empty() {
                    return Err(err("empty revision after '@'"));
                }
                (n, Some(r.replace("%2F", "/").replace("%2f", "/")))
            }
            None => (name_rev, None),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !s.starts_with('.')
                && !s.contains("..")
        };
        if !valid(owner) {
            return Err(err(&format!("bad owner '{owner}' (letters, digits, '-', '_', '.')")));
        }
        if !valid(name) {
            return Err(err(&format!("bad repository name '{name}' (letters, digits, '-', '_', '.')")));
        }
        if let Some(rev) = &revision {
            super::names::revision(rev).map_err(|e| err(&e.to_string()))?;
        }
        if path.split('/').any(|seg| seg == "..") {
            return Err(err("the path may not contain '..'"));
        }
        if path.chars().any(char::is_control) || path.contains('\\') {
            return Err(err("the path may not contain a backslash, NUL or control character"));
        }
        Ok(Self { repo_type, repo_id: format!("{owner}/{name}"), revision, path })
    }

    /// The revision to resolve (`main` when none was given).
    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// Whether the path contains glob characters.
    pub fn is_glob(&self) -> bool {
        self.path.contains(['*', '?', '['])
    }
}

impl fmt::Display for HubUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.repo_type {
            RepoType::Dataset => "datasets/",
            RepoType::Model => "",
        };
        let rev = self.revision.as_ref().map(|r| format!("@{}", r.replace('/', "%2F"))).unwrap_or_default();
        write!(f, "hf://{prefix}{}{rev}/{}", self.repo_id, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dataset_with_revision_and_glob() {
        let u = HubUri::parse("hf://datasets/shibing624/medical@refs%2Fconvert%2Fparquet/finetune/*.parquet").unwrap();
        assert_eq!(u.repo_type, RepoType::Dataset);
        assert_eq!(u.repo_id, "shibing624/medical");
        assert_eq!(u.revision.as_deref(), Some("refs/convert/parquet"));
        assert_eq!(u.path, "finetune/*.parquet");
        assert!(u.is_glob());
        assert_eq!(u.to_string(), "hf://datasets/shibing624/medical@refs%2Fconvert%2Fparquet/finetune/*.parquet");
    }

    #[test]
    fn parses_model_repo_without_revision() {
        let u = HubUri::parse("hf://jingyaogong/MiniMind2/tokenizer.json").unwrap();
        assert_eq!(u.repo_type, RepoType::Model);
        assert_eq!(u.revision_or_main(), "main");
        assert!(!u.is_glob());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://x/y",
            "hf://datasets/owner",
            "hf://datasets/o/n@/f",
            "hf://datasets/o w/n/f",
            "hf://datasets/o/n/../x",
            "hf://datasets/o/n@..%2F..%2F..%2Fescape/x.jsonl",
            "hf://datasets/o/n@..%2f..%2fescape/x.jsonl",
            "hf://datasets/o/n@%2E%2E/x.jsonl",
            "hf://datasets/o/n@%2Fetc/x.jsonl",
            "hf://datasets/o/n@a\0b/x.jsonl",
            "hf://datasets/o/n/a\\..\\b",
            "hf://datasets/o/n/a\0b",
        ] {
            assert!(HubUri::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
