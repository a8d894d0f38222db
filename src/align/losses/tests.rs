//! Hand-computed checks of the alignment losses and their gradients.

use super::*;
use candle_core::{Device, Tensor, Var};

const DEV: Device = Device::Cpu;

fn close(a: f32, b: f64, tol: f64, what: &str) {
    assert!(((a as f64) - b).abs() <= tol, "{what}: got {a}, want {b}");
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

#[test]
fn log_softmax_matches_hand_values() {
    let x = Tensor::new(&[[1f32, 2., 3.]], &DEV).unwrap();
    let got = vec1(&log_softmax_last(&x).unwrap());
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    for (g, v) in got.iter().zip([1.0, 2.0, 3.0]) {
        close(*g, v - lse, 1e-6, "log_softmax");
    }
    // Large logits do not overflow.
    let big = Tensor::new(&[[1000f32, 1000.]], &DEV).unwrap();
    for g in vec1(&log_softmax_last(&big).unwrap()) {
        close(g, -(2f64.ln()), 1e-6, "log_softmax(big)");
    }
}

/// Logits whose softmax is exactly [0.25, 0.5, 0.25] (or a permutation).
fn ln(v: f64) -> f32 {
    v.ln() as f32
}

#[test]
fn sequence_logprobs_sum_masked_shifted_targets() {
    // B=2, T=3, V=3. Position t predicts labels[t+1].
    let p = |hi: usize| {
        let mut r = [ln(1.0), ln(1.0), ln(1.0)];
        r[hi] = ln(2.0);
        r
    };
    let logits = Tensor::new(&[[p(1), p(2), p(0)], [p(0), p(0), p(0)]], &DEV).unwrap();
    // Row 0: targets [1, 2, ignored] → ln .5 + ln .5 (both hit the 0.5 token).
    // Row 1: targets [ignored (prompt), 2, ignored] → ln .25.
    let labels = Tensor::new(&[[IGNORE, 1, 2], [IGNORE, IGNORE, 2]], &DEV).unwrap();
    let (targets, mask) = shift_targets(&labels).unwrap();
    assert_eq!(targets.to_vec2::<i64>().unwrap(), vec![vec![1, 2, IGNORE], vec![IGNORE, 2, IGNORE]]);
    assert_eq!(mask.to_vec2::<f32>().unwrap(), vec![vec![1., 1., 0.], vec![0., 1., 0.]]);
    let s = vec1(&sequence_logprobs(&logits, &labels).unwrap());
    close(s[0], 2.0 * 0.5f64.ln(), 1e-6, "row 0");
    close(s[1], 0.25f64.ln(), 1e-6, "row 1");
    let (lp, _) = masked_token_logprobs(&logits, &labels).unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    assert_eq!(lp[1][0], 0.0, "masked positions hold 0");
}

#[test]
fn sequence_logprobs_gradient_is_onehot_minus_softmax() {
    let logits = Var::new(&[[[0f32, ln(2.0), 0.]]], &DEV).unwrap(); // probs .25 .5 .25
    let labels = Tensor::new(&[[IGNORE, 1]], &DEV).unwrap(); // position 0 predicts token 1
    let logits2 = Tensor::cat(&[logits.as_tensor(), &Tensor::zeros((1, 1, 3), DType::F32, &DEV).unwrap()], 1).unwrap();
    let s = sequence_logprobs(&logits2, &labels).unwrap().sum_all().unwrap();
    let g = s.backward().unwrap();
    let gl = vec1(g.get(logits.as_tensor()).expect("logits get a gradient"));
    for (a, b) in gl.iter().zip([-0.25, 0.5, -0.25]) {
        close(*a, b, 1e-6, "d logp / d logits");
    }
}

#[test]
fn log_sigmoid_is_stable() {
    let x = Tensor::new(&[-100f32, -1., 0., 1., 100.], &DEV).unwrap();
    let got = vec1(&log_sigmoid(&x).unwrap());
    let want = [-100.0, -(1.0 + 1f64.exp()).ln(), -(2f64.ln()), -(1.0 + (-1f64).exp()).ln(), 0.0];
    for (g, w) in got.iter().zip(want) {
        close(*g, w, 1e-5, "log_sigmoid");
    }
}

#[test]
fn dpo_loss_and_metrics_match_hand_computation() {
    let pi_c = Var::new(&[-1f32, -2.], &DEV).unwrap();
    let pi_r = Var::new(&[-3f32, -1.], &DEV).unwrap();
    let ref_c = Var::new(&[-1.5f32, -2.], &DEV).unwrap();
    let ref_r = Tensor::new(&[-2.5f32, -1.5], &DEV).unwrap();
    let beta = 0.5;
    let out = dpo_loss(pi_c.as_tensor(), pi_r.as_tensor(), ref_c.as_tensor(), &ref_r, beta).unwrap();
    // chosen log-ratios [0.5, 0], rejected [-0.5, 0.5] → z = beta * [1.0, -0.5] = [0.5, -0.25].
    let want = ((1.0 + (-0.5f64).exp()).ln() + (1.0 + 0.25f64.exp()).ln()) / 2.0;
    close(out.loss.to_scalar::<f32>().unwrap(), want, 1e-6, "loss");
    let m = &out.metrics;
    close(m.loss, want, 1e-6, "metrics.loss");
    close(m.rewards_chosen, 0.125, 1e-6, "rewards/chosen");
    close(m.rewards_rejected, 0.0, 1e-6, "rewards/rejected");
    close(m.rewards_accuracy, 0.5, 1e-6, "rewards/accuracy");
    close(m.rewards_margin, 0.125, 1e-6, "rewards/margin");
    close(m.logps_chosen, -1.5, 1e-6, "logps/chosen");
    let json = serde_json::to_value(m).unwrap();
    assert!(json.get("rewards/accuracy").is_some(), "TRL metric names: {json}");

    let g = out.loss.backward().unwrap();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    // dL/dpi_c_i = -(beta / B) * sigmoid(-z_i); dL/dpi_r_i is its negation.
    let gc = vec1(g.get(pi_c.as_tensor()).unwrap());
    let gr = vec1(g.get(pi_r.as_tensor()).unwrap());
    for (i, z) in [0.5, -0.25].into_iter().enumerate() {
        close(gc[i], -(beta / 2.0) * sig(-z), 1e-6, "d/dpi_c");
        close(gr[i], (beta / 2.0) * sig(-z), 1e-6, "d/dpi_r");
    }
    assert!(g.get(ref_c.as_tensor()).is_none(), "the reference must not receive gradients");
}

#[test]
fn group_advantages_normalise_within_groups_and_report_zero_std() {
    let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1, 0.1];
    let a = group_advantages(&r, 4, 1e-4).unwrap();
    let v = 0.5 / (0.5 + 1e-4);
    for (g, w) in a.advantages[..4].iter().zip([v, -v, -v, v]) {
        close(*g, w, 1e-6, "group 0");
    }
    // All-equal groups give exact zeros, even 0.1 whose mean is not exactly 0.1 in floating point.
    assert!(a.advantages[4..].iter().all(|&x| x == 0.0), "{:?}", a.advantages);
    assert_eq!(a.zero_std_groups, 2);
    assert_eq!(a.groups, 3);
    close(a.mean_group_std, 0.5 / 3.0, 1e-6, "mean group std");

    // Uneven group sizes: population std (divide by n).
    let b = group_advantages(&[0.0, 0.0, 3.0], 3, 0.0).unwrap();
    let std = (2.0f64).sqrt(); // values 0,0,3: mean 1, var (1+1+4)/3 = 2
    close(b.advantages[2], 2.0 / std, 1e-6, "population std");

    assert!(matches!(group_advantages(&[1.0; 7], 4, 1e-4), Err(LossError::BadGroups { n: 7, group_size: 4 })));
    assert!(matches!(group_advantages(&[1.0; 4], 0, 1e-4), Err(LossError::BadGroups { .. })));
    let e = group_advantages(&[1.0, 2.0, f32::NAN, 0.0], 2, 1e-4).unwrap_err();
    assert!(matches!(e, LossError::NonFiniteReward { index: 2, group: 1, .. }), "{e}");
    assert!(e.to_string().contains("finite"), "{e}");
}

