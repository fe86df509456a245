//! The routing op of vit-tensor (`ops::moe_route`, what the CUDA kernels compute) equals the
//! host routing of `GroupRoute::new` decision for decision; `GroupRoute::from_assignment`
//! rebuilds a route from those decisions with the same losses and gradients; and (GPU) the MoE
//! layer on CUDA, which routes on the device once the `moe_routing` self-check passed, equals
//! the CPU layer, forward and backward.

use vit_model::{
    layers::{routing::Assignment, GroupRoute, Init, Initializer, MoeMlp},
    MoeConfig, ParamStore,
};
use vit_tensor::{
    ops::{self, Gelu, RouteGroup},
    testing::assert_close,
    DType, Device, Tensor,
};

fn randn(dims: &[usize], std: f32, seed: u64) -> Vec<f32> {
    Tensor::randn(dims.to_vec(), 0.0, std, seed, DType::F32, Device::Cpu).unwrap().to_f32_vec().unwrap()
}

/// `(E, k, groups)`, with some capacities small enough to overflow.
fn problems() -> Vec<(usize, usize, Vec<RouteGroup>)> {
    let g = |tokens, capacity| RouteGroup { tokens, capacity };
    vec![(8, 2, vec![g(40, 8), g(40, 12), g(17, 4)]), (5, 1, vec![g(23, 4)]), (6, 3, vec![g(30, 16), g(9, 4)])]
}

#[test]
fn the_routing_op_equals_the_host_routing() {
    for (e, k, groups) in problems() {
        let s: usize = groups.iter().map(|g| g.tokens).sum();
        for (bpr, noisy) in [(true, true), (false, true), (true, false), (false, false)] {
            let what = format!("E {e} k {k} bpr {bpr} noise {noisy}");
            let mut z = randn(&[s, e], 1.5, e as u64);
            // Ties inside rows, and two identical tokens (a tie of top-1 gates for BPR).
            z.iter_mut().step_by(2).for_each(|v| *v = (*v * 2.0).round() / 2.0);
            let row = z[..e].to_vec();
            z[5 * e..6 * e].copy_from_slice(&row);
            let n = randn(&[s, e], 1.0, 99);
            let sigma = 1.0 / e as f32;
            let zt = Tensor::from_vec(z.clone(), [s, e], Device::Cpu).unwrap();
            let nt = Tensor::from_vec(n.clone(), [s, e], Device::Cpu).unwrap();
            let r = ops::moe_route(&zt, noisy.then_some((&nt, sigma)), k, &groups, bpr).unwrap();
            let (gates, choice, order, pos, weight) = (
                r.gates().to_vec::<f32>().unwrap(),
                r.choice().to_vec::<i32>().unwrap(),
                r.order().to_vec::<i32>().unwrap(),
                r.pos().to_vec::<i32>().unwrap(),
                r.weight().to_vec::<f32>().unwrap(),
            );
            let (mut start, mut first_slot, mut dropped) = (0, 0, 0);
            for g in &groups {
                let (lo, hi) = (start * e, (start + g.tokens) * e);
                let noise = noisy.then_some((&n[lo..hi], sigma));
                let h = GroupRoute::new(&z[lo..hi], e, noise, k, g.capacity, bpr);
                assert_eq!(gates[lo..hi], h.gates[..], "{what}: gates");
                for tl in 0..g.tokens {
                    assert_eq!(order[start + tl] as usize, start + h.order[tl], "{what}: order");
                    for j in 0..k {
                        let a = (start + tl) * k + j;
                        assert_eq!(choice[a] as u32, h.choice[tl * k + j], "{what}: choice");
                        let sl = h.slot[tl * k + j];
                        let want = if sl < 0 { -1 } else { (choice[a] as usize * r.slots() + first_slot) as i32 + sl };
                        assert_eq!(pos[a], want, "{what}: row of assignment {a}");
                        assert_eq!(weight[a], h.weight(tl, j), "{what}: weight");
                    }
                }
                dropped += h.dropped();
                start += g.tokens;
                first_slot += g.capacity;
            }
            assert!(dropped > 0 || k == 1 || !bpr, "{what}: expected some overflow");
        }
    }
}

