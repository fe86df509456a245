//! `model.moe.expert_parallel = true` in training (issue 11 item 5): the experts of every MoE
//! layer are sharded over the data-parallel ranks. Rank r of W holds experts `r·E/W ..
//! (r+1)·E/W` of each layer and every other parameter whole; its images' tokens reach the other
//! ranks' experts by all-to-all ([`VisionTransformer::forward_train_ep`]).
//!
//! - Gradients: a rank's expert gradients are already the whole batch's (every rank's tokens
//!   passed through them); only the replicated parameters (routers included) are all-reduced,
//!   in runs of adjacent tensors. The auxiliary losses count with each micro-batch's share of
//!   the global batch, as without expert parallelism, so the routers' summed gradient is the
//!   batch's.
//! - The optimizer updates this rank's parameters, its experts' state alone; the gradient norm
//!   for clipping is the whole model's (experts' squares summed over the ranks, the replicated
//!   ones counted once).
//! - Checkpoints hold every expert (gathered over the ranks) and the whole optimizer state; a
//!   resumed run shards them again, so it may resume on another world size, with or without
//!   expert parallelism.
//!
//! Not combined with tensor parallelism (`train.mesh.model > 1`) or ZeRO-1
//! (`train.sharding = "optimizer"`): both are refused with a config error.

use super::{config, grad_norm, TrainError};
use vit_collective::{Communicator, ReduceOp};
use vit_model::VisionTransformer;
use vit_optim::{Algorithm, OptimizerChain, OptimizerConfig, StepInfo, STATE_M, STATE_V, STATE_V_COL, STATE_V_ROW};
use vit_tensor::ParamStore;

/// This rank's share of the experts.
pub struct ExpertParallel {
    /// Names of the expert parameters (`[E, ...]`), of every MoE layer.
    experts: Vec<String>,
    /// E/W, this rank's experts per layer.
    local: usize,
    rank: usize,
    world: usize,
}

impl ExpertParallel {
    /// Expert parallelism over the ranks of `comm` (all of them data-parallel: a model axis is
    /// refused) when the model config asks for it and there are several ranks; `None`
    /// otherwise. A config error when E is not a multiple of the ranks or another sharding is
    /// asked for too.
    pub fn new(
        cfg: &config::TrainConfig,
        model: &VisionTransformer,
        comm: &dyn Communicator,
    ) -> Result<Option<Self>, TrainError> {
        let Some(moe) = model.config.moe.as_ref().filter(|m| m.expert_parallel) else { return Ok(None) };
        let model_ranks = cfg.train.mesh.model;
        if model_ranks > 1 {
            return Err(TrainError::Config(format!(
                "model.moe.expert_parallel = true with train.mesh.model = {model_ranks}: expected one of the two \
                 (experts sharded over the data axis, or tensor parallelism)"
            )));
        }
        let world = comm.world_size();
        if world <= 1 {
            return Ok(None);
        }
        if cfg.train.sharding == config::Sharding::Optimizer {
            return Err(TrainError::Config(
                "model.moe.expert_parallel = true with train.sharding = \"optimizer\": expected one of the two \
                 (experts sharded over the ranks, or the optimizer state)"
                    .into(),
            ));
        }
        if moe.experts % world != 0 {
            return Err(TrainError::Config(format!(
                "model.moe.experts = {}: expected a multiple of the {world} data-parallel ranks \
                 (model.moe.expert_parallel = true shards the experts over them)",
                moe.experts
            )));
        }
        let local = model.experts_per_rank(world)?;
        Ok(Some(ExpertParallel { experts: model.expert_param_names(), local, rank: comm.rank(), world }))
    }

    /// E/W, this rank's experts per MoE layer.
    pub fn local_experts(&self) -> usize {
        self.local
    }

    /// Whether `name`, a parameter or an optimizer-state tensor (`m.NAME`, `v.NAME`,
    /// `v_row.NAME`, `v_col.NAME`), belongs to an expert parameter.
    fn is_expert(&self, name: &str) -> bool {
        let param = [STATE_M, STATE_V, STATE_V_ROW, STATE_V_COL]
            .iter()
            .find_map(|p| name.strip_prefix(p).filter(|rest| self.experts.iter().any(|e| e == rest)))
            .unwrap_or(name);
        self.experts.iter().any(|e| e == param)
    }

