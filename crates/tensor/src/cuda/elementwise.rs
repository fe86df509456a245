//! CUDA launches of `kernels/elementwise.cu`: casts, binary ops, scale, bias add (and its
//! backward, a column reduction from `reduce.cu`), activations.

use super::launch::{cfg_1d, i64_of, launch, name};
use super::reduce::{reduce_code, reduce_lines_into};
use super::v32::kernel_name;
use super::{backend_of, output, view, wrap};
use crate::{
    op_kinds::{Activation, BinaryOp, Gelu, ReduceOp},
    DType, Error, Result, Shape, Tensor,
};
use cudarc::driver::PushKernelArg;

/// `x` cast to float `dtype`.
pub(crate) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let backend = backend_of(x, "cast")?;
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if !x.dtype().is_float() || !dtype.is_float() {
        return Err(Error::DType {
            op: "cast",
            expected: "a float dtype on both sides".into(),
            got: if dtype.is_float() { x.dtype() } else { dtype },
        });
    }
    let mut out = output(&backend, x.shape(), dtype)?;
    let n = x.numel();
    if n > 0 {
        let func = backend.function(
            "elementwise.cu",
            &format!("{}_{}_{}", kernel_name(&backend, "cast", n), x.dtype().kernel_suffix(), dtype.kernel_suffix()),
        )?;
        let xv = view(x, "cast")?;
        let n_ = i64_of(n);
        launch!(backend, func, cfg_1d(n), &xv, &mut out, &n_);
    }
    Ok(wrap(&backend, out, x.shape().clone(), dtype))
}

/// Elementwise `a op b`, same shape and dtype.
pub(crate) fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let backend = backend_of(a, "binary")?;
    let mut out = output(&backend, a.shape(), a.dtype())?;
    let n = a.numel();
    if n > 0 {
        let op_name = match op {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
        };
        let func = backend.function("elementwise.cu", &name(&kernel_name(&backend, op_name, n), a.dtype()))?;
        let (av, bv) = (view(a, op_name)?, view(b, op_name)?);
        let n_ = i64_of(n);
        launch!(backend, func, cfg_1d(n), &av, &bv, &mut out, &n_);
    }
    Ok(wrap(&backend, out, a.shape().clone(), a.dtype()))
}

/// `x * s`.
pub(crate) fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    let backend = backend_of(x, "scale")?;
    let mut out = output(&backend, x.shape(), x.dtype())?;
    let n = x.numel();
    if n > 0 {
        let func = backend.function("elementwise.cu", &name(&kernel_name(&backend, "scale", n), x.dtype()))?;
        let xv = view(x, "scale")?;
        let n_ = i64_of(n);
        launch!(backend, func, cfg_1d(n), &xv, &mut out, &s, &n_);
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}

/// `x [rows, n] + bias [n]` broadcast over rows.
pub(crate) fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let backend = backend_of(x, "bias_add")?;
    let mut out = output(&backend, x.shape(), x.dtype())?;
    let (n, width) = (x.numel(), bias.numel());
    if n > 0 && width > 0 {
        let func = backend.function("elementwise.cu", &name(&kernel_name(&backend, "bias_add", n), x.dtype()))?;
        let (xv, bv) = (view(x, "bias_add")?, view(bias, "bias_add")?);
        let (n_, width_) = (i64_of(n), i64_of(width));
        launch!(backend, func, cfg_1d(n), &xv, &bv, &mut out, &n_, &width_);
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}

/// Column sums of `dy [rows, n]` -> `[n]`, accumulated in f32, output in dy's dtype.
pub(crate) fn bias_add_bwd(dy: &Tensor) -> Result<Tensor> {
    let backend = backend_of(dy, "bias_add_bwd")?;
    let cols = dy.shape().last();
    let rows = dy.shape().rows();
    let shape = Shape::new([cols]);
    let mut out = output(&backend, &shape, dy.dtype())?;
    if cols > 0 {
        let dyv = view(dy, "bias_add_bwd")?;
        reduce_lines_into(&backend, &dyv, dy.dtype(), 1, rows, cols, reduce_code(ReduceOp::Sum), &mut out)?;
    }
    Ok(wrap(&backend, out, shape, dy.dtype()))
}

/// The activation code of `act_fwd`/`act_bwd` in kernels/elementwise.cu.
fn activation_code(kind: Activation) -> i32 {
    match kind {
        Activation::Gelu(Gelu::Tanh) => 0,
        Activation::Gelu(Gelu::Erf) => 1,
        Activation::Tanh => 2,
    }
}

/// `act(x)` elementwise.
pub(crate) fn activation_fwd(x: &Tensor, kind: Activation) -> Result<Tensor> {
    const OP: &str = "activation_fwd";
    let backend = backend_of(x, OP)?;
    let mut out = output(&backend, x.shape(), x.dtype())?;
    let n = x.numel();
    if n > 0 {
        let func = backend.function("elementwise.cu", &name(&kernel_name(&backend, "act_fwd", n), x.dtype()))?;
        let xv = view(x, OP)?;
        let (n_, code) = (i64_of(n), activation_code(kind));
        launch!(backend, func, cfg_1d(n), &xv, &mut out, &n_, &code);
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}

/// `dy · act'(x)` elementwise.
pub(crate) fn activation_bwd(x: &Tensor, dy: &Tensor, kind: Activation) -> Result<Tensor> {
    const OP: &str = "activation_bwd";
    let backend = backend_of(x, OP)?;
    let mut out = output(&backend, x.shape(), x.dtype())?;
    let n = x.numel();
    if n > 0 {
        let func = backend.function("elementwise.cu", &name(&kernel_name(&backend, "act_bwd", n), x.dtype()))?;
        let (xv, dyv) = (view(x, OP)?, view(dy, OP)?);
        let (n_, code) = (i64_of(n), activation_code(kind));
        launch!(backend, func, cfg_1d(n), &xv, &dyv, &mut out, &n_, &code);
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}
