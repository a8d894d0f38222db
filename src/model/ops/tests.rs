//! Each fused op against its composite form: forward values and every input gradient.

use super::*;
use crate::model::config::{ModelConfig, RopeScaling};
use candle_core::{Device, Var};
use rand::SeedableRng;

fn randn(shape: &[usize], seed: u64, std: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v = crate::model::normal_vec(&mut rng, n, std);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt().max(1e-12);
    num / den
}

/// Run `f` on fresh Vars made from `inputs` with the fused and the composite path; compare the
/// outputs and the gradients of `sum(out * r)` for a random `r`.
fn check(name: &str, inputs: &[Tensor], tol: f32, f: impl Fn(&[Tensor]) -> Tensor) {
    let run = |composite: bool| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = if composite { with_composite(|| f(&ts)) } else { f(&ts) };
        let r = randn(out.dims(), 99, 1.0);
        let loss = (&out * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).expect("gradient").clone()).collect();
        (out, gs)
    };
    let (fo, fg) = run(false);
    let (co, cg) = run(true);
    let e = rel_err(&fo, &co);
    assert!(e < tol, "{name}: forward rel err {e}");
    for (i, (a, b)) in fg.iter().zip(&cg).enumerate() {
        let e = rel_err(a, b);
        assert!(e < tol, "{name}: gradient {i} rel err {e}");
    }
}

#[test]
fn rms_norm_matches_composite() {
    let x = randn(&[3, 5, 48], 1, 1.0);
    let w = (randn(&[48], 2, 0.3) + 1.0).unwrap();
    check("rms_norm", &[x, w], 1e-5, |t| rms_norm(&t[0], &t[1], 1e-6).unwrap());
}

#[test]
fn rope_matches_composite() {
    let mut cfg = ModelConfig::dense(64, 1, 4, 2);
    cfg.max_position_embeddings = 64;
    cfg.rope_theta = 10000.0;
    for scaling in [None, Some(RopeScaling { original_max_position_embeddings: 16, ..RopeScaling::reference_yarn() })] {
        cfg.rope_scaling = scaling;
        let tables = crate::model::rope::RopeTables::new(&cfg);
        let x = randn(&[2, 7, 3, 16], 3, 1.0);
        check("rope", &[x], 1e-5, |t| rope(&t[0], &tables, 5).unwrap());
    }
}

#[test]
fn swiglu_matches_composite() {
    let g = randn(&[4, 33], 4, 2.0);
    let u = randn(&[4, 33], 5, 1.0);
    check("swiglu", &[g, u], 1e-5, |t| swiglu(&t[0], &t[1]).unwrap());
}

#[test]
fn attention_matches_composite() {
    // Causal self-attention (Tq = Tk, spanning several query blocks) and a cached continuation
    // (Tq < Tk), GQA with 3 query heads per kv head.
    for (tq, tk) in [(150, 150), (5, 70), (1, 9)] {
        let q = randn(&[2, tq, 6, 8], 6, 1.0);
        let k = randn(&[2, tk, 2, 8], 7, 1.0);
        let v = randn(&[2, tk, 2, 8], 8, 1.0);
        check("attention", &[q, k, v], 1e-5, |t| attention(&t[0], &t[1], &t[2], None).unwrap());
    }
}

#[test]
fn attention_with_key_mask_matches_composite() {
    let q = randn(&[2, 6, 4, 8], 9, 1.0);
    let k = randn(&[2, 6, 2, 8], 10, 1.0);
    let v = randn(&[2, 6, 2, 8], 11, 1.0);
    let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1], (2, 6), &Device::Cpu).unwrap();
    // Padded query rows 0-1 of batch 1 see no keys: the composite path (additive -1e9) and the
    // fused path (zeros) differ there by design, so compare the real rows only.
    let real = |t: Tensor| t.narrow(1, 2, 4).unwrap();
    check("attention+mask", &[q, k, v], 1e-5, |t| real(attention(&t[0], &t[1], &t[2], Some(&mask)).unwrap()));
}

#[test]
fn cross_entropy_matches_composite() {
    let x = randn(&[7, 29], 12, 3.0);
    let labels = Tensor::from_vec(vec![3i64, -100, 28, 0, 5, -100, 11], 7, &Device::Cpu).unwrap();
    check("cross_entropy", &[x], 1e-5, |t| cross_entropy(&t[0], &labels).unwrap());
    // All ignored: loss 0, zero gradient, no NaN.
    let x = Var::from_tensor(&randn(&[2, 5], 13, 1.0)).unwrap();
    let none = Tensor::from_vec(vec![-100i64, -100], 2, &Device::Cpu).unwrap();
    let l = cross_entropy(x.as_tensor(), &none).unwrap();
    assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
    let g = l.backward().unwrap();
    assert_eq!(g.get(x.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}
