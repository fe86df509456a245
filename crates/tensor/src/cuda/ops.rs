//! CUDA launches of the kernels in `kernels/`, one function per op. The `ops` layer has already
//! checked shapes, dtypes and devices; these functions only launch and wrap the outputs.
//! Semantics are exactly those of the CPU reference in `crate::cpu`.
//!
//! Conventions shared with the kernels (see the comment at the top of each `.cu` file):
//! sizes are passed as `i64` (`long long`), flags and small enums as `i32`, scalars as `f32`;
//! outputs are zeroed buffers from [`output`]; 1-D kernels and row kernels loop with a grid
//! stride, so their grids are capped at [`MAX_BLOCKS`]. Nothing is launched for an empty
//! output (a zero-block launch is an error).

use super::{backend_of, cuda_err, output, view, wrap, CudaBackend};
use crate::{
    op_kinds::{Activation, BinaryOp, Gelu, NormKind, ReduceOp},
    DType, Error, Result, Shape, Tensor,
};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Grid cap for the grid-stride kernels (more blocks would only wait for a free SM).
const MAX_BLOCKS: usize = 1 << 20;
/// Threads per block of the 1-D kernels (set by `super::grid_1d`).
const THREADS_1D: usize = 256;
/// Rows per block of the warp-per-row attention kernels (4 warps).
const ATT_ROWS_PER_BLOCK: usize = 4;
/// Largest head_dim the attention kernels hold in registers (32 lanes x 8 columns).
const ATT_MAX_HEAD_DIM: usize = 256;
/// Enough threads to fill an H100 (132 SMs x 2048), used to split long column reductions.
const TARGET_THREADS: usize = 1 << 18;
/// Most chunks a column reduction is split into (grid.y must stay below 65536).
const MAX_CHUNKS: usize = 4096;

/// Launches `func` with `cfg` and the kernel arguments (references: device buffers or scalars
/// bound to locals), mapping a driver error.
macro_rules! launch {
    ($backend:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut builder = $backend.stream.launch_builder(&$func);
        $( builder.arg($arg); )+
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu (pointers to
        // buffers of the sizes passed alongside, then i64 sizes, i32 flags and f32 scalars), and
        // every index the kernel forms stays within those sizes.
        unsafe { builder.launch($cfg) }.map_err(cuda_err)?;
    }};
}

/// A 1-D grid-stride launch over `n` elements.
fn cfg_1d(n: usize) -> LaunchConfig {
    super::grid_1d(n.min(MAX_BLOCKS * THREADS_1D))
}

/// Threads per block for a row of `n` elements: a multiple of 32 in 32..=256.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// One block per row (grid-stride over `rows`), sized for rows of `n` elements.
fn cfg_rows(rows: usize, n: usize) -> LaunchConfig {
    super::grid_rows(rows.min(MAX_BLOCKS), row_threads(n), 0)
}

/// One warp per row for the attention kernels.
fn cfg_warp_rows(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(ATT_ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * ATT_ROWS_PER_BLOCK as u32, 1, 1), shared_mem_bytes: 0 }
}

/// How to split a reduction of `lines` columns of length `n` over chunks of `n`: returns
/// `(chunks, n_per_chunk)`, with `chunks = 0` when `n == 0`.
fn chunking(lines: usize, n: usize) -> (usize, usize) {
    if n == 0 {
        return (0, 0);
    }
    let chunks = (TARGET_THREADS / lines.max(1)).clamp(1, n.min(MAX_CHUNKS));
    let per = n.div_ceil(chunks);
    (n.div_ceil(per), per)
}

fn name(op: &str, dtype: DType) -> String {
    format!("{op}_{}", dtype.kernel_suffix())
}

fn i64_of(n: usize) -> i64 {
    n as i64
}

fn reduce_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
    }
}

