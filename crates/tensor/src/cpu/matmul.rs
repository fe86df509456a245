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

/// A read-only `[rows, cols]` matrix inside a slice: element `(i, j)` is
/// `data[i·row_stride + j·col_stride]` (a head of a packed qkv projection, say).
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` block starting at `data[0]` with rows `row_stride` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef { data, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`) for strided `a [m, k]`, `b [k, n]` and a
/// row-major `c [m, n]` whose rows are `c_row_stride` apart, on one thread. Panics if a view
/// reaches outside its slice (a bug in the caller, not bad input).
pub(crate) fn gemm_strided(a: MatRef, b: MatRef, c: &mut [f32], c_row_stride: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c_view = MatRef::rows(c, m, n, c_row_stride);
    assert!(b.rows == k && a.fits() && b.fits() && c_view.fits(), "gemm_strided: views outside their buffers");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| c[i * c_row_stride..i * c_row_stride + n].fill(0.0));
        }
        return;
    }
    // SAFETY: `fits` checked that every addressed element lies inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
