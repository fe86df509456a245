//! One module per `vit` subcommand.

pub mod bench;
pub mod convert;
pub mod data;
mod data_args;
pub mod devices;
pub mod eval;
pub mod fewshot;
pub mod params;
pub mod plan;
pub mod predict;
pub mod sweep;
pub mod train;

/// Errors of the `vit` tool: each wraps a crate's error, whose message already names the
/// thing and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] vit_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
    #[error(transparent)]
    Optim(#[from] vit_optim::OptimError),
    #[error(transparent)]
    Plan(#[from] vit_experiments::plan::PlanError),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Boxed: training errors carry whole parameter diffs.
    #[error(transparent)]
    Train(Box<vit_experiments::train::TrainError>),
    /// Boxed like `Train`.
    #[error(transparent)]
    Sweep(Box<vit_experiments::sweep::SweepError>),
    /// A command-line argument that does not fit (the message names it and what was expected).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// True when training stopped on a signal or `--stop-at` after saving a checkpoint.
    pub fn interrupted(&self) -> bool {
        match self {
            CliError::Train(e) => matches!(**e, vit_experiments::train::TrainError::Interrupted { .. }),
            CliError::Sweep(e) => matches!(**e, vit_experiments::sweep::SweepError::Interrupted { .. }),
            _ => false,
        }
    }
}

impl From<vit_experiments::train::TrainError> for CliError {
    fn from(e: vit_experiments::train::TrainError) -> Self {
        CliError::Train(Box::new(e))
    }
}

impl From<vit_experiments::sweep::SweepError> for CliError {
    fn from(e: vit_experiments::sweep::SweepError) -> Self {
        CliError::Sweep(Box::new(e))
    }
}

/// The model config of a preset (or `custom`) with `--set` overrides applied, validated.
pub fn model_config(name: &str, sets: &[String]) -> Result<vit_model::ModelConfig, CliError> {
    let mut cfg = vit_model::ModelConfig::preset(name)?;
    for s in sets {
        cfg.set(s)?;
    }
    cfg.validate()?;
    Ok(cfg)
}
