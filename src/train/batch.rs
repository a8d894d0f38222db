//! Batches as the loop sees them, and the deterministic per-epoch data order.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Label value that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// One micro-batch on the host: `input_ids` and `labels` are row-major `[batch, seq]`. Labels are
/// aligned with the inputs (not shifted): the loss compares logits at `t` with labels at `t + 1`,
/// as the reference model does; `IGNORE` marks padding and non-trained positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Rows.
    pub batch_size: usize,
    /// Columns.
    pub seq_len: usize,
    /// Token ids, `batch_size * seq_len`.
    pub input_ids: Vec<u32>,
    /// Labels, `batch_size * seq_len`, `IGNORE` where no loss is taken.
    pub labels: Vec<i64>,
    /// The source's example indices this batch was built from, in order (a loss that needs more
    /// than tokens, e.g. GRPO's reference answers, looks its examples up by them).
    pub indices: Vec<usize>,
}

impl Batch {
    /// A seed from the batch's token ids (FNV-1a) mixed with the run seed: per-batch randomness
    /// (LoRA dropout masks) that a resumed run reproduces without storing any state.
    pub fn seed(&self, seed: u64) -> u64 {
        let mut h: u64 = 0xcbf29ce484222325 ^ seed;
        for &x in &self.input_ids {
            h ^= x as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    }

    /// Tokens processed (padding included).
    pub fn tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    /// Loss-bearing tokens: positions `t >= 1` of each row whose label is not `IGNORE` (the first
    /// position of a row is never predicted).
    pub fn useful_tokens(&self) -> usize {
        if self.seq_len == 0 {
            return 0;
        }
        self.labels.chunks(self.seq_len).map(|row| row[1..].iter().filter(|&&l| l != IGNORE).count()).sum()
    }

    /// `[batch, seq]` u32 ids on `device`.
    pub fn input_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.input_ids, (self.batch_size, self.seq_len), device)
    }

    /// `[batch, seq]` i64 labels on `device`.
    pub fn label_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.labels, (self.batch_size, self.seq_len), device)
    }
}

/// Where the loop gets its micro-batches: a fixed list of examples that it visits in a seeded
/// order. Packing and tokenisation happen before, so `len()` and `batch()` are pure functions —
/// what makes exact resume possible with only (epoch, position) saved.
pub trait BatchSource {
    /// Number of examples (rows) in one epoch.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The micro-batch made of these examples, in this order.
    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch>;
}

/// The order of examples in `epoch`: a permutation drawn from ChaCha8 seeded by `seed + epoch`
/// (the reference reseeds with `42 + epoch` each epoch and draws `randperm`).
pub fn epoch_permutation(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng);
    idx
}

/// Pre-tokenised rows (ids + aligned labels) right-padded per batch to the longest row (or to a
/// fixed length). Padding to the batch's longest row instead of to `max_seq_len` gives the same
/// loss (padding is causal-masked and label-ignored) with fewer wasted tokens.
#[derive(Clone, Debug)]
pub struct PaddedRows {
    rows: Vec<(Vec<u32>, Vec<i64>)>,
    pad_id: u32,
    fixed_len: Option<usize>,
}

impl PaddedRows {
    /// Rows must already be truncated; `fixed_len = Some(n)` pads every batch to `n` columns.
    pub fn new(rows: Vec<(Vec<u32>, Vec<i64>)>, pad_id: u32, fixed_len: Option<usize>) -> Self {
        Self { rows, pad_id, fixed_len }
    }
}

impl BatchSource for PaddedRows {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let longest = indices.iter().map(|&i| self.rows[i].0.len()).max().unwrap_or(0);
        let t = self.fixed_len.unwrap_or(longest).max(longest).max(2);
        let mut input_ids = Vec::with_capacity(indices.len() * t);
        let mut labels = Vec::with_capacity(indices.len() * t);
        for &i in indices {
            let (ids, lab) = &self.rows[i];
            anyhow::ensure!(ids.len() == lab.len(), "row {i}: {} ids but {} labels", ids.len(), lab.len());
            input_ids.extend_from_slice(ids);
            labels.extend_from_slice(lab);
            input_ids.extend(std::iter::repeat_n(self.pad_id, t - ids.len()));
            labels.extend(std::iter::repeat_n(IGNORE, t - ids.len()));
        }
        Ok(Batch { batch_size: indices.len(), seq_len: t, input_ids, labels, indices: indices.to_vec() })
    }
}

