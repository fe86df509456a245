//! The sparse mixture-of-experts MLP of V-MoE (Riquelme et al. 2021; reference §4): a router
//! without bias sends each token to k of E expert MLPs (each Dense(M) → GELU → Dense(D), the
//! dense MLP's shape), in groups of `group_size` images, and sums the experts' outputs weighted
//! by the router's gates. Routing itself (noise, top-k, capacity, BPR, auxiliary losses) is
//! [`super::routing`], computed on the host from the router logits; everything with `D` or `M`
//! columns runs as tensor ops on the input's device. (On a CUDA device whose routing kernels
//! passed their self-check, with E ≤ `ops::MAX_ROUTE_EXPERTS`, the routing decisions, dispatch
//! and combine run on the device instead: `ops::moe_route`, `ops::moe_dispatch`,
//! `ops::moe_combine`; the auxiliary losses stay on the host. See docs/moe.md.) The host path:
//!
//! - dispatch: one `gather_rows` of the tokens into the expert buffers `[E, slots, D]`, where an
//!   expert's slots are its capacity in every group, one group after the other (empty slots are
//!   zero rows; an index list, never a dense one-hot einsum);
//! - experts: one batched matmul over E per projection (`[E, slots, D] × [E, M, D]ᵀ`);
//! - combine: each slot's output times its combine weight, `scatter_add_rows` back to the tokens
//!   (a token with every choice dropped gets a zero row: only the block's residual passes).
//!
//! Parameters (expert weights stacked over a leading E axis, `[out, in]` per expert like
//! [`super::Linear`]): `{name}.router.weight [E, D]`, `{name}.experts.fc1.weight [E, M, D]`,
//! `{name}.experts.fc1.bias [E, M]`, `{name}.experts.fc2.weight [E, D, M]`,
//! `{name}.experts.fc2.bias [E, D]`. Every expert starts from the same initialisation (the dense
//! MLP's: Xavier kernels, normal(1e-6) biases); the router from normal(std 1/√D), flax's default
//! LeCun-normal kernel without the truncation.

use super::{
    init::{Fill, ParamSink},
    routing::{Assignment, GroupRoute},
};
use crate::{MoeConfig, ParamStore, Result};
use vit_tensor::{
    ops::{self, Gelu, MoeRouting, RouteGroup, RowIndex},
    DType, Device, Tensor,
};

/// One MoE MLP layer's parameter names, sizes and routing settings.
#[derive(Debug, Clone)]
pub struct MoeMlp {
    /// `{name}.router.weight`, `[E, D]`, no bias.
    pub router: String,
    /// `{name}.experts.fc1.weight`, `[E, M, D]`.
    pub fc1_weight: String,
    /// `{name}.experts.fc1.bias`, `[E, M]`.
    pub fc1_bias: String,
    /// `{name}.experts.fc2.weight`, `[E, D, M]`.
    pub fc2_weight: String,
    /// `{name}.experts.fc2.bias`, `[E, D]`.
    pub fc2_bias: String,
    /// Token width D.
    pub dim: usize,
    /// Hidden width M of each expert.
    pub hidden: usize,
    /// Routing settings: E, k, C, group size, BPR, noise and the loss weights.
    pub cfg: MoeConfig,
    /// tanh approximation (big_vision) or exact erf (timm).
    pub gelu: Gelu,
}

/// What one MoE layer's forward measured, for the training log: the auxiliary losses averaged
/// over the groups, the dropped assignments and the load per expert.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeStats {
    /// Mean over groups of `var(imp)/mean(imp)²` (unweighted).
    pub importance_loss: f32,
    /// Mean over groups of `var(load)/mean(load)²` (unweighted); `None` without noise.
    pub load_loss: Option<f32>,
    /// `importance_weight·importance_loss + load_weight·load_loss`: what the layer adds to
    /// the training loss.
    pub aux_loss: f32,
    /// Fraction of the S·k assignments dropped because their expert was full.
    pub dropped: f32,
    /// Fraction of the S·k assignments routed to each expert (before capacity), `[E]`.
    pub load: Vec<f32>,
}

