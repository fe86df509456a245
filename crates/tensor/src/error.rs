//! The one error type of `vit-tensor`. Every variant names the op (or the thing being
//! built) and says what was expected and what was given.

use crate::{DType, Device};

/// Errors from tensor creation, ops and backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes do not fit the op, e.g. `matmul: inner dimensions differ: expected [.., 4] x [4, ..], got [2, 4] x [3, 5]`.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A dtype the op does not accept.
    #[error("{op}: expected dtype {expected}, got {got:?}")]
    DType { op: &'static str, expected: String, got: DType },

    /// Operands live on different devices, or an op is not available on a device.
    #[error("{op}: expected all tensors on {expected}, got {got}")]
    Device { op: &'static str, expected: Device, got: Device },

    /// A value outside its valid range (an index, an epsilon, a size).
    #[error("{op}: {msg}")]
    Value { op: &'static str, msg: String },

    /// The CUDA driver or a library (cuBLAS, NVRTC) reported an error, or is missing.
    #[error("cuda: {0}")]
    Cuda(String),

    /// A named parameter (or state tensor) of a [`crate::ParamStore`]: missing, added twice, or
    /// replaced by a tensor of another shape or dtype.
    #[error("parameter {name}: {msg}")]
    Param { name: String, msg: String },

    /// NVRTC could not compile a kernel file; the log holds the compiler's messages.
    #[error("nvrtc: compiling {file} for {arch} failed:\n{log}")]
    Compile { file: String, arch: String, log: String },

    /// A custom kernel (`cuda::kernel`) could not be loaded or launched, e.g. `kernel
    /// optim.cu:adamw_step: argument 3 is 4 bytes, the kernel's parameter is 8 bytes`.
    #[error("kernel {kernel}: {msg}")]
    Kernel { kernel: String, msg: String },
}

/// Result alias for `vit-tensor`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub(crate) fn value(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Value { op, msg: msg.into() }
    }
}