    /// The factored second moment must keep experts apart and be the same on a shard as on
    /// the whole tensor: neither of its two axes may be the expert axis. A config error names
    /// the parameter otherwise.
    pub fn check_optimizer(&self, oc: &OptimizerConfig, params: &ParamStore) -> Result<(), TrainError> {
        let Algorithm::FactoredAdam(fc) = &oc.algorithm else { return Ok(()) };
        for name in &self.experts {
            let local = params.get(name)?.dims().to_vec();
            let mut whole = local.clone();
            whole[0] *= self.world;
            let axes = |d: &[usize]| vit_optim::factored_dims(d, fc.min_dim_size_to_factor).map(|f| (f.d0, f.d1));
            let (w, l) = (axes(&whole), axes(&local));
            if w != l || w.is_some_and(|(d0, d1)| d0 == 0 || d1 == 0) {
                return Err(TrainError::Config(format!(
                    "model.moe.expert_parallel = true: optimizer.name = factored-adam factors the second moment of \
                     {name} {whole:?} over its expert axis (axis 0), or differently on the {} experts of a rank: \
                     expected expert tensors whose two largest axes are not the expert axis (optimizer.name = adamw \
                     keeps them apart)",
                    self.local
                )));
            }
        }
        Ok(())
    }

    /// This rank's shard of whole parameters or a whole optimizer state: expert tensors
    /// narrowed to this rank's experts (axis 0), everything else whole, in the same order.
    pub fn shard(&self, whole: &ParamStore) -> Result<ParamStore, TrainError> {
        let mut out = ParamStore::new();
        for (name, t) in whole.iter() {
            let t = if self.is_expert(name) {
                let e = t.dims().first().copied().unwrap_or(0);
                if e != self.local * self.world {
                    return Err(TrainError::Config(format!(
                        "{name} {:?}: expected {} experts along axis 0 to shard over {} ranks",
                        t.dims(),
                        self.local * self.world,
                        self.world
                    )));
                }
                t.narrow(self.rank * self.local, self.local)?
            } else {
                t.clone()
            };
            out.insert(name, t)?;
        }
        Ok(out)
    }

    /// The whole parameters or optimizer state from every rank's shard (a collective of `dp`:
    /// every rank calls it and gets the whole).
    pub fn gather(&self, dp: &dyn Communicator, local: &ParamStore) -> Result<ParamStore, TrainError> {
        let mut out = ParamStore::new();
        for (name, t) in local.iter() {
            let t = if self.is_expert(name) { dp.all_gather(t)? } else { t.clone() };
            out.insert(name, t)?;
        }
        Ok(out)
    }

    /// Sums the replicated parameters' gradients over `dp`'s ranks, in place; the experts'
    /// (complete on their rank) are left alone. One all-reduce per run of adjacent replicated
    /// tensors of a buffer (the padding between them travels too).
    pub fn reduce_replicated(&self, dp: &dyn Communicator, grads: &mut ParamStore) -> Result<(), TrainError> {
        let mut entries = grads
            .names()
            .map(|n| grads.placement(n).map(|p| (p.buffer, p.offset, p.offset + p.numel, self.is_expert(n))))
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_unstable();
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        let mut open = false;
        for (b, start, end, expert) in entries {
            match runs.last_mut() {
                _ if expert => open = false,
                Some(run) if open && run.0 == b => run.2 = end,
                _ => {
                    runs.push((b, start, end));
                    open = true;
                }
            }
        }
        for (b, start, end) in runs {
            let summed = dp.all_reduce(&grads.buffer(b).narrow(start, end - start)?, ReduceOp::Sum)?;
            grads.buffer_mut(b).write_at(start, &summed)?;
        }
        Ok(())
    }

    /// One update of this rank's parameters (its experts and the replicated ones) with the whole
    /// model's gradient norm: each rank adds its experts' squares and 1/W of the replicated
    /// ones (the same on every rank), summed over `dp`.
    pub fn step(
        &self,
        dp: &dyn Communicator,
        opt: &mut OptimizerChain,
        params: &mut ParamStore,
        grads: &ParamStore,
    ) -> Result<StepInfo, TrainError> {
        let w = self.world;
        let replicated = grad_norm::sum_of_squares_where(grads, |name| {
            opt.settings(name).is_some_and(|s| !s.frozen) && !self.is_expert(name)
        })?;
        let mut global = |mine: f64| grad_norm::sum_over_ranks(dp, grad_norm::share(mine, replicated, w));
        Ok(opt.step_shard(params, grads, &mut global)?)
    }
}
