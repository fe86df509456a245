//! `train.sharding = "optimizer"` (ZeRO-1, issue 12 item 4): each data-parallel rank owns a
//! contiguous run of whole parameters (about 1/N of the elements) and keeps the optimizer state
//! of those alone. A step reduce-scatters the gradients (each rank receives the sum over ranks
//! of its own part), updates its part with the whole model's gradient norm (one all-reduce of a
//! scalar), and all-gathers the updated parameters.
//!
//! Parts are cut at parameter boundaries because the factored second moment needs a whole
//! matrix; the collectives need equal sizes, so each part travels padded to the largest. The
//! sums are in rank order as with the all-reduce, so the gradients have the same bits as in
//! `sharding = "none"`; only the norm's summation order differs (clipping scale within 1e-7).

use super::TrainError;
use std::ops::Range;
use vit_collective::{Communicator, ReduceOp};
use vit_optim::{OptimError, Optimizer, OptimizerChain, OptimizerConfig, ParamShard, StepInfo, SumOverShards};
use vit_tensor::{DType, Device, ParamStore, Tensor};

/// One rank's share of a ZeRO-1 optimizer.
pub struct ShardedOptimizer {
    /// Each rank's element range of the flat parameter buffer.
    parts: Vec<Range<usize>>,
    /// The largest part: what every part is padded to.
    padded: usize,
    rank: usize,
    /// This rank's parameters: (name, offset in the flat buffer, element count).
    owned: Vec<(String, usize, usize)>,
    opt: OptimizerChain,
}

/// `(name, offset, numel)` of every parameter of `params` (one f32 CPU buffer), in buffer order.
fn layout(params: &ParamStore) -> Result<Vec<(String, usize, usize)>, TrainError> {
    let buffers = params.buffers();
    if buffers.len() != 1 || buffers[0].dtype() != DType::F32 || buffers[0].device() != Device::Cpu {
        return Err(TrainError::Config(format!(
            "train.sharding = \"optimizer\" needs the parameters in one f32 buffer on the CPU, got {} buffer(s)",
            buffers.len()
        )));
    }
    let mut out = params
        .names()
        .map(|n| params.placement(n).map(|p| (n.to_string(), p.offset, p.numel)))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|(_, o, _)| *o);
    Ok(out)
}

