//! Model tests: shapes, gradients reaching every parameter, KV-cache consistency, save/load.

use super::*;
use candle_core::{Device, Tensor, D};

pub(crate) fn tiny(moe: bool) -> ModelConfig {
    let mut c = ModelConfig::dense(32, 2, 4, 2);
    c.vocab_size = 50;
    c.intermediate_size = 48;
    c.moe_intermediate_size = 48;
    c.max_position_embeddings = 256;
    if moe {
        // Expert width differs from the dense width so shape mix-ups show.
        c.moe_intermediate_size = 40;
        c = c.with_moe(4, 2);
    }
    c
}

pub(crate) fn ids(b: usize, t: usize, vocab: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919 + seed * 31) % vocab as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// `‖a − b‖ / ‖b‖` over all elements (the norm of `b` floored at 1e-12).
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt().max(1e-12);
    num / den
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn init_is_seeded_and_shapes_match_specs() {
    let cfg = tiny(false);
    let a = MiniMind::new(&cfg, 7, &Device::Cpu).unwrap();
    let b = MiniMind::new(&cfg, 7, &Device::Cpu).unwrap();
    let c = MiniMind::new(&cfg, 8, &Device::Cpu).unwrap();
    assert_eq!(a.params().len(), param_specs(&cfg).len());
    let total: usize = a.params().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(total, cfg.num_params());
    let e = |m: &MiniMind| m.params()[0].1.as_tensor().clone();
    assert_eq!(max_abs_diff(&e(&a), &e(&b)), 0.0);
    assert!(max_abs_diff(&e(&a), &e(&c)) > 0.0);
    let std = e(&a).sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
}

fn check_all_grads(moe: bool, tied: bool) {
    let mut cfg = tiny(moe);
    cfg.tie_word_embeddings = tied;
    let m = MiniMind::new(&cfg, 1, &Device::Cpu).unwrap();
    let x = ids(2, 24, cfg.vocab_size, 3);
    let labels = x.to_dtype(DType::I64).unwrap();
    let (loss, aux) = m.forward_train(&x, &labels).unwrap();
    let l = loss.to_scalar::<f32>().unwrap();
    assert!((l - (cfg.vocab_size as f32).ln()).abs() < 0.5, "initial loss {l}");
    let total = (loss + aux).unwrap();
    let grads = total.backward().unwrap();
    for (name, var) in m.params() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0 && n.is_finite(), "zero/non-finite gradient for {name}: {n}");
    }
}

#[test]
fn every_param_gets_a_gradient_dense_tied() {
    check_all_grads(false, true);
}

#[test]
fn every_param_gets_a_gradient_dense_untied() {
    check_all_grads(false, false);
}

#[test]
fn every_param_gets_a_gradient_moe() {
    // top-2 of 4 experts over 48 tokens: every expert gets tokens and the router gets gradient.
    check_all_grads(true, true);
}

#[test]
fn kv_cache_matches_full_forward() {
    for moe in [false, true] {
        let cfg = tiny(moe);
        let m = MiniMind::new(&cfg, 2, &Device::Cpu).unwrap();
        let x = ids(2, 12, cfg.vocab_size, 5);
        let full = m.forward_logits(&x, None).unwrap(); // [B, T, V]
        let mut cache = m.new_cache();
        // Prefill 5 tokens, then 1 at a time, then 3 at once (multi-token continuation).
        let mut pos = 0;
        for chunk in [5usize, 1, 1, 1, 1, 3] {
            let step = m.forward_step(&x.narrow(1, pos, chunk).unwrap(), &mut cache, pos).unwrap();
            pos += chunk;
            let want = full.narrow(1, pos - 1, 1).unwrap().squeeze(1).unwrap();
            let d = max_abs_diff(&step, &want);
            assert!(d < 1e-4, "moe={moe} pos={pos} diff {d}");
        }
        assert_eq!(cache.len(), 12);
    }
}

