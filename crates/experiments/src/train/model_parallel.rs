//! Training on a `data × model` mesh (`train.mesh.model = K > 1`, issue 13): the world's ranks
//! form `world / K` data-parallel groups of K model ranks; the K ranks of a group read the same
//! examples and split every block matrix between them ([`TensorParallelViT`]). Gradients are
//! all-reduced over the data axis as in plain data parallelism; the optimizer updates each
//! rank's part with the whole model's gradient norm; checkpoints and evaluation see the whole
//! model, gathered over the model axis.
//!
//! Factored Adam factors a split matrix over the whole matrix's axes: the row or column sums
//! over the split axis are summed over the model axis (f64, in rank order), and the statistic
//! without the split axis is replicated ([`vit_optim::factored_update_sharded`]). Checkpoints
//! hold `v_row` / `v_col` in the whole model's layout, as for one rank.

use super::{full_shard::FullShard, grad_norm, TrainError};
use std::collections::HashMap;
use vit_collective::{Axis, Communicator, MatmulComm, Mesh, MeshShape};
use vit_model::{ModelAxis, ParamStore, ShardSpec, TensorParallelViT, VisionTransformer};
use vit_optim::{
    factored_dims, OptimError, OptimizerChain, OptimizerConfig, ParamShard, StepInfo, STATE_COUNT, STATE_V_COL,
    STATE_V_ROW,
};
use vit_tensor::{Device, Tensor};

/// This rank's place on the mesh and its part of the model.
pub struct ModelParallel {
    mesh: Mesh,
    /// The model as this rank holds it.
    pub tp: TensorParallelViT,
    matmul: MatmulComm,
}

impl ModelParallel {
    /// The mesh of `comm`'s ranks with `model` ranks per data-parallel group (a collective),
    /// and `model` split over them; `None` when `model` is 1.
    pub fn new(
        comm: &dyn Communicator,
        model: &VisionTransformer,
        model_ranks: usize,
        matmul: MatmulComm,
    ) -> Result<Option<Self>, TrainError> {
        if model_ranks <= 1 {
            return Ok(None);
        }
        let world = comm.world_size();
        if !world.is_multiple_of(model_ranks) {
            return Err(TrainError::Config(format!(
                "train.mesh.model = {model_ranks}: expected a divisor of the {world} ranks"
            )));
        }
        let mesh = Mesh::new(comm, MeshShape::data_model(world / model_ranks, model_ranks)?)?;
        let tp = TensorParallelViT::new(model, model_ranks, mesh.coord(Axis::Model))?;
        Ok(Some(ModelParallel { mesh, tp, matmul }))
    }

    /// The data axis: the ranks holding the same part of the model.
    pub fn data(&self) -> &dyn Communicator {
        self.mesh.axis(Axis::Data).expect("a data × model mesh has a data axis")
    }

    /// The model axis: the ranks sharing one copy of the model.
    pub fn model_comm(&self) -> &dyn Communicator {
        self.mesh.axis(Axis::Model).expect("a data × model mesh has a model axis")
    }

