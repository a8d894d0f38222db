//! The model's numeric building blocks. Each op has a composite candle form (differentiable through
//! candle's autograd, any device/dtype) and, for f32 on CPU, a fused `CustomOp` with a hand-written
//! backward (candle-nn's fast ops have no backward and silently cut gradients; see the shared
//! candle-notes). [`use_fused`] picks the fused form when it applies.

use super::packed::DocPositions;
use super::rope::RopeTables;
use candle_core::{DType, Device, Result, Tensor, D};

pub mod composite;
pub mod decode;
pub mod fused;
pub mod gemm;
pub mod linear_bf16;
pub mod skinny;
pub mod vmath;

/// A raw pointer that rayon tasks may share because each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: the kernels that build one hand each task its own region of the buffer.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer; a method (not `.0`) so closures capture the whole `Sync` wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A buffer of `n` elements for a kernel that writes every one of them before anything reads it
/// (an op's output or gradient, a packed operand), left unzeroed: zeroing it first was a memset
/// per tensor, about 8 % of a bf16 training step at the reference shape. The same as candle's own
/// `alloc_uninit` for its op outputs.
///
/// Callers: only kernels whose every path writes the whole buffer (a GEMM that does not accumulate,
/// an element-wise map, a packing); anything that skips elements (masked rows, scatter-adds)
/// zeroes instead.
#[allow(clippy::uninit_vec)]
pub(crate) fn output_buffer<T: Plain>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `T` has no invalid bit patterns (`Plain`), and the callers overwrite every element
    // before the buffer is read (see above).
    unsafe { v.set_len(n) };
    v
}

/// Element types for which every bit pattern is a valid value ([`output_buffer`]).
pub(crate) trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u32 {}

/// True when the fused CPU kernels can run on this tensor (f32 on the CPU) and are not disabled
/// through `MMRUN_NO_FUSED=1` (handy to compare speed and numerics with the composite path).
pub fn use_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !fused_disabled() && !FORCE_COMPOSITE.with(|c| c.get())
}

thread_local! {
    static FORCE_COMPOSITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with the composite ops forced on this thread (tests compare both paths with it).
pub fn with_composite<R>(f: impl FnOnce() -> R) -> R {
    let prev = FORCE_COMPOSITE.with(|c| c.replace(true));
    let r = f();
    FORCE_COMPOSITE.with(|c| c.set(prev));
    r
}

fn fused_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("MMRUN_NO_FUSED").as_deref() == Ok("1"))
}

/// RMSNorm over the last dimension: `w * x / sqrt(mean(x^2) + eps)` (spec §3.1).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(x) && w.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, fused::RmsNorm { eps: eps as f32 });
    }
    composite::rms_norm(x, w, eps)
}

/// Where the RoPE positions of a `[B, T]` input come from.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// `start..start+T` in every row (`start` = positions already cached; 0 for a full pass).
    From(usize),
    /// Per-token positions of packed documents (restarting at 0 for each document).
    Docs(&'a DocPositions),
}

/// RoPE on `x: [B, T, heads, D]` at positions `at` (spec §3.2).
pub fn rope(x: &Tensor, tables: &RopeTables, at: Positions) -> Result<Tensor> {
    if use_fused(x) {
        let (start, pos) = match at {
            Positions::From(s) => (s, None),
            Positions::Docs(d) => (0, Some(d.positions().clone())),
        };
        return x.contiguous()?.apply_op1(fused::Rope { tables: tables.clone(), start, pos, inverse: false });
    }
    composite::rope(x, tables, at)
}

/// Causal GQA attention. `q: [B, Tq, H, D]`, `k, v: [B, Tk, K, D]` with `Tk >= Tq`; query `i` sees
/// keys `j <= i + (Tk - Tq)` (cached positions are always visible). `key_mask: [B, Tk]` (1 = keep,
/// 0 = padding) is optional. With `docs` (packed rows; `Tq = Tk`), query `i` sees only the keys of
/// its own document. `k`, `v` may be bf16 under f32 `q` (a bf16 KV cache; [`decode`] reads it in
/// place for short `Tq`). With `bf16` (mixed precision on the CPU), the fused kernel's matmuls round
/// their operands to bf16 and sum in f32, as the linear layers do; the softmax stays f32. Returns
/// `[B, Tq, H, D]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    docs: Option<&DocPositions>,
    bf16: bool,
) -> Result<Tensor> {
    if let Some(d) = docs {
        let (b, tq) = (q.dim(0)?, q.dim(1)?);
        if d.dims() != (b, tq) || k.dim(1)? != tq {
            candle_core::bail!(
                "attention: document positions {:?} do not match q {:?} / k {:?} (packed rows need Tq = Tk)",
                d.dims(),
                q.dims(),
                k.dims()
            );
        }
    }
    let mask_bits = |m: Option<&Tensor>| -> Result<Option<std::sync::Arc<Vec<bool>>>> {
        let Some(m) = m else { return Ok(None) };
        let m: Vec<f32> = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Some(std::sync::Arc::new(m.into_iter().map(|x| x != 0.0).collect())))
    };
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        // A bf16 cache under f32 queries (bf16 decoding on the CPU): a decode step reads it in
        // place; a long prefill converts it once (O(cache)) for the GEMM-based kernel (O(T·cache)).
        let decode_step = q.device().is_cpu()
            && q.dtype() == DType::F32
            && k.dtype() == DType::BF16
            && v.dtype() == DType::BF16
            && docs.is_none()
            && q.dim(1)? <= decode::MAX_TQ;
        if decode_step {
            let op = decode::DecodeAttention { key_mask: mask_bits(key_mask)? };
            return q.contiguous()?.apply_op3(k, v, op);
        }
        return attention(q, &k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?, key_mask, docs, bf16);
    }
    if use_fused(q) && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
        let key_mask = mask_bits(key_mask)?;
        let docs = docs.map(|d| d.positions().clone());
        let bf16 = bf16.then(gemm::Backend::detect);
        let op = fused::Attention { key_mask, docs, bf16 };
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    composite::attention(q, k, v, key_mask, docs)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if use_fused(gate) && up.dtype() == DType::F32 {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, fused::SwiGlu);
    }
    composite::swiglu(gate, up)
}

/// Mean cross-entropy of `logits: [N, V]` against `labels: [N]` (i64, negative = ignored) over the
/// non-ignored rows (0 when every row is ignored). Returns a scalar.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if use_fused(logits) {
        // The gradient is computed in the forward when the logits will get one (training).
        let op = fused::CrossEntropy { grad: logits.track_op().then(Default::default) };
        return logits.contiguous()?.apply_op2(&labels.to_dtype(DType::I64)?.contiguous()?, op);
    }
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

#[cfg(test)]
mod tests;
