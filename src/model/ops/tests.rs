//! Each fused op against its composite form: forward values and every input gradient.

use super::*;
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::tests::rel_err;
use candle_core::{Device, Var};
use rand::SeedableRng;

fn randn(shape: &[usize], seed: u64, std: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v = crate::model::normal_vec(&mut rng, n, std);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
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
        check("rope", &[x], 1e-5, |t| rope(&t[0], &tables, Positions::From(5)).unwrap());
        // Packed rows: per-token positions restart at 0 for each document.
        let docs = DocPositions::from_lengths(&[vec![3, 4], vec![2, 1, 2]], 7).unwrap();
        let x = randn(&[2, 7, 3, 16], 4, 1.0);
        check("rope+docs", std::slice::from_ref(&x), 1e-5, |t| rope(&t[0], &tables, Positions::Docs(&docs)).unwrap());
        // Each document rotated as if alone in its row.
        let second = |t: &Tensor| t.narrow(0, 0, 1).unwrap().narrow(1, 3, 4).unwrap();
        let packed = rope(&x, &tables, Positions::Docs(&docs)).unwrap();
        let alone = rope(&second(&x), &tables, Positions::From(0)).unwrap();
        assert_eq!(rel_err(&second(&packed), &alone), 0.0);
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
        check("attention", &[q, k, v], 1e-5, |t| attention(&t[0], &t[1], &t[2], None, None, false).unwrap());
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
    check("attention+mask", &[q, k, v], 1e-5, |t| {
        real(attention(&t[0], &t[1], &t[2], Some(&mask), None, false).unwrap())
    });
}

/// Packed rows: the block-diagonal causal mask, with documents that span query blocks and start
/// inside one (the fused kernel skips the keys before the block's first document).
#[test]
fn attention_with_packed_documents_matches_composite_and_separate_documents() {
    let lens = [vec![30, 70, 45, 5], vec![150], vec![1, 64, 64, 21]];
    let docs = DocPositions::from_lengths(&lens, 150).unwrap();
    let q = randn(&[3, 150, 6, 8], 14, 1.0);
    let k = randn(&[3, 150, 2, 8], 15, 1.0);
    let v = randn(&[3, 150, 2, 8], 16, 1.0);
    check("attention+docs", &[q.clone(), k.clone(), v.clone()], 1e-5, |t| {
        attention(&t[0], &t[1], &t[2], None, Some(&docs), false).unwrap()
    });
    for fused in [true, false] {
        let run = |f: &dyn Fn() -> Tensor| if fused { f() } else { with_composite(f) };
        let packed = run(&|| attention(&q, &k, &v, None, Some(&docs), false).unwrap());
        for (r, row) in lens.iter().enumerate() {
            let mut at = 0;
            for &n in row {
                let part = |x: &Tensor| x.narrow(0, r, 1).unwrap().narrow(1, at, n).unwrap();
                let alone = run(&|| attention(&part(&q), &part(&k), &part(&v), None, None, false).unwrap());
                let e = rel_err(&part(&packed), &alone);
                assert!(e < 1e-6, "fused={fused} row {r} document at {at}: rel err {e}");
                at += n;
            }
        }
    }
    // A mask that ignored documents would differ: the check above can fail.
    assert!(
        rel_err(
            &attention(&q, &k, &v, None, None, false).unwrap(),
            &attention(&q, &k, &v, None, Some(&docs), false).unwrap()
        ) > 0.1
    );
}

