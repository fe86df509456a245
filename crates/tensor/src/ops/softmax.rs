//! Softmax over the last dim, and the two classification losses (softmax and sigmoid
//! cross-entropy, the latter big_vision's default for JFT-style multi-label heads).

use super::{exact_shape, min_rank, same_device, same_float_dtype, same_shape};
use crate::{cpu, cuda, DType, Device, Error, Result, Tensor};

/// Softmax over the last dim of `x [.., n]`.
pub fn softmax_fwd(x: &Tensor) -> Result<Tensor> {
    same_float_dtype("softmax_fwd", &[x])?;
    min_rank("softmax_fwd", x, 1, "x")?;
    match x.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::softmax_fwd(&x.cpu_f32("softmax_fwd")?, x.shape().last()),
            x.shape().clone(),
            x.dtype(),
        )),
        Device::Cuda(_) => cuda::softmax::softmax_fwd(x),
    }
}

/// `dx = y * (dy - sum(dy * y))` given the softmax output `y`.
pub fn softmax_bwd(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let device = same_device("softmax_bwd", &[y, dy])?;
    let dtype = same_float_dtype("softmax_bwd", &[y, dy])?;
    same_shape("softmax_bwd", y, dy)?;
    min_rank("softmax_bwd", y, 1, "y")?;
    match device {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::softmax_bwd(&y.cpu_f32("softmax_bwd")?, &dy.cpu_f32("softmax_bwd")?, y.shape().last()),
            y.shape().clone(),
            dtype,
        )),
        Device::Cuda(_) => cuda::softmax::softmax_bwd(y, dy),
    }
}

fn check_loss(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<Device> {
    let device = same_device(op, &[logits, targets])?;
    same_float_dtype(op, &[logits])?;
    same_float_dtype(op, &[targets])?;
    if logits.rank() != 2 {
        return Err(Error::shape(op, format!("expected logits [batch, classes], got {}", logits.shape())));
    }
    same_shape(op, logits, targets)?;
    Ok(device)
}

fn check_dloss(op: &'static str, logits: &Tensor, dloss: &Tensor) -> Result<()> {
    same_device(op, &[logits, dloss])?;
    if dloss.dtype() != DType::F32 {
        return Err(Error::DType { op, expected: "f32".into(), got: dloss.dtype() });
    }
    exact_shape(op, dloss, &[logits.dims()[0]], "dloss")
}

/// Per-example softmax cross-entropy with soft targets: `loss_i = -Σ_j t_ij log softmax(z_i)_j`.
/// `logits, targets [batch, classes]` (one-hot, smoothed or a teacher's probabilities); loss `[batch]` f32.
pub fn softmax_cross_entropy_fwd(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_cross_entropy_fwd";
    match check_loss(OP, logits, targets)? {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::softmax_xent_fwd(&logits.cpu_f32(OP)?, &targets.cpu_f32(OP)?, logits.dims()[1]),
            [logits.dims()[0]],
            DType::F32,
        )),
        Device::Cuda(_) => cuda::softmax::softmax_cross_entropy_fwd(logits, targets),
    }
}

/// `dlogits_ij = dloss_i (softmax(z_i)_j Σ_j t_ij - t_ij)`; `dloss [batch]` f32.
pub fn softmax_cross_entropy_bwd(logits: &Tensor, targets: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_cross_entropy_bwd";
    let device = check_loss(OP, logits, targets)?;
    check_dloss(OP, logits, dloss)?;
    match device {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::softmax_xent_bwd(&logits.cpu_f32(OP)?, &targets.cpu_f32(OP)?, &dloss.cpu_f32(OP)?, logits.dims()[1]),
            logits.shape().clone(),
            logits.dtype(),
        )),
        Device::Cuda(_) => cuda::softmax::softmax_cross_entropy_bwd(logits, targets, dloss),
    }
}

/// [`softmax_cross_entropy_fwd`] and [`softmax_cross_entropy_bwd`] at once, for a training step
/// that knows `dloss [batch]` f32 before the forward (e.g. `1/batch` for a mean): returns
/// `(loss [batch] f32, dlogits)`. One kernel on CUDA (reading the logits once for both); on the
/// CPU exactly the two ops.
pub fn softmax_cross_entropy_fwd_bwd(logits: &Tensor, targets: &Tensor, dloss: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "softmax_cross_entropy_fwd_bwd";
    let device = check_loss(OP, logits, targets)?;
    check_dloss(OP, logits, dloss)?;
    match device {
        Device::Cpu => {
            Ok((softmax_cross_entropy_fwd(logits, targets)?, softmax_cross_entropy_bwd(logits, targets, dloss)?))
        }
        Device::Cuda(_) => cuda::softmax::softmax_cross_entropy_fwd_bwd(logits, targets, dloss),
    }
}

/// Per-example sigmoid cross-entropy summed over classes:
/// `loss_i = Σ_j max(z,0) - z t + log(1 + exp(-|z|))`; loss `[batch]` f32.
pub fn sigmoid_cross_entropy_fwd(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const OP: &str = "sigmoid_cross_entropy_fwd";
    match check_loss(OP, logits, targets)? {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::sigmoid_xent_fwd(&logits.cpu_f32(OP)?, &targets.cpu_f32(OP)?, logits.dims()[1]),
            [logits.dims()[0]],
            DType::F32,
        )),
        Device::Cuda(_) => cuda::softmax::sigmoid_cross_entropy_fwd(logits, targets),
    }
}

/// `dlogits_ij = dloss_i (sigmoid(z_ij) - t_ij)`.
pub fn sigmoid_cross_entropy_bwd(logits: &Tensor, targets: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    const OP: &str = "sigmoid_cross_entropy_bwd";
    let device = check_loss(OP, logits, targets)?;
    check_dloss(OP, logits, dloss)?;
    match device {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::sigmoid_xent_bwd(&logits.cpu_f32(OP)?, &targets.cpu_f32(OP)?, &dloss.cpu_f32(OP)?, logits.dims()[1]),
            logits.shape().clone(),
            logits.dtype(),
        )),
        Device::Cuda(_) => cuda::softmax::sigmoid_cross_entropy_bwd(logits, targets, dloss),
    }
}

/// One-hot float targets `[batch, classes]` from I32 labels `[batch]`; an error names a label out of range.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let l = labels.to_vec::<i32>()?;
    let mut out = vec![0.0f32; l.len() * classes];
    for (i, &c) in l.iter().enumerate() {
        if c < 0 || c as usize >= classes {
            return Err(Error::value("one_hot", format!("label {c} at index {i} is outside 0..{classes}")));
        }
        out[i * classes + c as usize] = 1.0;
    }
    Tensor::from_f32(out, [l.len(), classes], dtype, labels.device())
}
