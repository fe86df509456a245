//! V-MoE token routing as one op (issue 11 item 6): the router softmax's top-k per token, Batch
//! Priority Routing order and k-major slot assignment with capacity, per routing group, giving
//! the maps that [`moe_dispatch`](super::moe_dispatch) and [`moe_combine`](super::moe_combine)
//! use. On CPU this is `crate::cpu::routing`, step for step vit-model's host routing; on CUDA
//! the kernels of `kernels/routing.cu`, which make the same decisions.

use super::{exact_shape, same_device};
use crate::cpu::{self, GroupSpan};
use crate::{cuda, DType, Device, Error, Result, Tensor};

/// The most experts [`moe_route`] routes to (the slot kernel gives each expert one thread of a
/// 256-thread block).
pub const MAX_ROUTE_EXPERTS: usize = 256;

/// One routing group: `tokens` consecutive tokens that share `capacity` slots per expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteGroup {
    /// Tokens in the group.
    pub tokens: usize,
    /// Slots per expert in this group (at least 1).
    pub capacity: usize,
}

/// The result of [`moe_route`] for S tokens, E experts, k choices: the decisions and the maps
/// between tokens and the expert buffers `[E·slots, D]`, where expert x's rows are
/// `x·slots .. (x+1)·slots`, group 0's capacity first, then group 1's, ... All tensors live on
/// the logits' device. Only [`moe_route`] builds one, so its maps are always consistent.
#[derive(Debug, Clone)]
pub struct MoeRouting {
    gates: Tensor,
    choice: Tensor,
    order: Tensor,
    pos: Tensor,
    slot_src: Tensor,
    weight: Tensor,
    experts: usize,
    k: usize,
    slots: usize,
}

impl MoeRouting {
    /// The routing softmax (of the noisy logits when noise was given), f32 `[S, E]`.
    pub fn gates(&self) -> &Tensor {
        &self.gates
    }

    /// Each token's chosen experts by descending gate (ties: lower expert), I32 `[S, k]`.
    pub fn choice(&self) -> &Tensor {
        &self.choice
    }

    /// The order in which the tokens claimed slots, group by group, I32 `[S]` of token indices
    /// (positions, or by descending top-1 gate with Batch Priority Routing).
    pub fn order(&self) -> &Tensor {
        &self.order
    }

    /// The buffer row of each assignment `t·k + j`, I32 `[S, k]`; −1 where it was dropped.
    pub fn pos(&self) -> &Tensor {
        &self.pos
    }

    /// The assignment `t·k + j` in each buffer row, I32 `[E·slots]`; −1 for an empty row.
    pub fn slot_src(&self) -> &Tensor {
        &self.slot_src
    }

    /// The combine weight of each assignment (its gate; 0 where dropped), f32 `[S, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// S, tokens.
    pub fn tokens(&self) -> usize {
        self.choice.dims()[0]
    }

    /// E, experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// k, choices per token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows per expert in the buffers: the capacities of all groups added up.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The device of every tensor.
    pub fn device(&self) -> Device {
        self.choice.device()
    }

    /// The same routing with every tensor on `device`.
    pub fn to_device(&self, device: Device) -> Result<MoeRouting> {
        Ok(MoeRouting {
            gates: self.gates.to_device(device)?,
            choice: self.choice.to_device(device)?,
            order: self.order.to_device(device)?,
            pos: self.pos.to_device(device)?,
            slot_src: self.slot_src.to_device(device)?,
            weight: self.weight.to_device(device)?,
            ..*self
        })
    }

    /// Assembles a routing from its parts (the CUDA launcher's outputs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        gates: Tensor,
        choice: Tensor,
        order: Tensor,
        pos: Tensor,
        slot_src: Tensor,
        weight: Tensor,
        experts: usize,
        k: usize,
        slots: usize,
    ) -> Self {
        MoeRouting { gates, choice, order, pos, slot_src, weight, experts, k, slots }
    }
}

/// The spans of `groups` (first token, first slot) and the slots per expert; checks them
/// against `s` tokens.
pub(crate) fn group_spans(op: &'static str, groups: &[RouteGroup], s: usize) -> Result<(Vec<GroupSpan>, usize)> {
    let mut spans = Vec::with_capacity(groups.len());
    let (mut start, mut first_slot) = (0, 0);
    for (i, g) in groups.iter().enumerate() {
        if g.capacity == 0 {
            return Err(Error::value(op, format!("group {i} has capacity 0, expected at least 1 slot per expert")));
        }
        spans.push(GroupSpan { start, tokens: g.tokens, capacity: g.capacity, first_slot });
        start += g.tokens;
        first_slot += g.capacity;
    }
    if start != s {
        return Err(Error::shape(op, format!("the groups hold {start} tokens, expected the logits' {s}")));
    }
    if first_slot.saturating_mul(MAX_ROUTE_EXPERTS) > i32::MAX as usize {
        return Err(Error::value(op, format!("{first_slot} slots per expert exceed i32 buffer rows")));
    }
    Ok((spans, first_slot))
}

