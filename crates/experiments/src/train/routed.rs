//! [`Routed`]: the communicator of a GPU rank that trains over NCCL. The trainer's collectives
//! carry two kinds of tensors: device tensors (gradients, sharded parameters, activations of
//! the parallel layers), which go over NCCL without leaving the GPU, and small host tensors
//! (losses, the stop flag, MoE statistics, bad-example lists), which NCCL cannot carry and
//! which go over the host backend the ranks already share (`LocalGroup` threads or MPI
//! processes). Every rank runs the same code, so every rank routes each call the same way.

use std::ops::Range;
use vit_collective::{Communicator, NcclCommunicator, ReduceOp, Result};
use vit_tensor::{Device, Tensor};

/// A communicator held by reference (the host backend the caller owns) or owned (one made by
/// a split).
enum Held<'a> {
    Borrowed(&'a dyn Communicator),
    Owned(Box<dyn Communicator>),
}

impl Held<'_> {
    fn get(&self) -> &dyn Communicator {
        match self {
            Held::Borrowed(c) => *c,
            Held::Owned(c) => c.as_ref(),
        }
    }
}

/// Host tensors over `host`, CUDA tensors over NCCL (`device`); ranks and world size are the
/// host backend's (the NCCL communicator was made over it, with the same ranks).
pub struct Routed<'a> {
    host: Held<'a>,
    device: Box<dyn Communicator>,
}

impl<'a> Routed<'a> {
    /// Routes over `host` and `nccl` (made from `host` by
    /// [`NcclCommunicator::from_communicator`], so their ranks agree).
    pub fn new(host: &'a dyn Communicator, nccl: NcclCommunicator) -> Self {
        Routed { host: Held::Borrowed(host), device: Box::new(nccl) }
    }

    /// The backend of a call on `x`.
    fn on(&self, x: &Tensor) -> &dyn Communicator {
        match x.device() {
            Device::Cpu => self.host.get(),
            Device::Cuda(_) => self.device.as_ref(),
        }
    }

    /// The note sent over the host backend ahead of a point-to-point payload: which backend
    /// carries it (0 host, 1 NCCL), so that the receiver, which cannot know, takes it there.
    fn note(x: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(vec![u32::from(x.device() != Device::Cpu)], [1], Device::Cpu)?)
    }

    fn via_device(note: &Tensor) -> Result<bool> {
        Ok(note.to_vec::<u32>()?.first() == Some(&1))
    }
}

impl Communicator for Routed<'_> {
    fn rank(&self) -> usize {
        self.host.get().rank()
    }
    fn world_size(&self) -> usize {
        self.host.get().world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.on(x).all_reduce(x, op)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.on(x).all_gather(x)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.on(x).reduce_scatter(x, op)
    }
    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        self.on(x).all_to_all(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.on(x).broadcast(x, root)
    }
    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        self.host.get().send(&Self::note(x)?, to)?;
        self.on(x).send(x, to)
    }
    fn recv(&self, from: usize) -> Result<Tensor> {
        let note = self.host.get().recv(from)?;
        if Self::via_device(&note)? {
            self.device.recv(from)
        } else {
            self.host.get().recv(from)
        }
    }
    fn send_recv(&self, x: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        let note = self.host.get().send_recv(&Self::note(x)?, to, from)?;
        match (x.device() != Device::Cpu, Self::via_device(&note)?) {
            (true, true) => self.device.send_recv(x, to, from),
            (false, false) => self.host.get().send_recv(x, to, from),
            // Mixed (never in the trainer, whose ranks move the same kind of tensor): one after
            // the other, host first (it buffers on LocalGroup).
            (true, false) => {
                let got = self.host.get().recv(from)?;
                self.device.send(x, to)?;
                Ok(got)
            }
            (false, true) => {
                self.host.get().send(x, to)?;
                self.device.recv(from)
            }
        }
    }
    fn barrier(&self) -> Result<()> {
        self.host.get().barrier()
    }
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let host = self.host.get().split(color, key)?;
        let device = self.device.split(color, key)?;
        Ok(Box::new(Routed { host: Held::Owned(host), device }))
    }
    fn nccl(&self) -> Option<&NcclCommunicator> {
        self.device.nccl()
    }
    fn all_reduce_in_place(&self, buffer: &mut Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<()> {
        match buffer.device() {
            Device::Cpu => self.host.get().all_reduce_in_place(buffer, ranges, op),
            Device::Cuda(_) => self.device.all_reduce_in_place(buffer, ranges, op),
        }
    }
}
