//! Golden logits: tiny random Qwen3 / Qwen3-MoE models made by `transformers`
//! (tests/fixtures/make_golden.py) load into mmrun and give the same logits to 1e-4 (f32); a model
//! saved by mmrun and reloaded gives identical logits.

use candle_core::{DType, Device, Tensor};
use mmrun::model::{weights, MiniMind};
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check(case: &str) {
    let dir = fixture(case);
    let model = weights::load_dir(&dir, &Device::Cpu, false).unwrap();
    let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &golden["logits"];
    let got = model.forward_logits(&ids, None).unwrap();
    assert_eq!(got.dims(), want.dims());
    let d = max_abs_diff(&got, want);
    assert!(d < 1e-4, "{case}: max |logit diff| = {d}");

    // Incremental decoding through the KV cache reproduces the last-position logits.
    let (_, t) = ids.dims2().unwrap();
    let mut cache = model.new_cache();
    model.forward_step(&ids.narrow(1, 0, t - 3).unwrap(), &mut cache, 0).unwrap();
    for pos in t - 3..t {
        let step = model.forward_step(&ids.narrow(1, pos, 1).unwrap(), &mut cache, pos).unwrap();
        let d = max_abs_diff(&step, &want.narrow(1, pos, 1).unwrap().squeeze(1).unwrap());
        assert!(d < 1e-4, "{case}: cached step {pos} differs by {d}");
    }

    // Reverse direction: save with mmrun (export folder), reload, identical logits; the
    // exported config parses back to the same architecture.
    let tmp = tempfile::tempdir().unwrap();
    weights::export(&model, None, tmp.path()).unwrap();
    let back = weights::load_dir(tmp.path(), &Device::Cpu, true).unwrap();
    assert_eq!(back.config(), model.config());
    let again = back.forward_logits(&ids, None).unwrap();
    assert_eq!(max_abs_diff(&again, &got), 0.0, "{case}: save/load changed logits");
}

#[test]
fn qwen3_dense_golden_logits() {
    check("qwen3_tiny");
}

#[test]
fn qwen3_dense_yarn_golden_logits() {
    check("qwen3_tiny_yarn");
}

#[test]
fn qwen3_moe_golden_logits() {
    check("qwen3_moe_tiny");
}

#[test]
fn trainable_load_gives_same_loss_as_frozen() {
    let dir = fixture("qwen3_tiny");
    let a = weights::load_dir(&dir, &Device::Cpu, true).unwrap();
    let b: MiniMind = weights::load_dir(&dir, &Device::Cpu, false).unwrap();
    assert_eq!(a.params().len(), 2 + 2 * 11);
    let ids = Tensor::from_vec((0..24u32).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let la = a.forward_train(&ids, &labels).unwrap().0.to_scalar::<f32>().unwrap();
    let lb = b.forward_train(&ids, &labels).unwrap().0.to_scalar::<f32>().unwrap();
    assert_eq!(la, lb);
}

/// Writes mmrun exports (dense and MoE) plus their logits under `$MMRUN_EXPORT_DIR` so that
/// `tests/fixtures/check_export.py` can load them with transformers. A no-op without the variable.
#[test]
fn export_for_transformers_check() {
    let Some(root) = std::env::var_os("MMRUN_EXPORT_DIR") else { return };
    for (case, moe) in [("dense", false), ("moe", true)] {
        let mut cfg = mmrun::model::ModelConfig::dense(64, 2, 4, 2);
        cfg.vocab_size = 128;
        cfg.max_position_embeddings = 256;
        if moe {
            cfg.moe_intermediate_size = 48;
            cfg = cfg.with_moe(4, 2);
        }
        let m = MiniMind::new(&cfg, 5, &Device::Cpu).unwrap();
        // Scale weights up so logits are far from uniform.
        for (name, v) in m.params() {
            if !name.ends_with("norm.weight") {
                v.set(&(v.as_tensor() * 8.0).unwrap()).unwrap();
            }
        }
        let out = Path::new(&root).join(case);
        weights::export(&m, None, &out).unwrap();
        let ids =
            Tensor::from_vec((0..24u32).map(|i| (i * 37) % 128).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap();
        let logits = m.forward_logits(&ids, None).unwrap();
        let map = std::collections::HashMap::from([
            ("input_ids".to_string(), ids.to_dtype(DType::I64).unwrap()),
            ("logits".to_string(), logits),
        ]);
        candle_core::safetensors::save(&map, out.join("golden.safetensors")).unwrap();
    }
}

/// transformers >= 5 writes MoE experts fused (spec §5.2): `mlp.experts.gate_up_proj` [E, 2I, C]
/// and `mlp.experts.down_proj` [E, C, I]. That layout loads to exactly the per-expert model; so
/// does the same checkpoint stored in f16 or bf16, to within their rounding.
#[test]
fn qwen3_moe_fused_experts_load_like_per_expert() {
    let dir = fixture("qwen3_moe_tiny");
    let per_expert = weights::load_dir(&dir, &Device::Cpu, false).unwrap();
    let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let want = per_expert.forward_logits(&ids, None).unwrap();
    let cfg = per_expert.config();
    let mut all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.mlp.experts");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..cfg.num_experts {
            let mut take = |w: &str| all.remove(&format!("{p}.{e}.{w}.weight")).unwrap();
            let (g, u, d) = (take("gate_proj"), take("up_proj"), take("down_proj"));
            gate_up.push(Tensor::cat(&[g, u], 0).unwrap());
            down.push(d);
        }
        all.insert(format!("{p}.gate_up_proj"), Tensor::stack(&gate_up, 0).unwrap());
        all.insert(format!("{p}.down_proj"), Tensor::stack(&down, 0).unwrap());
    }
    assert_eq!(
        all["model.layers.0.mlp.experts.gate_up_proj"].dims(),
        [cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size]
    );
    for (dtype, tol) in [(DType::F32, 0.0), (DType::F16, 5e-2), (DType::BF16, 2e-1)] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
        let stored: std::collections::HashMap<String, Tensor> =
            all.iter().map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&stored, tmp.path().join("model.safetensors")).unwrap();
        let fused = weights::load_dir(tmp.path(), &Device::Cpu, false).unwrap();
        let d = max_abs_diff(&fused.forward_logits(&ids, None).unwrap(), &want);
        assert!(d <= tol, "{dtype:?}: fused layout differs by {d}");
    }
}
