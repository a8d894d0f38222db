//! The linear layer of bf16 mixed precision on the CPU: `y = x Wᵀ` as a candle `CustomOp2` whose
//! forward and backward (`dX = dY · W`, `dW = dYᵀ · X`) all run through the bf16 GEMM of
//! [`super::gemm`]. Activations, outputs and gradients stay f32 (the operands are rounded to bf16
//! when packed, like PyTorch autocast), so the f32 fused ops keep working around it.
//!
//! A weight is packed (rounded and laid out for the kernel) once and reused by every matmul until
//! the weights change: [`WeightCache`] keys the packing by the tensor and, for trainable weights,
//! a process-wide epoch that [`weights_changed`] bumps. Everything that rewrites `Var`s in place
//! (the optimizer step, a checkpoint restore, a LoRA merge into a trainable base) calls it.

use super::gemm::{self, Backend, Elems, MatRef, Packed};
use super::skinny;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Invalidate every packed weight: call after rewriting weights in place. The next matmul of each
/// layer packs its weight again (once per optimizer step, not once per matmul).
pub fn weights_changed() {
    EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// A `[out, in]` f32 weight prepared for the bf16 kernels, each form built at its first use: the
/// GEMM's packings for training and prefill, and bf16 rows for decoding (`super::skinny`; a
/// model that only decodes never packs for the GEMM).
#[derive(Debug)]
pub struct PackedWeight {
    /// `Wᵀ` (K = in, N = out): the forward's right operand for more than [`skinny::MAX_M`] rows.
    fwd: OnceLock<Packed>,
    /// `W` (K = out, N = in): the input gradient's right operand (frozen models never need it).
    bwd: OnceLock<Packed>,
    /// `W` as bf16 rows: the forward's weight for up to [`skinny::MAX_M`] rows (decoding).
    rows: OnceLock<skinny::Bf16Rows>,
    /// The f32 weight the packings come from.
    weight: Tensor,
    backend: Backend,
}

impl PackedWeight {
    /// Prepare `w` (`[out, in]`, f32, CPU) for `backend`; nothing is packed yet.
    pub fn new(w: &Tensor, backend: Backend) -> Result<Self> {
        if w.rank() != 2 || w.dtype() != DType::F32 || !w.device().is_cpu() {
            bail!("bf16 linear: the weight must be a 2-D f32 CPU tensor, got {:?} {:?}", w.shape(), w.dtype());
        }
        Ok(Self { fwd: OnceLock::new(), bwd: OnceLock::new(), rows: OnceLock::new(), weight: w.clone(), backend })
    }

    fn fwd(&self) -> Result<&Packed> {
        self.packed(&self.fwd, true)
    }

    fn bwd(&self) -> Result<&Packed> {
        self.packed(&self.bwd, false)
    }

    fn packed<'a>(&self, slot: &'a OnceLock<Packed>, transposed: bool) -> Result<&'a Packed> {
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let p = with_matrix(&self.weight, |m| Ok(Packed::new(if transposed { m.t() } else { m }, self.backend)))?;
        Ok(slot.get_or_init(|| p))
    }

    fn rows(&self) -> Result<&skinny::Bf16Rows> {
        if let Some(r) = self.rows.get() {
            return Ok(r);
        }
        let r = with_matrix(&self.weight, |m| Ok(skinny::Bf16Rows::new(m)))?;
        Ok(self.rows.get_or_init(|| r))
    }
}

/// The packed form of one layer's weight, rebuilt when the weight tensor or the epoch changed.
#[derive(Default)]
pub struct WeightCache {
    slot: Mutex<Option<(candle_core::TensorId, u64, Arc<PackedWeight>)>>,
}

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeightCache")
    }
}

