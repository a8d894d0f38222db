//! The PNG a training stage leaves in its run: a title (run and stage), then one panel per curve
//! — the loss (raw and smoothed, with a legend), the learning rate, and the stage's own key
//! curves when it logged them (DPO reward accuracy and margin, GRPO mean reward and KL) — each
//! with labelled axes and tick values.
//!
//! The font (DejaVu Sans Mono, `assets/fonts/`, Bitstream Vera licence) is compiled in, so plots
//! have text on machines without any fonts (CI).

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

/// The stage key curves drawn when present in `metrics.jsonl`: (metric, panel title).
const KEY_CURVES: &[(&str, &str)] = &[
    ("rewards/accuracy", "DPO reward accuracy"),
    ("rewards/margin", "DPO reward margin"),
    ("reward_mean", "mean reward"),
    ("kl", "KL to the reference"),
];

fn register_font() -> anyhow::Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(ok, "the embedded plot font does not parse");
    Ok(())
}

/// One curve of a panel.
struct Line<'a> {
    label: &'a str,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    width: u32,
}

/// `(step, value)` of `keys` for `stage` in a `metrics.jsonl` (missing file → nothing).
pub fn read_series(metrics: &Path, stage: &str, keys: &[&str]) -> Vec<(String, Vec<(f64, f64)>)> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let mut out: Vec<(String, Vec<(f64, f64)>)> = keys.iter().map(|k| (k.to_string(), vec![])).collect();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["stage"].as_str() != Some(stage) {
            continue;
        }
        let Some(step) = v["step"].as_f64() else { continue };
        for (k, pts) in &mut out {
            if let Some(x) = v.get(k.as_str()).and_then(|x| x.as_f64()).filter(|x| x.is_finite()) {
                pts.push((step, x));
            }
        }
    }
    out.retain(|(_, p)| !p.is_empty());
    out
}

/// Draw a stage's curves to `path`: `losses` per optimizer step, and the learning rate and key
/// curves read from the run's `metrics` file. The title names the run (the PNG's directory) and
/// the stage.
pub fn stage_png(path: &Path, stage: &str, losses: &[f32], metrics: Option<&Path>) -> anyhow::Result<()> {
    register_font()?;
    let run = path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut keys = vec!["lr"];
    keys.extend(KEY_CURVES.iter().map(|(k, _)| *k));
    let series = metrics.map(|m| read_series(m, stage, &keys)).unwrap_or_default();

    let raw: Vec<(f64, f64)> =
        losses.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| ((i + 1) as f64, l as f64)).collect();
    let mut panels: Vec<(String, &str, Vec<Line>)> = vec![(
        "loss".into(),
        "loss",
        vec![
            Line { label: "raw", points: raw.clone(), color: RGBColor(150, 180, 230), width: 1 },
            Line { label: "smoothed (EMA)", points: ema(&raw), color: RGBColor(20, 60, 160), width: 2 },
        ],
    )];
    for (key, pts) in series {
        let title = KEY_CURVES.iter().find(|(k, _)| *k == key).map(|(_, t)| *t).unwrap_or("learning rate");
        let color = if key == "lr" { RGBColor(200, 110, 20) } else { RGBColor(30, 140, 70) };
        panels.push((
            title.to_string(),
            if key == "lr" { "lr" } else { title },
            vec![Line { label: title, points: pts, color, width: 2 }],
        ));
    }

    let height = 90 + 300 * panels.len() as u32;
    let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(&format!("{run} — stage {stage}"), (FAMILY, 22)).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, (title, ylabel, lines)) in areas.iter().zip(&panels) {
        panel(area, title, ylabel, lines).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Exponential moving average, with a span that grows with the number of points.
fn ema(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let alpha = 2.0 / (1.0 + (points.len() as f64 / 20.0).max(1.0));
    let mut acc: Option<f64> = None;
    points
        .iter()
        .map(|&(x, y)| {
            let e = acc.map_or(y, |p| p + alpha * (y - p));
            acc = Some(e);
            (x, e)
        })
        .collect()
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    ylabel: &str,
    lines: &[Line<'_>],
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>> {
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let (mut x0, mut x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        (y0, y1) = (y0 - 0.5 * y0.abs().max(1e-3), y1 + 0.5 * y1.abs().max(1e-3));
    }
    let pad = (y1 - y0) * 0.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(ylabel)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick(*v))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    for l in lines {
        let color = l.color;
        chart
            .draw_series(LineSeries::new(l.points.iter().copied(), color.stroke_width(l.width)))?
            .label(l.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// A tick value short enough to read: 3 significant digits, scientific when tiny or huge.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_even_for_degenerate_input() {
        let dir = tempfile::tempdir().unwrap();
        for (i, losses) in [vec![], vec![1.0], vec![2.0, 2.0], vec![5.0, f32::NAN, 3.0, 2.5, 2.0]].iter().enumerate() {
            let p = dir.path().join(format!("l{i}.png"));
            stage_png(&p, "sft", losses, None).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
        }
    }

    #[test]
    fn draws_lr_and_the_stage_key_curves_it_finds() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        for s in 1..=40 {
            let x = s as f64;
            text += &format!(
                "{{\"stage\":\"dpo\",\"step\":{s},\"loss\":{},\"lr\":{},\"rewards/accuracy\":{},\"rewards/margin\":{}}}\n",
                1.0 / x,
                1e-4 * (1.0 - x / 40.0),
                (x / 40.0).min(1.0),
                0.05 * x
            );
            text += &format!("{{\"stage\":\"other\",\"step\":{s},\"kl\":1.0}}\n");
        }
        std::fs::write(&metrics, text).unwrap();
        let got = read_series(&metrics, "dpo", &["lr", "rewards/accuracy", "rewards/margin", "kl"]);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["lr", "rewards/accuracy", "rewards/margin"], "another stage's kl is not ours");
        assert_eq!(got[0].1.len(), 40);
        let losses: Vec<f32> = (1..=40).map(|s| 1.0 / s as f32).collect();
        let p = dir.path().join("dpo-loss.png");
        stage_png(&p, "dpo", &losses, Some(&metrics)).unwrap();
        // Four panels (loss, lr, accuracy, margin) make the image taller than one.
        let one = dir.path().join("one.png");
        stage_png(&one, "dpo", &losses, None).unwrap();
        let height = |p: &Path| {
            let b = std::fs::read(p).unwrap();
            u32::from_be_bytes([b[20], b[21], b[22], b[23]])
        };
        assert_eq!(height(&p), 90 + 4 * 300);
        assert_eq!(height(&one), 90 + 300);
        // Text was drawn: the font renders glyphs (a blank-text plot has far fewer colours).
        assert!(std::fs::metadata(&p).unwrap().len() > std::fs::metadata(&one).unwrap().len());
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(3e-5), "3.0e-5");
        assert_eq!(tick(0.0), "0");
    }
}
