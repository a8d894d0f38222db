//! AdamW with decoupled weight decay, updated in place, plus gradient accumulation and the global
//! gradient norm.
//!
//! candle-nn's `AdamW` allocates about fourteen temporaries per parameter per step and keeps the
//! moments in the weights' dtype (see the shared candle notes: 0.09–0.22 s/step against ≈ 0.016 s in
//! place). On the CPU this optimiser keeps fp32 moments in plain vectors and rewrites the weights'
//! storage through a candle [`InplaceOp2`], one fused pass per parameter, in parallel chunks (every
//! element is independent, so the result does not depend on the thread count). On other devices it
//! falls back to tensor arithmetic with fp32 moments.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to spread a
/// 512×6400 embedding over the cores.
const CHUNK: usize = 1 << 14;

/// AdamW hyper-parameters other than the learning rate (which the schedule sets each step).
/// Defaults are PyTorch's, which the reference uses unchanged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to every parameter (as the reference does).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// fp32 moments of one parameter.
enum Moments {
    /// CPU parameters: plain vectors updated by the fused in-place pass.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Other devices: fp32 tensors on the parameter's device.
    Device { m: Tensor, v: Tensor },
}

/// In-place AdamW over named [`Var`]s.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Number of optimiser steps taken (PyTorch's per-parameter `step`, identical for all here).
    t: u64,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>,
}

impl AdamW {
    /// An optimiser over `params` (names must be unique; they key the saved state).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut moments = Vec::with_capacity(params.len());
        for (name, var) in &params {
            let t = var.as_tensor();
            if t.device().is_cpu() {
                if t.dtype() != DType::F32 {
                    candle_core::bail!("AdamW: CPU parameter '{name}' is {:?}; CPU training is fp32", t.dtype());
                }
                let n = t.elem_count();
                moments.push(Moments::Host { m: vec![0.0; n], v: vec![0.0; n] });
            } else {
                let z = Tensor::zeros(t.shape(), DType::F32, t.device())?;
                moments.push(Moments::Device { m: z.clone(), v: z });
            }
        }
        Ok(Self { cfg, t: 0, params, moments })
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The hyper-parameters.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// Optimiser steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr`. `grads[i]` is the gradient of parameter `i` (`None`:
    /// the parameter took no part in the loss and is left untouched, like PyTorch does);
    /// every gradient is multiplied by `grad_scale` first (accumulation averaging × clipping).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!("AdamW: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let coeffs = Coeffs {
            decay: (1.0 - lr * c.weight_decay) as f32,
            one_minus_b1: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            one_minus_b2: (1.0 - c.beta2) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
            gscale: grad_scale as f32,
        };
        for (((name, var), mom), g) in self.params.iter().zip(self.moments.iter_mut()).zip(grads) {
            let Some(g) = g else { continue };
            if g.dims() != var.dims() {
                candle_core::bail!("AdamW: gradient of '{name}' has shape {:?}, parameter {:?}", g.dims(), var.dims());
            }
            match mom {
                Moments::Host { m, v } => {
                    let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
                    let op = AdamWCpu { m: Mutex::new(m), v: Mutex::new(v), c: coeffs };
                    var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Device { m, v } => {
                    let g = (g.to_dtype(DType::F32)? * grad_scale)?;
                    let p = var.as_tensor().to_dtype(DType::F32)?;
                    let p = (p * (1.0 - lr * c.weight_decay))?;
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                    let p = (p - ((&*m / denom)? * (lr / bc1))?)?;
                    var.set(&p.to_dtype(var.dtype())?)?;
                }
            }
        }
        // Packed bf16 copies of the weights (CPU mixed precision) are stale now.
        crate::model::ops::linear_bf16::weights_changed();
        Ok(())
    }

    /// The optimiser state as tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, var), mom) in self.params.iter().zip(&self.moments) {
            let (m, v) = match mom {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, var.shape(), &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, var.shape(), &candle_core::Device::Cpu)?,
                ),
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("m.{name}"), m);
            out.insert(format!("v.{name}"), v);
        }
        Ok(out)
    }

    /// Restore the state saved by [`AdamW::state_tensors`] after `t` steps.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for ((name, var), mom) in self.params.iter().zip(self.moments.iter_mut()) {
            let get = |k: String| -> Result<Tensor> {
                let x =
                    tensors.get(&k).ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks '{k}'")))?;
                if x.dims() != var.dims() {
                    candle_core::bail!("optimizer state '{k}' has shape {:?}, parameter {:?}", x.dims(), var.dims());
                }
                x.to_dtype(DType::F32)
            };
            let (m, v) = (get(format!("m.{name}"))?, get(format!("v.{name}"))?);
            match mom {
                Moments::Host { m: hm, v: hv } => {
                    *hm = m.flatten_all()?.to_vec1()?;
                    *hv = v.flatten_all()?.to_vec1()?;
                }
                Moments::Device { m: dm, v: dv } => {
                    *dm = m.to_device(var.device())?;
                    *dv = v.to_device(var.device())?;
                }
            }
        }
        self.t = t;
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Coeffs {
    decay: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    gscale: f32,
}

