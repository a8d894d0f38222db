//! The loss math of LoRA/SFT, DPO, reward models, GRPO, PPO and distillation as pure candle functions.
//!
//! Everything here is composite candle (differentiable by candle's autograd on any device); inputs
//! are plain tensors so the functions are tested on tiny hand-computed values without a model.
//! Conventions follow the reference (spec §11, §13) and TRL's metric names.

use candle_core::{DType, Result, Tensor, D};
use serde::Serialize;

/// Label value that carries no loss (PyTorch's `ignore_index`, the data layer's masked positions).
pub const IGNORE: i64 = -100;

/// Errors in inputs that the loss functions cannot interpret.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// Rewards cannot be split into groups of `group_size`.
    #[error("{n} rewards cannot be split into groups of {group_size} (num_generations); each prompt needs exactly num_generations completions")]
    BadGroups {
        /// Number of rewards.
        n: usize,
        /// Group size.
        group_size: usize,
    },
    /// A reward is NaN or infinite.
    #[error("reward #{index} (prompt group {group}) is {value}; every reward function must return a finite number")]
    NonFiniteReward {
        /// Flat index of the completion.
        index: usize,
        /// Its group (prompt) index.
        group: usize,
        /// The value.
        value: f32,
    },
}

/// Numerically stable `log_softmax` over the last dimension (computed in f32).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    // The max is a constant shift: detaching it keeps the gradient exact and avoids a max backward.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Per-token log-probabilities `[B, T]` of `targets: [B, T]` (integer ids; negative values are
/// ignored and yield the log-prob of id 0, so callers must mask them) under `logits: [B, T, V]`.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let t = targets.to_dtype(DType::I64)?;
    let safe = t.ge(0i64)?.where_cond(&t, &t.zeros_like()?)?.to_dtype(DType::U32)?;
    let lp = log_softmax_last(logits)?;
    lp.gather(&safe.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)
}

/// Shift `labels: [B, T]`, aligned with the inputs as the data layer produces them (position `t`
/// is predicted from position `t-1`), into next-token targets: `targets[t] = labels[t+1]`, the last
/// position gets [`IGNORE`]. Returns `(targets: i64 [B, T], mask: f32 [B, T])` with mask 1 where
/// the target is not ignored. This is the reference's `x = ids[:-1], y = ids[1:], mask[1:]`.
pub fn shift_targets(labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t) = labels.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    let targets = if t > 1 {
        let tail = labels.narrow(1, 1, t - 1)?;
        let pad = Tensor::full(IGNORE, (b, 1), labels.device())?;
        Tensor::cat(&[&tail, &pad], 1)?
    } else {
        Tensor::full(IGNORE, (b, t), labels.device())?
    };
    let mask = targets.ge(0i64)?.to_dtype(DType::F32)?;
    Ok((targets, mask))
}

/// Per-token log-probs `[B, T]` and the loss mask `[B, T]` from logits and aligned labels (see
/// [`shift_targets`]); masked positions hold 0 in the log-probs.
pub fn masked_token_logprobs(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (targets, mask) = shift_targets(labels)?;
    let lp = (token_logprobs(logits, &targets)? * &mask)?;
    Ok((lp, mask))
}

/// Summed (not length-normalised, spec §11) log-probability of each row's trained tokens: logits
/// `[B, T, V]`, aligned labels `[B, T]` with [`IGNORE`] outside the answer. Returns `[B]`.
pub fn sequence_logprobs(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (lp, _) = masked_token_logprobs(logits, labels)?;
    lp.sum(1)
}