/// Column reduction of `x` viewed as `[outer, n, inner]` (inner may be 1) into `out`
/// (`[outer, inner]` of `dtype`): f32 partial results over chunks of `n` (reduce.cu's
/// `reduce_lines`), then the chunks folded in order (`reduce_finalize`).
#[allow(clippy::too_many_arguments)]
fn reduce_lines_into(
    backend: &Arc<CudaBackend>,
    x: &CudaView<'_, u8>,
    dtype: DType,
    outer: usize,
    n: usize,
    inner: usize,
    op: i32,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let lines = outer * inner;
    if lines == 0 {
        return Ok(());
    }
    let (chunks, per) = chunking(lines, n);
    let mut part = backend.alloc(chunks * lines * 4)?;
    if chunks > 0 {
        let func = backend.function("reduce.cu", &name("reduce_lines", dtype))?;
        let cfg = LaunchConfig {
            grid_dim: (lines.div_ceil(THREADS_1D).clamp(1, MAX_BLOCKS) as u32, chunks as u32, 1),
            block_dim: (THREADS_1D as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (outer, n_, inner, per) = (i64_of(outer), i64_of(n), i64_of(inner), i64_of(per));
        launch!(backend, func, cfg, x, &mut part, &outer, &n_, &inner, &per, &op);
    }
    finalize_columns(backend, &part, dtype, lines, chunks, n, op, out)
}

/// `out[l] = fold over c of part[c, l]` (f32 `[chunks, lines]` -> `dtype`), divided by `n` for a mean.
#[allow(clippy::too_many_arguments)]
fn finalize_columns(
    backend: &Arc<CudaBackend>,
    part: &CudaSlice<u8>,
    dtype: DType,
    lines: usize,
    chunks: usize,
    n: usize,
    op: i32,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    if lines == 0 {
        return Ok(());
    }
    let func = backend.function("reduce.cu", &name("reduce_finalize", dtype))?;
    let (lines_, chunks, n) = (i64_of(lines), i64_of(chunks), i64_of(n));
    launch!(backend, func, cfg_1d(lines), part, out, &lines_, &chunks, &n, &op);
    Ok(())
}

/// First index of the maximum of each line of `x` viewed as `[outer, n, inner]`, into `idx` (u32).
fn argmax_into(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    outer: usize,
    n: usize,
    inner: usize,
    idx: &mut CudaSlice<u8>,
) -> Result<()> {
    let lines = outer * inner;
    if lines == 0 {
        return Ok(());
    }
    let xv = view(x, "argmax")?;
    if inner == 1 {
        let func = backend.function("reduce.cu", &name("argmax_rows", x.dtype()))?;
        let (rows, n_) = (i64_of(outer), i64_of(n));
        launch!(backend, func, cfg_rows(outer, n), &xv, idx, &rows, &n_);
    } else {
        let func = backend.function("reduce.cu", &name("argmax_lines", x.dtype()))?;
        let (outer_, n_, inner_) = (i64_of(outer), i64_of(n), i64_of(inner));
        launch!(backend, func, cfg_1d(lines), &xv, idx, &outer_, &n_, &inner_);
    }
    Ok(())
}

/// `x`'s dims without the last one (the shape of per-row statistics).
fn without_last(x: &Tensor) -> Vec<usize> {
    x.dims()[..x.rank().saturating_sub(1)].to_vec()
}

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
        let func = backend
            .function("elementwise.cu", &format!("cast_{}_{}", x.dtype().kernel_suffix(), dtype.kernel_suffix()))?;
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
        let func = backend.function("elementwise.cu", &name(op_name, a.dtype()))?;
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
        let func = backend.function("elementwise.cu", &name("scale", x.dtype()))?;
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
        let func = backend.function("elementwise.cu", &name("bias_add", x.dtype()))?;
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
        let func = backend.function("elementwise.cu", &name("act_fwd", x.dtype()))?;
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
        let func = backend.function("elementwise.cu", &name("act_bwd", x.dtype()))?;
        let (xv, dyv) = (view(x, OP)?, view(dy, OP)?);
        let (n_, code) = (i64_of(n), activation_code(kind));
        launch!(backend, func, cfg_1d(n), &xv, &dyv, &mut out, &n_, &code);
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}

/// Returns `(y, mean [rows] f32, rstd [rows] f32)`.
pub(crate) fn layer_norm_fwd(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm_fwd";
    let backend = backend_of(x, OP)?;
    let (d, rows) = (x.shape().last(), x.shape().rows());
    let stat_shape = Shape::new(without_last(x));
    let mut y = output(&backend, x.shape(), x.dtype())?;
    let mut mean = output(&backend, &stat_shape, DType::F32)?;
    let mut rstd = output(&backend, &stat_shape, DType::F32)?;
    // With d == 0 the CPU reference returns zero statistics; the zeroed buffers are exactly that.
    if rows > 0 && d > 0 {
        let func = backend.function("norm.cu", &name(OP, x.dtype()))?;
        let xv = view(x, OP)?;
        // An absent weight or bias is flagged off; x stands in as a (never read) pointer.
        let wv = view(weight.unwrap_or(x), OP)?;
        let bv = view(bias.unwrap_or(x), OP)?;
        let (rows_, d_) = (i64_of(rows), i64_of(d));
        let rms = i32::from(kind == NormKind::Rms);
        let (has_w, has_b) = (i32::from(weight.is_some()), i32::from(bias.is_some()));
        launch!(
            backend,
            func,
            cfg_rows(rows, d),
            &xv,
            &wv,
            &bv,
            &mut y,
            &mut mean,
            &mut rstd,
            &rows_,
            &d_,
            &eps,
            &rms,
            &has_w,
            &has_b
        );
    }
    Ok((
        wrap(&backend, y, x.shape().clone(), x.dtype()),
        wrap(&backend, mean, stat_shape.clone(), DType::F32),
        wrap(&backend, rstd, stat_shape, DType::F32),
    ))
}

/// Returns `(dx, dweight, dbias)`; dweight iff weight is given, dbias iff `with_bias`.
pub(crate) fn layer_norm_bwd(
    x: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    kind: NormKind,
    with_bias: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "layer_norm_bwd";
    let backend = backend_of(x, OP)?;
    let (d, rows) = (x.shape().last(), x.shape().rows());
    // The ops layer checks weight has x's dtype, so the parameter gradients share it.
    let pdtype = weight.map_or(x.dtype(), |w| w.dtype());
    let pshape = Shape::new([d]);
    let mut dx = output(&backend, x.shape(), x.dtype())?;
    let mut dw = output(&backend, &pshape, pdtype)?;
    let mut db = output(&backend, &pshape, pdtype)?;
    if rows > 0 && d > 0 {
        let (xv, mv, rv, dyv) = (view(x, OP)?, view(mean, OP)?, view(rstd, OP)?, view(dy, OP)?);
        let wv = view(weight.unwrap_or(x), OP)?;
        let (rows_, d_) = (i64_of(rows), i64_of(d));
        let rms = i32::from(kind == NormKind::Rms);
        let has_w = i32::from(weight.is_some());
        let func = backend.function("norm.cu", &name(OP, x.dtype()))?;
        launch!(backend, func, cfg_rows(rows, d), &xv, &wv, &mv, &rv, &dyv, &mut dx, &rows_, &d_, &rms, &has_w);

        if weight.is_some() || with_bias {
            let (chunks, per) = chunking(d, rows);
            let mut dw_part = backend.alloc(chunks * d * 4)?;
            let mut db_part = backend.alloc(chunks * d * 4)?;
            let func = backend.function("norm.cu", &name("layer_norm_bwd_params", x.dtype()))?;
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(THREADS_1D) as u32, chunks as u32, 1),
                block_dim: (THREADS_1D as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let per_ = i64_of(per);
            launch!(backend, func, cfg, &xv, &mv, &rv, &dyv, &mut dw_part, &mut db_part, &rows_, &d_, &per_);
            let sum = reduce_code(ReduceOp::Sum);
            if weight.is_some() {
                finalize_columns(&backend, &dw_part, pdtype, d, chunks, rows, sum, &mut dw)?;
            }
            if with_bias {
                finalize_columns(&backend, &db_part, pdtype, d, chunks, rows, sum, &mut db)?;
            }
        }
    }
    Ok((
        wrap(&backend, dx, x.shape().clone(), x.dtype()),
        weight.map(|_| wrap(&backend, dw, pshape.clone(), pdtype)),
        with_bias.then(|| wrap(&backend, db, pshape, pdtype)),
    ))
}

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

/// `(batch·heads, queries, keys, head_dim)` of an attention call, with head_dim checked.
fn attention_dims(op: &'static str, q: &Tensor, k: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (qd, kd) = (q.dims(), k.dims());
    let d = qd[3];
    if d > ATT_MAX_HEAD_DIM {
        return Err(Error::shape(
            op,
            format!("the CUDA attention kernels support head_dim <= {ATT_MAX_HEAD_DIM}, got q {}", q.shape()),
        ));
    }
    Ok((qd[0] * qd[1], qd[2], kd[2], d))
}

/// Returns `(o, lse)`.
pub(crate) fn attention_fwd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_fwd";
    let backend = backend_of(q, OP)?;
    let (bh, n, m, d) = attention_dims(OP, q, k)?;
    let lse_shape = Shape::new(q.dims()[..3].to_vec());
    let mut o = output(&backend, q.shape(), q.dtype())?;
    let mut lse = output(&backend, &lse_shape, DType::F32)?;
    if bh * n > 0 {
        let func = backend.function("attention.cu", &name(OP, q.dtype()))?;
        let (qv, kv, vv) = (view(q, OP)?, view(k, OP)?, view(v, OP)?);
        let (bh_, n_, m_, d_) = (i64_of(bh), i64_of(n), i64_of(m), d as i32);
        launch!(backend, func, cfg_warp_rows(bh * n), &qv, &kv, &vv, &mut o, &mut lse, &bh_, &n_, &m_, &d_, &scale);
    }
    Ok((wrap(&backend, o, q.shape().clone(), q.dtype()), wrap(&backend, lse, lse_shape, DType::F32)))
}

