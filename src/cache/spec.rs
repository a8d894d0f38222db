//! `[cache]`: where finished stages are shared beyond this machine (not part of any key).
//!
//! Recipe vocabulary owned by the cache (as `data::spec` is by data): the recipe parses it,
//! [`super::remote`] acts on it, and it imports nothing from the crate.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[cache]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// A remote cache several machines share: `s3://<bucket>/<prefix>` (credentials, region and
    /// endpoint from the usual AWS_* variables) or `file:///<absolute path>`. Before a stage is
    /// built its key is pulled from here if present; after it is built it is pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// Check a remote cache URL: its scheme, and that it points somewhere. The error says what a
/// valid one looks like.
pub fn check_remote_url(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or("");
        if bucket.contains('@') {
            return Err("credentials go in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never in the URL".into());
        }
        if bucket.is_empty() {
            return Err("an s3:// remote names a bucket: s3://<bucket>/<prefix>".into());
        }
        Ok(())
    } else if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err("a file:// remote is an absolute path: file:///shared/mmrun-cache".into());
        }
        Ok(())
    } else {
        Err("a remote cache is s3://<bucket>/<prefix> or file:///<absolute path>".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_urls_are_checked() {
        assert!(check_remote_url("s3://bucket/some/prefix").is_ok());
        assert!(check_remote_url("file:///shared/cache").is_ok());
        assert!(check_remote_url("s3:///prefix").unwrap_err().contains("bucket"));
        assert!(check_remote_url("s3://key:secret@bucket/p").unwrap_err().contains("AWS_ACCESS_KEY_ID"));
        assert!(check_remote_url("file://relative/path").unwrap_err().contains("absolute"));
        assert!(check_remote_url("gs://bucket").unwrap_err().contains("s3://"));
    }
}
