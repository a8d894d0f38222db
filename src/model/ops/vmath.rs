//! Vectorised f32 math for the fused CPU kernels: `exp` as a branch-free polynomial the compiler
//! turns into SIMD code, and the loops built on it (softmax rows, log-sum-exp, SiLU·up).
//!
//! Why: libm's `expf` is a scalar call. Profiling the 256×4 real-data pretrain (bf16, 2 threads)
//! put ~12 % of the run in it — the cross-entropy takes V exps per token forward and again backward,
//! plus the attention softmax and SwiGLU's sigmoid — and the loops around those calls could not be
//! vectorised.
//!
//! Each public routine is compiled three times (AVX-512, AVX2+FMA, the baseline) and picked at run
//! time. All three do the same IEEE operations in the same order: sums and maxima are kept in
//! [`LANES`] partial results whatever the vector width, and no multiply-add is contracted (Rust
//! never does so implicitly). So a result is bit-identical on every x86-64 CPU, which the exact
//! resume and golden tests rely on.

/// Partial sums / maxima per reduction, fixed so that the summation order does not depend on the
/// vector width the CPU has.
pub const LANES: usize = 16;

/// `e^x` to ~2 ulp (Cephes' `expf` polynomial): 0 below −87.34 (and for −∞), +∞ above 88.72, NaN
/// for NaN. Between 88.3 and 88.72 it returns e^88.3 (2^n must stay a normal f32); no softmax or
/// sigmoid here comes near it.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // ln 2 split in two, so that `z - n ln 2` keeps its precision.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let z = x.clamp(-87.336_54, 88.3);
    let t = z * std::f32::consts::LOG2_E + MAGIC;
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let f = t - MAGIC;
    let r = z - f * LN2_HI - f * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let e = y * f32::from_bits(((n + 127) as u32) << 23);
    if x < -87.336_54 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else {
        e
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `dispatched! { pub fn name(args) -> R as name_baseline { body } }` defines `name_baseline`, the
/// body compiled for the baseline instruction set (what other architectures run, and what tests
/// compare against), and `name`, which runs the body compiled for the best set this CPU has.
macro_rules! dispatched {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? as $base:ident $body:block) => {
        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        fn $base($($a: $t),*) $(-> $r)? $body

        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    $base($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    $base($($a),*)
                }
                match level() {
                    // SAFETY: `level` found the features these versions are compiled for.
                    Level::Avx512 => return unsafe { avx512($($a),*) },
                    Level::Avx2 => return unsafe { avx2($($a),*) },
                    Level::Baseline => {}
                }
            }
            $base($($a),*)
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    Baseline,
}

fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

dispatched! {
    /// The largest element (−∞ for an empty slice; NaNs are skipped, as `f32::max` does).
    pub fn max(x: &[f32]) -> f32 as max_baseline {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] = acc[i].max(c[i]);
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a = a.max(v);
        }
        acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
}

dispatched! {
    /// `Σ e^(x − shift)`.
    pub fn sum_exp(x: &[f32], shift: f32) -> f32 as sum_exp_baseline {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - shift);
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += exp(v - shift);
        }
        acc.iter().sum()
    }
}

/// `ln Σ e^x`, shifted by the maximum so nothing overflows (−∞ for an empty or all −∞ row).
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + sum_exp(x, m).ln()
}

dispatched! {
    /// `dst[i] = e^(src[i] − shift) · scale`.
    pub fn exp_shift_scale(dst: &mut [f32], src: &[f32], shift: f32, scale: f32) as exp_shift_scale_baseline {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s - shift) * scale;
        }
    }
}

dispatched! {
    /// `x[i] = e^(x[i] − shift)`, returning their sum.
    fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 as exp_shift_sum_baseline {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp(c[i] - shift);
                acc[i] += c[i];
            }
        }
        for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
            *v = exp(*v - shift);
            *a += *v;
        }
        acc.iter().sum()
    }
}

dispatched! {
    /// `x[i] *= s`.
    fn scale_in_place(x: &mut [f32], s: f32) as scale_in_place_baseline {
        for v in x {
            *v *= s;
        }
    }
}

/// `row = softmax(row · scale)` in place (`scale > 0`); −∞ entries (masked keys) get 0. A row with
/// nothing but −∞ becomes all zeros and the call returns false.
pub fn softmax_scaled(row: &mut [f32], scale: f32) -> bool {
    scale_in_place(row, scale);
    let m = max(row);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return false;
    }
    let sum = exp_shift_sum(row, m);
    scale_in_place(row, 1.0 / sum);
    true
}

