//! The linear-layer ops with fused cuBLASLt epilogues (`ops::linear`, `ops::linear_dgrad_gelu`,
//! `ops::linear_wgrad`) and the cached-plan GEMM (`cuda::matmul_into`).
//!
//! The CPU tests check the CPU path (the plain composition, the reference) against naive f64
//! loops. The GPU tests (ignored without a device) run every epilogue in bf16 and f16 on fresh
//! random inputs, aligned and odd shapes, against the CPU reference, and assert that the fused
//! variants passed their self-check (so the fused code, not the fallback, was compared).
//! `cargo test -p vit-tensor --test cuda_linear -- --include-ignored` on a GPU host.

use vit_tensor::{
    cuda,
    ops::{self, Gelu},
    DType, Device, ParamStore, Tensor,
};

const GPU: Device = Device::Cuda(0);

fn randn(shape: &[usize], std: f32, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, std, seed, dtype, Device::Cpu).unwrap()
}

fn gelu(x: f64, kind: Gelu) -> f64 {
    match kind {
        Gelu::Tanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
        Gelu::Erf => {
            // erf by its series (|x| small in these tests) is enough for a reference at f32 tolerance.
            let z = x / std::f64::consts::SQRT_2;
            let mut term = z;
            let mut sum = z;
            for n in 1..60 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            0.5 * x * (1.0 + 2.0 / std::f64::consts::PI.sqrt() * sum)
        }
    }
}

fn gelu_grad(x: f64, kind: Gelu) -> f64 {
    let h = 1e-5;
    (gelu(x + h, kind) - gelu(x - h, kind)) / (2.0 * h)
}

/// Largest `|got - want|` relative to the largest `|want|`.
fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / scale
}

/// `x [rows, k] · w[n, k]ᵀ (+ b)` in f64.
fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut s = b.map_or(0.0, |b| b[j] as f64);
            for i in 0..k {
                s += x[r * k + i] as f64 * w[j * k + i] as f64;
            }
            y[r * n + j] = s;
        }
    }
    y
}

#[test]
fn linear_cpu_is_the_composition_of_matmul_bias_gelu_and_residual() {
    let (rows, k, n) = (2 * 7, 9, 5);
    let x = randn(&[2, 7, k], 1.0, 1, DType::F32);
    let w = randn(&[n, k], 0.3, 2, DType::F32);
    let b = randn(&[n], 0.5, 3, DType::F32);
    let r = randn(&[2, 7, n], 1.0, 4, DType::F32);
    let (xv, wv, bv, rv) =
        (x.to_f32_vec().unwrap(), w.to_f32_vec().unwrap(), b.to_f32_vec().unwrap(), r.to_f32_vec().unwrap());
    let pre = naive_linear(&xv, &wv, Some(&bv), rows, k, n);
    for kind in [Gelu::Tanh, Gelu::Erf] {
        let out = ops::linear(&x, &w, Some(&b), Some(kind), None).unwrap();
        assert_eq!(out.y.dims(), &[2, 7, n]);
        let want: Vec<f64> = pre.iter().map(|&v| gelu(v, kind)).collect();
        assert!(max_rel(&out.y.to_f32_vec().unwrap(), &want) < 1e-5, "{kind:?} y");
        assert!(max_rel(&out.pre.unwrap().to_f32_vec().unwrap(), &pre) < 1e-5, "{kind:?} pre");
    }
    let out = ops::linear(&x, &w, Some(&b), None, Some(&r)).unwrap();
    assert!(out.pre.is_none());
    let want: Vec<f64> = pre.iter().zip(&rv).map(|(p, &r)| p + r as f64).collect();
    assert!(max_rel(&out.y.to_f32_vec().unwrap(), &want) < 1e-5, "residual");
    let plain = ops::linear(&x, &w, None, None, None).unwrap();
    assert!(max_rel(&plain.y.to_f32_vec().unwrap(), &naive_linear(&xv, &wv, None, rows, k, n)) < 1e-5);
}

