//! The tensor-core flash attention (`kernels/flash_attention.cu`) against the CPU reference:
//! `ops::attention_fwd/bwd` on CUDA with bf16 and f16 take the flash kernels once their
//! self-check passed (asserted here, so a silent fallback to the reference kernels fails the
//! tests), at every supported head dim (64, 80, 88, 104, 112, 128) and token counts with and
//! without tails (1, 64, 197, 257), batch·heads > 1, fresh random inputs per case.
//!
//! These need a GPU and NVRTC: `cargo test -p vit-tensor --test cuda_flash_attention -- --include-ignored`.

use vit_tensor::{cuda, ops, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);
const DTYPES: [DType; 2] = [DType::BF16, DType::F16];
const HEAD_DIMS: [usize; 6] = [64, 80, 88, 104, 112, 128];
const TOKENS: [usize; 4] = [1, 64, 197, 257];

fn require_gpu() {
    assert!(cuda::available(), "these tests need a CUDA device and its driver");
}

fn randn(shape: [usize; 4], seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, seed, dtype, Device::Cpu).unwrap()
}

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// Relative L2 error allowed for 16-bit results: P and dS are rounded to the operand type
/// before their second GEMM, and every output once more.
fn tolerance(dtype: DType, backward: bool) -> f64 {
    let base = if dtype == DType::BF16 { 1e-2 } else { 2e-3 };
    if backward {
        2.0 * base
    } else {
        base
    }
}

/// `‖cuda − cpu‖ / ‖cpu‖ ≤ tol` and no element further than `8·tol·max|cpu|` off.
fn check(what: &str, cuda: &Tensor, cpu: &Tensor, tol: f64) {
    assert_eq!(cuda.device(), GPU, "{what}: result not on the GPU");
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    assert_eq!(cuda.dtype(), cpu.dtype(), "{what}: dtypes differ");
    let (g, c) = (cuda.to_f32_vec().unwrap(), cpu.to_f32_vec().unwrap());
    let rel = cuda::self_check::relative_error(&g, &c);
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.1e}");
    let big = c.iter().fold(1e-3f32, |m, v| m.max(v.abs())) as f64;
    let (i, worst) = g.iter().zip(&c).map(|(a, b)| (a - b).abs() as f64).enumerate().fold((0, 0.0), |acc, (i, e)| {
        if e > acc.1 {
            (i, e)
        } else {
            acc
        }
    });
    assert!(worst <= 8.0 * tol * big, "{what}: element {i} is {} instead of {} (max |ref| {big})", g[i], c[i]);
}