#[test]
fn left_padding_mask_matches_unpadded_row() {
    let cfg = tiny(false);
    let m = MiniMind::new(&cfg, 4, &Device::Cpu).unwrap();
    // Row 0: 8 real tokens; row 1: 3 pads + 5 real tokens. Positions of row 1 are shifted
    // (reference quirk), so compare row 1 against its own tokens run at positions 3.. via a cache.
    let x = ids(2, 8, cfg.vocab_size, 9);
    let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1], (2, 8), &Device::Cpu).unwrap();
    let mut cache = m.new_cache();
    let batched = m.forward_step_masked(&x, &mut cache, 0, Some(&mask)).unwrap();
    let row0 = m.forward_step(&x.narrow(0, 0, 1).unwrap(), &mut m.new_cache(), 0).unwrap();
    assert!(max_abs_diff(&batched.narrow(0, 0, 1).unwrap(), &row0) < 1e-4);
    // Row 1 alone: its 5 real tokens at positions 3..8 (empty cache, start_pos 3).
    let real = x.narrow(0, 1, 1).unwrap().narrow(1, 3, 5).unwrap();
    let row1 = m.forward_step(&real, &mut m.new_cache(), 3).unwrap();
    let d = max_abs_diff(&batched.narrow(0, 1, 1).unwrap(), &row1);
    assert!(d < 1e-4, "padded row differs by {d}");
    // One more decode step with the grown mask.
    let next = Tensor::from_vec(vec![3u32, 4], (2, 1), &Device::Cpu).unwrap();
    let mask2 = Tensor::cat(&[&mask, &Tensor::ones((2, 1), DType::U32, &Device::Cpu).unwrap()], 1).unwrap();
    let out = m.forward_step_masked(&next, &mut cache, 8, Some(&mask2)).unwrap();
    assert_eq!(out.dims(), &[2, cfg.vocab_size]);
}

#[test]
fn save_load_roundtrip_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    for (moe, tied) in [(false, true), (false, false), (true, true)] {
        let mut cfg = tiny(moe);
        cfg.tie_word_embeddings = tied;
        let m = MiniMind::new(&cfg, 11, &Device::Cpu).unwrap();
        let out = dir.path().join(format!("m{moe}{tied}"));
        weights::export(&m, None, &out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&std::fs::read(out.join("model.safetensors")).unwrap())
            .unwrap()
            .names()
            .len();
        assert_eq!(st, param_specs(&cfg).len(), "tied embeddings saved once");
        let back = weights::load_dir(&out, &Device::Cpu, false).unwrap();
        assert_eq!(back.config(), &cfg);
        assert!(back.params().is_empty());
        let x = ids(1, 10, cfg.vocab_size, 1);
        let a = m.forward_logits(&x, None).unwrap();
        let b = back.forward_logits(&x, None).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
}

