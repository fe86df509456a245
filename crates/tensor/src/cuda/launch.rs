//! What every CUDA op launcher shares: the `launch!` macro, launch shapes and argument
//! conventions. The `ops` layer has already checked shapes, dtypes and devices; the launchers
//! (one file per op family, like `cpu/` and `kernels/*.cu`) only launch and wrap the outputs,
//! with exactly the semantics of the CPU reference in `crate::cpu`.
//!
//! Conventions shared with the kernels (see the comment at the top of each `.cu` file):
//! sizes are passed as `i64` (`long long`), flags and small enums as `i32`, scalars as `f32`;
//! outputs are zeroed buffers from [`super::output`]; 1-D kernels and row kernels loop with a grid
//! stride, so their grids are capped at [`MAX_BLOCKS`]. Nothing is launched for an empty
//! output (a zero-block launch is an error).

use crate::DType;
use cudarc::driver::LaunchConfig;

/// Grid cap for the grid-stride kernels (more blocks would only wait for a free SM).
pub(super) const MAX_BLOCKS: usize = 1 << 20;
/// Threads per block of the 1-D kernels (set by `super::grid_1d`).
pub(super) const THREADS_1D: usize = 256;

/// Launches `func` with `cfg` and the kernel arguments (references: device buffers or scalars
/// bound to locals), mapping a driver error.
macro_rules! launch {
    ($backend:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut builder = $backend.stream.launch_builder(&$func);
        $( builder.arg($arg); )+
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu (pointers to
        // buffers of the sizes passed alongside, then i64 sizes, i32 flags and f32 scalars), and
        // every index the kernel forms stays within those sizes.
        unsafe { builder.launch($cfg) }.map_err($crate::cuda::cuda_err)?;
    }};
}
pub(super) use launch;

/// A 1-D grid-stride launch over `n` elements.
pub(super) fn cfg_1d(n: usize) -> LaunchConfig {
    super::grid_1d(n.min(MAX_BLOCKS * THREADS_1D))
}

/// Threads per block for a row of `n` elements: a multiple of 32 in 32..=256.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// One block per row (grid-stride over `rows`), sized for rows of `n` elements.
pub(super) fn cfg_rows(rows: usize, n: usize) -> LaunchConfig {
    super::grid_rows(rows.min(MAX_BLOCKS), row_threads(n), 0)
}

/// The kernel `op` for `dtype`: `op_f32`, `op_bf16`, `op_f16`.
pub(super) fn name(op: &str, dtype: DType) -> String {
    format!("{op}_{}", dtype.kernel_suffix())
}

/// A size as the kernels' `long long`.
pub(super) fn i64_of(n: usize) -> i64 {
    n as i64
}
