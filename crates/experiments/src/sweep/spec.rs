//! The sweep file and its grid: a base train config, overrides for every point, `[axes]` of
//! dotted config keys each with a list of values, and `[fit]`. Every point of the grid is a
//! validated [`TrainConfig`] before anything runs.
//!
//! ```toml
//! base = "configs/quickstart.toml"   # a train config (default: the built-in quickstart)
//! set = ["train.eval_every=0"]       # overrides for every point (optional)
//! [axes]                             # dotted keys -> values; the grid is their product
//! "model.width" = [32, 64, 128]
//! "train.steps" = [100, 200, 400]
//! [fit]
//! metric = "test_error"              # what the laws are fitted to (default)
//! ```
//!
//! Axes are taken in the alphabetical order of their keys; the grid's last axis varies fastest.

use crate::sweep::SweepError;
use crate::train::{
    self,
    config::{one_line, TrainConfig},
    TrainError,
};
use serde::Deserialize;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// `[fit]`: what the scaling laws are fitted to and how their intervals are drawn.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitSection {
    /// The metric fitted as the error: `test_error` (1 − test accuracy, default), `test_loss`,
    /// `train_loss`, or any numeric key of the runs' `summary.json` (nested keys joined by `/`).
    #[serde(default = "default_metric")]
    pub metric: String,
    /// The data size of the error-vs-data fits: `images_seen` (steps × batch size, default) or
    /// `train_images` (the training set's size after `data.train_limit`).
    #[serde(default)]
    pub data: DataMeasure,
    /// Bootstrap resamples of every fit's confidence intervals (0: none).
    #[serde(default = "default_resamples")]
    pub resamples: usize,
    /// Seed of the bootstrap.
    #[serde(default)]
    pub seed: u64,
    /// Coverage of the intervals, in (0, 1).
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

impl Default for FitSection {
    fn default() -> Self {
        FitSection {
            metric: default_metric(),
            data: DataMeasure::default(),
            resamples: default_resamples(),
            seed: 0,
            confidence: default_confidence(),
        }
    }
}

fn default_metric() -> String {
    "test_error".into()
}
fn default_resamples() -> usize {
    200
}
fn default_confidence() -> f64 {
    0.95
}

/// `fit.data`: how the data size of a run is measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataMeasure {
    /// Training images seen: steps × batch size (repeats counted).
    #[default]
    ImagesSeen,
    /// Distinct training images: the training split's size after `data.train_limit`.
    TrainImages,
}

impl DataMeasure {
    /// The key of [`crate::sweep::Record`] that holds it.
    pub fn key(self) -> &'static str {
        match self {
            DataMeasure::ImagesSeen => "images_seen",
            DataMeasure::TrainImages => "train_images",
        }
    }
}

/// The sweep file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    set: Vec<String>,
    axes: toml::Table,
    #[serde(default)]
    fit: FitSection,
}

/// One point of the grid: its settings and the train config they give.
#[derive(Debug, Clone)]
pub struct Point {
    /// The run directory's name under `--out`: `key=value` of every axis, joined by `,`.
    pub name: String,
    /// `(axis key, value)` in axis order.
    pub settings: Vec<(String, toml::Value)>,
    /// The validated config of the point.
    pub config: TrainConfig,
    /// The size of its training split (after `data.train_limit`).
    pub train_images: usize,
}

/// A parsed and validated sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The axis keys, in grid order.
    pub axes: Vec<String>,
    /// Every point of the grid (the last axis varies fastest).
    pub points: Vec<Point>,
    pub fit: FitSection,
}

/// Metrics every run has (besides `eval/...` keys of evaluations).
pub const KNOWN_METRICS: [&str; 4] = ["test_error", "test_accuracy", "test_loss", "train_loss"];

impl Sweep {
    /// Reads and validates the sweep file `path`; a relative `base` is looked up next to the
    /// sweep file first, then in the current directory.
    pub fn from_file(path: &Path) -> Result<Self, SweepError> {
        Self::from_file_with_set(path, &[])
    }

