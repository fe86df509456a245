//! CUDA launches of `kernels/norm.cu`: LayerNorm and RMSNorm, forward and backward, with the
//! residual add optionally folded in (`h = x + r` before the norm, `dh = dnorm + dres` after).
//!
//! Two paths with the same semantics. The fast path (`ln_fwd_fast`, `ln_bwd_fast`: one row per
//! warp or block, 16-byte vector loads, dx, dγ and dβ in one pass with per-block partials
//! reduced in a fixed order) is used on a device once it has matched the reference path there
//! (`layer_norm_fused` in [`super::self_check`]); the reference path (`layer_norm_fwd`,
//! `layer_norm_bwd`, `layer_norm_bwd_params`, and a separate add for the residual) otherwise.

use super::elementwise::binary;
use super::launch::{cfg_rows, i64_of, launch, name, MAX_BLOCKS, THREADS_1D};
use super::reduce::{chunking, finalize_columns, reduce_code};
use super::{backend_of, output, self_check, view, wrap, CudaBackend};
use crate::{
    op_kinds::{BinaryOp, NormKind, ReduceOp},
    DType, Device, Result, Shape, Tensor,
};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The self-check's name of the fast path (listed by `vit devices`).
pub(crate) const FAST_KERNEL: &str = "layer_norm_fused";
/// Relative L2 error the fast path may have against the reference on its f32 check problem.
const FAST_TOLERANCE: f64 = 1e-5;
/// Rows of at most this width go one per warp, wider ones one per block.
const WARP_ROW_MAX: usize = 1024;
/// Warps (rows in flight) per block in the one-row-per-warp mode.
const WARPS_PER_BLOCK: usize = 4;
/// Threads per block in the one-row-per-block mode.
const BLOCK_ROW_THREADS: usize = 256;
/// Most blocks of the fused backward: each writes one `[d]` row of dγ and dβ partials.
const BWD_MAX_BLOCKS: usize = 1024;
/// Shared memory the fused backward may use per block (the default limit, no opt-in).
const BWD_MAX_SMEM: usize = 48 * 1024;

/// `x`'s dims without the last one (the shape of per-row statistics).
fn without_last(x: &Tensor) -> Vec<usize> {
    x.dims()[..x.rank().saturating_sub(1)].to_vec()
}

/// Which kernels compute a norm.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Fast,
    Reference,
}

/// The fast path if it has passed its check on `backend` (running the check on first use).
fn path(backend: &Arc<CudaBackend>) -> Path {
    if fast_ok(backend) {
        Path::Fast
    } else {
        Path::Reference
    }
}

/// How the fast kernels lay rows on the grid: `(per_warp, rows per block, threads per block)`.
fn layout(d: usize) -> (bool, usize, usize) {
    if d <= WARP_ROW_MAX {
        (true, WARPS_PER_BLOCK, WARPS_PER_BLOCK * 32)
    } else {
        (false, 1, BLOCK_ROW_THREADS)
    }
}

/// What the forward returns: `(h = x + r if r is given, y, mean [rows] f32, rstd [rows] f32)`.
pub(crate) type FwdOut = (Option<Tensor>, Tensor, Tensor, Tensor);

