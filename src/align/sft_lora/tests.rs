//! LoRA SFT on a tiny model: the loss falls, the base stays bit-identical, merging reproduces the
//! adapted logits, and an interrupted run resumes to the same adapters.

use super::*;
use crate::model::lora::{LoraConfig, Targets};
use crate::model::ModelConfig;
use crate::train::batch::{PaddedRows, IGNORE};
use candle_core::{Device, Tensor};

fn base(seed: u64) -> MiniMind {
    let mut c = ModelConfig::dense(32, 2, 4, 2);
    c.vocab_size = 50;
    c.intermediate_size = 48;
    c.max_position_embeddings = 128;
    let init = MiniMind::new(&c, seed, &Device::Cpu).unwrap();
    let named = init.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    MiniMind::from_tensors(&c, named, &Device::Cpu, false).unwrap()
}

/// Prompt `[1, a, b]` (not trained), answer `[a + 10, b + 10, 2]` (trained).
fn rows() -> PaddedRows {
    let v = (0..12u32)
        .map(|i| {
            let (a, b) = (3 + i % 6, 4 + (i * 7) % 9);
            (vec![1, a, b, a + 10, b + 10, 2], vec![IGNORE, IGNORE, IGNORE, (a + 10) as i64, (b + 10) as i64, 2])
        })
        .collect();
    PaddedRows::new(v, 0, None)
}

fn opts(dir: &std::path::Path, steps: usize) -> TrainOptions {
    let mut o = TrainOptions::new("lora", dir.to_path_buf());
    o.lr = 2e-2;
    o.batch_size = 4;
    o.max_steps = Some(steps);
    o.seed = 9;
    o
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn lora_sft_lowers_the_loss_with_a_frozen_base_and_merges_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = base(1);
    let lc = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.05, targets: Targets::AllLinear, seed: 2 };
    let ad = LoraAdapters::attach(&mut m, &lc).unwrap();
    let before: Vec<Vec<f32>> = m.named_tensors().iter().map(|(_, t)| flat(t)).collect();
    let all = rows().batch(&(0..12).collect::<Vec<_>>()).unwrap();
    let (ids, labels) = (all.input_tensor(&Device::Cpu).unwrap(), all.label_tensor(&Device::Cpu).unwrap());
    let full_loss = |m: &MiniMind| m.forward_train(&ids, &labels).unwrap().0.to_scalar::<f32>().unwrap();
    let first = full_loss(&m);
    let mut o = opts(dir.path(), 30);
    o.lr = 5e-2;
    let s = train_lora(&m, &ad, &rows(), &o, &CancelToken::new()).unwrap();
    assert_eq!(s.steps, 30);
    let last = full_loss(&m);
    // Measured: 3.93 -> 3.66 with this seed; a no-op adapter would leave it unchanged.
    assert!(last < first - 0.15, "loss over all rows {first} -> {last}");
    let after: Vec<Vec<f32>> = m.named_tensors().iter().map(|(_, t)| flat(t)).collect();
    assert_eq!(before, after, "the base is frozen");
    let x = rows().batch(&[0, 1, 2]).unwrap().input_tensor(&Device::Cpu).unwrap();
    let adapted = m.forward_logits(&x, None).unwrap();
    ad.merge(&mut m).unwrap();
    let merged = m.forward_logits(&x, None).unwrap();
    let d =
        (adapted - merged).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "merged logits differ by {d}");
}

#[test]
fn interrupted_lora_resumes_bit_identically() {
    let run = |dir: &std::path::Path, cancel_first: bool| {
        let mut m = base(3);
        let lc = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.1,
            targets: Targets::parse("q_proj,down_proj").unwrap(),
            seed: 2,
        };
        let ad = LoraAdapters::attach(&mut m, &lc).unwrap();
        let cancel = CancelToken::new();
        let o = opts(dir, 6);
        if cancel_first {
            // Stop after 2 steps: a checkpoint is written at the step boundary.
            let data = rows();
            let wrapped = Counting { inner: &data, calls: Default::default(), stop_at: 2, cancel: &cancel };
            let r = train_lora(&m, &ad, &wrapped, &o, &cancel);
            assert!(r.unwrap_err().downcast_ref::<crate::cancel::Interrupted>().is_some());
            return None;
        }
        let s = train_lora(&m, &ad, &rows(), &o, &cancel).unwrap();
        Some((s.losses, ad.params().iter().map(|(_, v)| flat(v.as_tensor())).collect::<Vec<_>>()))
    };
    let a = tempfile::tempdir().unwrap();
    let (la, wa) = run(a.path(), false).unwrap();
    let b = tempfile::tempdir().unwrap();
    assert!(run(b.path(), true).is_none());
    let (lb, wb) = run(b.path(), false).unwrap();
    assert_eq!(la, lb);
    assert_eq!(wa, wb, "resumed adapters equal the uninterrupted run's");
}

/// A batch source that raises `cancel` once `stop_at` batches were served.
struct Counting<'a> {
    inner: &'a PaddedRows,
    calls: std::sync::atomic::AtomicUsize,
    stop_at: usize,
    cancel: &'a CancelToken,
}

impl BatchSource for Counting<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn batch(&self, indices: &[usize]) -> anyhow::Result<Batch> {
        let calls = self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if calls == self.stop_at {
            self.cancel.cancel();
        }
        self.inner.batch(indices)
    }
}
