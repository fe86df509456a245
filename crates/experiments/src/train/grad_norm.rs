//! The whole model's gradient norm when the ranks hold different parts of the gradients
//! (ZeRO, full sharding, tensor and expert parallelism): each rank counts the squares of what it
//! alone holds in full and its share of what several ranks hold alike, and one scalar all-reduce
//! sums them. `OptimizerChain::step_shard` takes the sum as a closure, so clipping and the logged
//! norm are the whole model's.

use super::TrainError;
use vit_collective::{Communicator, ReduceOp};
use vit_optim::OptimError;
use vit_tensor::{Device, ParamStore, Tensor};

/// `part` summed over the ranks of `comm` (one f32 all-reduce, in rank order).
pub fn sum_over_ranks(comm: &dyn Communicator, part: f64) -> Result<f64, OptimError> {
    let t = Tensor::from_vec(vec![part as f32], [1], Device::Cpu)?;
    let summed = comm
        .all_reduce(&t, ReduceOp::Sum)
        .map_err(|e| OptimError::Param { name: "(gradient norm across ranks)".into(), msg: e.to_string() })?;
    Ok(summed.to_f32_vec()?[0] as f64)
}

/// Sum of squares (in f64) of the gradients in `grads` whose names `counted` accepts.
pub fn sum_of_squares_where(grads: &ParamStore, counted: impl Fn(&str) -> bool) -> Result<f64, TrainError> {
    let mut sq = 0f64;
    for (_, g) in grads.iter().filter(|(n, _)| counted(n)) {
        sq += g.to_f32_vec()?.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    }
    Ok(sq)
}

/// This rank's share of the whole model's sum of squares: `mine` (all it holds, `shared` of it
/// held alike by `n` ranks) counts the shared squares `1/n` times.
pub fn share(mine: f64, shared: f64, n: usize) -> f64 {
    mine - shared + shared / n as f64
}