/// One fused AdamW pass over a CPU parameter; the moments ride along in the op (the in-place API
/// only lets the destination be written).
struct AdamWCpu<'a> {
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
    c: Coeffs,
}

fn contiguous<'s>(s: &'s [f32], l: &Layout, what: &str) -> Result<&'s [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

impl candle_core::InplaceOp2 for AdamWCpu<'_> {
    fn name(&self) -> &'static str {
        "adamw-inplace"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw-inplace: parameter and gradient must be f32")
        };
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("adamw-inplace: parameter not contiguous")
        };
        let p = &mut p[a..b];
        let g = contiguous(g, l2, "adamw-inplace gradient")?;
        let mut m = self.m.lock().expect("not poisoned");
        let mut v = self.v.lock().expect("not poisoned");
        let c = self.c;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let gi = g[i] * c.gscale;
                    let mut pi = p[i] * c.decay;
                    // PyTorch: exp_avg.lerp_(grad, 1-beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2)
                    let mi = m[i] + c.one_minus_b1 * (gi - m[i]);
                    let vi = v[i] * c.b2 + c.one_minus_b2 * gi * gi;
                    let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
                    pi -= c.step_size * (mi / denom);
                    m[i] = mi;
                    v[i] = vi;
                    p[i] = pi;
                }
            });
        Ok(())
    }
}

/// `dst += src`, in place, for accumulation without a fresh buffer per micro-step.
struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (CpuStorage::F32(d), CpuStorage::F32(s)) = (s1, s2) else { candle_core::bail!("add-assign: f32 only") };
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("add-assign: destination not contiguous")
        };
        let s = contiguous(s, l2, "add-assign source")?;
        d[a..b].par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK)).for_each(|(d, s)| {
            for (x, y) in d.iter_mut().zip(s) {
                *x += *y;
            }
        });
        Ok(())
    }
}

/// Sums gradients over the micro-batches of one optimiser step.
pub struct GradAccumulator {
    grads: Vec<Option<Tensor>>,
    /// Whether `grads[i]` is a buffer we allocated (safe to add into in place) rather than the
    /// tensor backward returned.
    owned: Vec<bool>,
}

impl GradAccumulator {
    /// An empty accumulator for `n` parameters.
    pub fn new(n: usize) -> Self {
        Self { grads: vec![None; n], owned: vec![false; n] }
    }

    /// Forget everything (after an optimiser step).
    pub fn clear(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.owned.iter_mut().for_each(|o| *o = false);
    }

    /// Add the gradients of `params` found in `store`.
    pub fn add(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (i, (_, var)) in params.iter().enumerate() {
            let Some(g) = store.get(var.as_tensor()) else { continue };
            let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
            self.grads[i] = Some(match self.grads[i].take() {
                None => {
                    self.owned[i] = false;
                    g
                }
                Some(acc) if self.owned[i] && acc.device().is_cpu() && acc.dtype() == DType::F32 => {
                    acc.inplace_op2(&g, &AddAssign)?;
                    acc
                }
                Some(acc) => {
                    self.owned[i] = true;
                    (acc + g)?
                }
            });
        }
        Ok(())
    }

    /// The accumulated gradients, one per parameter.
    pub fn grads(&self) -> &[Option<Tensor>] {
        &self.grads
    }
}

