//! `vit sweep`: scaling laws as a tool (issue 17). A grid of training runs over any config keys
//! ([`spec`]), each a run directory under the output folder that is skipped when finished and
//! resumed when interrupted ([`run`]); `results.jsonl` with every run's settings, parameters,
//! training FLOPs and final metrics; saturating power-law fits of error against compute, data
//! and model size ([`fit`], [`analysis`]) in `fit.json`; and their plots ([`plot`]).

pub mod analysis;
pub mod fit;
pub mod plot;
pub mod run;
pub mod spec;

pub use analysis::{analyse, Analysis, Curve};
pub use run::{run_sweep, PointStatus, Record, SweepOptions, SweepReport};
pub use spec::{FitSection, Point, Sweep};

use crate::train::TrainError;

/// Why a sweep could not be read, validated or completed. Messages are one line and name the
/// key, value or point.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The sweep file, its base config or its `[fit]` section.
    #[error("sweep file: {0}")]
    File(String),
    /// An axis as a whole (not a list, empty).
    #[error("axis {key}: {msg}")]
    Axis { key: String, msg: String },
    /// One value of an axis that the train config refuses.
    #[error("axis {key} = {value}: {msg}")]
    Value { key: String, value: String, msg: String },
    /// A combination of values that the train config refuses.
    #[error("point {name}: {msg}")]
    Point { name: String, msg: String },
    /// Reading or writing the output folder.
    #[error("{0}")]
    Io(String),
    /// Points were stopped by a signal or `--stop-at` after saving a checkpoint: the same
    /// command resumes them.
    #[error("{interrupted} point(s) interrupted and {left} not started ({done} finished): run the same command again to resume")]
    Interrupted { interrupted: usize, left: usize, done: usize },
    /// Points failed (the others ran); the first failure is named.
    #[error("{failed} point(s) failed ({done} finished); the first, {name}: {source}")]
    Failed { failed: usize, done: usize, name: String, source: Box<TrainError> },
}
