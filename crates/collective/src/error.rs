//! The one error type of `vit-collective`. Every variant names the op and says what was
//! expected and what was given, e.g.
//! `reduce_scatter: dim 0 of [6, 4] is not divisible by world size 4`.

use vit_tensor::DType;

/// Errors from collectives and point-to-point transfers.
///
/// Errors found when checking a collective call (different calls, shapes, dtypes or roots on
/// different ranks; a shape the op cannot split) are detected once every rank has arrived, so
/// every rank of the group gets one, never just some of them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor error (casting, device transfer) while computing a result.
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),

    /// Ranks disagree on the call: a different op, reduce op or root, or a different shape or
    /// dtype, e.g. `all_reduce: expected the same shape and dtype on every rank, got rank 0:
    /// [4, 3] f32, rank 1: [4, 5] f32`.
    #[error("{op}: {msg}")]
    Mismatch { op: &'static str, msg: String },

    /// A shape the op cannot handle (a rank-0 tensor to split, dim 0 not divisible by the world size).
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A parameter outside its valid range, e.g. `Throttled::new: expected a bandwidth > 0
    /// bytes/s, got 0`, or an unknown name.
    #[error("{op}: {msg}")]
    Value { op: &'static str, msg: String },

    /// A reduction on a non-float tensor.
    #[error("{op}: expected a float dtype (f32, bf16 or f16), got {got}")]
    DType { op: &'static str, got: DType },

    /// A rank argument (root, peer) outside `0..world_size`.
    #[error("{op}: expected {what} in 0..{world_size}, got {got}")]
    Rank { op: &'static str, what: &'static str, got: usize, world_size: usize },

    /// A peer's communicator was dropped (its thread ended or panicked) while this rank waited on it.
    #[error("{op}: rank {peer} has left the group (its communicator was dropped)")]
    Disconnected { op: &'static str, peer: usize },

    /// An earlier failure (a deadlock found on another rank) left the group unusable.
    #[error("{op}: the group is unusable after an earlier failure: {reason}")]
    Poisoned { op: &'static str, reason: String },

    /// The transport itself failed or cannot be set up (MPI initialised twice, a malformed
    /// message), e.g. `mpi: MPI is already initialised in this process`.
    #[error("{op}: {msg}")]
    Backend { op: &'static str, msg: String },

    /// A blocking call waited longer than the group's timeout for `peers` (ranks that are stuck
    /// or far behind), e.g. `all_reduce: waited 300 s for rank(s) [1]`.
    #[error("{op}: waited {secs} s for {} (the collective timeout)", waited_for(peers))]
    Timeout { op: &'static str, secs: f64, peers: Vec<usize> },

    /// A mesh that does not fit: sizes that do not multiply to the world size, an unknown or
    /// repeated axis, e.g. `mesh: mesh data=2,model=2 has 4 ranks, but the world has 3 ...`.
    #[error("mesh: {msg}")]
    Mesh { msg: String },

    /// The call can never complete: every rank of the group is waiting on another, a rank
    /// receives from itself with nothing sent, or one communicator is used by two threads at once.
    #[error("{op}: {msg}")]
    Deadlock { op: &'static str, msg: String },
}

/// `rank(s) [1, 3]`, or, when the backend cannot tell which ranks are missing (MPI), `the
/// other ranks (at least one has not joined)`.
fn waited_for(peers: &[usize]) -> String {
    if peers.is_empty() {
        "the other ranks (at least one has not joined)".into()
    } else {
        format!("rank(s) {peers:?}")
    }
}

/// Result alias for `vit-collective`.
pub type Result<T> = std::result::Result<T, Error>;
