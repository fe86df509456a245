//! CUDA launches of `kernels/norm.cu`: LayerNorm and RMSNorm, forward and backward.

use super::launch::{cfg_rows, i64_of, launch, name, THREADS_1D};
use super::reduce::{chunking, finalize_columns, reduce_code};
use super::{backend_of, output, view, wrap};
use crate::{
    op_kinds::{NormKind, ReduceOp},
    DType, Result, Shape, Tensor,
};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `x`'s dims without the last one (the shape of per-row statistics).
fn without_last(x: &Tensor) -> Vec<usize> {
    x.dims()[..x.rank().saturating_sub(1)].to_vec()
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