/// Activations of [`MoeMlp::forward`] for an input `x [B, T, D]` (S = B·T tokens, `slots` = the
/// capacities of all groups added up, M = hidden width).
#[derive(Debug, Clone)]
pub struct MoeSaved {
    /// The routing of each group of images.
    routes: Vec<GroupRoute>,
    /// First token row of each group.
    group_start: Vec<usize>,
    /// The maps between tokens and expert slots.
    maps: SlotMaps,
    /// The dispatched tokens, `[E, slots, D]`.
    xin: Tensor,
    /// fc1's output before the GELU, `[E, slots, M]`.
    h_pre: Tensor,
    /// `GELU(h_pre)`, `[E, slots, M]`.
    h: Tensor,
    /// The experts' outputs, `[E, slots, D]`.
    out: Tensor,
    /// What the forward measured.
    pub stats: MoeStats,
}

/// The maps between tokens and expert slots of one forward pass.
#[derive(Debug, Clone)]
enum SlotMaps {
    /// Routed on the host ([`MoeMlp::plan`]): dispatch and combine are `gather_rows` and
    /// `scatter_add_rows`.
    Host {
        /// The token row of each expert slot, `[E·slots]` into the `S` tokens; −1 for an empty
        /// slot.
        dispatch: RowIndex,
        /// For each slot, the index `t·k + j` (t the token row in the batch, j its choice) of
        /// the assignment in it; −1 for an empty slot.
        slot_src: Vec<i64>,
        /// Each slot's combine weight (0 when empty), `[E·slots]`, the input's dtype.
        slot_weight: Tensor,
    },
    /// Routed on the CUDA device (`ops::moe_route`): dispatch and combine are
    /// `ops::moe_dispatch` and `ops::moe_combine`.
    Device(Box<MoeRouting>),
}

/// The routing of one forward pass ([`MoeMlp::plan`]), before the experts run: the groups'
/// routes and the slot layout of the expert buffers `[E, slots, D]`.
#[derive(Debug, Clone)]
pub(crate) struct RoutePlan {
    /// The routing of each group of images.
    pub(crate) routes: Vec<GroupRoute>,
    /// First token row of each group.
    pub(crate) group_start: Vec<usize>,
    /// The token row of each expert slot, `[E·slots]` into the `S` tokens; −1 for an empty
    /// slot. Checked on the host, where routing made it.
    pub(crate) dispatch: RowIndex,
    /// For each slot, the assignment `t·k + j` in it; −1 for an empty slot.
    pub(crate) slot_src: Vec<i64>,
    /// Each slot's combine weight (0 when empty), `[E·slots]`.
    pub(crate) slot_weight: Tensor,
    /// Slots per expert, all groups added up.
    pub(crate) slots: usize,
}

