//! LoRA adapters: targets, init, frozen base, scaling, merge, PEFT save/load, dropout.

use super::*;
use crate::model::tests::{ids, tiny};
use candle_core::Device;

fn frozen(seed: u64, moe: bool) -> (MiniMind, MiniMind) {
    let cfg = tiny(moe);
    let base = MiniMind::new(&cfg, seed, &Device::Cpu).unwrap();
    // Copies, as if loaded from disk: the base's tensors are `Var`s and must not be shared.
    let named = base.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    let m = MiniMind::from_tensors(&cfg, named, &Device::Cpu, false).unwrap();
    (base, m)
}

fn cfg(targets: &str, rank: usize, alpha: f64) -> LoraConfig {
    LoraConfig { rank, alpha, dropout: 0.0, targets: Targets::parse(targets).unwrap(), seed: 5 }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Give every B a non-zero value so the adapters change the output.
fn perturb(ad: &LoraAdapters, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (n, v) in ad.params() {
        if n.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count()).map(|_| rng.random::<f32>() * 0.2 - 0.1).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
}

#[test]
fn targets_select_modules_and_bad_configs_are_rejected() {
    let (_, mut m) = frozen(1, false);
    let ad = LoraAdapters::attach(&mut m, &cfg("all-linear", 4, 8.0)).unwrap();
    assert_eq!(ad.module_paths().len(), 2 * 7, "2 layers x (q,k,v,o,gate,up,down)");
    let (_, mut m) = frozen(1, false);
    let ad = LoraAdapters::attach(&mut m, &cfg("q_proj, v_proj", 4, 8.0)).unwrap();
    assert_eq!(
        ad.module_paths(),
        vec![
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    let p = ad.params();
    assert_eq!(p[0].0, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_eq!(p[1].0, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
    // A: [r, in], B: [out, r]; v_proj is [kv_heads * head_dim, hidden].
    let c = m.config().clone();
    assert_eq!(p[2].1.dims(), &[4, c.hidden_size]);
    assert_eq!(p[3].1.dims(), &[c.num_key_value_heads * c.head_dim, 4]);
    // Attaching twice is refused.
    assert!(matches!(LoraAdapters::attach(&mut m, &cfg("q_proj", 2, 2.0)), Err(LoraError::AlreadyAdapted(_))));

    let e = Targets::parse("qproj").unwrap_err();
    assert!(e.to_string().contains("q_proj"), "suggests valid names: {e}");
    assert!(Targets::parse(" , ").is_err());
    let (_, mut m) = frozen(1, false);
    let bad = LoraConfig { rank: 0, ..cfg("q_proj", 1, 1.0) };
    assert!(LoraAdapters::attach(&mut m, &bad).err().unwrap().to_string().contains("rank"));
    let bad = LoraConfig { dropout: 1.0, ..cfg("q_proj", 1, 1.0) };
    assert!(LoraAdapters::attach(&mut m, &bad).err().unwrap().to_string().contains("dropout"));
    // MoE: expert FFNs are adapted by leaf name.
    let (_, mut moe) = frozen(1, true);
    let ad = LoraAdapters::attach(&mut moe, &cfg("down_proj", 2, 2.0)).unwrap();
    assert_eq!(ad.module_paths().len(), 2 * 4, "2 layers x 4 experts");
}

#[test]
fn init_is_peft_like_seeded_and_starts_as_identity() {
    let (base, mut m) = frozen(2, false);
    let ad = LoraAdapters::attach(&mut m, &cfg("all-linear", 4, 8.0)).unwrap();
    let x = ids(2, 9, m.config().vocab_size, 3);
    assert_eq!(max_abs_diff(&m.forward_logits(&x, None).unwrap(), &base.forward_logits(&x, None).unwrap()), 0.0);
    for (n, v) in ad.params() {
        let vals: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        if n.ends_with("lora_B.weight") {
            assert!(vals.iter().all(|&x| x == 0.0), "{n} starts at 0");
        } else {
            let bound = 1.0 / (v.dims()[1] as f32).sqrt();
            assert!(vals.iter().all(|&x| x.abs() <= bound), "{n} within kaiming bound");
            let spread = vals.iter().fold(0f32, |a, &x| a.max(x.abs()));
            assert!(spread > 0.5 * bound, "{n} is actually random");
        }
    }
    // Same seed, same A; another seed, another A.
    let (_, mut m2) = frozen(2, false);
    let ad2 = LoraAdapters::attach(&mut m2, &cfg("all-linear", 4, 8.0)).unwrap();
    let (_, mut m3) = frozen(2, false);
    let ad3 = LoraAdapters::attach(&mut m3, &LoraConfig { seed: 6, ..cfg("all-linear", 4, 8.0) }).unwrap();
    let a = |ad: &LoraAdapters| ad.params()[0].1.as_tensor().clone();
    assert_eq!(max_abs_diff(&a(&ad), &a(&ad2)), 0.0);
    assert!(max_abs_diff(&a(&ad), &a(&ad3)) > 0.0);
}

#[test]
fn base_is_frozen_and_only_adapters_get_gradients() {
    let (_, mut m) = frozen(3, false);
    assert!(m.params().is_empty(), "a frozen base exposes no trainable parameters");
    let ad = LoraAdapters::attach(&mut m, &cfg("all-linear", 4, 8.0)).unwrap();
    perturb(&ad, 1);
    let x = ids(2, 8, m.config().vocab_size, 1);
    let (loss, _) = m.forward_train(&x, &x.to_dtype(DType::I64).unwrap()).unwrap();
    let g = loss.backward().unwrap();
    // Base weights are plain tensors, not variables: no gradient, no optimiser can see them.
    let before: Vec<(String, Tensor)> = m.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    for (n, t) in m.named_tensors() {
        assert!(!t.is_variable(), "base weight {n} must be frozen");
        assert!(g.get(&t).is_none(), "base weight {n} must not receive a gradient");
    }
    for (n, v) in ad.params() {
        let gv = g.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}"));
        let norm = gv.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "zero gradient for {n}");
    }
    // One SGD step on the trainable list leaves every base weight bit-identical.
    for (_, v) in ad.params() {
        let gv = g.get(v.as_tensor()).unwrap();
        v.set(&(v.as_tensor() - (gv * 0.1).unwrap()).unwrap()).unwrap();
    }
    for ((n, a), (_, b)) in before.iter().zip(m.named_tensors()) {
        assert_eq!(max_abs_diff(a, &b), 0.0, "{n} changed");
    }
    // What an optimiser would be given: adapter tensors only.
    let trainable: Vec<String> =
        m.params().iter().map(|(n, _)| n.clone()).chain(ad.params().into_iter().map(|(n, _)| n)).collect();
    assert_eq!(trainable.len(), 2 * 14);
    assert!(trainable.iter().all(|n| n.contains(".lora_")));
    assert_eq!(ad.num_params(), ad.params().iter().map(|(_, v)| v.elem_count()).sum::<usize>());
}

#[test]
fn scale_is_alpha_over_rank_and_merge_matches_adapter_logits() {
    let (base, mut m) = frozen(4, false);
    let ad = LoraAdapters::attach(&mut m, &cfg("q_proj,down_proj", 4, 12.0)).unwrap();
    perturb(&ad, 2);
    let x = ids(2, 10, m.config().vocab_size, 5);
    let adapted = m.forward_logits(&x, None).unwrap();
    assert!(max_abs_diff(&adapted, &base.forward_logits(&x, None).unwrap()) > 1e-3);

    // Scale check on one layer: W + (alpha / r) B A applied by hand equals the merged weight.
    let names = ad.named_tensors();
    let a = &names["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &names["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    let w0 = base.named_tensors().into_iter().find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight").unwrap().1;
    let want = (&w0 + (b.matmul(a).unwrap() * 3.0).unwrap()).unwrap();

    ad.merge(&mut m).unwrap();
    let w1 = m.named_tensors().into_iter().find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight").unwrap().1;
    assert!(max_abs_diff(&w1, &want) < 1e-6);
    let merged = m.forward_logits(&x, None).unwrap();
    let d = max_abs_diff(&merged, &adapted);
    assert!(d < 1e-4, "merged logits differ from base+adapter by {d}");
    assert!(m.linears_mut().iter().all(|l| l.lora.is_none()));
}

#[test]
fn peft_layout_save_load_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut m) = frozen(5, false);
    let ad = LoraAdapters::attach(&mut m, &LoraConfig { dropout: 0.1, ..cfg("q_proj,v_proj,o_proj", 2, 4.0) }).unwrap();
    perturb(&ad, 3);
    ad.save(dir.path(), Some("my-base")).unwrap();
    let x = ids(1, 7, m.config().vocab_size, 2);
    let want = m.forward_logits(&x, None).unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 2);
    assert_eq!(json["lora_alpha"], 4.0);
    assert_eq!(json["lora_dropout"], 0.1);
    assert_eq!(json["target_modules"], serde_json::json!(["o_proj", "q_proj", "v_proj"]));
    assert_eq!(json["base_model_name_or_path"], "my-base");
    let saved = candle_core::safetensors::load(dir.path().join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 2 * 2 * 3);
    assert!(saved.contains_key("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"));

    let (_, mut fresh) = frozen(5, false);
    let back = LoraAdapters::load(&mut fresh, dir.path(), 0).unwrap();
    assert_eq!(back.config().rank, 2);
    assert_eq!(back.config().dropout, 0.1);
    assert_eq!(max_abs_diff(&fresh.forward_logits(&x, None).unwrap(), &want), 0.0);

    // A file missing a tensor is refused with the file named.
    let mut t = saved.clone();
    t.remove("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    let named: Vec<(String, Tensor)> = t.into_iter().collect();
    crate::model::weights::save_tensors(&named, &dir.path().join(ADAPTER_WEIGHTS)).unwrap();
    let (_, mut fresh) = frozen(5, false);
    let e = LoraAdapters::load(&mut fresh, dir.path(), 0).err().unwrap().to_string();
    assert!(e.contains(ADAPTER_WEIGHTS) && e.contains("q_proj.lora_A"), "{e}");
}

#[test]
fn unsupported_peft_configs_are_explained() {
    let base = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
    let c = config_from_peft(&base, 0).unwrap();
    assert_eq!((c.rank, c.alpha, c.dropout), (4, 8.0, 0.0));
    let mut dora = base.clone();
    dora["use_dora"] = true.into();
    assert!(config_from_peft(&dora, 0).unwrap_err().contains("use_dora"));
    let mut s = base.clone();
    s["target_modules"] = "all-linear".into();
    assert_eq!(config_from_peft(&s, 0).unwrap().targets, Targets::AllLinear);
    let mut no_r = base.clone();
    no_r.as_object_mut().unwrap().remove("r");
    assert!(config_from_peft(&no_r, 0).unwrap_err().contains("`r`"));
}

#[test]
fn dropout_masks_only_while_training_and_reseeds_reproducibly() {
    let d = Dropout::new(0.5, 1);
    let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&d.apply(&x).unwrap(), &x), 0.0, "inactive by default");
    d.set_active(true);
    d.reseed(9);
    let a: Vec<f32> = d.apply(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(a.iter().all(|&v| v == 0.0 || v == 2.0), "inverted dropout keeps E[x]");
    let zeros = a.iter().filter(|&&v| v == 0.0).count();
    assert!((64..=192).contains(&zeros), "about half dropped: {zeros}");
    d.reseed(9);
    let b: Vec<f32> = d.apply(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b, "same seed, same mask");

    // On a model: training output changes with dropout, evaluation output does not.
    let (_, mut m) = frozen(6, false);
    let ad = LoraAdapters::attach(&mut m, &LoraConfig { dropout: 0.5, ..cfg("all-linear", 4, 8.0) }).unwrap();
    perturb(&ad, 4);
    let x = ids(1, 6, m.config().vocab_size, 1);
    let eval = m.forward_logits(&x, None).unwrap();
    ad.set_training(true);
    ad.reseed_dropout(3);
    let train = m.forward_logits(&x, None).unwrap();
    assert!(max_abs_diff(&eval, &train) > 1e-4);
    ad.set_training(false);
    assert_eq!(max_abs_diff(&eval, &m.forward_logits(&x, None).unwrap()), 0.0);
}