/// Routes the S tokens of `logits [S, E]` (any float dtype) to `k` of the E experts, group by
/// group (`groups` cover the S tokens in order): [`moe_gates`], then [`moe_assign`].
///
/// 1. `gates = softmax(z + σ·n)` per token, with `noise = Some((n, σ))` (`n` f32 `[S, E]`
///    standard-normal draws) in training, `softmax(z)` without;
/// 2. each token's top-k gates, ties to the lower expert;
/// 3. per group, the claim order: by position, or with `bpr` (Batch Priority Routing) by
///    descending top-1 gate, ties by position;
/// 4. k-major slots: all first choices in claim order take the next free slot of their expert,
///    then all second choices, ...; an assignment to an expert with no free slot left in the
///    group (`capacity`) is dropped.
///
/// Needs `1 ≤ k ≤ E ≤` [`MAX_ROUTE_EXPERTS`]. See [`MoeRouting`] for the result.
pub fn moe_route(
    logits: &Tensor,
    noise: Option<(&Tensor, f32)>,
    k: usize,
    groups: &[RouteGroup],
    bpr: bool,
) -> Result<MoeRouting> {
    moe_assign(&moe_gates(logits, noise)?, k, groups, bpr)
}

/// The routing softmax, f32 `[S, E]`, of `logits [S, E]` (any float dtype), with
/// `noise = Some((n, σ))` of the noisy logits `z + σ·n` (`n` f32 `[S, E]`, the sum rounded to
/// f32 without a fused multiply-add): the row max subtracted, `exp` rounded to f32, the row sum
/// in f64, each gate `exp / sum` rounded to f32 — vit-model's host routing step for step. (The
/// CUDA kernel's `exp` may differ from the host libm's `expf` by one ulp now and then.)
pub fn moe_gates(logits: &Tensor, noise: Option<(&Tensor, f32)>) -> Result<Tensor> {
    const OP: &str = "moe_gates";
    if !logits.dtype().is_float() {
        return Err(Error::DType { op: OP, expected: "f32, bf16 or f16".into(), got: logits.dtype() });
    }
    if logits.rank() != 2 {
        return Err(Error::shape(OP, format!("expected logits [tokens, experts], got {}", logits.shape())));
    }
    let (s, e) = (logits.dims()[0], logits.dims()[1]);
    if e == 0 || e > MAX_ROUTE_EXPERTS {
        return Err(Error::value(OP, format!("{e} experts, expected 1..={MAX_ROUTE_EXPERTS}")));
    }
    if let Some((n, sigma)) = noise {
        same_device(OP, &[logits, n])?;
        if n.dtype() != DType::F32 {
            return Err(Error::DType { op: OP, expected: "f32 noise".into(), got: n.dtype() });
        }
        exact_shape(OP, n, &[s, e], "noise")?;
        if !sigma.is_finite() {
            return Err(Error::value(OP, format!("noise scale {sigma}, expected a finite value")));
        }
    }
    match logits.device() {
        Device::Cpu => {
            let z = logits.cpu_f32(OP)?;
            let gates = match noise {
                Some((n, sigma)) => cpu::route_gates(&z, Some((&n.cpu_f32(OP)?, sigma)), e),
                None => cpu::route_gates(&z, None, e),
            };
            Tensor::from_vec(gates, [s, e], Device::Cpu)
        }
        Device::Cuda(_) => cuda::routing::gates(logits, noise),
    }
}

/// Steps 2–4 of [`moe_route`] on given `gates`, f32 `[S, E]` (the device's gates recomputed
/// on the host give the host's decisions: the self-check compares them so).
pub fn moe_assign(gates: &Tensor, k: usize, groups: &[RouteGroup], bpr: bool) -> Result<MoeRouting> {
    const OP: &str = "moe_assign";
    if gates.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, expected: "f32 gates".into(), got: gates.dtype() });
    }
    if gates.rank() != 2 {
        return Err(Error::shape(OP, format!("expected gates [tokens, experts], got {}", gates.shape())));
    }
    let (s, e) = (gates.dims()[0], gates.dims()[1]);
    if e == 0 || e > MAX_ROUTE_EXPERTS {
        return Err(Error::value(OP, format!("{e} experts, expected 1..={MAX_ROUTE_EXPERTS}")));
    }
    if k == 0 || k > e {
        return Err(Error::value(OP, format!("k = {k} choices, expected 1..={e} (the experts)")));
    }
    if s.saturating_mul(k) > i32::MAX as usize {
        return Err(Error::value(OP, format!("{s} tokens × k = {k} assignments exceed i32 indices")));
    }
    let (spans, slots) = group_spans(OP, groups, s)?;
    match gates.device() {
        Device::Cpu => {
            let g = gates.cpu_slice::<f32>(OP)?;
            let choice = cpu::route_top_k(g, e, k);
            let a = cpu::route_assign(g, &choice, e, k, &spans, slots, bpr);
            let cpu_tensor = |v: Vec<i32>, shape: Vec<usize>| Tensor::from_vec(v, shape, Device::Cpu);
            Ok(MoeRouting {
                gates: gates.clone(),
                choice: cpu_tensor(a.choice, vec![s, k])?,
                order: cpu_tensor(a.order, vec![s])?,
                pos: cpu_tensor(a.pos, vec![s, k])?,
                slot_src: cpu_tensor(a.slot_src, vec![e * slots])?,
                weight: Tensor::from_vec(a.weight, [s, k], Device::Cpu)?,
                experts: e,
                k,
                slots,
            })
        }
        Device::Cuda(_) => cuda::routing::assign(gates, k, &spans, slots, bpr),
    }
}

/// Whether the CUDA routing kernels (`moe_route`, dispatch and combine) passed their self-check
/// on `device` (run on the first call there): vit-model routes on the device only then, and on
/// the host otherwise. Always false on the CPU.
pub fn moe_routing_on_device(device: Device) -> bool {
    match device {
        Device::Cpu => false,
        Device::Cuda(i) => cuda::backend(i).map(|b| cuda::routing::kernels_ok(&b)).unwrap_or(false),
    }
}
