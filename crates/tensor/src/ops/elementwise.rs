//! Elementwise ops: add, mul, scale, bias add, GELU.

use super::{min_rank, same_device, same_float_dtype, same_shape};
use crate::op_kinds::{Activation, BinaryOp, Gelu};
use crate::{cpu, cuda, Device, Error, Result, Tensor};

fn binary(a: &Tensor, b: &Tensor, op: BinaryOp, name: &'static str) -> Result<Tensor> {
    let device = same_device(name, &[a, b])?;
    let dtype = same_float_dtype(name, &[a, b])?;
    same_shape(name, a, b)?;
    match device {
        Device::Cpu => {
            let (x, y) = (a.cpu_f32(name)?, b.cpu_f32(name)?);
            Ok(Tensor::cpu_like(cpu::binary(&x, &y, op), a.shape().clone(), dtype))
        }
        Device::Cuda(_) => cuda::elementwise::binary(a, b, op),
    }
}

/// `a + b`, equal shapes. Backward: both gradients are `dy`.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add, "add")
}

/// `a - b`, equal shapes. Backward: `dy` and `-dy`.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub, "sub")
}

/// `a * b` elementwise, equal shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul, "mul")
}

/// Gradients of `a * b`: `(dy * b, dy * a)`.
pub fn mul_bwd(a: &Tensor, b: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((mul(dy, b)?, mul(dy, a)?))
}

/// `x * s`. Backward: `scale(dy, s)`.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    same_float_dtype("scale", &[x])?;
    match x.device() {
        Device::Cpu => Ok(Tensor::cpu_like(cpu::scale(&x.cpu_f32("scale")?, s), x.shape().clone(), x.dtype())),
        Device::Cuda(_) => cuda::elementwise::scale(x, s),
    }
}

/// `x [.., n] + bias [n]`, the bias broadcast over every leading index.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let device = same_device("bias_add", &[x, bias])?;
    let dtype = same_float_dtype("bias_add", &[x, bias])?;
    min_rank("bias_add", x, 1, "x")?;
    if bias.dims() != [x.shape().last()] {
        return Err(Error::shape(
            "bias_add",
            format!("expected bias of shape [{}] for x {}, got {}", x.shape().last(), x.shape(), bias.shape()),
        ));
    }
    match device {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::bias_add(&x.cpu_f32("bias_add")?, &bias.cpu_f32("bias_add")?),
            x.shape().clone(),
            dtype,
        )),
        Device::Cuda(_) => cuda::elementwise::bias_add(x, bias),
    }
}

/// Gradient of the bias in [`bias_add`]: `dy [.., n]` summed over every leading index -> `[n]`.
pub fn bias_add_bwd(dy: &Tensor) -> Result<Tensor> {
    same_float_dtype("bias_add_bwd", &[dy])?;
    min_rank("bias_add_bwd", dy, 1, "dy")?;
    let n = dy.shape().last();
    match dy.device() {
        Device::Cpu => Ok(Tensor::cpu_like(cpu::column_sums(&dy.cpu_f32("bias_add_bwd")?, n), [n], dy.dtype())),
        Device::Cuda(_) => cuda::elementwise::bias_add_bwd(dy),
    }
}

fn activation_fwd(x: &Tensor, kind: Activation, op: &'static str) -> Result<Tensor> {
    same_float_dtype(op, &[x])?;
    match x.device() {
        Device::Cpu => Ok(Tensor::cpu_like(cpu::activation_fwd(&x.cpu_f32(op)?, kind), x.shape().clone(), x.dtype())),
        Device::Cuda(_) => cuda::elementwise::activation_fwd(x, kind),
    }
}

fn activation_bwd(x: &Tensor, dy: &Tensor, kind: Activation, op: &'static str) -> Result<Tensor> {
    let device = same_device(op, &[x, dy])?;
    let dtype = same_float_dtype(op, &[x, dy])?;
    same_shape(op, x, dy)?;
    match device {
        Device::Cpu => {
            Ok(Tensor::cpu_like(cpu::activation_bwd(&x.cpu_f32(op)?, &dy.cpu_f32(op)?, kind), x.shape().clone(), dtype))
        }
        Device::Cuda(_) => cuda::elementwise::activation_bwd(x, dy, kind),
    }
}

/// GELU of every element.
pub fn gelu_fwd(x: &Tensor, kind: Gelu) -> Result<Tensor> {
    activation_fwd(x, Activation::Gelu(kind), "gelu_fwd")
}

/// `dx = dy * gelu'(x)`.
pub fn gelu_bwd(x: &Tensor, dy: &Tensor, kind: Gelu) -> Result<Tensor> {
    activation_bwd(x, dy, Activation::Gelu(kind), "gelu_bwd")
}

/// tanh of every element.
pub fn tanh_fwd(x: &Tensor) -> Result<Tensor> {
    activation_fwd(x, Activation::Tanh, "tanh_fwd")
}

/// `dx = dy * (1 - tanh(x)²)`, from the forward's input `x`.
pub fn tanh_bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    activation_bwd(x, dy, Activation::Tanh, "tanh_bwd")
}
