//! A bias-free linear layer whose weight is either trainable (a `Var`'s tensor) or frozen (a plain
//! tensor), with an optional LoRA branch (and its dropout) so a frozen base plus adapters can be
//! trained; `model::lora` builds, saves and loads the adapter sets on top of this.

use super::ops::linear_bf16::{self, WeightCache};
use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

/// A LoRA adapter `y += scale * (x A^T) B^T` (spec §10).
#[derive(Clone, Debug)]
pub struct Lora {
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`.
    pub b: Tensor,
    /// Output scale.
    pub scale: f64,
    /// Dropout on the adapter's input (PEFT applies it to `x` before `A`); `None` = none.
    pub dropout: Option<std::sync::Arc<Dropout>>,
}

/// Inverted dropout on a LoRA branch's input, drawn from a seeded ChaCha stream (candle's CPU RNG
/// cannot be seeded). Shared by all adapters of a model; active only while training.
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    state: Mutex<(rand_chacha::ChaCha8Rng, bool)>,
}

impl Dropout {
    /// Dropout with probability `p`, inactive until [`Self::set_active`].
    pub fn new(p: f64, seed: u64) -> Self {
        Self { p, state: Mutex::new((rand_chacha::ChaCha8Rng::seed_from_u64(seed), false)) }
    }

    /// Restart the mask stream. Stages reseed from each micro-batch's content so that masks depend
    /// only on the data, which keeps resumed runs bit-identical without saving RNG state.
    pub fn reseed(&self, seed: u64) {
        let mut s = self.state.lock().expect("dropout lock");
        s.0 = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    }

    /// Turn masking on (training) or off (evaluation, reference passes).
    pub fn set_active(&self, on: bool) {
        self.state.lock().expect("dropout lock").1 = on;
    }

    /// `x * mask / (1 - p)` when active, else `x`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let mut s = self.state.lock().expect("dropout lock");
        if !s.1 || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let inv = (1.0 / keep) as f32;
        let n = x.elem_count();
        let mask: Vec<f32> = (0..n).map(|_| if s.0.random::<f64>() < keep { inv } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// `y = x W^T` with W `[out, in]` (PyTorch layout, so weights load without transposes).
#[derive(Clone, Debug)]
pub struct Linear {
    /// Module path (`model.layers.0.self_attn.q_proj`): what LoRA targets match and PEFT keys use.
    pub path: String,
    /// `[out, in]`.
    pub weight: Tensor,
    /// Optional adapter.
    pub lora: Option<Lora>,
    /// `Some` when this layer multiplies through the CPU bf16 kernel (see
    /// [`Self::set_cpu_bf16`]); holds the weight's packing between optimizer steps.
    cpu_bf16: Option<Arc<WeightCache>>,
}

impl Linear {
    /// Wrap the weight of the module at `path`.
    pub fn new(path: impl Into<String>, weight: Tensor) -> Self {
        Self { path: path.into(), weight, lora: None, cpu_bf16: None }
    }

    /// Multiply through the CPU bf16 kernel ([`linear_bf16`]: f32 in and out, bf16 operands,
    /// f32 accumulation) or, when `false`, through candle's matmul in the input's dtype.
    pub fn set_cpu_bf16(&mut self, on: bool) {
        self.cpu_bf16 = on.then(Default::default);
    }

    /// Apply to `x` of shape `[N, in]` (2-D; callers flatten batch and time first).
    ///
    /// With [`Self::set_cpu_bf16`] the base matmul runs in the CPU bf16 kernel (`x` f32). Otherwise
    /// it runs in `x`'s dtype: weights (f32 masters) are cast to it at use, which is how bf16
    /// mixed precision works on CUDA. The cast is differentiable (its backward casts the gradient
    /// back), so f32 `Var`s still receive f32 gradients; for f32 `x` the cast is a no-op. The LoRA
    /// branch (rank-sized, cheap) always runs in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = match &self.cpu_bf16 {
            Some(cache) if x.device().is_cpu() && dt == candle_core::DType::F32 => {
                linear_bf16::linear(x, &self.weight, cache)?
            }
            _ => x.matmul(&self.weight.to_dtype(dt)?.t()?)?,
        };
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let xd = match &l.dropout {
                    Some(d) => d.apply(x)?,
                    None => x.clone(),
                };
                let d = xd.matmul(&l.a.to_dtype(dt)?.t()?)?.matmul(&l.b.to_dtype(dt)?.t()?)?;
                y + (d * l.scale)?
            }
        }
    }
}
