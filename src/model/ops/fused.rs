//! Fused f32 CPU kernels as candle `CustomOp`s with hand-written backward passes (rayon-parallel).
//! Callers ([`super`]) make inputs contiguous first, so kernels index plain row-major slices.

use super::super::rope::RopeTables;
use super::gemm::{self as bf16gemm, Backend, Elems, MatRef, Packed, PackedRef};
use super::vmath;
use super::SyncPtr;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The contiguous f32 slice behind a storage/layout pair.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => bail!("{op}: expected f32 input, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Run `f` on the contiguous f32 data of a CPU tensor without copying when possible.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(f32_slice(c, l, "fused op backward")?),
        _ => bail!("fused op backward: tensor is not on the CPU"),
    }
}

/// Rows per rayon task for row-wise kernels: big enough to amortise scheduling.
fn rows_per_task(rows: usize, width: usize) -> usize {
    (16384 / width.max(1)).max(1).min(rows.max(1))
}

// ---------------------------------------------------------------- RMSNorm

/// `y = w * x / sqrt(mean(x^2) + eps)` over the last dim; backward gives dx and dw in one pass.
pub struct RmsNorm {
    /// Epsilon.
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "mmrun-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let n = w.len();
        if l1.dims().last() != Some(&n) {
            bail!("rms_norm: last dim {:?} != weight len {n}", l1.dims());
        }
        let mut y = super::output_buffer(x.len());
        let chunk = rows_per_task(x.len() / n, n) * n;
        y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(n).zip(xc.chunks_exact(n)) {
                vmath::rms_norm_row(yr, xr, w, self.eps);
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let (dx, dw) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(gy, |gy| {
                    let mut dx = super::output_buffer(x.len());
                    let chunk = rows_per_task(x.len() / n, n) * n;
                    let dw = dx
                        .par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk))
                        .zip(gy.par_chunks(chunk))
                        .map(|((dxc, xc), gc)| {
                            let mut dw = vec![0f32; n];
                            for ((dxr, xr), gr) in
                                dxc.chunks_exact_mut(n).zip(xc.chunks_exact(n)).zip(gc.chunks_exact(n))
                            {
                                vmath::rms_norm_backward_row(dxr, &mut dw, xr, w, gr, self.eps);
                            }
                            dw
                        })
                        .reduce(
                            || vec![0f32; n],
                            |mut a, b| {
                                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                                a
                            },
                        );
                    Ok((dx, dw))
                })
            })
        })?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

// ---------------------------------------------------------------- RoPE

