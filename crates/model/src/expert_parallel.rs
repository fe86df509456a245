//! Expert parallelism for the whole model (issue 11 item 5): which parameters are experts and
//! each rank's shard of a model's parameters. Rank r of W holds experts `r·E/W .. (r+1)·E/W` of
//! every MoE layer (the leading E axis of `{block}.moe.experts.*`) under the same names, and
//! every other parameter (the routers included) whole. The layer itself is
//! [`crate::layers::moe_parallel`]; [`VisionTransformer::forward_train_ep`] runs the model
//! over such a shard.

use crate::{ModelError, ParamStore, Result, VisionTransformer};

impl VisionTransformer {
    /// The names of every expert parameter (`[E, ...]`, the experts along axis 0) of every MoE
    /// layer, in store order; empty for a dense model.
    pub fn expert_param_names(&self) -> Vec<String> {
        self.blocks
            .iter()
            .filter_map(|b| b.moe())
            .flat_map(|m| [&m.fc1_weight, &m.fc1_bias, &m.fc2_weight, &m.fc2_bias].map(String::clone))
            .collect()
    }

    /// E/W, the experts of each MoE layer on each of `world` expert-parallel ranks; an error
    /// names E and W when W does not divide E, or when the model has no MoE layer.
    pub fn experts_per_rank(&self, world: usize) -> Result<usize> {
        let Some(moe) = self.config.moe.as_ref().filter(|_| self.blocks.iter().any(|b| b.moe().is_some())) else {
            return Err(ModelError::invalid(
                "moe.expert_parallel",
                true,
                "a model with MoE layers (this one has none: set model.moe)",
            ));
        };
        if world == 0 || moe.experts % world != 0 {
            return Err(ModelError::invalid(
                "moe.experts",
                moe.experts,
                format!("a multiple of the {world} expert-parallel ranks"),
            ));
        }
        Ok(moe.experts / world)
    }

    /// Rank `rank` of `world`'s shard of the whole parameters `full`: the same names in the
    /// same order, each expert parameter narrowed to this rank's experts along axis 0, every
    /// other parameter whole. An error names E and W when W does not divide E.
    pub fn shard_experts(&self, full: &ParamStore, rank: usize, world: usize) -> Result<ParamStore> {
        let local = self.experts_per_rank(world)?;
        let experts = self.expert_param_names();
        let mut out = ParamStore::new();
        for (name, t) in full.iter() {
            let t = if experts.iter().any(|e| e == name) { t.narrow(rank * local, local)? } else { t.clone() };
            out.insert(name, t)?;
        }
        Ok(out)
    }
}
