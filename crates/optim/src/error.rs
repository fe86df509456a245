//! Errors of `vit-optim`. Every message is one line naming the setting, parameter or state
//! tensor at fault, the value found and what was expected.

use vit_tensor::ParamDiff;

/// A bad optimizer or schedule setting, a parameter or gradient that does not fit the
/// optimizer, optimizer state that does not fit it, or a tensor error underneath.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A setting outside its valid range: names the setting, the value and what was expected.
    #[error("{setting} = {value}: expected {expected}")]
    Setting { setting: &'static str, value: String, expected: &'static str },

    /// A parameter-group rule whose pattern is not a valid regular expression, or whose value
    /// is out of range.
    #[error("parameter group rule {list}[{index}] {pattern:?}: {msg}")]
    Rule {
        /// `lr_mults`, `wd_mults` or `frozen`.
        list: &'static str,
        /// Position of the rule in its list.
        index: usize,
        /// The pattern as given.
        pattern: String,
        /// What is wrong.
        msg: String,
    },

    /// A parameter (or its gradient) is missing, unknown to the optimizer, or of the wrong
    /// shape or dtype.
    #[error("parameter {name}: {msg}")]
    Param {
        /// The dotted parameter name, e.g. `blocks.3.attn.qkv.weight`.
        name: String,
        /// What is wrong: expected versus found.
        msg: String,
    },

    /// A gradient holds NaN or infinity; the step was refused and nothing was changed.
    #[error("gradient of {name} is not finite (global norm {norm}): step {step} refused, parameters and optimizer state unchanged")]
    NonFinite {
        /// The first parameter (in store order) whose gradient holds a non-finite value.
        name: String,
        /// The global gradient norm that was computed.
        norm: f64,
        /// The step that was refused (the count before the increment).
        step: u64,
    },

    /// Optimizer state given to `load_state` does not match this optimizer: every missing,
    /// unexpected, misshaped and wrongly typed state tensor at once.
    #[error("optimizer state does not match this optimizer: {0}")]
    StateMismatch(ParamDiff),

    /// A state tensor whose content is invalid (e.g. the step counter).
    #[error("optimizer state {name}: {msg}")]
    State {
        /// The state tensor's name, e.g. `count`.
        name: String,
        /// What is wrong.
        msg: String,
    },

    /// Arguments of the sharded factored update ([`crate::factored_update_sharded`]) that do
    /// not fit together: a cut the shape does not allow, or a slice of the wrong length.
    #[error("sharded factored update of a {dims:?} parameter: {msg}")]
    Shard {
        /// The whole parameter's shape.
        dims: Vec<usize>,
        /// What is wrong: expected versus found.
        msg: String,
    },

    /// A sum over the ranks sharing a parameter (a collective) failed.
    #[error("sum over the ranks sharing {name}: {msg}")]
    Collective {
        /// The parameter whose statistics were being summed.
        name: String,
        /// The communicator's error.
        msg: String,
    },

    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
}
