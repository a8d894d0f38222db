//! The bf16 matmul of decoding: `Y (M×N, f32) = X (M×K) · Wᵀ` for a few rows of X (one decode
//! step of a batch, `M ≤` [`MAX_M`]) against a weight `W [N, K]` stored once as bf16 rows.
//!
//! A decode step is bound by reading the weights: every weight is used once per row of X, so the
//! GEMM of training (`super::gemm`: A packed into 12-row panels, AMX tiles of 16–32 rows) spends
//! most of its work on padding there. This kernel instead streams each weight row once from
//! memory (half the bytes of f32) and takes its dot products with every row of X, accumulating in
//! f32. The numbers are those of the GEMM: both operands rounded to bf16 (nearest even), products
//! summed in f32 (in another order).
//!
//! Kernels, picked at run time ([`Kernel::detect`]): `VDPBF16PS` where avx512_bf16 exists (on
//! Intel it issues at half the FMA rate, which a memory-bound loop does not notice), avx512f
//! widening bf16 to f32 by a 16-bit shift and an FMA where it does not, and a portable loop the
//! compiler vectorises elsewhere. Rows of W are split across threads (rayon).

use super::gemm::MatRef;
use super::SyncPtr;
use rayon::prelude::*;

/// The most rows of X this path is for; more go to the GEMM of `super::gemm`.
pub const MAX_M: usize = 8;

/// Weight elements per parallel task (64 KiB of bf16).
const TASK_ELEMS: usize = 32 * 1024;

/// K is padded with zeros to a multiple of this (one 512-bit vector of bf16), so every kernel
/// loads whole vectors.
const KALIGN: usize = 32;

/// Which loop multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `VDPBF16PS` (x86-64 with avx512f and avx512_bf16).
    Dpbf16,
    /// avx512f: bf16 widened to f32 by a shift, then FMAs.
    Avx512,
    /// Plain Rust, vectorised by the compiler for the build's target.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs. `MMRUN_NO_AVX512BF16=1` skips `VDPBF16PS` (as it does
    /// for the GEMM), to compare with the avx512f loop on the same machine.
    pub fn detect() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let no_dp = std::env::var("MMRUN_NO_AVX512BF16").as_deref() == Ok("1");
            if crate::cpu::has_avx512_bf16() && !no_dp {
                Kernel::Dpbf16
            } else if crate::cpu::has_avx512f() {
                Kernel::Avx512
            } else {
                Kernel::Portable
            }
        })
    }

    /// Every kernel this CPU can run (tests compare them all).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Kernel::Portable];
        if crate::cpu::has_avx512f() {
            v.push(Kernel::Avx512);
        }
        if crate::cpu::has_avx512_bf16() {
            v.push(Kernel::Dpbf16);
        }
        v
    }
}

/// A weight `[N, K]` as bf16 bits, row-major, each row zero-padded to a multiple of 32.
#[derive(Debug)]
pub struct Bf16Rows {
    n: usize,
    k: usize,
    /// Padded row length.
    kp: usize,
    data: Vec<u16>,
}

impl Bf16Rows {
    /// Round `w` (`N × K`, any strides) to bf16 rows.
    pub fn new(w: MatRef) -> Self {
        let (n, k) = (w.rows(), w.cols());
        let kp = k.div_ceil(KALIGN) * KALIGN;
        let mut data = vec![0u16; n * kp];
        data.par_chunks_mut(kp.max(1)).enumerate().for_each(|(r, row)| {
            for (c, x) in row.iter_mut().take(k).enumerate() {
                *x = w.bf16_bits(r, c);
            }
        });
        Self { n, k, kp, data }
    }

    /// N (output features).
    pub fn n(&self) -> usize {
        self.n
    }

    /// K (input features).
    pub fn k(&self) -> usize {
        self.k
    }
}