dispatched! {
    /// SwiGLU forward: `y = silu(g) · u`.
    pub fn swiglu(y: &mut [f32], g: &[f32], u: &[f32]) as swiglu_baseline {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
}

dispatched! {
    /// SwiGLU backward: `du = gy · silu(g)`, `dg = gy · u · σ(g) · (1 + g (1 − σ(g)))`.
    pub fn swiglu_backward(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], gy: &[f32]) as swiglu_backward_baseline {
        let n = dg.len().min(du.len()).min(g.len()).min(u.len()).min(gy.len());
        for i in 0..n {
            let s = sigmoid(g[i]);
            du[i] = gy[i] * (g[i] * s);
            dg[i] = gy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
}

dispatched! {
    /// RMSNorm of one row: `y = x · w / sqrt(mean(x²) + eps)`. (The sum of squares was a scalar
    /// loop, serial on the add latency: 7 % of a bf16 training step at the reference shape.)
    pub fn rms_norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) as rms_norm_row_baseline {
        let r = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
        for ((o, &xi), &wi) in y.iter_mut().zip(x).zip(w) {
            *o = xi * r * wi;
        }
    }
}

dispatched! {
    /// RMSNorm backward of one row: `dx` (overwritten) and `dw` (accumulated) from the row's input
    /// `x`, the weight `w` and the output gradient `g`. With `r = 1/rms(x)` and `x̂ = x·r`:
    /// `dx = r·(g·w − x̂·mean(g·w·x̂))`, `dw += g·x̂`.
    pub fn rms_norm_backward_row(dx: &mut [f32], dw: &mut [f32], x: &[f32], w: &[f32], g: &[f32], eps: f32)
        as rms_norm_backward_row_baseline {
        let n = x.len();
        let r = 1.0 / (sum_squares(x) / n as f32 + eps).sqrt();
        // Σ g·w·x̂ = r · Σ g·w·x.
        let mean = sum_products(g, w, x) * r / n as f32;
        for i in 0..n.min(dx.len()).min(dw.len()).min(w.len()).min(g.len()) {
            let xh = x[i] * r;
            dw[i] += g[i] * xh;
            dx[i] = r * (g[i] * w[i] - xh * mean);
        }
    }
}

dispatched! {
    /// `Σ a·b` (over the shorter length).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 as dot_baseline {
        let mut acc = [0f32; LANES];
        let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        for (x, y) in (&mut ca).zip(&mut cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        for (acc, (x, y)) in acc.iter_mut().zip(ca.remainder().iter().zip(cb.remainder())) {
            *acc += x * y;
        }
        acc.iter().sum()
    }
}

dispatched! {
    /// `Σ x²` in f64 (the gradient norm: f32 squares of large gradients would overflow).
    pub fn sum_squares_f64(x: &[f32]) -> f64 as sum_squares_f64_baseline {
        let mut acc = [0f64; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += c[i] as f64 * c[i] as f64;
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += v as f64 * v as f64;
        }
        acc.iter().sum()
    }
}

/// `Σ x²` over [`LANES`] partial sums (inlined into each dispatched caller; `chunks_exact`, so
/// that the loop has no bounds checks and vectorises).
#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i] * c[i];
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v * v;
    }
    acc.iter().sum()
}

