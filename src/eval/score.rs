//! Log-likelihood scoring of token sequences: the primitive under perplexity and multiple choice.

use crate::model::generate::CausalLm;
use candle_core::{DType, Tensor, D};

/// A token sequence and which of its tokens are scored.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredSeq {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `targets[i]`: score `ids[i]` given `ids[..i]`. `targets[0]` is ignored (nothing predicts it).
    pub targets: Vec<bool>,
}

impl ScoredSeq {
    /// `prefix` unscored followed by `continuation` scored.
    pub fn continuation(prefix: &[u32], continuation: &[u32]) -> Self {
        let mut ids = prefix.to_vec();
        ids.extend_from_slice(continuation);
        let mut targets = vec![false; prefix.len()];
        targets.extend(std::iter::repeat_n(true, continuation.len()));
        Self { ids, targets }
    }

    /// Number of scored tokens.
    pub fn scored(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Sum of log-probabilities of the scored tokens, and how many there were.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LogLik {
    /// Σ log p(target | prefix), natural log.
    pub sum: f64,
    /// Number of scored tokens.
    pub count: usize,
}

/// Score `seqs` in batches of `batch_size` (right-padded: a causal model's logits at real positions
/// never see the pad tokens that follow them, so padding changes nothing). Sequences longer than
/// `max_len` keep their last `max_len` tokens.
pub fn loglik<M: CausalLm>(
    model: &M,
    seqs: &[ScoredSeq],
    batch_size: usize,
    max_len: usize,
) -> candle_core::Result<Vec<LogLik>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let trimmed: Vec<(&[u32], &[bool])> = chunk
            .iter()
            .map(|s| {
                let start = s.ids.len().saturating_sub(max_len);
                (&s.ids[start..], &s.targets[start..])
            })
            .collect();
        let t = trimmed.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        if t < 2 {
            out.extend(chunk.iter().map(|_| LogLik::default()));
            continue;
        }
        let b = trimmed.len();
        let mut flat = Vec::with_capacity(b * t);
        for (ids, _) in &trimmed {
            flat.extend_from_slice(ids);
            flat.extend(std::iter::repeat_n(0u32, t - ids.len()));
        }
        let input = Tensor::from_vec(flat.clone(), (b, t), model.device())?;
        let logits = model.forward_all(&input)?.to_dtype(DType::F32)?;
        let logits = logits.narrow(1, 0, t - 1)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let next = input.narrow(1, 1, t - 1)?.contiguous()?.unsqueeze(2)?;
        let picked: Vec<Vec<f32>> = lp.gather(&next, 2)?.squeeze(2)?.to_vec2()?;
        for (row, (ids, targets)) in trimmed.iter().enumerate() {
            let mut ll = LogLik::default();
            for i in 1..ids.len() {
                if targets[i] {
                    ll.sum += picked[row][i - 1] as f64;
                    ll.count += 1;
                }
            }
            out.push(ll);
        }
    }
    Ok(out)
}

/// `exp(mean negative log-likelihood)` over all scored tokens of all sequences (NaN when none).
pub fn perplexity(scores: &[LogLik]) -> f64 {
    let (sum, n) = scores.iter().fold((0.0, 0usize), |(s, n), l| (s + l.sum, n + l.count));
    if n == 0 {
        f64::NAN
    } else {
        (-sum / n as f64).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generate::tests::ToyLm;
    use candle_core::Device;

    #[test]
    fn loglik_matches_direct_computation_and_ignores_padding() {
        let m = ToyLm { vocab: 7, device: Device::Cpu };
        let a = ScoredSeq::continuation(&[1, 2, 3], &[4, 5]);
        let b = ScoredSeq::continuation(&[1], &[6]);
        let together = loglik(&m, &[a.clone(), b.clone()], 8, 1024).unwrap();
        let alone = [loglik(&m, std::slice::from_ref(&a), 1, 1024).unwrap()[0], loglik(&m, &[b], 1, 1024).unwrap()[0]];
        assert_eq!(together[0].count, 2);
        assert_eq!(together[1].count, 1);
        for (x, y) in together.iter().zip(alone.iter()) {
            assert!((x.sum - y.sum).abs() < 1e-5);
        }
        // Direct: log softmax of the toy logits at each prefix.
        let input = Tensor::from_vec(a.ids.clone(), (1, 5), &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = m.forward_all(&input).unwrap().get(0).unwrap().to_vec2().unwrap();
        let mut want = 0.0f64;
        for i in [3usize, 4] {
            let p = crate::model::sampling::softmax(&logits[i - 1]);
            want += (p[a.ids[i] as usize] as f64).ln();
        }
        assert!((together[0].sum - want).abs() < 1e-4, "{} vs {want}", together[0].sum);
        let ppl = perplexity(&together);
        assert!(ppl > 1.0 && ppl.is_finite());
        assert!(perplexity(&[]).is_nan());
    }
}
