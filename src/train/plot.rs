//! The loss-curve PNG written at the end of a training stage. Drawn without any text so that it
//! needs no system fonts (CI machines have none).

use plotters::prelude::*;
use std::path::Path;

/// Draw per-step losses (light) and their moving average (dark) into a PNG at `path`.
pub fn loss_curve_png(path: &Path, losses: &[f32]) -> anyhow::Result<()> {
    let finite: Vec<(usize, f32)> = losses.iter().copied().enumerate().filter(|(_, l)| l.is_finite()).collect();
    let (lo, hi) = finite.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &(_, l)| (a.min(l), b.max(l)));
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let pad = (hi - lo) * 0.05;
    let n = losses.len().max(2);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the loss curve {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(0f32..(n - 1) as f32, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    // Axes as plain lines (mesh labels would need a font).
    let frame = [(0.0, hi + pad), (0.0, lo - pad), ((n - 1) as f32, lo - pad)];
    chart.draw_series(LineSeries::new(frame, &BLACK)).map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(finite.iter().map(|&(i, l)| (i as f32, l)), &RGBColor(150, 180, 230)))
        .map_err(|e| err(&e))?;
    let alpha = 2.0 / (1.0 + (losses.len() as f32 / 20.0).max(1.0));
    let mut ema = None;
    let smooth: Vec<(f32, f32)> = finite
        .iter()
        .map(|&(i, l)| {
            let e = match ema {
                None => l,
                Some(p) => p + alpha * (l - p),
            };
            ema = Some(e);
            (i as f32, e)
        })
        .collect();
    chart.draw_series(LineSeries::new(smooth, RGBColor(20, 60, 160).stroke_width(2))).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_even_for_degenerate_input() {
        let dir = tempfile::tempdir().unwrap();
        for (i, losses) in [vec![], vec![1.0], vec![2.0, 2.0], vec![5.0, f32::NAN, 3.0, 2.5, 2.0]].iter().enumerate() {
            let p = dir.path().join(format!("l{i}.png"));
            loss_curve_png(&p, losses).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
        }
    }
}
