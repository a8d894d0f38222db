//! Batches from the data layer's tokenised shards: one sequence per row (right-padded), or
//! several short documents packed into each row.

use super::batch::{Batch, BatchSource};
use crate::data::shards::{pack, pad_batch, TokenShards};

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
    /// shuffles rows per epoch. Without `pad_to_max`, each batch is padded only to its longest row.
    pub fn new(shards: TokenShards, seq_len: usize, packing: bool, pad_to_max: bool, seed: u64) -> Self {
        let n = shards.num_sequences();
        let rows = if packing {
            let order = super::batch::epoch_permutation(seed ^ 0x7061_636b, 0, n);
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
        let samples: Vec<_> = indices
            .iter()
            .map(|&i| {
                let row = &self.rows[i];
                if row.len() == 1 {
                    let mut s = self.shards.sequence(row[0]);
                    s.ids.truncate(self.seq_len);
                    s.mask.truncate(self.seq_len);
                    s
                } else {
                    self.shards.packed(row, self.seq_len)
                }
            })
            .collect();
        let longest = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let t = if self.pad_to_max { self.seq_len } else { longest.clamp(2, self.seq_len.max(2)) };
        let b = pad_batch(&samples, t, self.pad_id);
        Ok(Batch {
            batch_size: b.rows,
            seq_len: b.seq_len,
            input_ids: b.input_ids,
            labels: b.labels,
            indices: indices.to_vec(),
        })
    }
}
