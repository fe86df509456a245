//! [`SingleProcess`]: the communicator of a world of one, so that a trainer can always hold a
//! communicator. Every collective returns its input (the same checks as a group of one run
//! first, so code that is wrong for any world size fails here too).

use crate::{
    call::{validate, Call, Op},
    Communicator, Error, ReduceOp, Result,
};
use std::{
    collections::VecDeque,
    sync::{Mutex, PoisonError},
};
use vit_tensor::Tensor;

/// Rank 0 of a world of size 1. Collectives are the identity (`all_gather`, `reduce_scatter`
/// and `all_to_all` of `[m, ..]` give `[m, ..]`); `send` to rank 0 queues the tensor for the
/// next `recv` from rank 0.
#[derive(Debug, Default)]
pub struct SingleProcess {
    mailbox: Mutex<VecDeque<Tensor>>,
}

impl SingleProcess {
    /// A communicator for a world of one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `x` as the only rank's input to `op`, then returns it.
    fn identity(&self, op: Op, x: &Tensor) -> Result<Tensor> {
        validate(op, &[Call { op, tensor: Some(x.clone()) }])?;
        Ok(x.clone())
    }

    fn check_peer(op: &'static str, what: &'static str, peer: usize) -> Result<()> {
        if peer != 0 {
            return Err(Error::Rank { op, what, got: peer, world_size: 1 });
        }
        Ok(())
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.identity(Op::AllReduce(op), x)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.identity(Op::AllGather, x)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.identity(Op::ReduceScatter(op), x)
    }

    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        self.identity(Op::AllToAll, x)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.identity(Op::Broadcast { root }, x)
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        Self::check_peer("send", "destination rank", to)?;
        self.mailbox.lock().unwrap_or_else(PoisonError::into_inner).push_back(x.clone());
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        Self::check_peer("recv", "source rank", from)?;
        self.mailbox.lock().unwrap_or_else(PoisonError::into_inner).pop_front().ok_or_else(|| Error::Deadlock {
            op: "recv",
            msg: "rank 0 receives from itself, but sent itself nothing".into(),
        })
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    /// A world of one splits into a world of one, whatever the color.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        crate::communicator::check_split_args(color, key)?;
        Ok(Box::new(SingleProcess::new()))
    }
}
