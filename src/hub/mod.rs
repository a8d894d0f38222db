//! Hugging Face Hub client over `ureq`: revisions, tree listing, resolve, verification, Range
//! resume, retries, offline mode, and the HF cache layout.

pub mod uri;

pub use uri::{HubUri, RepoType};