/// [`sequence_logprobs`] of every document of packed rows, `[n_docs]` in row-major order:
/// `docs[r]` are the token counts of row r's documents. A position's log-prob (of the next label)
/// counts for its own document: after a document's last token comes the next document's first,
/// which packing leaves unlabelled (`train::batch::Row::push_doc`).
pub fn packed_sequence_logprobs(logits: &Tensor, labels: &Tensor, docs: &[Vec<usize>]) -> Result<Tensor> {
    let (lp, _) = masked_token_logprobs(logits, labels)?;
    let (b, t) = lp.dims2()?;
    let n: usize = docs.iter().map(Vec::len).sum();
    // A one-hot [documents, positions] matrix: the segment sums as one differentiable matmul.
    let mut seg = vec![0f32; n * b * t];
    let mut d = 0;
    for (r, row) in docs.iter().enumerate() {
        let mut at = r * t;
        for &len in row {
            seg[d * b * t + at..d * b * t + at + len].iter_mut().for_each(|x| *x = 1.0);
            (at, d) = (at + len, d + 1);
        }
    }
    let seg = Tensor::from_vec(seg, (n, b * t), lp.device())?.to_dtype(lp.dtype())?;
    seg.matmul(&lp.reshape((b * t, 1))?)?.squeeze(1)
}

/// `log(sigmoid(x))`, stable for large |x|: `-(relu(-x) + log(1 + exp(-|x|)))`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let sp = (x.neg()?.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    sp.neg()
}

/// Per-step DPO metrics with TRL's meaning (batch means; rewards are `beta * (policy - reference)`
/// summed log-probs, computed without gradient).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DpoMetrics {
    /// The DPO loss.
    pub loss: f32,
    /// Mean implicit reward of the chosen answers.
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f32,
    /// Mean implicit reward of the rejected answers.
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f32,
    /// Fraction of pairs whose chosen reward is strictly above the rejected one.
    #[serde(rename = "rewards/accuracy")]
    pub rewards_accuracy: f32,
    /// Mean of chosen minus rejected reward.
    #[serde(rename = "rewards/margin")]
    pub rewards_margin: f32,
    /// Mean policy log-prob of the chosen answers.
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f32,
    /// Mean policy log-prob of the rejected answers.
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f32,
}

/// DPO loss (scalar, differentiable through the policy log-probs) and its metrics.
pub struct DpoOutput {
    /// `mean_b(-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))))`.
    pub loss: Tensor,
    /// Metrics of this batch.
    pub metrics: DpoMetrics,
}

/// The DPO loss of spec §11 from summed sequence log-probs, each `[B]`: policy chosen/rejected
/// (carrying gradients) and reference chosen/rejected (treated as constants).
pub fn dpo_loss(pi_c: &Tensor, pi_r: &Tensor, ref_c: &Tensor, ref_r: &Tensor, beta: f64) -> Result<DpoOutput> {
    let (ref_c, ref_r) = (ref_c.detach(), ref_r.detach());
    let chosen = (pi_c - &ref_c)?;
    let rejected = (pi_r - &ref_r)?;
    let z = ((&chosen - &rejected)? * beta)?;
    let loss = log_sigmoid(&z)?.neg()?.mean_all()?;
    let rc = (chosen.detach() * beta)?;
    let rr = (rejected.detach() * beta)?;
    let mean = |t: &Tensor| -> Result<f32> { t.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>() };
    let metrics = DpoMetrics {
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        rewards_chosen: mean(&rc)?,
        rewards_rejected: mean(&rr)?,
        rewards_accuracy: mean(&rc.gt(&rr)?.to_dtype(DType::F32)?)?,
        rewards_margin: mean(&(&rc - &rr)?)?,
        logps_chosen: mean(&pi_c.detach())?,
        logps_rejected: mean(&pi_r.detach())?,
    };
    Ok(DpoOutput { loss, metrics })
}

/// Per-step reward-model metrics (batch means, without gradient).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RewardMetrics {
    /// The Bradley-Terry loss.
    pub loss: f32,
    /// Fraction of pairs whose chosen score is strictly above the rejected one.
    pub accuracy: f32,
    /// Mean of chosen minus rejected score.
    pub margin: f32,
    /// Mean score of the chosen answers.
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f32,
    /// Mean score of the rejected answers.
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f32,
}

/// A reward-model loss and its metrics.
pub struct RewardOutput {
    /// `mean_b(-logsigmoid(r_c - r_r - margin))`.
    pub loss: Tensor,
    /// Metrics of this batch.
    pub metrics: RewardMetrics,
}

