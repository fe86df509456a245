//! The CPU backend: plain, readable f32 reference implementations of every op, row-parallel
//! with rayon, matmul through the `gemm` crate. bf16/f16 inputs are widened to f32 by the ops
//! layer, so everything here is f32 (design §2).

mod attention;
mod elementwise;
mod index;
mod layout;
mod matmul;
mod norm;
mod patch;
mod reduce;
mod softmax;

pub(crate) use attention::*;
pub(crate) use elementwise::*;
pub(crate) use index::*;
pub(crate) use layout::*;
pub use matmul::gemm_f32;
pub(crate) use matmul::matmul;
pub(crate) use norm::*;
pub(crate) use patch::*;
pub(crate) use reduce::*;
pub(crate) use softmax::*;

/// Rows below this many elements in total are not worth a rayon fan-out.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;
