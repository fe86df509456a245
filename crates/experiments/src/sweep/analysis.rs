//! The scaling laws of a sweep's results (`fit.json`): the error (`[fit] metric`) against
//! training compute on the Pareto frontier of all runs, against data size for each model (the
//! settings of the `model.*` axes), and against model size (parameters) for each data size. A
//! curve over data or model size takes, at each x, the best run there (the lowest error over the
//! other axes). Each curve is fitted with the saturating power law of [`crate::sweep::fit`]:
//! with `d` free from 5 points on, with `d = 0` at 4 points; with fewer it is kept unfitted
//! and `skipped` says why.

use crate::sweep::{
    fit::{self, Fit, FitOptions, Offset},
    spec::FitSection,
    Record, SweepError,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// One point of a curve: the run and its coordinates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The run's name (its directory under the sweep's output folder).
    pub run: String,
    pub x: f64,
    /// The fitted metric.
    pub error: f64,
}

/// One error-vs-x curve and its fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Curve {
    /// What is held fixed along the curve (the model axes' settings for a data curve, the data
    /// size for a model curve; nothing for the compute frontier).
    pub fixed: serde_json::Map<String, serde_json::Value>,
    /// The x of the points: `train_flops`, `images_seen`, `train_images` or `params`.
    pub x: String,
    /// The points the fit uses, by increasing x.
    pub points: Vec<CurvePoint>,
    /// The fitted law (absent when skipped).
    pub fit: Option<Fit>,
    /// Why the curve was not fitted.
    pub skipped: Option<String>,
}

/// Everything `fit.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    /// The metric fitted as the error.
    pub metric: String,
    /// Error against training FLOPs on the Pareto frontier of every run.
    pub compute: Curve,
    /// Error against data size, one curve per model.
    pub data: Vec<Curve>,
    /// Error against parameters, one curve per data size.
    pub model: Vec<Curve>,
}

