//! `train.sharding = "full"` (ZeRO-3, FSDP; ViT-22B shards its parameters over the data axis):
//! each data-parallel rank keeps about 1/N of every stage's parameters (whole tensors), their
//! gradients and their optimizer state, and nothing else between steps. A step runs the model
//! stage by stage ([`StagedModel`]): before a stage runs, forward or backward, its parameters are
//! all-gathered from their owners, and dropped after; after a stage's backward its gradients are
//! reduce-scattered, each rank keeping the sum over ranks of its own. So a rank's peak holds one
//! stage's whole parameters and gradients, not the model's.
//!
//! Checkpoints and evaluation gather the whole model to data rank 0 alone, stage by stage.
//!
//! On a `data × model` mesh the same runs over the data axis on each rank's part of the model
//! (the tensor-parallel stages): parameters then are split over both axes.
//!
//! Reductions run in rank order per micro-batch, then add up over the micro-batches: the same
//! gradients as one all-reduce within float tolerance (not bit for bit: the order differs).

use super::{zero, TrainError};
use vit_collective::{Communicator, ReduceOp};
use vit_model::StagedModel;
use vit_optim::{Optimizer, OptimizerChain, OptimizerConfig, ParamShard, StepInfo, SumOverShards};
use vit_tensor::{DType, Device, ParamStore, Tensor};

/// Given which names this rank owns: its parameters (made fresh, or picked from whole ones).
pub type MakeMine<'a> = dyn FnMut(&dyn Fn(&str) -> bool) -> Result<ParamStore, TrainError> + 'a;

/// Given the logits: the sum of the per-example losses and the logits' gradient.
pub type LossGrad<'a> = dyn FnMut(&Tensor) -> Result<(f64, Tensor), TrainError> + 'a;

/// Where one parameter of a stage lives: its owner and its place in the owner's part.
#[derive(Debug, Clone)]
struct Placed {
    name: String,
    dims: Vec<usize>,
    owner: usize,
    /// Element offset in the owner's packed part of the stage.
    offset: usize,
}

/// One stage's parameters over the ranks.
#[derive(Debug, Clone)]
struct StageLayout {
    /// The stage's parameters, in the model's order.
    params: Vec<Placed>,
    /// Elements of the largest rank's part: what every part is padded to.
    padded: usize,
}

impl StageLayout {
    /// Whole parameters to ranks, largest first, each to the least-loaded rank (lowest on
    /// ties): the same layout on every rank.
    fn new(params: Vec<(String, Vec<usize>)>, world: usize) -> Self {
        let numel = |d: &[usize]| d.iter().product::<usize>();
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(numel(&params[i].1)), i));
        let mut load = vec![0usize; world];
        let mut owner = vec![0usize; params.len()];
        for i in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            owner[i] = r;
            load[r] += numel(&params[i].1);
        }
        let mut filled = vec![0usize; world];
        let placed = params
            .into_iter()
            .zip(owner)
            .map(|((name, dims), owner)| {
                let offset = filled[owner];
                filled[owner] += numel(&dims);
                Placed { name, dims, owner, offset }
            })
            .collect();
        StageLayout { params: placed, padded: filled.into_iter().max().unwrap_or(0).max(1) }
    }
}

/// One data-parallel rank's share of a fully sharded model and its optimizer.
pub struct FullShard {
    rank: usize,
    world: usize,
    stages: Vec<StageLayout>,
    opt: OptimizerChain,
    /// This rank's gradients of the current step (its parameters' layout), summed over ranks.
    grads: ParamStore,
}