/// Cuts `layout` (buffer order) into `world` contiguous parts of whole parameters with about
/// equal element counts; part `r` is an element range (padding included) of a buffer of `len`.
fn partition(layout: &[(String, usize, usize)], len: usize, world: usize) -> Vec<Range<usize>> {
    let total: usize = layout.iter().map(|(_, _, n)| n).sum();
    let mut cuts = vec![0];
    let mut filled = 0;
    for (_, offset, n) in layout {
        // A parameter starts a new part when its middle lies past the current part's share.
        if cuts.len() < world && filled + n / 2 > cuts.len() * total / world && *offset > *cuts.last().unwrap() {
            cuts.push(*offset);
        }
        filled += n;
    }
    while cuts.len() < world {
        cuts.push(len);
    }
    cuts.push(len);
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

impl ShardedOptimizer {
    /// Rank `rank` of `world`'s share of an optimizer with `config` over `params`.
    pub fn new(config: OptimizerConfig, params: &ParamStore, rank: usize, world: usize) -> Result<Self, TrainError> {
        Self::with_shards(config, params, rank, world, &std::collections::HashMap::new())
    }

    /// [`ShardedOptimizer::new`] on a mesh: `shards` names the parameters that are this model
    /// rank's part of a whole one ([`OptimizerChain::with_shards`]).
    pub fn with_shards(
        config: OptimizerConfig,
        params: &ParamStore,
        rank: usize,
        world: usize,
        shards: &std::collections::HashMap<String, ParamShard>,
    ) -> Result<Self, TrainError> {
        let all = layout(params)?;
        let len = params.buffer(0).numel();
        let parts = partition(&all, len, world);
        let mine = &parts[rank];
        let owned: Vec<_> = all.into_iter().filter(|(_, o, _)| mine.contains(o)).collect();
        let subset = subset(params, owned.iter().map(|(n, _, _)| n.as_str()))?;
        let padded = parts.iter().map(|r| r.len()).max().unwrap_or(0);
        let shards = shards.iter().filter(|(n, _)| subset.contains(n)).map(|(n, s)| (n.clone(), s.clone())).collect();
        Ok(ShardedOptimizer { parts, padded, rank, owned, opt: OptimizerChain::with_shards(config, &subset, &shards)? })
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> u64 {
        self.opt.state_bytes()
    }

    /// The optimizer of this rank's parameters.
    pub fn optimizer(&self) -> &OptimizerChain {
        &self.opt
    }

    /// One step: `grads` holds this rank's gradient sums of its part of the batch (the layout of
    /// `params`); after it, every rank's `params` hold the whole updated model.
    pub fn step(
        &mut self,
        comm: &dyn Communicator,
        params: &mut ParamStore,
        grads: &ParamStore,
    ) -> Result<StepInfo, TrainError> {
        self.step_with(comm, params, grads, &mut |sq, _| super::grad_norm::sum_over_ranks(comm, sq), None)
    }

    /// [`ShardedOptimizer::step`] with the whole model's sum of squares from `global(this
    /// rank's sum, its summed gradients)` and, on a mesh, the factored statistics of split
    /// parameters summed over the model axis by `sum_over_shards`.
    pub fn step_with(
        &mut self,
        comm: &dyn Communicator,
        params: &mut ParamStore,
        grads: &ParamStore,
        global: &mut dyn FnMut(f64, &ParamStore) -> Result<f64, OptimError>,
        sum_over_shards: Option<&mut SumOverShards>,
    ) -> Result<StepInfo, TrainError> {
        let world = self.parts.len();
        // Reduce-scatter: part r of every rank's gradients, padded, in rank order.
        let mut send = vec![0f32; world * self.padded];
        for (r, part) in self.parts.iter().enumerate() {
            let g = grads.buffer(0).narrow(part.start, part.len())?.to_f32_vec()?;
            send[r * self.padded..r * self.padded + part.len()].copy_from_slice(&g);
        }
        let send = Tensor::from_f32(send, [world * self.padded], DType::F32, Device::Cpu)?;
        let mine = comm.reduce_scatter(&send, ReduceOp::Sum)?.to_f32_vec()?;
        let start = self.parts[self.rank].start;
        let mut g = ParamStore::new();
        for (name, offset, n) in &self.owned {
            let shape = grads.get(name)?.shape().clone();
            let values = mine[offset - start..offset - start + n].to_vec();
            g.insert(name.clone(), Tensor::from_f32(values, shape, DType::F32, Device::Cpu)?)?;
        }
        // Update this part with the whole model's gradient norm.
        let mut p = subset(params, self.owned.iter().map(|(n, _, _)| n.as_str()))?;
        let mut global = |sq: f64| global(sq, &g);
        let info = match sum_over_shards {
            Some(sum) => self.opt.step_tensor_parallel(&mut p, &g, &mut global, sum)?,
            None => self.opt.step_shard(&mut p, &g, &mut global)?,
        };
        // All-gather the updated parts and write them into every rank's parameters.
        let mut part = vec![0f32; self.padded];
        for (name, offset, n) in &self.owned {
            part[offset - start..offset - start + n].copy_from_slice(&p.get(name)?.to_f32_vec()?);
        }
        let all = comm.all_gather(&Tensor::from_f32(part, [1, self.padded], DType::F32, Device::Cpu)?)?;
        let all = all.reshape([world * self.padded])?;
        let buffer = params.buffer_mut(0);
        for (r, range) in self.parts.iter().enumerate() {
            if !range.is_empty() {
                buffer.write_at(range.start, &all.narrow(r * self.padded, range.len())?)?;
            }
        }
        Ok(info)
    }

    /// The whole optimizer state (as an unsharded optimizer's [`Optimizer::state`]) on rank 0,
    /// `None` on the others: every rank sends its share to rank 0. Every rank must call it.
    pub fn gather_state(&self, comm: &dyn Communicator) -> Result<Option<ParamStore>, TrainError> {
        gather_to_root(comm, self.opt.state()?, self.rank, self.parts.len())
    }

    /// Loads this rank's share of `full` (an unsharded optimizer's state, as a checkpoint
    /// holds it): a run saved at any world size and sharding resumes here.
    pub fn load_full_state(&mut self, full: &ParamStore) -> Result<(), TrainError> {
        let mine = self.opt.state()?;
        Ok(self.opt.load_state(&subset(full, mine.names())?)?)
    }
}

/// Every rank's optimizer-state share `state` (named tensors; the step counter on each) joined
/// on rank 0 of `comm` (`None` on the others): each rank sends its names, then its tensors.
/// Every rank of `comm` must call it.
pub(crate) fn gather_to_root(
    comm: &dyn Communicator,
    state: ParamStore,
    rank: usize,
    world: usize,
) -> Result<Option<ParamStore>, TrainError> {
    if rank != 0 {
        let names: String = state.names().map(|n| format!("{n}\n")).collect();
        comm.send(&bytes_tensor(names.as_bytes())?, 0)?;
        for (_, t) in state.iter() {
            comm.send(t, 0)?;
        }
        return Ok(None);
    }
    let mut all = state;
    for r in 1..world {
        let names = String::from_utf8(tensor_bytes(&comm.recv(r)?)?)
            .map_err(|e| TrainError::Io(format!("rank {r}'s optimizer state names: {e}")))?;
        for name in names.lines() {
            let t = comm.recv(r)?;
            // Every rank's share has the step counter; rank 0's stands for all.
            if !all.contains(name) {
                all.insert(name, t)?;
            }
        }
    }
    Ok(Some(all))
}

/// The tensors `names` of `store`, in that order, as a store of their own.
fn subset<'a>(store: &ParamStore, names: impl Iterator<Item = &'a str>) -> Result<ParamStore, TrainError> {
    let mut out = ParamStore::new();
    for name in names {
        out.insert(name, store.get(name)?.clone())?;
    }
    Ok(out)
}

/// `bytes` as a U32 tensor, one byte per element, with a trailing 0 (so never empty).
fn bytes_tensor(bytes: &[u8]) -> Result<Tensor, TrainError> {
    let words: Vec<u32> = bytes.iter().map(|&b| b as u32).chain([0]).collect();
    let n = words.len();
    Ok(Tensor::from_vec(words, [n], Device::Cpu)?)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>, TrainError> {
    let mut words = t.to_vec::<u32>()?;
    words.pop();
    Ok(words.into_iter().map(|w| w as u8).collect())
}

/// What updates the parameters after backward: one optimizer over all of them (every rank
/// alike, after the gradients are all-reduced), this rank's ZeRO-1 share, or its share of a
/// fully sharded model (whose gradients it holds itself).
pub enum Updater {
    /// `train.sharding = "none"`.
    Replicated(OptimizerChain),
    /// `train.sharding = "optimizer"`.
    Sharded(ShardedOptimizer),
    /// `train.sharding = "full"`: `params` are this rank's own.
    Full(Box<super::full_shard::FullShard>),
}

impl Updater {
    /// One update; `grads` are already summed over ranks when replicated, this rank's own when
    /// sharded.
    pub fn step(
        &mut self,
        comm: &dyn Communicator,
        params: &mut ParamStore,
        grads: &ParamStore,
    ) -> Result<StepInfo, TrainError> {
        match self {
            Updater::Replicated(o) => Ok(o.step(params, grads)?),
            Updater::Sharded(s) => s.step(comm, params, grads),
            // The gradients were reduce-scattered into the share during backward.
            Updater::Full(f) => f.step(params, &mut |sq, _| super::grad_norm::sum_over_ranks(comm, sq)),
        }
    }

    /// The whole optimizer state on rank 0 (`None` on other ranks when sharded); every rank
    /// must call it when sharded.
    pub fn state(&self, comm: &dyn Communicator) -> Result<Option<ParamStore>, TrainError> {
        match self {
            Updater::Replicated(o) => Ok(Some(o.state()?)),
            Updater::Sharded(s) => s.gather_state(comm),
            Updater::Full(f) => f.gather_state(comm),
        }
    }

    /// Loads the whole state `full` (this rank's share when sharded).
    pub fn load_state(&mut self, full: &ParamStore) -> Result<(), TrainError> {
        match self {
            Updater::Replicated(o) => Ok(o.load_state(full)?),
            Updater::Sharded(s) => s.load_full_state(full),
            Updater::Full(f) => f.load_full_state(full),
        }
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> u64 {
        match self {
            Updater::Replicated(o) => o.state_bytes(),
            Updater::Sharded(s) => s.state_bytes(),
            Updater::Full(f) => f.state_bytes(),
        }
    }

    /// True when saving needs every rank (the state is gathered).
    pub fn is_sharded(&self) -> bool {
        matches!(self, Updater::Sharded(_) | Updater::Full(_))
    }

    /// True under full sharding (each rank holds only its own parameters).
    pub fn is_full(&self) -> bool {
        matches!(self, Updater::Full(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay(sizes: &[usize]) -> (Vec<(String, usize, usize)>, usize) {
        let mut at = 0;
        let l = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let e = (format!("p{i}"), at, n);
                at += n.div_ceil(16) * 16;
                e
            })
            .collect();
        (l, at)
    }

    #[test]
    fn parts_are_whole_parameters_of_about_equal_size() {
        let (l, len) = lay(&[100, 100, 100, 100]);
        assert_eq!(partition(&l, len, 2), vec![0..224, 224..448]);
        assert_eq!(partition(&l, len, 4), vec![0..112, 112..224, 224..336, 336..448]);
        // More ranks than parameters: the last parts are empty.
        let (l, len) = lay(&[10, 500]);
        assert_eq!(partition(&l, len, 3), vec![0..16, 16..528, 528..528]);
        assert_eq!(partition(&l, len, 1), vec![0..len]);
    }
}