/// Returns `(dq, dk, dv)`.
pub(crate) fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_bwd";
    let backend = backend_of(q, OP)?;
    let (bh, n, m, d) = attention_dims(OP, q, k)?;
    let mut dq = output(&backend, q.shape(), q.dtype())?;
    let mut dk = output(&backend, k.shape(), q.dtype())?;
    let mut dv = output(&backend, v.shape(), q.dtype())?;
    // delta_i = d_o_i · o_i, written by the dq kernel and read by the dk/dv kernel.
    let mut delta = backend.alloc(bh * n * 4)?;
    let (qv, kv, vv) = (view(q, OP)?, view(k, OP)?, view(v, OP)?);
    let (ov, lv, dov) = (view(o, OP)?, view(lse, OP)?, view(d_o, OP)?);
    let (bh_, n_, m_, d_) = (i64_of(bh), i64_of(n), i64_of(m), d as i32);
    if bh * n > 0 {
        let func = backend.function("attention.cu", &name("attention_bwd_dq", q.dtype()))?;
        launch!(
            backend,
            func,
            cfg_warp_rows(bh * n),
            &qv,
            &kv,
            &vv,
            &ov,
            &lv,
            &dov,
            &mut dq,
            &mut delta,
            &bh_,
            &n_,
            &m_,
            &d_,
            &scale
        );
    }
    if bh * m > 0 {
        let func = backend.function("attention.cu", &name("attention_bwd_dkv", q.dtype()))?;
        launch!(
            backend,
            func,
            cfg_warp_rows(bh * m),
            &qv,
            &kv,
            &vv,
            &lv,
            &dov,
            &delta,
            &mut dk,
            &mut dv,
            &bh_,
            &n_,
            &m_,
            &d_,
            &scale
        );
    }
    Ok((
        wrap(&backend, dq, q.shape().clone(), q.dtype()),
        wrap(&backend, dk, k.shape().clone(), q.dtype()),
        wrap(&backend, dv, v.shape().clone(), q.dtype()),
    ))
}

