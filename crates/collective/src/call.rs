//! A collective call as one rank makes it, and the checks that the calls of all ranks fit
//! together. The checks are a pure function of every rank's call, so each rank runs them
//! after the rendezvous and all ranks reach the same verdict: an error on one is an error on all.

use crate::{Error, ReduceOp, Result};
use std::fmt;
use vit_tensor::{DType, Shape, Tensor};

/// Which collective a rank called, with its arguments other than the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduce(ReduceOp),
    AllGather,
    ReduceScatter(ReduceOp),
    AllToAll,
    Broadcast {
        root: usize,
    },
    Barrier,
    /// `Communicator::split`; its tensor is the rank's `[color, key]` (u32), which differ by rank.
    Split,
}

impl Op {
    /// The op's name in error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::AllReduce(_) => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter(_) => "reduce_scatter",
            Op::AllToAll => "all_to_all",
            Op::Broadcast { .. } => "broadcast",
            Op::Barrier => "barrier",
            Op::Split => "split",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AllReduce(r) | Op::ReduceScatter(r) => write!(f, "{}({r})", self.name()),
            Op::Broadcast { root } => write!(f, "broadcast(root {root})"),
            _ => f.write_str(self.name()),
        }
    }
}

/// One rank's call: the op and its tensor (none for a barrier).
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) op: Op,
    pub(crate) tensor: Option<Tensor>,
}

/// What the checks need of a call: the op, and the shape and dtype of its tensor. Backends
/// that cannot see the other ranks' tensors (MPI) exchange these.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Signature {
    pub(crate) op: Op,
    pub(crate) tensor: Option<(Shape, DType)>,
}

impl From<&Call> for Signature {
    fn from(c: &Call) -> Self {
        Signature { op: c.op, tensor: c.tensor.as_ref().map(|t| (t.shape().clone(), t.dtype())) }
    }
}

impl Signature {
    /// `[4, 3] f32`, or `no tensor`.
    fn describe_tensor(&self) -> String {
        match &self.tensor {
            Some((shape, dtype)) => format!("{shape} {dtype}"),
            None => "no tensor".into(),
        }
    }
}

/// `rank 0: x, rank 1: y, ...` for error messages.
fn per_rank(calls: &[Signature], f: impl Fn(&Signature) -> String) -> String {
    calls.iter().enumerate().map(|(r, c)| format!("rank {r}: {}", f(c))).collect::<Vec<_>>().join(", ")
}

/// [`validate_signatures`] of the calls themselves.
pub(crate) fn validate(mine: Op, calls: &[Call]) -> Result<()> {
    validate_signatures(mine, &calls.iter().map(Signature::from).collect::<Vec<_>>())
}

/// Checks that `calls` (one per rank, in rank order) form one valid collective; `mine` is the
/// op of the rank asking, named in the error. The world size is `calls.len()`.
pub(crate) fn validate_signatures(mine: Op, calls: &[Signature]) -> Result<()> {
    let op = mine.name();
    let n = calls.len();
    let Some(first) = calls.first() else {
        return Err(Error::Mismatch { op, msg: "a group needs at least one rank".into() });
    };
    if calls.iter().any(|c| c.op != first.op) {
        let msg = format!("ranks made different calls: {}", per_rank(calls, |c| c.op.to_string()));
        return Err(Error::Mismatch { op, msg });
    }
    if calls.iter().any(|c| match (&c.tensor, &first.tensor) {
        (Some(a), Some(b)) => a != b,
        (None, None) => false,
        _ => true,
    }) {
        let msg = format!(
            "expected the same shape and dtype on every rank, got {}",
            per_rank(calls, Signature::describe_tensor)
        );
        return Err(Error::Mismatch { op, msg });
    }
    let Some((shape, dtype)) = &first.tensor else {
        return Ok(()); // a barrier
    };
    match first.op {
        Op::AllReduce(_) | Op::ReduceScatter(_) if !dtype.is_float() => {
            return Err(Error::DType { op, got: *dtype });
        }
        Op::Broadcast { root } if root >= n => {
            return Err(Error::Rank { op, what: "root", got: root, world_size: n });
        }
        _ => {}
    }
    if matches!(first.op, Op::AllGather | Op::ReduceScatter(_) | Op::AllToAll) {
        match shape.dims().first() {
            None => {
                let msg =
                    format!("expected a tensor of rank >= 1 to {} along dim 0, got shape {}", verb(first.op), shape);
                return Err(Error::Shape { op, msg });
            }
            Some(&d0) if first.op != Op::AllGather && d0 % n != 0 => {
                let msg = format!("dim 0 of {shape} is not divisible by world size {n}");
                return Err(Error::Shape { op, msg });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// What `op` does along dim 0, for error messages.
fn verb(op: Op) -> &'static str {
    if op == Op::AllGather {
        "concatenate"
    } else {
        "split"
    }
}
