//! `curves.svg`: training loss and test accuracy against steps, from `metrics.jsonl`.

use crate::train::TrainError;
use plotters::prelude::*;
use std::path::Path;

/// Draws the loss (left) and test accuracy (right) curves of `metrics` into `path`.
pub fn plot_curves(metrics: &[serde_json::Value], path: &Path) -> Result<(), TrainError> {
    let series = |key: &str| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|m| Some((m["step"].as_f64()?, m[key].as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect()
    };
    let (loss, acc) = (series("loss"), series("test_accuracy"));
    let err = |e: &dyn std::fmt::Display| TrainError::Io(format!("cannot draw {}: {e}", path.display()));
    let root = SVGBackend::new(path, (960, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(480);
    let max_step = loss.iter().chain(&acc).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = loss.iter().map(|p| p.1).fold(0.1, f64::max) * 1.05;
    let mut c = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..max_step, 0.0..max_loss)
        .map_err(|e| err(&e))?;
    c.configure_mesh().x_desc("step").draw().map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(loss, &BLUE)).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&right)
        .caption("test accuracy", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..max_step, 0.0..1.0)
        .map_err(|e| err(&e))?;
    c.configure_mesh().x_desc("step").draw().map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(acc.clone(), &RED)).map_err(|e| err(&e))?;
    c.draw_series(acc.into_iter().map(|p| Circle::new(p, 3, RED.filled()))).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