/// `x`'s dims without `dim`.
fn without_dim(x: &Tensor, dim: usize) -> Vec<usize> {
    let mut out = x.dims().to_vec();
    out.remove(dim);
    out
}

pub(crate) fn reduce(x: &Tensor, dim: usize, op: ReduceOp) -> Result<Tensor> {
    const OP: &str = "reduce";
    let backend = backend_of(x, OP)?;
    let (outer, n, inner) = x.shape().split_at_dim(dim);
    let shape = Shape::new(without_dim(x, dim));
    let mut out = output(&backend, &shape, x.dtype())?;
    let code = reduce_code(op);
    if inner == 1 {
        if outer > 0 {
            let func = backend.function("reduce.cu", &name("reduce_rows", x.dtype()))?;
            let xv = view(x, OP)?;
            let (rows_, n_) = (i64_of(outer), i64_of(n));
            launch!(backend, func, cfg_rows(outer, n), &xv, &mut out, &rows_, &n_, &code);
        }
    } else {
        let xv = view(x, OP)?;
        reduce_lines_into(&backend, &xv, x.dtype(), outer, n, inner, code, &mut out)?;
    }
    Ok(wrap(&backend, out, shape, x.dtype()))
}

pub(crate) fn argmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let backend = backend_of(x, "argmax")?;
    let (outer, n, inner) = x.shape().split_at_dim(dim);
    let shape = Shape::new(without_dim(x, dim));
    let mut out = output(&backend, &shape, DType::U32)?;
    argmax_into(&backend, x, outer, n, inner, &mut out)?;
    Ok(wrap(&backend, out, shape, DType::U32))
}

