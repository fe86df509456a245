//! One module per `vit` subcommand.

pub mod devices;
pub mod params;

/// Errors of the `vit` tool: each wraps a crate's error, whose message already names the
/// thing and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] vit_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}