/// `y[m, n] = Σ_k x[m, k] · w[n, k]` (row stride of `y`: `ldy`), with `x` and `w` rounded to bf16
/// and f32 accumulation, by `kernel`.
///
/// # Panics
/// On mismatched shapes, `y` too small, more than [`MAX_M`] rows, or a kernel this CPU lacks.
pub fn matmul(x: MatRef, w: &Bf16Rows, y: &mut [f32], ldy: usize, kernel: Kernel) {
    let (m, n, kp) = (x.rows(), w.n, w.kp);
    assert_eq!(x.cols(), w.k, "skinny matmul: X is {m}x{} but W is {}x{}", x.cols(), n, w.k);
    assert!(m <= MAX_M, "skinny matmul: {m} rows (at most {MAX_M})");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldy >= n && y.len() >= (m - 1) * ldy + n, "skinny matmul: Y too small");
    if kp == 0 {
        y.chunks_mut(ldy).take(m).for_each(|r| r[..n].fill(0.0));
        return;
    }
    match kernel {
        Kernel::Dpbf16 => assert!(crate::cpu::has_avx512_bf16(), "this CPU lacks avx512_bf16"),
        Kernel::Avx512 => assert!(crate::cpu::has_avx512f(), "this CPU lacks avx512f"),
        Kernel::Portable => {}
    }
    // X rounded once: bf16 bits for VDPBF16PS, the same values as f32 for the others.
    let mut xb = vec![0u16; m * kp];
    for (r, row) in xb.chunks_mut(kp).enumerate() {
        for (c, v) in row.iter_mut().take(w.k).enumerate() {
            *v = x.bf16_bits(r, c);
        }
    }
    let xf: Vec<f32> =
        if kernel == Kernel::Dpbf16 { vec![] } else { xb.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect() };
    let yp = SyncPtr(y.as_mut_ptr());
    let rows = |n0: usize, n1: usize| {
        // SAFETY: columns n0..n1 of Y's m rows are this task's alone and lie inside `y` (checked
        // above); the CPU has the kernel's features (checked above).
        unsafe {
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Dpbf16 => avx512::dpbf16(&xb, m, kp, &w.data, n0, n1, yp.get(), ldy),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => avx512::widen(&xf, m, kp, &w.data, n0, n1, yp.get(), ldy),
                _ => portable(&xf, m, kp, &w.data, n0, n1, yp.get(), ldy),
            }
        }
    };
    // Tasks of ~64 KiB of weights: a few µs of streaming each, many per thread to balance.
    let per_task = (TASK_ELEMS / kp).max(4).next_multiple_of(4);
    if n <= per_task {
        rows(0, n);
    } else {
        (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| rows(t * per_task, ((t + 1) * per_task).min(n)));
    }
}