#[test]
fn linear_dgrad_gelu_cpu_matches_naive() {
    let (rows, out, hidden) = (11, 6, 10);
    let dy = randn(&[rows, out], 1.0, 5, DType::F32);
    let w = randn(&[out, hidden], 0.4, 6, DType::F32);
    let pre = randn(&[rows, hidden], 1.5, 7, DType::F32);
    let (dyv, wv, pv) = (dy.to_f32_vec().unwrap(), w.to_f32_vec().unwrap(), pre.to_f32_vec().unwrap());
    for kind in [Gelu::Tanh, Gelu::Erf] {
        let (dpre, db) = ops::linear_dgrad_gelu(&dy, &w, &pre, kind).unwrap();
        let mut want = vec![0.0f64; rows * hidden];
        for r in 0..rows {
            for j in 0..hidden {
                let dh: f64 = (0..out).map(|o| dyv[r * out + o] as f64 * wv[o * hidden + j] as f64).sum();
                want[r * hidden + j] = dh * gelu_grad(pv[r * hidden + j] as f64, kind);
            }
        }
        let want_db: Vec<f64> = (0..hidden).map(|j| (0..rows).map(|r| want[r * hidden + j]).sum()).collect();
        assert!(max_rel(&dpre.to_f32_vec().unwrap(), &want) < 1e-4, "{kind:?} dpre");
        assert!(max_rel(&db.to_f32_vec().unwrap(), &want_db) < 1e-4, "{kind:?} dbias");
    }
}

fn grad_store(out: usize, k: usize, weight_shape: &[usize], dtype: DType, device: Device) -> ParamStore {
    assert_eq!(weight_shape.iter().product::<usize>(), out * k);
    let mut g = ParamStore::new();
    g.insert("l.weight", randn(weight_shape, 2.0, 8, dtype).to_device(device).unwrap()).unwrap();
    g.insert("l.bias", randn(&[out], 2.0, 9, dtype).to_device(device).unwrap()).unwrap();
    g
}

#[test]
fn linear_wgrad_cpu_accumulates_weight_and_bias_gradients() {
    let (rows, k, n) = (13, 7, 4);
    let x = randn(&[rows, k], 1.0, 10, DType::F32);
    let dy = randn(&[rows, n], 1.0, 11, DType::F32);
    let mut g = grad_store(n, k, &[n, k], DType::F32, Device::Cpu);
    let (w0, b0) = (g.get("l.weight").unwrap().to_f32_vec().unwrap(), g.get("l.bias").unwrap().to_f32_vec().unwrap());
    let held = g.get("l.weight").unwrap().clone();
    ops::linear_wgrad(&mut g, "l.weight", Some("l.bias"), &x, &dy).unwrap();
    let (xv, dyv) = (x.to_f32_vec().unwrap(), dy.to_f32_vec().unwrap());
    let mut want_w = vec![0.0f64; n * k];
    for o in 0..n {
        for i in 0..k {
            want_w[o * k + i] =
                w0[o * k + i] as f64 + (0..rows).map(|r| dyv[r * n + o] as f64 * xv[r * k + i] as f64).sum::<f64>();
        }
    }
    let want_b: Vec<f64> =
        (0..n).map(|o| b0[o] as f64 + (0..rows).map(|r| dyv[r * n + o] as f64).sum::<f64>()).collect();
    assert!(max_rel(&g.get("l.weight").unwrap().to_f32_vec().unwrap(), &want_w) < 1e-5);
    assert!(max_rel(&g.get("l.bias").unwrap().to_f32_vec().unwrap(), &want_b) < 1e-5);
    assert_eq!(held.to_f32_vec().unwrap(), w0, "a view handed out before keeps its values");
}

