//! The one error type of `vit-model`. Every variant names the thing at fault (a config
//! field, a preset name, an override key), the value it was given and what was expected,
//! and displays as a single line.

/// Errors from model configs, presets, overrides and parameter counting.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config field holds a value that is invalid on its own or together with another
    /// field, e.g. `model config: width = 100: expected a multiple of heads (12)`.
    #[error("model config: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// The field name, as spelled in TOML and on the command line.
        field: &'static str,
        /// The offending value, formatted.
        value: String,
        /// What the field must be.
        expected: String,
    },

    /// `ModelConfig::preset` got a name that is not a known model.
    #[error("unknown model {name:?}: expected one of {known}")]
    UnknownPreset {
        /// The name as given.
        name: String,
        /// The known names, comma separated.
        known: String,
    },

    /// An override named a key that is not a `ModelConfig` field.
    #[error("unknown model config key {key:?}: expected one of {valid}")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The valid keys, comma separated.
        valid: String,
    },

    /// An override gave a value that does not parse as the field's type.
    #[error("model config: {key} = {value:?}: expected {expected}")]
    BadValue {
        /// The field name.
        key: &'static str,
        /// The value as given.
        value: String,
        /// The expected type or set of values.
        expected: String,
    },

    /// An override was not of the form `key=value`.
    #[error("model config override {0:?}: expected key=value")]
    MalformedOverride(String),

    /// A TOML model config could not be parsed or has unknown or ill-typed fields.
    #[error("model config TOML{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Toml {
        /// 1-based line of the error in the input, when known.
        line: Option<usize>,
        /// The parser's message, on one line.
        message: String,
    },

    /// A size computed from the config (a parameter count, the token count) does not fit
    /// in 64 bits.
    #[error("model config: {what} overflows 64 bits; the config is too large")]
    Overflow {
        /// What was being computed.
        what: &'static str,
    },

    /// A named parameter is missing, duplicated, or has the wrong shape or dtype.
    #[error("parameter {name}: {msg}")]
    Param {
        /// The dotted parameter name, e.g. `blocks.3.attn.qkv.weight`.
        name: String,
        /// What is wrong: expected versus found.
        msg: String,
    },

    /// Two stores of named tensors (checkpoint versus model, say) differ: every missing,
    /// unexpected, misshaped and wrongly typed name at once.
    #[error("{what}: {diff}")]
    ParamMismatch {
        /// What was checked and against what, e.g.
        /// `checkpoint runs/a/step-100.safetensors: parameters do not match the model`.
        what: String,
        /// The differences.
        diff: vit_tensor::ParamDiff,
    },

    /// Opening, reading, writing or renaming a checkpoint file failed.
    #[error("checkpoint {}: cannot {action}: {source}", path.display())]
    CheckpointIo {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// What was being done: `open`, `read`, `write`, `sync`, ...
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },

    /// The checkpoint path exists but is not a regular file.
    #[error("checkpoint {}: not a file: it is {found}", path.display())]
    CheckpointNotAFile {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// What is there instead, e.g. `a directory`.
        found: &'static str,
    },

    /// The checkpoint file is shorter than its header says (an interrupted copy or write).
    #[error("checkpoint {}: truncated: {detail}", path.display())]
    CheckpointTruncated {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// Sizes found and expected.
        detail: String,
    },

    /// The checkpoint file is not a valid safetensors file (garbage header, bad tensor table).
    #[error("checkpoint {}: corrupt: {detail}", path.display())]
    CheckpointCorrupt {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// What does not parse.
        detail: String,
    },

    /// The checkpoint's format version is missing (not a vitrs checkpoint) or not one this
    /// build reads.
    #[error(
        "checkpoint {}: {}",
        path.display(),
        match found {
            None => format!(
                "no format version ({} in the safetensors metadata): not a vitrs checkpoint",
                crate::checkpoint::KEY_VERSION
            ),
            Some(v) => format!(
                "format version {v:?}: expected {} (written by another vitrs version?)",
                crate::checkpoint::FORMAT_VERSION
            ),
        }
    )]
    CheckpointVersion {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// The version found, if any.
        found: Option<String>,
    },

    /// A checkpoint metadata entry is missing or does not parse (the model config, the step,
    /// the name lists).
    #[error("checkpoint {}: metadata {key}: {msg}", path.display())]
    CheckpointMetadata {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// The `__metadata__` key, e.g. `vitrs.config`.
        key: String,
        /// What is wrong.
        msg: String,
    },

    /// A tensor in a checkpoint is missing, not listed, or of a dtype vitrs does not hold.
    #[error("checkpoint {}: tensor {name}: {msg}", path.display())]
    CheckpointTensor {
        /// The checkpoint path.
        path: std::path::PathBuf,
        /// The tensor key(s) in the file.
        name: String,
        /// What is wrong.
        msg: String,
    },

    /// An error from a tensor op.
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
    /// A collective of expert parallelism failed (a rank left, mismatched buffers).
    #[error(transparent)]
    Collective(#[from] vit_collective::Error),
}

/// Result alias for `vit-model`.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn invalid(field: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        ModelError::InvalidConfig { field, value: value.to_string(), expected: expected.into() }
    }

    pub(crate) fn bad_value(key: &'static str, value: &str, expected: impl Into<String>) -> Self {
        ModelError::BadValue { key, value: value.to_string(), expected: expected.into() }
    }
}
