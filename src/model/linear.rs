//! A bias-free linear layer whose weight is either trainable (a `Var`'s tensor) or frozen (a plain
//! tensor), with an optional LoRA adapter so a frozen base plus adapters can be trained later.

use candle_core::{Result, Tensor};

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
    pub dropout: Option<std::sync::Arc<super::lora::Dropout>>,
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
}

impl Linear {
    /// Wrap the weight of the module at `path`.
    pub fn new(path: impl Into<String>, weight: Tensor) -> Self {
        Self { path: path.into(), weight, lora: None }
    }

    /// Apply to `x` of shape `[N, in]` (2-D; callers flatten batch and time first). The matmul
    /// runs in `x`'s dtype: weights (f32 masters) are cast to it at use, which is how bf16 mixed
    /// precision works here. The cast is differentiable (its backward casts the gradient back), so
    /// f32 `Var`s still receive f32 gradients; for f32 `x` the cast is a no-op.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = x.matmul(&self.weight.to_dtype(dt)?.t()?)?;
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