/// LayerNorm forward of `x + residual` (or `x`): see [`FwdOut`].
pub(crate) fn layer_norm_fwd(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<FwdOut> {
    let backend = backend_of(x, "layer_norm_fwd")?;
    fwd_on(path(&backend), &backend, x, residual, weight, bias, eps, kind)
}

#[allow(clippy::too_many_arguments)]
fn fwd_on(
    path: Path,
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<FwdOut> {
    if path == Path::Reference {
        let h = residual.map(|r| binary(x, r, BinaryOp::Add)).transpose()?;
        let (y, mean, rstd) = reference_fwd(backend, h.as_ref().unwrap_or(x), weight, bias, eps, kind)?;
        return Ok((h, y, mean, rstd));
    }
    const OP: &str = "ln_fwd_fast";
    let (d, rows) = (x.shape().last(), x.shape().rows());
    let stat_shape = Shape::new(without_last(x));
    // h only with a residual (else a never-written placeholder).
    let h_shape = if residual.is_some() { x.shape().clone() } else { Shape::new([1]) };
    let mut h = output(backend, &h_shape, x.dtype())?;
    let mut y = output(backend, x.shape(), x.dtype())?;
    let mut mean = output(backend, &stat_shape, DType::F32)?;
    let mut rstd = output(backend, &stat_shape, DType::F32)?;
    if rows > 0 && d > 0 {
        let func = backend.function("norm.cu", &name(OP, x.dtype()))?;
        // Absent tensors are flagged off; x stands in as a (never read) pointer.
        let xv = view(x, OP)?;
        let rv = view(residual.unwrap_or(x), OP)?;
        let wv = view(weight.unwrap_or(x), OP)?;
        let bv = view(bias.unwrap_or(x), OP)?;
        let (per_warp, per_block, threads) = layout(d);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(per_block).min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_, d_) = (i64_of(rows), d as i32);
        let rms = i32::from(kind == NormKind::Rms);
        let (has_r, has_w, has_b) =
            (i32::from(residual.is_some()), i32::from(weight.is_some()), i32::from(bias.is_some()));
        let per_warp = i32::from(per_warp);
        launch!(
            backend, func, cfg, &xv, &rv, &mut h, &wv, &bv, &mut y, &mut mean, &mut rstd, &rows_, &d_, &eps, &rms,
            &has_r, &has_w, &has_b, &per_warp
        );
    }
    Ok((
        residual.map(|_| wrap(backend, h, x.shape().clone(), x.dtype())),
        wrap(backend, y, x.shape().clone(), x.dtype()),
        wrap(backend, mean, stat_shape.clone(), DType::F32),
        wrap(backend, rstd, stat_shape, DType::F32),
    ))
}

/// The reference forward kernel: `(y, mean, rstd)`.
fn reference_fwd(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm_fwd";
    let (d, rows) = (x.shape().last(), x.shape().rows());
    let stat_shape = Shape::new(without_last(x));
    let mut y = output(backend, x.shape(), x.dtype())?;
    let mut mean = output(backend, &stat_shape, DType::F32)?;
    let mut rstd = output(backend, &stat_shape, DType::F32)?;
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
        wrap(backend, y, x.shape().clone(), x.dtype()),
        wrap(backend, mean, stat_shape.clone(), DType::F32),
        wrap(backend, rstd, stat_shape, DType::F32),
    ))
}

/// What the backward returns: `(dx, dweight iff weight is given, dbias iff with_bias)`.
pub(crate) type BwdOut = (Tensor, Option<Tensor>, Option<Tensor>);

/// The outputs of a LayerNorm backward: `dx` like `x`, and `dw`, `db` `[d]` in the parameters'
/// dtype (the ops layer checks the weight has x's dtype).
struct BwdBuffers {
    dx: CudaSlice<u8>,
    dw: CudaSlice<u8>,
    db: CudaSlice<u8>,
    pdtype: DType,
}

impl BwdBuffers {
    fn new(backend: &Arc<CudaBackend>, x: &Tensor, weight: Option<&Tensor>) -> Result<Self> {
        let pdtype = weight.map_or(x.dtype(), |w| w.dtype());
        let pshape = Shape::new([x.shape().last()]);
        Ok(BwdBuffers {
            dx: output(backend, x.shape(), x.dtype())?,
            dw: output(backend, &pshape, pdtype)?,
            db: output(backend, &pshape, pdtype)?,
            pdtype,
        })
    }

    /// Sums the f32 partials `[chunks, d]` of dγ (`want_w`) and dβ (`want_b`) into `dw`, `db`.
    #[allow(clippy::too_many_arguments)]
    fn finalize(
        &mut self,
        backend: &Arc<CudaBackend>,
        (dw_part, db_part): (&CudaSlice<u8>, &CudaSlice<u8>),
        d: usize,
        chunks: usize,
        rows: usize,
        want_w: bool,
        want_b: bool,
    ) -> Result<()> {
        let sum = reduce_code(ReduceOp::Sum);
        if want_w {
            finalize_columns(backend, dw_part, self.pdtype, d, chunks, rows, sum, &mut self.dw)?;
        }
        if want_b {
            finalize_columns(backend, db_part, self.pdtype, d, chunks, rows, sum, &mut self.db)?;
        }
        Ok(())
    }

    /// `(dx, dw, db)` as tensors, the parameter gradients where asked for.
    fn wrap(self, backend: &Arc<CudaBackend>, x: &Tensor, want_w: bool, want_b: bool) -> BwdOut {
        let pshape = Shape::new([x.shape().last()]);
        (
            wrap(backend, self.dx, x.shape().clone(), x.dtype()),
            want_w.then(|| wrap(backend, self.dw, pshape.clone(), self.pdtype)),
            want_b.then(|| wrap(backend, self.db, pshape, self.pdtype)),
        )
    }
}

