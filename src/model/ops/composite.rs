//! Composite (plain candle) forms of the model ops: differentiable by candle's autograd on every
//! device and dtype. They are the reference the fused kernels are tested against.

use super::super::packed::DocPositions;
use super::super::rope::RopeTables;
use super::Positions;
use candle_core::{DType, Result, Tensor, D};

/// RMSNorm over the last dim, computed in f32 and cast back (spec §3.1).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.broadcast_mul(&w.to_dtype(DType::F32)?)?.to_dtype(dt)
}

/// NeoX RoPE on `[B, T, heads, D]`.
pub fn rope(x: &Tensor, tables: &RopeTables, at: Positions) -> Result<Tensor> {
    let (b, t, _h, d) = x.dims4()?;
    let ((cos, sin), rows) = match at {
        Positions::From(start) => (tables.full_tables(start, t, x.device())?, 1),
        Positions::Docs(p) => (tables.tables_at(p.positions(), x.device())?, b),
    };
    let cos = cos.to_dtype(x.dtype())?.reshape((rows, t, 1, d))?;
    let sin = sin.to_dtype(x.dtype())?.reshape((rows, t, 1, d))?;
    let x1 = x.narrow(3, 0, d / 2)?;
    let x2 = x.narrow(3, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Repeat kv heads: `[B, T, K, D]` → `[B, K*rep, T, D]` (kv head j serves q heads j*rep..).
fn repeat_kv_t(x: &Tensor, rep: usize) -> Result<Tensor> {
    let (b, t, k, d) = x.dims4()?;
    let x = x.transpose(1, 2)?; // [B, K, T, D]
    if rep == 1 {
        return x.contiguous();
    }
    x.unsqueeze(2)?.expand((b, k, rep, t, d))?.reshape((b, k * rep, t, d))
}

/// Causal GQA attention with an optional key-padding mask and per-document masking of packed
/// rows; see [`super::attention`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    docs: Option<&DocPositions>,
) -> Result<Tensor> {
    let (b, tq, h, d) = q.dims4()?;
    let (_, tk, kh, _) = k.dims4()?;
    let rep = h / kh;
    let qt = q.transpose(1, 2)?.contiguous()?; // [B, H, Tq, D]
    let kt = repeat_kv_t(k, rep)?;
    let vt = repeat_kv_t(v, rep)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (qt.matmul(&kt.t()?.contiguous()?)? * scale)?; // [B, H, Tq, Tk]
    let mask = match docs {
        // Block-diagonal causal, `[B, 1, T, T]`.
        Some(d) => d.additive_mask(q.device())?,
        None => super::causal_mask(tq, tk, q.device())?,
    };
    let mut scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    if let Some(m) = key_mask {
        // (1 - mask) * -1e9 per key, like the reference's slow path.
        let add = ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * -1e9)?).to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&add.reshape((b, 1, 1, tk))?)?;
    }
    let p = super::softmax_last(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
    let o = p.matmul(&vt)?; // [B, H, Tq, D]
    o.transpose(1, 2)?.contiguous()
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Masked mean cross-entropy; see [`super::cross_entropy`].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let valid = labels.ge(0i64)?;
    let safe = valid.where_cond(labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?;
    let m = logits.max_keepdim(D::Minus1)?;
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?; // [N, 1]
    let picked = logits.gather(&safe.unsqueeze(1)?, 1)?; // [N, 1]
    let validf = valid.to_dtype(DType::F32)?;
    let per = (lse - picked)?.squeeze(1)?.mul(&validf)?;
    let count = validf.sum_all()?.to_scalar::<f32>()?.max(1.0);
    per.sum_all()? / count as f64
}