#[test]
fn k3_kl_values_and_gradient() {
    let logp = Var::new(&[0.5f64.ln() as f32, 0.3f64.ln() as f32], &DEV).unwrap();
    let refl = Tensor::new(&[0.25f64.ln() as f32, 0.3f64.ln() as f32], &DEV).unwrap();
    let kl = k3_kl(logp.as_tensor(), &refl).unwrap();
    let v = vec1(&kl);
    close(v[0], 0.5 + 2f64.ln() - 1.0, 1e-6, "k3");
    close(v[1], 0.0, 1e-7, "k3 at equality");
    let g = kl.sum_all().unwrap().backward().unwrap();
    let gl = vec1(g.get(logp.as_tensor()).unwrap());
    close(gl[0], 1.0 - 0.5, 1e-6, "dk3/dlogp = 1 - exp(ref - logp)");
    close(gl[1], 0.0, 1e-6, "dk3/dlogp at equality");
}

#[test]
fn grpo_clipped_objective_matches_hand_computation() {
    // logp = 0 everywhere; old log-probs chosen so the ratios are as listed.
    let ratios = [[1.5f64, 1.0, 0.5], [1.5, 0.7, 1.0]];
    let old: Vec<Vec<f32>> = ratios.iter().map(|r| r.iter().map(|x| -(x.ln()) as f32).collect()).collect();
    let old = Tensor::new(vec![old[0].clone(), old[1].clone()], &DEV).unwrap();
    let logp = Var::zeros((2, 3), DType::F32, &DEV).unwrap();
    let adv = Tensor::new(&[1f32, -2.], &DEV).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &DEV).unwrap();
    let cfg = GrpoLossConfig { kind: PolicyLossKind::Grpo, clip_low: 0.2, clip_high: 0.2, beta: 0.0 };
    let out = grpo_loss(logp.as_tensor(), Some(&old), logp.as_tensor(), &adv, &mask, &cfg).unwrap();
    // Row 0 (A=1): min(1.5,1.2)=1.2 (clipped), 1.0, min(0.5,0.8)=0.5 → mean 0.9.
    // Row 1 (A=-2): min(-3,-2.4)=-3, min(-1.4,-1.6)=-1.6 (clipped), masked → mean -2.3.
    close(out.metrics.loss, (-0.9 + 2.3) / 2.0, 1e-6, "loss");
    close(out.metrics.clip_fraction, 2.0 / 5.0, 1e-6, "clip fraction");
    close(out.metrics.ratio_mean, (1.5 + 1.0 + 0.5 + 1.5 + 0.7) / 5.0, 1e-6, "ratio mean");
    close(out.metrics.kl, 0.0, 1e-7, "kl");
    let g = out.loss.backward().unwrap();
    let gl = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    // d/dlogp = -A * r / (N * n_i) where the unclipped branch is active, else 0.
    let want = [[0.0, -1.0 / 6.0, -0.5 / 6.0], [0.75, 0.0, 0.0]];
    for (gr, wr) in gl.iter().zip(want) {
        for (g, w) in gr.iter().zip(wr) {
            close(*g, w, 1e-6, "grpo gradient");
        }
    }
}

