//! Training on a `data × model` mesh (`train.mesh.model = K > 1`, issue 13): the world's ranks
//! form `world / K` data-parallel groups of K model ranks; the K ranks of a group read the same
//! examples and split every block matrix between them ([`TensorParallelViT`]). Gradients are
//! all-reduced over the data axis as in plain data parallelism; the optimizer updates each
//! rank's part with the whole model's gradient norm; checkpoints and evaluation see the whole
//! model, gathered over the model axis.

use super::{full_shard::FullShard, grad_norm, TrainError};
use vit_collective::{Axis, Communicator, MatmulComm, Mesh, MeshShape};
use vit_model::{ModelAxis, ParamStore, ShardSpec, TensorParallelViT, VisionTransformer};
use vit_optim::{OptimizerChain, StepInfo, STATE_COUNT};
use vit_tensor::Tensor;

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
        if world % model_ranks != 0 {
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

    /// The whole optimizer state (`m.NAME`, `v.NAME`, the step count) from every model
    /// rank's part, each moment split like its parameter (a collective of the model axis).
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

    /// How an optimizer-state tensor is split: like the parameter it belongs to.
    fn state_spec(&self, name: &str) -> Result<ShardSpec, TrainError> {
        if name == STATE_COUNT {
            return Ok(ShardSpec::Replicated);
        }
        for prefix in [vit_optim::STATE_M, vit_optim::STATE_V] {
            if let Some(param) = name.strip_prefix(prefix) {
                return Ok(self.tp.plan().spec(param)?.clone());
            }
        }
        Err(TrainError::Config(format!(
            "optimizer state {name}: only whole-tensor moments (m., v.) can be split over the model axis"
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
        Ok(opt.step_shard(params, grads, &mut global)?)
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
        let plan = self.tp.plan();
        let opt = share.optimizer();
        let counted: std::collections::HashSet<String> = params
            .names()
            .filter(|name| !plan.is_split(name) && opt.settings(name).is_some_and(|s| !s.frozen))
            .map(str::to_string)
            .collect();
        let n = self.tp.ranks();
        share.step(params, &mut |mine, grads| {
            let replicated = grad_norm::sum_of_squares_where(grads, |name| counted.contains(name))
                .map_err(|e| vit_optim::OptimError::Param { name: "(gradient norm)".into(), msg: e.to_string() })?;
            grad_norm::sum_over_ranks(world, grad_norm::share(mine, replicated, n))
        })
    }
}
