//! The model's numeric building blocks. Each op has a composite candle form (differentiable through
//! candle's autograd, any device/dtype) and, for f32 on CPU, a fused `CustomOp` with a hand-written
//! backward (candle-nn's fast ops have no backward and silently cut gradients; see the shared
//! candle-notes). [`use_fused`] picks the fused form when it applies.

use super::rope::RopeTables;
use candle_core::{DType, Device, Result, Tensor, D};

pub mod composite;

/// True when the fused CPU kernels can run on this tensor (f32 on the CPU) and are not disabled
/// through `MMRUN_NO_FUSED=1` (handy to compare speed and numerics with the composite path).
pub fn use_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !fused_disabled()
}

fn fused_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("MMRUN_NO_FUSED").as_deref() == Ok("1"))
}

/// RMSNorm over the last dimension: `w * x / sqrt(mean(x^2) + eps)` (spec §3.1).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    composite::rms_norm(x, w, eps)
}

/// RoPE on `x: [B, T, heads, D]` for positions `start..start+T` (spec §3.2).
pub fn rope(x: &Tensor, tables: &RopeTables, start: usize) -> Result<Tensor> {
    composite::rope(x, tables, start)
}

/// Causal GQA attention. `q: [B, Tq, H, D]`, `k, v: [B, Tk, K, D]` with `Tk >= Tq`; query `i` sees
/// keys `j <= i + (Tk - Tq)` (cached positions are always visible). `key_mask: [B, Tk]` (1 = keep,
/// 0 = padding) is optional. Returns `[B, Tq, H, D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
    composite::attention(q, k, v, key_mask)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    composite::swiglu(gate, up)
}

/// Mean cross-entropy of `logits: [N, V]` against `labels: [N]` (i64, negative = ignored) over the
/// non-ignored rows (0 when every row is ignored). Returns a scalar.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    composite::cross_entropy(logits, labels)
}

/// Softmax over the last dimension, composite (differentiable on every device).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Causal additive mask `[Tq, Tk]`: 0 where visible, -inf above the shifted diagonal.
pub fn causal_mask(tq: usize, tk: usize, device: &Device) -> Result<Tensor> {
    let off = tk - tq;
    let v: Vec<f32> =
        (0..tq).flat_map(|i| (0..tk).map(move |j| if j > i + off { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(v, (tq, tk), device)
}
