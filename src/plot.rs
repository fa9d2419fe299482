//! PNG plots (plotters, pure Rust): the book's loss figure (ch05 Figure 5.12: training and
//! validation loss against epochs, tokens seen on a second axis).
//!
//! Text is drawn with a system TrueType font (DejaVu/Liberation, or `LLMLAB_FONT=path.ttf`),
//! read at run time, so no font is shipped and no font library is linked.
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a sans-serif font once; `false` when none was found (plots are then skipped).
fn ensure_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let env = std::env::var("LLMLAB_FONT").ok();
        let candidates = env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied());
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// One point of a loss curve.
#[derive(Debug, Clone, Copy)]
pub struct LossPoint {
    pub epoch: f64,
    pub tokens_seen: f64,
    pub train_loss: f64,
    pub val_loss: f64,
}

/// Writes the loss figure; returns `false` (and writes nothing) when no font is available.
pub fn plot_losses(points: &[LossPoint], path: &Path, title: &str) -> Result<bool> {
    plot_values(points, path, title, "loss", "Tokens seen")
}

/// The book's `plot_values`: training and validation `what` (loss, accuracy) against epochs,
/// with `x2` (tokens or examples seen, from `tokens_seen`) on a second axis.
pub fn plot_values(
    points: &[LossPoint],
    path: &Path,
    title: &str,
    what: &str,
    x2: &str,
) -> Result<bool> {
    if points.is_empty() || !ensure_font() {
        return Ok(false);
    }
    let tmp = crate::error::temp_path(path).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_epoch = points.iter().map(|p| p.epoch).fold(0.0, f64::max).max(1e-9);
        let max_tokens = points
            .iter()
            .map(|p| p.tokens_seen)
            .fold(0.0, f64::max)
            .max(1.0);
        let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
        let max_loss = points
            .iter()
            .map(|p| finite(p.train_loss).max(finite(p.val_loss)))
            .fold(0.0, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .top_x_label_area_size(45)
            .build_cartesian_2d(0.0..max_epoch, 0.0..max_loss.max(1e-6))?
            .set_secondary_coord(0.0..max_tokens, 0.0..max_loss.max(1e-6));
        chart
            .configure_mesh()
            .x_desc("Epochs")
            .y_desc(capitalised(what))
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style(("sans-serif", 15))
            .draw()?;
        chart
            .configure_secondary_axes()
            .x_desc(x2)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 15))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.epoch, p.train_loss)),
                BLUE.stroke_width(2),
            ))?
            .label(format!("Training {what}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.epoch, p.val_loss)),
                RED.stroke_width(2),
            ))?
            .label(format!("Validation {what}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        root.present()
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(true)
}

/// The experiment report's figure: a metric (y) for each value of one swept axis (x, in the
/// sweep's order), one dot per trial (trials differing in other axes share an x position), and
/// the mean per value joined by a line. Returns `false` when no font is available or no trial
/// has the metric.
pub fn plot_metric_by_axis(
    axis: &str,
    values: &[String],
    points: &[(usize, f64)],
    metric: &str,
    path: &Path,
    title: &str,
) -> Result<bool> {
    let finite: Vec<(usize, f64)> = points
        .iter()
        .copied()
        .filter(|(_, y)| y.is_finite())
        .collect();
    if finite.is_empty() || values.is_empty() || !ensure_font() {
        return Ok(false);
    }
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| {
            (a.min(*y), b.max(*y))
        });
    let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.01).max(1e-6);
    let tmp = crate::error::temp_path(path).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let n = values.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc(axis)
            .y_desc(metric)
            .x_labels(n.max(2))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    values[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.3}"))
            .label_style(("sans-serif", 15))
            .draw()?;
        chart.draw_series(
            finite
                .iter()
                .map(|&(i, y)| Circle::new((i as f64, y), 5, BLUE.filled())),
        )?;
        let means: Vec<(f64, f64)> = (0..n)
            .filter_map(|i| {
                let ys: Vec<f64> = finite.iter().filter(|p| p.0 == i).map(|p| p.1).collect();
                (!ys.is_empty()).then(|| (i as f64, ys.iter().sum::<f64>() / ys.len() as f64))
            })
            .collect();
        chart.draw_series(LineSeries::new(means, RED.stroke_width(2)))?;
        root.present()
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(true)
}