/// Mixed precision: the fused kernel with bf16 matmul operands, on every bf16 GEMM backend this CPU
/// runs, tracks the f32 composite within bf16's precision — with a key mask, packed documents and
/// a cached continuation — and really rounds (it differs from the f32 kernel).
#[test]
fn attention_with_bf16_matmuls_tracks_f32() {
    use super::gemm::Backend;
    let backends = [Backend::Fallback, Backend::Avx512Bf16, Backend::Amx];
    let runs = |b: &Backend| match b {
        Backend::Fallback => true,
        Backend::Avx512Bf16 => crate::cpu::has_avx512_bf16(),
        Backend::Amx => crate::cpu::has_amx_bf16(),
    };
    let docs = DocPositions::from_lengths(&[vec![30, 70, 50], vec![150]], 150).unwrap();
    let mask = Tensor::from_vec([vec![1u32; 150], vec![0; 20], vec![1; 130]].concat(), (2, 150), &Device::Cpu).unwrap();
    for backend in backends.iter().filter(|b| runs(b)) {
        for (tq, tk, docs, mask) in
            [(150, 150, Some(&docs), None), (150, 150, None, Some(&mask)), (5, 70, None, None), (1, 9, None, None)]
        {
            let q = randn(&[2, tq, 6, 8], 20, 1.0);
            let k = randn(&[2, tk, 2, 8], 21, 1.0);
            let v = randn(&[2, tk, 2, 8], 22, 1.0);
            let key_mask = mask.map(|m| {
                let m: Vec<f32> = m.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                std::sync::Arc::new(m.into_iter().map(|x| x != 0.0).collect::<Vec<bool>>())
            });
            let op =
                |bf16| fused::Attention { key_mask: key_mask.clone(), docs: docs.map(|d| d.positions().clone()), bf16 };
            // Rows that see no key at all (the masked padding) differ by design (see above).
            let real = |t: Tensor| if mask.is_some() { t.narrow(1, 20, tq - 20).unwrap() } else { t };
            let name = format!("attention bf16 {backend:?} tq {tq} tk {tk}");
            check(&name, &[q.clone(), k.clone(), v.clone()], 2e-2, |t| {
                if crate::model::ops::FORCE_COMPOSITE.with(|c| c.get()) {
                    real(attention(&t[0], &t[1], &t[2], mask, docs, true).unwrap())
                } else {
                    real(t[0].apply_op3(&t[1], &t[2], op(Some(*backend))).unwrap())
                }
            });
            let f32_out = q.apply_op3(&k, &v, op(None)).unwrap();
            let bf16_out = q.apply_op3(&k, &v, op(Some(*backend))).unwrap();
            let e = rel_err(&real(bf16_out), &real(f32_out));
            assert!(e > 1e-5 && e < 2e-2, "{name}: bf16 vs f32 kernel rel err {e}");
        }
    }
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
    // The gradient computed in the forward (training) and the one the backward recomputes (an op
    // built without the slot) agree, scaled by the upstream gradient (3 here).
    let x = Var::from_tensor(&randn(&[7, 29], 14, 3.0)).unwrap();
    let grad_of = |op: fused::CrossEntropy| {
        let l = x.as_tensor().apply_op2(&labels, op).unwrap();
        (l.clone() * 3.0).unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone()
    };
    let (ahead, recomputed) =
        (grad_of(fused::CrossEntropy { grad: Some(Default::default()) }), grad_of(fused::CrossEntropy::default()));
    assert!(rel_err(&ahead, &recomputed) < 1e-6);
    assert!(ahead.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.1);
}

// ---------------------------------------------------------------- bf16 GEMM and linear

use super::gemm::{self as bg, Backend, Elems, MatRef, Packed};

/// The backends this CPU can run: the fallback always; the avx512_bf16 kernel where the CPU has
/// it (a notice otherwise, and a failure under `MMRUN_REQUIRE_AVX512BF16=1`, which CI sets on
/// machines that have it).
fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Fallback];
    if bg::has_amx_bf16() {
        v.push(Backend::Amx);
    }
    if bg::has_avx512_bf16() {
        v.push(Backend::Avx512Bf16);
    } else {
        assert!(
            std::env::var("MMRUN_REQUIRE_AVX512BF16").as_deref() != Ok("1"),
            "MMRUN_REQUIRE_AVX512BF16=1 but this CPU lacks avx512_bf16"
        );
        eprintln!("notice: this CPU lacks avx512_bf16; only the fallback bf16 GEMM is tested");
    }
    v
}

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    crate::model::normal_vec(&mut rng, n, 1.0)
}

