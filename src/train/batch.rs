//! Batches as the loop sees them, and the deterministic per-epoch data order.

use crate::model::DocPositions;
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
    /// Packed rows: the token count of each document in each row (the rest of a row is padding);
    /// `None` when every row holds one sequence.
    pub docs: Option<Vec<Vec<usize>>>,
}

/// One row before padding: token ids, aligned labels, and the lengths of the documents it holds
/// in order (one for an unpacked row; they sum to the row's length).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels aligned with `ids`.
    pub labels: Vec<i64>,
    /// Token count of each document.
    pub docs: Vec<usize>,
}

impl Row {
    /// Append a document, cut to what still fits in `seq_len` tokens. Its first token loses its
    /// label when it follows another document: it must not be predicted from that document's last
    /// token (alone in a row, a document's first token is never predicted either).
    pub fn push_doc(&mut self, ids: &[u32], labels: &[i64], seq_len: usize) {
        let n = ids.len().min(seq_len.saturating_sub(self.ids.len()));
        if n == 0 {
            return;
        }
        let at = self.ids.len();
        self.ids.extend_from_slice(&ids[..n]);
        self.labels.extend_from_slice(&labels[..n]);
        if at > 0 {
            self.labels[at] = IGNORE;
        }
        self.docs.push(n);
    }
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

    /// The per-document positions of packed rows (`None` when unpacked), for the model's
    /// per-document attention.
    pub fn doc_positions(&self) -> Result<Option<DocPositions>> {
        self.docs.as_ref().map(|d| DocPositions::from_lengths(d, self.seq_len)).transpose()
    }

    /// Right-pad `rows` to `t` columns (`pad_id`, labels `IGNORE`), recording the documents when
    /// a row holds more than one.
    pub fn from_rows(rows: &[Row], t: usize, pad_id: u32, indices: &[usize]) -> anyhow::Result<Batch> {
        let mut input_ids = Vec::with_capacity(rows.len() * t);
        let mut labels = Vec::with_capacity(rows.len() * t);
        for (r, row) in rows.iter().enumerate() {
            anyhow::ensure!(
                row.ids.len() == row.labels.len() && row.ids.len() <= t,
                "row {r}: {} ids and {} labels for {t} columns",
                row.ids.len(),
                row.labels.len()
            );
            input_ids.extend_from_slice(&row.ids);
            labels.extend_from_slice(&row.labels);
            input_ids.extend(std::iter::repeat_n(pad_id, t - row.ids.len()));
            labels.extend(std::iter::repeat_n(IGNORE, t - row.ids.len()));
        }
        let packed = rows.iter().any(|r| r.docs.len() > 1);
        let docs = packed.then(|| rows.iter().map(|r| r.docs.clone()).collect());
        Ok(Batch { batch_size: rows.len(), seq_len: t, input_ids, labels, indices: indices.to_vec(), docs })
    }
}

/// Where the loop gets its micro-batches: a fixed list of examples that it visits in a seeded
/// order. Packing and tokenisation happen before, so `len()` and `batch()` are pure functions —
/// what makes exact resume possible with only (epoch, position) saved.
pub trait BatchSource: Sync {
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

/// The order in which a source packs its `n` sequences into rows: drawn once from `seed` (salted,
/// so it is independent of the epoch orders), fixed for the run, so a resumed run packs the same
/// rows.
pub fn packing_order(seed: u64, n: usize) -> Vec<usize> {
    epoch_permutation(seed ^ 0x7061_636b, 0, n)
}

/// Pre-tokenised rows (ids + aligned labels) right-padded per batch to the longest row (or to a
/// fixed length). Padding to the batch's longest row instead of to `max_seq_len` gives the same
/// loss (padding is causal-masked and label-ignored) with fewer wasted tokens. With
/// [`Self::packed`], each example is a row of several short sequences.
#[derive(Clone, Debug)]
pub struct PaddedRows {
    rows: Vec<(Vec<u32>, Vec<i64>)>,
    pad_id: u32,
    fixed_len: Option<usize>,
    /// Sequence indices per example, when packed.
    groups: Option<(Vec<Vec<usize>>, usize)>,
}

impl PaddedRows {
    /// Rows must already be truncated; `fixed_len = Some(n)` pads every batch to `n` columns.
    pub fn new(rows: Vec<(Vec<u32>, Vec<i64>)>, pad_id: u32, fixed_len: Option<usize>) -> Self {
        Self { rows, pad_id, fixed_len, groups: None }
    }

