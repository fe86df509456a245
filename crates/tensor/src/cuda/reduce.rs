//! CUDA launches of `kernels/reduce.cu`: reductions along one axis (rows or strided lines,
//! chunked column reductions), argmax and its backward, broadcast, top-k.

use super::launch::{cfg_1d, cfg_rows, i64_of, launch, name, MAX_BLOCKS, THREADS_1D};
use super::{backend_of, output, output_zeroed, view, wrap, CudaBackend};
use crate::{op_kinds::ReduceOp, DType, Result, Shape, Tensor};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Enough threads to fill an H100 (132 SMs x 2048), used to split long column reductions.
pub(super) const TARGET_THREADS: usize = 1 << 18;
/// Most chunks a column reduction is split into (grid.y must stay below 65536).
pub(super) const MAX_CHUNKS: usize = 4096;

/// How to split a reduction of `lines` columns of length `n` over chunks of `n`: returns
/// `(chunks, n_per_chunk)`, with `chunks = 0` when `n == 0`.
pub(super) fn chunking(lines: usize, n: usize) -> (usize, usize) {
    if n == 0 {
        return (0, 0);
    }
    let chunks = (TARGET_THREADS / lines.max(1)).clamp(1, n.min(MAX_CHUNKS));
    let per = n.div_ceil(chunks);
    (n.div_ceil(per), per)
}

/// The reduction code of `reduce.cu`'s kernels.
pub(super) fn reduce_code(op: ReduceOp) -> i32 {
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
pub(super) fn reduce_lines_into(
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
pub(super) fn finalize_columns(
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
    // 32 lines per block of 32 × 32 threads (kernels/reduce.cu's FIN_LINES × FIN_SLICES).
    let cfg = LaunchConfig {
        grid_dim: (lines.div_ceil(32).min(MAX_BLOCKS) as u32, 1, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    launch!(backend, func, cfg, part, out, &lines_, &chunks, &n, &op);
    Ok(())
}

/// First index of the maximum of each line of `x` viewed as `[outer, n, inner]`, into `idx` (u32).
pub(super) fn argmax_into(
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
    // Only each line's maximum gets a gradient: the rest must be zero.
    let mut dx = output_zeroed(&backend, x.shape(), x.dtype())?;
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