    /// The model axis and the collective-matmul mode, for the forward and backward passes.
    pub fn axis(&self) -> ModelAxis<'_> {
        ModelAxis { comm: self.model_comm(), matmul: self.matmul }
    }

    /// `data=2,model=2`.
    pub fn describe(&self) -> String {
        self.mesh.shape().to_string()
    }

    /// The whole model's parameters from every model rank's part (a collective of the model
    /// axis; every rank gets them).
    pub fn gather_params(&self, local: &ParamStore) -> Result<ParamStore, TrainError> {
        Ok(self.tp.gather_params(local, self.model_comm())?)
    }

    /// How each split parameter of this rank's part is cut from the whole, for the optimizer.
    pub fn shards(&self) -> HashMap<String, ParamShard> {
        let n = self.tp.ranks();
        self.tp
            .plan()
            .params
            .iter()
            .filter_map(|(name, dims, spec)| match spec {
                ShardSpec::Split { dim, .. } => {
                    Some((name.clone(), ParamShard { full_dims: dims.clone(), axis: *dim, ranks: n }))
                }
                ShardSpec::Replicated => None,
            })
            .collect()
    }

    /// The optimizer of this rank's part `params`: factored Adam factors the split parameters
    /// over their whole shapes' axes ([`OptimizerChain::with_shards`]).
    pub fn optimizer(&self, config: OptimizerConfig, params: &ParamStore) -> Result<OptimizerChain, TrainError> {
        Ok(OptimizerChain::with_shards(config, params, &self.shards())?)
    }

    /// The whole optimizer state (`m.NAME`, `v.NAME`, `v_row.NAME`, `v_col.NAME`, the step
    /// count) from every model rank's part, each split like its parameter or replicated (a
    /// collective of the model axis).
    pub fn gather_state(&self, local: &ParamStore) -> Result<ParamStore, TrainError> {
        let n = self.tp.ranks();
        let mut out = ParamStore::new();
        for (name, t) in local.iter() {
            let whole = match self.state_spec(name)? {
                ShardSpec::Replicated => t.clone(),
                spec => {
                    let all = self.model_comm().all_gather(t)?;
                    let d0 = t.dims().first().copied().unwrap_or(1);
                    let parts = (0..n).map(|m| all.narrow(m * d0, d0)).collect::<Result<Vec<Tensor>, _>>()?;
                    spec.unshard(&parts)?
                }
            };
            out.insert(name, whole)?;
        }
        Ok(out)
    }

    /// This rank's part of a whole optimizer state.
    pub fn shard_state(&self, whole: &ParamStore) -> Result<ParamStore, TrainError> {
        let mut out = ParamStore::new();
        let m = self.mesh.coord(Axis::Model);
        for (name, t) in whole.iter() {
            out.insert(name, self.state_spec(name)?.shard(t, m, self.tp.ranks())?)?;
        }
        Ok(out)
    }

    /// How an optimizer-state tensor is split: a moment like the parameter it belongs to; a
    /// factored statistic (the parameter's shape without axis `d0` for `v_row`, `d1` for
    /// `v_col`) replicated when that axis is the split one, else split along the same axis.
    fn state_spec(&self, name: &str) -> Result<ShardSpec, TrainError> {
        if name == STATE_COUNT {
            return Ok(ShardSpec::Replicated);
        }
        for prefix in [vit_optim::STATE_M, vit_optim::STATE_V] {
            if let Some(param) = name.strip_prefix(prefix) {
                return Ok(self.tp.plan().spec(param)?.clone());
            }
        }
        for (prefix, row) in [(STATE_V_ROW, true), (STATE_V_COL, false)] {
            let Some(param) = name.strip_prefix(prefix) else { continue };
            let ShardSpec::Split { dim, segments } = self.tp.plan().spec(param)? else {
                return Ok(ShardSpec::Replicated);
            };
            let whole = self.tp.plan().params.iter().find(|(n, _, _)| n == param).map(|(_, d, _)| d.as_slice());
            // A statistic exists only for a factored parameter, whose axes do not depend on
            // the size threshold: the threshold only decides whether it is factored.
            let Some(fd) = whole.and_then(|d| factored_dims(d, 0)) else {
                return Err(TrainError::Config(format!("optimizer state {name}: {param} is not a matrix")));
            };
            let dropped = if row { fd.d0 } else { fd.d1 };
            return Ok(match dim.cmp(&dropped) {
                std::cmp::Ordering::Equal => ShardSpec::Replicated,
                std::cmp::Ordering::Less => ShardSpec::Split { dim: *dim, segments: segments.clone() },
                std::cmp::Ordering::Greater => ShardSpec::Split { dim: dim - 1, segments: segments.clone() },
            });
        }
        Err(TrainError::Config(format!(
            "optimizer state {name}: only moments (m., v.) and factored statistics (v_row., v_col.) can be \
             split over the model axis"
        )))
    }

    /// One update of this rank's part: the gradient norm (for clipping and the log) is the whole
    /// model's — the split parameters' squares summed over the model axis, the replicated
    /// ones (the same on every model rank) counted once.
    pub fn step(
        &self,
        opt: &mut OptimizerChain,
        params: &mut ParamStore,
        grads: &ParamStore,
    ) -> Result<StepInfo, TrainError> {
        let plan = self.tp.plan();
        let replicated = grad_norm::sum_of_squares_where(grads, |name| {
            !plan.is_split(name) && opt.settings(name).is_some_and(|s| !s.frozen)
        })?;
        let n = self.tp.ranks();
        let mut global =
            |mine: f64| grad_norm::sum_over_ranks(self.model_comm(), grad_norm::share(mine, replicated, n));
        let mut sum = |x: &mut [f64]| sum_f64_over_ranks(self.model_comm(), x);
        Ok(opt.step_tensor_parallel(params, grads, &mut global, &mut sum)?)
    }

    /// The whole model's sum of squares for a share sharded over the data axis too (ZeRO-1 or
    /// full): given this rank's own squares `mine` and the gradients it holds, the replicated
    /// trainable parameters' squares (the same on every model rank) count 1/K each, and the
    /// parts are summed over `world`, every rank of the mesh.
    fn mesh_norm<'a>(
        &'a self,
        params: &ParamStore,
        opt: &OptimizerChain,
        world: &'a dyn Communicator,
    ) -> impl Fn(f64, &ParamStore) -> Result<f64, OptimError> + 'a {
        let plan = self.tp.plan();
        let counted: std::collections::HashSet<String> = params
            .names()
            .filter(|name| !plan.is_split(name) && opt.settings(name).is_some_and(|s| !s.frozen))
            .map(str::to_string)
            .collect();
        let n = self.tp.ranks();
        move |mine, grads| {
            let replicated = grad_norm::sum_of_squares_where(grads, |name| counted.contains(name))
                .map_err(|e| OptimError::Param { name: "(gradient norm)".into(), msg: e.to_string() })?;
            grad_norm::sum_over_ranks(world, grad_norm::share(mine, replicated, n))
        }
    }

    /// [`ModelParallel::step`] of a ZeRO-1 share over the data axis `data` (this rank's
    /// optimizer state for about 1/D of its model part's parameters; `grads` not yet summed
    /// over `data`): the norm's parts are summed over `world`, every rank of the mesh (the data
    /// ranks own distinct parameters, the model ranks distinct parts but for the replicated
    /// ones, counted 1/K each).
    pub fn step_zero1(
        &self,
        share: &mut super::zero::ShardedOptimizer,
        params: &mut ParamStore,
        grads: &ParamStore,
        world: &dyn Communicator,
    ) -> Result<StepInfo, TrainError> {
        let norm = self.mesh_norm(params, share.optimizer(), world);
        let mut sum = |x: &mut [f64]| sum_f64_over_ranks(self.model_comm(), x);
        share.step_with(self.data(), params, grads, &mut |mine, owned| norm(mine, owned), Some(&mut sum))
    }

    /// [`ModelParallel::step`] of a share of a model fully sharded over the data axis: the
    /// parts are summed over `world`, every rank of the mesh (each holds distinct parameters but
    /// for the replicated ones, which each model rank's data ranks hold once between them).
    pub fn step_full(
        &self,
        share: &mut FullShard,
        params: &mut ParamStore,
        world: &dyn Communicator,
    ) -> Result<StepInfo, TrainError> {
        let norm = self.mesh_norm(params, share.optimizer(), world);
        let mut sum = |x: &mut [f64]| sum_f64_over_ranks(self.model_comm(), x);
        share.step_tensor_parallel(params, &mut |mine, grads| norm(mine, grads), &mut sum)
    }
}