/// The Bradley-Terry loss of a reward model on pairs: scores `r_c`, `r_r` (`[B]`, both carrying
/// gradients) of the chosen and rejected answers, and a `margin` the chosen score must exceed the
/// rejected one by (0: plain Bradley-Terry; TRL's `margin` column, as one constant).
pub fn bradley_terry_loss(r_c: &Tensor, r_r: &Tensor, margin: f64) -> Result<RewardOutput> {
    let diff = (r_c - r_r)?;
    let loss = log_sigmoid(&diff.affine(1.0, -margin)?)?.neg()?.mean_all()?;
    let mean = |t: &Tensor| -> Result<f32> { t.detach().to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>() };
    let metrics = RewardMetrics {
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        accuracy: mean(&r_c.gt(r_r)?.to_dtype(DType::F32)?)?,
        margin: mean(&diff)?,
        rewards_chosen: mean(r_c)?,
        rewards_rejected: mean(r_r)?,
    };
    Ok(RewardOutput { loss, metrics })
}

/// Per-step distillation metrics (means over the trained tokens, without gradient).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistillMetrics {
    /// `alpha · ce + (1 − alpha) · kd`.
    pub loss: f32,
    /// The student's cross-entropy on the labels.
    pub ce: f32,
    /// `T² · KL(teacher_T ‖ student_T)` per token.
    pub kd: f32,
    /// Tokens the loss was taken over.
    pub tokens: usize,
}

/// A distillation loss and its metrics.
pub struct DistillOutput {
    /// Scalar loss to back-propagate (through the student only).
    pub loss: Tensor,
    /// Its statistics.
    pub metrics: DistillMetrics,
}

/// The distillation loss of spec §15 on next-token rows: `student` and `teacher` logits `[N, V]`
/// (same vocabulary; the teacher is a constant), `targets: [N]` (i64, [`IGNORE`] where no loss is
/// taken, already shifted). Over the `M` trained rows:
/// `alpha · mean(−log p_s(y)) + (1 − alpha) · T² · Σ KL(softmax(t/T) ‖ softmax(s/T)) / M`
/// (PyTorch's `kl_div(..., reduction="batchmean")` over the trained rows, i.e. per token). With no
/// trained row the loss is a zero that still reaches the student's graph.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    alpha: f64,
    temperature: f64,
) -> Result<DistillOutput> {
    let t: Vec<i64> = targets.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let rows: Vec<u32> = t.iter().enumerate().filter(|(_, &y)| y >= 0).map(|(i, _)| i as u32).collect();
    if rows.is_empty() {
        let loss = (student.to_dtype(DType::F32)?.sum_all()? * 0.0)?;
        return Ok(DistillOutput { loss, metrics: DistillMetrics { loss: 0.0, ce: 0.0, kd: 0.0, tokens: 0 } });
    }
    let m = rows.len();
    let idx = Tensor::from_vec(rows, m, student.device())?;
    let s = student.to_dtype(DType::F32)?.index_select(&idx, 0)?;
    let te = teacher.to_dtype(DType::F32)?.detach().index_select(&idx, 0)?;
    let y = targets.to_dtype(DType::I64)?.flatten_all()?.index_select(&idx, 0)?.to_dtype(DType::U32)?;
    let ce = log_softmax_last(&s)?.gather(&y.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let ls = log_softmax_last(&(&s / temperature)?)?;
    let lt = log_softmax_last(&(&te / temperature)?)?;
    let kl = (lt.exp()? * (lt - ls)?)?.sum_all()?;
    let kd = (kl * (temperature * temperature / m as f64))?;
    let loss = ((&ce * alpha)? + (&kd * (1.0 - alpha))?)?;
    let scalar = |x: &Tensor| -> Result<f32> { x.detach().to_scalar::<f32>() };
    let metrics = DistillMetrics { loss: scalar(&loss)?, ce: scalar(&ce)?, kd: scalar(&kd)?, tokens: m };
    Ok(DistillOutput { loss, metrics })
}

/// Group-normalised advantages of one rollout batch and the statistics GRPO reports.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupAdvantages {
    /// `(r - mean_g) / (std_g + eps)` per completion, in input order.
    pub advantages: Vec<f32>,
    /// Mean over groups of the population standard deviation of the rewards.
    pub mean_group_std: f32,
    /// Groups whose rewards are all equal: their advantages are exactly 0 and they carry no signal.
    pub zero_std_groups: usize,
    /// Number of groups (prompts).
    pub groups: usize,
}

