//! Next-token selection from one row of logits: greedy, temperature, top-k, top-p and repetition
//! penalty, all drawn from a seeded ChaCha RNG so that generation is reproducible.
//!
//! The order of operations follows the reference `generate` (spec §16.1): logits ÷ temperature,
//! repetition penalty over every id already in the row (prompt included), top-k, top-p, then a
//! multinomial draw. One deliberate change: `temperature == 0` means greedy (argmax) instead of a
//! division by zero.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How to pick the next token. The defaults are greedy decoding, which is what evaluation wants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`0` = off).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability mass reaches `top_p`
    /// (`1.0` = off).
    pub top_p: f32,
    /// Penalise tokens already present in the row: positive logits are divided by it, negative ones
    /// multiplied (HF / reference semantics; `1.0` = off).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0 }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether this selects the argmax (no randomness involved).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Divide positive / multiply negative logits of every id in `seen` by `penalty` (each id once).
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::with_capacity(seen.len());
    for &id in seen {
        let i = id as usize;
        if i >= logits.len() || !done.insert(id) {
            continue;
        }
        let l = logits[i];
        logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
    }
}

/// Set every logit below the `k`-th largest to `-inf` (ties with the k-th are kept, as in the
/// reference's `logits < topk[..., -1]` comparison). `k == 0` or `k >= len` is a no-op.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    // Descending; NaN sorts last so it never becomes the threshold.
    sorted.sort_unstable_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Less));
    let threshold = sorted[k - 1];
    for l in logits.iter_mut() {
        if *l < threshold {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus filter: sort by probability, mask tokens once the cumulative probability of the tokens
/// *before* them exceeds `p`, so the most likely token always survives. `p >= 1` is a no-op.
pub fn top_p_filter(logits: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    let mut cum = 0.0f32;
    for &i in &order {
        if cum > p {
            logits[i] = f32::NEG_INFINITY;
        }
        cum += probs[i];
    }
}

/// Numerically stable softmax (entries at `-inf` get probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // All masked (or NaN): uniform is the only sane answer.
        return vec![1.0 / logits.len() as f32; logits.len()];
    }
    let mut out: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = out.iter().sum();
    out.iter_mut().for_each(|p| *p /= sum);
    out
}

/// Index of the largest logit (the first one on ties, so greedy is deterministic).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A seeded sampler: the same params, seed and logits always give the same tokens.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler with its own RNG stream seeded by `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from one row of logits; `seen` is every id already in the row (prompt
    /// and generated so far), used by the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], seen: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let p = &self.params;
        if !p.is_greedy() && p.temperature != 1.0 {
            l.iter_mut().for_each(|x| *x /= p.temperature);
        }
        apply_repetition_penalty(&mut l, seen, p.repetition_penalty);
        if p.is_greedy() {
            return argmax(&l);
        }
        top_k_filter(&mut l, p.top_k);
        top_p_filter(&mut l, p.top_p);
        let probs = softmax(&l);
        let u: f32 = self.rng.random::<f32>();
        let mut cum = 0.0f32;
        let mut last_nonzero = 0usize;
        for (i, &pr) in probs.iter().enumerate() {
            if pr > 0.0 {
                last_nonzero = i;
                cum += pr;
                if u < cum {
                    return i as u32;
                }
            }
        }
        // Rounding left the cumulative sum a hair below u: take the last possible token.
        last_nonzero as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_ignores_seed() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        for seed in 0..5 {
            assert_eq!(Sampler::new(SamplingParams::greedy(), seed).sample(&logits, &[]), 1);
        }
        // Ties resolve to the first index.
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once() {
        let mut l = vec![2.0, -2.0, 1.0, 0.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 3, 99], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.0]);
        // Greedy with a strong penalty moves off the repeated token.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 3.0, ..SamplingParams::greedy() }, 0);
        assert_eq!(s.sample(&[2.0, 1.0], &[0]), 1);
    }

    #[test]
    fn top_k_keeps_k_largest_and_ties() {
        let mut l = vec![1.0, 5.0, 3.0, 4.0, 3.0];
        top_k_filter(&mut l, 2);
        assert_eq!(l, vec![f32::NEG_INFINITY, 5.0, f32::NEG_INFINITY, 4.0, f32::NEG_INFINITY]);
        let mut t = vec![1.0, 3.0, 3.0, 0.0];
        top_k_filter(&mut t, 2);
        assert_eq!(t, vec![f32::NEG_INFINITY, 3.0, 3.0, f32::NEG_INFINITY]);
        let mut off = vec![1.0, 2.0];
        top_k_filter(&mut off, 0);
        assert_eq!(off, vec![1.0, 2.0]);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_always_the_top_token() {
        // probs ≈ [0.6439, 0.2369, 0.0871, 0.0321]
        let base = [3.0f32, 2.0, 1.0, 0.0];
        let mut l = base.to_vec();
        top_p_filter(&mut l, 0.8);
        assert!(l[0].is_finite() && l[1].is_finite());
        assert!(l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
        let mut tiny = base.to_vec();
        top_p_filter(&mut tiny, 0.01);
        assert_eq!(tiny.iter().filter(|x| x.is_finite()).count(), 1);
        assert!(tiny[0].is_finite());
        let mut off = base.to_vec();
        top_p_filter(&mut off, 1.0);
        assert_eq!(off, base.to_vec());
    }

    #[test]
    fn sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let params = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
        let draw = |seed| {
            let mut s = Sampler::new(params.clone(), seed);
            (0..4000).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same tokens");
        assert_ne!(a, draw(8), "different seed, different tokens");
        assert!(!a.contains(&2), "masked token never drawn");
        let ones = a.iter().filter(|&&t| t == 1).count() as f32 / a.len() as f32;
        assert!((ones - 0.75).abs() < 0.03, "P(1) = {ones}, expected 0.75");
    }

    #[test]
    fn low_temperature_and_top_k_one_concentrate_on_argmax() {
        let logits = [1.0f32, 1.5, 0.5];
        let mut cold = Sampler::new(SamplingParams { temperature: 0.01, ..SamplingParams::default() }, 3);
        let mut k1 = Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, ..SamplingParams::default() }, 3);
        for _ in 0..100 {
            assert_eq!(cold.sample(&logits, &[]), 1);
            assert_eq!(k1.sample(&logits, &[]), 1);
        }
    }

    #[test]
    fn softmax_handles_masked_entries() {
        let p = softmax(&[0.0, f32::NEG_INFINITY, 0.0]);
        assert_eq!(p, vec![0.5, 0.0, 0.5]);
    }
}