/// `dy` (shape of x with `dim` removed) broadcast back along `dim` of size `n`, times `scale`.
pub(crate) fn broadcast_along(dy: &Tensor, dim: usize, n: usize, scale: f32) -> Result<Tensor> {
    const OP: &str = "broadcast_along";
    let backend = backend_of(dy, OP)?;
    let outer: usize = dy.dims()[..dim].iter().product();
    let inner: usize = dy.dims()[dim..].iter().product();
    let mut dims = dy.dims().to_vec();
    dims.insert(dim, n);
    let shape = Shape::new(dims);
    let mut out = output(&backend, &shape, dy.dtype())?;
    let total = shape.numel();
    if total > 0 {
        let func = backend.function("reduce.cu", &name(OP, dy.dtype()))?;
        let dyv = view(dy, OP)?;
        let (outer_, n_, inner_) = (i64_of(outer), i64_of(n), i64_of(inner));
        launch!(backend, func, cfg_1d(total), &dyv, &mut out, &outer_, &n_, &inner_, &scale);
    }
    Ok(wrap(&backend, out, shape, dy.dtype()))
}

pub(crate) fn max_bwd(x: &Tensor, dy: &Tensor, dim: usize) -> Result<Tensor> {
    const OP: &str = "max_bwd";
    let backend = backend_of(x, OP)?;
    let (outer, n, inner) = x.shape().split_at_dim(dim);
    let mut dx = output(&backend, x.shape(), x.dtype())?;
    let lines = outer * inner;
    if lines > 0 && n > 0 {
        let mut idx = backend.alloc(lines * 4)?;
        argmax_into(&backend, x, outer, n, inner, &mut idx)?;
        let func = backend.function("reduce.cu", &name(OP, x.dtype()))?;
        let dyv = view(dy, OP)?;
        let (lines_, n_, inner_) = (i64_of(lines), i64_of(n), i64_of(inner));
        launch!(backend, func, cfg_1d(lines), &idx, &dyv, &mut dx, &lines_, &n_, &inner_);
    }
    Ok(wrap(&backend, dx, x.shape().clone(), x.dtype()))
}

