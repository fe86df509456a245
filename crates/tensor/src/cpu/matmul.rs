//! f32 matmul on the `gemm` crate (strided, so transposes and heads inside a packed projection
//! cost nothing), with rayon. Outputs that the product overwrites are never zeroed first.

use super::amx::{amx_available, gemm_bf16_amx, gemm_bf16_emulated};
use super::matmul_precision::{matmul_precision, MatmulPrecision};
use super::uninit_vec;
use crate::op_kinds::MatmulDims;
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

    /// A contiguous row-major `[rows, cols]` matrix, or the transpose of one stored
    /// `[cols, rows]` when `transposed`.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize, transposed: bool) -> Self {
        if transposed {
            MatRef::rows(data, cols, rows, rows).t()
        } else {
            MatRef::rows(data, rows, cols, cols)
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// Whether a `[rows, cols]` view with these strides lies inside `len` elements.
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * row_stride + (cols - 1) * col_stride < len
}

/// Under [`MatmulPrecision::Bf16`], the products whose `m`, `n` and `k` are all at least this
/// many round their inputs to bf16; the others stay f32.
pub const BF16_MIN_DIM: usize = 32;

/// `c = a·b` or `c += a·b` through `gemm::gemm`, `c` row-major with rows `c_row_stride` apart.
///
/// The inputs are rounded to bf16 first under [`MatmulPrecision::Bf16`] (for products of at
/// least [`BF16_MIN_DIM`] in every dimension), on the AMX tiles where the CPU has them.
///
/// # Safety
/// `c` points to `c_len` writable f32s, initialised when `accumulate` (gemm reads them then,
/// and only then).
unsafe fn gemm_raw(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_len: usize,
    c_row_stride: usize,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k
            && fits(a.data.len(), m, k, a.row_stride, a.col_stride)
            && fits(b.data.len(), k, n, b.row_stride, b.col_stride)
            && fits(c_len, m, n, c_row_stride, 1),
        "gemm: views outside their buffers"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| (0..n).for_each(|j| c.add(i * c_row_stride + j).write(0.0)));
        }
        return;
    }
    // bf16 only where every dimension fills a 32 × 32 tile block: smaller products (one
    // head's attention with 16 channels, a 10-class head) stay exact, and cheap either way.
    let bf16 = matmul_precision() == MatmulPrecision::Bf16 && m.min(n).min(k) >= BF16_MIN_DIM;
    match bf16 {
        false => gemm_raw_f32(a, b, c, c_len, c_row_stride, accumulate, threads),
        true if amx_available() => gemm_bf16_amx(a, b, c, c_row_stride, accumulate, threads),
        true => gemm_bf16_emulated(a, b, c, c_len, c_row_stride, accumulate, threads),
    }
}

/// [`gemm_raw`] in f32 through `gemm::gemm`, for views already checked and `m, n, k` > 0.
///
/// # Safety
/// As [`gemm_raw`].
pub(crate) unsafe fn gemm_raw_f32(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_len: usize,
    c_row_stride: usize,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert!(fits(c_len, m, n, c_row_stride, 1));
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: every view was checked to lie inside its buffer; gemm reads `c` only when
    // `read_dst` (= accumulate) and otherwise writes all m·n elements.
    gemm::gemm(
        m,
        n,
        k,
        c,
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
        par,
    );
}

/// `c = a·b` (or `c += a·b` with `accumulate`) for strided `a [m, k]`, `b [k, n]` and a
/// row-major `c [m, n]` whose rows are `c_row_stride` apart; `threads` > 1 lets gemm split the
/// product with rayon. Panics if a view reaches outside its slice (a caller's bug).
pub(crate) fn gemm_strided(a: MatRef, b: MatRef, c: &mut [f32], c_row_stride: usize, accumulate: bool, threads: usize) {
    // SAFETY: `c` is an initialised slice of its length.
    unsafe { gemm_raw(a, b, c.as_mut_ptr(), c.len(), c_row_stride, accumulate, threads) }
}

/// [`gemm_strided`] into memory not yet written: every element of the `[m, n]` view is written.
pub(crate) fn gemm_strided_uninit(
    a: MatRef,
    b: MatRef,
    c: &mut [MaybeUninit<f32>],
    c_row_stride: usize,
    threads: usize,
) {
    // SAFETY: `c` is writable for its length; gemm does not read it without accumulate.
    unsafe { gemm_raw(a, b, c.as_mut_ptr().cast(), c.len(), c_row_stride, false, threads) }
}

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
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm_f32: buffers smaller than m, n, k");
    gemm_strided(MatRef::dense(a, m, k, trans_a), MatRef::dense(b, k, n, trans_b), c, n, false, threads)
}

/// `batch` products of `matmul_t` (see `ops::matmul_t`); large single products use every
/// thread inside gemm, many small ones one thread each across the batch.
pub(crate) fn matmul(a: &[f32], b: &[f32], d: MatmulDims) -> Vec<f32> {
    let MatmulDims { batch, m, n, k, trans_a, trans_b } = d;
    let threads = rayon::current_num_threads();
    let b_stride = if batch == 1 { 0 } else { k * n };
    let product = |i: usize, ci: &mut [MaybeUninit<f32>], threads: usize| {
        let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * b_stride..i * b_stride + k * n]);
        gemm_strided_uninit(MatRef::dense(ai, m, k, trans_a), MatRef::dense(bi, k, n, trans_b), ci, n, threads);
    };
    // SAFETY: the products write every element of every [m, n] block.
    unsafe {
        uninit_vec(batch * m * n, |c| {
            if m * n == 0 {
                return;
            }
            if batch == 1 || m * n * k >= 1 << 21 {
                c.chunks_mut(m * n).enumerate().for_each(|(i, ci)| product(i, ci, threads));
            } else {
                c.par_chunks_mut(m * n).enumerate().for_each(|(i, ci)| product(i, ci, 1));
            }
        })
    }
}
