//! f32 matmul on the `gemm` crate (strided, so transposes cost nothing), with rayon.

use super::zeroed;
use crate::op_kinds::MatmulDims;
use gemm::Parallelism;
use rayon::prelude::*;

/// `c [m, n] = op(a) op(b)` for row-major `a` (`[m, k]`, or `[k, m]` if `trans_a`) and `b`
/// (`[k, n]`, or `[n, k]` if `trans_b`), through `gemm::gemm` with row/column strides.
/// `threads` > 1 lets gemm split the product with rayon.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    threads: usize,
) {
    gemm_f32_acc(a, b, c, m, n, k, trans_a, trans_b, threads, false)
}

/// [`gemm_f32`], or with `accumulate` `c += op(a) op(b)` (c's values are read: a bias or a
/// residual written into it beforehand costs no extra pass over the output).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_acc(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    threads: usize,
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm_f32: buffers smaller than m, n, k");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (column stride, row stride) of each operand as stored.
    let (a_cs, a_rs) = if trans_a { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if trans_b { (k as isize, 1) } else { (1, n as isize) };
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the strides above address exactly the m·k, k·n and m·n elements checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `batch` products of `matmul_t` (see `ops::matmul_t`); large single products use every
/// thread inside gemm, many small ones one thread each across the batch.
pub(crate) fn matmul(a: &[f32], b: &[f32], d: MatmulDims) -> Vec<f32> {
    let MatmulDims { batch, m, n, k, trans_a, trans_b } = d;
    let mut c = zeroed(batch * m * n);
    let threads = rayon::current_num_threads();
    let b_stride = if batch == 1 { 0 } else { k * n };
    if batch == 1 || m * n * k >= 1 << 21 {
        for (i, ci) in c.chunks_mut((m * n).max(1)).enumerate().take(batch) {
            gemm_f32(&a[i * m * k..], &b[i * b_stride..], ci, m, n, k, trans_a, trans_b, threads);
        }
    } else {
        c.par_chunks_mut((m * n).max(1)).enumerate().for_each(|(i, ci)| {
            gemm_f32(&a[i * m * k..], &b[i * b_stride..], ci, m, n, k, trans_a, trans_b, 1);
        });
    }
    c
}