#[test]
fn grpo_on_policy_with_kl_matches_hand_computation() {
    let logp = Var::zeros((2, 2), DType::F32, &DEV).unwrap();
    let refl = Tensor::full(-(2f64.ln()) as f32, (2, 2), &DEV).unwrap();
    let adv = Tensor::new(&[1f32, -2.], &DEV).unwrap();
    let mask = Tensor::ones((2, 2), DType::F32, &DEV).unwrap();
    let cfg = GrpoLossConfig { beta: 0.1, ..Default::default() };
    let out = grpo_loss(logp.as_tensor(), None, &refl, &adv, &mask, &cfg).unwrap();
    let k3 = 0.5 + 2f64.ln() - 1.0;
    close(out.metrics.kl, k3, 1e-6, "kl");
    close(out.metrics.loss, (-(1.0 - 0.1 * k3) + (2.0 + 0.1 * k3)) / 2.0, 1e-6, "loss");
    close(out.metrics.clip_fraction, 0.0, 0.0, "no clipping on-policy");
    let g = out.loss.backward().unwrap();
    let gl = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    // (-A + beta * (1 - exp(ref - logp))) / (N * T).
    close(gl[0][0], (-1.0 + 0.1 * 0.5) / 4.0, 1e-6, "row 0");
    close(gl[1][1], (2.0 + 0.1 * 0.5) / 4.0, 1e-6, "row 1");
}

