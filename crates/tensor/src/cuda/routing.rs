//! CUDA launches of `kernels/routing.cu` (V-MoE routing: top-k of the router softmax, BPR order,
//! slot assignment), and the self-check `moe_routing` of the routing, dispatch and combine
//! kernels, which vit-model asks before routing on the device ([`kernels_ok`]).

use super::launch::{cfg_1d, i64_of, launch, name};
use super::{backend_of, cuda_err, output, self_check, view, wrap, CudaBackend};
use crate::cpu::{self, GroupSpan};
use crate::ops::{self, MoeRouting, RouteGroup};
use crate::{DType, Device, Error, Result, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The self-check's name (listed by `vit devices`).
pub(crate) const MOE_ROUTING: &str = "moe_routing";

/// Threads of the slot kernel's block (`SLOT_TILE` in routing.cu): one per expert.
const SLOT_THREADS: u32 = 256;

pub(crate) fn gates(logits: &Tensor, noise: Option<(&Tensor, f32)>) -> Result<Tensor> {
    const OP: &str = "moe_gates";
    let backend = backend_of(logits, OP)?;
    let (s, e) = (logits.dims()[0], logits.dims()[1]);
    let shape = Shape::new([s, e]);
    let mut gates = output(&backend, &shape, DType::F32)?;
    if s > 0 {
        let (s_, e_) = (i64_of(s), i64_of(e));
        let zv = view(logits, OP)?;
        let f = backend.function("routing.cu", &name("route_gates", logits.dtype()))?;
        match noise {
            Some((n, sigma)) => {
                let nv = view(n, OP)?;
                launch!(backend, f, cfg_1d(s), &zv, &nv, &sigma, &mut gates, &s_, &e_);
            }
            None => {
                let (null, sigma) = (0u64, 0f32);
                launch!(backend, f, cfg_1d(s), &zv, &null, &sigma, &mut gates, &s_, &e_);
            }
        }
    }
    Ok(wrap(&backend, gates, shape, DType::F32))
}

pub(crate) fn assign(gates: &Tensor, k: usize, spans: &[GroupSpan], slots: usize, bpr: bool) -> Result<MoeRouting> {
    const OP: &str = "moe_assign";
    let backend = backend_of(gates, OP)?;
    let (s, e) = (gates.dims()[0], gates.dims()[1]);
    let (kshape, sshape, rshape) = (Shape::new([s, k]), Shape::new([s]), Shape::new([e * slots]));
    let mut choice = output(&backend, &kshape, DType::I32)?;
    let mut order = output(&backend, &sshape, DType::I32)?;
    let mut pos = output(&backend, &kshape, DType::I32)?;
    let mut slot_src = output(&backend, &rshape, DType::I32)?;
    let mut weight = output(&backend, &kshape, DType::F32)?;
    let groups = spans.iter().filter(|g| g.tokens > 0).count();
    if s > 0 {
        let (s_, e_, k_, slots_) = (i64_of(s), i64_of(e), i64_of(k), i64_of(slots));
        let gv = view(gates, OP)?;
        let f = backend.function("routing.cu", "route_topk")?;
        launch!(backend, f, cfg_1d(s), &gv, &mut choice, &s_, &e_, &k_);
        // Groups without tokens have nothing to order or assign (their slots are empty rows,
        // which the slot kernel marks for non-empty groups only): their rows are filled below.
        let table: Vec<i64> = spans
            .iter()
            .filter(|g| g.tokens > 0)
            .flat_map(|g| [g.start, g.tokens, g.capacity, g.first_slot].map(|v| v as i64))
            .collect();
        let table = backend.stream.clone_htod(&table).map_err(cuda_err)?;
        let most = spans.iter().map(|g| g.tokens).max().unwrap_or(0);
        let order_cfg = LaunchConfig {
            grid_dim: (groups as u32, (most.div_ceil(256) as u32).clamp(1, 64), 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = backend.function("routing.cu", "route_order")?;
        let bpr_ = i32::from(bpr);
        launch!(backend, f, order_cfg, &gv, &choice, &table, &mut order, &e_, &k_, &bpr_);
        let slots_cfg =
            LaunchConfig { grid_dim: (groups as u32, 1, 1), block_dim: (SLOT_THREADS, 1, 1), shared_mem_bytes: 0 };
        let f = backend.function("routing.cu", "route_slots")?;
        launch!(
            backend,
            f,
            slots_cfg,
            &gv,
            &choice,
            &order,
            &table,
            &mut pos,
            &mut slot_src,
            &mut weight,
            &e_,
            &k_,
            &slots_
        );
    }
    let wrap_i32 = |buf, shape: &Shape| wrap(&backend, buf, shape.clone(), DType::I32);
    let mut slot_src = wrap_i32(slot_src, &rshape);
    if groups < spans.len() || s == 0 {
        // Some rows belong to groups of no tokens: mark every row of those groups empty.
        let mut host = slot_src.to_vec::<i32>()?;
        for g in spans.iter().filter(|g| g.tokens == 0) {
            for x in 0..e {
                host[x * slots + g.first_slot..x * slots + g.first_slot + g.capacity].fill(-1);
            }
        }
        if s == 0 {
            host.fill(-1);
        }
        slot_src = Tensor::from_vec(host, rshape.clone(), Device::Cpu)?.to_device(gates.device())?;
    }
    Ok(MoeRouting::from_parts(
        gates.clone(),
        wrap_i32(choice, &kshape),
        wrap_i32(order, &sshape),
        wrap_i32(pos, &kshape),
        slot_src,
        wrap(&backend, weight, kshape, DType::F32),
        e,
        k,
        slots,
    ))
}

/// Whether the routing, dispatch and combine kernels passed their self-check on this device.
pub(crate) fn kernels_ok(b: &Arc<CudaBackend>) -> bool {
    b.fast_kernel_ok(MOE_ROUTING, 1e-5, || check(b))
}

/// A mismatch of the check, as an error naming what differs.
fn mismatch(what: String) -> Error {
    Error::Cuda(format!("moe_routing self-check: {what}"))
}

/// Routes a small odd-shaped problem (45 tokens over 7 experts, k = 2, two groups of 20 and 25
/// tokens with capacities 4 and 8 so that some assignments overflow, tied logits and a
/// duplicated token) with and without noise and BPR, on the device and on the host:
/// the gates must agree within the error returned, and the decisions (choices, order, rows,
/// weights), which the host recomputes from the device's gates, exactly. Then dispatch,
/// combine and their backward in f32 and bf16 against the CPU ops on the same maps. Returns
/// the largest relative error.
fn check(b: &Arc<CudaBackend>) -> Result<f64> {
    let dev = Device::Cuda(b.ordinal);
    let (s, e, k, d) = (45, 7, 2, 24);
    let groups = [RouteGroup { tokens: 20, capacity: 4 }, RouteGroup { tokens: 25, capacity: 8 }];
    let mut z = Tensor::randn([s, e], 0.0, 2.0, 0x5eed, DType::F32, Device::Cpu)?.to_f32_vec()?;
    z.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
    let row3 = z[3 * e..4 * e].to_vec();
    z[9 * e..10 * e].copy_from_slice(&row3);
    let logits = Tensor::from_vec(z.clone(), [s, e], Device::Cpu)?;
    let noise = Tensor::randn([s, e], 0.0, 1.0, 0x401e, DType::F32, Device::Cpu)?;
    let mut worst = 0f64;
    for (bpr, noisy) in [(true, true), (false, false), (true, false)] {
        let sigma = 0.3f32;
        let (zd, nd) = (logits.to_device(dev)?, noise.to_device(dev)?);
        let r = ops::moe_route(&zd, noisy.then_some((&nd, sigma)), k, &groups, bpr)?;
        let nv = noise.to_f32_vec()?;
        let want = cpu::route_gates(&z, noisy.then_some((&nv[..], sigma)), e);
        worst = worst.max(self_check::relative_error(&r.gates().to_vec::<f32>()?, &want));
        // The decisions the host takes from the device's gates.
        let a = ops::moe_assign(&r.gates().to_device(Device::Cpu)?, k, &groups, bpr)?;
        let same = |what: &str, got: &Tensor, want: &Tensor| -> Result<()> {
            let (g, w) = (got.to_vec::<i32>()?, want.to_vec::<i32>()?);
            match g.iter().zip(&w).position(|(g, w)| g != w) {
                None if g.len() == w.len() => Ok(()),
                at => Err(mismatch(format!("{what} differs at {at:?} (bpr {bpr}, noise {noisy})"))),
            }
        };
        same("choice", r.choice(), a.choice())?;
        same("order", r.order(), a.order())?;
        same("pos", r.pos(), a.pos())?;
        same("slot_src", r.slot_src(), a.slot_src())?;
        if r.weight().to_vec::<f32>()? != a.weight().to_vec::<f32>()? {
            return Err(mismatch(format!("weights differ (bpr {bpr}, noise {noisy})")));
        }
        let (rc, slots) = (r.to_device(Device::Cpu)?, r.slots());
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn([s, d], 0.0, 1.0, 7, dtype, Device::Cpu)?;
            let out = Tensor::randn([e * slots, d], 0.0, 1.0, 8, dtype, Device::Cpu)?;
            let dy = Tensor::randn([s, d], 0.0, 1.0, 9, dtype, Device::Cpu)?;
            let (xd, outd, dyd) = (x.to_device(dev)?, out.to_device(dev)?, dy.to_device(dev)?);
            let mut pairs = vec![
                (ops::moe_dispatch(&xd, &r)?, ops::moe_dispatch(&x, &rc)?),
                (ops::moe_dispatch_bwd(&outd, &r)?, ops::moe_dispatch_bwd(&out, &rc)?),
                (ops::moe_combine(&outd, &r)?, ops::moe_combine(&out, &rc)?),
            ];
            let (g, w) = (ops::moe_combine_bwd(&outd, &dyd, &r)?, ops::moe_combine_bwd(&out, &dy, &rc)?);
            pairs.push((g.0, w.0));
            pairs.push((g.1, w.1));
            for (got, want) in pairs {
                worst = worst.max(self_check::relative_error(&got.to_f32_vec()?, &want.to_f32_vec()?));
            }
        }
    }
    Ok(worst)
}
