//! The fused CUDA optimizer steps (`kernels/optim.cu` through `OptimizerChain` on CUDA
//! parameters) equal the host reference step: factored Adam (bf16 and f32 momentum, factored
//! and unfactored shapes, rank 3 and 4), AdamW (f32 and bf16 momentum), SGD (bf16 momentum and
//! none); several consecutive steps with clipping, weight decay, a schedule and frozen
//! parameters; state round trips between host and device optimizers; refused non-finite steps.
//!
//! The kernels repeat the host's f32 operations in order, so the results are expected to be
//! bit-exact; the checks allow f32 values 1e-6 relative and 16-bit values (momentum, bf16
//! parameters) one ulp, and print how many values matched exactly.

use half::{bf16, f16};
use vit_optim::cuda;
use vit_optim::{
    AdamWConfig, Algorithm, Decay, FactoredAdamConfig, Optimizer, OptimizerChain, OptimizerConfig, ParamGroups,
    Schedule, SgdConfig,
};
use vit_tensor::{DType, Device, ParamStore, Tensor};

const GPU: Device = Device::Cuda(0);

/// Parameter shapes: factored with d0 = 0 and d0 = 1, a ragged column count, several row and
/// column tiles, rank 3 (pos_embed) and rank 4 with axes in between (Q > 1) and after (R > 1),
/// a tie, unfactored vectors and a small matrix, an empty tensor, and a frozen one.
fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("blocks.0.attn.qkv.weight", vec![768, 256]),
        ("blocks.0.mlp.fc2.weight", vec![40, 1030]),
        ("blocks.0.mlp.fc1.weight", vec![300, 36]),
        ("pos_embed", vec![1, 37, 48]),
        ("conv.weight", vec![33, 3, 5, 40]),
        ("odd.weight", vec![3, 40, 33, 5]),
        ("tie.weight", vec![40, 8, 40]),
        ("blocks.0.norm1.bias", vec![48]),
        ("blocks.0.mlp.fc1.bias", vec![5003]),
        ("small.weight", vec![4, 7]),
        ("empty.weight", vec![0, 40]),
        ("frozen.weight", vec![8, 8]),
    ]
}

fn factored(momentum: Option<f64>, momentum_dtype: DType) -> Algorithm {
    Algorithm::FactoredAdam(FactoredAdamConfig { momentum, momentum_dtype, ..Default::default() })
}

fn config(algorithm: Algorithm, clip: Option<f64>) -> OptimizerConfig {
    let mut cfg = OptimizerConfig::new(algorithm, 0.01);
    cfg.weight_decay = 1e-3;
    cfg.grad_clip_norm = clip;
    cfg.schedule = Schedule::new(Decay::Cosine, 2, 0, 20).unwrap();
    cfg.groups = ParamGroups::scaling_vit().freeze(r"frozen\..*");
    cfg
}

fn random_store(shapes: &[(&str, Vec<usize>)], std: f32, seed: u64, dtype: DType) -> ParamStore {
    let mut s = ParamStore::new();
    for (k, (n, dims)) in shapes.iter().enumerate() {
        s.insert(*n, Tensor::randn(dims.clone(), 0.0, std, seed + k as u64, dtype, Device::Cpu).unwrap()).unwrap();
    }
    s
}

fn to_device(s: &ParamStore, device: Device) -> ParamStore {
    s.to_device(device).unwrap()
}

#[derive(Default)]
struct Tally {
    values: usize,
    exact: usize,
}

/// `got` equals `want` within 1e-6 relative (parameters: relative to max(|want|, 1), since
/// an update can cancel a parameter to near zero) for f32, within one ulp for bf16 and f16.
fn check(what: &str, got: &Tensor, want: &Tensor, tally: &mut Tally) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.device(), GPU, "{what}: device");
    let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    let param = !["m.", "v.", "v_row.", "v_col."].iter().any(|p| what.starts_with(p));
    for (k, (&a, &b)) in g.iter().zip(&w).enumerate() {
        tally.values += 1;
        if a.to_bits() == b.to_bits() {
            tally.exact += 1;
            continue;
        }
        match want.dtype() {
            DType::F32 => {
                let scale = if param { b.abs().max(1.0) } else { b.abs().max(f32::MIN_POSITIVE) };
                let rel = (a - b).abs() / scale;
                assert!(rel <= 1e-6, "{what}[{k}]: device {a:e}, host {b:e} (relative {rel:e})");
            }
            DType::BF16 => {
                let ulps = (bf16::from_f32(a).to_bits() as i32 - bf16::from_f32(b).to_bits() as i32).abs();
                assert!(ulps <= 1, "{what}[{k}]: device {a:e}, host {b:e} ({ulps} bf16 ulps)");
            }
            _ => {
                let ulps = (f16::from_f32(a).to_bits() as i32 - f16::from_f32(b).to_bits() as i32).abs();
                assert!(ulps <= 1, "{what}[{k}]: device {a:e}, host {b:e} ({ulps} f16 ulps)");
            }
        }
    }
}