#[test]
fn load_rejects_wrong_keys_and_shapes() {
    let cfg = tiny(false);
    let m = MiniMind::new(&cfg, 1, &Device::Cpu).unwrap();
    let mut map: HashMap<String, Tensor> = m.named_tensors().into_iter().collect();
    map.remove("model.norm.weight");
    let e = MiniMind::from_tensors(&cfg, map.clone(), &Device::Cpu, false).err().unwrap().to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
    map.insert("model.norm.weight".into(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    let e = MiniMind::from_tensors(&cfg, map.clone(), &Device::Cpu, false).err().unwrap().to_string();
    assert!(e.contains("shape"), "{e}");
    map.insert("model.norm.weight".into(), Tensor::ones(32, DType::F32, &Device::Cpu).unwrap());
    map.insert(
        "model.layers.0.self_attn.q_proj.lora.A.weight".into(),
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = MiniMind::from_tensors(&cfg, map.clone(), &Device::Cpu, false).err().unwrap().to_string();
    assert!(e.contains("lora"), "{e}");
    // The reference's .pth carries both tied names: accepted.
    map.remove("model.layers.0.self_attn.q_proj.lora.A.weight");
    map.insert("lm_head.weight".into(), map["model.embed_tokens.weight"].clone());
    assert!(MiniMind::from_tensors(&cfg, map, &Device::Cpu, true).is_ok());
}

#[test]
fn loads_half_precision_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(false);
    let m = MiniMind::new(&cfg, 1, &Device::Cpu).unwrap();
    let mut map = HashMap::new();
    for (n, t) in m.named_tensors() {
        map.insert(n, t.to_dtype(DType::BF16).unwrap());
    }
    let p = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&map, &p).unwrap();
    let back = weights::load(&cfg, &p, &Device::Cpu, true).unwrap();
    let x = ids(1, 6, cfg.vocab_size, 2);
    let d = max_abs_diff(&m.forward_logits(&x, None).unwrap(), &back.forward_logits(&x, None).unwrap());
    assert!(d < 0.05, "bf16 roundtrip diff {d}");
}

#[test]
fn fused_and_composite_paths_agree_on_loss_and_every_gradient() {
    for moe in [false, true] {
        let cfg = tiny(moe);
        let m = MiniMind::new(&cfg, 21, &Device::Cpu).unwrap();
        let x = ids(2, 40, cfg.vocab_size, 7);
        let mut lv: Vec<i64> = x.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        lv[3] = -100;
        lv[50] = -100;
        let labels = Tensor::from_vec(lv, (2, 40), &Device::Cpu).unwrap();
        let run = || {
            let (loss, aux) = m.forward_train(&x, &labels).unwrap();
            let g = (&loss + &aux).unwrap().backward().unwrap();
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let (lf, gf) = run();
        let (lc, gc) = ops::with_composite(run);
        assert!((lf - lc).abs() < 1e-5 * lc.abs(), "moe={moe} loss {lf} vs {lc}");
        for (name, var) in m.params() {
            let a = gf.get(var.as_tensor()).unwrap_or_else(|| panic!("fused: no grad for {name}"));
            let b = gc.get(var.as_tensor()).unwrap_or_else(|| panic!("composite: no grad for {name}"));
            let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            assert!(num <= 1e-4 * den + 1e-12, "moe={moe} {name}: rel err {}", num / den);
        }
    }
}
/// The training forward runs the head only on positions with a target (not the masked prompt, the
/// padding, each row's last position): the loss and every gradient are those of the head over all
/// positions.
#[test]
fn the_head_runs_only_where_there_is_a_target_and_nothing_changes() {
    for tied in [true, false] {
        let mut cfg = tiny(false);
        cfg.tie_word_embeddings = tied;
        let m = MiniMind::new(&cfg, 5, &Device::Cpu).unwrap();
        let x = ids(3, 30, cfg.vocab_size, 9);
        let mut lv: Vec<i64> = x.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        lv[..12].fill(-100); // a prompt
        lv[80..].fill(-100); // padding
        let labels = Tensor::from_vec(lv, (3, 30), &Device::Cpu).unwrap();
        let (loss, _) = m.forward_train(&x, &labels).unwrap();
        let g = loss.backward().unwrap();
        let (h, _) = m.forward_hidden_packed(&x, None, true).unwrap();
        let logits = m.logits(&h.reshape((90, cfg.hidden_size)).unwrap()).unwrap();
        let all = ops::cross_entropy(&logits, &shift_labels(&labels).unwrap()).unwrap();
        let ga = all.backward().unwrap();
        let (l, la) = (loss.to_scalar::<f32>().unwrap(), all.to_scalar::<f32>().unwrap());
        assert!((l - la).abs() <= 1e-6 * la, "tied={tied}: loss {l} vs {la}");
        for (name, var) in m.params() {
            let e = rel_err(g.get(var.as_tensor()).unwrap(), ga.get(var.as_tensor()).unwrap());
            assert!(e <= 1e-5, "tied={tied} {name}: rel err {e}");
        }
    }
}

/// bf16 mixed precision: loss and aux are f32 scalars; every parameter (dense, untied, MoE with its
/// router, LoRA adapters) gets a finite, non-zero gradient that is f32 like the parameter itself;
/// and the forward stays close to the f32 one.
#[test]
fn bf16_mixed_precision_gives_every_param_a_finite_f32_gradient() {
    for (moe, tied) in [(false, true), (false, false), (true, true)] {
        let mut cfg = tiny(moe);
        cfg.tie_word_embeddings = tied;
        let f = MiniMind::new(&cfg, 1, &Device::Cpu).unwrap();
        let mut m = MiniMind::new(&cfg, 1, &Device::Cpu).unwrap();
        m.set_compute_dtype(DType::BF16).unwrap();
        assert_eq!(m.compute_dtype(), DType::BF16);
        let x = ids(2, 24, cfg.vocab_size, 3);
        let labels = x.to_dtype(DType::I64).unwrap();
        let (loss, aux) = m.forward_train(&x, &labels).unwrap();
        assert_eq!((loss.dtype(), aux.dtype()), (DType::F32, DType::F32));
        let (lf, _) = f.forward_train(&x, &labels).unwrap();
        let (l, lf) = (loss.to_scalar::<f32>().unwrap(), lf.to_scalar::<f32>().unwrap());
        // bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 %); at init the logits are
        // tiny, so the loss barely moves: 1 % is far outside rounding noise but catches a wrong op.
        assert!((l - lf).abs() < 0.01 * lf, "moe={moe} tied={tied}: bf16 loss {l} vs f32 {lf}");
        let grads = (loss + aux).unwrap().backward().unwrap();
        for (name, var) in m.params() {
            assert_eq!(var.dtype(), DType::F32, "{name} is no longer an f32 master weight");
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("moe={moe}: no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{name}: gradient in {:?}", g.dtype());
            let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(n > 0.0 && n.is_finite(), "moe={moe}: zero/non-finite gradient for {name}: {n}");
        }
        let lf = f.forward_logits(&x, None).unwrap();
        let lb = m.forward_logits(&x, None).unwrap();
        assert_eq!(lb.dtype(), DType::F32, "logits are handed out in f32");
        let scale = lf.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_abs_diff(&lf, &lb);
        assert!(d > 0.0, "bf16 logits equal f32 bit for bit: the bf16 path did not run");
        assert!(d < 0.05 * scale, "moe={moe}: bf16 logits off by {d} (max |logit| {scale})");
    }

    // LoRA on a frozen base in bf16: the adapters (f32 Vars) get f32 gradients.
    let cfg = tiny(false);
    let base = MiniMind::new(&cfg, 3, &Device::Cpu).unwrap();
    let mut m = MiniMind::from_tensors(&cfg, base.named_tensors().into_iter().collect(), &Device::Cpu, false).unwrap();
    let lc = super::lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: super::lora::Targets::AllLinear,
        seed: 9,
    };
    let adapters = super::lora::LoraAdapters::attach(&mut m, &lc).unwrap();
    m.set_compute_dtype(DType::BF16).unwrap();
    let x = ids(1, 10, cfg.vocab_size, 4);
    let (loss, _) = m.forward_train(&x, &x.to_dtype(DType::I64).unwrap()).unwrap();
    let g = loss.backward().unwrap();
    for (n, v) in adapters.params().iter().filter(|(n, _)| n.contains("lora_B")) {
        let g = g.get(v.as_tensor()).unwrap_or_else(|| panic!("no grad for {n}"));
        assert_eq!(g.dtype(), DType::F32, "{n}");
    }
}

#[test]
fn bf16_kv_cache_decoding_matches_its_full_forward_and_other_dtypes_are_refused() {
    let cfg = tiny(true);
    let mut m = MiniMind::new(&cfg, 2, &Device::Cpu).unwrap();
    m.set_compute_dtype(DType::BF16).unwrap();
    let x = ids(1, 9, cfg.vocab_size, 5);
    let full = m.forward_logits(&x, None).unwrap();
    let mut cache = m.new_cache();
    m.forward_step(&x.narrow(1, 0, 6).unwrap(), &mut cache, 0).unwrap();
    let step = m.forward_step(&x.narrow(1, 6, 3).unwrap(), &mut cache, 6).unwrap();
    assert_eq!(cache.len(), 9);
    let want = full.narrow(1, 8, 1).unwrap().squeeze(1).unwrap();
    // Same bf16 ops in a different grouping (cache concat vs one pass): bf16-level agreement.
    let scale = want.abs().unwrap().max(D::Minus1).unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(max_abs_diff(&step, &want) < 0.02 * scale.max(1e-3), "{}", max_abs_diff(&step, &want));
    let e = m.set_compute_dtype(DType::F16).unwrap_err().to_string();
    assert!(e.contains("F16") && e.contains("bf16"), "{e}");
    assert_eq!(m.compute_dtype(), DType::BF16, "a refused dtype leaves the model as it was");
}

/// The parameter specs, the saved names, the `Var`s and the LoRA module paths all come from the
/// one walk in `model::layers`, so they agree name for name and shape for shape.
#[test]
fn specs_named_tensors_params_and_linears_come_from_one_walk() {
    for (moe, tied) in [(false, true), (false, false), (true, false)] {
        let mut cfg = tiny(moe);
        cfg.tie_word_embeddings = tied;
        let mut m = MiniMind::new(&cfg, 3, &Device::Cpu).unwrap();
        let specs: Vec<(String, Vec<usize>)> = param_specs(&cfg).into_iter().map(|(n, s, _)| (n, s)).collect();
        let named: Vec<(String, Vec<usize>)> =
            m.named_tensors().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
        let params: Vec<(String, Vec<usize>)> =
            m.params().iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
        assert_eq!(specs, named);
        assert_eq!(specs, params);
        assert_eq!(specs.iter().any(|(n, _)| n == "lm_head.weight"), !tied);
        let per_layer = if moe { 4 + 3 * cfg.num_experts } else { 7 };
        let linears: Vec<(String, Vec<usize>)> =
            m.linears_mut().iter().map(|l| (format!("{}.weight", l.path), l.weight.dims().to_vec())).collect();
        assert_eq!(linears.len(), cfg.num_hidden_layers * per_layer);
        for l in &linears {
            assert!(specs.contains(l), "{l:?} is not a weight of the walk");
        }
    }
}

/// Initialisation draws from one seeded stream in walk order: the embedding comes first, norms are
/// ones, and the values are pinned so a reordered walk (which would change every trained model)
/// fails here.
#[test]
fn init_order_is_pinned() {
    let cfg = tiny(true);
    let m = MiniMind::new(&cfg, 7, &Device::Cpu).unwrap();
    let named = m.named_tensors();
    assert_eq!(named[0].0, "model.embed_tokens.weight");
    let first: Vec<f32> = named[0].1.flatten_all().unwrap().narrow(0, 0, 2).unwrap().to_vec1().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    assert_eq!(first, normal_vec(&mut rng, 2, 0.02));
    let expert = named.iter().find(|(n, _)| n == "model.layers.1.mlp.experts.3.down_proj.weight").unwrap();
    let sum: f32 = expert.1.sum_all().unwrap().to_scalar().unwrap();
    let norm = named.iter().find(|(n, _)| n == "model.layers.1.self_attn.k_norm.weight").unwrap();
    assert_eq!(norm.1.sum_all().unwrap().to_scalar::<f32>().unwrap(), cfg.head_dim as f32);
    // The value the init had before the layers were restructured (same seed, same stream order).
    assert!((sum - 4.722178e-1).abs() < 1e-6, "init changed: {sum:e}");
}

/// Weights laid out for decoding give the same logits (full forward and batched cached steps),
/// and the layout really changed (a transposed view is what makes small-batch matmuls fast).
#[test]
fn prepare_for_decoding_keeps_the_logits_and_stores_weights_transposed() {
    for (moe, tied) in [(false, true), (false, false), (true, true)] {
        let mut cfg = tiny(moe);
        cfg.tie_word_embeddings = tied;
        let t = MiniMind::new(&cfg, 5, &Device::Cpu).unwrap().named_tensors().into_iter().collect::<HashMap<_, _>>();
        let plain = MiniMind::from_tensors(&cfg, t.clone(), &Device::Cpu, false).unwrap();
        let mut fast = MiniMind::from_tensors(&cfg, t, &Device::Cpu, false).unwrap();
        fast.prepare_for_decoding().unwrap();
        let lin = &mut fast.linears_mut()[0];
        assert!(!lin.weight.is_contiguous() && lin.weight.t().unwrap().is_contiguous(), "moe={moe}");
        assert_eq!(fast.head_t.is_some(), tied);
        let x = ids(3, 10, cfg.vocab_size, 2);
        let d = max_abs_diff(&plain.forward_logits(&x, None).unwrap(), &fast.forward_logits(&x, None).unwrap());
        assert!(d < 1e-5, "moe={moe} tied={tied}: full forward differs by {d}");
        let (mut ca, mut cb) = (KvCache::new(cfg.num_hidden_layers), KvCache::new(cfg.num_hidden_layers));
        for pos in 0..4 {
            let step = x.narrow(1, pos, 1).unwrap();
            let a = plain.forward_step(&step, &mut ca, pos).unwrap();
            let b = fast.forward_step(&step, &mut cb, pos).unwrap();
            let d = max_abs_diff(&a, &b);
            assert!(d < 1e-5, "moe={moe} tied={tied}: step {pos} differs by {d}");
        }
    }
    // A trainable model keeps its Vars (the optimizer updates them in place).
    let mut m = MiniMind::new(&tiny(false), 5, &Device::Cpu).unwrap();
    m.prepare_for_decoding().unwrap();
    assert!(m.linears_mut()[0].weight.is_contiguous());
}

/// Packing: a batch of rows that each hold several documents (per-document attention and RoPE
/// positions, the first token of a document never predicted from the one before) gives the same
/// per-document logits, the same loss and the same gradient of every parameter as the documents
/// padded one per row, on the fused and the composite path. Dense: an MoE's aux loss would count
/// the padding tokens of the unpacked batch in its router statistics.
#[test]
fn packed_documents_train_exactly_like_separate_rows() {
    let cfg = tiny(false);
    let m = MiniMind::new(&cfg, 5, &Device::Cpu).unwrap();
    let (lens, t) = ([vec![5usize, 9, 3], vec![12, 7]], 20);
    let vocab = cfg.vocab_size;
    let docs: Vec<Vec<u32>> = lens
        .iter()
        .flatten()
        .enumerate()
        .map(|(d, &n)| (0..n).map(|i| ((d * 13 + i * 7 + 1) % vocab) as u32).collect())
        .collect();
    // The second token of every document carries no loss (like a prompt token).
    let label = |i: usize, x: u32| if i == 1 { -100 } else { x as i64 };
    let (mut pid, mut plab) = (vec![0u32; 2 * t], vec![-100i64; 2 * t]);
    let mut d = 0;
    for (r, row) in lens.iter().enumerate() {
        let mut at = r * t;
        for &n in row {
            for (i, &x) in docs[d].iter().enumerate() {
                pid[at + i] = x;
                plab[at + i] = if i == 0 { -100 } else { label(i, x) };
            }
            (at, d) = (at + n, d + 1);
        }
    }
    let packed_ids = Tensor::from_vec(pid, (2, t), &Device::Cpu).unwrap();
    let packed_labels = Tensor::from_vec(plab, (2, t), &Device::Cpu).unwrap();
    let positions = DocPositions::from_lengths(&lens, t).unwrap();
    let longest = docs.iter().map(Vec::len).max().unwrap();
    let (mut uid, mut ulab) = (vec![0u32; docs.len() * longest], vec![-100i64; docs.len() * longest]);
    for (r, doc) in docs.iter().enumerate() {
        for (i, &x) in doc.iter().enumerate() {
            uid[r * longest + i] = x;
            ulab[r * longest + i] = label(i, x);
        }
    }
    let ids_u = Tensor::from_vec(uid, (docs.len(), longest), &Device::Cpu).unwrap();
    let labels_u = Tensor::from_vec(ulab, (docs.len(), longest), &Device::Cpu).unwrap();

    for fused in [true, false] {
        let run = |f: &dyn Fn() -> (f32, Tensor, candle_core::backprop::GradStore)| {
            if fused {
                f()
            } else {
                ops::with_composite(f)
            }
        };
        let step = |ids: &Tensor, labels: &Tensor, docs: Option<&DocPositions>| {
            let (loss, _) = m.forward_train_packed(ids, labels, docs).unwrap();
            let (h, _) = m.forward_hidden_packed(ids, docs, false).unwrap();
            let g = loss.backward().unwrap();
            (loss.to_scalar::<f32>().unwrap(), m.logits(&h).unwrap(), g)
        };
        let (lp, logits_p, gp) = run(&|| step(&packed_ids, &packed_labels, Some(&positions)));
        let (lu, logits_u, gu) = run(&|| step(&ids_u, &labels_u, None));
        assert!((lp - lu).abs() <= 1e-5 * lu, "fused={fused}: packed loss {lp} vs one per row {lu}");
        let mut d = 0;
        for (r, row) in lens.iter().enumerate() {
            let mut at = 0;
            for &n in row {
                let a = logits_p.narrow(0, r, 1).unwrap().narrow(1, at, n).unwrap();
                let b = logits_u.narrow(0, d, 1).unwrap().narrow(1, 0, n).unwrap();
                assert!(max_abs_diff(&a, &b) < 1e-5, "fused={fused}: document {d} logits differ");
                (at, d) = (at + n, d + 1);
            }
        }
        for (name, var) in m.params() {
            let e = rel_err(gp.get(var.as_tensor()).unwrap(), gu.get(var.as_tensor()).unwrap());
            assert!(e <= 1e-5, "fused={fused} {name}: gradient rel err {e}");
        }
        // Without the document layout the same packed rows train differently: the test can fail.
        let (lx, _, _) = run(&|| step(&packed_ids, &packed_labels, None));
        assert!((lx - lu).abs() > 1e-3, "fused={fused}: cross-document attention went unnoticed");
    }
}

/// bf16 decoding on the CPU: the cache stores bf16 (half the bytes), and token-by-token steps over
/// it give the logits of the full forward in the same precision, and stay close to f32 decoding.
/// Tolerances, relative to the largest logit: 2 % between bf16 paths (the cache rounds keys and
/// values to bf16, which the full forward does not; both round every matmul operand the same
/// way), 5 % between bf16 and f32 (as the full forward's test). A wrong position, head mapping or
/// cache row is off by the logits' own size.
#[test]
fn bf16_decoding_step_by_step_matches_the_full_forward_and_f32() {
    for (moe, tied) in [(false, true), (false, false), (true, true)] {
        let mut cfg = tiny(moe);
        cfg.tie_word_embeddings = tied;
        let t = MiniMind::new(&cfg, 4, &Device::Cpu).unwrap().named_tensors().into_iter().collect::<HashMap<_, _>>();
        // Larger weights than N(0, 0.02), so attention is far from uniform and logits far from 0.
        let t: HashMap<_, _> = t
            .into_iter()
            .map(|(n, w)| {
                let w = if n.contains("norm") { w } else { (w * 12.0).unwrap() };
                (n, w)
            })
            .collect();
        let f32m = MiniMind::from_tensors(&cfg, t.clone(), &Device::Cpu, false).unwrap();
        let mut bf = MiniMind::from_tensors(&cfg, t, &Device::Cpu, false).unwrap();
        bf.prepare_for_decoding().unwrap();
        bf.set_compute_dtype(DType::BF16).unwrap();
        let x = ids(2, 24, cfg.vocab_size, 6);
        let full = bf.forward_logits(&x, None).unwrap();
        let (mut cb, mut cf) = (bf.new_cache(), f32m.new_cache());
        assert_eq!((cb.dtype(), cf.dtype()), (Some(DType::BF16), None));
        // An 18-token prompt (the GEMM, and attention over the cache converted to f32), single
        // tokens (the skinny matmul and the bf16 decode attention), and two tokens at once.
        let mut pos = 0;
        for n in [18, 1, 1, 1, 2, 1] {
            let chunk = x.narrow(1, pos, n).unwrap();
            let lb = bf.forward_step(&chunk, &mut cb, pos).unwrap();
            let lf = f32m.forward_step(&chunk, &mut cf, pos).unwrap();
            pos += n;
            let want = full.narrow(1, pos - 1, 1).unwrap().squeeze(1).unwrap();
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 1.0, "logits too small to test anything: {scale}");
            let d = max_abs_diff(&lb, &want);
            assert!(d < 0.02 * scale, "moe={moe} tied={tied} pos {pos}: step vs full forward {d} (scale {scale})");
            let d = max_abs_diff(&lb, &lf);
            assert!(d > 0.0, "bf16 decoding equals f32 bit for bit: the bf16 path did not run");
            assert!(d < 0.05 * scale, "moe={moe} tied={tied} pos {pos}: bf16 vs f32 decoding {d} (scale {scale})");
        }
        assert_eq!(cb.len(), 24);
    }
}