/// GRPO advantages (spec §13): rewards are laid out group after group (`group_size` consecutive
/// completions per prompt); within each group `(r - mean) / (population std + eps)` (the
/// reference uses `eps = 1e-4`). A group whose rewards are all equal gets exact zeros (not
/// rounding noise divided by `eps`) and is counted in `zero_std_groups`.
pub fn group_advantages(
    rewards: &[f32],
    group_size: usize,
    eps: f64,
) -> std::result::Result<GroupAdvantages, LossError> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        return Err(LossError::BadGroups { n: rewards.len(), group_size });
    }
    if let Some((i, &v)) = rewards.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(LossError::NonFiniteReward { index: i, group: i / group_size, value: v });
    }
    let mut advantages = Vec::with_capacity(rewards.len());
    let (mut zero, mut std_sum) = (0usize, 0f64);
    let groups = rewards.len() / group_size;
    for g in rewards.chunks(group_size) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        let var = g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt();
        let all_equal = g.iter().all(|&r| r == g[0]);
        if all_equal {
            zero += 1;
            advantages.extend(std::iter::repeat_n(0.0f32, g.len()));
        } else {
            std_sum += std;
            advantages.extend(g.iter().map(|&r| ((r as f64 - mean) / (std + eps)) as f32));
        }
    }
    let mean_group_std = if groups == 0 { 0.0 } else { (std_sum / groups as f64) as f32 };
    Ok(GroupAdvantages { advantages, mean_group_std, zero_std_groups: zero, groups })
}

/// The k3 estimator of KL(policy ‖ reference) per token: `exp(ref - logp) - (ref - logp) - 1`
/// (always ≥ 0, unbiased, low variance). `logp` carries gradients, `ref_logp` is a constant.
pub fn k3_kl(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp.detach() - logp)?;
    (d.exp()? - d)?.affine(1.0, -1.0)
}

/// The policy-gradient surrogate of GRPO.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLossKind {
    /// PPO-style clipped ratio: `min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`.
    Grpo,
    /// CISPO (the reference's default): `stopgrad(min(r, eps_high)) · A · logp`.
    Cispo,
}

/// Hyper-parameters of [`grpo_loss`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoLossConfig {
    /// Which surrogate.
    pub kind: PolicyLossKind,
    /// Lower clip range (GRPO): ratios below `1 - clip_low` stop helping negative advantages.
    pub clip_low: f64,
    /// Upper clip range: GRPO clips at `1 + clip_high`; CISPO truncates the weight at `clip_high`
    /// (the reference's `eps_high = 5.0`).
    pub clip_high: f64,
    /// KL coefficient (the reference's beta = 0.1).
    pub beta: f64,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        Self { kind: PolicyLossKind::Grpo, clip_low: 0.2, clip_high: 0.2, beta: 0.1 }
    }
}

/// Token-level statistics of one GRPO loss evaluation (masked means over completion tokens).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrpoLossMetrics {
    /// The loss value.
    pub loss: f32,
    /// Mean k3 KL to the reference per completion token.
    pub kl: f32,
    /// Fraction of completion tokens where the clip (or CISPO truncation) is active.
    pub clip_fraction: f32,
    /// Mean importance ratio `exp(logp - old_logp)`.
    pub ratio_mean: f32,
}

/// GRPO loss and its metrics.
pub struct GrpoOutput {
    /// Scalar loss to back-propagate.
    pub loss: Tensor,
    /// Its statistics.
    pub metrics: GrpoLossMetrics,
}

