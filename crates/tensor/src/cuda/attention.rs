//! CUDA launches of `kernels/attention.cu`: fused attention forward and backward.

use super::launch::{i64_of, launch, name, MAX_BLOCKS};
use super::{backend_of, output, view, wrap};
use crate::{DType, Error, Result, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Rows per block of the warp-per-row attention kernels (4 warps).
const ATT_ROWS_PER_BLOCK: usize = 4;
/// Largest head_dim the attention kernels hold in registers (32 lanes x 8 columns).
const ATT_MAX_HEAD_DIM: usize = 256;

/// One warp per row for the attention kernels.
fn cfg_warp_rows(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(ATT_ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * ATT_ROWS_PER_BLOCK as u32, 1, 1), shared_mem_bytes: 0 }
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
