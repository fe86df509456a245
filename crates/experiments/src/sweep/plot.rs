//! The sweep's plots (SVG, through plotters, like `curves.svg`), all on log-log axes:
//! `compute.svg` (error vs training FLOPs: every run, the Pareto frontier and its fitted law),
//! `data.svg` (error vs data size, one colour per model) and `model.svg` (error vs parameters,
//! one colour per data size), each curve with its fitted law where there is one.

use crate::sweep::{analysis::Curve, run::Record, Analysis, SweepError};
use plotters::prelude::*;
use std::path::Path;

/// Writes `compute.svg`, `data.svg` and `model.svg` into `out`.
pub fn plot_all(records: &[Record], analysis: &Analysis, out: &Path) -> Result<(), SweepError> {
    let runs: Vec<(f64, f64)> =
        records.iter().filter_map(|r| Some((r.train_flops, *r.metrics.get(&analysis.metric)?))).collect();
    plot_curves(
        &out.join("compute.svg"),
        &format!("{} vs training compute", analysis.metric),
        "training FLOPs",
        &analysis.metric,
        &runs,
        std::slice::from_ref(&analysis.compute),
        |_| "Pareto frontier".into(),
    )?;
    let label = |c: &Curve| {
        let s: Vec<String> = c.fixed.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if s.is_empty() {
            "all runs".into()
        } else {
            s.join(", ")
        }
    };
    let data_x = analysis.data.first().map_or("images seen", |c| {
        if c.x == "train_images" {
            "training images"
        } else {
            "images seen"
        }
    });
    plot_curves(
        &out.join("data.svg"),
        &format!("{} vs data, per model", analysis.metric),
        data_x,
        &analysis.metric,
        &[],
        &analysis.data,
        label,
    )?;
    plot_curves(
        &out.join("model.svg"),
        &format!("{} vs model size, per data size", analysis.metric),
        "parameters",
        &analysis.metric,
        &[],
        &analysis.model,
        label,
    )
}

/// One log-log chart: `background` runs as grey dots, each curve's points joined in its colour
/// with its fitted law dashed over the points' x range.
fn plot_curves(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    background: &[(f64, f64)],
    curves: &[Curve],
    label: impl Fn(&Curve) -> String,
) -> Result<(), SweepError> {
    let err = |e: &dyn std::fmt::Display| SweepError::Io(format!("cannot draw {}: {e}", path.display()));
    let positive = |p: &(f64, f64)| p.0 > 0.0 && p.1 > 0.0 && p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = background
        .iter()
        .copied()
        .chain(curves.iter().flat_map(|c| c.points.iter().map(|p| (p.x, p.error))))
        .filter(positive)
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, 0f64, f64::INFINITY, 0f64);
    for &(x, y) in &all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if all.is_empty() {
        (x0, x1, y0, y1) = (1.0, 10.0, 0.1, 1.0);
    }
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d((floor10(x0 / 1.5)..x1 * 1.5).log_scale(), (floor10(y0 / 1.2)..y1 * 1.2).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(12)
        .y_labels(12)
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(|e| err(&e))?;
    let grey = RGBColor(160, 160, 160);
    if !background.is_empty() {
        chart
            .draw_series(background.iter().copied().filter(positive).map(|p| Circle::new(p, 3, grey.filled())))
            .map_err(|e| err(&e))?
            .label("every run")
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, grey.filled()));
    }
    for (i, c) in curves.iter().enumerate() {
        let color = if curves.len() == 1 {
            RED
        } else {
            let (r, g, b) = Palette99::pick(i).rgb();
            RGBColor(r, g, b)
        };
        let pts: Vec<(f64, f64)> = c.points.iter().map(|p| (p.x, p.error)).filter(positive).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label(label(c))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
        if let (Some(fit), Some(first), Some(last)) = (&c.fit, pts.first(), pts.last()) {
            let law = fit.law;
            let curve: Vec<(f64, f64)> = (0..=100)
                .map(|k| first.0 * (last.0 / first.0).powf(k as f64 / 100.0))
                .map(|x| (x, law.eval(x)))
                .filter(positive)
                .collect();
            let fitted = format!("fit: {:.3}·(x+{:.2e})^-{:.3} + {:.3}", law.a, law.d, law.b, law.c);
            chart
                .draw_series(DashedLineSeries::new(curve, 6, 4, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(fitted)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Just below the power of 10 at or below `v` (plotters labels a log axis from the first
/// power of 10 in its range on, so every axis starts at one; "just below" so that rounding
/// cannot put that power outside the range).
fn floor10(v: f64) -> f64 {
    10f64.powf(v.log10().floor()) * 0.999
}
