//! Fused f32 CPU kernels as candle `CustomOp`s with hand-written backward passes (rayon-parallel).
//! Callers ([`super`]) make inputs contiguous first, so kernels index plain row-major slices.

use super::super::rope::RopeTables;
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

/// Mean cross-entropy of `logits [N, V]` against i64 `labels [N]` (negative = ignored). The
/// backward writes `(softmax - one_hot) * g / count` in one pass, recomputing the softmax.
pub struct CrossEntropy;

fn labels_i64(s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("labels must be contiguous".into()))?;
    Ok(match s {
        CpuStorage::I64(v) => v[a..b].to_vec(),
        CpuStorage::U32(v) => v[a..b].iter().map(|&x| x as i64).collect(),
        _ => bail!("cross_entropy: labels must be i64 or u32, got {:?}", s.dtype()),
    })
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
        let (sum, count) = x
            .par_chunks(v)
            .zip(labels.par_iter())
            .filter(|(_, &lab)| lab >= 0)
            .map(|(r, &lab)| ((vmath::log_sum_exp(r) - r[lab as usize]) as f64, 1usize))
            .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if labels.iter().any(|&l| l >= v as i64) {
            bail!("cross_entropy: a label is >= vocab size {v}");
        }
        let loss = if count == 0 { 0.0 } else { (sum / count as f64) as f32 };
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, labels: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = x.dims2()?;
        let labels: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
        let g = gy.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
        let count = labels.iter().filter(|&&l| l >= 0).count().max(1);
        let scale = g / count as f32;
        let dx = with_f32(x, |x| {
            let mut dx = super::output_buffer(n * v);
            dx.par_chunks_mut(v).zip(x.par_chunks(v)).zip(labels.par_iter()).for_each(|((d, r), &lab)| {
                if lab < 0 {
                    d.fill(0.0);
                    return;
                }
                vmath::exp_shift_scale(d, r, vmath::log_sum_exp(r), scale);
                d[lab as usize] -= scale;
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

/// `dst[m×n] (rs, 1) = alpha*dst + beta * lhs[m×k] * rhs[k×n]` with explicit strides (row, col).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
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
        let qp = q.as_ptr().add(b * dm.tq * hd + i0 * hd + h * d);
        let kp = k.as_ptr().add(b * dm.tk * kd + kmin * kd + g * d);
        // S = Q K^T: rhs (d, j) = K[j, d] → row stride 1, col stride kd.
        mm(rows, kw, d, p.as_mut_ptr(), kw, false, qp, hd as isize, 1, kp, 1, kd as isize, 1.0);
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
        let mut out = vec![0f32; q.len()];
        let op = SyncPtr(out.as_mut_ptr());
        let (d, hd, kd, rep) = (dm.d, dm.h * dm.d, dm.kh * dm.d, dm.h / dm.kh);
        (0..dm.b * dm.h).into_par_iter().for_each_init(Vec::new, |p, bh| {
            let (b, h) = (bh / dm.h, bh % dm.h);
            let g = h / rep;
            let mut i0 = 0;
            while i0 < dm.tq {
                let i1 = (i0 + QBLOCK).min(dm.tq);
                unsafe {
                    let (kmin, kw) = self.probs(&dm, q, k, b, h, i0, i1, p);
                    let vp = v.as_ptr().add(b * dm.tk * kd + kmin * kd + g * d);
                    let dst = op.get().add(b * dm.tq * hd + i0 * hd + h * d);
                    mm(i1 - i0, d, kw, dst, hd, false, p.as_ptr(), kw as isize, 1, vp, kd as isize, 1, 1.0);
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
                        let mut dq = vec![0f32; q.len()];
                        let mut dk = vec![0f32; k.len()];
                        let mut dv = vec![0f32; v.len()];
                        let (dqp, dkp, dvp) =
                            (SyncPtr(dq.as_mut_ptr()), SyncPtr(dk.as_mut_ptr()), SyncPtr(dv.as_mut_ptr()));
                        let (d, hd, kd, rep) = (dm.d, dm.h * dm.d, dm.kh * dm.d, dm.h / dm.kh);
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
                                            let (kmin, kw) = self.probs(&dm, q, k, b, h, i0, i1, p);
                                            // The block's key window `kmin..kmin + kw`.
                                            let at = b * dm.tk * kd + kmin * kd + g * d;
                                            let (kp, vp) = (k.as_ptr().add(at), v.as_ptr().add(at));
                                            let (dkg, dvg) = (dkp.get().add(at), dvp.get().add(at));
                                            let qoff = b * dm.tq * hd + i0 * hd + h * d;
                                            let gop = go.as_ptr().add(qoff);
                                            // dP = dO V^T.
                                            dp.clear();
                                            dp.resize(rows * kw, 0.0);
                                            mm(
                                                rows,
                                                kw,
                                                d,
                                                dp.as_mut_ptr(),
                                                kw,
                                                false,
                                                gop,
                                                hd as isize,
                                                1,
                                                vp,
                                                1,
                                                kd as isize,
                                                1.0,
                                            );
                                            // dS = P * (dP - rowsum(P * dP)) * scale.
                                            for r in 0..rows {
                                                let pr = &p[r * kw..(r + 1) * kw];
                                                let dr = &mut dp[r * kw..(r + 1) * kw];
                                                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                                                for (x, &pp) in dr.iter_mut().zip(pr) {
                                                    *x = pp * (*x - dot) * scale;
                                                }
                                            }
                                            // dQ = dS K.
                                            mm(
                                                rows,
                                                d,
                                                kw,
                                                dqp.get().add(qoff),
                                                hd,
                                                false,
                                                dp.as_ptr(),
                                                kw as isize,
                                                1,
                                                kp,
                                                kd as isize,
                                                1,
                                                1.0,
                                            );
                                            // dK += dS^T Q; dV += P^T dO.
                                            let qp = q.as_ptr().add(qoff);
                                            mm(
                                                kw,
                                                d,
                                                rows,
                                                dkg,
                                                kd,
                                                true,
                                                dp.as_ptr(),
                                                1,
                                                kw as isize,
                                                qp,
                                                hd as isize,
                                                1,
                                                1.0,
                                            );
                                            mm(
                                                kw,
                                                d,
                                                rows,
                                                dvg,
                                                kd,
                                                true,
                                                p.as_ptr(),
                                                1,
                                                kw as isize,
                                                gop,
                                                hd as isize,
                                                1,
                                                1.0,
                                            );
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