/// NeoX RoPE on contiguous `[B, T, heads, D]` for positions `start..start+T`, or per token from
/// `pos` (packed documents); `inverse` rotates by −θ, which is exactly the backward pass (so the
/// backward is itself this op).
pub struct Rope {
    /// Tables.
    pub tables: RopeTables,
    /// First position (without `pos`).
    pub start: usize,
    /// `[B * T]` per-token positions, overriding `start`.
    pub pos: Option<Arc<Vec<u32>>>,
    /// Rotate by −θ.
    pub inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "mmrun-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        let dims = l.dims();
        if dims.len() != 4 {
            bail!("rope: expected [B, T, heads, D], got {dims:?}");
        }
        let (t, h, d) = (dims[1], dims[2], dims[3]);
        let half = d / 2;
        if half != self.tables.half {
            bail!("rope: head dim {d} does not match the tables ({})", 2 * self.tables.half);
        }
        let last = match &self.pos {
            Some(p) if p.len() != dims[0] * t => bail!("rope: {} positions for {dims:?}", p.len()),
            Some(p) => p.iter().map(|&x| x as usize + 1).max().unwrap_or(0),
            None => self.start + t,
        };
        if last > self.tables.max_pos {
            bail!(
                "rope: position {last} exceeds max_position_embeddings {}; raise it in the model config",
                self.tables.max_pos
            );
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut y = super::output_buffer(x.len());
        let row = h * d;
        y.par_chunks_mut(row).zip(x.par_chunks(row)).enumerate().for_each(|(bt, (yr, xr))| {
            let pos = match &self.pos {
                Some(p) => p[bt] as usize,
                None => self.start + bt % t,
            };
            let cos = &self.tables.cos[pos * half..(pos + 1) * half];
            let sin = &self.tables.sin[pos * half..(pos + 1) * half];
            for (yh, xh) in yr.chunks_exact_mut(d).zip(xr.chunks_exact(d)) {
                let (x1, x2) = xh.split_at(half);
                let (y1, y2) = yh.split_at_mut(half);
                for i in 0..half {
                    let (c, s) = (cos[i], sign * sin[i]);
                    y1[i] = x1[i] * c - x2[i] * s;
                    y2[i] = x2[i] * c + x1[i] * s;
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        let inv =
            Rope { tables: self.tables.clone(), start: self.start, pos: self.pos.clone(), inverse: !self.inverse };
        Ok(Some(gy.contiguous()?.apply_op1(inv)?))
    }
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) * up`, backward for both inputs in one pass.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "mmrun-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "swiglu")?;
        let u = f32_slice(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        let mut y = super::output_buffer(g.len());
        y.par_chunks_mut(8192)
            .zip(g.par_chunks(8192))
            .zip(u.par_chunks(8192))
            .for_each(|((y, g), u)| vmath::swiglu(y, g, u));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(g, |g| {
            with_f32(u, |u| {
                with_f32(gy, |gy| {
                    let mut dg = super::output_buffer(g.len());
                    let mut du = super::output_buffer(g.len());
                    dg.par_chunks_mut(8192)
                        .zip(du.par_chunks_mut(8192))
                        .zip(g.par_chunks(8192).zip(u.par_chunks(8192)).zip(gy.par_chunks(8192)))
                        .for_each(|((dg, du), ((g, u), gy))| vmath::swiglu_backward(dg, du, g, u, gy));
                    Ok((dg, du))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Mean cross-entropy of `logits [N, V]` against i64 `labels [N]` (negative = ignored).
///
/// When the logits need a gradient, the forward also writes it for an upstream gradient of 1,
/// `(softmax − one_hot) / count`, while each row is still in cache, and the backward only scales
/// it: reading the `N × V` logits again and recomputing their softmax in the backward was a third
/// of the cross-entropy's time. Otherwise the backward recomputes it.
#[derive(Default)]
pub struct CrossEntropy {
    /// `Some` to compute the gradient in the forward; holds it until the backward takes it.
    pub grad: Option<std::sync::Mutex<Option<Vec<f32>>>>,
}

fn labels_i64(s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("labels must be contiguous".into()))?;
    Ok(match s {
        CpuStorage::I64(v) => v[a..b].to_vec(),
        CpuStorage::U32(v) => v[a..b].iter().map(|&x| x as i64).collect(),
        _ => bail!("cross_entropy: labels must be i64 or u32, got {:?}", s.dtype()),
    })
}

/// `d = (softmax(r) − one_hot(lab)) · scale` for one row (zeros for an ignored one), given the
/// row's log-sum-exp.
fn cross_entropy_grad_row(d: &mut [f32], r: &[f32], lab: i64, lse: f32, scale: f32) {
    if lab < 0 {
        d.fill(0.0);
        return;
    }
    vmath::exp_shift_scale(d, r, lse, scale);
    d[lab as usize] -= scale;
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "mmrun-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "cross_entropy")?;
        let labels = labels_i64(s2, l2)?;
        let (n, v) = l1.shape().dims2()?;
        if labels.len() != n {
            bail!("cross_entropy: {} labels for {n} rows", labels.len());
        }
        if labels.iter().any(|&l| l >= v as i64) {
            bail!("cross_entropy: a label is >= vocab size {v}");
        }
        let count = labels.iter().filter(|&&l| l >= 0).count();
        let row_loss = |r: &[f32], lab: i64| -> (f32, f64) {
            if lab < 0 {
                return (0.0, 0.0);
            }
            let lse = vmath::log_sum_exp(r);
            (lse, (lse - r[lab as usize]) as f64)
        };
        let sum: f64 = match &self.grad {
            Some(slot) => {
                let scale = 1.0 / count.max(1) as f32;
                let mut dx = super::output_buffer(n * v);
                let sum = dx
                    .par_chunks_mut(v)
                    .zip(x.par_chunks(v))
                    .zip(labels.par_iter())
                    .map(|((d, r), &lab)| {
                        let (lse, loss) = row_loss(r, lab);
                        cross_entropy_grad_row(d, r, lab, lse, scale);
                        loss
                    })
                    .sum();
                *slot.lock().expect("cross-entropy gradient slot") = Some(dx);
                sum
            }
            None => x.par_chunks(v).zip(labels.par_iter()).map(|(r, &lab)| row_loss(r, lab).1).sum(),
        };
        let loss = if count == 0 { 0.0 } else { (sum / count as f64) as f32 };
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, labels: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = x.dims2()?;
        let g = gy.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
        if let Some(mut dx) =
            self.grad.as_ref().and_then(|slot| slot.lock().expect("cross-entropy gradient slot").take())
        {
            if g != 1.0 {
                dx.par_chunks_mut(8192).for_each(|c| c.iter_mut().for_each(|d| *d *= g));
            }
            return Ok((Some(Tensor::from_vec(dx, (n, v), x.device())?), None));
        }
        let labels: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
        let count = labels.iter().filter(|&&l| l >= 0).count().max(1);
        let scale = g / count as f32;
        let dx = with_f32(x, |x| {
            let mut dx = super::output_buffer(n * v);
            dx.par_chunks_mut(v).zip(x.par_chunks(v)).zip(labels.par_iter()).for_each(|((d, r), &lab)| {
                let lse = if lab < 0 { 0.0 } else { vmath::log_sum_exp(r) };
                cross_entropy_grad_row(d, r, lab, lse, scale)
            });
            Ok(dx)
        })?;
        Ok((Some(Tensor::from_vec(dx, (n, v), x.device())?), None))
    }
}

// ---------------------------------------------------------------- attention

/// Causal GQA attention on contiguous `q [B, Tq, H, D]`, `k, v [B, Tk, K, D]`; query `i` sees keys
/// `j <= i + Tk - Tq` that the optional key mask keeps. Query heads are grouped per kv head so K/V
/// are never repeated; the backward recomputes the probabilities (nothing T×T is kept alive).
/// With `docs` (packed rows), query `i` sees only keys `i - pos[i] ..= i`, its own document.
pub struct Attention {
    /// `[B * Tk]`, true = keep.
    pub key_mask: Option<Arc<Vec<bool>>>,
    /// `[B * T]` positions within packed documents (requires `Tq = Tk`).
    pub docs: Option<Arc<Vec<u32>>>,
    /// The backend of the bf16 GEMM when the matmuls run with bf16 operands (mixed precision on
    /// the CPU); `None` runs them in f32.
    pub bf16: Option<Backend>,
}

/// Query rows per block: the causal structure lets block r skip keys after its last query, and
/// with packed documents, the keys before the document of its first query.
const QBLOCK: usize = 64;

struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    kh: usize,
    d: usize,
}

impl Dims {
    fn off(&self) -> usize {
        self.tk - self.tq
    }
}

/// `C (m × n, row stride ldc) (+)= A · B` for one block of the attention: in f32 through the gemm
/// crate, or with `bf16` through [`bf16gemm`] (operands rounded to bf16, sums in f32: the numerics
/// of PyTorch's bf16 autocast, at the speed of AMX or VDPBF16PS). `packed` is B already packed for
/// the bf16 GEMM (a window of a [`Packs`] operand); without it, the bf16 path packs `b` here.
///
/// # Safety
/// `c` must be valid for reads and writes of the `m × n` block, which must be this task's alone.
unsafe fn mm(
    bf16: Option<Backend>,
    a: MatRef,
    b: MatRef,
    packed: Option<PackedRef>,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    if m == 0 || n == 0 {
        return;
    }
    if let Some(backend) = bf16 {
        return match packed {
            Some(p) => bf16gemm::gemm_ptr(a, p, SyncPtr(c), ldc, acc),
            None => bf16gemm::gemm_ptr(a, Packed::new(b, backend).as_ref(), SyncPtr(c), ldc, acc),
        };
    }
    let ((ad, ars, acs), (bd, brs, bcs)) = (a.f32_parts(), b.f32_parts());
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        acc,
        ad.as_ptr(),
        acs as isize,
        ars as isize,
        bd.as_ptr(),
        bcs as isize,
        brs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// An operand every query block of a (batch, kv head) multiplies by, in [`Packs`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operand {
    /// Kᵀ (d × Tk), for S = Q Kᵀ.
    Kt,
    /// Vᵀ (d × Tk), for dP = dO Vᵀ.
    Vt,
    /// K (Tk × d), for dQ = dS K.
    K,
    /// V (Tk × d), for O = P V.
    V,
}

/// The bf16 GEMM's operands that all query blocks and query heads of a (batch, kv head) read,
/// packed once per call: packing them for every block was half the time of the bf16 attention.
/// A block uses a window of them, its keys `0..kmax`: keys lie along N in `Kt`/`Vt` (one K block,
/// any run of whole column panels) and along K in `K`/`V`, whose K blocks are one query block.
struct Packs {
    which: Vec<Operand>,
    /// `[batch * kv heads][operand]`.
    packed: Vec<Vec<Packed>>,
}

impl Packs {
    fn new(dm: &Dims, k: &[f32], v: &[f32], backend: Backend, which: &[Operand]) -> Self {
        let kd = dm.kh * dm.d;
        let packed = (0..dm.b * dm.kh)
            .into_par_iter()
            .map(|bg| {
                let base = (bg / dm.kh) * dm.tk * kd + (bg % dm.kh) * dm.d;
                let along_n = |x| view(x, base, dm.d, dm.tk, 1, kd);
                let along_k = |x| view(x, base, dm.tk, dm.d, kd, 1);
                which
                    .iter()
                    .map(|op| match op {
                        Operand::Kt => Packed::new(along_n(k), backend),
                        Operand::Vt => Packed::new(along_n(v), backend),
                        Operand::K => Packed::with_k_block(along_k(k), backend, QBLOCK / 2),
                        Operand::V => Packed::with_k_block(along_k(v), backend, QBLOCK / 2),
                    })
                    .collect()
            })
            .collect();
        Self { which: which.to_vec(), packed }
    }

    /// Keys `kmin..kmin + kw` of `op` for (batch b, kv head g), when a window holds them.
    fn window(&self, dm: &Dims, b: usize, g: usize, op: Operand, kmin: usize, kw: usize) -> Option<PackedRef<'_>> {
        let i = self.which.iter().position(|&w| w == op)?;
        let p = &self.packed[b * dm.kh + g][i];
        if kmin > 0 {
            return None;
        }
        match op {
            Operand::Kt | Operand::Vt => p.window(dm.d, kw),
            Operand::K | Operand::V => p.window(kw, dm.d),
        }
    }
}

/// A strided f32 view for [`mm`]: `rows × cols` from `data[off..]` with strides `rs`, `cs`.
fn view(data: &[f32], off: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> MatRef<'_> {
    MatRef::new(Elems::F32(&data[off..]), rows, cols, rs, cs)
}

impl Attention {
    /// Softmax probabilities for query rows `i0..i1` of (batch b, head h) into `p` (`[rows, kw]`,
    /// row-major) over keys `kmin..kmin + kw`, computed from `q`/`k` with masking; returns
    /// `(kmin, kw)`, the key window no query of the block sees past.
    #[allow(clippy::too_many_arguments)]
    unsafe fn probs(
        &self,
        dm: &Dims,
        q: &[f32],
        k: &[f32],
        b: usize,
        h: usize,
        i0: usize,
        i1: usize,
        p: &mut Vec<f32>,
        packs: Option<&Packs>,
    ) -> (usize, usize) {
        let (d, hd, kd) = (dm.d, dm.h * dm.d, dm.kh * dm.d);
        let g = h / (dm.h / dm.kh);
        let docs = self.docs.as_deref().map(|x| &x[b * dm.tq..(b + 1) * dm.tq]);
        // Document starts only grow along a row, so the first query's bounds the block's.
        let kmin = docs.map_or(0, |x| i0 - x[i0] as usize);
        let kmax = (i1 + dm.off()).min(dm.tk);
        let (rows, kw) = (i1 - i0, kmax - kmin);
        p.clear();
        p.resize(rows * kw, 0.0);
        let q = view(q, b * dm.tq * hd + i0 * hd + h * d, rows, d, hd, 1);
        // S = Q Kᵀ: Kᵀ (d, j) = K[j, d], row stride 1, column stride kd.
        let kt = view(k, b * dm.tk * kd + kmin * kd + g * d, d, kw, 1, kd);
        let packed = packs.and_then(|x| x.window(dm, b, g, Operand::Kt, kmin, kw));
        mm(self.bf16, q, kt, packed, p.as_mut_ptr(), kw, false);
        let scale = 1.0 / (d as f32).sqrt();
        let mask = self.key_mask.as_deref().map(|m| &m[b * dm.tk..(b + 1) * dm.tk]);
        for r in 0..rows {
            let i = i0 + r;
            // Visible keys `lo..lim` (absolute), stored at `j - kmin`.
            let lim = (i + dm.off() + 1).min(kmax);
            let lo = docs.map_or(0, |x| i - x[i] as usize);
            let row = &mut p[r * kw..(r + 1) * kw];
            // Keys the query does not see get −∞, which the softmax turns into 0.
            row[..lo - kmin].fill(f32::NEG_INFINITY);
            row[lim - kmin..].fill(f32::NEG_INFINITY);
            if let Some(m) = mask {
                for j in lo..lim {
                    if !m[j] {
                        row[j - kmin] = f32::NEG_INFINITY;
                    }
                }
            }
            vmath::softmax_scaled(row, scale);
        }
        (kmin, kw)
    }
}

fn attn_dims(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Dims> {
    let (b, tq, h, d) = lq.shape().dims4()?;
    let (b2, tk, kh, d2) = lk.shape().dims4()?;
    if b2 != b || d2 != d || lv.shape() != lk.shape() || tk < tq || kh == 0 || h % kh != 0 {
        bail!("attention: bad shapes q {:?} k {:?} v {:?}", lq.dims(), lk.dims(), lv.dims());
    }
    Ok(Dims { b, tq, tk, h, kh, d })
}

impl Attention {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Dims> {
        let dm = attn_dims(lq, lk, lv)?;
        if let Some(p) = &self.docs {
            if dm.tq != dm.tk || p.len() != dm.b * dm.tq {
                bail!("attention: {} document positions for q {:?} and k {:?}", p.len(), lq.dims(), lk.dims());
            }
        }
        Ok(dm)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "mmrun-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims(lq, lk, lv)?;
        let q = f32_slice(sq, lq, "attention")?;
        let k = f32_slice(sk, lk, "attention")?;
        let v = f32_slice(sv, lv, "attention")?;
        // Every query block writes its rows of every head.
        let mut out = super::output_buffer(q.len());
        let op = SyncPtr(out.as_mut_ptr());
        let (d, hd, kd, rep) = (dm.d, dm.h * dm.d, dm.kh * dm.d, dm.h / dm.kh);
        let packs = self.bf16.map(|be| Packs::new(&dm, k, v, be, &[Operand::Kt, Operand::V]));
        let packs = packs.as_ref();
        (0..dm.b * dm.h).into_par_iter().for_each_init(Vec::new, |p, bh| {
            let (b, h) = (bh / dm.h, bh % dm.h);
            let g = h / rep;
            let mut i0 = 0;
            while i0 < dm.tq {
                let i1 = (i0 + QBLOCK).min(dm.tq);
                unsafe {
                    let (kmin, kw) = self.probs(&dm, q, k, b, h, i0, i1, p, packs);
                    let vw = view(v, b * dm.tk * kd + kmin * kd + g * d, kw, d, kd, 1);
                    let packed = packs.and_then(|x| x.window(&dm, b, g, Operand::V, kmin, kw));
                    let dst = op.get().add(b * dm.tq * hd + i0 * hd + h * d);
                    mm(self.bf16, view(p, 0, i1 - i0, kw, kw, 1), vw, packed, dst, hd, false);
                }
                i0 = i1;
            }
        });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims(q.layout(), k.layout(), v.layout())?;
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(go, |go| {
                        // dQ: every query block writes its rows of every head; dK and dV add up.
                        let mut dq = super::output_buffer(q.len());
                        let mut dk = vec![0f32; k.len()];
                        let mut dv = vec![0f32; v.len()];
                        let (dqp, dkp, dvp) =
                            (SyncPtr(dq.as_mut_ptr()), SyncPtr(dk.as_mut_ptr()), SyncPtr(dv.as_mut_ptr()));
                        let (d, hd, kd, rep) = (dm.d, dm.h * dm.d, dm.kh * dm.d, dm.h / dm.kh);
                        let which = [Operand::Kt, Operand::Vt, Operand::K];
                        let packs = self.bf16.map(|be| Packs::new(&dm, k, v, be, &which));
                        let packs = packs.as_ref();
                        let scale = 1.0 / (d as f32).sqrt();
                        // One task per (batch, kv head): it owns dK/dV of that head and dQ of its
                        // query heads, so no two tasks write the same memory.
                        (0..dm.b * dm.kh).into_par_iter().for_each_init(
                            || (Vec::new(), Vec::new()),
                            |(p, dp), bg| {
                                let (b, g) = (bg / dm.kh, bg % dm.kh);
                                for h in g * rep..(g + 1) * rep {
                                    let mut i0 = 0;
                                    while i0 < dm.tq {
                                        let i1 = (i0 + QBLOCK).min(dm.tq);
                                        let rows = i1 - i0;
                                        unsafe {
                                            let (kmin, kw) = self.probs(&dm, q, k, b, h, i0, i1, p, packs);
                                            // The block's key window `kmin..kmin + kw`.
                                            let at = b * dm.tk * kd + kmin * kd + g * d;
                                            let (dkg, dvg) = (dkp.get().add(at), dvp.get().add(at));
                                            let qoff = b * dm.tq * hd + i0 * hd + h * d;
                                            let go_blk = view(go, qoff, rows, d, hd, 1);
                                            // dP = dO Vᵀ.
                                            dp.clear();
                                            dp.resize(rows * kw, 0.0);
                                            let vt = view(v, at, d, kw, 1, kd);
                                            let packed = packs.and_then(|x| x.window(&dm, b, g, Operand::Vt, kmin, kw));
                                            mm(self.bf16, go_blk, vt, packed, dp.as_mut_ptr(), kw, false);
                                            // dS = P * (dP - rowsum(P * dP)) * scale.
                                            for r in 0..rows {
                                                let pr = &p[r * kw..(r + 1) * kw];
                                                let dr = &mut dp[r * kw..(r + 1) * kw];
                                                let dot = vmath::dot(pr, dr);
                                                for (x, &pp) in dr.iter_mut().zip(pr) {
                                                    *x = pp * (*x - dot) * scale;
                                                }
                                            }
                                            // dQ = dS K; dK += dSᵀ Q; dV += Pᵀ dO.
                                            let ds = view(dp, 0, rows, kw, kw, 1);
                                            let kw_blk = view(k, at, kw, d, kd, 1);
                                            let packed = packs.and_then(|x| x.window(&dm, b, g, Operand::K, kmin, kw));
                                            mm(self.bf16, ds, kw_blk, packed, dqp.get().add(qoff), hd, false);
                                            let q_blk = view(q, qoff, rows, d, hd, 1);
                                            mm(self.bf16, ds.t(), q_blk, None, dkg, kd, true);
                                            let pt = view(p, 0, rows, kw, kw, 1).t();
                                            mm(self.bf16, pt, go_blk, None, dvg, kd, true);
                                        }
                                        i0 = i1;
                                    }
                                }
                            },
                        );
                        Ok((dq, dk, dv))
                    })
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}
