//! CUDA launches of `kernels/softmax.cu`: softmax and the softmax / sigmoid cross-entropy losses,
//! and the fused softmax cross-entropy (loss and dlogits in one kernel; used once it has matched
//! the separate forward and backward kernels on the device, [`super::self_check`]).

use super::elementwise::cast;
use super::launch::{cfg_1d, cfg_rows, i64_of, launch, name, MAX_BLOCKS};
use super::{backend_of, output, self_check, view, wrap, CudaBackend};
use crate::{DType, Device, Result, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The self-check's name of the fused softmax cross-entropy (listed by `vit devices`).
pub(crate) const FUSED_XENT: &str = "softmax_cross_entropy_fused";

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

/// Softmax cross-entropy forward and backward at once: `(loss [B] f32, dlogits)`, the fused
/// kernel when it passed its self-check on this device, else the two reference kernels.
pub(crate) fn softmax_cross_entropy_fwd_bwd(
    logits: &Tensor,
    targets: &Tensor,
    dloss: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let backend = backend_of(logits, "softmax_cross_entropy_fwd_bwd")?;
    if fused_xent_ok(&backend) {
        fused_xent(&backend, logits, targets, dloss)
    } else {
        Ok((softmax_cross_entropy_fwd(logits, targets)?, softmax_cross_entropy_bwd(logits, targets, dloss)?))
    }
}

/// Rows of at most this many classes go one per warp, longer ones one per block of 256 threads.
const XENT_WARP_ROW_MAX: usize = 1024;

fn fused_xent(
    backend: &Arc<CudaBackend>,
    logits: &Tensor,
    targets: &Tensor,
    dloss: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "softmax_cross_entropy_fused";
    let (b, k) = (logits.dims()[0], logits.dims()[1]);
    let shape = Shape::new([b]);
    let mut loss = output(backend, &shape, DType::F32)?;
    let mut dz = output(backend, logits.shape(), logits.dtype())?;
    if b > 0 && k > 0 {
        let t = targets_f32(targets)?;
        let func = backend.function("softmax.cu", &name(OP, logits.dtype()))?;
        let (zv, tv, gv) = (view(logits, OP)?, view(&t, OP)?, view(dloss, OP)?);
        let per_warp = k <= XENT_WARP_ROW_MAX;
        let (per_block, threads) = if per_warp { (4, 128) } else { (1, 256) };
        let cfg = LaunchConfig {
            grid_dim: (b.div_ceil(per_block).min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b_, k_, per_warp) = (i64_of(b), k as i32, i32::from(per_warp));
        launch!(backend, func, cfg, &zv, &tv, &gv, &mut loss, &mut dz, &b_, &k_, &per_warp);
    }
    Ok((wrap(backend, loss, shape, DType::F32), wrap(backend, dz, logits.shape().clone(), logits.dtype())))
}

/// Whether the fused softmax cross-entropy may be used on `backend` (its check runs on first use).
pub(crate) fn fused_xent_ok(backend: &Arc<CudaBackend>) -> bool {
    backend.fast_kernel_ok(FUSED_XENT, 1e-5, || check_fused_xent(backend))
}

/// The fused kernel against the separate ones on problems taking its branches (vector and
/// scalar loads, one row per warp and per block; soft targets with zeros), in f32, bf16 and f16:
/// the largest relative error of loss and dlogits, scaled as the LayerNorm check's
/// (`1e-5 / dtype tolerance`, so one threshold judges every dtype).
fn check_fused_xent(backend: &Arc<CudaBackend>) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let scale = 1e-5 / super::norm::dtype_tolerance(dt);
        for (i, &(b, k)) in [(13, 1000), (5, 37), (3, 2050)].iter().enumerate() {
            let seed = 7000 + 10 * i as u64;
            let z = Tensor::randn([b, k], 0.0, 2.0, seed, dt, dev)?;
            // Targets in [-0.5, 1) clamped at 0: soft, with many exact zeros.
            let t = Tensor::rand_uniform([b, k], -0.5, 1.0, seed + 1, DType::F32, Device::Cpu)?;
            let t = t.to_f32_vec()?.into_iter().map(|v| v.max(0.0)).collect();
            let t = Tensor::from_f32(t, [b, k], dt, dev)?;
            let g = Tensor::randn([b], 0.0, 1.0, seed + 2, DType::F32, dev)?;
            let (lf, df) = fused_xent(backend, &z, &t, &g)?;
            let (lr, dr) = (softmax_cross_entropy_fwd(&z, &t)?, softmax_cross_entropy_bwd(&z, &t, &g)?);
            for (a, r) in [(&lf, &lr), (&df, &dr)] {
                let e = self_check::relative_error(&a.to_f32_vec()?, &r.to_f32_vec()?) * scale;
                worst = if e.is_nan() || worst.is_nan() { f64::NAN } else { worst.max(e) };
            }
        }
    }
    Ok(worst)
}