/// The GRPO objective of spec §13 on completion tokens. `logp`, `old_logp`, `ref_logp`, `mask` are
/// `[N, T]` (mask 1 on completion tokens up to and including the first EOS); `advantages` is `[N]`.
/// `old_logp = None` means "the rollout policy is the current one" (`logp` detached: ratio 1 with
/// the right gradient), which is the reference's single step per rollout batch.
/// Per token: `-(surrogate - beta * k3)`; aggregated as a masked mean per sequence, then the mean
/// over sequences (sample-level, like the reference; an empty completion contributes 0).
pub fn grpo_loss(
    logp: &Tensor,
    old_logp: Option<&Tensor>,
    ref_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &GrpoLossConfig,
) -> Result<GrpoOutput> {
    let mask = mask.to_dtype(DType::F32)?;
    let old = match old_logp {
        Some(o) => o.detach(),
        None => logp.detach(),
    };
    let adv = advantages.to_dtype(DType::F32)?.detach().unsqueeze(1)?; // [N, 1]
    let ratio = (logp - &old)?.exp()?;
    let (surrogate, clipped) = match cfg.kind {
        PolicyLossKind::Grpo => {
            let unclipped = ratio.broadcast_mul(&adv)?;
            let clipped_r = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)?;
            let s = unclipped.minimum(&clipped_r.broadcast_mul(&adv)?)?;
            // TRL's clip ratio: the clip is active where it removes the gradient.
            let r = ratio.detach();
            let neg = adv.lt(0f64)?.to_dtype(DType::F32)?;
            let pos = adv.gt(0f64)?.to_dtype(DType::F32)?;
            let low = r.lt(1.0 - cfg.clip_low)?.to_dtype(DType::F32)?.broadcast_mul(&neg)?;
            let high = r.gt(1.0 + cfg.clip_high)?.to_dtype(DType::F32)?.broadcast_mul(&pos)?;
            (s, (low + high)?)
        }
        PolicyLossKind::Cispo => {
            let w = ratio.detach().minimum(cfg.clip_high)?;
            let s = w.broadcast_mul(&adv)?.mul(logp)?;
            (s, ratio.detach().gt(cfg.clip_high)?.to_dtype(DType::F32)?)
        }
    };
    let kl = k3_kl(logp, ref_logp)?;
    let per_tok = (surrogate - (&kl * cfg.beta)?)?.neg()?;
    let counts = mask.sum(1)?.clamp(1.0, f64::INFINITY)?; // [N]
    let per_seq = (per_tok * &mask)?.sum(1)?.div(&counts)?;
    let loss = per_seq.mean_all()?;
    let total = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    let masked_mean = |t: &Tensor| -> Result<f32> { Ok((t.detach() * &mask)?.sum_all()?.to_scalar::<f32>()? / total) };
    let metrics = GrpoLossMetrics {
        loss: loss.to_scalar::<f32>()?,
        kl: masked_mean(&kl)?,
        clip_fraction: masked_mean(&clipped)?,
        ratio_mean: masked_mean(&ratio)?,
    };
    Ok(GrpoOutput { loss, metrics })
}

/// Advantages and returns of one response from [`gae`].
#[derive(Clone, Debug, PartialEq)]
pub struct Gae {
    /// `A_t`, one per response token.
    pub advantages: Vec<f32>,
    /// `A_t + V_t`: the critic's regression targets.
    pub returns: Vec<f32>,
}

/// Generalised advantage estimation (spec §12 step 5) over one response: `rewards[t]` and
/// `values[t]` per response token (PPO puts the scalar reward on the last token and zeros before
/// it). Backwards from the end, with the value after the last token 0 (the episode ends there):
/// `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = δ_t + γ·λ·A_{t+1}`, and `returns = A + V`. Computed in f64.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lambda: f64) -> Gae {
    assert_eq!(rewards.len(), values.len(), "gae: one reward and one value per token");
    let n = values.len();
    let (mut advantages, mut returns) = (vec![0f32; n], vec![0f32; n]);
    let (mut next_value, mut next_adv) = (0f64, 0f64);
    for t in (0..n).rev() {
        let v = values[t] as f64;
        let delta = rewards[t] as f64 + gamma * next_value - v;
        next_adv = delta + gamma * lambda * next_adv;
        next_value = v;
        advantages[t] = next_adv as f32;
        returns[t] = (next_adv + v) as f32;
    }
    Gae { advantages, returns }
}

/// The epsilon of PPO's advantage whitening (spec §12 step 5).
pub const WHITEN_EPS: f64 = 1e-8;

