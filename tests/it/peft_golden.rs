//! PEFT golden fixtures (tests/fixtures/peft/make_peft_golden.py): LoRA adapters saved by `peft`
//! on the tiny Qwen3 fixture load into mmrun and give PEFT's logits to 1e-4, before and after
//! merging; saving them again with mmrun gives the same keys, shapes and values.

use candle_core::{DType, Device, Tensor};
use mmrun::model::lora::{LoraAdapters, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use mmrun::model::weights;
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check(case: &str, modules: usize, rank: usize, alpha: f64) {
    let dir = fixture(&format!("peft/{case}"));
    let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();

    let mut model = weights::load_dir(&fixture("qwen3_tiny"), &Device::Cpu, false).unwrap();
    let base_logits = model.forward_logits(&ids, None).unwrap();
    let ad = LoraAdapters::load(&mut model, &dir, 0).unwrap();
    assert_eq!(ad.module_paths().len(), modules, "{case}: adapted modules");
    assert_eq!((ad.config().rank, ad.config().alpha), (rank, alpha));
    let got = model.forward_logits(&ids, None).unwrap();
    let d = max_abs_diff(&got, &golden["logits"]);
    assert!(d < 1e-4, "{case}: max |logit diff| vs PEFT = {d}");
    assert!(max_abs_diff(&got, &base_logits) > 0.1, "{case}: the adapter must matter for the test to mean anything");

    // mmrun's save keeps PEFT's keys, shapes and values.
    let tmp = tempfile::tempdir().unwrap();
    ad.save(tmp.path(), Some("../qwen3_tiny")).unwrap();
    let theirs = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let ours = candle_core::safetensors::load(tmp.path().join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let mut k1: Vec<&String> = theirs.keys().collect();
    let mut k2: Vec<&String> = ours.keys().collect();
    k1.sort();
    k2.sort();
    assert_eq!(k1, k2, "{case}: key names");
    for (k, t) in &theirs {
        assert_eq!(max_abs_diff(t, &ours[k]), 0.0, "{case}: {k}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["r"], rank);

    // Merged weights give PEFT's merge_and_unload logits.
    ad.merge(&mut model).unwrap();
    let merged = model.forward_logits(&ids, None).unwrap();
    let d = max_abs_diff(&merged, &golden["merged_logits"]);
    assert!(d < 1e-4, "{case}: merged logits differ from PEFT's merge_and_unload by {d}");
}

#[test]
fn peft_lora_q_v_down_matches() {
    // 2 layers x (q_proj, v_proj, down_proj), r = 4, alpha = 8.
    check("lora_qvd", 6, 4, 8.0);
}

#[test]
fn peft_lora_all_linear_matches() {
    // PEFT saved "all-linear" as the 14 full module paths; r = 2, alpha = 3.
    check("lora_all_linear", 14, 2, 3.0);
}

/// An adapter made and saved by mmrun reloads to identical logits. With
/// `MMRUN_KEEP_ADAPTER=<dir>` it also writes the adapter and its logits there, for the manual
/// reverse check `tests/fixtures/peft/check_mmrun_adapter.py <dir>` (PEFT loads it and compares).
#[test]
fn mmrun_adapter_reloads_and_can_be_checked_by_peft() {
    use mmrun::model::lora::{LoraConfig, Targets};
    let golden = candle_core::safetensors::load(fixture("qwen3_tiny/golden.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let mut model = weights::load_dir(&fixture("qwen3_tiny"), &Device::Cpu, false).unwrap();
    let cfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout: 0.1,
        targets: Targets::parse("k_proj,o_proj,up_proj").unwrap(),
        seed: 4,
    };
    let ad = LoraAdapters::attach(&mut model, &cfg).unwrap();
    for (i, (n, v)) in ad.params().into_iter().enumerate() {
        if n.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count()).map(|j| (((i * 31 + j * 17) % 13) as f32 - 6.0) * 0.03).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let want = model.forward_logits(&ids, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var("MMRUN_KEEP_ADAPTER").map(PathBuf::from).unwrap_or_else(|_| tmp.path().to_path_buf());
    ad.save(&out, Some("../qwen3_tiny")).unwrap();
    candle_core::safetensors::save(
        &[("input_ids".to_string(), golden["input_ids"].clone()), ("logits".to_string(), want.clone())]
            .into_iter()
            .collect(),
        out.join("golden.safetensors"),
    )
    .unwrap();
    let mut fresh = weights::load_dir(&fixture("qwen3_tiny"), &Device::Cpu, false).unwrap();
    let back = LoraAdapters::load(&mut fresh, &out, 0).unwrap();
    assert_eq!(back.module_paths().len(), 6);
    assert_eq!(max_abs_diff(&fresh.forward_logits(&ids, None).unwrap(), &want), 0.0);
}
