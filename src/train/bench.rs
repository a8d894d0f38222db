//! `mmrun bench`: training and generation throughput on the reference shape, on synthetic tokens.
//!
//! Trains the shape the PyTorch baseline was measured at (hidden 512, 8 layers, 8 q / 4 kv heads,
//! intermediate 1664, vocab 6400, seq 512, batch 8) for a few steps with the real training step
//! (forward, backward, global-norm clip, in-place AdamW), times greedy KV-cache generation at
//! batch 1 in f32 and in bf16 (on the CPU: bf16 weight rows and a bf16 KV cache), and measures
//! the device's f32 and bf16 matmul peaks so that MFU is relative to what
//! this machine can actually do in the precision the step ran in. `--dtype bf16` runs the same
//! step in bf16 mixed precision (on the CPU: the bf16 GEMM of `model::ops::gemm`, `VDPBF16PS` on
//! CPUs where it is fast, the f32 kernels on bf16-rounded operands elsewhere).

use super::optim::{clip_coefficient, global_norm, AdamW, AdamWConfig, GradAccumulator};
use crate::model::{MiniMind, ModelConfig};
use crate::recipe::Precision;
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Options of `mmrun bench` (every shape knob defaults to the baseline's).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `auto`, `cpu` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype, as `[recipe] precision`: `auto` (bf16 on CUDA, AMX and AMD Zen 4/5 CPUs,
    /// else f32), `f32`, or
    /// `bf16` (mixed precision: f32 weights and AdamW state, bf16 matmuls).
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16"])]
    pub dtype: String,
    /// Model width.
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// Decoder blocks.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    /// SwiGLU width.
    #[arg(long, default_value_t = 1664)]
    pub intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 6400)]
    pub vocab: usize,
    /// Training sequence length.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed training steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Tokens to generate (greedy, batch 1, KV cache; 0 skips generation).
    #[arg(long, default_value_t = 200)]
    pub gen_tokens: usize,
    /// Prompt length for generation.
    #[arg(long, default_value_t = 24)]
    pub prompt_len: usize,
    /// Side of the square matmuls used to measure the f32 and bf16 peaks.
    #[arg(long, default_value_t = 2048)]
    pub matmul_size: usize,
}

impl Default for BenchArgs {
    fn default() -> Self {
        Self {
            json: false,
            device: "auto".into(),
            dtype: "auto".into(),
            hidden: 512,
            layers: 8,
            heads: 8,
            kv_heads: 4,
            intermediate: 1664,
            vocab: 6400,
            seq: 512,
            batch: 8,
            steps: 5,
            gen_tokens: 200,
            prompt_len: 24,
            matmul_size: 2048,
        }
    }
}

impl BenchArgs {
    /// The model config the bench trains.
    pub fn model_config(&self) -> ModelConfig {
        let mut cfg = ModelConfig::dense(self.hidden, self.layers, self.heads, self.kv_heads);
        cfg.intermediate_size = self.intermediate;
        cfg.vocab_size = self.vocab;
        cfg
    }
}

/// Model FLOPs per trained token: 6 × parameters for the matmuls of forward + backward, plus
/// attention scores and values, 12 × layers × seq × (heads × head_dim) (the PaLM accounting,
/// which `baseline.md` also uses: ≈ 205 MFLOP for the 30 M reference shape at seq 512).
pub fn train_flops_per_token(cfg: &ModelConfig, seq: usize) -> f64 {
    6.0 * cfg.num_params() as f64
        + 12.0 * cfg.num_hidden_layers as f64 * seq as f64 * (cfg.num_attention_heads * cfg.head_dim) as f64
}

/// Peak resident memory of this process in MiB (`VmHWM`), if the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Best of four timings of `f`, in seconds.
fn best_of_4(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Best-of-N GFLOP/s of an `n × n` by `n × n` f32 matmul on `device`.
pub fn matmul_peak_gflops(device: &Device, n: usize) -> anyhow::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let s = best_of_4(|| {
        let _c = a.matmul(&b)?;
        Ok(device.synchronize()?)
    })?;
    Ok(2.0 * (n as f64).powi(3) / s / 1e9)
}