impl WeightCache {
    /// The packing of `w` for this CPU, from the cache when `w` has not changed since. Only a
    /// trainable weight (a `Var`'s tensor) changes in place, so a frozen one (a LoRA base, DPO's
    /// reference model) is packed once, whatever the epoch.
    pub fn get(&self, w: &Tensor) -> Result<Arc<PackedWeight>> {
        let epoch = if w.is_variable() { EPOCH.load(Ordering::Acquire) } else { 0 };
        let mut slot = self.slot.lock().expect("weight cache lock");
        if let Some((id, e, p)) = &*slot {
            if *id == w.id() && *e == epoch {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(PackedWeight::new(w, Backend::detect())?);
        *slot = Some((w.id(), epoch, p.clone()));
        Ok(p)
    }
}

/// `x Wᵀ` for `x: [N, in]` and `w: [out, in]`, both f32 on the CPU, with bf16 operands and f32
/// accumulation (forward and backward); `cache` holds `w`'s packing between optimizer steps.
pub fn linear(x: &Tensor, w: &Tensor, cache: &WeightCache) -> Result<Tensor> {
    x.apply_op2(w, LinearBf16 { w: cache.get(w)? })
}

/// The custom op behind [`linear`].
pub struct LinearBf16 {
    /// The packed weight (the op's second argument, packed).
    pub w: Arc<PackedWeight>,
}

/// Run `f` on a 2-D f32 CPU tensor as a strided matrix view.
fn with_matrix<R>(t: &Tensor, f: impl FnOnce(MatRef) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(matrix(c, l, "bf16 linear")?),
        _ => bail!("bf16 linear: tensor is not on the CPU"),
    }
}

fn matrix<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<MatRef<'a>> {
    let (rows, cols) = l.shape().dims2()?;
    let st = l.stride();
    let data = match s {
        CpuStorage::F32(v) => Elems::F32(&v[l.start_offset()..]),
        other => bail!("{op}: expected f32, got {:?}", other.dtype()),
    };
    Ok(MatRef::new(data, rows, cols, st[0], st[1]))
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "mmrun-linear-bf16"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, _s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = matrix(s1, l1, "bf16 linear")?;
        let (out, inp) = l2.shape().dims2()?;
        if x.cols() != inp || self.w.weight.dims() != [out, inp] {
            bail!("bf16 linear: x is {}x{}, weight {out}x{inp}", x.rows(), x.cols());
        }
        let mut y = super::output_buffer(x.rows() * out);
        // A decode step (a few rows) streams the weight's bf16 rows; more rows amortise the GEMM's
        // packing and tiles.
        if x.rows() <= skinny::MAX_M {
            skinny::matmul(x, self.w.rows()?, &mut y, out, skinny::Kernel::detect());
        } else {
            gemm::gemm(x, self.w.fwd()?, &mut y, out, false);
        }
        Ok((CpuStorage::F32(y), Shape::from((x.rows(), out))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.to_dtype(DType::F32)?.contiguous()?;
        let (n, out) = gy.dims2()?;
        let inp = x.dim(1)?;
        let dx = if x.track_op() {
            let mut dx = super::output_buffer(n * inp);
            with_matrix(&gy, |g| {
                gemm::gemm(g, self.w.bwd()?, &mut dx, inp, false);
                Ok(())
            })?;
            Some(Tensor::from_vec(dx, (n, inp), x.device())?)
        } else {
            None
        };
        // A frozen weight (a LoRA base) gets no gradient: a third of the backward saved.
        let dw = if !w.track_op() {
            None
        } else if out > inp {
            // `dWᵀ = Xᵀ · dY`, transposed after: the larger operand, dY, is packed as B, whose rows
            // convert as whole vectors, where as A (`dYᵀ`) it would be gathered and scattered
            // column by column. For the LM head (out = vocabulary) that was most of its backward.
            let gp = with_matrix(&gy, |g| Ok(Packed::new(g, self.w.backend)))?;
            let mut dwt = super::output_buffer(inp * out);
            with_matrix(x, |m| {
                gemm::gemm(m.t(), &gp, &mut dwt, out, false);
                Ok(())
            })?;
            Some(Tensor::from_vec(transpose(&dwt, inp, out), (out, inp), w.device())?)
        } else {
            let xp = with_matrix(x, |m| Ok(Packed::new(m, self.w.backend)))?;
            let mut dw = super::output_buffer(out * inp);
            with_matrix(&gy, |g| {
                gemm::gemm(g.t(), &xp, &mut dw, inp, false);
                Ok(())
            })?;
            Some(Tensor::from_vec(dw, (out, inp), w.device())?)
        };
        Ok((dx, dw))
    }
}

/// The transpose of row-major `a` (`rows × cols`), in tiles so that both sides stay in cache.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut t = super::output_buffer(rows * cols);
    // Each task owns TILE rows of the result (TILE columns of `a`).
    t.par_chunks_mut(TILE * rows).enumerate().for_each(|(cb, out)| {
        let c0 = cb * TILE;
        let cw = out.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in 0..cw {
                    out[c * rows + r] = a[r * cols + c0 + c];
                }
            }
        }
    });
    t
}