    /// Pack the rows greedily into examples of at most `seq_len` tokens, in an order drawn from
    /// `seed` once (the loop then shuffles examples per epoch, and a resumed run sees the same).
    pub fn packed(mut self, seq_len: usize, seed: u64) -> Self {
        let order = packing_order(seed, self.rows.len());
        let groups = crate::data::shards::pack_by(&order, seq_len, |i| self.rows[i].0.len()).rows;
        self.groups = Some((groups, seq_len));
        self
    }

    fn row(&self, i: usize) -> anyhow::Result<Row> {
        let one = |j: usize, row: &mut Row, cap: usize| {
            let (ids, lab) = &self.rows[j];
            anyhow::ensure!(ids.len() == lab.len(), "row {j}: {} ids but {} labels", ids.len(), lab.len());
            row.push_doc(ids, lab, cap);
            Ok(())
        };
        let mut row = Row::default();
        match &self.groups {
            Some((groups, seq_len)) => groups[i].iter().try_for_each(|&j| one(j, &mut row, *seq_len))?,
            None => one(i, &mut row, usize::MAX)?,
        }
        Ok(row)
    }
}

impl BatchSource for PaddedRows {
    fn len(&self) -> usize {
        self.groups.as_ref().map_or(self.rows.len(), |g| g.0.len())
    }

    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let rows = indices.iter().map(|&i| self.row(i)).collect::<anyhow::Result<Vec<_>>>()?;
        let longest = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let t = self.fixed_len.unwrap_or(longest).max(longest).max(2);
        Batch::from_rows(&rows, t, self.pad_id, indices)
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

    /// Packed rows: each example holds whole sequences; the batch records their lengths, the
    /// positions restart per document, and the first token of a following document is never a
    /// target, so the packed batch trains exactly the targets of the unpacked rows.
    #[test]
    fn packed_rows_keep_document_boundaries_and_labels() {
        let rows = vec![
            (vec![1, 5, 6, 2], vec![IGNORE, 5, 6, 2]),
            (vec![1, 7], vec![1, 7]),
            (vec![1, 8, 9], vec![1, IGNORE, 9]),
            (vec![1, 3], vec![IGNORE, 3]),
            (vec![4; 9], vec![4; 9]),
        ];
        let plain = PaddedRows::new(rows.clone(), 0, None);
        let src = PaddedRows::new(rows.clone(), 0, None).packed(6, 3);
        let groups = src.groups.clone().unwrap().0;
        assert!(src.len() < rows.len(), "nothing packed: {groups:?}");
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..rows.len()).collect::<Vec<_>>(), "every sequence in exactly one row");
        let all: Vec<usize> = (0..src.len()).collect();
        let b = src.batch(&all).unwrap();
        let docs = b.docs.clone().expect("packed rows record their documents");
        let t = b.seq_len;
        for (r, g) in groups.iter().enumerate() {
            // The long sequence is cut to the row length (6) in a row of its own.
            let lens: Vec<usize> = g.iter().map(|&j| rows[j].0.len().min(6)).collect();
            assert_eq!(docs[r], lens, "row {r}");
            let mut at = r * t;
            for (k, &j) in g.iter().enumerate() {
                let (ids, lab) = (&rows[j].0[..lens[k]], &rows[j].1[..lens[k]]);
                assert_eq!(&b.input_ids[at..at + ids.len()], ids);
                let first = if k == 0 { lab[0] } else { IGNORE };
                assert_eq!(b.labels[at], first, "row {r}: the first token of document {k} is a target");
                assert_eq!(&b.labels[at + 1..at + ids.len()], &lab[1..]);
                at += ids.len();
            }
            assert!(b.labels[at..(r + 1) * t].iter().all(|&l| l == IGNORE), "padding is never a target");
        }
        let pos = b.doc_positions().unwrap().unwrap();
        let want: Vec<u32> = docs
            .iter()
            .flat_map(|d| {
                let rest = t - d.iter().sum::<usize>();
                d.iter().chain([&rest]).flat_map(|&n| 0..n as u32).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(pos.positions().as_slice(), want.as_slice());
        // The same targets as one sequence per row (the long one cut to 6 tokens too).
        let cut = PaddedRows::new(
            rows.iter().map(|(i, l)| (i[..i.len().min(6)].to_vec(), l[..l.len().min(6)].to_vec())).collect(),
            0,
            None,
        );
        assert_eq!(b.useful_tokens(), cut.batch(&(0..rows.len()).collect::<Vec<_>>()).unwrap().useful_tokens());
        assert!(plain.batch(&[0, 1]).unwrap().docs.is_none(), "unpacked rows carry no documents");
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
