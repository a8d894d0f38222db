//! The reference learning-rate schedule (spec §8).

/// `lr * (0.1 + 0.45 * (1 + cos(pi * cur / total)))`: cosine from `lr` down to `0.1 * lr`, no
/// warmup — exactly the reference's `get_lr`. `cur` is the 1-based global micro-step and `total`
/// the number of micro-steps of the whole run, as in the reference. An optional linear warmup over
/// the first `warmup` micro-steps (default 0 = the reference) multiplies the value by
/// `cur / warmup`.
pub fn lr_at(cur: usize, total: usize, lr: f64, warmup: usize) -> f64 {
    let total = total.max(1) as f64;
    let base = lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * cur as f64 / total).cos()));
    if warmup > 0 && cur < warmup {
        base * cur as f64 / warmup as f64
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_formula() {
        let lr = 5e-4;
        // cur = 0: lr * (0.1 + 0.9) = lr.
        assert!((lr_at(0, 100, lr, 0) - lr).abs() < 1e-15);
        // halfway: cos(pi/2) = 0 -> 0.55 lr.
        assert!((lr_at(50, 100, lr, 0) - 0.55 * lr).abs() < 1e-15);
        // end: cos(pi) = -1 -> 0.1 lr.
        assert!((lr_at(100, 100, lr, 0) - 0.1 * lr).abs() < 1e-15);
        // a quarter: 0.1 + 0.45 * (1 + sqrt(2)/2).
        let q = lr * (0.1 + 0.45 * (1.0 + std::f64::consts::FRAC_1_SQRT_2));
        assert!((lr_at(25, 100, lr, 0) - q).abs() < 1e-15);
        // monotone non-increasing without warmup
        let v: Vec<f64> = (0..=100).map(|c| lr_at(c, 100, lr, 0)).collect();
        assert!(v.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn warmup_ramps_linearly() {
        let lr = 1e-3;
        assert_eq!(lr_at(0, 100, lr, 10), 0.0);
        assert!((lr_at(5, 100, lr, 10) - 0.5 * lr_at(5, 100, lr, 0)).abs() < 1e-15);
        assert_eq!(lr_at(10, 100, lr, 10), lr_at(10, 100, lr, 0));
    }
}
