//! The fused and vectorised bandwidth kernels of issue 14 item 5 against the CPU reference.
//! LayerNorm: the fast path's branches (one row per warp or per block, 16-byte vector or scalar
//! loads, misaligned views), the residual add folded in (`add_layer_norm_fwd` / `_bwd` against
//! the CPU composition) and deterministic parameter gradients. Softmax cross-entropy: forward
//! and backward in one kernel. Elementwise and layout kernels: the 32-bit vector paths. All in
//! bf16/f16/f32, at widths that are and are not multiples of 8 and odd row counts. Each test of
//! a self-checked kernel first asserts that it passed its check, so these cannot pass on the
//! reference path alone.
//!
//! These need a GPU and NVRTC: `cargo test -p vit-tensor --test cuda_fused -- --include-ignored`.

mod common;

use common::*;
use vit_tensor::{
    cuda::self_check::{self, KernelStatus},
    ops::{self, Gelu, NormKind},
    DType, Device, Tensor,
};

/// `(rows, d)`: one row per warp with vector loads (768, 1024), widths that are multiples of 4
/// but not 8 (100: vector for f32 only) or of neither (37, 1030), one row per block (1030,
/// 2048), and a width whose fused backward exceeds its shared memory (7000: reference path).
const SHAPES: &[(usize, usize)] = &[(197, 768), (5, 100), (3, 37), (33, 1024), (7, 1030), (9, 2048), (3, 7000)];

/// Asserts that the fast kernel `name` passed its self-check on cuda:0 (running every check).
fn require_passed(name: &str) {
    assert!(vit_tensor::cuda::available(), "these tests need a CUDA device and its driver");
    let report = self_check::check_all(0).unwrap();
    let status = report.iter().find(|(k, _)| *k == name).map(|(_, s)| s.clone());
    assert!(
        matches!(status, Some(KernelStatus::Passed { .. })),
        "the fast kernel {name} must pass its self-check on this device, got {status:?}"
    );
}

fn require_fast_norm() {
    require_passed("layer_norm_fused");
}

fn randn(shape: &[usize], mean: f32, std: f32, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), mean, std, seed, dtype, Device::Cpu).unwrap()
}

