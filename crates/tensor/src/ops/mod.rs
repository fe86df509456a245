//! Ops as plain functions: each checks shapes, dtypes and devices, then runs the CPU
//! reference (`crate::cpu`) or the CUDA launchers (`crate::cuda::<family>`). Float tensors of any
//! float dtype are accepted; every accumulation is f32 (design §2).

mod attention;
mod attention_packed;
mod elementwise;
mod im2col;
mod index;
mod layout;
mod linear;
mod matmul;
mod moe_dispatch;
mod norm;
mod patch;
mod reduce;
mod routing;
mod softmax;

pub use crate::op_kinds::{Activation, BinaryOp, Gelu, MatmulDims, NormKind, ReduceOp};
pub use attention::*;
pub use attention_packed::*;
pub use elementwise::*;
pub use im2col::*;
pub use index::*;
pub use layout::*;
pub use linear::*;
pub use matmul::*;
pub use moe_dispatch::*;
pub use norm::*;
pub use patch::*;
pub use reduce::*;
pub use routing::*;
pub use softmax::*;

use crate::{DType, Device, Error, Result, Tensor};

/// The common device of `ts`, or an error naming the first that differs.
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::Device { op, expected: d, got: t.device() });
        }
    }
    Ok(d)
}

/// Checks that every tensor has the float dtype of the first; returns it.
pub(crate) fn same_float_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let d = ts[0].dtype();
    if !d.is_float() {
        return Err(Error::DType { op, expected: "f32, bf16 or f16".into(), got: d });
    }
    for t in &ts[1..] {
        if t.dtype() != d {
            return Err(Error::DType { op, expected: d.to_string(), got: t.dtype() });
        }
    }
    Ok(d)
}

/// Checks that `a` and `b` have the same shape.
pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("expected equal shapes, got {} and {}", a.shape(), b.shape())));
    }
    Ok(())
}

/// Checks that `t` has rank at least `min`.
pub(crate) fn min_rank(op: &'static str, t: &Tensor, min: usize, what: &str) -> Result<()> {
    if t.rank() < min {
        return Err(Error::shape(op, format!("expected {what} of rank >= {min}, got shape {}", t.shape())));
    }
    Ok(())
}

/// Checks that `t` has exactly `dims`.
pub(crate) fn exact_shape(op: &'static str, t: &Tensor, dims: &[usize], what: &str) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::shape(op, format!("expected {what} of shape {dims:?}, got {}", t.shape())));
    }
    Ok(())
}
