//! The device-side step (`OptimizerChain::step_on_device`: norm, clip factor, loss and the
//! non-finite check kept on the device in a `StepStatus`) equals the host-sync device step
//! (`Optimizer::step` on CUDA parameters) bit for bit, over several steps on fresh random
//! parameters and gradients: AdamW and factored Adam (and SGD), clipped and unclipped, with and
//! without a bf16 compute copy (which must equal the parameters' bf16 cast). A NaN gradient
//! leaves parameters and state untouched (that step and every later one) and is reported with
//! its step and parameter. The self-check passes and `VITRS_FAST_KERNELS_OFF` is honoured
//! through `fast_kernel_ok`. Every test needs a CUDA device.

use vit_optim::cuda::{self, StepStatus};
use vit_optim::{
    AdamWConfig, Algorithm, Decay, FactoredAdamConfig, OptimError, Optimizer, OptimizerChain, OptimizerConfig,
    ParamGroups, Schedule, SgdConfig,
};
use vit_tensor::{DType, Device, ParamStore, Tensor};

const GPU: Device = Device::Cuda(0);

fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("blocks.0.attn.qkv.weight", vec![96, 288]),
        ("blocks.0.mlp.fc2.weight", vec![40, 1030]),
        ("pos_embed", vec![1, 37, 48]),
        ("blocks.0.norm1.bias", vec![48]),
        ("head.weight", vec![10, 33]),
        ("frozen.weight", vec![8, 8]),
    ]
}

fn config(algorithm: Algorithm, clip: Option<f64>) -> OptimizerConfig {
    let mut cfg = OptimizerConfig::new(algorithm, 0.01);
    cfg.weight_decay = 1e-3;
    cfg.grad_clip_norm = clip;
    cfg.schedule = Schedule::new(Decay::Cosine, 2, 0, 20).unwrap();
    cfg.groups = ParamGroups::scaling_vit().freeze(r"frozen\..*");
    cfg
}

fn random_store(std: f32, seed: u64, dtype: DType) -> ParamStore {
    let mut s = ParamStore::new();
    for (k, (n, dims)) in shapes().iter().enumerate() {
        s.insert(*n, Tensor::randn(dims.clone(), 0.0, std, seed + k as u64, dtype, GPU).unwrap()).unwrap();
    }
    s
}

fn same_bits(what: &str, a: &ParamStore, b: &ParamStore) {
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>(), "{what}: names");
    for (n, x) in a.iter() {
        let y = b.get(n).unwrap();
        assert_eq!(x.dtype(), y.dtype(), "{what}: {n} dtype");
        let (xb, yb) = (x.to_bytes().unwrap(), y.to_bytes().unwrap());
        let diff =
            xb.chunks(x.dtype().size_in_bytes()).zip(yb.chunks(y.dtype().size_in_bytes())).filter(|(p, q)| p != q);
        assert_eq!(diff.count(), 0, "{what}: {n} differs from the host-sync step");
    }
}

/// `steps` steps of the host-sync device step and of the device-status step from the same
/// parameters and gradients; compares parameters, state and the step's numbers after each.
fn agree(name: &str, algorithm: Algorithm, clip: Option<f64>, compute: Option<DType>, steps: usize) {
    assert!(cuda::device_step_ok(GPU), "the device-step self-check failed");
    let cfg = config(algorithm, clip);
    let mut p_old = random_store(1.0, 100, DType::F32);
    let mut p_new = p_old.to_device(GPU).unwrap().cast(DType::F32).unwrap();
    let mut old = OptimizerChain::new(cfg.clone(), &p_old).unwrap();
    let mut new = OptimizerChain::new(cfg, &p_new).unwrap();
    assert!(new.runs_on_device(GPU));
    let mut status = StepStatus::new(GPU).unwrap();
    let mut cp = compute.map(|d| p_new.cast(d).unwrap());
    let mut clipped = 0;
    for s in 0..steps {
        // ‖g‖ ≈ 1.3 at step 0 (under the clip threshold 2), ≈ 130 and more later.
        let std = if s == 0 { 0.005 } else { 0.5 * s as f32 };
        let g = random_store(std, 1000 * (s as u64 + 1), DType::F32);
        let loss = Tensor::randn([1], 3.0, 1.0, 77 + s as u64, DType::F32, GPU).unwrap();
        status.add_loss(&loss).unwrap();
        let hi = old.step(&mut p_old, &g).unwrap();
        let di = new.step_on_device(&mut p_new, &g, &mut status, cp.as_mut()).unwrap();
        assert_eq!((di.step, di.schedule, di.lr), (hi.step, hi.schedule, hi.lr), "{name} step {s}");
        let v = status.read().unwrap();
        let info = new.step_info(&v);
        assert_eq!(info.grad_norm.to_bits(), hi.grad_norm.to_bits(), "{name} step {s}: norm {info:?} vs {hi:?}");
        assert_eq!((info.step, info.clipped), (hi.step, hi.clipped), "{name} step {s}");
        assert_eq!(v.loss, loss.to_scalar().unwrap() as f64, "{name} step {s}: the loss sum");
        assert!(new.non_finite(&v).is_none() && v.first_bad().is_none());
        clipped += usize::from(hi.clipped);
        same_bits(&format!("{name} step {s} parameters"), &p_new, &p_old);
        let (so, sn) = (old.state().unwrap(), new.state().unwrap());
        same_bits(&format!("{name} step {s} state"), &sn, &so);
        if let Some(cp) = &cp {
            same_bits(&format!("{name} step {s} compute copy"), cp, &p_new.cast(cp.buffer(0).dtype()).unwrap());
        }
    }
    if clip.is_some() {
        assert!(clipped > 0 && clipped < steps, "{name}: the test means to clip some steps, clipped {clipped}");
    }
    println!("{name}: {steps} steps bit-equal ({clipped} clipped)");
}

