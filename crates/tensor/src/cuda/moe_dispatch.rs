//! CUDA launches of `kernels/moe_dispatch.cu`: V-MoE dispatch, combine and their backward.

use super::launch::{cfg_1d, i64_of, launch, name, MAX_BLOCKS};
use super::{backend_of, output, view, wrap};
use crate::ops::MoeRouting;
use crate::{DType, Result, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

pub(crate) fn dispatch(x: &Tensor, r: &MoeRouting) -> Result<Tensor> {
    const OP: &str = "moe_dispatch";
    let backend = backend_of(x, OP)?;
    let (rows, d) = (r.experts() * r.slots(), x.dims()[1]);
    let shape = Shape::new([rows, d]);
    let mut out = output(&backend, &shape, x.dtype())?;
    if rows * d > 0 {
        let func = backend.function("moe_dispatch.cu", &name(OP, x.dtype()))?;
        let (xv, sv) = (view(x, OP)?, view(r.slot_src(), OP)?);
        let (rows_, d_, k_, s_) = (i64_of(rows), i64_of(d), i64_of(r.k()), i64_of(r.tokens()));
        launch!(backend, func, cfg_1d(rows * d), &xv, &sv, &mut out, &rows_, &d_, &k_, &s_);
    }
    Ok(wrap(&backend, out, shape, x.dtype()))
}

pub(crate) fn combine(src: &Tensor, r: &MoeRouting, weighted: bool) -> Result<Tensor> {
    const OP: &str = "moe_combine";
    let backend = backend_of(src, OP)?;
    let (s, d, rows) = (r.tokens(), src.dims()[1], src.dims()[0]);
    let shape = Shape::new([s, d]);
    let mut y = output(&backend, &shape, src.dtype())?;
    if s * d > 0 {
        let func = backend.function("moe_dispatch.cu", &name(OP, src.dtype()))?;
        let (sv, pv) = (view(src, OP)?, view(r.pos(), OP)?);
        let (s_, d_, k_, rows_) = (i64_of(s), i64_of(d), i64_of(r.k()), i64_of(rows));
        if weighted {
            let wv = view(r.weight(), OP)?;
            launch!(backend, func, cfg_1d(s * d), &sv, &pv, &wv, &mut y, &s_, &d_, &k_, &rows_);
        } else {
            let null = 0u64;
            launch!(backend, func, cfg_1d(s * d), &sv, &pv, &null, &mut y, &s_, &d_, &k_, &rows_);
        }
    }
    Ok(wrap(&backend, y, shape, src.dtype()))
}

pub(crate) fn combine_bwd(out: &Tensor, dy: &Tensor, r: &MoeRouting) -> Result<(Tensor, Tensor)> {
    const OP: &str = "moe_combine_bwd";
    let backend = backend_of(out, OP)?;
    let (s, k, d, rows) = (r.tokens(), r.k(), out.dims()[1], out.dims()[0]);
    let (dshape, wshape) = (Shape::new([rows, d]), Shape::new([s, k]));
    let mut dout = output(&backend, &dshape, out.dtype())?;
    let mut dw = output(&backend, &wshape, DType::F32)?;
    let (s_, d_, k_, rows_) = (i64_of(s), i64_of(d), i64_of(k), i64_of(rows));
    let (dyv, ov, pv, sv, wv) =
        (view(dy, OP)?, view(out, OP)?, view(r.pos(), OP)?, view(r.slot_src(), OP)?, view(r.weight(), OP)?);
    if rows * d > 0 {
        let func = backend.function("moe_dispatch.cu", &name("moe_scale_rows", out.dtype()))?;
        launch!(backend, func, cfg_1d(rows * d), &dyv, &sv, &wv, &mut dout, &rows_, &d_, &k_, &s_);
    }
    if s * k > 0 {
        // One warp per assignment, 8 warps per block.
        let blocks = (s * k).div_ceil(8).min(MAX_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let func = backend.function("moe_dispatch.cu", &name("moe_combine_dweight", out.dtype()))?;
        launch!(backend, func, cfg, &dyv, &ov, &pv, &mut dw, &s_, &d_, &k_, &rows_);
    }
    Ok((wrap(&backend, dout, dshape, out.dtype()), wrap(&backend, dw, wshape, DType::F32)))
}
