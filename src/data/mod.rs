//! Data layer: readers (jsonl / json / txt / parquet), formats → examples, built-in synthetic data,
//! chat template, loss masks, pre-tokenised memory-mapped shards, batching.

use crate::recipe::DatasetSpec;
use std::path::PathBuf;

/// A dataset whose files are local and whose content hash is known.
#[derive(Clone, Debug)]
pub struct ResolvedDataset {
    /// Name in the recipe.
    pub name: String,
    /// The declaration.
    pub spec: DatasetSpec,
    /// The files, in a stable order.
    pub files: Vec<PathBuf>,
    /// Hash over the files' contents (and names), hex.
    pub content_hash: String,
}