impl FullShard {
    /// Rank `rank` of `world`'s share of a model whose parameters have `shapes` (the whole
    /// model's, or this model rank's parts), cut into `stages` (every parameter in one), with
    /// an optimizer of `config` over its own parameters. `make_mine(owns)` makes this rank's
    /// parameters: those whose names `owns` accepts (fresh, or picked from a checkpoint).
    /// `shards` names the parameters that are this model rank's part of a whole one (empty
    /// without a model axis): the optimizer factors them over the whole shapes
    /// ([`OptimizerChain::with_shards`]). Returns the share and this rank's parameters.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: OptimizerConfig,
        shapes: Vec<(String, Vec<usize>)>,
        stages: Vec<Vec<String>>,
        rank: usize,
        world: usize,
        shards: &std::collections::HashMap<String, ParamShard>,
        make_mine: &mut MakeMine<'_>,
    ) -> Result<(Self, ParamStore), TrainError> {
        let dims_of: std::collections::HashMap<String, Vec<usize>> = shapes.iter().cloned().collect();
        let mut layouts = Vec::with_capacity(stages.len());
        for names in stages {
            let params = names
                .into_iter()
                .map(|n| match dims_of.get(&n) {
                    Some(d) => Ok((n, d.clone())),
                    None => Err(TrainError::Config(format!("full sharding: stage parameter {n} is not in the model"))),
                })
                .collect::<Result<Vec<_>, TrainError>>()?;
            layouts.push(StageLayout::new(params, world));
        }
        let counted: usize = layouts.iter().map(|l| l.params.len()).sum();
        if counted != shapes.len() {
            return Err(TrainError::Config(format!(
                "full sharding: the stages name {counted} parameters, the model has {}",
                shapes.len()
            )));
        }
        let owned: std::collections::HashSet<String> =
            layouts.iter().flat_map(|l| l.params.iter().filter(|p| p.owner == rank).map(|p| p.name.clone())).collect();
        let made = make_mine(&|name| owned.contains(name))?;
        // In the stages' order, and exactly the owned names.
        let mut mine = ParamStore::new();
        for l in &layouts {
            for p in l.params.iter().filter(|p| p.owner == rank) {
                mine.insert(p.name.clone(), made.get(&p.name)?.clone())?;
            }
        }
        if made.len() != mine.len() {
            return Err(TrainError::Config(format!(
                "full sharding: rank {rank} was given {} parameters, it owns {}",
                made.len(),
                mine.len()
            )));
        }
        let shards = shards.iter().filter(|(n, _)| owned.contains(*n)).map(|(n, s)| (n.clone(), s.clone())).collect();
        let opt = OptimizerChain::with_shards(config, &mine, &shards)?;
        let grads = mine.zeros_like(DType::F32)?;
        Ok((FullShard { rank, world, stages: layouts, opt, grads }, mine))
    }

    /// The optimizer of this rank's parameters.
    pub fn optimizer(&self) -> &OptimizerChain {
        &self.opt
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> u64 {
        self.opt.state_bytes()
    }

    /// Stage `s`'s whole parameters from their owners (`mine`: this rank's parameters), in
    /// `dtype`, on `device`. A collective of the data axis `comm`.
    pub fn gather_stage(
        &self,
        s: usize,
        mine: &ParamStore,
        comm: &dyn Communicator,
        dtype: DType,
        device: Device,
    ) -> Result<ParamStore, TrainError> {
        let l = &self.stages[s];
        let part = self.pack(s, mine)?;
        let all = comm.all_gather(&Tensor::from_f32(part, [1, l.padded], DType::F32, Device::Cpu)?)?.to_f32_vec()?;
        let mut out = ParamStore::new();
        for p in &l.params {
            let start = p.owner * l.padded + p.offset;
            let n: usize = p.dims.iter().product();
            let t = Tensor::from_f32(all[start..start + n].to_vec(), p.dims.clone(), dtype, Device::Cpu)?;
            out.insert(p.name.clone(), t)?;
        }
        Ok(out.to_device(device)?)
    }

    /// Reduce-scatters stage `s`'s gradients `g` (every rank's own, the stage's names) and
    /// adds this rank's parameters' sums into its gradients. A collective of `comm`.
    fn scatter_stage_grads(&mut self, s: usize, g: &ParamStore, comm: &dyn Communicator) -> Result<(), TrainError> {
        let l = &self.stages[s];
        let mut send = vec![0f32; self.world * l.padded];
        for p in &l.params {
            let v = g.get(&p.name)?.to_f32_vec()?;
            let start = p.owner * l.padded + p.offset;
            send[start..start + v.len()].copy_from_slice(&v);
        }
        let send = Tensor::from_f32(send, [self.world * l.padded], DType::F32, Device::Cpu)?;
        let summed = comm.reduce_scatter(&send, ReduceOp::Sum)?.to_f32_vec()?;
        for p in l.params.iter().filter(|p| p.owner == self.rank) {
            let n: usize = p.dims.iter().product();
            let t = Tensor::from_f32(summed[p.offset..p.offset + n].to_vec(), p.dims.clone(), DType::F32, Device::Cpu)?;
            self.grads.accumulate(&p.name, &t)?;
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch `x` (in the compute dtype, on the device), stage
    /// by stage, each stage's parameters gathered when it runs (twice: forward and backward)
    /// and its gradients reduce-scattered after its backward. `loss_grad(logits)` gives the
    /// per-example losses' sum and the logits' gradient. Returns the loss sum.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batch(
        &mut self,
        model: &dyn StagedModel,
        mine: &ParamStore,
        x: &Tensor,
        comm: &dyn Communicator,
        dtype: DType,
        device: Device,
        loss_grad: &mut LossGrad<'_>,
    ) -> Result<f64, TrainError> {
        let n = self.stages.len();
        let (mut h, mut inputs, mut saved) = (x.clone(), Vec::with_capacity(n), Vec::with_capacity(n));
        for s in 0..n {
            let p = self.gather_stage(s, mine, comm, dtype, device)?;
            let (y, sv) = model.stage_forward(s, &p, &h)?;
            inputs.push(std::mem::replace(&mut h, y));
            saved.push(sv);
        }
        let (loss, mut dy) = loss_grad(&h)?;
        for s in (0..n).rev() {
            let p = self.gather_stage(s, mine, comm, dtype, device)?;
            let mut g = p.zeros_like(DType::F32)?;
            dy = model.stage_backward(s, &p, &inputs[s], &saved[s], &dy, &mut g)?;
            saved.pop();
            self.scatter_stage_grads(s, &g, comm)?;
        }
        Ok(loss)
    }

    /// Updates this rank's parameters `mine` with its summed gradients and clears them. The
    /// gradient norm is the whole model's: `global` turns this rank's sum of squares into the
    /// sum over every rank that holds a distinct part (an all-reduce).
    pub fn step(
        &mut self,
        mine: &mut ParamStore,
        global: &mut dyn FnMut(f64, &ParamStore) -> Result<f64, vit_optim::OptimError>,
    ) -> Result<StepInfo, TrainError> {
        let grads = std::mem::replace(&mut self.grads, mine.zeros_like(DType::F32)?);
        let info = self.opt.step_shard(mine, &grads, &mut |sq| global(sq, &grads))?;
        Ok(info)
    }

    /// [`FullShard::step`] on a mesh: `sum_over_shards` sums the factored statistics of this
    /// rank's split parameters over the model axis (the data rank at the same coordinate of
    /// every model rank owns the same parameters: the layout depends on the shapes alone).
    pub fn step_tensor_parallel(
        &mut self,
        mine: &mut ParamStore,
        global: &mut dyn FnMut(f64, &ParamStore) -> Result<f64, vit_optim::OptimError>,
        sum_over_shards: &mut SumOverShards,
    ) -> Result<StepInfo, TrainError> {
        let grads = std::mem::replace(&mut self.grads, mine.zeros_like(DType::F32)?);
        Ok(self.opt.step_tensor_parallel(mine, &grads, &mut |sq| global(sq, &grads), sum_over_shards)?)
    }

    /// This rank's packed part of stage `s`'s parameters, `[padded]` f32.
    fn pack(&self, s: usize, mine: &ParamStore) -> Result<Vec<f32>, TrainError> {
        let l = &self.stages[s];
        let mut part = vec![0f32; l.padded];
        for p in l.params.iter().filter(|p| p.owner == self.rank) {
            let v = mine.get(&p.name)?.to_f32_vec()?;
            part[p.offset..p.offset + v.len()].copy_from_slice(&v);
        }
        Ok(part)
    }

    /// The whole (this model rank's) parameters from every data rank's `mine`, on rank 0 of
    /// `comm` (`None` on the others), stage by stage: each rank sends rank 0 its part, so only
    /// rank 0 ever holds the whole model (checkpoints and evaluation).
    pub fn gather_params_to_root(
        &self,
        mine: &ParamStore,
        comm: &dyn Communicator,
    ) -> Result<Option<ParamStore>, TrainError> {
        let mut out = ParamStore::new();
        for (s, l) in self.stages.iter().enumerate() {
            let part = Tensor::from_f32(self.pack(s, mine)?, [l.padded], DType::F32, Device::Cpu)?;
            if self.rank != 0 {
                comm.send(&part, 0)?;
                continue;
            }
            let mut parts = vec![part.to_f32_vec()?];
            for r in 1..self.world {
                parts.push(comm.recv(r)?.to_f32_vec()?);
            }
            for p in &l.params {
                let n: usize = p.dims.iter().product();
                let v = parts[p.owner][p.offset..p.offset + n].to_vec();
                out.insert(p.name.clone(), Tensor::from_f32(v, p.dims.clone(), DType::F32, Device::Cpu)?)?;
            }
        }
        Ok((self.rank == 0).then_some(out))
    }

    /// The whole optimizer state on rank 0 of `comm` (`None` on the others).
    pub fn gather_state(&self, comm: &dyn Communicator) -> Result<Option<ParamStore>, TrainError> {
        zero::gather_to_root(comm, self.opt.state()?, self.rank, self.world)
    }

    /// This rank's parameters of `whole` (e.g. a checkpoint's).
    pub fn my_params(&self, whole: &ParamStore) -> Result<ParamStore, TrainError> {
        let mut mine = ParamStore::new();
        for l in &self.stages {
            for p in l.params.iter().filter(|p| p.owner == self.rank) {
                mine.insert(p.name.clone(), whole.get(&p.name)?.clone())?;
            }
        }
        Ok(mine)
    }

    /// Loads this rank's share of `full` (a whole optimizer state, as a checkpoint holds it).
    pub fn load_full_state(&mut self, full: &ParamStore) -> Result<(), TrainError> {
        let names: Vec<String> = self.opt.state()?.names().map(str::to_string).collect();
        let mut mine = ParamStore::new();
        for n in &names {
            mine.insert(n.clone(), full.get(n)?.clone())?;
        }
        Ok(self.opt.load_state(&mine)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_parameters_go_to_the_least_loaded_rank_largest_first() {
        let p = |n: &str, d: &[usize]| (n.to_string(), d.to_vec());
        let l = StageLayout::new(vec![p("a", &[10]), p("b", &[4, 10]), p("c", &[30]), p("d", &[5])], 2);
        let owners: Vec<(String, usize, usize)> =
            l.params.iter().map(|q| (q.name.clone(), q.owner, q.offset)).collect();
        // b (40) → 0, c (30) → 1, a (10) → 1 (30 < 40), d (5) → 0 (40 = 40: the lower rank); each
        // rank packs its parameters in the stage's order (rank 1: a at 0, c at 10).
        assert_eq!(owners, vec![("a".into(), 1, 0), ("b".into(), 0, 0), ("c".into(), 1, 10), ("d".into(), 0, 40)]);
        assert_eq!(l.padded, 45);
        // More ranks than parameters: empty parts are padded to one element.
        let l = StageLayout::new(vec![p("a", &[3])], 4);
        assert_eq!((l.params[0].owner, l.padded), (0, 3));
    }
}