#[test]
fn cispo_truncates_the_detached_weight() {
    let logp = Var::new(&[[-1f32, -1.]], &DEV).unwrap();
    let old = Tensor::new(&[[-1.0 - 1.5f64.ln() as f32, -1.0 - 6f64.ln() as f32]], &DEV).unwrap();
    let adv = Tensor::new(&[1f32], &DEV).unwrap();
    let mask = Tensor::ones((1, 2), DType::F32, &DEV).unwrap();
    let cfg = GrpoLossConfig { kind: PolicyLossKind::Cispo, clip_low: 0.0, clip_high: 5.0, beta: 0.0 };
    let out = grpo_loss(logp.as_tensor(), Some(&old), logp.as_tensor(), &adv, &mask, &cfg).unwrap();
    close(out.metrics.loss, (1.5 + 5.0) / 2.0, 1e-5, "cispo loss");
    close(out.metrics.clip_fraction, 0.5, 1e-6, "truncated fraction");
    let g = out.loss.backward().unwrap();
    let gl = vec1(g.get(logp.as_tensor()).unwrap());
    close(gl[0], -1.5 / 2.0, 1e-5, "cispo grad 0");
    close(gl[1], -5.0 / 2.0, 1e-5, "cispo grad 1 (truncated)");
}

#[test]
fn empty_completion_contributes_zero() {
    let logp = Var::zeros((2, 2), DType::F32, &DEV).unwrap();
    let adv = Tensor::new(&[1f32, 1.], &DEV).unwrap();
    let mask = Tensor::new(&[[1f32, 1.], [0., 0.]], &DEV).unwrap();
    let cfg = GrpoLossConfig { beta: 0.0, ..Default::default() };
    let out = grpo_loss(logp.as_tensor(), None, logp.as_tensor(), &adv, &mask, &cfg).unwrap();
    close(out.metrics.loss, -0.5, 1e-6, "mean over sequences, empty one counts 0");
}

#[test]
fn bradley_terry_loss_and_gradient_match_hand_values() {
    // Pairs: d = r_c - r_r = [1, -2]; margin 0.5 → z = [0.5, -2.5].
    let rc = Var::new(&[2f32, 0.], &DEV).unwrap();
    let rr = Var::new(&[1f32, 2.], &DEV).unwrap();
    let out = bradley_terry_loss(rc.as_tensor(), rr.as_tensor(), 0.5).unwrap();
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    let (z0, z1) = (0.5, -2.5);
    let want = -(sig(z0).ln() + sig(z1).ln()) / 2.0;
    close(out.metrics.loss, want, 1e-6, "loss");
    close(out.loss.to_scalar::<f32>().unwrap(), want, 1e-6, "loss tensor");
    close(out.metrics.accuracy, 0.5, 0.0, "accuracy");
    close(out.metrics.margin, -0.5, 1e-6, "margin (of the raw scores)");
    close(out.metrics.rewards_chosen, 1.0, 1e-6, "chosen");
    close(out.metrics.rewards_rejected, 1.5, 1e-6, "rejected");
    // d loss / d r_c = -(1 - sigmoid(z)) / B, and the opposite for r_r.
    let g = out.loss.backward().unwrap();
    let gc = vec1(g.get(rc.as_tensor()).unwrap());
    let gr = vec1(g.get(rr.as_tensor()).unwrap());
    for (i, z) in [z0, z1].into_iter().enumerate() {
        close(gc[i], -(1.0 - sig(z)) / 2.0, 1e-6, "d/d r_c");
        close(gr[i], (1.0 - sig(z)) / 2.0, 1e-6, "d/d r_r");
    }
    // Without a margin it is DPO's loss with beta 1 on the score difference.
    let plain = bradley_terry_loss(rc.as_tensor(), rr.as_tensor(), 0.0).unwrap().metrics.loss;
    close(plain, -(sig(1.0).ln() + sig(-2.0).ln()) / 2.0, 1e-6, "no margin");
}

