//! Expert parallelism for the V-MoE layer (issue 11 item 5): the E experts of a [`MoeMlp`] are
//! sharded over the W ranks of a [`Communicator`] (rank r holds experts `r·E/W .. (r+1)·E/W`,
//! see [`shard_experts`]); every rank routes its own tokens with the full (replicated) router,
//! and the dispatched buffers travel to the experts' ranks with one `all_to_all` and back with
//! another:
//!
//! ```text
//! rank r: x_r ─route─► buffers [E, slots, D] ─all_to_all─► [W, E/W, slots, D] (by source rank)
//!   ─permute─► [E/W, W·slots, D] ─local experts─► ─permute─► ─all_to_all─► [E, slots, D] ─combine─► y_r
//! ```
//!
//! Each local expert sees the slots of rank 0's groups, then rank 1's, ...: with every rank
//! holding the same number of images, the layer on rank r gives the single-rank layer's output
//! on the concatenation of all ranks' batches, rows of rank r. Backward runs the same exchange
//! in reverse; expert gradients are complete on their rank, the router's gradient is rank r's
//! part (sum it over the ranks as data parallelism does for every replicated parameter).

use super::moe::{MoeMlp, RoutePlan};
use crate::{ModelError, ParamStore, Result};
use vit_collective::Communicator;
use vit_tensor::{ops, Tensor};

/// Activations of [`MoeMlp::forward_parallel`] on one rank (El = E/W local experts).
#[derive(Debug, Clone)]
pub struct MoeParallelSaved {
    plan: RoutePlan,
    /// The local experts' input, `[El, W·slots, D]`.
    xin: Tensor,
    /// fc1's output before the GELU, `[El, W·slots, M]`.
    h_pre: Tensor,
    /// `GELU(h_pre)`, `[El, W·slots, M]`.
    h: Tensor,
    /// The experts' outputs for this rank's slots, back in its layout, `[E·slots, D]`.
    out: Tensor,
    /// What the forward measured (this rank's tokens).
    pub stats: super::MoeStats,
}

/// Rank `rank`'s shard of a MoE layer's parameters `full` for `world` ranks: the router whole,
/// the experts `rank·E/W .. (rank+1)·E/W` of each expert parameter (same names). An error
/// names E and W when W does not divide E.
pub fn shard_experts(layer: &MoeMlp, full: &ParamStore, rank: usize, world: usize) -> Result<ParamStore> {
    let e = layer.cfg.experts;
    let local = local_experts(layer, world)?;
    let mut out = ParamStore::new();
    out.insert(&layer.router, full.get(&layer.router)?.clone())?;
    for name in [&layer.fc1_weight, &layer.fc1_bias, &layer.fc2_weight, &layer.fc2_bias] {
        let t = full.get(name)?;
        debug_assert_eq!(t.dims()[0], e);
        out.insert(name, t.narrow(rank * local, local)?)?;
    }
    Ok(out)
}

/// E/W, or an error when the W ranks do not divide the E experts.
fn local_experts(layer: &MoeMlp, world: usize) -> Result<usize> {
    let e = layer.cfg.experts;
    if world == 0 || !e.is_multiple_of(world) {
        return Err(ModelError::invalid("moe.experts", e, format!("a multiple of the {world} expert-parallel ranks")));
    }
    Ok(e / world)
}

/// `[W·El, slots, D]` ordered (source rank, local expert) → `[El, W·slots, D]`, and back.
fn by_expert(x: &Tensor, w: usize, el: usize, slots: usize, d: usize) -> Result<Tensor> {
    Ok(ops::permute(&x.reshape([w, el, slots, d])?, &[1, 0, 2, 3])?.reshape([el, w * slots, d])?)
}

fn by_rank(x: &Tensor, w: usize, el: usize, slots: usize, d: usize) -> Result<Tensor> {
    Ok(ops::permute(&x.reshape([el, w, slots, d])?, &[1, 0, 2, 3])?.reshape([w * el, slots, d])?)
}

impl MoeMlp {
    /// [`MoeMlp::forward`] with the experts sharded over `comm`'s ranks: `p` holds this rank's
    /// shard ([`shard_experts`]), `x [B, T, D]` this rank's images (the same B on every rank).
    pub fn forward_parallel(
        &self,
        p: &ParamStore,
        x: &Tensor,
        noise_seed: Option<u64>,
        comm: &dyn Communicator,
    ) -> Result<(Tensor, MoeParallelSaved)> {
        let dims = x.dims().to_vec();
        if dims.len() != 3 || dims[2] != self.dim {
            return Err(ModelError::Param {
                name: self.router.clone(),
                msg: format!("expected an input [batch, tokens, {}], got {:?}", self.dim, dims),
            });
        }
        let (w, e, d) = (comm.world_size(), self.cfg.experts, self.dim);
        let el = local_experts(self, w)?;
        let s = dims[0] * dims[1];
        let x2 = x.reshape([s, d])?;
        let plan = self.plan(p, &x2, dims[0], dims[1], noise_seed)?;
        let slots = plan.slots;
        let sent = ops::gather_rows(&x2, &plan.dispatch)?.reshape([e, slots, d])?;
        let xin = by_expert(&comm.all_to_all(&sent)?, w, el, slots, d)?;
        let (h_pre, h, out_local) = self.experts_forward(p, &xin, w * slots)?;
        let out = comm.all_to_all(&by_rank(&out_local, w, el, slots, d)?)?.reshape([e * slots, d])?;
        let scaled = ops::mul(&out, &ops::broadcast(&plan.slot_weight, 1, d)?)?;
        let y = ops::scatter_add_rows(&scaled, &plan.dispatch)?.reshape(dims)?;
        let stats = self.stats(&plan.routes);
        Ok((y, MoeParallelSaved { plan, xin, h_pre, h, out, stats }))
    }

    /// [`MoeMlp::backward`] of [`MoeMlp::forward_parallel`]: accumulates this rank's expert
    /// gradients (complete) and its part of the router's gradient into `g`; returns `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_parallel(
        &self,
        p: &ParamStore,
        x: &Tensor,
        s: &MoeParallelSaved,
        dy: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (w, e, d) = (comm.world_size(), self.cfg.experts, self.dim);
        let el = local_experts(self, w)?;
        let (n, slots) = (dims[0] * dims[1], s.plan.slots);
        let x2 = x.reshape([n, d])?;
        let (dout, dweight) = self.combine_backward(
            &dy.reshape([n, d])?,
            &s.plan.dispatch,
            &s.plan.slot_weight,
            &s.plan.slot_src,
            &s.out,
        )?;
        let dout_local = by_expert(&comm.all_to_all(&dout.reshape([e, slots, d])?)?, w, el, slots, d)?;
        let dxin_local = self.experts_backward(p, &s.xin, &s.h_pre, &s.h, &dout_local, g)?;
        let dxin = comm.all_to_all(&by_rank(&dxin_local, w, el, slots, d)?)?.reshape([e * slots, d])?;
        let dx2 = ops::scatter_add_rows(&dxin, &s.plan.dispatch)?;
        let dx2 = self.router_backward(p, &x2, dx2, &s.plan.routes, &s.plan.group_start, &dweight, aux_scale, g)?;
        Ok(dx2.reshape(dims)?)
    }
}
