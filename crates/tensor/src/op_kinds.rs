//! The kinds of ops both backends dispatch on: which binary op, activation, normalisation,
//! reduction, and the shape of a matmul problem. A leaf module: it imports nothing from `ops`,
//! `cpu` or `cuda`, so both backends can use it without a module cycle. Re-exported from
//! [`crate::ops`] (`vit_tensor::ops::Activation`, ...).

/// A binary elementwise op on tensors of equal shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
}

/// GELU variant: big_vision uses the tanh approximation, timm the exact erf (reference §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gelu {
    #[default]
    Tanh,
    Erf,
}

/// An elementwise nonlinearity: GELU (either form) or tanh (pre-logits, reference §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Gelu(Gelu),
    Tanh,
}

/// Which normalisation: LayerNorm subtracts the mean; RMSNorm only rescales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormKind {
    #[default]
    LayerNorm,
    Rms,
}

/// A reduction along one axis (and, in `vit-collective`, across ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        })
    }
}

/// The problem a `matmul_t` call describes: `batch` products of `[m, k] x [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}
