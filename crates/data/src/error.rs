//! Errors of `vit-data`.

use std::path::PathBuf;

/// A data file that cannot be read or does not hold what it should, a bad pipeline or loader
/// setting, or a failure inside a loader worker.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is readable but malformed or truncated: says what was expected and what was found.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// An example index at or past the end of a dataset.
    #[error("example index {index} is out of range for a dataset of {len} examples")]
    Index { index: usize, len: usize },
    /// An augmentation that cannot apply to the image it was given (`op` is its config name).
    #[error("{op}: {msg}")]
    Transform { op: &'static str, msg: String },
    /// An invalid setting of a pipeline, a loader or an image buffer.
    #[error("{0}")]
    Config(String),
    /// The error of one example of a batch, with the example's dataset index.
    #[error("example {index}: {source}")]
    Example {
        index: usize,
        #[source]
        source: Box<DataError>,
    },
    /// A loader worker thread panicked or vanished; the message says which step and why.
    #[error("data loader worker: {0}")]
    Worker(String),
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
}