/// bf16 bits → f32.
#[inline(always)]
fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The portable kernel: 16 lane sums per dot product, which the compiler maps onto vectors.
#[allow(clippy::too_many_arguments)]
unsafe fn portable(x: &[f32], m: usize, kp: usize, w: &[u16], n0: usize, n1: usize, y: *mut f32, ldy: usize) {
    for j in n0..n1 {
        let wr = &w[j * kp..(j + 1) * kp];
        for i in 0..m {
            let xr = &x[i * kp..(i + 1) * kp];
            let mut acc = [0f32; 16];
            for (xc, wc) in xr.chunks_exact(16).zip(wr.chunks_exact(16)) {
                for ((a, &x), &w) in acc.iter_mut().zip(xc).zip(wc) {
                    *a += x * widen(w);
                }
            }
            *y.add(i * ldy + j) = acc.iter().sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Output rows per block: four weight rows share every load of X.
    const NB: usize = 4;

    /// `VDPBF16PS`: output rows in blocks of [`NB`], rows of X in blocks of up to 4.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dpbf16(
        x: &[u16],
        m: usize,
        kp: usize,
        w: &[u16],
        n0: usize,
        n1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut j = n0;
        while j < n1 {
            // A short last block repeats its last row (read, not stored).
            let rows: [*const u16; NB] = std::array::from_fn(|r| w.as_ptr().add((j + r).min(n1 - 1) * kp));
            let nb = NB.min(n1 - j);
            let mut i = 0;
            while i < m {
                let mb = (m - i).min(4);
                let xp = x.as_ptr().add(i * kp);
                let yp = y.add(i * ldy + j);
                match mb {
                    1 => dp_block::<1>(xp, kp, &rows, yp, ldy, nb),
                    2 => dp_block::<2>(xp, kp, &rows, yp, ldy, nb),
                    3 => dp_block::<3>(xp, kp, &rows, yp, ldy, nb),
                    _ => dp_block::<4>(xp, kp, &rows, yp, ldy, nb),
                }
                i += mb;
            }
            j += NB;
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dp_block<const MB: usize>(
        x: *const u16,
        kp: usize,
        rows: &[*const u16; NB],
        y: *mut f32,
        ldy: usize,
        nb: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NB]; MB];
        let mut c = 0;
        while c < kp {
            let wv: [__m512bh; NB] =
                std::array::from_fn(|r| std::mem::transmute(_mm512_loadu_si512(rows[r].add(c) as *const _)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x.add(i * kp + c) as *const _));
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, *wv);
                }
            }
            c += 32;
        }
        for (i, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate().take(nb) {
                *y.add(i * ldy + r) = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// avx512f without bf16 arithmetic: 16 bf16 of W widen to f32 (zero-extend, shift left 16),
    /// then FMA with the bf16-rounded X held as f32.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn widen(
        x: &[f32],
        m: usize,
        kp: usize,
        w: &[u16],
        n0: usize,
        n1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut j = n0;
        while j < n1 {
            let rows: [*const u16; NB] = std::array::from_fn(|r| w.as_ptr().add((j + r).min(n1 - 1) * kp));
            let nb = NB.min(n1 - j);
            let mut i = 0;
            while i < m {
                let mb = (m - i).min(4);
                let xp = x.as_ptr().add(i * kp);
                let yp = y.add(i * ldy + j);
                match mb {
                    1 => widen_block::<1>(xp, kp, &rows, yp, ldy, nb),
                    2 => widen_block::<2>(xp, kp, &rows, yp, ldy, nb),
                    3 => widen_block::<3>(xp, kp, &rows, yp, ldy, nb),
                    _ => widen_block::<4>(xp, kp, &rows, yp, ldy, nb),
                }
                i += mb;
            }
            j += NB;
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn widen_block<const MB: usize>(
        x: *const f32,
        kp: usize,
        rows: &[*const u16; NB],
        y: *mut f32,
        ldy: usize,
        nb: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NB]; MB];
        let mut c = 0;
        while c < kp {
            let wv: [__m512; NB] = std::array::from_fn(|r| {
                let h = _mm256_loadu_si256(rows[r].add(c) as *const _);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            });
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(i * kp + c));
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *wv, *a);
                }
            }
            c += 16;
        }
        for (i, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate().take(nb) {
                *y.add(i * ldy + r) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gemm::to_bf16_f32;
    use rand::{Rng, SeedableRng};

    /// Every kernel this CPU has, against an f64 sum of the bf16-rounded products, on shapes that
    /// hit every edge: K odd and not a multiple of 32, N not a multiple of the 4-row block or of
    /// 16, 1 to 8 rows of X, a strided (transposed) weight, and N large enough to be split across
    /// threads.
    #[test]
    fn every_kernel_matches_an_f64_reference_on_odd_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let kernels = Kernel::available();
        eprintln!("skinny kernels on this CPU: {kernels:?} (detected {:?})", Kernel::detect());
        for &(n, k) in &[(1, 1), (19, 37), (45, 101), (64, 64), (3, 300), (700, 301)] {
            let wv: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            // The same weight stored transposed (`[K, N]` seen as `[N, K]`), as decoding lays it out.
            let wt: Vec<f32> = (0..k * n).map(|i| wv[(i % n) * k + i / n]).collect();
            for m in 1..=MAX_M {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut want = vec![0f64; m * n];
                let mut scale = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        for c in 0..k {
                            let p = to_bf16_f32(x[i * k + c]) as f64 * to_bf16_f32(wv[j * k + c]) as f64;
                            want[i * n + j] += p;
                            scale[i * n + j] += p.abs();
                        }
                    }
                }
                for (label, w) in [
                    ("row-major", Bf16Rows::new(MatRef::f32(&wv, n, k))),
                    ("transposed", Bf16Rows::new(MatRef::f32(&wt, k, n).t())),
                ] {
                    for &kern in &kernels {
                        let ldy = n + 3;
                        let mut y = vec![f32::NAN; (m - 1) * ldy + n];
                        matmul(MatRef::f32(&x, m, k), &w, &mut y, ldy, kern);
                        for i in 0..m {
                            for j in 0..n {
                                let (got, want, s) = (y[i * ldy + j] as f64, want[i * n + j], scale[i * n + j]);
                                // f32 sums of exact bf16 products: rounding is ~√K ulps of Σ|terms|
                                // (1e-6 here); one wrong or missing term would be ~1/K of it.
                                assert!(
                                    (got - want).abs() <= 1e-5 * s + 1e-30,
                                    "{kern:?} {label} m={m} n={n} k={k} at ({i},{j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Time the matmuls of one batch-1 decode step at the reference shape (8 layers of q, k, v,
    /// o, gate, up, down, and the 6400-row head) by themselves, to set against `mmrun bench`'s
    /// per-token time: what is left is everything else a step does.
    /// `cargo test --release --lib skinny::tests::reference_step -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing probe"]
    fn reference_step_matmuls() {
        let shapes = [(512, 512), (256, 512), (256, 512), (512, 512), (1664, 512), (1664, 512), (512, 1664)];
        let mut mats: Vec<Bf16Rows> = vec![];
        for _ in 0..8 {
            for &(n, k) in &shapes {
                mats.push(Bf16Rows::new(MatRef::f32(&vec![0.01f32; n * k], n, k)));
            }
        }
        mats.push(Bf16Rows::new(MatRef::f32(&vec![0.01f32; 6400 * 512], 6400, 512)));
        let x = vec![0.5f32; 1664];
        let mut y = vec![0f32; 6400];
        for kern in Kernel::available() {
            let t = std::time::Instant::now();
            let steps = 200;
            for _ in 0..steps {
                for w in &mats {
                    matmul(MatRef::f32(&x[..w.k], 1, w.k), w, &mut y, w.n, kern);
                }
            }
            let per = t.elapsed().as_secs_f64() / steps as f64;
            let bytes: usize = mats.iter().map(|w| w.n * w.kp * 2).sum();
            eprintln!("{kern:?}: {:.3} ms per step, {:.1} GB/s", per * 1e3, bytes as f64 / per / 1e9);
        }
    }

    #[test]
    #[should_panic(expected = "at most 8")]
    fn refuses_more_rows_than_it_is_for() {
        let w = Bf16Rows::new(MatRef::f32(&[1.0; 4], 2, 2));
        let mut y = vec![0f32; 18];
        matmul(MatRef::f32(&[1.0; 18], 9, 2), &w, &mut y, 2, Kernel::Portable);
    }
}
