//! Batches from the data layer's tokenised shards: one sequence per row (right-padded), or
//! several short documents packed into each row.

use super::batch::{Batch, BatchSource, Row};
use crate::data::shards::{pack, TokenShards};

/// A [`BatchSource`] over memory-mapped [`TokenShards`].
pub struct ShardSource {
    shards: TokenShards,
    /// Sequence indices per row (one each without packing).
    rows: Vec<Vec<usize>>,
    seq_len: usize,
    pad_id: u32,
    pad_to_max: bool,
}

impl ShardSource {
    /// Rows of at most `seq_len` tokens. With `packing`, documents are packed greedily in an order
    /// drawn from `seed` (fixed for the whole run, so resuming sees the same rows); the loop then
    /// shuffles rows per epoch, and batches carry the documents of each row (per-document
    /// attention and positions, no label across a boundary). Without `pad_to_max`, each batch is
    /// padded only to its longest row.
    pub fn new(shards: TokenShards, seq_len: usize, packing: bool, pad_to_max: bool, seed: u64) -> Self {
        let n = shards.num_sequences();
        let rows = if packing {
            let order = super::batch::packing_order(seed, n);
            pack(&shards, &order, seq_len).rows
        } else {
            (0..n).map(|i| vec![i]).collect()
        };
        let pad_id = shards.meta().pad_id;
        Self { shards, rows, seq_len, pad_id, pad_to_max }
    }

    /// Real (non-pad) tokens over one epoch, for reporting padding waste.
    pub fn real_tokens(&self) -> usize {
        self.rows.iter().map(|r| r.iter().map(|&i| self.shards.sequence_len(i)).sum::<usize>().min(self.seq_len)).sum()
    }
}

impl BatchSource for ShardSource {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let rows: Vec<Row> = indices
            .iter()
            .map(|&i| {
                let mut row = Row::default();
                for &j in &self.rows[i] {
                    let s = self.shards.sequence(j);
                    row.push_doc(&s.ids, &s.labels(), self.seq_len);
                }
                row
            })
            .collect();
        let longest = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let t = if self.pad_to_max { self.seq_len } else { longest.clamp(2, self.seq_len.max(2)) };
        Batch::from_rows(&rows, t.max(longest), self.pad_id, indices)
    }
}