/// Runs `steps` steps of the same optimizer on host and device parameters with the same
/// gradients (dtype `gdt`, on the device for the device optimizer) and compares everything
/// after each step.
fn host_and_device_agree(name: &str, algorithm: Algorithm, pdt: DType, gdt: DType, clip: Option<f64>, steps: usize) {
    let shapes = shapes();
    let cfg = config(algorithm, clip);
    let mut ph = random_store(&shapes, 1.0, 100, pdt);
    let mut pd = to_device(&ph, GPU);
    let mut host = OptimizerChain::new(cfg.clone(), &ph).unwrap();
    let mut dev = OptimizerChain::new(cfg, &pd).unwrap();
    let mut tally = Tally::default();
    for s in 0..steps {
        let g = random_store(&shapes, 0.5 + s as f32, 1000 * (s as u64 + 1), gdt);
        let hi = host.step(&mut ph, &g).unwrap();
        let di = dev.step(&mut pd, &to_device(&g, GPU)).unwrap();
        assert_eq!((di.step, di.clipped, di.schedule), (hi.step, hi.clipped, hi.schedule), "{name} step {s}");
        assert!((di.grad_norm - hi.grad_norm).abs() <= 1e-12 * hi.grad_norm, "{name} step {s}: {di:?} vs {hi:?}");
        for (n, want) in ph.iter() {
            check(&format!("{n} ({name}, step {s})"), pd.get(n).unwrap(), want, &mut tally);
        }
        let (sh, sd) = (host.state().unwrap(), dev.state().unwrap());
        assert_eq!(sd.names().collect::<Vec<_>>(), sh.names().collect::<Vec<_>>());
        assert_eq!(sd.get("count").unwrap().to_vec::<u32>().unwrap(), [s as u32 + 1, 0]);
        for (n, want) in sh.iter().filter(|(n, _)| *n != "count") {
            check(&format!("{n} ({name}, step {s})"), sd.get(n).unwrap(), want, &mut tally);
        }
    }
    println!("{name}: {} values over {steps} steps, {} bit-exact", tally.values, tally.exact);
}