/// LayerNorm backward; with `dres` (the gradient reaching the norm's input by the residual
/// stream, `x`'s shape) `dx` is the total gradient `dnorm + dres`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_bwd(
    x: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dres: Option<&Tensor>,
    kind: NormKind,
    with_bias: bool,
) -> Result<BwdOut> {
    let backend = backend_of(x, "layer_norm_bwd")?;
    bwd_on(path(&backend), &backend, x, weight, mean, rstd, dy, dres, kind, with_bias)
}

/// Shared memory of the fused backward for rows of width `d`, `None` when over the limit.
fn bwd_smem(d: usize, want_params: bool) -> Option<usize> {
    if !want_params {
        return Some(0);
    }
    let (_, per_block, _) = layout(d);
    let bytes = per_block * 2 * d * 4;
    (bytes <= BWD_MAX_SMEM).then_some(bytes)
}

#[allow(clippy::too_many_arguments)]
fn bwd_on(
    path: Path,
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dres: Option<&Tensor>,
    kind: NormKind,
    with_bias: bool,
) -> Result<BwdOut> {
    const OP: &str = "ln_bwd_fast";
    let (d, rows) = (x.shape().last(), x.shape().rows());
    let want_params = weight.is_some() || with_bias;
    let smem = match (path, bwd_smem(d, want_params)) {
        (Path::Fast, Some(smem)) => smem,
        _ => {
            let (dx, dw, db) = reference_bwd(backend, x, weight, mean, rstd, dy, kind, with_bias)?;
            let dx = match dres {
                Some(r) => binary(r, &dx, BinaryOp::Add)?,
                None => dx,
            };
            return Ok((dx, dw, db));
        }
    };
    let mut out = BwdBuffers::new(backend, x, weight)?;
    if rows > 0 && d > 0 {
        let (per_warp, per_block, threads) = layout(d);
        let blocks = rows.div_ceil(per_block).min(if want_params { BWD_MAX_BLOCKS } else { MAX_BLOCKS });
        let part_len = if want_params { blocks * d } else { 1 };
        let mut dw_part = backend.alloc(part_len * 4)?;
        let mut db_part = backend.alloc(part_len * 4)?;
        {
            let func = backend.function("norm.cu", &name(OP, x.dtype()))?;
            let (xv, mv, rv, dyv) = (view(x, OP)?, view(mean, OP)?, view(rstd, OP)?, view(dy, OP)?);
            let wv = view(weight.unwrap_or(x), OP)?;
            let qv = view(dres.unwrap_or(dy), OP)?;
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (rows_, d_) = (i64_of(rows), d as i32);
            let rms = i32::from(kind == NormKind::Rms);
            let (has_w, has_res) = (i32::from(weight.is_some()), i32::from(dres.is_some()));
            let (want, per_warp) = (i32::from(want_params), i32::from(per_warp));
            launch!(
                backend,
                func,
                cfg,
                &xv,
                &wv,
                &mv,
                &rv,
                &dyv,
                &qv,
                &mut out.dx,
                &mut dw_part,
                &mut db_part,
                &rows_,
                &d_,
                &rms,
                &has_w,
                &has_res,
                &want,
                &per_warp
            );
        }
        out.finalize(backend, (&dw_part, &db_part), d, blocks, rows, weight.is_some(), with_bias)?;
    }
    Ok(out.wrap(backend, x, weight.is_some(), with_bias))
}

/// The reference backward kernels: dx, then the parameter gradients in a separate pass.
#[allow(clippy::too_many_arguments)]
fn reference_bwd(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    kind: NormKind,
    with_bias: bool,
) -> Result<BwdOut> {
    const OP: &str = "layer_norm_bwd";
    let (d, rows) = (x.shape().last(), x.shape().rows());
    let mut out = BwdBuffers::new(backend, x, weight)?;
    if rows > 0 && d > 0 {
        let (xv, mv, rv, dyv) = (view(x, OP)?, view(mean, OP)?, view(rstd, OP)?, view(dy, OP)?);
        let wv = view(weight.unwrap_or(x), OP)?;
        let (rows_, d_) = (i64_of(rows), i64_of(d));
        let rms = i32::from(kind == NormKind::Rms);
        let has_w = i32::from(weight.is_some());
        let func = backend.function("norm.cu", &name(OP, x.dtype()))?;
        launch!(backend, func, cfg_rows(rows, d), &xv, &wv, &mv, &rv, &dyv, &mut out.dx, &rows_, &d_, &rms, &has_w);

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
            out.finalize(backend, (&dw_part, &db_part), d, chunks, rows, weight.is_some(), with_bias)?;
        }
    }
    Ok(out.wrap(backend, x, weight.is_some(), with_bias))
}

