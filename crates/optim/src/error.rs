//! Errors of `vit-optim`.

/// A bad optimizer or schedule setting, or a tensor error underneath.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A setting outside its valid range: names the setting, the value and what was expected.
    #[error("{setting} = {value}: expected {expected}")]
    Setting { setting: &'static str, value: String, expected: &'static str },
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
}