#[test]
fn distill_loss_and_gradient_match_hand_values() {
    // Two rows, V = 2; row 1 is ignored. Student logits (0, ln 3) → p_s = (1/4, 3/4) at T = 1;
    // teacher logits (0, 0) → p_t = (1/2, 1/2). T = 2, alpha = 0.25, target id 1.
    let (alpha, temp) = (0.25f64, 2.0f64);
    let s = Var::new(&[[0f32, 3f32.ln()], [5., -5.]], &DEV).unwrap();
    let teacher = Tensor::new(&[[0f32, 0.], [1., 2.]], &DEV).unwrap();
    let targets = Tensor::new(&[1i64, IGNORE], &DEV).unwrap();
    let out = distill_loss(s.as_tensor(), &teacher, &targets, alpha, temp).unwrap();
    // At T = 2 the student is softmax(0, ln3 / 2) = (1, √3) / (1 + √3).
    let r3 = 3f64.sqrt();
    let ps = [1.0 / (1.0 + r3), r3 / (1.0 + r3)];
    let ce = -(0.75f64).ln();
    let kl = 0.5 * (0.5 / ps[0]).ln() + 0.5 * (0.5 / ps[1]).ln();
    let kd = temp * temp * kl;
    close(out.metrics.ce, ce, 1e-6, "ce");
    close(out.metrics.kd, kd, 1e-6, "kd");
    close(out.metrics.loss, alpha * ce + (1.0 - alpha) * kd, 1e-6, "loss");
    assert_eq!(out.metrics.tokens, 1);
    // d/ds: alpha (p_s − onehot) + (1 − alpha) T (p_s^T − p_t^T); the ignored row gets nothing.
    let g = vec1(out.loss.backward().unwrap().get(s.as_tensor()).unwrap());
    let want0 = alpha * (0.25 - 0.0) + (1.0 - alpha) * temp * (ps[0] - 0.5);
    let want1 = alpha * (0.75 - 1.0) + (1.0 - alpha) * temp * (ps[1] - 0.5);
    close(g[0], want0, 1e-6, "d/ds[0]");
    close(g[1], want1, 1e-6, "d/ds[1]");
    assert_eq!((g[2], g[3]), (0.0, 0.0), "ignored rows carry no gradient");
    // A student equal to the teacher has kd = 0; with alpha = 1 the loss is the plain CE.
    let same = distill_loss(&teacher, &teacher, &targets, 1.0, temp).unwrap().metrics;
    close(same.kd, 0.0, 1e-7, "kd of identical models");
    close(same.loss, 2f64.ln(), 1e-6, "alpha = 1 is cross-entropy");
    // Nothing trained: a zero loss.
    let none = Tensor::new(&[IGNORE, IGNORE], &DEV).unwrap();
    assert_eq!(distill_loss(s.as_tensor(), &teacher, &none, alpha, temp).unwrap().metrics.tokens, 0);
}