#[test]
#[ignore = "needs a CUDA device"]
fn factored_adam_on_cuda_equals_the_host_step() {
    host_and_device_agree(
        "factored adam, bf16 m",
        factored(Some(0.9), DType::BF16),
        DType::F32,
        DType::F32,
        Some(1.0),
        4,
    );
    host_and_device_agree("factored adam, f32 m", factored(Some(0.9), DType::F32), DType::F32, DType::F32, None, 3);
    host_and_device_agree(
        "factored adam, no m, bf16 grads",
        factored(None, DType::BF16),
        DType::F32,
        DType::BF16,
        None,
        3,
    );
    host_and_device_agree(
        "factored adam, bf16 params",
        factored(Some(0.9), DType::BF16),
        DType::BF16,
        DType::F32,
        Some(1.0),
        3,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_on_cuda_equals_the_host_step() {
    let bf16_m = AdamWConfig { m_dtype: DType::BF16, ..Default::default() };
    host_and_device_agree(
        "adamw, f32 m",
        Algorithm::AdamW(AdamWConfig::default()),
        DType::F32,
        DType::F32,
        Some(1.0),
        4,
    );
    host_and_device_agree("adamw, bf16 m, f16 grads", Algorithm::AdamW(bf16_m), DType::F32, DType::F16, None, 3);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sgd_on_cuda_equals_the_host_step() {
    host_and_device_agree("sgd, bf16 m", Algorithm::Sgd(SgdConfig::default()), DType::F32, DType::F32, Some(1.0), 4);
    let plain = SgdConfig { momentum: None, ..Default::default() };
    host_and_device_agree("sgd, no m, f16 params", Algorithm::Sgd(plain), DType::F16, DType::F32, Some(1.0), 3);
}

#[test]
#[ignore = "needs a CUDA device"]
fn frozen_parameters_stay_bit_for_bit_and_outside_the_norm() {
    let shapes = shapes();
    let mut p = to_device(&random_store(&shapes, 1.0, 7, DType::F32), GPU);
    let before = p.get("frozen.weight").unwrap().to_vec::<f32>().unwrap();
    let mut opt = OptimizerChain::new(config(factored(Some(0.9), DType::BF16), Some(1.0)), &p).unwrap();
    assert!(!opt.state().unwrap().names().any(|n| n.ends_with("frozen.weight")));
    let mut g = to_device(&random_store(&shapes, 1.0, 8, DType::F32), GPU);
    // A huge gradient on the frozen parameter changes neither it nor the norm.
    let trainable_norm = opt.step(&mut p, &g).unwrap().grad_norm;
    g.set("frozen.weight", Tensor::full(1e6, [8, 8], DType::F32, GPU).unwrap()).unwrap();
    let mut p2 = to_device(&random_store(&shapes, 1.0, 7, DType::F32), GPU);
    let mut opt2 = OptimizerChain::new(config(factored(Some(0.9), DType::BF16), Some(1.0)), &p2).unwrap();
    assert_eq!(opt2.step(&mut p2, &g).unwrap().grad_norm, trainable_norm);
    opt.step(&mut p, &g).unwrap();
    assert_eq!(p.get("frozen.weight").unwrap().to_vec::<f32>().unwrap(), before);
    assert_eq!(p2.get("frozen.weight").unwrap().to_vec::<f32>().unwrap(), before);
}

#[test]
#[ignore = "needs a CUDA device"]
fn state_round_trips_between_host_and_device() {
    // Two host steps, then the state moves to a device optimizer (and back to a fresh host one):
    // the next step agrees everywhere, and the device state() equals the host's.
    let shapes = shapes();
    for algorithm in [
        factored(Some(0.9), DType::BF16),
        Algorithm::AdamW(AdamWConfig::default()),
        Algorithm::Sgd(SgdConfig::default()),
    ] {
        let cfg = config(algorithm, Some(1.0));
        let mut ph = random_store(&shapes, 1.0, 3, DType::F32);
        let mut host = OptimizerChain::new(cfg.clone(), &ph).unwrap();
        for s in 0..2 {
            host.step(&mut ph, &random_store(&shapes, 1.0, 50 + s, DType::F32)).unwrap();
        }
        let mut pd = to_device(&ph, GPU);
        let mut dev = OptimizerChain::new(cfg.clone(), &pd).unwrap();
        dev.load_state(&host.state().unwrap()).unwrap();
        let mut tally = Tally::default();
        for (n, t) in host.state().unwrap().iter().filter(|(n, _)| *n != "count") {
            check(&format!("{n} (loaded)"), dev.state().unwrap().get(n).unwrap(), t, &mut tally);
        }
        assert_eq!(tally.exact, tally.values, "loading state copies it exactly");
        assert_eq!(dev.count(), 2);
        let g = random_store(&shapes, 1.0, 60, DType::F32);
        host.step(&mut ph, &g).unwrap();
        dev.step(&mut pd, &to_device(&g, GPU)).unwrap();
        let sh = host.state().unwrap();
        for (n, t) in sh.iter().filter(|(n, _)| *n != "count") {
            check(&format!("{n} (after a device step)"), dev.state().unwrap().get(n).unwrap(), t, &mut tally);
        }
        // Device state into a host optimizer: the host continues exactly like the device.
        let mut back = OptimizerChain::new(cfg, &ph).unwrap();
        back.load_state(&dev.state().unwrap()).unwrap();
        let mut ph2 = ph.clone();
        let g = random_store(&shapes, 1.0, 70, DType::F32);
        back.step(&mut ph2, &g).unwrap();
        dev.step(&mut pd, &to_device(&g, GPU)).unwrap();
        for (n, t) in ph2.iter() {
            check(&format!("{n} (host from device state)"), pd.get(n).unwrap(), t, &mut tally);
        }
        println!("round trip: {} values, {} bit-exact", tally.values, tally.exact);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn non_finite_gradients_are_refused_on_the_device_and_change_nothing() {
    let shapes = shapes();
    let mut p = to_device(&random_store(&shapes, 1.0, 5, DType::F32), GPU);
    let mut opt = OptimizerChain::new(config(factored(Some(0.9), DType::BF16), Some(1.0)), &p).unwrap();
    let before: Vec<Vec<f32>> = p.iter().map(|(_, t)| t.to_f32_vec().unwrap()).collect();
    let mut g = to_device(&random_store(&shapes, 1.0, 6, DType::F32), GPU);
    let mut bad = g.get("blocks.0.mlp.fc1.bias").unwrap().to_f32_vec().unwrap();
    bad[4000] = f32::NAN;
    g.set("blocks.0.mlp.fc1.bias", Tensor::from_f32(bad, [5003], DType::F32, GPU).unwrap()).unwrap();
    let e = opt.step(&mut p, &g).unwrap_err().to_string();
    assert!(e.starts_with("gradient of blocks.0.mlp.fc1.bias is not finite"), "{e}");
    assert_eq!(opt.count(), 0);
    let after: Vec<Vec<f32>> = p.iter().map(|(_, t)| t.to_f32_vec().unwrap()).collect();
    assert_eq!(after, before);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sum_of_squares_and_copy_on_the_device() {
    let ts: Vec<Tensor> =
        [(vec![4097], DType::F32), (vec![33, 65], DType::BF16), (vec![0], DType::F32), (vec![3], DType::F16)]
            .into_iter()
            .enumerate()
            .map(|(k, (dims, dt))| Tensor::randn(dims, 0.0, 3.0, k as u64, dt, GPU).unwrap())
            .collect();
    let want: f64 = ts.iter().flat_map(|t| t.to_f32_vec().unwrap()).map(|x| x as f64 * x as f64).sum();
    let refs: Vec<&Tensor> = ts.iter().collect();
    let got = cuda::sum_of_squares(&refs).unwrap();
    assert!((got - want).abs() <= 1e-13 * want, "{got} vs {want}");
    assert_eq!(cuda::sum_of_squares(&[]).unwrap(), 0.0);
    // A view at an odd offset takes the scalar path.
    let view = ts[0].narrow(1, 4095).unwrap();
    let want: f64 = view.to_f32_vec().unwrap().iter().map(|&x| x as f64 * x as f64).sum();
    let got = cuda::sum_of_squares(&[&view]).unwrap();
    assert!((got - want).abs() <= 1e-13 * want, "{got} vs {want}");
    let c = cuda::copy(&ts[1]).unwrap();
    assert_eq!(c.to_vec::<bf16>().unwrap(), ts[1].to_vec::<bf16>().unwrap());
    assert_eq!(c.dims(), ts[1].dims());
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_device_step_writes_the_flat_buffers_in_place_and_spares_earlier_views() {
    // One f32 parameter buffer on the device; the step updates it in place (same device
    // buffer, one launch), while a view and a clone of the store taken before keep their values.
    let shapes = shapes();
    let host = random_store(&shapes, 1.0, 11, DType::F32);
    let mut params = to_device(&host, GPU);
    assert_eq!(params.buffers().len(), 1);
    let grads = to_device(&random_store(&shapes, 0.1, 12, DType::F32), GPU);
    // No warmup: the first step must change the parameters (warmup's first factor is 0).
    let mut cfg = config(factored(Some(0.9), DType::BF16), Some(1.0));
    cfg.schedule = Schedule::new(Decay::Cosine, 0, 0, 20).unwrap();
    let mut opt = OptimizerChain::new(cfg.clone(), &params).unwrap();
    let name = shapes[0].0;
    let before_view = params.get(name).unwrap().clone();
    let before_store = params.clone();
    opt.step(&mut params, &grads).unwrap();
    assert_eq!(before_view.to_f32_vec().unwrap(), host.get(name).unwrap().to_f32_vec().unwrap());
    assert_eq!(before_store.buffer(0).to_f32_vec().unwrap(), host.buffer(0).to_f32_vec().unwrap());
    assert_ne!(params.get(name).unwrap().to_f32_vec().unwrap(), host.get(name).unwrap().to_f32_vec().unwrap());
    // Unshared now: the next step writes through the same device pointer.
    let ptr = vit_tensor::cuda::kernel::device_ptr(params.buffer(0)).unwrap();
    opt.step(&mut params, &grads).unwrap();
    assert_eq!(vit_tensor::cuda::kernel::device_ptr(params.buffer(0)).unwrap(), ptr);
    // And it equals the host reference.
    let mut host_params = host.clone();
    let mut host_opt = OptimizerChain::new(cfg, &host).unwrap();
    let host_grads = to_device(&grads, Device::Cpu);
    host_opt.step(&mut host_params, &host_grads).unwrap();
    host_opt.step(&mut host_params, &host_grads).unwrap();
    let (got, want) = (params.buffer(0).to_f32_vec().unwrap(), host_params.buffer(0).to_f32_vec().unwrap());
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "device and host steps differ by {worst} (relative)");
}
