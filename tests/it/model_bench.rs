//! Throughput probe for the model alone (not run in CI; `cargo test --release --test model_bench
//! -- --ignored --nocapture`). Measures forward+backward tokens/s at the reference's baseline shape
//! (hidden 512, 8 layers, 8 q / 4 kv heads, intermediate 1664, vocab 6400, b8 x t512) for the
//! fused and the composite ops, and greedy KV-cache decoding tokens/s. The full training-step
//! benchmark (with AdamW) is `mmrun bench`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, Tensor};
use mmrun::model::{ops, preset, MiniMind};
use std::time::Instant;

/// CPU seconds (user + system) this process has used, from /proc/self/stat (0 elsewhere). On a
/// shared, oversubscribed machine, tokens per CPU-second × cores estimates uncontended speed.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

#[test]
#[ignore]
fn bench_fwd_bwd_and_decode() {
    let cfg = preset("minimind-small").unwrap();
    let (b, t) = (env_usize("BENCH_B", 8), env_usize("BENCH_T", 512));
    let steps = env_usize("BENCH_STEPS", 3);
    let m = MiniMind::new(&cfg, 0, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 2654435761usize) % cfg.vocab_size) as u32).collect();
    let x = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let labels = x.to_dtype(DType::I64).unwrap();
    let step = || {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let (loss, aux) = m.forward_train(&x, &labels).unwrap();
        let t1 = Instant::now();
        let grads = (loss + aux).unwrap().backward().unwrap();
        let t2 = Instant::now();
        drop(grads);
        let cpu = cpu_seconds() - c0;
        eprintln!(
            "  step: wall {:.2}s, cpu {cpu:.2}s -> {:.0} tokens per CPU-second",
            (t2 - t0).as_secs_f64(),
            (b * t) as f64 / cpu
        );
        ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64())
    };
    let modes: &[&str] =
        if std::env::var("BENCH_COMPOSITE").as_deref() == Ok("1") { &["fused", "composite"] } else { &["fused"] };
    for &mode in modes {
        let run = || {
            step();
            let mut v: Vec<(f64, f64)> = (0..steps).map(|_| step()).collect();
            v.sort_by(|a, b| (a.0 + a.1).partial_cmp(&(b.0 + b.1)).unwrap());
            v[v.len() / 2]
        };
        let (f, bw) = if mode == "composite" { ops::with_composite(run) } else { run() };
        let tps = (b * t) as f64 / (f + bw);
        println!(
            "{mode}: b{b} x t{t}: fwd {f:.3}s bwd {bw:.3}s -> {tps:.0} tokens/s fwd+bwd ({:.0} fwd-only)",
            (b * t) as f64 / f
        );
    }
    // Greedy decoding, batch 1, 24-token prompt, 200 new tokens (baseline.md's generation setup).
    let mf = MiniMind::from_tensors(&cfg, m.named_tensors().into_iter().collect(), &Device::Cpu, false).unwrap();
    let prompt = Tensor::from_vec((1..=24u32).collect::<Vec<_>>(), (1, 24), &Device::Cpu).unwrap();
    let mut cache = mf.new_cache();
    let t0 = Instant::now();
    let mut logits = mf.forward_step(&prompt, &mut cache, 0).unwrap();
    let n_new = 200;
    for i in 0..n_new {
        let next = logits.argmax(candle_core::D::Minus1).unwrap().to_dtype(DType::U32).unwrap();
        logits = mf.forward_step(&next.reshape((1, 1)).unwrap(), &mut cache, 24 + i).unwrap();
    }
    let dt = t0.elapsed().as_secs_f64();
    println!("decode: {:.1} tokens/s (greedy, batch 1, prefill included)", n_new as f64 / dt);
}
