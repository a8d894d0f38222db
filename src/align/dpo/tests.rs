//! DPO on a tiny random model: learns the preference (full fine-tuning and LoRA), keeps the reference
//! frozen, and resumes bit-identically after an interrupt.

use super::*;
use crate::model::lora::{LoraConfig, Targets};
use crate::model::ModelConfig;
use crate::train::batch::IGNORE;
use candle_core::Device;

fn cfg() -> ModelConfig {
    let mut c = ModelConfig::dense(32, 2, 4, 2);
    c.vocab_size = 50;
    c.intermediate_size = 48;
    c.max_position_embeddings = 128;
    c
}

/// Prompt `[1, a, b, c]`; chosen answer `[20, 21, 22, 2]`, rejected `[30, 31, 32, 2]` (masked).
fn pairs(n: usize) -> PairRows {
    let side = |p: &[u32], ans: &[u32]| {
        let ids: Vec<u32> = p.iter().chain(ans).copied().collect();
        let mask = p.iter().map(|_| 0).chain(ans.iter().map(|_| 1)).collect();
        Sample { ids, mask }
    };
    let v = (0..n)
        .map(|i| {
            let i = i as u32;
            let p = [1, 3 + i % 7, 4 + (i * 3) % 11, 5 + (i * 5) % 13];
            (side(&p, &[20, 21, 22, 2]), side(&p[..3 + (i as usize % 2)], &[30, 31, 32, 2]))
        })
        .collect();
    PairRows::new(v, 0)
}

fn opts(dir: &std::path::Path, lr: f64, steps: usize) -> TrainOptions {
    let mut o = TrainOptions::new("dpo", dir.to_path_buf());
    o.lr = lr;
    o.batch_size = 4;
    o.max_steps = Some(steps);
    o.seed = 3;
    o
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Packing a batch's sequences changes only its rows: every sequence's score, the DPO loss and
/// every parameter gradient equal the unpacked batch's (to 1e-5), on the fused and the composite
/// path, with fewer rows.
#[test]
fn packed_pair_batches_score_and_train_like_unpacked_ones() {
    let m = MiniMind::new(&cfg(), 4, &Device::Cpu).unwrap();
    let (plain, packed) = (pairs(5), pairs(5).packed(24));
    let idx = [3, 0, 4, 1];
    for fused in [true, false] {
        let go = |d: &PairRows| {
            let b = d.batch(&idx).unwrap();
            let (ids, labels) = (b.input_tensor(&Device::Cpu).unwrap(), b.label_tensor(&Device::Cpu).unwrap());
            let lp = sequence_scores(&batch_logits(&m, &ids, &b, true).unwrap().0, &labels, &b).unwrap();
            let k = b.indices.len();
            // A fixed reference (the detached scores with the sides swapped), so the loss is away
            // from log 2 and every score gets a gradient.
            let r = lp.detach();
            let side = |t: &Tensor, at: usize| t.narrow(0, at, k).unwrap();
            let out = dpo_loss(&side(&lp, 0), &side(&lp, k), &side(&r, k), &side(&r, 0), 0.1).unwrap();
            let g = out.loss.backward().unwrap();
            (b.batch_size, flat(&lp), out.loss.to_scalar::<f32>().unwrap(), g)
        };
        let run = |d: &PairRows| if fused { go(d) } else { crate::model::ops::with_composite(|| go(d)) };
        let (rows_u, lp_u, loss_u, g_u) = run(&plain);
        let (rows_p, lp_p, loss_p, g_p) = run(&packed);
        assert_eq!(rows_u, 8);
        assert!(rows_p < 4, "fused={fused}: {rows_p} packed rows");
        for (a, b) in lp_p.iter().zip(&lp_u) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "fused={fused}: scores {lp_p:?} vs {lp_u:?}");
        }
        assert!((loss_p - loss_u).abs() <= 1e-5 * loss_u, "fused={fused}: loss {loss_p} vs {loss_u}");
        for (name, var) in m.params() {
            let (a, b) = (g_p.get(var.as_tensor()).unwrap(), g_u.get(var.as_tensor()).unwrap());
            let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            assert!(num <= 1e-5 * den, "fused={fused} {name}: gradient rel err {}", num / den);
        }
    }
}

#[test]
fn pair_batches_put_chosen_rows_first_and_pad_labels() {
    let d = pairs(3);
    let b = d.batch(&[2, 0]).unwrap();
    assert_eq!(b.batch_size, 4);
    assert_eq!(b.seq_len, 8);
    let row = |r: usize| &b.input_ids[r * 8..(r + 1) * 8];
    let lab = |r: usize| &b.labels[r * 8..(r + 1) * 8];
    assert_eq!(&row(0)[4..], &[20, 21, 22, 2], "row 0 = chosen of pair 2");
    assert_eq!(&row(1)[4..], &[20, 21, 22, 2], "row 1 = chosen of pair 0");
    assert_eq!(row(3), &[1, 3, 4, 30, 31, 32, 2, 0], "row 3 = rejected of pair 0, right-padded");
    assert_eq!(lab(3), &[IGNORE, IGNORE, IGNORE, 30, 31, 32, 2, IGNORE]);
}