/// The examples `indices` of another source, in that order (a train or held-out split). Batches
/// report the inner source's indices, so a loss can still look its examples up.
pub struct Subset<'a, S: BatchSource + ?Sized> {
    inner: &'a S,
    indices: Vec<usize>,
}

impl<'a, S: BatchSource + ?Sized> Subset<'a, S> {
    /// `indices` must be valid indices of `inner`.
    pub fn new(inner: &'a S, indices: Vec<usize>) -> Self {
        Self { inner, indices }
    }
}

impl<S: BatchSource + ?Sized> BatchSource for Subset<'_, S> {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let inner: Vec<usize> = indices.iter().map(|&i| self.indices[i]).collect();
        self.inner.batch(&inner)
    }
}

/// A deterministic split of `n` examples into (train, held out): `round(n · fraction)` examples,
/// at least one and never all (when `fraction > 0` and `n >= 2`), drawn by a seeded permutation;
/// both lists sorted. The split depends only on `(n, fraction, seed)`.
pub fn holdout_split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 || n < 2 {
        return ((0..n).collect(), Vec::new());
    }
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    // A salt keeps the split independent of the epoch orders drawn from the same seed.
    let perm = epoch_permutation(seed ^ 0x5eed_4e1d_u64, 0, n);
    let (mut held, mut train) = (perm[..k].to_vec(), perm[k..].to_vec());
    held.sort_unstable();
    train.sort_unstable();
    (train, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_seeded_and_differs_per_epoch() {
        let a = epoch_permutation(42, 0, 50);
        assert_eq!(a, epoch_permutation(42, 0, 50));
        assert_ne!(a, epoch_permutation(42, 1, 50));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn pads_to_longest_and_counts_useful_tokens() {
        let rows = vec![(vec![1, 5, 6, 2], vec![1, 5, 6, 2]), (vec![1, 7], vec![IGNORE, 7])];
        let b = PaddedRows::new(rows, 0, None).batch(&[1, 0]).unwrap();
        assert_eq!(b.seq_len, 4);
        assert_eq!(b.input_ids, vec![1, 7, 0, 0, 1, 5, 6, 2]);
        assert_eq!(b.labels, vec![IGNORE, 7, IGNORE, IGNORE, 1, 5, 6, 2]);
        assert_eq!(b.useful_tokens(), 1 + 3);
        assert_eq!(b.tokens(), 8);
    }

    #[test]
    fn holdout_split_is_deterministic_disjoint_and_never_empty() {
        let (train, held) = holdout_split(20, 0.1, 7);
        assert_eq!((train.len(), held.len()), (18, 2));
        assert_eq!((train.clone(), held.clone()), holdout_split(20, 0.1, 7));
        let mut all: Vec<usize> = train.iter().chain(&held).copied().collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(holdout_split(3, 0.01, 7).1.len(), 1, "at least one held out");
        assert_eq!(holdout_split(3, 0.99, 7).0.len(), 1, "at least one trained on");
        assert_eq!(holdout_split(5, 0.0, 7), ((0..5).collect(), vec![]));
        let rows = PaddedRows::new(vec![(vec![1], vec![1]), (vec![2], vec![2]), (vec![3], vec![3])], 0, None);
        let sub = Subset::new(&rows, vec![2, 0]);
        assert_eq!(sub.len(), 2);
        let b = sub.batch(&[1, 0]).unwrap();
        assert_eq!((b.input_ids[0], b.input_ids[2], b.indices.clone()), (1, 3, vec![0, 2]));
    }
}