/// Best-of-N GFLOP/s of an `n × n` by `n × n` matmul the way bf16 training runs it on `device`:
/// on the CPU the bf16 GEMM with B packed beforehand (as weights are, once per optimizer step)
/// and A packed inside; on a GPU candle's bf16 matmul.
pub fn matmul_peak_gflops_bf16(device: &Device, n: usize) -> anyhow::Result<f64> {
    use crate::model::ops::gemm::{gemm, Backend, MatRef, Packed};
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let s = if device.is_cpu() {
        let (av, bv) = (a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        let packed = Packed::new(MatRef::f32(&bv, n, n), Backend::detect());
        let mut c = vec![0f32; n * n];
        best_of_4(|| {
            gemm(MatRef::f32(&av, n, n), &packed, &mut c, n, false);
            Ok(())
        })?
    } else {
        let (a, b) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
        best_of_4(|| {
            let _c = a.matmul(&b)?;
            Ok(device.synchronize()?)
        })?
    };
    Ok(2.0 * (n as f64).powi(3) / s / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Run the benchmark and return the result object:
/// `{"device","threads","dtype","config","train_tokens_per_s","gen_tokens_per_s","peak_rss_mb",
/// "matmul_peak_gflops","mfu", …}`; generation is measured in both precisions
/// (`gen_tokens_per_s_f32`, `gen_tokens_per_s_bf16`), `gen_tokens_per_s` is the run's dtype's.
pub fn run(args: BenchArgs) -> anyhow::Result<serde_json::Value> {
    let spec: crate::recipe::DeviceSpec =
        args.device.parse().map_err(|e| anyhow::anyhow!("{e} in --device: {}", crate::recipe::UnknownDevice::HINT))?;
    let device = super::device::select(spec)?;
    let cfg = args.model_config();
    cfg.validate().context("invalid bench shape; fix the --hidden/--heads/--kv-heads flags")?;
    anyhow::ensure!(args.seq >= 2 && args.batch >= 1, "--seq must be >= 2 and --batch >= 1");

    let peak_f32 = matmul_peak_gflops(&device, args.matmul_size)?;
    let peak_bf16 = matmul_peak_gflops_bf16(&device, args.matmul_size)?;

    let precision = match args.dtype.as_str() {
        "auto" => Precision::Auto,
        "f32" => Precision::F32,
        "bf16" => Precision::Bf16,
        other => anyhow::bail!("unknown --dtype '{other}': use auto, f32 or bf16"),
    };
    let dtype = super::device::compute_dtype(precision, &device);
    let mut model = MiniMind::new(&cfg, 42, &device)?;
    model.set_compute_dtype(dtype)?;
    let params = model.params().to_vec();
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    let mut acc = GradAccumulator::new(params.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut step_times = Vec::new();
    let mut last_loss = f32::NAN;
    // On rayon's pool, as `train` runs its loop.
    super::on_pool(|| -> anyhow::Result<()> {
        for step in 0..=args.steps {
            let ids: Vec<u32> =
                (0..args.batch * args.seq).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
            let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            let input = Tensor::from_vec(ids, (args.batch, args.seq), &device)?;
            let labels = Tensor::from_vec(labels, (args.batch, args.seq), &device)?;
            let t = Instant::now();
            let (ce, aux) = model.forward_train(&input, &labels)?;
            let loss = (ce + aux)?;
            let grads = loss.backward()?;
            acc.clear();
            acc.add(&params, &grads)?;
            drop(grads);
            let norm = global_norm(acc.grads())?;
            opt.step(acc.grads(), 5e-4, clip_coefficient(norm, 1.0))?;
            last_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            device.synchronize()?;
            if step > 0 {
                step_times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(())
    })?;
    acc.clear();
    let step_s = median(step_times);
    let train_tps = (args.batch * args.seq) as f64 / step_s;

    // Generation in both precisions, on a frozen copy laid out as `chat` and `serve` load models.
    let (gen_f32, gen_bf16) = if args.gen_tokens > 0 {
        let weights = model.named_tensors().into_iter().collect();
        let mut frozen = MiniMind::from_tensors(&cfg, weights, &device, false)?;
        frozen.prepare_for_decoding()?;
        let vocab = cfg.vocab_size as u32;
        let prompt: Vec<u32> = (0..args.prompt_len.max(1)).map(|_| rng.random_range(0..vocab)).collect();
        let mut tps = |dt: DType| -> anyhow::Result<f64> {
            frozen.set_compute_dtype(dt)?;
            // Untimed warm-up: the one-time weight layouts (bf16 rows, GEMM panels) are load cost.
            generation_tokens_per_s(&frozen, &prompt, 2)?;
            generation_tokens_per_s(&frozen, &prompt, args.gen_tokens)
        };
        (Some(tps(DType::F32)?), Some(tps(DType::BF16)?))
    } else {
        (None, None)
    };
    let gen_tps = if dtype == DType::BF16 { gen_bf16 } else { gen_f32 };

    let flops = train_flops_per_token(&cfg, args.seq);
    // MFU against the peak of the precision the step ran in.
    let peak = if dtype == DType::BF16 { peak_bf16 } else { peak_f32 };
    let mfu = train_tps * flops / (peak * 1e9);
    Ok(serde_json::json!({
        "device": super::device::describe(&device),
        "threads": candle_core::utils::get_num_threads(),
        "dtype": if dtype == DType::BF16 { "bf16" } else { "f32" },
        "config": {
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
            "intermediate": args.intermediate, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
            "steps": args.steps, "params": cfg.num_params(), "gen_tokens": args.gen_tokens, "prompt_len": args.prompt_len,
        },
        "train_tokens_per_s": train_tps,
        "train_step_s": step_s,
        "train_flops_per_token": flops,
        "gen_tokens_per_s": gen_tps,
        "gen_tokens_per_s_f32": gen_f32,
        "gen_tokens_per_s_bf16": gen_bf16,
        "peak_rss_mb": peak_rss_mb(),
        "matmul_peak_gflops": peak_f32,
        "matmul_peak_gflops_bf16": peak_bf16,
        "bf16_gemm": bf16_gemm_name(&device),
        "mfu": mfu,
        "final_loss": last_loss,
    }))
}

/// Which bf16 matmul runs on `device` (the bench reports it next to the bf16 peak).
fn bf16_gemm_name(device: &Device) -> &'static str {
    use crate::model::ops::gemm::Backend;
    match (device.is_cpu(), Backend::detect()) {
        (false, _) => "device",
        (true, Backend::Amx) => "amx",
        (true, Backend::Avx512Bf16) => "avx512_bf16",
        (true, Backend::Fallback) => "f32 fallback",
    }
}

/// Greedy decoding at batch 1 with the KV cache: `prompt` prefilled, then `tokens` steps; new
/// tokens per second over the whole call (what the baseline's `generate` timing measures).
fn generation_tokens_per_s(model: &MiniMind, prompt: &[u32], tokens: usize) -> anyhow::Result<f64> {
    let device = model.device().clone();
    let t = Instant::now();
    let mut cache = model.new_cache();
    let mut input = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &device)?;
    let mut pos = 0;
    for _ in 0..tokens {
        let logits = model.forward_step(&input, &mut cache, pos)?;
        pos += input.dim(1)?;
        let next = logits.argmax(candle_core::D::Minus1)?.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?[0];
        input = Tensor::from_vec(vec![next], (1, 1), &device)?;
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

/// A human-readable rendering of [`run`]'s result (for `mmrun bench` without `--json`).
pub fn render_text(v: &serde_json::Value) -> String {
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    format!(
        "device {} ({} threads, {})\nconfig {}\ntrain      {} tokens/s ({} s/step)\ngenerate   {} tokens/s f32, {} bf16 (batch 1, greedy, KV cache)\nmatmul     {} GFLOP/s peak f32, {} GFLOP/s bf16 ({})\nMFU        {:.1} % (of the {} peak)\npeak RSS   {} MiB\n",
        v["device"].as_str().unwrap_or("?"),
        v["threads"],
        v["dtype"].as_str().unwrap_or("?"),
        v["config"],
        f("train_tokens_per_s"),
        v["train_step_s"].as_f64().map(|x| format!("{x:.3}")).unwrap_or_default(),
        f("gen_tokens_per_s_f32"),
        f("gen_tokens_per_s_bf16"),
        f("matmul_peak_gflops"),
        f("matmul_peak_gflops_bf16"),
        v["bf16_gemm"].as_str().unwrap_or("?"),
        v["mfu"].as_f64().unwrap_or(f64::NAN) * 100.0,
        v["dtype"].as_str().unwrap_or("?"),
        f("peak_rss_mb"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_per_token_matches_baseline_accounting() {
        let cfg = BenchArgs::default().model_config();
        // 30.025 M parameters, ≈ 205 MFLOP per token at seq 512 (baseline.md).
        assert!((cfg.num_params() as f64 - 30.025e6).abs() < 0.01e6, "{}", cfg.num_params());
        let f = train_flops_per_token(&cfg, 512);
        assert!((f / 1e6 - 205.3).abs() < 1.0, "{f}");
    }

    #[test]
    fn tiny_bench_runs_and_reports_every_field() {
        for dtype in ["f32", "bf16"] {
            let args = BenchArgs {
                device: "cpu".into(),
                dtype: dtype.into(),
                hidden: 32,
                layers: 1,
                heads: 4,
                kv_heads: 2,
                intermediate: 64,
                vocab: 64,
                seq: 16,
                batch: 2,
                steps: 1,
                gen_tokens: 4,
                prompt_len: 3,
                matmul_size: 64,
                json: true,
            };
            let v = run(args).unwrap();
            for k in [
                "device",
                "threads",
                "dtype",
                "config",
                "train_tokens_per_s",
                "gen_tokens_per_s",
                "gen_tokens_per_s_f32",
                "gen_tokens_per_s_bf16",
                "peak_rss_mb",
                "matmul_peak_gflops",
                "matmul_peak_gflops_bf16",
                "bf16_gemm",
                "mfu",
            ] {
                assert!(!v[k].is_null(), "{k} missing in {v}");
            }
            assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0);
            assert_eq!(v["dtype"], dtype);
            assert_eq!(v["gen_tokens_per_s"], v[format!("gen_tokens_per_s_{dtype}")], "the run's dtype's figure");
            // MFU is relative to the peak of the precision the step ran in.
            let peak =
                v[if dtype == "bf16" { "matmul_peak_gflops_bf16" } else { "matmul_peak_gflops" }].as_f64().unwrap();
            let want =
                v["train_tokens_per_s"].as_f64().unwrap() * v["train_flops_per_token"].as_f64().unwrap() / (peak * 1e9);
            assert!((v["mfu"].as_f64().unwrap() - want).abs() <= 1e-9 * want, "{v}");
            assert!(v["final_loss"].as_f64().unwrap().is_finite());
            assert!(!render_text(&v).is_empty());
        }
    }
}

/// The full reference-shape bench, printed (`cargo test --release --lib reference_shape -- --ignored --nocapture`).
#[cfg(test)]
#[test]
#[ignore = "slow: the full benchmark"]
fn reference_shape() {
    let steps = std::env::var("MMRUN_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let v = run(BenchArgs { steps, device: "cpu".into(), ..Default::default() }).unwrap();
    println!("{v}");
}