pub(crate) fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "topk";
    let backend = backend_of(x, OP)?;
    let (n, rows) = (x.shape().last(), x.shape().rows());
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = k;
    }
    let shape = Shape::new(dims);
    let mut values = output(&backend, &shape, x.dtype())?;
    let mut indices = output(&backend, &shape, DType::U32)?;
    if rows > 0 && k > 0 {
        let func = backend.function("reduce.cu", &name(OP, x.dtype()))?;
        let xv = view(x, OP)?;
        let (rows_, n_, k_) = (i64_of(rows), i64_of(n), i64_of(k));
        launch!(backend, func, cfg_rows(rows, n), &xv, &mut values, &mut indices, &rows_, &n_, &k_);
    }
    Ok((wrap(&backend, values, shape.clone(), x.dtype()), wrap(&backend, indices, shape, DType::U32)))
}

pub(crate) fn gather_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let backend = backend_of(src, OP)?;
    let (m, d) = (idx.numel(), src.dims()[1]);
    let shape = Shape::new([m, d]);
    let mut out = output(&backend, &shape, src.dtype())?;
    if m * d > 0 {
        let func = backend.function("index.cu", &name(OP, src.dtype()))?;
        let (sv, iv) = (view(src, OP)?, view(idx, OP)?);
        let (m_, d_) = (i64_of(m), i64_of(d));
        launch!(backend, func, cfg_1d(m * d), &sv, &iv, &mut out, &m_, &d_);
    }
    Ok(wrap(&backend, out, shape, src.dtype()))
}

pub(crate) fn scatter_add_rows(src: &Tensor, idx: &Tensor, n: usize) -> Result<Tensor> {
    const OP: &str = "scatter_add_rows";
    let backend = backend_of(src, OP)?;
    let (m, d) = (src.dims()[0], src.dims()[1]);
    let shape = Shape::new([n, d]);
    // f32 accumulator [n, d]; for f32 sources it is the output itself.
    let mut acc = output(&backend, &shape, DType::F32)?;
    if m * d > 0 {
        let func = backend.function("index.cu", &name(OP, src.dtype()))?;
        let (sv, iv) = (view(src, OP)?, view(idx, OP)?);
        let (m_, d_) = (i64_of(m), i64_of(d));
        launch!(backend, func, cfg_1d(m * d), &sv, &iv, &mut acc, &m_, &d_);
    }
    let acc = wrap(&backend, acc, shape, DType::F32);
    if src.dtype() == DType::F32 {
        Ok(acc)
    } else {
        cast(&acc, src.dtype())
    }
}

pub(crate) fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    const OP: &str = "patchify";
    let backend = backend_of(images, OP)?;
    let d = images.dims();
    let (b, c, h, w) = (d[0], d[1], d[2], d[3]);
    let shape = Shape::new([b, (h / p) * (w / p), c * p * p]);
    let mut out = output(&backend, &shape, images.dtype())?;
    let total = images.numel();
    if total > 0 {
        let func = backend.function("patch.cu", &name(OP, images.dtype()))?;
        let iv = view(images, OP)?;
        let (b_, c_, h_, w_, p_) = (i64_of(b), i64_of(c), i64_of(h), i64_of(w), i64_of(p));
        launch!(backend, func, cfg_1d(total), &iv, &mut out, &b_, &c_, &h_, &w_, &p_);
    }
    Ok(wrap(&backend, out, shape, images.dtype()))
}

pub(crate) fn unpatchify(patches: &Tensor, channels: usize, height: usize, width: usize, p: usize) -> Result<Tensor> {
    const OP: &str = "unpatchify";
    let backend = backend_of(patches, OP)?;
    let b = patches.dims()[0];
    let shape = Shape::new([b, channels, height, width]);
    let mut out = output(&backend, &shape, patches.dtype())?;
    let total = shape.numel();
    if total > 0 {
        let func = backend.function("patch.cu", &name(OP, patches.dtype()))?;
        let pv = view(patches, OP)?;
        let (b_, c_, h_, w_, p_) = (i64_of(b), i64_of(channels), i64_of(height), i64_of(width), i64_of(p));
        launch!(backend, func, cfg_1d(total), &pv, &mut out, &b_, &c_, &h_, &w_, &p_);
    }
    Ok(wrap(&backend, out, shape, patches.dtype()))
}
