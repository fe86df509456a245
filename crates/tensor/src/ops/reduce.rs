//! Reductions along one axis (sum, mean, max, argmax) with their backward, and top-k.

use super::{min_rank, same_device, same_float_dtype};
use crate::op_kinds::ReduceOp;
use crate::{cpu, cuda, DType, Device, Error, Result, Tensor};

fn check_dim(op: &'static str, x: &Tensor, dim: usize) -> Result<Vec<usize>> {
    same_float_dtype(op, &[x])?;
    if dim >= x.rank() {
        return Err(Error::shape(op, format!("dim {dim} out of range for shape {}", x.shape())));
    }
    let mut out = x.dims().to_vec();
    out.remove(dim);
    Ok(out)
}

fn reduce(x: &Tensor, dim: usize, op: ReduceOp, name: &'static str) -> Result<Tensor> {
    let out = check_dim(name, x, dim)?;
    match x.device() {
        Device::Cpu => {
            let (outer, n, inner) = x.shape().split_at_dim(dim);
            Ok(Tensor::cpu_like(cpu::reduce(&x.cpu_f32(name)?, outer, n, inner, op), out, x.dtype()))
        }
        Device::Cuda(_) => cuda::reduce::reduce(x, dim, op),
    }
}

/// Sum along `dim`; the output drops that dim.
pub fn sum(x: &Tensor, dim: usize) -> Result<Tensor> {
    reduce(x, dim, ReduceOp::Sum, "sum")
}

/// Mean along `dim`.
pub fn mean(x: &Tensor, dim: usize) -> Result<Tensor> {
    reduce(x, dim, ReduceOp::Mean, "mean")
}

/// Maximum along `dim`.
pub fn max(x: &Tensor, dim: usize) -> Result<Tensor> {
    reduce(x, dim, ReduceOp::Max, "max")
}

/// Index of the maximum along `dim` (the first on ties), U32.
pub fn argmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let out = check_dim("argmax", x, dim)?;
    match x.device() {
        Device::Cpu => {
            let (outer, n, inner) = x.shape().split_at_dim(dim);
            let idx = cpu::argmax(&x.cpu_f32("argmax")?, outer, n, inner);
            Tensor::from_vec(idx, out, Device::Cpu)
        }
        Device::Cuda(_) => cuda::reduce::argmax(x, dim),
    }
}

/// Gradient of [`sum`] (`scale` 1) or [`mean`] (`scale` 1/n): `dy` broadcast back along `dim`
/// of `x_shape`.
fn broadcast_bwd(dy: &Tensor, x_shape: &[usize], dim: usize, mean: bool, op: &'static str) -> Result<Tensor> {
    same_float_dtype(op, &[dy])?;
    let mut expect = x_shape.to_vec();
    if dim >= expect.len() {
        return Err(Error::shape(op, format!("dim {dim} out of range for shape {x_shape:?}")));
    }
    let n = expect.remove(dim);
    if dy.dims() != expect.as_slice() {
        return Err(Error::shape(
            op,
            format!("expected dy of shape {expect:?} for x {x_shape:?} reduced along {dim}, got {}", dy.shape()),
        ));
    }
    let scale = if mean { 1.0 / n as f32 } else { 1.0 };
    match dy.device() {
        Device::Cpu => {
            let shape = crate::Shape::new(x_shape.to_vec());
            let (outer, n, inner) = shape.split_at_dim(dim);
            Ok(Tensor::cpu_like(cpu::broadcast_along(&dy.cpu_f32(op)?, outer, n, inner, scale), shape, dy.dtype()))
        }
        Device::Cuda(_) => cuda::reduce::broadcast_along(dy, dim, n, scale)?.reshape(x_shape.to_vec()),
    }
}

/// Gradient of [`sum`]: `dy` repeated along `dim` of `x_shape`.
pub fn sum_bwd(dy: &Tensor, x_shape: &[usize], dim: usize) -> Result<Tensor> {
    broadcast_bwd(dy, x_shape, dim, false, "sum_bwd")
}

/// Gradient of [`mean`]: `dy / n` repeated along `dim` of `x_shape`.
pub fn mean_bwd(dy: &Tensor, x_shape: &[usize], dim: usize) -> Result<Tensor> {
    broadcast_bwd(dy, x_shape, dim, true, "mean_bwd")
}

/// Gradient of [`max`]: `dy` routed to the first maximum of each line, zeros elsewhere.
pub fn max_bwd(x: &Tensor, dy: &Tensor, dim: usize) -> Result<Tensor> {
    let out = check_dim("max_bwd", x, dim)?;
    same_device("max_bwd", &[x, dy])?;
    same_float_dtype("max_bwd", &[x, dy])?;
    if dy.dims() != out.as_slice() {
        return Err(Error::shape("max_bwd", format!("expected dy of shape {out:?}, got {}", dy.shape())));
    }
    match x.device() {
        Device::Cpu => {
            let (outer, n, inner) = x.shape().split_at_dim(dim);
            Ok(Tensor::cpu_like(
                cpu::max_bwd(&x.cpu_f32("max_bwd")?, &dy.cpu_f32("max_bwd")?, outer, n, inner),
                x.shape().clone(),
                x.dtype(),
            ))
        }
        Device::Cuda(_) => cuda::reduce::max_bwd(x, dy, dim),
    }
}

/// The `k` largest values of each row of `x [.., n]`, descending (ties: lower index first),
/// and their indices: `(values [.., k] x's dtype, indices [.., k] U32)`.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    same_float_dtype("topk", &[x])?;
    min_rank("topk", x, 1, "x")?;
    let n = x.shape().last();
    if k == 0 || k > n {
        return Err(Error::value(
            "topk",
            format!("expected 1 <= k <= {n} (the last dim of {}), got k = {k}", x.shape()),
        ));
    }
    let mut out = x.dims().to_vec();
    *out.last_mut().expect("rank >= 1") = k;
    match x.device() {
        Device::Cpu => {
            let (v, i) = cpu::topk(&x.cpu_f32("topk")?, n, k);
            Ok((Tensor::cpu_like(v, out.clone(), x.dtype()), Tensor::from_vec(i, out, Device::Cpu)?))
        }
        Device::Cuda(_) => cuda::reduce::topk(x, k),
    }
}

/// Sum of every element, as a one-element tensor of shape `[]`.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    sum(&x.reshape([x.numel()])?, 0)
}

/// Checks that `t` is an index tensor.
pub(crate) fn check_index(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::I32 {
        return Err(Error::DType { op, expected: "i32".into(), got: t.dtype() });
    }
    Ok(())
}
