//! CUDA launches of `kernels/softmax.cu`: softmax and the softmax / sigmoid cross-entropy losses.

use super::elementwise::cast;
use super::launch::{cfg_1d, cfg_rows, i64_of, launch, name};
use super::{backend_of, output, view, wrap};
use crate::{DType, Result, Shape, Tensor};
use cudarc::driver::PushKernelArg;

pub(crate) fn softmax_fwd(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_fwd";
    let backend = backend_of(x, OP)?;
    let mut out = output(&backend, x.shape(), x.dtype())?;
    let (n, rows) = (x.shape().last(), x.shape().rows());
    if rows > 0 && n > 0 {
        let func = backend.function("softmax.cu", &name(OP, x.dtype()))?;
        let xv = view(x, OP)?;
        let (rows_, n_) = (i64_of(rows), i64_of(n));
        launch!(backend, func, cfg_rows(rows, n), &xv, &mut out, &rows_, &n_);
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}

pub(crate) fn softmax_bwd(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_bwd";
    let backend = backend_of(y, OP)?;
    let mut out = output(&backend, y.shape(), y.dtype())?;
    let (n, rows) = (y.shape().last(), y.shape().rows());
    if rows > 0 && n > 0 {
        let func = backend.function("softmax.cu", &name(OP, y.dtype()))?;
        let (yv, dyv) = (view(y, OP)?, view(dy, OP)?);
        let (rows_, n_) = (i64_of(rows), i64_of(n));
        launch!(backend, func, cfg_rows(rows, n), &yv, &dyv, &mut out, &rows_, &n_);
    }
    Ok(wrap(&backend, out, y.shape().clone(), y.dtype()))
}

/// Targets as f32 (the loss kernels read f32 targets; widening bf16/f16 is exact).
fn targets_f32(targets: &Tensor) -> Result<Tensor> {
    if targets.dtype() == DType::F32 {
        Ok(targets.clone())
    } else {
        cast(targets, DType::F32)
    }
}

/// The per-row loss kernels: `loss [B] f32` from `logits [B, K]` and targets.
fn loss_fwd(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let backend = backend_of(logits, op)?;
    let (b, k) = (logits.dims()[0], logits.dims()[1]);
    let shape = Shape::new([b]);
    let mut loss = output(&backend, &shape, DType::F32)?;
    if b > 0 && k > 0 {
        let t = targets_f32(targets)?;
        let func = backend.function("softmax.cu", &name(op, logits.dtype()))?;
        let (zv, tv) = (view(logits, op)?, view(&t, op)?);
        let (b_, k_) = (i64_of(b), i64_of(k));
        launch!(backend, func, cfg_rows(b, k), &zv, &tv, &mut loss, &b_, &k_);
    }
    Ok(wrap(&backend, loss, shape, DType::F32))
}

pub(crate) fn softmax_cross_entropy_fwd(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    loss_fwd("softmax_cross_entropy_fwd", logits, targets)
}

pub(crate) fn softmax_cross_entropy_bwd(logits: &Tensor, targets: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_cross_entropy_bwd";
    let backend = backend_of(logits, OP)?;
    let mut out = output(&backend, logits.shape(), logits.dtype())?;
    let (b, k) = (logits.dims()[0], logits.dims()[1]);
    if b > 0 && k > 0 {
        let t = targets_f32(targets)?;
        let func = backend.function("softmax.cu", &name(OP, logits.dtype()))?;
        let (zv, tv, gv) = (view(logits, OP)?, view(&t, OP)?, view(dloss, OP)?);
        let (b_, k_) = (i64_of(b), i64_of(k));
        launch!(backend, func, cfg_rows(b, k), &zv, &tv, &gv, &mut out, &b_, &k_);
    }
    Ok(wrap(&backend, out, logits.shape().clone(), logits.dtype()))
}

pub(crate) fn sigmoid_cross_entropy_fwd(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    loss_fwd("sigmoid_cross_entropy_fwd", logits, targets)
}

pub(crate) fn sigmoid_cross_entropy_bwd(logits: &Tensor, targets: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    const OP: &str = "sigmoid_cross_entropy_bwd";
    let backend = backend_of(logits, OP)?;
    let mut out = output(&backend, logits.shape(), logits.dtype())?;
    let (total, k) = (logits.numel(), logits.dims()[1]);
    if total > 0 {
        let t = targets_f32(targets)?;
        let func = backend.function("softmax.cu", &name(OP, logits.dtype()))?;
        let (zv, tv, gv) = (view(logits, OP)?, view(&t, OP)?, view(dloss, OP)?);
        let (total_, k_) = (i64_of(total), i64_of(k));
        launch!(backend, func, cfg_1d(total), &zv, &tv, &gv, &mut out, &total_, &k_);
    }
    Ok(wrap(&backend, out, logits.shape().clone(), logits.dtype()))
}
