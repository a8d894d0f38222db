//! Names that arrive from the network, a lock file or a recipe, checked before any of them becomes
//! part of a file-system path.
//!
//! A commit id, a revision, a repository path or a blob name is joined under the HF cache
//! (`snapshots/<commit>/<path>`, `refs/<revision>`, `blobs/<name>`). A hostile or broken server (or
//! an edited lock file) could otherwise send `../..` as a commit or `data/../../../x` as a path and
//! make mmrun write, link or delete outside the cache. Every such name is validated where it enters
//! ([`commit`], [`repo_path`], [`revision`], [`blob_name`]) and every join goes through
//! [`join_under`], which refuses anything but plain relative components.

use std::path::{Component, Path, PathBuf};

/// A name that may not become a path, with what it was and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value} {problem}")]
pub struct UnsafeName {
    /// What the name is (`commit id`, `repository path`, …).
    pub what: &'static str,
    /// The name, quoted and escaped (control characters and NUL shown as escapes).
    pub value: String,
    /// Why it is refused.
    pub problem: String,
}

impl UnsafeName {
    fn new(what: &'static str, value: &str, problem: impl Into<String>) -> Self {
        // Cap what is echoed: a hostile name can be arbitrarily long.
        let shown: String = value.chars().take(200).collect();
        Self { what, value: format!("{shown:?}"), problem: problem.into() }
    }
}

impl From<UnsafeName> for std::io::Error {
    fn from(e: UnsafeName) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is a full commit id (40 lowercase hex digits).
pub fn is_commit_id(s: &str) -> bool {
    is_lower_hex(s, 40)
}

/// A commit id: exactly 40 lowercase hex digits.
pub fn commit(s: &str) -> Result<(), UnsafeName> {
    if is_commit_id(s) {
        Ok(())
    } else {
        Err(UnsafeName::new("commit id", s, "is not 40 lowercase hex digits"))
    }
}

/// A sha256 digest: 64 lowercase hex digits.
pub fn sha256(s: &str) -> Result<(), UnsafeName> {
    if is_lower_hex(s, 64) {
        Ok(())
    } else {
        Err(UnsafeName::new("sha256", s, "is not 64 lowercase hex digits"))
    }
}

/// A blob file name: a git blob id (40 hex) or an LFS sha256 (64 hex).
pub fn blob_name(s: &str) -> Result<(), UnsafeName> {
    if is_lower_hex(s, 40) || is_lower_hex(s, 64) {
        Ok(())
    } else {
        Err(UnsafeName::new("blob id", s, "is neither a 40-hex git blob id nor a 64-hex sha256"))
    }
}

/// A path inside a repository: relative, `/`-separated, no empty, `.` or `..` segment, no
/// backslash, no NUL or other control character, no drive prefix (`C:`).
pub fn repo_path(s: &str) -> Result<(), UnsafeName> {
    let bad = |problem: &str| Err(UnsafeName::new("repository path", s, problem));
    if s.is_empty() {
        return bad("is empty");
    }
    if s.len() > 4096 {
        return bad("is longer than 4096 bytes");
    }
    if s.chars().any(char::is_control) {
        return bad("contains a NUL or control character");
    }
    if s.contains('\\') {
        return bad("contains a backslash");
    }
    if s.starts_with('/') {
        return bad("is absolute");
    }
    let b = s.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return bad("starts with a drive letter");
    }
    for seg in s.split('/') {
        match seg {
            "" => return bad("has an empty segment ('//' or a trailing '/')"),
            "." | ".." => return bad("has a '.' or '..' segment"),
            _ => {}
        }
    }
    Ok(())
}

