//! A linear layer's forward with its bias and residual folded into the GEMM: the output is
//! first filled with `bias` (and `residual + bias`), then the GEMM accumulates into it, so the
//! separate `bias_add` and `add` passes over the output (and their allocations) disappear.

use super::matmul::gemm_f32_acc;
use super::{zeroed, PAR_MIN_ELEMS};
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
    let mut y = zeroed(m * n);
    if n == 0 {
        return y;
    }
    let rows_per_task = (PAR_MIN_ELEMS / n).max(1);
    match (bias, residual) {
        (None, None) => {}
        (Some(b), None) => y.par_chunks_mut(n).with_min_len(rows_per_task).for_each(|row| row.copy_from_slice(b)),
        (None, Some(r)) => y
            .par_chunks_mut(n)
            .zip(r.par_chunks(n))
            .with_min_len(rows_per_task)
            .for_each(|(row, r)| row.copy_from_slice(r)),
        (Some(b), Some(r)) => {
            y.par_chunks_mut(n).zip(r.par_chunks(n)).with_min_len(rows_per_task).for_each(|(row, r)| {
                row.iter_mut().zip(r).zip(b).for_each(|((o, &rv), &bv)| *o = rv + bv);
            })
        }
    }
    let accumulate = bias.is_some() || residual.is_some();
    gemm_f32_acc(x, w, &mut y, m, n, k, false, true, rayon::current_num_threads(), accumulate);
    y
}