/// Whether the fast path may be used on `backend`: runs its check on first use (an entry of
/// [`self_check`]'s list, so `vit devices` shows it).
pub(crate) fn fast_ok(backend: &Arc<CudaBackend>) -> bool {
    backend.fast_kernel_ok(FAST_KERNEL, FAST_TOLERANCE, || check_fast(backend))
}

/// Relative error allowed between two paths that compute in f32 and round once to `dtype`.
pub(crate) fn dtype_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-5,
    }
}

/// The fast path against the reference on small problems that take each of its branches (one
/// row per warp with vector loads, scalar loads for a width that is not a multiple of 4, one
/// row per block; residual add, bias, RMS), in f32, bf16 and f16: the largest relative error
/// over all outputs, each scaled by `FAST_TOLERANCE / dtype_tolerance(dtype)` so that one
/// threshold judges every dtype.
fn check_fast(backend: &Arc<CudaBackend>) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let scale = FAST_TOLERANCE / dtype_tolerance(dt);
        let rand = |shape: &[usize], seed: u64| Tensor::randn(shape.to_vec(), 0.5, 1.0, seed, dt, dev);
        let mut compare = |fast: &Tensor, reference: &Tensor| -> Result<()> {
            let e = self_check::relative_error(&fast.to_f32_vec()?, &reference.to_f32_vec()?) * scale;
            worst = if e.is_nan() || worst.is_nan() { f64::NAN } else { worst.max(e) };
            Ok(())
        };
        for (i, &(rows, d, kind)) in
            [(37, 256, NormKind::LayerNorm), (9, 102, NormKind::LayerNorm), (5, 1288, NormKind::Rms)].iter().enumerate()
        {
            let seed = 100 * i as u64;
            let (x, r) = (rand(&[rows, d], seed)?, rand(&[rows, d], seed + 1)?);
            let (w, b) = (rand(&[d], seed + 2)?, rand(&[d], seed + 3)?);
            let (dy, dres) = (rand(&[rows, d], seed + 4)?, rand(&[rows, d], seed + 5)?);
            let f = fwd_on(Path::Fast, backend, &x, Some(&r), Some(&w), Some(&b), 1e-6, kind)?;
            let g = fwd_on(Path::Reference, backend, &x, Some(&r), Some(&w), Some(&b), 1e-6, kind)?;
            let (hf, hg) = (f.0.expect("h with a residual"), g.0.expect("h with a residual"));
            for (a, b) in [(&hf, &hg), (&f.1, &g.1), (&f.2, &g.2), (&f.3, &g.3)] {
                compare(a, b)?;
            }
            let bf = bwd_on(Path::Fast, backend, &hg, Some(&w), &g.2, &g.3, &dy, Some(&dres), kind, true)?;
            let bg = bwd_on(Path::Reference, backend, &hg, Some(&w), &g.2, &g.3, &dy, Some(&dres), kind, true)?;
            compare(&bf.0, &bg.0)?;
            for (a, b) in [(&bf.1, &bg.1), (&bf.2, &bg.2)] {
                compare(a.as_ref().expect("dweight"), b.as_ref().expect("dbias"))?;
            }
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::{bwd_smem, layout};

    #[test]
    fn rows_go_per_warp_up_to_1024_and_the_fused_backward_fits_48_kib_up_to_6144() {
        assert_eq!(layout(768), (true, 4, 128));
        assert_eq!(layout(1024), (true, 4, 128));
        assert_eq!(layout(1025), (false, 1, 256));
        assert_eq!(bwd_smem(768, true), Some(4 * 2 * 768 * 4));
        assert_eq!(bwd_smem(1024, true), Some(32 * 1024));
        assert_eq!(bwd_smem(6144, true), Some(48 * 1024));
        assert_eq!(bwd_smem(6145, true), None);
        assert_eq!(bwd_smem(100_000, false), Some(0));
    }
}