fn at(d: &[f32], rs: usize, cs: usize, r: usize, c: usize) -> f32 {
    d[r * rs + c * cs]
}

/// Every product of bf16 values is exact in f64, so the f64 sum of the rounded operands is the
/// exact answer the kernel approximates with f32 accumulation. Checked against it to f32
/// summation accuracy, and against the unrounded product to bf16 accuracy.
#[test]
fn bf16_gemm_matches_reference_on_odd_shapes_and_layouts() {
    // (M, N, K): tails in every dimension, several K blocks (KCP pairs = 256 values), M beyond
    // one task block, N beyond one panel, K odd, a single row (decoding), and empty K.
    let shapes = [(1, 1, 1), (13, 37, 45), (97, 33, 300), (130, 65, 517), (200, 70, 31), (1, 200, 64), (5, 7, 0)];
    for backend in backends() {
        for &(m, n, k) in &shapes {
            for (a_t, b_t, pad) in [(false, false, 0), (true, false, 0), (false, true, 0), (true, true, 3)] {
                // A stored row-major (or transposed: column-major), with `pad` extra elements per
                // stored row so the strides are not the logical sizes; the same for B.
                let (ar, ac) = if a_t { (k, m) } else { (m, k) };
                let (br, bc) = if b_t { (n, k) } else { (k, n) };
                let (lda, ldb) = (ac + pad, bc + pad);
                let a_data = vals(ar.max(1) * lda, (m * 31 + k) as u64);
                let b_data = vals(br.max(1) * ldb, (n * 17 + k) as u64);
                let a = MatRef::new(Elems::F32(&a_data), ar, ac, lda, 1);
                let b = MatRef::new(Elems::F32(&b_data), br, bc, ldb, 1);
                let (a, b) = (if a_t { a.t() } else { a }, if b_t { b.t() } else { b });
                let (ars, acs) = if a_t { (1, lda) } else { (lda, 1) };
                let (brs, bcs) = if b_t { (1, ldb) } else { (ldb, 1) };
                let ldc = n + 2;
                let c0 = vals(m * ldc, 5);
                for accumulate in [false, true] {
                    let mut c = c0.clone();
                    bg::gemm(a, &Packed::new(b, backend), &mut c, ldc, accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut unrounded, mut mag) = (0f64, 0f64, 0f64);
                            for p in 0..k {
                                let (x, y) = (at(&a_data, ars, acs, i, p), at(&b_data, brs, bcs, p, j));
                                let (xr, yr) = (bg::to_bf16_f32(x) as f64, bg::to_bf16_f32(y) as f64);
                                exact += xr * yr;
                                unrounded += x as f64 * y as f64;
                                mag += (x as f64 * y as f64).abs();
                            }
                            let base = if accumulate { c0[i * ldc + j] as f64 } else { 0.0 };
                            let got = c[i * ldc + j] as f64 - base;
                            let what =
                                format!("{backend:?} {m}x{n}x{k} a_t={a_t} b_t={b_t} acc={accumulate} at ({i},{j})");
                            assert!(
                                (got - exact).abs() <= 1e-6 * (k as f64 + 1.0) * mag + 1e-6,
                                "{what}: {got} vs exact {exact}"
                            );
                            assert!(
                                (got - unrounded).abs() <= 2f64.powi(-7) * mag + 1e-6,
                                "{what}: {got} vs f32 {unrounded}"
                            );
                        }
                        // Columns past N (the padding of C's rows) are never written.
                        assert_eq!(&c[i * ldc + n..i * ldc + ldc], &c0[i * ldc + n..i * ldc + ldc]);
                    }
                }
            }
        }
    }
}

