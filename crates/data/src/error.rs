//! Errors of `vit-data`.

use std::path::PathBuf;

/// A data file that cannot be read or does not hold what it should.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is readable but malformed or truncated: says what was expected and what was found.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
}
