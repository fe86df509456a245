//! A linear layer's forward with its bias and residual folded into the GEMM: the output is
//! first filled with `bias` (and `residual + bias`), then the GEMM accumulates into it, so the
//! separate `bias_add` and `add` passes over the output (and their allocations) disappear.

use super::matmul::{gemm_strided, gemm_strided_uninit, MatRef};
use super::{uninit_vec, PAR_MIN_ELEMS};
use rayon::prelude::*;

/// `y [m, n] = x [m, k] · wᵀ + bias [n] + residual [m, n]` for `w [n, k]` (PyTorch's layout);
/// `bias` and `residual` optional.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let (xm, wt) = (MatRef::dense(x, m, k, false), MatRef::dense(w, k, n, true));
    let threads = rayon::current_num_threads();
    let rows_per_task = (PAR_MIN_ELEMS / n.max(1)).max(1);
    // SAFETY: every row is written in full (by the fill or by the GEMM) before it is read.
    let mut y = unsafe {
        uninit_vec(m * n, |y| {
            if n == 0 {
                return;
            }
            let rows = y.par_chunks_mut(n).with_min_len(rows_per_task);
            match (bias, residual) {
                (None, None) => gemm_strided_uninit(xm, wt, y, n, threads),
                (Some(b), None) => rows.for_each(|row| row.iter_mut().zip(b).for_each(|(o, &bv)| _ = o.write(bv))),
                (None, Some(r)) => rows.zip(r.par_chunks(n)).for_each(|(row, r)| {
                    row.iter_mut().zip(r).for_each(|(o, &rv)| _ = o.write(rv));
                }),
                (Some(b), Some(r)) => rows.zip(r.par_chunks(n)).for_each(|(row, r)| {
                    row.iter_mut().zip(r).zip(b).for_each(|((o, &rv), &bv)| _ = o.write(rv + bv));
                }),
            }
        })
    };
    if bias.is_some() || residual.is_some() {
        gemm_strided(xm, wt, &mut y, n, true, threads);
    }
    y
}
