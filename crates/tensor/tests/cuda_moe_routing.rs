//! The V-MoE routing, dispatch and combine kernels against the CPU reference on the same
//! inputs: gates within f32 rounding, every decision (choices, claim order, rows, weights)
//! exactly as the host takes them from those gates, dispatch and combine bit for bit, the combine weights' gradient within f32
//! summation order; and the `moe_routing` self-check passes.
//!
//! These need a GPU and NVRTC: `cargo test -p vit-tensor --test cuda_moe_routing -- --include-ignored`.

mod common;

use common::*;
use vit_tensor::{
    ops::{self, RouteGroup},
    DType, Device, Tensor,
};

fn randn(shape: &[usize], std: f32, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, std, seed, dtype, Device::Cpu).unwrap()
}

fn same_i32(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.to_vec::<i32>().unwrap(), b.to_vec::<i32>().unwrap(), "{what}");
}

/// `(experts, k, groups, tokens)`: V-MoE-like (8 images of 197 tokens per group, a smaller last
/// group), one group per token edge case, and the largest E with k = E.
fn problems() -> Vec<(usize, usize, Vec<RouteGroup>)> {
    let g = |tokens, capacity| RouteGroup { tokens, capacity };
    vec![
        (32, 2, vec![g(1576, 104), g(1576, 104), g(591, 40)]),
        (8, 1, vec![g(1, 4); 37]),
        (7, 3, vec![g(45, 8), g(0, 4), g(20, 4)]),
        (256, 256, vec![g(9, 12)]),
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn routing_matches_the_cpu_reference() {
    require_gpu();
    for (e, k, groups) in problems() {
        let s: usize = groups.iter().map(|g| g.tokens).sum();
        for dtype in FLOATS {
            for (bpr, noisy) in [(true, true), (false, true), (true, false)] {
                let what = format!("E {e} k {k} S {s} {dtype} bpr {bpr} noise {noisy}");
                let mut zv = randn(&[s, e], 2.0, 3, DType::F32).to_f32_vec().unwrap();
                // Ties within rows and between tokens.
                zv.iter_mut().step_by(3).for_each(|v| *v = (*v * 2.0).round() / 2.0);
                let z = Tensor::from_f32(zv, [s, e], dtype, Device::Cpu).unwrap();
                let n = randn(&[s, e], 1.0, 4, DType::F32);
                let sigma = 1.0 / e as f32;
                let want = ops::moe_route(&z, noisy.then_some((&n, sigma)), k, &groups, bpr).unwrap();
                let (zg, ng) = (gpu(&z), gpu(&n));
                let got = ops::moe_route(&zg, noisy.then_some((&ng, sigma)), k, &groups, bpr).unwrap();
                assert_eq!(got.device(), GPU);
                check(&format!("{what}: gates"), got.gates(), want.gates(), DType::F32);
                // The decisions exactly as the host takes them from the device's gates (the
                // device's exp may differ from the host's expf by an ulp now and then).
                let want = ops::moe_assign(&got.gates().to_device(Device::Cpu).unwrap(), k, &groups, bpr).unwrap();
                same_i32(&format!("{what}: choice"), got.choice(), want.choice());
                same_i32(&format!("{what}: order"), got.order(), want.order());
                same_i32(&format!("{what}: pos"), got.pos(), want.pos());
                same_i32(&format!("{what}: slot_src"), got.slot_src(), want.slot_src());
                assert_eq!(got.weight().to_vec::<f32>().unwrap(), want.weight().to_vec::<f32>().unwrap(), "{what}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn dispatch_and_combine_match_the_cpu_reference() {
    require_gpu();
    let groups = [RouteGroup { tokens: 197, capacity: 52 }, RouteGroup { tokens: 100, capacity: 28 }];
    let (e, k) = (8, 2);
    let z = randn(&[297, e], 1.0, 5, DType::F32);
    let rc = ops::moe_route(&z, None, k, &groups, true).unwrap();
    let rg = rc.to_device(GPU).unwrap();
    let rows = e * rc.slots();
    for dtype in FLOATS {
        for d in [1, 37, 768] {
            let x = randn(&[297, d], 1.0, 6, dtype);
            let out = randn(&[rows, d], 1.0, 7, dtype);
            let dy = randn(&[297, d], 1.0, 8, dtype);
            let what = format!("{dtype} d {d}");
            let exact = |w: &str, a: Tensor, b: Tensor| {
                assert_eq!(a.dtype(), b.dtype());
                let (p, q) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
                assert!(p.iter().zip(&q).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: {w} not bit-exact");
            };
            exact("dispatch", ops::moe_dispatch(&gpu(&x), &rg).unwrap(), ops::moe_dispatch(&x, &rc).unwrap());
            exact(
                "dispatch_bwd",
                ops::moe_dispatch_bwd(&gpu(&out), &rg).unwrap(),
                ops::moe_dispatch_bwd(&out, &rc).unwrap(),
            );
            exact("combine", ops::moe_combine(&gpu(&out), &rg).unwrap(), ops::moe_combine(&out, &rc).unwrap());
            let (gd, gw) = ops::moe_combine_bwd(&gpu(&out), &gpu(&dy), &rg).unwrap();
            let (cd, cw) = ops::moe_combine_bwd(&out, &dy, &rc).unwrap();
            exact("combine_bwd dout", gd, cd);
            check(&format!("{what}: combine_bwd dweight"), &gw, &cw, DType::F32);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_routing_self_check_passes() {
    require_gpu();
    assert!(ops::moe_routing_on_device(GPU));
    let report = vit_tensor::cuda::self_check::fast_kernel_report(0).unwrap();
    let (_, status) = report.iter().find(|(n, _)| *n == "moe_routing").expect("moe_routing listed");
    assert!(matches!(status, vit_tensor::cuda::self_check::KernelStatus::Passed { .. }), "{status}");
    assert!(!ops::moe_routing_on_device(Device::Cpu));
}