fn factored() -> Algorithm {
    Algorithm::FactoredAdam(FactoredAdamConfig {
        momentum: Some(0.9),
        momentum_dtype: DType::BF16,
        ..Default::default()
    })
}

fn adamw() -> Algorithm {
    Algorithm::AdamW(AdamWConfig::default())
}

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_device_status_step_equals_the_host_sync_step() {
    agree("adamw clipped f32", adamw(), Some(2.0), None, 4);
    agree("adamw unclipped bf16 copy", adamw(), None, Some(DType::BF16), 3);
    agree("adamw clipped bf16 copy", adamw(), Some(2.0), Some(DType::BF16), 4);
}

#[test]
#[ignore = "needs a CUDA device"]
fn factored_adam_device_status_step_equals_the_host_sync_step() {
    agree("factored clipped f32", factored(), Some(2.0), None, 4);
    agree("factored unclipped bf16 copy", factored(), None, Some(DType::BF16), 3);
    agree("factored clipped bf16 copy", factored(), Some(2.0), Some(DType::BF16), 4);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sgd_device_status_step_equals_the_host_sync_step() {
    let sgd = Algorithm::Sgd(SgdConfig { momentum: Some(0.9), ..Default::default() });
    agree("sgd clipped f16 copy", sgd, Some(2.0), Some(DType::F16), 4);
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_nan_gradient_skips_the_update_and_is_reported_with_its_step() {
    let cfg = config(adamw(), Some(1.0));
    let mut p = random_store(1.0, 5, DType::F32);
    let mut opt = OptimizerChain::new(cfg, &p).unwrap();
    let mut status = StepStatus::new(GPU).unwrap();
    let mut cp = p.cast(DType::BF16).unwrap();
    // Step 0 is clean.
    opt.step_on_device(&mut p, &random_store(0.1, 50, DType::F32), &mut status, Some(&mut cp)).unwrap();
    let (p1, s1, c1) = (p.clone(), opt.state().unwrap(), cp.clone());
    // Step 1: a NaN in pos_embed's gradient (the third trainable parameter), then two clean steps.
    let mut bad = random_store(0.1, 60, DType::F32);
    let mut values = bad.get("pos_embed").unwrap().to_f32_vec().unwrap();
    values[11] = f32::NAN;
    bad.set("pos_embed", Tensor::from_f32(values, [1, 37, 48], DType::F32, GPU).unwrap()).unwrap();
    let d = opt.step_on_device(&mut p, &bad, &mut status, Some(&mut cp)).unwrap();
    assert_eq!(d.step, 1);
    for s in 2..4 {
        opt.step_on_device(&mut p, &random_store(0.1, 70 + s, DType::F32), &mut status, Some(&mut cp)).unwrap();
    }
    // Nothing changed after step 0: parameters, moments (not the counter), compute copy.
    same_bits("parameters", &p, &p1);
    same_bits("compute copy", &cp, &c1);
    let without_count = |s: &ParamStore| {
        let mut out = ParamStore::new();
        for (n, t) in s.iter().filter(|(n, _)| *n != "count") {
            out.insert(n, t.clone()).unwrap();
        }
        out
    };
    same_bits("state", &without_count(&opt.state().unwrap()), &without_count(&s1));
    let v = status.read().unwrap();
    let b = v.first_bad().expect("the NaN step is kept");
    assert_eq!((b.step, b.tensor), (1, Some(2)));
    match opt.non_finite(&v) {
        Some(OptimError::NonFinite { name, norm, step }) => {
            assert_eq!((name.as_str(), step), ("pos_embed", 1));
            assert!(norm.is_nan());
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // The host-sync step refuses the same gradients with the same error.
    let mut p2 = p1.clone();
    let mut again = OptimizerChain::new(config(adamw(), Some(1.0)), &p2).unwrap();
    again.step(&mut p2, &random_store(0.1, 50, DType::F32)).unwrap();
    match again.step(&mut p2, &bad) {
        Err(OptimError::NonFinite { name, step, .. }) => assert_eq!((name.as_str(), step), ("pos_embed", 1)),
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_non_finite_loss_skips_the_update_without_naming_a_parameter() {
    let mut p = random_store(1.0, 9, DType::F32);
    let before = p.clone();
    let mut opt = OptimizerChain::new(config(factored(), None), &p).unwrap();
    let mut status = StepStatus::new(GPU).unwrap();
    let inf = Tensor::from_f32(vec![f32::INFINITY], [1], DType::F32, Device::Cpu).unwrap().to_device(GPU).unwrap();
    status.add_loss(&inf).unwrap();
    opt.step_on_device(&mut p, &random_store(0.1, 90, DType::F32), &mut status, None).unwrap();
    same_bits("parameters", &p, &before);
    let v = status.read().unwrap();
    let b = v.first_bad().expect("kept");
    assert_eq!((b.step, b.loss_sum, b.tensor), (0, f64::INFINITY, None));
    assert!(b.norm.is_finite() && opt.non_finite(&v).is_none(), "the trainer reports a loss, not a gradient");
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_self_check_passes_and_is_listed() {
    cuda::register_self_checks();
    let report = vit_tensor::cuda::self_check::check_all(0).unwrap();
    let status = report.iter().find(|(k, _)| *k == cuda::DEVICE_STEP_KERNEL).map(|(_, s)| s.clone());
    assert!(
        matches!(status, Some(vit_tensor::cuda::self_check::KernelStatus::Passed { .. })),
        "device_step: {status:?}"
    );
}