#[test]
fn gae_matches_hand_computation_and_its_limits() {
    let (v, r) = ([0.5f32, 0.2, -0.1], [0f32, 0., 1.]);
    let g = gae(&r, &v, 0.9, 0.8);
    // t=2: δ = 1 + 0 − (−0.1) = 1.1; t=1: δ = 0.9·(−0.1) − 0.2 = −0.29, A = δ + 0.72·1.1;
    // t=0: δ = 0.9·0.2 − 0.5 = −0.32, A = δ + 0.72·A1. The value after the last token is 0.
    let a1 = -0.29 + 0.72 * 1.1;
    let a0 = -0.32 + 0.72 * a1;
    for (got, want) in g.advantages.iter().zip([a0, a1, 1.1]) {
        close(*got, want, 1e-6, "advantage");
    }
    for (got, want) in g.returns.iter().zip([a0 + 0.5, a1 + 0.2, 1.0]) {
        close(*got, want, 1e-6, "return = A + V");
    }
    // γ = λ = 1: Monte-Carlo returns (the final reward everywhere), A = R − V.
    let mc = gae(&r, &v, 1.0, 1.0);
    assert_eq!(mc.returns, vec![1.0, 1.0, 1.0]);
    for (got, want) in mc.advantages.iter().zip([0.5, 0.8, 1.1]) {
        close(*got, want, 1e-6, "MC advantage");
    }
    // λ = 0: one-step TD errors.
    let td = gae(&r, &v, 1.0, 0.0);
    for (got, want) in td.advantages.iter().zip([-0.3, -0.3, 1.1]) {
        close(*got, want, 1e-6, "TD(0) advantage");
    }
    assert_eq!(gae(&[], &[], 1.0, 0.95), Gae { advantages: vec![], returns: vec![] });
}

#[test]
fn whitening_and_explained_variance_match_hand_values() {
    // mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5.
    let w = whiten(&[1.0, 2.0, 3.0, 6.0]);
    let s = (3.5f64 + WHITEN_EPS).sqrt();
    for (got, want) in w.iter().zip([-2.0 / s, -1.0 / s, 0.0, 3.0 / s]) {
        close(*got, want, 1e-6, "whitened");
    }
    // A constant input whitens to zeros, not to noise divided by eps.
    assert!(whiten(&[0.7; 3]).iter().all(|x| x.abs() < 1e-3));
    assert!(whiten(&[]).is_empty());
    // Var(R) = 14/9, Var(R − V) = Var([0, 0, 1]) = 2/9 → 1 − 1/7.
    let ev = explained_variance(&[1.0, 2.0, 3.0], &[1.0, 2.0, 4.0]).unwrap();
    assert!((ev - 6.0 / 7.0).abs() < 1e-9, "{ev}");
    assert_eq!(explained_variance(&[1.0, 2.0], &[1.0, 2.0]), Some(1.0));
    assert_eq!(explained_variance(&[0.3, 0.1], &[2.0, 2.0]), None, "returns that do not vary");
}