/// The batching engine's cache operations on a bf16 cache: dropping rows, joining a shorter
/// sequence (padded at the front and masked) and trimming the padding give exactly the logits of
/// the sequences decoded on their own.
#[test]
fn bf16_cache_rows_can_be_selected_joined_and_trimmed() {
    let cfg = tiny(false);
    let t = MiniMind::new(&cfg, 8, &Device::Cpu).unwrap().named_tensors().into_iter().collect::<HashMap<_, _>>();
    let mut m = MiniMind::from_tensors(&cfg, t, &Device::Cpu, false).unwrap();
    m.set_compute_dtype(DType::BF16).unwrap();
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_abs_diff(a, b);
        assert!(d <= 1e-6 * scale, "{what}: {d} (scale {scale})");
    };
    let step = |ids: &[u32], cache: &mut KvCache, pos: usize, mask: Option<&Tensor>| {
        let x = Tensor::from_vec(ids.to_vec(), (ids.len(), 1), &Device::Cpu).unwrap();
        m.forward_step_masked(&x, cache, pos, mask).unwrap()
    };
    let x = ids(3, 7, cfg.vocab_size, 2);
    // select_rows: rows 2 and 0 of a batch of three decode as the batch of just those two.
    let mut c3 = m.new_cache();
    m.forward_step(&x, &mut c3, 0).unwrap();
    c3.select_rows(&[2, 0]).unwrap();
    let got = step(&[5, 9], &mut c3, 7, None);
    let mut c2 = m.new_cache();
    m.forward_step(
        &Tensor::cat(&[x.get(2).unwrap(), x.get(0).unwrap()], 0).unwrap().reshape((2, 7)).unwrap(),
        &mut c2,
        0,
    )
    .unwrap();
    close(&got, &step(&[5, 9], &mut c2, 7, None), "select_rows");
    assert_eq!(c3.dtype(), Some(DType::BF16));

    // append_rows: a 4-token sequence prefilled at positions 3..7 joins a 7-token one.
    let long = x.get(0).unwrap().unsqueeze(0).unwrap();
    let short = x.get(1).unwrap().narrow(0, 0, 4).unwrap().unsqueeze(0).unwrap();
    let mut group = m.new_cache();
    m.forward_step(&long, &mut group, 0).unwrap();
    let mut newcomer = m.new_cache();
    m.forward_step(&short, &mut newcomer, 3).unwrap();
    let mut alone = newcomer.clone();
    group.append_rows(&newcomer).unwrap();
    assert_eq!(group.len(), 7);
    let mask: Vec<f32> = [vec![1.0; 8], [vec![0.0; 3], vec![1.0; 5]].concat()].concat();
    let mask = Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap();
    let joined = step(&[11, 12], &mut group, 7, Some(&mask));
    let short_alone = step(&[12], &mut alone, 7, None);
    close(&joined.get(1).unwrap(), &short_alone.get(0).unwrap(), "append_rows");

    // trim_front: keep the newcomer alone; its 3 padding positions go, and it decodes on.
    group.select_rows(&[1]).unwrap();
    group.trim_front(3).unwrap();
    assert_eq!((group.len(), group.dtype()), (5, Some(DType::BF16)));
    close(&step(&[13], &mut group, 8, None), &step(&[13], &mut alone, 8, None), "trim_front");
    let mut f32_cache = KvCache::new(cfg.num_hidden_layers);
    m.forward_step(&short, &mut f32_cache, 0).unwrap();
    assert!(group.append_rows(&f32_cache).is_err(), "caches of different dtypes do not mix");
}