/// Whitened values `(x − mean) / sqrt(var + 1e-8)` with the population variance over all of `x`
/// (PPO passes every response token of the rollout batch). Computed in f64.
pub fn whiten(x: &[f32]) -> Vec<f32> {
    if x.is_empty() {
        return Vec::new();
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let scale = 1.0 / (var + WHITEN_EPS).sqrt();
    x.iter().map(|&v| ((v as f64 - mean) * scale) as f32).collect()
}

/// `1 − Var(returns − values) / Var(returns)`: how much of the returns' variance the critic
/// explains (1 perfect, 0 no better than a constant, negative worse). `None` when the returns do
/// not vary.
pub fn explained_variance(values: &[f32], returns: &[f32]) -> Option<f64> {
    let var = |it: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = it.collect();
        let n = v.len().max(1) as f64;
        let m = v.iter().sum::<f64>() / n;
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n
    };
    let vr = var(&mut returns.iter().map(|&r| r as f64));
    if returns.is_empty() || vr == 0.0 {
        return None;
    }
    let vd = var(&mut returns.iter().zip(values).map(|(&r, &v)| r as f64 - v as f64));
    Some(1.0 - vd / vr)
}

/// Token statistics of one PPO policy-loss evaluation (masked means over response tokens).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PpoPolicyMetrics {
    /// The clipped surrogate alone.
    pub policy_loss: f32,
    /// Mean k3 KL to the reference.
    pub kl: f32,
    /// `0.5 · mean((logp − old_logp)²)`, the early-stop criterion.
    pub approx_kl: f32,
    /// Fraction of tokens whose ratio is outside `1 ± clip`.
    pub clip_fraction: f32,
}

/// `Σ x·mask / max(Σ mask, 1)`: the mean over the masked-in tokens of a `[N, T]` tensor.
fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let count = mask.sum_all()?.clamp(1.0, f64::INFINITY)?;
    (x * mask)?.sum_all()?.div(&count)
}

/// PPO's actor loss (spec §12 step 6) over response tokens, as token-level masked means over the
/// minibatch: `mean(max(−A·r, −A·clip(r, 1 − clip, 1 + clip))) + kl_coef · mean(k3)` with
/// `r = exp(logp − old_logp)` and k3 against the frozen reference. `logp` carries gradients;
/// `old_logp`, `ref_logp` and `advantages` (whitened, per token) are constants; all are `[N, T]`.
pub fn ppo_policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
    kl_coef: f64,
) -> Result<(Tensor, PpoPolicyMetrics)> {
    let mask = mask.to_dtype(DType::F32)?;
    let adv = advantages.to_dtype(DType::F32)?.detach();
    let log_ratio = (logp - old_logp.detach())?;
    let ratio = log_ratio.exp()?;
    let unclipped = (adv.neg()? * &ratio)?;
    let clipped = (adv.neg()? * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let policy = masked_mean(&unclipped.maximum(&clipped)?, &mask)?;
    let kl = masked_mean(&k3_kl(logp, ref_logp)?, &mask)?;
    let loss = (&policy + (&kl * kl_coef)?)?;
    let scalar = |t: &Tensor| -> Result<f32> { t.detach().to_scalar::<f32>() };
    let outside = (ratio.detach() - 1.0)?.abs()?.gt(clip)?.to_dtype(DType::F32)?;
    let metrics = PpoPolicyMetrics {
        policy_loss: scalar(&policy)?,
        kl: scalar(&kl)?,
        approx_kl: 0.5 * scalar(&masked_mean(&log_ratio.detach().sqr()?, &mask)?)?,
        clip_fraction: scalar(&masked_mean(&outside, &mask)?)?,
    };
    Ok((loss, metrics))
}

/// PPO's critic loss (spec §12 step 6): `0.5 · mean(max((V − R)², (clip(V, V_old ± clip) − R)²))`
/// over response tokens (token-level masked mean). `values` carries gradients; `old_values` (the
/// critic at rollout time) and `returns` are constants; all are `[N, T]`.
pub fn ppo_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?;
    let (old, ret) = (old_values.detach(), returns.detach());
    let clipped = values.clamp(&(&old - clip)?, &(&old + clip)?)?;
    let a = (values - &ret)?.sqr()?;
    let b = (clipped - &ret)?.sqr()?;
    masked_mean(&a.maximum(&b)?, &mask)? * 0.5
}

#[cfg(test)]
mod tests;