#[test]
fn ppo_policy_loss_value_and_gradient_match_hand_computation() {
    let (clip, kl_coef) = (0.2f64, 0.1f64);
    // Row 0: r = 1.3 with A = 2 (clipped at 1.2: no gradient), r = 0.9 with A = −1 (inside), then a
    // masked token. Row 1: r = 0.7 with A = −1.5 (clipped at 0.8: no gradient).
    let p = [[0.65f64, 0.45, 0.9], [0.35, 0.5, 0.5]];
    let old = [[0.5f64, 0.5, 0.1], [0.5, 0.5, 0.5]];
    let refp = [[0.5f64, 0.5, 0.2], [0.4, 0.5, 0.5]];
    let adv = [[2.0f32, -1.0, 9.0], [-1.5, 0.0, 0.0]];
    let mask = [[1f32, 1., 0.], [1., 0., 0.]];
    let lnt = |x: [[f64; 3]; 2]| Tensor::new(&x.map(|r| r.map(|v| v.ln() as f32)), &DEV).unwrap();
    let logp = Var::from_tensor(&lnt(p)).unwrap();
    let mask_t = Tensor::new(&mask, &DEV).unwrap();
    let (loss, m) = ppo_policy_loss(
        logp.as_tensor(),
        &lnt(old),
        &lnt(refp),
        &Tensor::new(&adv, &DEV).unwrap(),
        &mask_t,
        clip,
        kl_coef,
    )
    .unwrap();
    let toks = [(0, 0), (0, 1), (1, 0)];
    let ratio = |(b, t): (usize, usize)| p[b][t] / old[b][t];
    let pg = [-2.0 * 1.2, 1.0 * 0.9, 1.5 * 0.8]; // max(−A·r, −A·clip(r)) per token
    let k3 = |(b, t): (usize, usize)| {
        let d = (refp[b][t] / p[b][t]).ln();
        d.exp() - d - 1.0
    };
    let policy = pg.iter().sum::<f64>() / 3.0;
    let kl = toks.iter().map(|&i| k3(i)).sum::<f64>() / 3.0;
    close(m.policy_loss, policy, 1e-6, "policy loss");
    close(m.kl, kl, 1e-6, "kl");
    close(loss.to_scalar::<f32>().unwrap(), policy + kl_coef * kl, 1e-6, "loss");
    let approx = 0.5 * toks.iter().map(|&i| ratio(i).ln().powi(2)).sum::<f64>() / 3.0;
    close(m.approx_kl, approx, 1e-6, "approx_kl");
    close(m.clip_fraction, 2.0 / 3.0, 1e-6, "clip fraction: r = 1.3 and r = 0.7");
    // d/dlogp: the clipped tokens get only the KL term, kl_coef · (1 − exp(ref − logp)) / 3; the
    // inside token also −A·r / 3; masked tokens nothing.
    let g = logp.as_tensor().clone();
    let grads = loss.backward().unwrap();
    let got = vec1(grads.get(&g).unwrap());
    let dkl = |(b, t): (usize, usize)| kl_coef * (1.0 - refp[b][t] / p[b][t]) / 3.0;
    close(got[0], dkl((0, 0)), 1e-6, "clipped positive-advantage token");
    close(got[1], 0.9 / 3.0 + dkl((0, 1)), 1e-6, "unclipped token");
    close(got[3], dkl((1, 0)), 1e-6, "clipped negative-advantage token");
    for i in [2, 4, 5] {
        assert_eq!(got[i], 0.0, "masked token {i} carries no gradient");
    }
}

#[test]
fn ppo_value_loss_value_and_gradient_match_hand_computation() {
    // Token 0: V = 0.5 leaves [0.0, 0.4]; the clipped error (0.4 − 1)² = 0.36 beats 0.25, so it
    // counts and carries no gradient. Token 1: inside, (1 − 0)² = 1, gradient 2(V − R).
    // Token 2: V = 2 leaves [0.8, 1.2] but the unclipped error 4 is larger: it counts, gradient 4.
    // Token 3 is masked.
    let v = Var::new(&[[0.5f32, 1.0, 2.0, 0.0]], &DEV).unwrap();
    let old = Tensor::new(&[[0.2f32, 0.9, 1.0, 5.0]], &DEV).unwrap();
    let ret = Tensor::new(&[[1.0f32, 0.0, 0.0, 7.0]], &DEV).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1., 0.]], &DEV).unwrap();
    let loss = ppo_value_loss(v.as_tensor(), &old, &ret, &mask, 0.2).unwrap();
    close(loss.to_scalar::<f32>().unwrap(), 0.5 * (0.36 + 1.0 + 4.0) / 3.0, 1e-6, "value loss");
    let g = vec1(loss.backward().unwrap().get(v.as_tensor()).unwrap());
    for (got, want) in g.iter().zip([0.0, 0.5 * 2.0 / 3.0, 0.5 * 4.0 / 3.0, 0.0]) {
        close(*got, want, 1e-6, "d value loss / dV");
    }
}