    /// [`Sweep::from_file`] with `extra` `key=value` overrides applied to every point after the
    /// file's own `set` (`vit sweep --set`; e.g. `data.path=...` for where this machine keeps
    /// the dataset).
    pub fn from_file_with_set(path: &Path, extra: &[String]) -> Result<Self, SweepError> {
        let text = std::fs::read_to_string(path).map_err(|e| SweepError::File(format!("{}: {e}", path.display())))?;
        Self::from_toml_with_set(&text, path.parent().unwrap_or(Path::new(".")), extra).map_err(|e| match e {
            SweepError::File(m) => SweepError::File(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses sweep TOML (`dir`: where a relative `base` is looked up first) and validates
    /// every point of its grid.
    pub fn from_toml(text: &str, dir: &Path) -> Result<Self, SweepError> {
        Self::from_toml_with_set(text, dir, &[])
    }

    /// [`Sweep::from_toml`] with `extra` overrides appended to the file's `set`.
    pub fn from_toml_with_set(text: &str, dir: &Path, extra: &[String]) -> Result<Self, SweepError> {
        let mut file: SweepFile = toml::from_str(text).map_err(|e| SweepError::File(one_line(&e.to_string())))?;
        file.set.extend(extra.iter().cloned());
        let base = match &file.base {
            None => train::config::QUICKSTART.to_string(),
            Some(b) => {
                let candidates = [dir.join(b), PathBuf::from(b)];
                let found = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
                    SweepError::File(format!(
                        "base = {b:?}: no such train config (looked for {} and {})",
                        candidates[0].display(),
                        candidates[1].display()
                    ))
                })?;
                std::fs::read_to_string(found)
                    .map_err(|e| SweepError::File(format!("base = {b:?}: {}: {e}", found.display())))?
            }
        };
        let f = &file.fit;
        if !(f.confidence > 0.0 && f.confidence < 1.0) {
            return Err(SweepError::File(format!("fit.confidence = {}: expected a coverage in (0, 1)", f.confidence)));
        }
        if !(KNOWN_METRICS.contains(&f.metric.as_str()) || f.metric.starts_with("eval/")) {
            return Err(SweepError::File(format!(
                "fit.metric = {:?}: expected one of {} or an evaluation's eval/... key",
                f.metric,
                KNOWN_METRICS.join(", ")
            )));
        }
        let base_cfg = TrainConfig::from_toml(&base, &file.set)
            .map_err(|e| SweepError::File(format!("the base config with set = {:?}: {e}", file.set)))?;
        let mut checker = Checker::default();
        checker.check(&base_cfg).map_err(|e| SweepError::File(format!("the base config: {e}")))?;

        // Each axis alone: its key and every value must be accepted by the base config.
        if file.axes.is_empty() {
            return Err(SweepError::File("[axes] is empty: expected at least one key with a list of values".into()));
        }
        let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
        for (key, values) in &file.axes {
            let values = match values {
                toml::Value::Array(v) if !v.is_empty() => v.clone(),
                toml::Value::Array(_) => {
                    return Err(SweepError::Axis {
                        key: key.clone(),
                        msg: "empty list: expected at least one value".into(),
                    })
                }
                other => {
                    return Err(SweepError::Axis {
                        key: key.clone(),
                        msg: format!("{other}: expected a list of values, e.g. [32, 64]"),
                    })
                }
            };
            let mut names = HashMap::new();
            for v in &values {
                if let Some(prev) = names.insert(value_name(v), v.clone()) {
                    return Err(SweepError::Value {
                        key: key.clone(),
                        value: v.to_string(),
                        msg: format!("listed twice (or names the same run directory as {prev})"),
                    });
                }
                let mut sets = file.set.clone();
                sets.push(assignment(key, v));
                let cfg = TrainConfig::from_toml(&base, &sets).map_err(|e| SweepError::Value {
                    key: key.clone(),
                    value: v.to_string(),
                    msg: e.to_string(),
                })?;
                checker.check(&cfg).map_err(|e| SweepError::Value {
                    key: key.clone(),
                    value: v.to_string(),
                    msg: e.to_string(),
                })?;
            }
            axes.push((key.clone(), values));
        }

        // Every combination.
        let mut points = Vec::new();
        let total: usize = axes.iter().map(|(_, v)| v.len()).product();
        for i in 0..total {
            let mut rest = i;
            let mut settings = Vec::with_capacity(axes.len());
            for (key, values) in axes.iter().rev() {
                settings.push((key.clone(), values[rest % values.len()].clone()));
                rest /= values.len();
            }
            settings.reverse();
            let name = settings.iter().map(|(k, v)| format!("{k}={}", value_name(v))).collect::<Vec<_>>().join(",");
            let mut sets = file.set.clone();
            sets.extend(settings.iter().map(|(k, v)| assignment(k, v)));
            let config = TrainConfig::from_toml(&base, &sets)
                .and_then(|cfg| checker.check(&cfg).map(|_| cfg))
                .map_err(|e| SweepError::Point { name: name.clone(), msg: e.to_string() })?;
            let train_images = checker.train_len(&config).unwrap_or(0);
            points.push(Point { name, settings, config, train_images });
        }
        Ok(Sweep { axes: axes.into_iter().map(|(k, _)| k).collect(), points, fit: file.fit })
    }
}

/// `key=value` as `--set` takes it (the value in TOML syntax).
fn assignment(key: &str, v: &toml::Value) -> String {
    format!("{key}={v}")
}

/// A value as it appears in a run directory's name: strings without quotes, and only
/// `A-Z a-z 0-9 . _ -` kept (anything else becomes `_`).
pub fn value_name(v: &toml::Value) -> String {
    let raw = match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect()
}

/// What the data of a config gives, read once per distinct `[data]` section.
#[derive(Debug, Clone)]
struct DataInfo {
    train_len: usize,
    /// `[C, H, W]` of a preprocessed training image.
    image: Vec<usize>,
    classes: usize,
}

/// The checks `vit train` makes before its first step, without building the model or training:
/// the model config, the data (read once per distinct `[data]` section), the image shape, the
/// number of classes and the schedule against the number of steps.
#[derive(Default)]
pub(crate) struct Checker {
    data: HashMap<String, Result<DataInfo, String>>,
}

impl Checker {
    pub(crate) fn check(&mut self, cfg: &TrainConfig) -> Result<(), TrainError> {
        let m = cfg.model_config()?;
        cfg.resolved()?;
        let key = toml::to_string(&cfg.data).map_err(|e| TrainError::Config(e.to_string()))?;
        let info = self
            .data
            .entry(key)
            .or_insert_with(|| {
                let read = || -> Result<DataInfo, TrainError> {
                    let data = train::data::load(&cfg.data)?;
                    let probe = data.eval_loader(&data.train, 1)?.batch(0)?;
                    Ok(DataInfo {
                        train_len: data.train.len(),
                        image: probe.images.dims()[1..].to_vec(),
                        classes: data.train.num_classes(),
                    })
                };
                read().map_err(|e| e.to_string())
            })
            .clone()
            .map_err(TrainError::Config)?;
        let want = [m.channels, m.image_size, m.image_size];
        if info.image != want {
            return Err(TrainError::Config(format!(
                "the model expects images {want:?} but {} gives {:?} after preprocessing",
                cfg.data.path, info.image
            )));
        }
        if info.classes > m.classes {
            return Err(TrainError::Config(format!(
                "{} has {} classes but model.classes = {}",
                cfg.data.path, info.classes, m.classes
            )));
        }
        if info.train_len < cfg.train.batch_size {
            return Err(TrainError::Config(format!(
                "{} training images (data.train_limit = {:?}): expected at least train.batch_size = {}",
                info.train_len, cfg.data.train_limit, cfg.train.batch_size
            )));
        }
        let total = train::total_steps(cfg, info.train_len);
        let s = &cfg.schedule;
        if s.warmup_steps >= total || s.cooldown_steps > total - s.warmup_steps {
            return Err(TrainError::Config(format!(
                "schedule.warmup_steps = {} and schedule.cooldown_steps = {}: expected them to fit in the {total} training steps",
                s.warmup_steps, s.cooldown_steps
            )));
        }
        Ok(())
    }

    /// The training split's size of `cfg` (after `data.train_limit`), as read by [`Self::check`].
    pub(crate) fn train_len(&mut self, cfg: &TrainConfig) -> Option<usize> {
        let key = toml::to_string(&cfg.data).ok()?;
        self.data.get(&key)?.as_ref().ok().map(|d| d.train_len)
    }
}
