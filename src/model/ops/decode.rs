//! Attention of a decode step over a bf16 KV cache: f32 queries, bf16 keys and values read in
//! place from the cache's buffers (no copy, no conversion pass), f32 arithmetic throughout.
//!
//! Per (row, query head, query): scores `q·k_j / √D` over the visible cached positions (causal,
//! key mask), softmax, and the weighted sum of the values; GQA maps query head `h` to key head
//! `h / (H / K)`. A query that sees no key outputs zeros, as the other attention paths do.
//! Forward only: decoding needs no gradient, and a backward through it is an error, not a
//! silently cut graph.

use super::SyncPtr;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape};
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

/// Most query positions per row this op is for (decode steps and short prompts); longer
/// prefills convert the cache to f32 once and take the GEMM-based fused attention.
pub const MAX_TQ: usize = 16;

/// The op: `q [B, Tq, H, D]` f32 (contiguous), `k, v [B, Tk, K, D]` bf16 (views into the cache:
/// any strides over B and Tk, each position's `K × D` contiguous) → `[B, Tq, H, D]` f32. Query
/// `i` sees keys `j <= i + Tk - Tq`.
pub struct DecodeAttention {
    /// `[B * Tk]`, true = keep.
    pub key_mask: Option<Arc<Vec<bool>>>,
}

/// A bf16 view of the cache: element `(b, t, kh, d)` at `off + b * sb + t * st + kh * dim + d`.
struct KvView<'a> {
    data: &'a [bf16],
    off: usize,
    sb: usize,
    st: usize,
}

fn kv_view<'a>(s: &'a CpuStorage, l: &Layout, name: &str, kh: usize, d: usize) -> Result<KvView<'a>> {
    let CpuStorage::BF16(data) = s else { bail!("decode attention: {name} must be bf16, got {:?}", s.dtype()) };
    let st = l.stride();
    if st[3] != 1 || st[2] != d {
        bail!("decode attention: {name} positions must be contiguous [K={kh}, D={d}], strides {st:?}");
    }
    Ok(KvView { data, off: l.start_offset(), sb: st[0], st: st[1] })
}

impl KvView<'_> {
    #[inline(always)]
    fn at(&self, b: usize, t: usize, g: usize, d: usize) -> &[bf16] {
        let s = self.off + b * self.sb + t * self.st + g * d;
        &self.data[s..s + d]
    }
}

#[inline(always)]
fn widen(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// `Σ q[i] · k[i]` with 16 lane sums (vectorised by the compiler).
#[inline(always)]
fn dot(q: &[f32], k: &[bf16]) -> f32 {
    let mut acc = [0f32; 16];
    let (qc, kc) = (q.chunks_exact(16), k.chunks_exact(16));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (q, k) in qc.zip(kc) {
        for ((a, &q), &k) in acc.iter_mut().zip(q).zip(k) {
            *a += q * widen(k);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (q, k) in qr.iter().zip(kr) {
        s += q * widen(*k);
    }
    s
}

/// `o += p · v`.
#[inline(always)]
fn axpy(o: &mut [f32], p: f32, v: &[bf16]) {
    for (o, v) in o.iter_mut().zip(v) {
        *o += p * widen(*v);
    }
}

struct Dims {
    tq: usize,
    tk: usize,
    h: usize,
    kh: usize,
    d: usize,
}

/// One (row, query head): every query of the row against its visible keys, into `out` (`Tq × D`,
/// row stride `H × D`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head(
    dm: &Dims,
    q: &[f32],
    k: &KvView,
    v: &KvView,
    mask: Option<&[bool]>,
    b: usize,
    h: usize,
    out: *mut f32,
    scores: &mut Vec<f32>,
) {
    let (d, hd) = (dm.d, dm.h * dm.d);
    let g = h / (dm.h / dm.kh);
    let scale = 1.0 / (d as f32).sqrt();
    for i in 0..dm.tq {
        let qi = &q[(b * dm.tq + i) * hd + h * d..][..d];
        let lim = i + dm.tk - dm.tq + 1;
        scores.clear();
        let mut mx = f32::NEG_INFINITY;
        for j in 0..lim {
            let s = if mask.is_none_or(|m| m[j]) { dot(qi, k.at(b, j, g, d)) * scale } else { f32::NEG_INFINITY };
            mx = mx.max(s);
            scores.push(s);
        }
        // SAFETY: the caller hands each (b, h) its own `out` row block of `Tq × D` values.
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * hd), d) };
        o.fill(0.0);
        if mx == f32::NEG_INFINITY {
            continue;
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - mx).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, &p) in scores.iter().enumerate() {
            if p != 0.0 {
                axpy(o, p * inv, v.at(b, j, g, d));
            }
        }
    }
}

/// [`head`] compiled for avx512f (16-lane dot products and exps of the widened values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_avx512(
    dm: &Dims,
    q: &[f32],
    k: &KvView,
    v: &KvView,
    mask: Option<&[bool]>,
    b: usize,
    h: usize,
    out: *mut f32,
    scores: &mut Vec<f32>,
) {
    head(dm, q, k, v, mask, b, h, out, scores)
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "mmrun-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, tq, h, d) = l1.shape().dims4()?;
        let (kb, tk, kh, kd) = l2.shape().dims4()?;
        if l3.shape() != l2.shape() || (kb, kd) != (b, d) || tk < tq || kh == 0 || h % kh != 0 {
            bail!("decode attention: q {:?}, k {:?}, v {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let CpuStorage::F32(q) = s1 else { bail!("decode attention: q must be f32") };
        if !l1.is_contiguous() {
            bail!("decode attention: q must be contiguous");
        }
        let q = &q[l1.start_offset()..];
        let (k, v) = (kv_view(s2, l2, "k", kh, d)?, kv_view(s3, l3, "v", kh, d)?);
        if let Some(m) = &self.key_mask {
            if m.len() != b * tk {
                bail!("decode attention: key mask of {} for {b} rows of {tk} keys", m.len());
            }
        }
        let dm = Dims { tq, tk, h, kh, d };
        let mut out = vec![0f32; b * tq * h * d];
        let op = SyncPtr(out.as_mut_ptr());
        let avx512 = crate::cpu::has_avx512f();
        let task = |bh: usize, scores: &mut Vec<f32>| {
            let (bi, hi) = (bh / h, bh % h);
            let mask = self.key_mask.as_deref().map(|m| &m[bi * tk..(bi + 1) * tk]);
            // SAFETY: block (bi, hi) of `out` starts here and no other task writes it.
            let o = unsafe { op.get().add(bi * tq * h * d + hi * d) };
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU has avx512f (checked).
                return unsafe { head_avx512(&dm, q, &k, &v, mask, bi, hi, o, scores) };
            }
            let _ = avx512;
            head(&dm, q, &k, &v, mask, bi, hi, o, scores)
        };
        // A decode step of a small model is a few µs of work per head: threads only for more.
        if b * h * tq * tk * d >= 1 << 17 {
            (0..b * h).into_par_iter().for_each_init(Vec::new, |s, bh| task(bh, s));
        } else {
            let mut s = Vec::new();
            (0..b * h).for_each(|bh| task(bh, &mut s));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, tq, h, d))))
    }
}
