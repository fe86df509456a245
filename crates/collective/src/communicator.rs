//! The [`Communicator`] trait: collectives and point-to-point transfers among the ranks of
//! one group, with the same behaviour on every backend.

use crate::{Error, Result};
use std::ops::Range;
use vit_tensor::Tensor;

/// How [`Communicator::all_reduce`] and [`Communicator::reduce_scatter`] combine the ranks'
/// tensors, element by element: the reduction of `vit-tensor`'s ops, here across ranks.
/// Reductions run in f32 in rank order (rank 0 first) and the result is cast back to the input
/// dtype; `Mean` divides the sum by the world size; `Max` lets a NaN on any rank through.
pub use vit_tensor::ops::ReduceOp;

/// One rank's handle on a group of `world_size` ranks.
///
/// Every collective is a rendezvous: all ranks call it, in the same order, with the same op,
/// reduce op, root, shape and dtype. A disagreement is an [`Error::Mismatch`](crate::Error)
/// on every rank (never a hang or a panic). Results keep the input's dtype and device.
/// Below, `n` is the world size and `[m, ..]` a tensor whose leading dimension is `m`.
pub trait Communicator: Send + Sync {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Combines `x` (any shape, float dtype) from every rank with `op`; every rank gets the
    /// same result, bitwise, of the same shape.
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Concatenates `x: [m, ..]` from every rank along dim 0 in rank order: `[n·m, ..]`.
    /// Any dtype; `x` must have rank ≥ 1.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;

    /// Reduces `x: [n·m, ..]` (float dtype) across ranks with `op` and gives rank `r` rows
    /// `r·m..(r+1)·m` of the reduction: `[m, ..]`. Dim 0 must be divisible by `n`.
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Splits `x: [n·m, ..]` into `n` chunks of `m` rows and sends chunk `j` to rank `j`; the
    /// result `[n·m, ..]` holds, in rank order, the chunks every rank sent to this one. Any
    /// dtype; dim 0 must be divisible by `n`.
    fn all_to_all(&self, x: &Tensor) -> Result<Tensor>;

    /// Every rank gets `root`'s `x`. The other ranks pass a tensor of the same shape and dtype
    /// (its values are ignored), as NCCL needs a receive buffer of that size.
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;

    /// Sends `x` to rank `to`. Messages between one (sender, receiver) pair arrive in the order
    /// they were sent. Backends may buffer (the in-process group does) or block until the
    /// matching [`recv`](Communicator::recv); portable code pairs sends and receives so that it
    /// works with either, or uses [`send_recv`](Communicator::send_recv).
    fn send(&self, x: &Tensor, to: usize) -> Result<()>;

    /// Receives the next tensor that rank `from` sent to this rank (its shape and dtype).
    fn recv(&self, from: usize) -> Result<Tensor>;

    /// Sends `x` to `to` and receives the next tensor from `from`, as one step of a ring
    /// (`to = rank + 1`, `from = rank - 1`, mod n) that cannot deadlock. Backends that block
    /// in `send` override this to post both at once.
    fn send_recv(&self, x: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        self.send(x, to)?;
        self.recv(from)
    }

    /// Returns once every rank has called `barrier`.
    fn barrier(&self) -> Result<()>;

    /// All-reduces elements `ranges` (disjoint, within it) of the 1-D `buffer` with `op`, in
    /// place; the other elements keep their values. Every rank passes the same buffer shape and
    /// ranges. Each range is reduced as [`all_reduce`](Communicator::all_reduce) reduces it;
    /// this default does exactly that, range by range, and writes the results back (a copy
    /// each). The NCCL backend reduces the device buffer in place, with no copy: the
    /// data-parallel gradient all-reduce over buckets of the flat gradient buffer.
    fn all_reduce_in_place(&self, buffer: &mut Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<()> {
        check_ranges("all_reduce", buffer, ranges)?;
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            let reduced = self.all_reduce(&buffer.narrow(r.start, r.len())?, op)?;
            buffer.write_at(r.start, &reduced)?;
        }
        Ok(())
    }

    /// The NCCL rank that carries this communicator's CUDA tensors, when there is one (the
    /// NCCL backend itself, or a router of host and device tensors over it): what the
    /// overlapped gradient all-reduce on the device ([`crate::NcclOverlappedAllReduce`]) runs
    /// on. `None` (this default) for host backends.
    fn nccl(&self) -> Option<&crate::NcclCommunicator> {
        None
    }

    /// Splits the group as `MPI_Comm_split` does: every rank calls it; the ranks that pass the
    /// same `color` form one new group, ranked by `(key, rank in this group)`. The new groups
    /// are independent of this one and of each other (their collectives never mix); they
    /// inherit its timeout. `color` and `key` must fit in an `i32` (MPI's limit).
    /// [`Mesh`](crate::Mesh) builds its per-axis groups with it.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;
}

/// A boxed communicator (what [`Communicator::split`] returns) is one.
impl Communicator for Box<dyn Communicator> {
    fn rank(&self) -> usize {
        self.as_ref().rank()
    }
    fn world_size(&self) -> usize {
        self.as_ref().world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.as_ref().all_reduce(x, op)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.as_ref().all_gather(x)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.as_ref().reduce_scatter(x, op)
    }
    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        self.as_ref().all_to_all(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.as_ref().broadcast(x, root)
    }
    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        self.as_ref().send(x, to)
    }
    fn recv(&self, from: usize) -> Result<Tensor> {
        self.as_ref().recv(from)
    }
    fn send_recv(&self, x: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        self.as_ref().send_recv(x, to, from)
    }
    fn barrier(&self) -> Result<()> {
        self.as_ref().barrier()
    }
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        self.as_ref().split(color, key)
    }
    fn all_reduce_in_place(&self, buffer: &mut Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<()> {
        self.as_ref().all_reduce_in_place(buffer, ranges, op)
    }
    fn nccl(&self) -> Option<&crate::NcclCommunicator> {
        self.as_ref().nccl()
    }
}

/// Checks `split`'s arguments against MPI's `int` range (every backend applies the same limit).
pub(crate) fn check_split_args(color: usize, key: usize) -> Result<(i32, i32)> {
    let fit = |what: &'static str, v: usize| {
        i32::try_from(v).map_err(|_| Error::Rank { op: "split", what, got: v, world_size: i32::MAX as usize })
    };
    Ok((fit("color", color)?, fit("key", key)?))
}

/// Checks that `ranges` lie within the 1-D `buffer` and do not overlap.
pub(crate) fn check_ranges(op: &'static str, buffer: &Tensor, ranges: &[Range<usize>]) -> Result<()> {
    if buffer.rank() != 1 {
        return Err(Error::Shape {
            op,
            msg: format!("expected a 1-D buffer to reduce ranges of, got shape {}", buffer.shape()),
        });
    }
    let mut sorted: Vec<&Range<usize>> = ranges.iter().filter(|r| !r.is_empty()).collect();
    sorted.sort_by_key(|r| r.start);
    for w in sorted.windows(2) {
        if w[0].end > w[1].start {
            return Err(Error::Shape { op, msg: format!("ranges {:?} and {:?} overlap", w[0], w[1]) });
        }
    }
    if let Some(r) = sorted.iter().find(|r| r.end > buffer.numel()) {
        return Err(Error::Shape {
            op,
            msg: format!("range {r:?} ends past the buffer's {} elements", buffer.numel()),
        });
    }
    Ok(())
}