#[test]
fn linear_rejects_bad_input_with_clear_errors() {
    let x = randn(&[3, 4], 1.0, 1, DType::F32);
    let w = randn(&[5, 4], 1.0, 2, DType::F32);
    let bad_bias = randn(&[4], 1.0, 3, DType::F32);
    let e = ops::linear(&x, &w, Some(&bad_bias), None, None).unwrap_err().to_string();
    assert!(e.contains("bias") && e.contains("[5]"), "{e}");
    let r = randn(&[3, 5], 1.0, 4, DType::F32);
    let e = ops::linear(&x, &w, None, Some(Gelu::Tanh), Some(&r)).unwrap_err().to_string();
    assert!(e.contains("residual"), "{e}");
    let e = ops::linear(&x, &randn(&[5, 3], 1.0, 5, DType::F32), None, None, None).unwrap_err().to_string();
    assert!(e.contains("inner dimensions"), "{e}");
    let mut g = grad_store(5, 4, &[5, 4], DType::F32, Device::Cpu);
    let e = ops::linear_wgrad(&mut g, "l.weight", None, &x, &randn(&[3, 6], 1.0, 6, DType::F32)).unwrap_err();
    assert!(e.to_string().contains("l.weight"), "{e}");
    let e = ops::linear_wgrad(&mut g, "nope", None, &x, &r).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

// ---- GPU ----

fn require_gpu() {
    assert!(cuda::available(), "these tests need a CUDA device and its driver");
}

/// Elementwise within `atol + rtol·|cpu|` (atol a fraction of the largest reference value).
fn check(what: &str, cuda: &Tensor, cpu: &Tensor, dtype: DType) {
    assert_eq!(cuda.device(), GPU, "{what}: result not on the GPU");
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    assert_eq!(cuda.dtype(), cpu.dtype(), "{what}: dtypes differ");
    let (rtol, afrac) = match dtype {
        DType::BF16 => (2e-2, 1e-2),
        DType::F16 => (3e-3, 2e-3),
        _ => (1e-4, 1e-5),
    };
    let (g, c) = (cuda.to_f32_vec().unwrap(), cpu.to_f32_vec().unwrap());
    let scale = c.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let atol = afrac * scale;
    for (i, (x, y)) in g.iter().zip(&c).enumerate() {
        assert!((x - y).abs() <= atol + rtol * y.abs(), "{what} ({dtype}): element {i}: cuda {x}, cpu {y}");
    }
}

/// Asserts the fused variants `names` passed their first-use check on cuda:0.
fn assert_fused(names: &[&str]) {
    let report = cuda::self_check::fast_kernel_report(0).unwrap();
    for n in names {
        let status = report.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
        assert!(
            matches!(status, Some(cuda::self_check::KernelStatus::Passed { .. })),
            "fast kernel {n}: {status:?} (the fused path was not what ran)"
        );
    }
}

/// (leading dims, in, out): aligned ViT-like, odd everything (out not a multiple of 8: the GELU
/// falls back to BIAS + the GELU kernel), and one row.
const SHAPES: [(&[usize], usize, usize); 3] = [(&[2, 37], 72, 136), (&[3, 13], 45, 27), (&[1], 64, 24)];

#[test]
#[ignore = "needs a CUDA device"]
fn fused_gemm_kernels_pass_their_self_checks() {
    require_gpu();
    let results = cuda::self_check::check_all(0).unwrap();
    for (name, status) in &results {
        println!("{name}: {status}");
    }
    assert_fused(&[
        "gemm_bias",
        "gemm_residual",
        "gemm_gelu_aux_bias",
        "gemm_dgelu_bgrad",
        "gemm_wgrad_accumulate",
        "gemm_bgradb",
    ]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_forward_every_epilogue_matches_cpu() {
    require_gpu();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (si, &(lead, k, n)) in SHAPES.iter().enumerate() {
            let seed = 100 * si as u64 + if dtype == DType::F16 { 50 } else { 0 };
            let mut xs = lead.to_vec();
            xs.push(k);
            let mut ys = lead.to_vec();
            ys.push(n);
            let x = randn(&xs, 1.0, seed, dtype);
            let w = randn(&[n, k], 0.15, seed + 1, dtype);
            let b = randn(&[n], 0.5, seed + 2, dtype);
            let r = randn(&ys, 1.0, seed + 3, dtype);
            let cases: [(&str, bool, Option<Gelu>, bool); 6] = [
                ("plain", false, None, false),
                ("bias", true, None, false),
                ("bias+gelu tanh", true, Some(Gelu::Tanh), false),
                ("bias+gelu erf", true, Some(Gelu::Erf), false),
                ("bias+residual", true, None, true),
                ("residual", false, None, true),
            ];
            for (what, has_bias, act, has_res) in cases {
                let run = |dev: Device| {
                    let (x, w, b, r) = (
                        x.to_device(dev).unwrap(),
                        w.to_device(dev).unwrap(),
                        b.to_device(dev).unwrap(),
                        r.to_device(dev).unwrap(),
                    );
                    let out = ops::linear(&x, &w, has_bias.then_some(&b), act, has_res.then_some(&r)).unwrap();
                    (out.y, out.pre)
                };
                let (gy, gpre) = run(GPU);
                let (cy, cpre) = run(Device::Cpu);
                let label = format!("{what} {lead:?}x{k}->{n}");
                check(&format!("{label} y"), &gy, &cy, dtype);
                assert_eq!(gpre.is_some(), cpre.is_some(), "{label}: pre-activation returned on one device only");
                if let (Some(g), Some(c)) = (gpre, cpre) {
                    check(&format!("{label} pre"), &g, &c, dtype);
                }
            }
        }
    }
    assert_fused(&["gemm_bias", "gemm_residual", "gemm_gelu_aux_bias"]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_dgrad_gelu_matches_cpu() {
    require_gpu();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (si, &(lead, hidden, out)) in
            // Hidden widths that take the fused GELU-backward + column-sum kernel (136, 64, 768:
            // a multiple of 16 bytes; 788 rows in many row chunks) and one that does not (27).
            [(&[2usize, 37][..], 136usize, 40usize), (&[3, 13], 27, 45), (&[5], 64, 8), (&[4, 197], 768, 24)]
                    .iter()
                    .enumerate()
        {
            let seed = 300 + 10 * si as u64;
            let shape = |last: usize| {
                let mut s = lead.to_vec();
                s.push(last);
                s
            };
            let dy = randn(&shape(out), 1.0, seed, dtype);
            let w = randn(&[out, hidden], 0.15, seed + 1, dtype);
            let pre = randn(&shape(hidden), 1.5, seed + 2, dtype);
            for kind in [Gelu::Tanh, Gelu::Erf] {
                let (cd, cb) = ops::linear_dgrad_gelu(&dy, &w, &pre, kind).unwrap();
                // The composition the model uses, and the DGELU_BGRAD epilogue the bench times.
                type DgradGelu = fn(&Tensor, &Tensor, &Tensor, Gelu) -> vit_tensor::Result<(Tensor, Tensor)>;
                let paths: [(&str, DgradGelu); 2] =
                    [("composed", ops::linear_dgrad_gelu), ("fused", ops::linear_dgrad_gelu_fused)];
                for (path, f) in paths {
                    let (gd, gb) =
                        f(&dy.to_device(GPU).unwrap(), &w.to_device(GPU).unwrap(), &pre.to_device(GPU).unwrap(), kind)
                            .unwrap();
                    let label = format!("dgrad_gelu {path} {kind:?} {lead:?} hidden {hidden} out {out}");
                    check(&format!("{label} dpre"), &gd, &cd, dtype);
                    check(&format!("{label} dbias"), &gb, &cb, dtype);
                    // Deterministic: the same bits again.
                    let (gd2, gb2) =
                        f(&dy.to_device(GPU).unwrap(), &w.to_device(GPU).unwrap(), &pre.to_device(GPU).unwrap(), kind)
                            .unwrap();
                    assert_eq!(gd.to_f32_vec().unwrap(), gd2.to_f32_vec().unwrap(), "{label}: dpre differs run to run");
                    assert_eq!(
                        gb.to_f32_vec().unwrap(),
                        gb2.to_f32_vec().unwrap(),
                        "{label}: dbias differs run to run"
                    );
                }
            }
        }
    }
    assert_fused(&["gemm_dgelu_bgrad", "act_bwd_bias_grad"]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_wgrad_accumulates_in_place_into_the_gradient_store() {
    require_gpu();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for grad_dtype in [DType::F32, dtype] {
            for (si, &(lead, k, n, wshape)) in [
                (&[2usize, 37][..], 72usize, 136usize, &[136usize, 72][..]),
                (&[3, 13], 45, 27, &[27, 45]),
                (&[4, 9], 48, 16, &[16, 3, 4, 4]),
            ]
            .iter()
            .enumerate()
            {
                let seed = 500 + 10 * si as u64;
                let shape = |last: usize| {
                    let mut s = lead.to_vec();
                    s.push(last);
                    s
                };
                let x = randn(&shape(k), 1.0, seed, dtype);
                let dy = randn(&shape(n), 1.0, seed + 1, dtype);
                let mut gg = grad_store(n, k, wshape, grad_dtype, GPU);
                let mut gc = grad_store(n, k, wshape, grad_dtype, Device::Cpu);
                let held = gg.get("l.weight").unwrap().clone();
                let before = held.to_f32_vec().unwrap();
                for _ in 0..2 {
                    // twice: the second call accumulates onto the first (and reuses the plan)
                    ops::linear_wgrad(
                        &mut gg,
                        "l.weight",
                        Some("l.bias"),
                        &x.to_device(GPU).unwrap(),
                        &dy.to_device(GPU).unwrap(),
                    )
                    .unwrap();
                    ops::linear_wgrad(&mut gc, "l.weight", Some("l.bias"), &x, &dy).unwrap();
                }
                let label = format!("wgrad {dtype} into {grad_dtype} {lead:?}x{k}->{n}");
                for name in ["l.weight", "l.bias"] {
                    check(&format!("{label} {name}"), gg.get(name).unwrap(), gc.get(name).unwrap(), dtype);
                }
                assert_eq!(held.to_f32_vec().unwrap(), before, "{label}: a view handed out before changed");
            }
        }
    }
    assert_fused(&["gemm_wgrad_accumulate", "gemm_bgradb"]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn matmul_into_reuses_the_cached_plan_and_accumulates() {
    require_gpu();
    for dtype in [DType::BF16, DType::F16] {
        let a = randn(&[3, 33, 40], 1.0, 700, dtype).to_device(GPU).unwrap();
        let b = randn(&[3, 24, 40], 1.0, 701, dtype).to_device(GPU).unwrap();
        let want = ops::matmul_t(&a, &b, false, true).unwrap();
        for out_dtype in [dtype, DType::F32] {
            let out = Tensor::zeros([3, 33, 24], out_dtype, GPU).unwrap();
            // SAFETY: `out` is fresh and not shared.
            unsafe { cuda::matmul_into(&a, &b, false, true, &out, false) }.unwrap();
            let plans = cuda::cached_gemm_plans(0).unwrap();
            unsafe { cuda::matmul_into(&a, &b, false, true, &out, true) }.unwrap();
            assert_eq!(cuda::cached_gemm_plans(0).unwrap(), plans, "the second call planned again");
            let twice = ops::add(&want, &want).unwrap().cast(out_dtype).unwrap();
            check(&format!("matmul_into {dtype} -> {out_dtype}"), &out, &twice, dtype);
        }
        let cpu =
            ops::matmul_t(&a.to_device(Device::Cpu).unwrap(), &b.to_device(Device::Cpu).unwrap(), false, true).unwrap();
        check(&format!("batched matmul {dtype}"), &want, &cpu, dtype);
    }
}
