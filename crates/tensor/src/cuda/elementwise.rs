//! CUDA launches of `kernels/elementwise.cu`: casts, binary ops, scale, bias add (and its
//! backward, a column reduction from `reduce.cu`), activations.

use super::launch::{cfg_1d, i64_of, launch, name};
use super::norm::dtype_tolerance;
use super::reduce::{chunking, finalize_columns, reduce_code, reduce_lines_into};
use super::v32::kernel_name;
use super::{backend_of, output, self_check, view, wrap, CudaBackend};
use crate::{
    op_kinds::{Activation, BinaryOp, Gelu, ReduceOp},
    DType, Device, Error, Result, Shape, Tensor,
};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

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

/// The self-check name of `act_bwd_colsum` (`vit devices`).
const ACT_BWD_COLSUM: &str = "act_bwd_bias_grad";

/// `dy · act'(x)` and its column sums in one pass over `x, dy [rows, cols]`: returns
/// `(dx [rows, cols], db [cols])` (db in the inputs' dtype, summed in f32 over the stored dx, in
/// a fixed order), the MLP's GELU backward with the bias gradient of the layer before it. `None`
/// where the fused kernel does not apply (the caller composes `activation_bwd` and
/// `bias_add_bwd`): columns not a multiple of 16 bytes, views not 16-byte aligned, 2^31 elements
/// or more, or its self-check failed on this device. In bf16 the derivative uses the hardware
/// tanh (kernels/elementwise.cu).
pub(crate) fn activation_bwd_bias_grad(x: &Tensor, dy: &Tensor, kind: Activation) -> Result<Option<(Tensor, Tensor)>> {
    const OP: &str = "activation_bwd_bias_grad";
    let backend = backend_of(x, OP)?;
    if !colsum_applies(x, dy) || !colsum_ok(&backend) {
        return Ok(None);
    }
    act_bwd_colsum(&backend, x, dy, kind).map(Some)
}

/// Whether `act_bwd_colsum` can run on these operands (see [`activation_bwd_bias_grad`]).
fn colsum_applies(x: &Tensor, dy: &Tensor) -> bool {
    let width = 16 / x.dtype().size_in_bytes();
    let cols = x.shape().last();
    x.dtype().is_float()
        && x.dtype() == dy.dtype()
        && x.device() == dy.device()
        && x.shape() == dy.shape()
        && x.rank() >= 1
        && cols > 0
        && cols.is_multiple_of(width)
        && x.numel() < (1 << 31)
        && [x, dy].iter().all(|t| t.cuda_storage("activation_bwd_bias_grad").is_ok_and(|(_, b)| b % 16 == 0))
}

fn act_bwd_colsum(backend: &Arc<CudaBackend>, x: &Tensor, dy: &Tensor, kind: Activation) -> Result<(Tensor, Tensor)> {
    const OP: &str = "activation_bwd_bias_grad";
    let dtype = x.dtype();
    let (rows, cols) = (x.shape().rows(), x.shape().last());
    let mut dx = output(backend, x.shape(), dtype)?;
    let db_shape = Shape::new([cols]);
    let mut db = output(backend, &db_shape, dtype)?;
    // One thread per 16 bytes of a row; chunks of rows so the whole GPU is busy.
    let lanes = cols / (16 / dtype.size_in_bytes());
    let (chunks, per) = chunking(lanes, rows);
    if chunks > 0 {
        let mut part = backend.alloc_uninit(chunks * cols * 4)?;
        let func = backend.function("elementwise.cu", &name("act_bwd_colsum", dtype))?;
        const THREADS: usize = 128;
        let cfg = LaunchConfig {
            grid_dim: (lanes.div_ceil(THREADS) as u32, chunks as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xv, dyv) = (view(x, OP)?, view(dy, OP)?);
        let (rows_, cols_, per_, code) = (i64_of(rows), i64_of(cols), i64_of(per), activation_code(kind));
        launch!(backend, func, cfg, &xv, &dyv, &mut dx, &mut part, &rows_, &cols_, &per_, &code);
        finalize_columns(backend, &part, dtype, cols, chunks, rows, reduce_code(ReduceOp::Sum), &mut db)?;
    } else {
        // No rows: every column sum is 0.
        let zero = Tensor::zeros([cols], dtype, x.device())?;
        return Ok((wrap(backend, dx, x.shape().clone(), dtype), zero));
    }
    Ok((wrap(backend, dx, x.shape().clone(), dtype), wrap(backend, db, db_shape, dtype)))
}

/// Whether the fused activation backward with column sums may be used on `backend` (its
/// check runs on first use).
pub(crate) fn colsum_ok(backend: &Arc<CudaBackend>) -> bool {
    let b = backend.clone();
    backend.fast_kernel_ok(ACT_BWD_COLSUM, dtype_tolerance(DType::BF16), || check_colsum(&b))
}

/// The fused kernel against the f32 composition (`activation_bwd`, `bias_add_bwd`) on odd row
/// counts, every activation, in f32, bf16 and f16; the worst relative error, each dtype's scaled
/// to the bf16 tolerance.
fn check_colsum(backend: &Arc<CudaBackend>) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for (i, dt) in [DType::F32, DType::BF16, DType::F16].into_iter().enumerate() {
        let scale = dtype_tolerance(DType::BF16) / dtype_tolerance(dt);
        for (j, kind) in
            [Activation::Gelu(Gelu::Tanh), Activation::Gelu(Gelu::Erf), Activation::Tanh].into_iter().enumerate()
        {
            let seed = 7000 + 10 * (3 * i + j) as u64;
            let x = Tensor::randn([3, 37, 136], 0.0, 1.5, seed, dt, dev)?;
            let dy = Tensor::randn([3, 37, 136], 0.0, 1.0, seed + 1, dt, dev)?;
            let (dx, db) = act_bwd_colsum(backend, &x, &dy, kind)?;
            let want = activation_bwd(&x.cast(DType::F32)?, &dy.cast(DType::F32)?, kind)?;
            let want_db = bias_add_bwd(&want)?;
            for (got, want) in [(&dx, &want), (&db, &want_db)] {
                let e = self_check::relative_error(&got.to_f32_vec()?, &want.to_f32_vec()?) * scale;
                worst = if e.is_nan() || worst.is_nan() { f64::NAN } else { worst.max(e) };
            }
        }
    }
    Ok(worst)
}
