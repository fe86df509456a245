//! Collective matmul (reference §5). TEMPORARY plain form while the ring lands on its branch.

use crate::{Communicator, ReduceOp, Result};
use vit_tensor::{ops, Tensor};

/// How the tensor-parallel matmuls move data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulComm {
    /// Ring.
    #[default]
    Ring,
    /// Collective, then matmul.
    Plain,
}

/// `(gather(x)·op(w) [n·r, N], gather(x) [n·r, K])`.
pub fn all_gather_matmul(
    comm: &dyn Communicator,
    x: &Tensor,
    w: &Tensor,
    transpose_w: bool,
    _mode: MatmulComm,
) -> Result<(Tensor, Tensor)> {
    let all = comm.all_gather(x)?;
    Ok((ops::matmul_t(&all, w, false, transpose_w)?, all))
}

/// This rank's rows of `Σ x·op(w)`.
pub fn matmul_reduce_scatter(
    comm: &dyn Communicator,
    x: &Tensor,
    w: &Tensor,
    transpose_w: bool,
    _mode: MatmulComm,
) -> Result<Tensor> {
    comm.reduce_scatter(&ops::matmul_t(x, w, false, transpose_w)?, ReduceOp::Sum)
}