#[test]
fn full_finetune_dpo_learns_the_preference_and_keeps_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let policy = MiniMind::new(&cfg(), 1, &Device::Cpu).unwrap();
    let reference = frozen_reference(&policy).unwrap();
    let data = pairs(8);
    let before = evaluate_dpo(&policy, &reference, &data, 0.5, 8).unwrap();
    assert!((before.loss - std::f32::consts::LN_2).abs() < 1e-5, "policy == reference: loss ln 2");
    let ref_logits =
        reference.forward_logits(&data.batch(&[0]).unwrap().input_tensor(&Device::Cpu).unwrap(), None).unwrap();

    let mut seen = Vec::new();
    let params = policy.params().to_vec();
    let s = train_dpo(
        &policy,
        &params,
        &reference,
        None,
        &data,
        &opts(dir.path(), 5e-3, 12),
        0.5,
        &CancelToken::new(),
        |i, m| seen.push((i, m.clone())),
    )
    .unwrap();
    assert_eq!(s.steps, 12);
    assert_eq!(seen.len(), 12);
    assert_eq!(seen.last().unwrap().0, 11);
    let after = evaluate_dpo(&policy, &reference, &data, 0.5, 8).unwrap();
    assert!(after.loss < 0.3, "DPO loss {} -> {}", before.loss, after.loss);
    assert_eq!(after.rewards_accuracy, 1.0);
    assert!(after.rewards_margin > 1.0, "{after:?}");
    assert!(after.rewards_chosen > after.rewards_rejected);
    let again = reference.forward_logits(&data.batch(&[0]).unwrap().input_tensor(&Device::Cpu).unwrap(), None).unwrap();
    assert_eq!(flat(&ref_logits), flat(&again), "the reference must stay frozen");
}

#[test]
fn lora_dpo_trains_only_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let init = MiniMind::new(&cfg(), 2, &Device::Cpu).unwrap();
    let named = init.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    let mut policy = MiniMind::from_tensors(&cfg(), named, &Device::Cpu, false).unwrap();
    let lc = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, targets: Targets::AllLinear, seed: 1 };
    let ad = LoraAdapters::attach(&mut policy, &lc).unwrap();
    let reference = frozen_reference(&policy).unwrap();
    let base_before: Vec<Vec<f32>> = policy.named_tensors().iter().map(|(_, t)| flat(t)).collect();
    let data = pairs(8);
    let params = ad.params();
    train_dpo(
        &policy,
        &params,
        &reference,
        Some(&ad),
        &data,
        &opts(dir.path(), 1e-2, 12),
        0.5,
        &CancelToken::new(),
        |_, _| {},
    )
    .unwrap();
    let after = evaluate_dpo(&policy, &reference, &data, 0.5, 8).unwrap();
    assert!(after.loss < 0.4, "{after:?}");
    assert_eq!(after.rewards_accuracy, 1.0);
    let base_after: Vec<Vec<f32>> = policy.named_tensors().iter().map(|(_, t)| flat(t)).collect();
    assert_eq!(base_before, base_after, "base weights are frozen under LoRA");
}

#[test]
fn interrupted_dpo_resumes_bit_identically() {
    let data = pairs(8);
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let policy = MiniMind::new(&cfg(), 4, &Device::Cpu).unwrap();
        let reference = frozen_reference(&policy).unwrap();
        let cancel = CancelToken::new();
        let mut idx = Vec::new();
        let params = policy.params().to_vec();
        let r = train_dpo(&policy, &params, &reference, None, &data, &opts(dir, 5e-3, 6), 0.5, &cancel, |i, _| {
            idx.push(i);
            if Some(i) == stop_after {
                cancel.cancel();
            }
        });
        (r.map(|s| s.losses), policy.named_tensors().iter().map(|(_, t)| flat(t)).collect::<Vec<_>>(), idx)
    };
    let a = tempfile::tempdir().unwrap();
    let (la, wa, _) = run(a.path(), None);
    let b = tempfile::tempdir().unwrap();
    let (lb, _, idx) = run(b.path(), Some(2));
    assert!(lb.unwrap_err().downcast_ref::<crate::cancel::Interrupted>().is_some());
    assert_eq!(idx, vec![0, 1, 2]);
    let (lc, wc, idx) = run(b.path(), None);
    assert_eq!(idx, vec![3, 4, 5], "metrics continue after the resume");
    assert_eq!(la.unwrap(), lc.unwrap());
    assert_eq!(wa, wc, "resumed weights equal the uninterrupted run's");
}