/// The global L2 norm over all gradients (what `torch.nn.utils.clip_grad_norm_` computes). On the
/// CPU the sum runs in f64 over fixed chunks summed in order, so it is bit-reproducible.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            let (st, l) = g.storage_and_layout();
            let candle_core::Storage::Cpu(CpuStorage::F32(s)) = &*st else {
                candle_core::bail!("global_norm: unexpected storage")
            };
            let s = match l.contiguous_offsets() {
                Some((a, b)) => &s[a..b],
                None => candle_core::bail!("global_norm: gradient not contiguous"),
            };
            let parts: Vec<f64> = s.par_chunks(CHUNK).map(crate::model::ops::vmath::sum_squares_f64).collect();
            total += parts.iter().sum::<f64>();
        } else {
            total += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// PyTorch's clipping coefficient: `min(1, max_norm / (norm + 1e-6))`; `max_norm <= 0` disables.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Scalar AdamW exactly as PyTorch writes it, in f64.
    fn reference(p0: f64, grads: &[f64], lr: f64, c: AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = (v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt()) + c.eps;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn step_matches_hand_computed_values() -> Result<()> {
        let c = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let p0 = [1.0f32, -2.0, 0.5, 0.0];
        let gs = [[0.1f32, -0.3, 2.0, 0.0], [0.2, 0.1, -1.0, 1e-3], [-0.5, 0.4, 0.3, 0.0]];
        let var = Var::from_slice(&p0, 4, &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], c)?;
        for g in &gs {
            opt.step(&[Some(Tensor::from_slice(g, 4, &Device::Cpu)?)], 1e-2, 1.0)?;
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        for i in 0..4 {
            let want = reference(p0[i] as f64, &gs.iter().map(|g| g[i] as f64).collect::<Vec<_>>(), 1e-2, c);
            assert!((got[i] as f64 - want).abs() < 1e-6, "elem {i}: {} vs {want}", got[i]);
        }
        // First step of Adam moves every element with a non-zero gradient by ~lr (sign of -g).
        assert_eq!(opt.steps_taken(), 3);
        Ok(())
    }

    #[test]
    fn first_step_is_lr_times_sign() -> Result<()> {
        let c = AdamWConfig { weight_decay: 0.0, ..Default::default() };
        let var = Var::from_slice(&[0.0f32, 0.0], 2, &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], c)?;
        opt.step(&[Some(Tensor::from_slice(&[3.0f32, -0.01], 2, &Device::Cpu)?)], 0.1, 1.0)?;
        let got = var.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] + 0.1).abs() < 1e-5 && (got[1] - 0.1).abs() < 1e-4, "{got:?}");
        Ok(())
    }

    #[test]
    fn none_gradient_leaves_param_alone_and_state_round_trips() -> Result<()> {
        let a = Var::from_slice(&[1.0f32, 2.0], 2, &Device::Cpu)?;
        let b = Var::from_slice(&[3.0f32], 1, &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], AdamWConfig::default())?;
        opt.step(&[None, Some(Tensor::from_slice(&[1.0f32], 1, &Device::Cpu)?)], 0.1, 1.0)?;
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, vec![1.0, 2.0]);
        let st = opt.state_tensors()?;
        assert_eq!(st["m.b"].to_vec1::<f32>()?, vec![0.1f32]);
        let mut opt2 = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], AdamWConfig::default())?;
        opt2.load_state(&st, 1)?;
        assert_eq!(opt2.state_tensors()?["v.b"].to_vec1::<f32>()?, st["v.b"].to_vec1::<f32>()?);
        assert_eq!(opt2.steps_taken(), 1);
        Ok(())
    }

    #[test]
    fn global_norm_and_clip() -> Result<()> {
        let g1 = Tensor::from_slice(&[3.0f32, 0.0], 2, &Device::Cpu)?;
        let g2 = Tensor::from_slice(&[4.0f32], 1, &Device::Cpu)?;
        let n = global_norm(&[Some(g1), None, Some(g2)])?;
        assert!((n - 5.0).abs() < 1e-12);
        assert!((clip_coefficient(n, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert_eq!(clip_coefficient(50.0, 0.0), 1.0);
        // Clipping scales the gradient the optimiser sees: with one step of plain SGD-like Adam the
        // direction is unchanged, so check the moment instead.
        let var = Var::from_slice(&[0.0f32], 1, &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), var)], AdamWConfig::default())?;
        opt.step(&[Some(Tensor::from_slice(&[10.0f32], 1, &Device::Cpu)?)], 0.1, clip_coefficient(10.0, 1.0))?;
        let m = opt.state_tensors()?["m.w"].to_vec1::<f32>()?[0];
        assert!((m - 0.1 * 1.0).abs() < 1e-6, "m = {m}");
        Ok(())
    }

    #[test]
    fn accumulator_sums_in_place() -> Result<()> {
        let w = Var::from_slice(&[1.0f32, 2.0], 2, &Device::Cpu)?;
        let params = vec![("w".to_string(), w.clone())];
        let mut acc = GradAccumulator::new(1);
        for k in 1..=3 {
            let loss = (w.as_tensor() * k as f64)?.sum_all()?;
            acc.add(&params, &loss.backward()?)?;
        }
        assert_eq!(acc.grads()[0].as_ref().unwrap().to_vec1::<f32>()?, vec![6.0, 6.0]);
        acc.clear();
        assert!(acc.grads()[0].is_none());
        Ok(())
    }
}