/// A branch, tag or commit as written after `@` (with `%2F` already decoded to `/`): the rules of
/// `git check-ref-format` plus no `%` (only `/` may be percent-encoded), so that `refs/<revision>`
/// stays inside the cache.
pub fn revision(s: &str) -> Result<(), UnsafeName> {
    let bad = |problem: &str| Err(UnsafeName::new("revision", s, problem));
    if s.is_empty() {
        return bad("is empty");
    }
    if s.len() > 255 {
        return bad("is longer than 255 bytes");
    }
    if s.chars().any(|c| c.is_control() || c == ' ') {
        return bad("contains a space, NUL or control character");
    }
    if let Some(c) = s.chars().find(|c| "~^:?*[\\%".contains(*c)) {
        return bad(&format!("contains '{c}' (only '/' may be written percent-encoded, as %2F)"));
    }
    if s.contains("..") || s.contains("@{") || s == "@" {
        return bad("contains '..' or '@{'");
    }
    for seg in s.split('/') {
        if seg.is_empty() {
            return bad("has an empty segment (a leading, trailing or doubled '/')");
        }
        if seg.starts_with('.') || seg.ends_with(".lock") {
            return bad("has a segment starting with '.' or ending with '.lock'");
        }
    }
    Ok(())
}

/// `root.join(rel)`, where `rel` must consist of plain components only (no root, prefix, `.` or
/// `..`), so the result is always below `root`. `rel` is one or more names already checked by the
/// validators above; this is the last line of defence at every join.
pub fn join_under(root: &Path, rel: &str) -> Result<PathBuf, UnsafeName> {
    if rel.is_empty() || rel.contains('\0') || rel.contains('\\') {
        return Err(UnsafeName::new("path", rel, "cannot be joined under the cache"));
    }
    let p = Path::new(rel);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(UnsafeName::new("path", rel, format!("would leave {}", root.display())));
    }
    Ok(root.join(p))
}

/// Whether a weights file name is a pickle format (PyTorch `.bin`/`.pt`/`.pth`, `.ckpt`), which
/// mmrun never downloads nor loads: unpickling can run arbitrary code.
pub fn is_pickled(name: &str) -> bool {
    [".bin", ".pth", ".pt", ".ckpt"].iter().any(|x| name.ends_with(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        commit(&"a".repeat(40)).unwrap();
        blob_name(&"0f".repeat(32)).unwrap();
        for p in ["README.md", "data/train.jsonl", "default/train/0000.parquet", "a b/c:d.txt"] {
            repo_path(p).unwrap();
        }
        for r in ["main", "v1.0", "refs/convert/parquet", "refs/pr/12", &"c".repeat(40)] {
            revision(r).unwrap();
        }
        assert_eq!(join_under(Path::new("/c"), "snapshots/x/a.txt").unwrap(), PathBuf::from("/c/snapshots/x/a.txt"));
    }

    #[test]
    fn refuses_hostile_names() {
        for c in ["../..", "", "ABCDEF0123456789ABCDEF0123456789ABCDEF01", &"a".repeat(41), "main"] {
            assert!(commit(c).is_err(), "{c}");
        }
        assert!(blob_name("../../x").is_err());
        for p in [
            "data/../../../../tmp/x.jsonl",
            "/etc/passwd",
            "C:/Windows/x",
            "c:x",
            "a\\..\\b",
            "a\0b",
            "a//b",
            "a/",
            "./a",
            "..",
            "",
        ] {
            assert!(repo_path(p).is_err(), "{p:?}");
        }
        for r in ["../../x", "..", "a/../b", "/main", "main/", "a//b", "%2E%2E", "a b", "a\0", ".hidden", "x.lock", "@"]
        {
            assert!(revision(r).is_err(), "{r:?}");
        }
        for j in ["../x", "/abs", "a/../../b", "a\\b", ""] {
            assert!(join_under(Path::new("/c"), j).is_err(), "{j:?}");
        }
        // The message shows the name escaped, never raw control bytes.
        let e = repo_path("a\0/../b").unwrap_err().to_string();
        assert!(e.contains("\\0") && !e.contains('\0'), "{e}");
    }
}