/// `Σ a·b·c` over [`LANES`] partial sums (as [`sum_squares`]).
#[inline(always)]
fn sum_products(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    for (acc, ((x, y), z)) in acc.iter_mut().zip(ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder())) {
        *acc += x * y * z;
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f32, b: f64) -> f64 {
        ((a as f64) - b).abs() / b.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn exp_is_within_three_ulp_over_the_whole_range_and_handles_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.2 {
            worst = worst.max(rel(exp(x), (x as f64).exp()));
            x += 0.000_731;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// A row with odd length (not a multiple of the lanes), −∞ entries and a wide range.
    fn row(n: usize) -> Vec<f32> {
        (0..n).map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { ((i * 37 % 101) as f32 - 50.0) * 0.37 }).collect()
    }

    #[test]
    fn reductions_and_softmax_match_f64() {
        for n in [1, 5, 16, 17, 100, 6401] {
            let x = row(n);
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let lse64 = (m as f64) + x.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>().ln();
            assert!((log_sum_exp(&x) as f64 - lse64).abs() < 1e-5 * lse64.abs().max(1.0), "n {n}");
            let mut p = x.clone();
            assert!(softmax_scaled(&mut p, 0.5));
            let z: f64 = x.iter().map(|&v| ((v as f64) * 0.5 - m as f64 * 0.5).exp()).sum();
            for (pi, &xi) in p.iter().zip(&x) {
                let want = ((xi as f64) * 0.5 - m as f64 * 0.5).exp() / z;
                assert!((*pi as f64 - want).abs() < 1e-6 * want.max(1e-3), "n {n}: {pi} vs {want}");
            }
            let mut d = vec![0f32; n];
            exp_shift_scale(&mut d, &x, m, 2.0);
            for (di, &xi) in d.iter().zip(&x) {
                assert!(rel(*di, 2.0 * ((xi - m) as f64).exp()) < 4e-7 || *di == 0.0);
            }
        }
        let mut dead = vec![f32::NEG_INFINITY; 9];
        assert!(!softmax_scaled(&mut dead, 1.0));
        assert!(dead.iter().all(|&v| v == 0.0));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn dot_sums_of_squares_and_rms_norm_match_f64() {
        for n in [1, 5, 16, 17, 100, 6401] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.037).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.021).collect();
            let d64: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let s64: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            let mag: f64 = a.iter().zip(&b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum();
            assert!((dot(&a, &b) as f64 - d64).abs() <= 1e-6 * mag + 1e-7, "n {n}");
            assert!((sum_squares_f64(&a) - s64).abs() <= 1e-12 * s64, "n {n}");
            let mut y = vec![0f32; n];
            rms_norm_row(&mut y, &a, &b, 1e-6);
            let r = 1.0 / (s64 / n as f64 + 1e-6).sqrt();
            for i in 0..n {
                let want = a[i] as f64 * r * b[i] as f64;
                assert!((y[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "n {n} at {i}");
            }
        }
    }

    #[test]
    fn swiglu_and_its_gradient_match_the_closed_form() {
        let g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.61).collect();
        let u: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.07).collect();
        let gy: Vec<f32> = (0..37).map(|i| 0.3 + i as f32 * 0.01).collect();
        let (mut y, mut dg, mut du) = (vec![0f32; 37], vec![0f32; 37], vec![0f32; 37]);
        swiglu(&mut y, &g, &u);
        swiglu_backward(&mut dg, &mut du, &g, &u, &gy);
        for i in 0..37 {
            let (g, u, gy) = (g[i] as f64, u[i] as f64, gy[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            assert!((y[i] as f64 - g * s * u).abs() < 1e-6 * (1.0 + (g * s * u).abs()));
            assert!((du[i] as f64 - gy * g * s).abs() < 1e-6 * (1.0 + (gy * g * s).abs()));
            let want = gy * u * s * (1.0 + g * (1.0 - s));
            assert!((dg[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()));
        }
    }

    /// Every instruction-set version gives the same bits (the sums keep [`LANES`] partials).
    #[test]
    fn the_simd_versions_agree_bit_for_bit_with_the_baseline() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let x = row(1003);
        assert_eq!(max(&x).to_bits(), max_baseline(&x).to_bits());
        assert_eq!(sum_exp(&x, 3.0).to_bits(), sum_exp_baseline(&x, 3.0).to_bits());
        let (mut a, mut b) = (x.clone(), x.clone());
        assert_eq!(exp_shift_sum(&mut a, 3.0).to_bits(), exp_shift_sum_baseline(&mut b, 3.0).to_bits());
        assert_eq!(bits(&a), bits(&b));
        let g: Vec<f32> = x.iter().map(|v| if v.is_finite() { *v * 0.1 } else { 0.5 }).collect();
        let (mut ya, mut yb) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        swiglu(&mut ya, &g, &x);
        swiglu_baseline(&mut yb, &g, &x);
        assert_eq!(bits(&ya), bits(&yb), "dispatch level {:?}", level());
        let w: Vec<f32> = (0..g.len()).map(|i| 0.5 + (i % 13) as f32 * 0.1).collect();
        rms_norm_row(&mut ya, &g, &w, 1e-5);
        rms_norm_row_baseline(&mut yb, &g, &w, 1e-5);
        assert_eq!(bits(&ya), bits(&yb));
        let (mut dwa, mut dwb) = (w.clone(), w.clone());
        rms_norm_backward_row(
            &mut ya,
            &mut dwa,
            &g,
            &w,
            &x.iter().map(|v| v.clamp(-3.0, 3.0)).collect::<Vec<_>>(),
            1e-5,
        );
        rms_norm_backward_row_baseline(
            &mut yb,
            &mut dwb,
            &g,
            &w,
            &x.iter().map(|v| v.clamp(-3.0, 3.0)).collect::<Vec<_>>(),
            1e-5,
        );
        assert_eq!((bits(&ya), bits(&dwa)), (bits(&yb), bits(&dwb)));
        assert_eq!(dot(&g, &w).to_bits(), dot_baseline(&g, &w).to_bits());
        assert_eq!(sum_squares_f64(&g).to_bits(), sum_squares_f64_baseline(&g).to_bits());
    }
}
