//! The CPU backend: readable f32 implementations of every op, row-parallel with rayon, matmul
//! through the `gemm` crate (strided views, no copies). Elementwise loops are written to
//! vectorise and compiled per instruction set (`multiversion.rs`'s `multiversion!`, the formulas
//! in `vector_math`). bf16/f16 inputs are widened to f32 by the ops layer, so everything here
//! is f32 (design §2).

mod allocator;
mod amx;
mod attention;
mod attention_packed;
mod elementwise;
/// The flash kernels' algorithm in Rust, checked against the reference attention (tests only).
#[cfg(test)]
mod flash_attention;
mod host;
mod im2col;
mod index;
mod layout;
mod linear;
mod matmul;
mod matmul_precision;
mod moe_dispatch;
mod multiversion;
mod norm;
mod patch;
mod reduce;
mod routing;
mod softmax;
mod vector_math;

pub use allocator::retain_freed_memory;
pub use amx::amx_available;
pub(crate) use attention::*;
pub(crate) use attention_packed::*;
pub use elementwise::erfc;
pub(crate) use elementwise::*;
pub use host::{CpuInfo, SimdLevel};
pub(crate) use im2col::*;
pub(crate) use index::*;
pub(crate) use layout::*;
pub(crate) use linear::*;
pub use matmul::gemm_f32;
pub(crate) use matmul::matmul;
pub use matmul_precision::{matmul_precision, set_matmul_precision, MatmulPrecision};
pub(crate) use moe_dispatch::*;
pub(crate) use norm::*;
pub(crate) use patch::*;
pub(crate) use reduce::*;
pub(crate) use routing::*;
pub(crate) use softmax::*;

use rayon::prelude::*;

/// Rows below this many elements in total are not worth a rayon fan-out.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// `len` zeros, written in parallel when large: with freed memory kept in the heap
/// ([`retain_freed_memory`]) a zeroed buffer is a memset of recycled pages rather than fresh
/// zero pages from the kernel, and a serial memset of every output would idle the other cores.
pub(crate) fn zeroed<T: Default + Copy + Send + Sync>(len: usize) -> Vec<T> {
    if len * std::mem::size_of::<T>() < PAR_MIN_ELEMS * 4 {
        return vec![T::default(); len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(T::default(), len));
    v
}

/// `len` f32s written by `fill` without being zeroed first (a memset of every op output was
/// 5% of a CPU training step, issue 15).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn uninit_vec(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// Column sums of a `[rows, n]` matrix whose rows are added into an accumulator by
/// `add_row(row, acc)` (so a product such as `dy · x̂` need not be materialised).
///
/// Deterministic at any thread count: fixed blocks of rows are summed in parallel, then the
/// block sums are added in block order (a run resumed from a checkpoint must match bit for bit).
pub(crate) fn blocked_column_sums(rows: usize, n: usize, add_row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut sums = vec![0.0f32; n];
    if n == 0 {
        return sums;
    }
    let block_rows = (PAR_MIN_ELEMS / n).max(1);
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(block_rows))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0f32; n];
            (b * block_rows..((b + 1) * block_rows).min(rows)).for_each(|i| add_row(i, &mut acc));
            acc
        })
        .collect();
    for p in &partials {
        sums.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    sums
}