/// The flash kernels of `direction` for `dtype` passed their self-check on cuda:0.
fn assert_flash_used(direction: &str, dtype: DType) {
    let key = format!("flash_attention_{direction}_{}", if dtype == DType::BF16 { "bf16" } else { "f16" });
    let report = cuda::self_check::fast_kernel_report(0).unwrap();
    let status = report.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
    assert!(
        matches!(status, Some(cuda::self_check::KernelStatus::Passed { .. })),
        "{key}: expected the flash kernels to have passed their self-check, got {status:?}"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_forward_matches_the_cpu_reference() {
    require_gpu();
    for dt in DTYPES {
        for (a, &d) in HEAD_DIMS.iter().enumerate() {
            for (b, &n) in TOKENS.iter().enumerate() {
                let seed = 1_000 + 100 * a as u64 + 10 * b as u64;
                let shape = [2, 3, n, d];
                let (q, k, v) = (randn(shape, seed, dt), randn(shape, seed + 1, dt), randn(shape, seed + 2, dt));
                let scale = (d as f32).powf(-0.5);
                let cpu = ops::attention_fwd(&q, &k, &v, scale).unwrap();
                let cuda = ops::attention_fwd(&gpu(&q), &gpu(&k), &gpu(&v), scale).unwrap();
                let what = format!("{dt:?} d {d} tokens {n}");
                check(&format!("{what}: o"), &cuda.o, &cpu.o, tolerance(dt, false));
                check(&format!("{what}: lse"), &cuda.lse, &cpu.lse, 1e-4);
            }
        }
        assert_flash_used("fwd", dt);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_backward_matches_the_cpu_reference() {
    require_gpu();
    for dt in DTYPES {
        for (a, &d) in HEAD_DIMS.iter().enumerate() {
            for (b, &n) in TOKENS.iter().enumerate() {
                let seed = 5_000 + 100 * a as u64 + 10 * b as u64;
                let shape = [2, 3, n, d];
                let (q, k, v) = (randn(shape, seed, dt), randn(shape, seed + 1, dt), randn(shape, seed + 2, dt));
                let d_o = randn(shape, seed + 3, dt);
                let scale = (d as f32).powf(-0.5);
                // Both sides get the same saved forward outputs (the CPU's).
                let fwd = ops::attention_fwd(&q, &k, &v, scale).unwrap();
                let cpu = ops::attention_bwd(&q, &k, &v, &fwd.o, &fwd.lse, &d_o, scale).unwrap();
                let cuda =
                    ops::attention_bwd(&gpu(&q), &gpu(&k), &gpu(&v), &gpu(&fwd.o), &gpu(&fwd.lse), &gpu(&d_o), scale)
                        .unwrap();
                let what = format!("{dt:?} d {d} tokens {n}");
                let tol = tolerance(dt, true);
                if n > 1 {
                    // (one key: softmax is constant, dq and dk are exactly zero on both sides)
                    check(&format!("{what}: dq"), &cuda.dq, &cpu.dq, tol);
                    check(&format!("{what}: dk"), &cuda.dk, &cpu.dk, tol);
                } else {
                    for (name, t) in [("dq", &cuda.dq), ("dk", &cuda.dk)] {
                        let m = t.to_f32_vec().unwrap().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        assert!(m < 1e-3, "{what}: {name} should vanish with one key, max |{name}| = {m}");
                    }
                }
                check(&format!("{what}: dv"), &cuda.dv, &cpu.dv, tol);
            }
        }
        assert_flash_used("bwd", dt);
    }
}

/// Queries ≠ keys (the op allows it; the kernels mask the key tail and guard the query tail
/// independently).
#[test]
#[ignore = "needs a CUDA device"]
fn flash_handles_more_keys_than_queries_and_fewer() {
    require_gpu();
    for dt in DTYPES {
        for (i, &(n, m, d)) in [(70, 200, 64), (200, 70, 104), (33, 257, 128)].iter().enumerate() {
            let seed = 9_000 + 10 * i as u64;
            let (q, k, v) =
                (randn([1, 2, n, d], seed, dt), randn([1, 2, m, d], seed + 1, dt), randn([1, 2, m, d], seed + 2, dt));
            let d_o = randn([1, 2, n, d], seed + 3, dt);
            let scale = (d as f32).powf(-0.5);
            let cpu = ops::attention_fwd(&q, &k, &v, scale).unwrap();
            let cuda = ops::attention_fwd(&gpu(&q), &gpu(&k), &gpu(&v), scale).unwrap();
            let what = format!("{dt:?} n {n} m {m} d {d}");
            check(&format!("{what}: o"), &cuda.o, &cpu.o, tolerance(dt, false));
            let cpu_g = ops::attention_bwd(&q, &k, &v, &cpu.o, &cpu.lse, &d_o, scale).unwrap();
            let cuda_g =
                ops::attention_bwd(&gpu(&q), &gpu(&k), &gpu(&v), &gpu(&cpu.o), &gpu(&cpu.lse), &gpu(&d_o), scale)
                    .unwrap();
            check(&format!("{what}: dq"), &cuda_g.dq, &cpu_g.dq, tolerance(dt, true));
            check(&format!("{what}: dk"), &cuda_g.dk, &cpu_g.dk, tolerance(dt, true));
            check(&format!("{what}: dv"), &cuda_g.dv, &cpu_g.dv, tolerance(dt, true));
        }
    }
}

/// The backward is deterministic: two runs give bit-identical gradients (no float atomics).
#[test]
#[ignore = "needs a CUDA device"]
fn flash_backward_is_deterministic() {
    require_gpu();
    let dt = DType::BF16;
    let shape = [4, 6, 257, 64];
    let (q, k, v, d_o) =
        (gpu(&randn(shape, 1, dt)), gpu(&randn(shape, 2, dt)), gpu(&randn(shape, 3, dt)), gpu(&randn(shape, 4, dt)));
    let fwd = ops::attention_fwd(&q, &k, &v, 0.125).unwrap();
    let a = ops::attention_bwd(&q, &k, &v, &fwd.o, &fwd.lse, &d_o, 0.125).unwrap();
    let b = ops::attention_bwd(&q, &k, &v, &fwd.o, &fwd.lse, &d_o, 0.125).unwrap();
    for (name, x, y) in [("dq", &a.dq, &b.dq), ("dk", &a.dk, &b.dk), ("dv", &a.dv, &b.dv)] {
        assert_eq!(x.to_f32_vec().unwrap(), y.to_f32_vec().unwrap(), "{name} differs between two runs");
    }
    assert_flash_used("bwd", dt);
}

/// The packed op (q, k, v read from the projection output through strides, o written with the
/// heads merged, one packed gradient) against the CPU reference, for the sequential block's
/// `[B, N, 3W]` and the parallel block's `[B, N, M + 3W]`.
#[test]
#[ignore = "needs a CUDA device"]
fn flash_packed_matches_the_cpu_reference() {
    require_gpu();
    for dt in DTYPES {
        for (i, &(n, heads, dh, prefix)) in
            [(197, 3, 64, 0), (257, 2, 88, 256), (64, 4, 128, 0), (1, 2, 80, 64)].iter().enumerate()
        {
            let (b, w) = (2, heads * dh);
            let seed = 20_000 + 10 * i as u64;
            let qkv = Tensor::randn([b, n, prefix + 3 * w], 0.0, 1.0, seed, dt, Device::Cpu).unwrap();
            let d_o = Tensor::randn([b, n, w], 0.0, 1.0, seed + 1, dt, Device::Cpu).unwrap();
            let scale = (dh as f32).powf(-0.5);
            let g = gpu(&qkv);
            assert!(
                cuda::flash_attention::supports_packed(&g, prefix, w, heads),
                "case {i} should take the flash path"
            );
            let cpu = ops::attention_fwd_packed(&qkv, prefix, w, heads, scale).unwrap();
            let cuda_out = ops::attention_fwd_packed(&g, prefix, w, heads, scale).unwrap();
            let what = format!("{dt:?} packed n {n} heads {heads} d {dh} prefix {prefix}");
            check(&format!("{what}: o"), &cuda_out.o, &cpu.o, tolerance(dt, false));
            check(&format!("{what}: lse"), &cuda_out.lse, &cpu.lse, 1e-4);
            let cpu_g = ops::attention_bwd_packed(&qkv, prefix, w, heads, &cpu.o, &cpu.lse, &d_o, scale).unwrap();
            let cuda_g =
                ops::attention_bwd_packed(&g, prefix, w, heads, &gpu(&cpu.o), &gpu(&cpu.lse), &gpu(&d_o), scale)
                    .unwrap();
            if n > 1 {
                check(&format!("{what}: dqkv"), &cuda_g, &cpu_g, tolerance(dt, true));
            } else {
                // one token: dq and dk vanish, dv is d_o
                check(
                    &format!("{what}: dv"),
                    &ops::slice(&cuda_g, 2, 2 * w, w).unwrap(),
                    &ops::slice(&cpu_g, 2, 2 * w, w).unwrap(),
                    tolerance(dt, true),
                );
            }
        }
        assert_flash_used("fwd", dt);
        assert_flash_used("bwd", dt);
    }
}

use vit_tensor::cuda::flash_attention::{self as fa, FlashVariant};

/// Whether `variant` has kernels for head dim `d` in this direction.
fn variant_takes(variant: FlashVariant, backward: bool, d: usize) -> bool {
    variant.supports(backward, (d.div_ceil(16) * 16).max(64))
}

/// Every variant, run explicitly (no default choice, no self-check), against the CPU reference:
/// forward at each head dim it supports and every token count, bf16 and f16.
#[test]
#[ignore = "needs a CUDA device"]
fn every_flash_variant_forward_matches_the_cpu_reference() {
    require_gpu();
    for variant in FlashVariant::ALL {
        let mut cases = 0;
        for dt in DTYPES {
            for (a, &d) in HEAD_DIMS.iter().enumerate().filter(|(_, &d)| variant_takes(variant, false, d)) {
                for (b, &n) in TOKENS.iter().enumerate() {
                    let seed = 30_000 + 100 * a as u64 + 10 * b as u64;
                    let shape = [2, 3, n, d];
                    let (q, k, v) = (randn(shape, seed, dt), randn(shape, seed + 1, dt), randn(shape, seed + 2, dt));
                    let scale = (d as f32).powf(-0.5);
                    let cpu = ops::attention_fwd(&q, &k, &v, scale).unwrap();
                    let (o, lse) = fa::fwd_variant(&gpu(&q), &gpu(&k), &gpu(&v), scale, variant).unwrap();
                    let what = format!("{variant} {dt:?} d {d} tokens {n}");
                    check(&format!("{what}: o"), &o, &cpu.o, tolerance(dt, false));
                    check(&format!("{what}: lse"), &lse, &cpu.lse, 1e-4);
                    cases += 1;
                }
            }
        }
        assert!(cases > 0, "{variant} has no forward case");
    }
}

/// Every variant with backward kernels against the CPU reference (same cases as the forward).
#[test]
#[ignore = "needs a CUDA device"]
fn every_flash_variant_backward_matches_the_cpu_reference() {
    require_gpu();
    for variant in FlashVariant::ALL.into_iter().filter(|&v| HEAD_DIMS.iter().any(|&d| variant_takes(v, true, d))) {
        for dt in DTYPES {
            for (a, &d) in HEAD_DIMS.iter().enumerate().filter(|(_, &d)| variant_takes(variant, true, d)) {
                for (b, &n) in TOKENS.iter().enumerate() {
                    let seed = 40_000 + 100 * a as u64 + 10 * b as u64;
                    let shape = [2, 3, n, d];
                    let (q, k, v) = (randn(shape, seed, dt), randn(shape, seed + 1, dt), randn(shape, seed + 2, dt));
                    let d_o = randn(shape, seed + 3, dt);
                    let scale = (d as f32).powf(-0.5);
                    let fwd = ops::attention_fwd(&q, &k, &v, scale).unwrap();
                    let cpu = ops::attention_bwd(&q, &k, &v, &fwd.o, &fwd.lse, &d_o, scale).unwrap();
                    let (dq, dk, dv) = fa::bwd_variant(
                        &gpu(&q),
                        &gpu(&k),
                        &gpu(&v),
                        &gpu(&fwd.o),
                        &gpu(&fwd.lse),
                        &gpu(&d_o),
                        scale,
                        variant,
                    )
                    .unwrap();
                    let what = format!("{variant} {dt:?} d {d} tokens {n}");
                    let tol = tolerance(dt, true);
                    if n > 1 {
                        check(&format!("{what}: dq"), &dq, &cpu.dq, tol);
                        check(&format!("{what}: dk"), &dk, &cpu.dk, tol);
                    } else {
                        for (name, t) in [("dq", &dq), ("dk", &dk)] {
                            let m = t.to_f32_vec().unwrap().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                            assert!(m < 1e-3, "{what}: {name} should vanish with one key, max |{name}| = {m}");
                        }
                    }
                    check(&format!("{what}: dv"), &dv, &cpu.dv, tol);
                }
            }
        }
    }
}

/// Every variant on the packed layout (q, k, v read through strides out of `[B, N, prefix + 3W]`,
/// o merged, one packed gradient) against the CPU reference, at the head dims it supports.
#[test]
#[ignore = "needs a CUDA device"]
fn every_flash_variant_packed_matches_the_cpu_reference() {
    require_gpu();
    let cases = [(197, 3, 64, 0), (257, 2, 80, 256), (64, 2, 88, 0), (1, 2, 64, 64), (130, 4, 128, 0)];
    for variant in FlashVariant::ALL {
        for dt in DTYPES {
            for (i, &(n, heads, dh, prefix)) in cases.iter().enumerate() {
                let (fwd_ok, bwd_ok) = (variant_takes(variant, false, dh), variant_takes(variant, true, dh));
                if !fwd_ok {
                    continue;
                }
                let (b, w) = (2, heads * dh);
                let seed = 50_000 + 10 * i as u64;
                let qkv = Tensor::randn([b, n, prefix + 3 * w], 0.0, 1.0, seed, dt, Device::Cpu).unwrap();
                let d_o = Tensor::randn([b, n, w], 0.0, 1.0, seed + 1, dt, Device::Cpu).unwrap();
                let scale = (dh as f32).powf(-0.5);
                let g = gpu(&qkv);
                let cpu = ops::attention_fwd_packed(&qkv, prefix, w, heads, scale).unwrap();
                let (o, lse) = fa::fwd_packed_variant(&g, prefix, w, heads, scale, variant).unwrap();
                let what = format!("{variant} {dt:?} packed n {n} heads {heads} d {dh} prefix {prefix}");
                check(&format!("{what}: o"), &o, &cpu.o, tolerance(dt, false));
                check(&format!("{what}: lse"), &lse, &cpu.lse, 1e-4);
                if !bwd_ok {
                    continue;
                }
                let cpu_g = ops::attention_bwd_packed(&qkv, prefix, w, heads, &cpu.o, &cpu.lse, &d_o, scale).unwrap();
                let cuda_g = fa::bwd_packed_variant(
                    &g,
                    prefix,
                    w,
                    heads,
                    &gpu(&cpu.o),
                    &gpu(&cpu.lse),
                    &gpu(&d_o),
                    scale,
                    variant,
                )
                .unwrap();
                if n > 1 {
                    check(&format!("{what}: dqkv"), &cuda_g, &cpu_g, tolerance(dt, true));
                } else {
                    check(
                        &format!("{what}: dv"),
                        &ops::slice(&cuda_g, 2, 2 * w, w).unwrap(),
                        &ops::slice(&cpu_g, 2, 2 * w, w).unwrap(),
                        tolerance(dt, true),
                    );
                }
            }
        }
    }
}

/// Every variant's backward is deterministic: two runs give bit-identical gradients.
#[test]
#[ignore = "needs a CUDA device"]
fn every_flash_variant_backward_is_deterministic() {
    require_gpu();
    let dt = DType::BF16;
    let shape = [4, 6, 257, 64];
    let (q, k, v, d_o) = (
        gpu(&randn(shape, 11, dt)),
        gpu(&randn(shape, 12, dt)),
        gpu(&randn(shape, 13, dt)),
        gpu(&randn(shape, 14, dt)),
    );
    let (o, lse) = fa::fwd_variant(&q, &k, &v, 0.125, FlashVariant::M64).unwrap();
    for variant in FlashVariant::ALL.into_iter().filter(|&v| v.supports(true, 64)) {
        let a = fa::bwd_variant(&q, &k, &v, &o, &lse, &d_o, 0.125, variant).unwrap();
        let b = fa::bwd_variant(&q, &k, &v, &o, &lse, &d_o, 0.125, variant).unwrap();
        for (name, x, y) in [("dq", &a.0, &b.0), ("dk", &a.1, &b.1), ("dv", &a.2, &b.2)] {
            assert_eq!(x.to_f32_vec().unwrap(), y.to_f32_vec().unwrap(), "{variant}: {name} differs between two runs");
        }
    }
}

/// Every variant passes its self-check on the device (`vit devices` lists the same keys), and a
/// head dim a variant lacks is an error naming the variant and the head dim, not a launch.
#[test]
#[ignore = "needs a CUDA device"]
fn flash_variants_pass_their_self_checks_and_reject_other_head_dims() {
    require_gpu();
    let report = cuda::self_check::check_all(0).unwrap();
    for variant in FlashVariant::ALL {
        for (dir, backward) in [("fwd", false), ("bwd", true)] {
            if !HEAD_DIMS.iter().any(|&d| variant_takes(variant, backward, d)) {
                continue;
            }
            for dt in ["bf16", "f16"] {
                let suffix = if variant == FlashVariant::M64 { String::new() } else { format!("_{variant}") };
                let key = format!("flash_attention_{dir}_{dt}{suffix}");
                let status = report.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
                assert!(
                    matches!(status, Some(cuda::self_check::KernelStatus::Passed { .. })),
                    "{key}: expected a passed self-check, got {status:?}"
                );
            }
        }
    }
    let x = gpu(&randn([1, 2, 64, 128], 1, DType::BF16));
    let err = fa::fwd_variant(&x, &x, &x, 0.1, FlashVariant::M128).unwrap_err().to_string();
    assert!(err.contains("m128") && err.contains("head dim 128"), "{err}");
    let y = gpu(&randn([1, 2, 64, 80], 2, DType::BF16));
    let err = fa::bwd_variant(
        &y,
        &y,
        &y,
        &y,
        &gpu(&Tensor::zeros([1, 2, 64], DType::F32, Device::Cpu).unwrap()),
        &y,
        0.1,
        FlashVariant::M128,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("m128") && err.contains("backward") && err.contains("head dim 80"), "{err}");
}

/// The variant entry points reject bad input with errors, before any launch (no GPU needed for
/// these: CPU tensors and shape mismatches are refused first).
#[test]
fn flash_variant_entry_points_reject_bad_input() {
    let cpu = randn([1, 2, 8, 64], 1, DType::BF16);
    let e = fa::fwd_variant(&cpu, &cpu, &cpu, 0.1, FlashVariant::M64).unwrap_err().to_string();
    assert!(e.to_lowercase().contains("cuda") || e.contains("device"), "CPU tensors: {e}");
    let f32s = Tensor::zeros([1, 2, 8, 64], DType::F32, Device::Cpu).unwrap();
    let e = fa::fwd_variant(&f32s, &f32s, &f32s, 0.1, FlashVariant::M64).unwrap_err().to_string();
    assert!(e.contains("bf16 or f16") && e.contains("F32"), "f32: {e}");
    let k = randn([1, 2, 9, 64], 2, DType::BF16);
    let e = fa::fwd_variant(&cpu, &k, &cpu, 0.1, FlashVariant::M64).unwrap_err().to_string();
    assert!(e.contains("k and v"), "k/v shapes: {e}");
    let qkv = Tensor::zeros([1, 8, 3 * 128], DType::BF16, Device::Cpu).unwrap();
    let e = fa::fwd_packed_variant(&qkv, 0, 128, 2, 0.1, FlashVariant::M128).unwrap_err().to_string();
    assert!(!e.is_empty());
}