/// `x` summed element by element over the ranks of `comm`, in place, in f64: an all-gather of
/// every rank's values (as bits) added in rank order, so every rank gets the same bits.
fn sum_f64_over_ranks(comm: &dyn Communicator, x: &mut [f64]) -> Result<(), OptimError> {
    if x.is_empty() {
        return Ok(()); // the same on every rank: the layouts agree
    }
    let words: Vec<u32> = x
        .iter()
        .flat_map(|v| {
            let b = v.to_bits();
            [b as u32, (b >> 32) as u32]
        })
        .collect();
    let len = words.len();
    let mine = Tensor::from_vec(words, [len], Device::Cpu)?;
    let all = comm
        .all_gather(&mine)
        .map_err(|e| OptimError::Collective { name: "(factored statistics)".into(), msg: e.to_string() })?
        .to_vec::<u32>()?;
    if all.len() != len * comm.world_size() {
        return Err(OptimError::Collective {
            name: "(factored statistics)".into(),
            msg: format!("gathered {} words: expected {} from each of {} ranks", all.len(), len, comm.world_size()),
        });
    }
    for (r, part) in all.chunks_exact(len).enumerate() {
        for (v, w) in x.iter_mut().zip(part.chunks_exact(2)) {
            let value = f64::from_bits(w[0] as u64 | (w[1] as u64) << 32);
            *v = if r == 0 { value } else { *v + value };
        }
    }
    Ok(())
}