/// 64-bit mix (splitmix64's finaliser) of a seed and a stream number: the seed of the router
/// noise of one layer from the seed of one forward pass.
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl MoeMlp {
    /// The MoE MLP `{name}`: `dim -> hidden -> dim` in each of `cfg.experts` experts.
    pub fn new(name: &str, dim: usize, hidden: usize, cfg: &MoeConfig, gelu: Gelu) -> Self {
        MoeMlp {
            router: format!("{name}.router.weight"),
            fc1_weight: format!("{name}.experts.fc1.weight"),
            fc1_bias: format!("{name}.experts.fc1.bias"),
            fc2_weight: format!("{name}.experts.fc2.weight"),
            fc2_bias: format!("{name}.experts.fc2.bias"),
            dim,
            hidden,
            cfg: cfg.clone(),
            gelu,
        }
    }

    /// Declares the parameters: the router, then the experts' kernels and biases, every expert
    /// with the same values.
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        let (e, d, m) = (self.cfg.experts, self.dim, self.hidden);
        sink.add(&self.router, &[e, d], Fill::Normal { std: 1.0 / (d as f32).sqrt() })?;
        sink.add(&self.fc1_weight, &[e, m, d], Fill::XavierShared { fan_in: d, fan_out: m })?;
        sink.add(&self.fc1_bias, &[e, m], Fill::NormalShared { std: 1e-6 })?;
        sink.add(&self.fc2_weight, &[e, d, m], Fill::XavierShared { fan_in: m, fan_out: d })?;
        sink.add(&self.fc2_bias, &[e, d], Fill::NormalShared { std: 1e-6 })
    }

    /// `x [B, T, D] -> [B, T, D]`. `noise_seed` is `Some` in training: the router noise is
    /// drawn from it (the same seed gives the same bits); `None` routes without noise.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, noise_seed: Option<u64>) -> Result<(Tensor, MoeSaved)> {
        let dims = x.dims().to_vec();
        if dims.len() != 3 || dims[2] != self.dim {
            return Err(crate::ModelError::Param {
                name: self.router.clone(),
                msg: format!("expected an input [batch, tokens, {}], got {:?}", self.dim, dims),
            });
        }
        let (b, t, d) = (dims[0], dims[1], dims[2]);
        let (e, s) = (self.cfg.experts, b * t);
        let x2 = x.reshape([s, d])?;
        if e <= ops::MAX_ROUTE_EXPERTS && ops::moe_routing_on_device(x.device()) {
            return self.forward_device(p, &x2, &dims, noise_seed);
        }
        let RoutePlan { routes, group_start, dispatch, slot_src, slot_weight, slots } =
            self.plan(p, &x2, b, t, noise_seed)?;
        let xin = ops::gather_rows(&x2, &dispatch)?.reshape([e, slots, d])?;
        let (h_pre, h, out) = self.experts_forward(p, &xin, slots)?;
        let scaled = ops::mul(&out.reshape([e * slots, d])?, &ops::broadcast(&slot_weight, 1, d)?)?;
        let y = ops::scatter_add_rows(&scaled, &dispatch)?.reshape(dims.clone())?;

        let stats = self.stats(&routes);
        let maps = SlotMaps::Host { dispatch, slot_src, slot_weight };
        let saved = MoeSaved { routes, group_start, maps, xin, h_pre, h, out, stats };
        Ok((y, saved))
    }

    /// [`MoeMlp::forward`] on a CUDA device whose routing kernels passed their self-check: the
    /// routing decisions (`ops::moe_route`), dispatch and combine run on the device. The groups'
    /// [`GroupRoute`]s (statistics, auxiliary losses, the router's backward) are then built on
    /// the host from one copy of the logits and the device's decisions.
    fn forward_device(
        &self,
        p: &ParamStore,
        x2: &Tensor,
        dims: &[usize],
        noise_seed: Option<u64>,
    ) -> Result<(Tensor, MoeSaved)> {
        let (b, t, d) = (dims[0], dims[1], dims[2]);
        let (e, k, s) = (self.cfg.experts, self.cfg.k, b * t);
        let logits = ops::matmul_t(x2, p.get(&self.router)?, false, true)?;
        let sigma = self.cfg.noise_std() as f32;
        // The same draws as the host routing's (drawn on the host, then copied).
        let noise = match noise_seed {
            Some(seed) if sigma > 0.0 => Some(Tensor::randn([s, e], 0.0, 1.0, seed, DType::F32, Device::Cpu)?),
            _ => None,
        };
        let noise_dev = noise.as_ref().map(|n| n.to_device(x2.device())).transpose()?;
        let (groups, group_start) = self.route_groups(b, t);
        let r = ops::moe_route(&logits, noise_dev.as_ref().map(|n| (n, sigma)), k, &groups, self.cfg.bpr)?;
        let slots = r.slots();
        let xin = ops::moe_dispatch(x2, &r)?.reshape([e, slots, d])?;
        let (h_pre, h, out) = self.experts_forward(p, &xin, slots)?;
        let y = ops::moe_combine(&out.reshape([e * slots, d])?, &r)?.reshape(dims.to_vec())?;

        let logits = logits.to_f32_vec()?;
        let noise = noise.map(|n| n.to_f32_vec()).transpose()?;
        let (gates, choice, order, pos) = (
            r.gates().to_vec::<f32>()?,
            r.choice().to_vec::<i32>()?,
            r.order().to_vec::<i32>()?,
            r.pos().to_vec::<i32>()?,
        );
        let mut routes = Vec::with_capacity(groups.len());
        let mut first_slot = 0;
        for (g, &start) in groups.iter().zip(&group_start) {
            let (lo, hi) = (start * e, (start + g.tokens) * e);
            let assignments = start * k..(start + g.tokens) * k;
            let slot = assignments
                .clone()
                .map(|a| {
                    let p = pos[a];
                    if p < 0 {
                        -1
                    } else {
                        p - (choice[a] as usize * slots + first_slot) as i32
                    }
                })
                .collect();
            let a = Assignment {
                gates: gates[lo..hi].to_vec(),
                choice: choice[assignments].iter().map(|&c| c as u32).collect(),
                order: order[start..start + g.tokens].iter().map(|&o| o as usize - start).collect(),
                slot,
            };
            let n = noise.as_ref().map(|n| (&n[lo..hi], sigma));
            routes.push(GroupRoute::from_assignment(&logits[lo..hi], e, n, k, g.capacity, a));
            first_slot += g.capacity;
        }
        let stats = self.stats(&routes);
        let saved = MoeSaved { routes, group_start, maps: SlotMaps::Device(Box::new(r)), xin, h_pre, h, out, stats };
        Ok((y, saved))
    }

    /// The routing groups of `b` images of `t` tokens: groups of `group_size` images (the last
    /// may be smaller), each with its own capacity, and the first token row of each.
    fn route_groups(&self, b: usize, t: usize) -> (Vec<RouteGroup>, Vec<usize>) {
        let gimg = self.cfg.group_size.max(1);
        let (mut groups, mut starts) = (Vec::new(), Vec::new());
        let mut first_img = 0;
        while first_img < b {
            let imgs = gimg.min(b - first_img);
            groups.push(RouteGroup { tokens: imgs * t, capacity: self.cfg.capacity_for(imgs * t) });
            starts.push(first_img * t);
            first_img += imgs;
        }
        (groups, starts)
    }

    /// Routes the tokens `x2 [B·T, D]` of `b` images of `t` tokens: the router logits, the
    /// groups' routes and the slot layout of the expert buffers.
    pub(crate) fn plan(
        &self,
        p: &ParamStore,
        x2: &Tensor,
        b: usize,
        t: usize,
        noise_seed: Option<u64>,
    ) -> Result<RoutePlan> {
        let (e, k, s) = (self.cfg.experts, self.cfg.k, b * t);
        let (dtype, device) = (x2.dtype(), x2.device());
        let logits = ops::matmul_t(x2, p.get(&self.router)?, false, true)?.to_f32_vec()?;
        let sigma = self.cfg.noise_std() as f32;
        let noise = match noise_seed {
            Some(seed) if sigma > 0.0 => {
                Some(Tensor::randn([s, e], 0.0, 1.0, seed, DType::F32, Device::Cpu)?.to_f32_vec()?)
            }
            _ => None,
        };
        // Groups of `group_size` images (the last may be smaller), each with its own capacity.
        let (groups, group_start) = self.route_groups(b, t);
        let mut routes = Vec::with_capacity(groups.len());
        for (g, &start) in groups.iter().zip(&group_start) {
            let (lo, hi) = (start * e, (start + g.tokens) * e);
            let n = noise.as_ref().map(|n| (&n[lo..hi], sigma));
            routes.push(GroupRoute::new(&logits[lo..hi], e, n, k, g.capacity, self.cfg.bpr));
        }
        // Slot layout: expert x's buffer holds its slots of group 0, then of group 1, ...
        let slots: usize = routes.iter().map(|r| r.capacity).sum();
        let mut dispatch = vec![-1i32; e * slots];
        let mut slot_src = vec![-1i64; e * slots];
        let mut weight = vec![0f32; e * slots];
        let mut offset = 0;
        for (r, &start) in routes.iter().zip(&group_start) {
            for tl in 0..r.tokens {
                for j in 0..k {
                    let sl = r.slot[tl * k + j];
                    if sl >= 0 {
                        let at = r.choice[tl * k + j] as usize * slots + offset + sl as usize;
                        dispatch[at] = (start + tl) as i32;
                        slot_src[at] = ((start + tl) * k + j) as i64;
                        weight[at] = r.weight(tl, j);
                    }
                }
            }
            offset += r.capacity;
        }
        let dispatch = RowIndex::from_host(dispatch, s, device)?;
        let slot_weight = Tensor::from_vec(weight, [e * slots], Device::Cpu)?.cast(dtype)?.to_device(device)?;
        Ok(RoutePlan { routes, group_start, dispatch, slot_src, slot_weight, slots })
    }

    /// The experts on their buffers `xin [E, slots, D]`: `(h_pre, h, out)`.
    pub(crate) fn experts_forward(
        &self,
        p: &ParamStore,
        xin: &Tensor,
        slots: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let b1 = ops::broadcast(p.get(&self.fc1_bias)?, 1, slots)?;
        let h_pre = ops::add(&ops::matmul_t(xin, p.get(&self.fc1_weight)?, false, true)?, &b1)?;
        let h = ops::gelu_fwd(&h_pre, self.gelu)?;
        let b2 = ops::broadcast(p.get(&self.fc2_bias)?, 1, slots)?;
        let out = ops::add(&ops::matmul_t(&h, p.get(&self.fc2_weight)?, false, true)?, &b2)?;
        Ok((h_pre, h, out))
    }

    pub(crate) fn stats(&self, routes: &[GroupRoute]) -> MoeStats {
        let g = routes.len().max(1) as f32;
        let importance_loss = routes.iter().map(|r| r.importance_loss).sum::<f32>() / g;
        let load_loss = routes.iter().map(|r| r.load_loss).sum::<Option<f32>>().map(|l| l / g);
        let aux_loss = self.cfg.importance_weight as f32 * importance_loss
            + self.cfg.load_weight as f32 * load_loss.unwrap_or(0.0);
        let assignments: usize = routes.iter().map(|r| r.tokens * r.k).sum();
        let dropped = routes.iter().map(|r| r.dropped()).sum::<usize>() as f32 / assignments.max(1) as f32;
        let mut load = vec![0f32; self.cfg.experts];
        for r in routes {
            for (l, n) in load.iter_mut().zip(r.routed_per_expert()) {
                *l += n as f32 / assignments.max(1) as f32;
            }
        }
        MoeStats { importance_loss, load_loss, aux_loss, dropped, load }
    }

    /// Accumulates parameter gradients; returns `dx [B, T, D]` given `dy`, the gradient of the
    /// output, and `aux_scale`, the factor of this layer's auxiliary loss
    /// ([`MoeStats::aux_loss`]) in the loss being differentiated.
    pub fn backward(
        &self,
        p: &ParamStore,
        x: &Tensor,
        s: &MoeSaved,
        dy: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (d, e) = (self.dim, self.cfg.experts);
        let n = dims[0] * dims[1];
        let slots = s.xin.dims()[1];
        let x2 = x.reshape([n, d])?;
        let out2 = s.out.reshape([e * slots, d])?;
        let dy2 = dy.reshape([n, d])?;
        let (dx2, dweight) = match &s.maps {
            SlotMaps::Host { dispatch, slot_src, slot_weight } => {
                let (dout, dweight) = self.combine_backward(&dy2, dispatch, slot_weight, slot_src, &out2)?;
                let dxin = self.experts_backward(p, &s.xin, &s.h_pre, &s.h, &dout.reshape([e, slots, d])?, g)?;
                (ops::scatter_add_rows(&dxin.reshape([e * slots, d])?, dispatch)?, dweight)
            }
            SlotMaps::Device(r) => {
                let (dout, dweight) = ops::moe_combine_bwd(&out2, &dy2, r)?;
                let dxin = self.experts_backward(p, &s.xin, &s.h_pre, &s.h, &dout.reshape([e, slots, d])?, g)?;
                (ops::moe_dispatch_bwd(&dxin.reshape([e * slots, d])?, r)?, dweight.to_vec::<f32>()?)
            }
        };
        let dx2 = self.router_backward(p, &x2, dx2, &s.routes, &s.group_start, &dweight, aux_scale, g)?;
        Ok(dx2.reshape(dims)?)
    }

    /// Backward of the combine `y[t] += w·out[slot]`: `(dout [E·slots, D], dweight [S·k])`,
    /// `dout = w·dy[t]` per slot and `dweight`, the gradient of each assignment's combine weight
    /// `⟨dy[t], out[slot]⟩`, from `dy2 [S, D]` and the experts' outputs `out2 [E·slots, D]`.
    pub(crate) fn combine_backward(
        &self,
        dy2: &Tensor,
        dispatch: &RowIndex,
        slot_weight: &Tensor,
        slot_src: &[i64],
        out2: &Tensor,
    ) -> Result<(Tensor, Vec<f32>)> {
        let (d, k, n) = (self.dim, self.cfg.k, dy2.dims()[0]);
        let dsrc = ops::gather_rows(dy2, dispatch)?;
        let dout = ops::mul(&dsrc, &ops::broadcast(slot_weight, 1, d)?)?;
        let dslot_w = ops::sum(&ops::mul(&dsrc, out2)?, 1)?.to_f32_vec()?;
        let mut dweight = vec![0f32; n * k];
        for (src, dw) in slot_src.iter().zip(&dslot_w) {
            if *src >= 0 {
                dweight[*src as usize] = *dw;
            }
        }
        Ok((dout, dweight))
    }

    /// Backward of [`MoeMlp::experts_forward`] on buffers `xin [E', slots, D]` (E' the experts
    /// in `p`): accumulates the experts' gradients, returns `dxin [E', slots, D]`.
    pub(crate) fn experts_backward(
        &self,
        p: &ParamStore,
        xin: &Tensor,
        h_pre: &Tensor,
        h: &Tensor,
        dout: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        g.accumulate(&self.fc2_bias, &ops::sum(dout, 1)?)?;
        g.accumulate(&self.fc2_weight, &ops::matmul_t(dout, h, true, false)?)?;
        let dh = ops::matmul_t(dout, p.get(&self.fc2_weight)?, false, false)?;
        let dh_pre = ops::gelu_bwd(h_pre, &dh, self.gelu)?;
        g.accumulate(&self.fc1_bias, &ops::sum(&dh_pre, 1)?)?;
        g.accumulate(&self.fc1_weight, &ops::matmul_t(&dh_pre, xin, true, false)?)?;
        Ok(ops::matmul_t(&dh_pre, p.get(&self.fc1_weight)?, false, false)?)
    }

    /// The router's part of backward: the combine weights' gradients `dweight` and both
    /// auxiliary losses (scaled by `aux_scale`, averaged over the groups) into the logits,
    /// the router weight's gradient, and `dx2 [S, D]` plus the logits' gradient through the
    /// router.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn router_backward(
        &self,
        p: &ParamStore,
        x2: &Tensor,
        dx2: Tensor,
        routes: &[GroupRoute],
        group_start: &[usize],
        dweight: &[f32],
        aux_scale: f32,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let (e, k, n) = (self.cfg.experts, self.cfg.k, x2.dims()[0]);
        let groups = routes.len().max(1) as f32;
        let imp_scale = aux_scale * self.cfg.importance_weight as f32 / groups;
        let load_scale = aux_scale * self.cfg.load_weight as f32 / groups;
        let mut dz = vec![0f32; n * e];
        for (r, &start) in routes.iter().zip(group_start) {
            let dw = &dweight[start * k..(start + r.tokens) * k];
            let dzg = r.backward(dw, imp_scale, load_scale);
            dz[start * e..(start + r.tokens) * e].copy_from_slice(&dzg);
        }
        let dz = Tensor::from_vec(dz, [n, e], Device::Cpu)?.cast(x2.dtype())?.to_device(x2.device())?;
        g.accumulate(&self.router, &ops::matmul_t(&dz, x2, true, false)?)?;
        Ok(ops::add(&dx2, &ops::matmul_t(&dz, p.get(&self.router)?, false, false)?)?)
    }
}