/// The fits of `records` as `[fit]` asks. A record without the metric is an error naming the
/// run and the metrics it has.
pub fn analyse(records: &[Record], f: &FitSection) -> Result<Analysis, SweepError> {
    let mut ys = Vec::with_capacity(records.len());
    for r in records {
        let y = r.metrics.get(&f.metric).copied().ok_or_else(|| {
            SweepError::File(format!(
                "fit.metric = {:?}: run {} has no such metric (it has {})",
                f.metric,
                r.name,
                r.metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        ys.push(y);
    }
    let opts = FitOptions { offset: Offset::Free, resamples: f.resamples, seed: f.seed, confidence: f.confidence };

    // Compute: the frontier of all runs.
    let pts: Vec<(f64, f64)> = records.iter().zip(&ys).map(|(r, &y)| (r.train_flops, y)).collect();
    let frontier = fit::pareto_frontier(&pts);
    let compute = curve(
        serde_json::Map::new(),
        "train_flops",
        frontier.iter().map(|&i| CurvePoint { run: records[i].name.clone(), x: pts[i].0, error: pts[i].1 }).collect(),
        &opts,
    );

    // Data size per model.
    let data_x = |r: &Record| match f.data {
        crate::sweep::spec::DataMeasure::ImagesSeen => r.images_seen as f64,
        crate::sweep::spec::DataMeasure::TrainImages => r.train_images as f64,
    };
    // Groups in the order the grid first reaches them.
    let mut by_model: Vec<(String, serde_json::Map<String, serde_json::Value>, Vec<usize>)> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let fixed: serde_json::Map<_, _> =
            r.settings.iter().filter(|(k, _)| k.starts_with("model.")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let key = serde_json::Value::Object(fixed.clone()).to_string();
        match by_model.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.2.push(i),
            None => by_model.push((key, fixed, vec![i])),
        }
    }
    let data = by_model
        .into_iter()
        .map(|(_, fixed, idx)| curve(fixed, f.data.key(), best_per_x(records, &ys, &idx, data_x), &opts))
        .collect();

    // Model size per data size.
    let mut by_data: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        by_data.entry(data_x(r) as u64).or_default().push(i);
    }
    let model = by_data
        .into_iter()
        .map(|(d, idx)| {
            let mut fixed = serde_json::Map::new();
            fixed.insert(f.data.key().into(), d.into());
            curve(fixed, "params", best_per_x(records, &ys, &idx, |r| r.params as f64), &opts)
        })
        .collect();
    Ok(Analysis { metric: f.metric.clone(), compute, data, model })
}

/// At each distinct x among `idx`, the run with the lowest error, by increasing x.
fn best_per_x(records: &[Record], ys: &[f64], idx: &[usize], x: impl Fn(&Record) -> f64) -> Vec<CurvePoint> {
    let mut best: BTreeMap<u64, CurvePoint> = BTreeMap::new();
    for &i in idx {
        let (xi, yi) = (x(&records[i]), ys[i]);
        if !yi.is_finite() {
            continue;
        }
        let p = CurvePoint { run: records[i].name.clone(), x: xi, error: yi };
        // f64 bits of a non-negative x sort like the numbers.
        best.entry(xi.to_bits())
            .and_modify(|b| {
                if yi < b.error {
                    *b = p.clone()
                }
            })
            .or_insert(p);
    }
    best.into_values().collect()
}

/// A curve through `points`, fitted when there are enough of them.
fn curve(
    fixed: serde_json::Map<String, serde_json::Value>,
    x: &str,
    points: Vec<CurvePoint>,
    opts: &FitOptions,
) -> Curve {
    let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.x, p.error)).collect();
    let offset = if xy.len() >= 5 { Offset::Free } else { Offset::Zero };
    let (fit, skipped) = if xy.len() < 4 {
        (None, Some(format!("{} point(s): expected at least 4 (5 to fit the offset d)", xy.len())))
    } else {
        match fit::fit_power_law(&xy, &FitOptions { offset, ..*opts }) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e.to_string())),
        }
    };
    Curve { fixed, x: x.into(), points, fit, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::fit::PowerLaw;

    fn record(name: &str, width: i64, steps: u64, params: u64, flops_per_image: f64, error: f64) -> Record {
        let mut settings = serde_json::Map::new();
        settings.insert("model.width".into(), width.into());
        settings.insert("train.steps".into(), steps.into());
        let images_seen = steps * 100;
        Record {
            name: name.into(),
            settings,
            params,
            forward_flops_per_image: flops_per_image,
            batch_size: 100,
            steps,
            images_seen,
            train_images: 1000,
            train_flops: 3.0 * flops_per_image * images_seen as f64,
            metrics: [("test_error".to_string(), error), ("test_loss".to_string(), 2.0 * error)].into(),
        }
    }

    /// A 4 × 6 grid (widths × steps) whose error follows a known law of compute for the
    /// compute-optimal runs, and is worse off the frontier.
    fn grid() -> (Vec<Record>, PowerLaw) {
        let law = PowerLaw { a: 40.0, b: 0.3, c: 0.1, d: 0.0 };
        let mut out = Vec::new();
        for (k, width) in [16i64, 32, 64, 128].into_iter().enumerate() {
            let fpi = 1e5 * 4f64.powi(k as i32);
            for steps in [10u64, 20, 40, 80, 160, 320] {
                let c = 3.0 * fpi * (steps * 100) as f64;
                // Small models saturate at a higher error; big ones are slow at small compute.
                let error = law.eval(c) + 0.02 * (3 - k as i32) as f64 * (steps as f64 / 320.0) + 0.01 * k as f64;
                out.push(record(&format!("w{width}-s{steps}"), width, steps, 1000 * 4u64.pow(k as u32), fpi, error));
            }
        }
        (out, law)
    }

    #[test]
    fn the_compute_curve_is_the_frontier_and_every_model_and_data_size_gets_a_curve() {
        let (records, _) = grid();
        let f = FitSection { resamples: 20, ..Default::default() };
        let a = analyse(&records, &f).unwrap();
        assert_eq!(a.metric, "test_error");
        // The frontier: falling error along rising compute, every point a run of the grid.
        let pts = &a.compute.points;
        assert!(pts.len() >= 5, "{pts:?}");
        assert!(pts.windows(2).all(|w| w[0].x < w[1].x && w[0].error > w[1].error), "{pts:?}");
        for r in &records {
            // Nothing beats a frontier point on both axes.
            for p in pts {
                let e = r.metrics["test_error"];
                assert!(!(r.train_flops <= p.x && e < p.error), "{} beats {}", r.name, p.run);
            }
        }
        assert!(a.compute.fit.is_some(), "{:?}", a.compute.skipped);
        // One data curve per width, 6 points each (one per step count); one model curve per
        // images-seen value, 4 points each (d held at 0).
        assert_eq!(a.data.len(), 4);
        assert!(a.data.iter().all(|c| c.points.len() == 6 && c.x == "images_seen"));
        let widths: Vec<_> = a.data.iter().map(|c| c.fixed["model.width"].as_i64().unwrap()).collect();
        assert_eq!(widths, [16, 32, 64, 128], "grouped by the model axes, in grid order");
        assert_eq!(a.model.len(), 6);
        for c in &a.model {
            assert_eq!(c.points.len(), 4);
            assert_eq!(c.x, "params");
            if let Some(fit) = &c.fit {
                assert_eq!(fit.offset, Offset::Zero);
            } else {
                assert!(c.skipped.as_deref().is_some_and(|s| s.contains("does not fall")), "{:?}", c.skipped);
            }
        }
        // The whole thing serialises (fit.json).
        let json = serde_json::to_value(&a).unwrap();
        assert!(json["compute"]["fit"]["law"]["b"].as_f64().unwrap() > 0.0);
        assert!(json["compute"]["fit"]["intervals"]["b"]["low"].is_number());
    }

    #[test]
    fn the_compute_fit_recovers_the_law_of_the_frontier() {
        // Only the compute-optimal runs sit on the law exactly: the fit of the frontier is it.
        let law = PowerLaw { a: 40.0, b: 0.3, c: 0.1, d: 0.0 };
        let records: Vec<Record> = (0..8)
            .map(|i| {
                let steps = 10u64 << i;
                let c = 3.0 * 1e5 * (steps * 100) as f64;
                record(&format!("s{steps}"), 16, steps, 1000, 1e5, law.eval(c))
            })
            .chain((0..8).map(|i| {
                let steps = 10u64 << i;
                let c = 3.0 * 1e5 * (steps * 100) as f64;
                record(&format!("bad{steps}"), 32, steps, 4000, 1e5, law.eval(c) + 0.05)
            }))
            .collect();
        let a = analyse(&records, &FitSection { resamples: 0, ..Default::default() }).unwrap();
        assert!(a.compute.points.iter().all(|p| p.run.starts_with('s')), "{:?}", a.compute.points);
        let fit = a.compute.fit.unwrap();
        assert!((fit.law.b - 0.3).abs() < 1e-3 && (fit.law.c - 0.1).abs() < 1e-3, "{:?}", fit.law);
    }

    #[test]
    fn few_points_are_skipped_with_the_reason_and_a_missing_metric_is_an_error() {
        let (records, _) = grid();
        let a = analyse(&records[..3], &FitSection { resamples: 0, ..Default::default() }).unwrap();
        assert!(a.compute.fit.is_none());
        assert!(a.compute.skipped.as_deref().unwrap().contains("expected at least 4"), "{:?}", a.compute.skipped);
        let f = FitSection { metric: "eval/fewshot/10shot_error".into(), ..Default::default() };
        let e = analyse(&records, &f).unwrap_err().to_string();
        assert!(e.contains("eval/fewshot/10shot_error") && e.contains("w16-s10") && e.contains("test_loss"), "{e}");
        assert_eq!(e.lines().count(), 1);
        // No runs at all: empty curves, nothing fitted.
        let a = analyse(&[], &FitSection::default()).unwrap();
        assert!(a.compute.points.is_empty() && a.data.is_empty() && a.model.is_empty());
    }
}