fn check_opt(what: &str, cuda: &Option<Tensor>, cpu: &Option<Tensor>, dtype: DType) {
    assert_eq!(cuda.is_some(), cpu.is_some(), "{what}: presence differs");
    if let (Some(g), Some(c)) = (cuda, cpu) {
        check(what, g, c, dtype);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_layer_norm_matches_the_reference_at_every_width() {
    require_fast_norm();
    for dt in FLOATS {
        for (i, &(rows, d)) in SHAPES.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = randn(&[rows, d], 0.5, 2.0, seed, dt);
            let w = randn(&[d], 1.0, 0.5, seed + 1, dt);
            let b = randn(&[d], 0.0, 1.0, seed + 2, dt);
            let dy = randn(&[rows, d], 0.0, 1.0, seed + 3, dt);
            let (xg, wg, bg, dyg) = (gpu(&x), gpu(&w), gpu(&b), gpu(&dy));
            for kind in [NormKind::LayerNorm, NormKind::Rms] {
                for (use_w, use_b) in [(true, true), (true, false), (false, false)] {
                    let what = format!("layer_norm [{rows}, {d}] {kind:?} weight {use_w} bias {use_b}");
                    let (wc, bc) = (use_w.then_some(&w), use_b.then_some(&b));
                    let (wgo, bgo) = (use_w.then_some(&wg), use_b.then_some(&bg));
                    let cpu = ops::layer_norm_fwd(&x, wc, bc, 1e-6, kind).unwrap();
                    let cuda = ops::layer_norm_fwd(&xg, wgo, bgo, 1e-6, kind).unwrap();
                    check(&format!("{what}: y"), &cuda.y, &cpu.y, dt);
                    check(&format!("{what}: mean"), &cuda.mean, &cpu.mean, DType::F32);
                    check(&format!("{what}: rstd"), &cuda.rstd, &cpu.rstd, dt);
                    // Both backward passes get the CPU forward's statistics.
                    let (mg, rg) = (gpu(&cpu.mean), gpu(&cpu.rstd));
                    let gc = ops::layer_norm_bwd(&x, wc, &cpu.mean, &cpu.rstd, &dy, kind, use_b).unwrap();
                    let gg = ops::layer_norm_bwd(&xg, wgo, &mg, &rg, &dyg, kind, use_b).unwrap();
                    check(&format!("{what}: dx"), &gg.dx, &gc.dx, dt);
                    check_opt(&format!("{what}: dweight"), &gg.dweight, &gc.dweight, dt);
                    check_opt(&format!("{what}: dbias"), &gg.dbias, &gc.dbias, dt);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn add_layer_norm_matches_the_cpu_composition() {
    require_fast_norm();
    for dt in FLOATS {
        for (i, &(rows, d)) in SHAPES.iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let x = randn(&[rows, d], 0.5, 2.0, seed, dt);
            let r = randn(&[rows, d], -0.2, 1.0, seed + 1, dt);
            let w = randn(&[d], 1.0, 0.5, seed + 2, dt);
            let b = randn(&[d], 0.0, 1.0, seed + 3, dt);
            let dy = randn(&[rows, d], 0.0, 1.0, seed + 4, dt);
            let dres = randn(&[rows, d], 0.0, 1.0, seed + 5, dt);
            let (xg, rg, wg, bg, dyg, dresg) = (gpu(&x), gpu(&r), gpu(&w), gpu(&b), gpu(&dy), gpu(&dres));
            for kind in [NormKind::LayerNorm, NormKind::Rms] {
                for use_b in [true, false] {
                    let what = format!("add_layer_norm [{rows}, {d}] {kind:?} bias {use_b}");
                    let (bc, bgo) = (use_b.then_some(&b), use_b.then_some(&bg));
                    let cpu = ops::add_layer_norm_fwd(&x, &r, Some(&w), bc, 1e-6, kind).unwrap();
                    let cuda = ops::add_layer_norm_fwd(&xg, &rg, Some(&wg), bgo, 1e-6, kind).unwrap();
                    check(&format!("{what}: h"), &cuda.h, &cpu.h, dt);
                    check(&format!("{what}: y"), &cuda.y, &cpu.y, dt);
                    check(&format!("{what}: mean"), &cuda.mean, &cpu.mean, DType::F32);
                    check(&format!("{what}: rstd"), &cuda.rstd, &cpu.rstd, dt);
                    let (hg, mg, sg) = (gpu(&cpu.h), gpu(&cpu.mean), gpu(&cpu.rstd));
                    let gc = ops::add_layer_norm_bwd(&cpu.h, Some(&w), &cpu.mean, &cpu.rstd, &dy, &dres, kind, use_b)
                        .unwrap();
                    let gg = ops::add_layer_norm_bwd(&hg, Some(&wg), &mg, &sg, &dyg, &dresg, kind, use_b).unwrap();
                    check(&format!("{what}: dh"), &gg.dx, &gc.dx, dt);
                    check_opt(&format!("{what}: dweight"), &gg.dweight, &gc.dweight, dt);
                    check_opt(&format!("{what}: dbias"), &gg.dbias, &gc.dbias, dt);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_layer_norm_reads_misaligned_views() {
    require_fast_norm();
    // Views starting 3 elements into their buffer: not 16-byte aligned, so the scalar path,
    // at widths that would take the vector path from an aligned start.
    for dt in FLOATS {
        for &(rows, d) in &[(9usize, 768usize), (5, 2048)] {
            let what = format!("add_layer_norm of views [{rows}, {d}]");
            let flat = |seed| randn(&[rows * d + 3], 0.0, 1.0, seed, dt);
            let view = |t: &Tensor| t.narrow(3, rows * d).unwrap().reshape([rows, d]).unwrap();
            let (x, r, dy, dres) = (flat(1), flat(2), flat(3), flat(4));
            let w = randn(&[d], 1.0, 0.5, 5, dt);
            let (xc, rc, dyc, dresc) = (view(&x), view(&r), view(&dy), view(&dres));
            let (xg, rg, dyg, dresg, wg) =
                (view(&gpu(&x)), view(&gpu(&r)), view(&gpu(&dy)), view(&gpu(&dres)), gpu(&w));
            let kind = NormKind::LayerNorm;
            let cpu = ops::add_layer_norm_fwd(&xc, &rc, Some(&w), None, 1e-6, kind).unwrap();
            let cuda = ops::add_layer_norm_fwd(&xg, &rg, Some(&wg), None, 1e-6, kind).unwrap();
            check(&format!("{what}: h"), &cuda.h, &cpu.h, dt);
            check(&format!("{what}: y"), &cuda.y, &cpu.y, dt);
            let gc = ops::add_layer_norm_bwd(&cpu.h, Some(&w), &cpu.mean, &cpu.rstd, &dyc, &dresc, kind, true).unwrap();
            let (hg, mg, sg) = (gpu(&cpu.h), gpu(&cpu.mean), gpu(&cpu.rstd));
            let gg = ops::add_layer_norm_bwd(&hg, Some(&wg), &mg, &sg, &dyg, &dresg, kind, true).unwrap();
            check(&format!("{what}: dh"), &gg.dx, &gc.dx, dt);
            check_opt(&format!("{what}: dweight"), &gg.dweight, &gc.dweight, dt);
            check_opt(&format!("{what}: dbias"), &gg.dbias, &gc.dbias, dt);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_layer_norm_backward_is_deterministic() {
    require_fast_norm();
    // 50,432 rows (B/16 at batch 256): many blocks' partials, folded in a fixed order.
    let (rows, d) = (256 * 197, 768);
    let x = Tensor::randn([rows, d], 0.0, 1.0, 1, DType::BF16, GPU).unwrap();
    let w = Tensor::randn([d], 1.0, 0.2, 2, DType::BF16, GPU).unwrap();
    let dy = Tensor::randn([rows, d], 0.0, 1.0, 3, DType::BF16, GPU).unwrap();
    let f = ops::layer_norm_fwd(&x, Some(&w), None, 1e-6, NormKind::LayerNorm).unwrap();
    let run = || ops::layer_norm_bwd(&x, Some(&w), &f.mean, &f.rstd, &dy, NormKind::LayerNorm, true).unwrap();
    let (a, b) = (run(), run());
    for (what, p, q) in [("dx", Some(a.dx), Some(b.dx)), ("dweight", a.dweight, b.dweight), ("dbias", a.dbias, b.dbias)]
    {
        let (p, q) = (p.unwrap().to_f32_vec().unwrap(), q.unwrap().to_f32_vec().unwrap());
        assert!(p.iter().zip(&q).all(|(u, v)| u.to_bits() == v.to_bits()), "{what} differs between two runs");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_softmax_cross_entropy_matches_the_cpu() {
    require_passed("softmax_cross_entropy_fused");
    // Classes: vector loads (1000, 1024: one row per warp; 2048: per block), scalar (37, 1001),
    // odd batch sizes.
    for dt in FLOATS {
        for (i, &(b, k)) in
            [(33usize, 1000usize), (5, 37), (7, 1001), (3, 1024), (9, 2048), (1, 21843)].iter().enumerate()
        {
            let seed = 500 + 10 * i as u64;
            let z = randn(&[b, k], 0.0, 2.0, seed, dt);
            // Label-smoothed one-hot targets (0.1 as big_vision) and soft targets with exact zeros.
            let labels: Vec<usize> = (0..b).map(|r| (r * 7919 + i) % k).collect();
            let eps = 0.1f32;
            let mut smooth = vec![eps / k as f32; b * k];
            for (r, &c) in labels.iter().enumerate() {
                smooth[r * k + c] += 1.0 - eps;
            }
            let soft: Vec<f32> = randn(&[b, k], 0.0, 1.0, seed + 1, DType::F32).to_f32_vec().unwrap();
            let soft = soft.into_iter().map(|v| v.max(0.0)).collect();
            let dloss = randn(&[b], 0.0, 1.0, seed + 2, DType::F32);
            for (name, t) in [("smoothed", smooth), ("soft", soft)] {
                let t = Tensor::from_f32(t, [b, k], dt, Device::Cpu).unwrap();
                let what = format!("softmax_cross_entropy_fwd_bwd [{b}, {k}] {name}");
                let (lc, dc) = ops::softmax_cross_entropy_fwd_bwd(&z, &t, &dloss).unwrap();
                let (lg, dg) = ops::softmax_cross_entropy_fwd_bwd(&gpu(&z), &gpu(&t), &gpu(&dloss)).unwrap();
                check(&format!("{what}: loss"), &lg, &lc, dt);
                check(&format!("{what}: dlogits"), &dg, &dc, dt);
            }
        }
    }
}

/// Bit-exact comparison (the elementwise ops compute each element with the same f32 expression
/// on both sides; layout ops copy bits).
fn check_exact(what: &str, cuda: &Tensor, cpu: &Tensor) {
    assert_eq!(cuda.device(), GPU, "{what}: result not on the GPU");
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    assert_eq!(cuda.dtype(), cpu.dtype(), "{what}: dtypes differ");
    let (g, c) = (cuda.to_f32_vec().unwrap(), cpu.to_f32_vec().unwrap());
    for (i, (x, y)) in g.iter().zip(&c).enumerate() {
        assert!(x.to_bits() == y.to_bits(), "{what}: element {i} of {}: cuda {x}, cpu {y}", g.len());
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn vector_elementwise_kernels_match_the_cpu() {
    require_passed("elementwise_layout_v32");
    for dt in FLOATS {
        // Aligned with whole vectors (197·768), a tail (3·1001), and views 3 elements into
        // their buffer (misaligned: the scalar loop).
        let aligned = |seed| randn(&[197, 768], 0.0, 1.0, seed, dt);
        let tail = |seed| randn(&[3, 1001], 0.0, 1.0, seed, dt);
        let view =
            |seed| randn(&[3 * 1001 + 3], 0.0, 1.0, seed, dt).narrow(3, 3 * 1001).unwrap().reshape([3, 1001]).unwrap();
        for (name, a, b) in
            [("aligned", aligned(1), aligned(2)), ("tail", tail(3), tail(4)), ("view", view(5), view(6))]
        {
            let (ag, bg) = (gpu(&a), gpu(&b));
            let what =
                format!("[{}] {name} {dt}", a.dims().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
            check_exact(&format!("add {what}"), &ops::add(&ag, &bg).unwrap(), &ops::add(&a, &b).unwrap());
            check_exact(&format!("sub {what}"), &ops::sub(&ag, &bg).unwrap(), &ops::sub(&a, &b).unwrap());
            check_exact(&format!("mul {what}"), &ops::mul(&ag, &bg).unwrap(), &ops::mul(&a, &b).unwrap());
            check_exact(&format!("scale {what}"), &ops::scale(&ag, 0.3).unwrap(), &ops::scale(&a, 0.3).unwrap());
            let d = *a.dims().last().unwrap();
            let bias = randn(&[d], 0.0, 1.0, 7, dt);
            check_exact(
                &format!("bias_add {what}"),
                &ops::bias_add(&ag, &gpu(&bias)).unwrap(),
                &ops::bias_add(&a, &bias).unwrap(),
            );
            for kind in [Gelu::Tanh, Gelu::Erf] {
                check(
                    &format!("gelu_fwd {kind:?} {what}"),
                    &ops::gelu_fwd(&ag, kind).unwrap(),
                    &ops::gelu_fwd(&a, kind).unwrap(),
                    dt,
                );
                check(
                    &format!("gelu_bwd {kind:?} {what}"),
                    &ops::gelu_bwd(&ag, &bg, kind).unwrap(),
                    &ops::gelu_bwd(&a, &b, kind).unwrap(),
                    dt,
                );
            }
            for to in FLOATS.into_iter().filter(|&t| t != dt) {
                check_exact(&format!("cast to {to} {what}"), &ag.cast(to).unwrap(), &a.cast(to).unwrap());
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn vector_layout_kernels_match_the_cpu() {
    require_passed("elementwise_layout_v32");
    for dt in FLOATS {
        // Head splits of [B, T, H, dh]: dh 64 (16-byte units) and 13 (elements).
        for dh in [64usize, 13] {
            let x = randn(&[3, 197, 4, dh], 0.0, 1.0, 20, dt);
            let xg = gpu(&x);
            let what = format!("[3, 197, 4, {dh}] {dt}");
            for perm in [[0, 2, 1, 3], [2, 0, 1, 3], [0, 1, 3, 2]] {
                check_exact(
                    &format!("permute {perm:?} {what}"),
                    &ops::permute(&xg, &perm).unwrap(),
                    &ops::permute(&x, &perm).unwrap(),
                );
            }
            // q, k, v style slices of the last dim and their concat; token slices (inner 4·dh).
            let (cs, gs): (Vec<_>, Vec<_>) = [(0, dh / 2), (dh / 2, dh - dh / 2)]
                .iter()
                .map(|&(s, l)| (ops::slice(&x, 3, s, l).unwrap(), ops::slice(&xg, 3, s, l).unwrap()))
                .unzip();
            for (c, g) in cs.iter().zip(&gs) {
                check_exact(&format!("slice last dim {what}"), g, c);
            }
            check_exact(
                &format!("concat last dim {what}"),
                &ops::concat(&[&gs[0], &gs[1]], 3).unwrap(),
                &ops::concat(&[&cs[0], &cs[1]], 3).unwrap(),
            );
            let (c, g) = (ops::slice(&x, 1, 1, 196).unwrap(), ops::slice(&xg, 1, 1, 196).unwrap());
            check_exact(&format!("slice tokens {what}"), &g, &c);
            check_exact(
                &format!("pad tokens {what}"),
                &ops::pad_along(&g, x.dims(), 1, 1).unwrap(),
                &ops::pad_along(&c, x.dims(), 1, 1).unwrap(),
            );
        }
    }
}