#[test]
fn a_route_rebuilt_from_its_decisions_has_the_same_losses_and_gradients() {
    let (s, e, k, cap) = (30, 6, 2, 8);
    let z = randn(&[s, e], 1.0, 4);
    let n = randn(&[s, e], 1.0, 5);
    for noise in [None, Some((&n[..], 0.3f32))] {
        let r = GroupRoute::new(&z, e, noise, k, cap, true);
        let a = Assignment {
            gates: r.gates.clone(),
            choice: r.choice.clone(),
            order: r.order.clone(),
            slot: r.slot.clone(),
        };
        let b = GroupRoute::from_assignment(&z, e, noise, k, cap, a);
        assert_eq!((r.importance_loss, r.load_loss), (b.importance_loss, b.load_loss));
        assert!(r.importance_loss > 0.0);
        assert_eq!(r.probs, b.probs);
        let dw = randn(&[s, k], 1.0, 6);
        assert_eq!(r.backward(&dw, 0.7, 0.3), b.backward(&dw, 0.7, 0.3));
    }
}

fn layer(cfg: &MoeConfig, d: usize, m: usize) -> (MoeMlp, ParamStore) {
    let l = MoeMlp::new("moe", d, m, cfg, Gelu::Tanh);
    let mut sink =
        Initializer { init: Init { seed: 3, dtype: DType::F32, device: Device::Cpu }, store: ParamStore::new() };
    l.init(&mut sink).unwrap();
    // Distinct experts (they start equal) and a router that spreads the tokens.
    let mut p = ParamStore::new();
    for (i, (name, t)) in sink.store.iter().enumerate() {
        let std = if name.contains("router") { 1.0 } else { 0.2 };
        p.insert(name, Tensor::randn(t.shape().clone(), 0.0, std, 50 + i as u64, DType::F32, Device::Cpu).unwrap())
            .unwrap();
    }
    (l, p)
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_moe_layer_on_cuda_routes_on_the_device_and_equals_the_cpu_layer() {
    let gpu = Device::Cuda(0);
    assert!(ops::moe_routing_on_device(gpu), "the moe_routing self-check must pass on this device");
    let (b, t, d, m) = (6, 17, 32, 48);
    for (bpr, seed, cap) in [(true, Some(7u64), 0.5), (false, Some(8), 0.5), (true, None, 1.05)] {
        let cfg = MoeConfig { experts: 8, k: 2, capacity: cap, group_size: 4, bpr, ..MoeConfig::default() };
        let (l, p) = layer(&cfg, d, m);
        let mut pg = ParamStore::new();
        for (n, v) in p.iter() {
            pg.insert(n, v.to_device(gpu).unwrap()).unwrap();
        }
        let x = Tensor::randn([b, t, d], 0.0, 1.0, 11, DType::F32, Device::Cpu).unwrap();
        let dy = Tensor::randn([b, t, d], 0.0, 1.0, 12, DType::F32, Device::Cpu).unwrap();
        let what = format!("bpr {bpr} noise {seed:?} C {cap}");
        let (yc, sc) = l.forward(&p, &x, seed).unwrap();
        let (yg, sg) = l.forward(&pg, &x.to_device(gpu).unwrap(), seed).unwrap();
        assert_eq!(yg.device(), gpu);
        assert_close(&format!("{what}: y"), &yg.to_f32_vec().unwrap(), &yc.to_f32_vec().unwrap(), 1e-4, 1e-5);
        assert_eq!(sg.stats.dropped, sc.stats.dropped, "{what}: dropped");
        assert!(cap > 1.0 || sc.stats.dropped > 0.0, "{what}: expected drops");
        assert_eq!(sg.stats.load, sc.stats.load, "{what}: load");
        assert!((sg.stats.aux_loss - sc.stats.aux_loss).abs() <= 1e-5 * sc.stats.aux_loss.abs().max(1.0), "{what}");
        let mut gc = p.zeros_like(DType::F32).unwrap();
        let mut gg = pg.zeros_like(DType::F32).unwrap();
        let dxc = l.backward(&p, &x, &sc, &dy, 0.5, &mut gc).unwrap();
        let dxg = l.backward(&pg, &x.to_device(gpu).unwrap(), &sg, &dy.to_device(gpu).unwrap(), 0.5, &mut gg).unwrap();
        assert_close(&format!("{what}: dx"), &dxg.to_f32_vec().unwrap(), &dxc.to_f32_vec().unwrap(), 1e-4, 1e-5);
        for (n, want) in gc.iter() {
            let got = gg.get(n).unwrap().to_f32_vec().unwrap();
            assert_close(&format!("{what}: grad {n}"), &got, &want.to_f32_vec().unwrap(), 1e-4, 1e-5);
        }
    }
}