/// bf16 inputs (no rounding) and f32 inputs holding bf16 values give bit-identical results, and
/// both backends agree to f32 summation accuracy.
#[test]
fn bf16_gemm_takes_bf16_inputs_and_backends_agree() {
    let (m, n, k) = (29, 41, 77);
    let a32: Vec<f32> = vals(m * k, 1).into_iter().map(bg::to_bf16_f32).collect();
    let b32: Vec<f32> = vals(k * n, 2).into_iter().map(bg::to_bf16_f32).collect();
    let a16: Vec<half::bf16> = a32.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let b16: Vec<half::bf16> = b32.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let mut outs = Vec::new();
    for backend in backends() {
        let mut c32 = vec![0f32; m * n];
        let mut c16 = vec![0f32; m * n];
        bg::gemm(MatRef::f32(&a32, m, k), &Packed::new(MatRef::f32(&b32, k, n), backend), &mut c32, n, false);
        let (a, b) = (MatRef::new(Elems::Bf16(&a16), m, k, k, 1), MatRef::new(Elems::Bf16(&b16), k, n, n, 1));
        bg::gemm(a, &Packed::new(b, backend), &mut c16, n, false);
        assert_eq!(c32, c16, "{backend:?}");
        outs.push(c32);
    }
    for o in &outs[1..] {
        let d = o.iter().zip(&outs[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "backends differ by {d}");
    }
}

/// A window of a packing multiplies exactly like a packing of the window (with the same K blocks),
/// for K prefixes of whole K blocks and N prefixes of a one-block K; the layout refuses the windows it cannot give.
#[test]
fn bf16_gemm_windows_of_a_packing_match_packing_the_window() {
    let (m, k, n) = (19, 150, 77);
    let a: Vec<f32> = vals(m * k, 3);
    let b: Vec<f32> = vals(k * n, 4);
    for backend in backends() {
        let kc = 16; // pairs per K block: windows of 32, 64, ... rows
        let packed = Packed::with_k_block(MatRef::f32(&b, k, n), backend, kc);
        for (kw, nw) in [(32, n), (128, n), (k, n), (k, 40), (32, 33)] {
            // The same K blocks, so the same sums in the same order.
            let fresh = Packed::with_k_block(MatRef::new(Elems::F32(&b), kw, nw, n, 1), backend, kc);
            let aw = MatRef::new(Elems::F32(&a), m, kw, k, 1);
            let (mut want, mut got) = (vec![0f32; m * nw], vec![0f32; m * nw]);
            bg::gemm(aw, &fresh, &mut want, nw, false);
            match packed.window(kw, nw) {
                Some(win) => {
                    // SAFETY: `got` holds the m × nw block and nothing else touches it.
                    unsafe { bg::gemm_ptr(aw, win, super::SyncPtr(got.as_mut_ptr()), nw, false) };
                    assert_eq!(got, want, "{backend:?} window {kw}x{nw}");
                }
                // Only the panels layout refuses, and only a cut N under a K of several blocks
                // or a K cut inside a block.
                None => assert!(
                    backend != bg::Backend::Fallback && (nw < n || !kw.is_multiple_of(2 * kc)),
                    "{backend:?} {kw}x{nw}"
                ),
            }
        }
        // A single-block K (kc = KCP ≥ 75 pairs) allows cutting N.
        let one = Packed::new(MatRef::f32(&b, k, n), backend);
        assert!(one.window(k, 40).is_some() && one.window(k, n + 1).is_none());
        if backend != bg::Backend::Fallback {
            assert!(packed.window(k, 40).is_none() && packed.window(33, n).is_none());
        }
    }
}

/// The bf16 linear op: forward, `dX = dY·W` and `dW = dYᵀ·X` against the same products of the
/// bf16-rounded operands in f64 (tight), and against candle's f32 autograd of `x Wᵀ` (to bf16
/// accuracy). A frozen weight gets no gradient and the input still does.
#[test]
fn bf16_linear_gradients_match_reference() {
    use super::linear_bf16::{linear, WeightCache};
    // 37 rows take the GEMM; 5 (a decode step) the skinny kernel forward. A layer wider out than
    // in (70 > 45, like the LM head) computes its weight gradient transposed.
    for (n, inp, out) in [(37, 70, 45), (5, 70, 45), (37, 45, 70)] {
        let x = randn(&[n, inp], 11, 1.0);
        let w = randn(&[out, inp], 12, 0.5);
        let r = randn(&[n, out], 13, 1.0);
        let round = |t: &Tensor| -> Vec<f64> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(|v| bg::to_bf16_f32(v) as f64).collect()
        };
        let (xr, wr, rr) = (round(&x), round(&w), round(&r));
        let mut want_y = vec![0f64; n * out];
        let mut want_dx = vec![0f64; n * inp];
        let mut want_dw = vec![0f64; out * inp];
        for i in 0..n {
            for o in 0..out {
                for j in 0..inp {
                    want_y[i * out + o] += xr[i * inp + j] * wr[o * inp + j];
                    want_dx[i * inp + j] += rr[i * out + o] * wr[o * inp + j];
                    want_dw[o * inp + j] += rr[i * out + o] * xr[i * inp + j];
                }
            }
        }
        let close = |got: &Tensor, want: &[f64], what: &str| {
            let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = want.iter().map(|v| v.abs()).fold(0f64, f64::max);
            let d = g.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
            assert!(d < 1e-5 * scale, "{what}: max diff {d} (scale {scale})");
        };
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let cache = WeightCache::default();
        let y = linear(xv.as_tensor(), wv.as_tensor(), &cache).unwrap();
        close(&y, &want_y, &format!("y ({n} rows)"));
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (dx, dw) = (g.get(xv.as_tensor()).unwrap(), g.get(wv.as_tensor()).unwrap());
        close(dx, &want_dx, "dx");
        close(dw, &want_dw, "dw");

        // candle's autograd in f32, unrounded: bf16-level agreement.
        let (xc, wc) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let yc = xc.as_tensor().matmul(&wc.as_tensor().t().unwrap()).unwrap();
        let gc = (&yc * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(rel_err(&y, &yc) < 1e-2, "y {}", rel_err(&y, &yc));
        assert!(rel_err(dx, gc.get(xc.as_tensor()).unwrap()) < 1e-2);
        assert!(rel_err(dw, gc.get(wc.as_tensor()).unwrap()) < 1e-2);

        // A frozen weight (a plain tensor): only the input gets a gradient.
        let xv = Var::from_tensor(&x).unwrap();
        let y = linear(xv.as_tensor(), &w, &cache).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(g.get(xv.as_tensor()).unwrap(), &want_dx, "dx with a frozen weight");
        assert!(g.get(&w).is_none());
    }
}

/// A weight is packed once and reused until `weights_changed` (an optimizer step) or another
/// tensor; a weight rewritten in place is seen after the bump.
#[test]
fn bf16_weight_cache_repacks_only_after_weights_change() {
    use super::linear_bf16::{linear, weights_changed, WeightCache};
    let cache = WeightCache::default();
    let w = Var::from_tensor(&randn(&[8, 6], 1, 1.0)).unwrap();
    let p1 = cache.get(w.as_tensor()).unwrap();
    assert!(std::sync::Arc::ptr_eq(&p1, &cache.get(w.as_tensor()).unwrap()), "packed twice without a change");
    let x = randn(&[3, 6], 2, 1.0);
    let y1 = linear(&x, w.as_tensor(), &cache).unwrap();
    w.set(&(w.as_tensor() * 2.0).unwrap()).unwrap();
    weights_changed();
    let p2 = cache.get(w.as_tensor()).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&p1, &p2), "not repacked after weights_changed");
    let y2 = linear(&x, w.as_tensor(), &cache).unwrap();
    // Doubling is exact in bf16, so the new output is exactly twice the old one.
    assert_eq!((y1 * 2.0).unwrap().to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
    let other = randn(&[8, 6], 3, 1.0);
    let p3 = cache.get(&other).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&p2, &p3), "another tensor reused the packing");
    // A frozen weight cannot change in place: an optimizer step elsewhere does not repack it.
    weights_changed();
    assert!(std::sync::Arc::ptr_eq(&p3, &cache.get(&other).unwrap()), "a frozen weight was repacked");
}
