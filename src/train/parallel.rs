//! What the loop does differently with several ranks ([`crate::dist::Collective`]): which rows of
//! a global micro-batch are this rank's, and the one exchange per optimiser step that sums the
//! gradients and the step's statistics.
//!
//! `batch_size` is per rank (PyTorch DDP's and MiniMind's convention): a global micro-batch has
//! `world_size × batch_size` rows, rank `r` takes the `r`-th slice of it, and each rank's loss is
//! weighted by its share of the rows before backward. The summed gradient is therefore the
//! gradient of the mean over the global micro-batch, which is what one rank with
//! `world_size × batch_size` rows computes (exactly so for losses that are means over rows, and
//! over tokens when every rank holds as many loss tokens, as in packed pretraining; otherwise it is
//! DDP's usual mean of rank means). A short last batch of an epoch is split the same way, and a
//! rank that gets no rows contributes zeros.

use crate::dist::{Collective, DistError};
use candle_core::{DType, Device, Tensor, Var};

/// The rows `[lo, hi)` of `order` that `rank` trains on in the global micro-batch starting at
/// row `start`, and the size of that global micro-batch.
pub(crate) fn rank_rows(start: usize, n: usize, per_rank: usize, rank: usize, world: usize) -> (usize, usize, usize) {
    let end = (start + per_rank * world).min(n);
    let lo = (start + per_rank * rank).min(end);
    let hi = (lo + per_rank).min(end);
    (lo, hi, end - start)
}

/// A step's statistics besides the gradients, summed over ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct StepStats {
    /// Loss, weighted by this rank's share of the rows (sums to the global batch's mean).
    pub loss: f64,
    /// MoE aux loss, weighted likewise.
    pub aux: f64,
    /// Tokens (padding included).
    pub tokens: u64,
    /// Loss-bearing tokens.
    pub useful: u64,
    /// Ranks that were asked to stop (Ctrl-C reaches ranks at different moments; they all stop
    /// after the same step).
    pub cancelled: bool,
}

/// Integers travel as 16-bit pieces, so their sums stay exact in f32 for any world size below 256.
const PIECES: usize = 4;

fn push_u64(buf: &mut Vec<f32>, v: u64) {
    buf.extend((0..PIECES).map(|i| ((v >> (16 * i)) & 0xffff) as f32));
}

fn read_u64(s: &[f32]) -> u64 {
    s.iter().enumerate().map(|(i, &p)| (p as u64) << (16 * i)).sum()
}

/// Sum `grads` (one per param, `None` where a param got none) and `stats` over every rank in one
/// call. A param keeps `None` only if no rank had a gradient for it.
///
/// Everything travels as one flat f32 tensor on the params' device, so a collective that
/// reduces on the device (NCCL) keeps the gradients there; only the few statistics come back to
/// the host.
pub(crate) fn all_reduce_step(
    dist: &dyn Collective,
    params: &[(String, Var)],
    grads: &[Option<Tensor>],
    stats: StepStats,
) -> anyhow::Result<(Vec<Option<Tensor>>, StepStats)> {
    let device = params.first().map_or(Device::Cpu, |(_, v)| v.device().clone());
    let mut parts = Vec::with_capacity(params.len() + 1);
    for ((_, v), g) in params.iter().zip(grads) {
        parts.push(match g {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(v.elem_count(), DType::F32, v.device())?,
        });
    }
    let mut tail: Vec<f32> = grads.iter().map(|g| if g.is_some() { 1f32 } else { 0f32 }).collect();
    tail.extend([stats.loss as f32, stats.aux as f32, if stats.cancelled { 1.0 } else { 0.0 }]);
    push_u64(&mut tail, stats.tokens);
    push_u64(&mut tail, stats.useful);
    let tail_len = tail.len();
    parts.push(Tensor::from_vec(tail, tail_len, &device)?);
    let summed = dist.all_reduce_sum_tensor(&Tensor::cat(&parts, 0)?).map_err(dist_error)?;

    let total = summed.elem_count() - tail_len;
    let tail = summed.narrow(0, total, tail_len)?.to_vec1::<f32>()?;
    let (present, s) = tail.split_at(params.len());
    let mut out = Vec::with_capacity(params.len());
    let mut off = 0;
    for ((_, v), p) in params.iter().zip(present) {
        let n = v.elem_count();
        out.push(if *p > 0.0 {
            Some(summed.narrow(0, off, n)?.reshape(v.shape())?.to_dtype(v.dtype())?)
        } else {
            None
        });
        off += n;
    }
    let stats = StepStats {
        loss: s[0] as f64,
        aux: s[1] as f64,
        cancelled: s[2] > 0.0,
        tokens: read_u64(&s[3..3 + PIECES]),
        useful: read_u64(&s[3 + PIECES..3 + 2 * PIECES]),
    };
    Ok((out, stats))
}

/// Make every rank start from rank 0's weights and step: the replicas were initialised from the
/// same seed or checkpoint, and this guarantees it (as DDP does when it wraps a model). A rank
/// that resumed from another step than rank 0 did not see the same work directory: refused.
pub(crate) fn sync_start(dist: &dyn Collective, params: &[(String, Var)], step: usize) -> anyhow::Result<()> {
    let mut s = [step as f32];
    dist.broadcast(&mut s).map_err(dist_error)?;
    if s[0] as usize != step {
        anyhow::bail!(
            "rank {} starts at optimiser step {step} but rank 0 at step {}: the ranks must share the stage's work \
             directory (its checkpoints), e.g. a cache on shared storage",
            dist.rank(),
            s[0] as usize
        );
    }
    let mut flat = Vec::new();
    for (_, v) in params {
        flat.extend(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    dist.broadcast(&mut flat).map_err(dist_error)?;
    if dist.rank() != 0 {
        let mut off = 0;
        for (_, v) in params {
            let n = v.elem_count();
            v.set(&Tensor::from_slice(&flat[off..off + n], v.shape(), v.device())?.to_dtype(v.dtype())?)?;
            off += n;
        }
        crate::model::ops::linear_bf16::weights_changed();
    }
    Ok(())
}

fn dist_error(e: DistError) -> anyhow::Error {
    anyhow::Error::new(e).context("data-parallel exchange between ranks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_each_global_batch_and_a_short_last_one() {
        // 10 rows, 2 ranks × 3: [0,6) then the last 4 rows, 3 + 1.
        assert_eq!(rank_rows(0, 10, 3, 0, 2), (0, 3, 6));
        assert_eq!(rank_rows(0, 10, 3, 1, 2), (3, 6, 6));
        assert_eq!(rank_rows(6, 10, 3, 0, 2), (6, 9, 4));
        assert_eq!(rank_rows(6, 10, 3, 1, 2), (9, 10, 4));
        // A rank past the end gets nothing.
        assert_eq!(rank_rows(9, 10, 3, 1, 2).0, rank_rows(9, 10, 3, 1, 2).1);
    }

    #[test]
    fn integers_survive_the_f32_sum() {
        let mut a = Vec::new();
        push_u64(&mut a, 123_456_789_012);
        let mut b = Vec::new();
        push_u64(&mut b, 987_654_321_098);
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(read_u64(&sum), 123_456_789_012 + 987_654_321_098);
    }
}
