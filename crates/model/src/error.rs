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

    /// An error from a tensor op.
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
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
