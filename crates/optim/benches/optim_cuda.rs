//! Fused CUDA optimizer steps over the parameters of ViT-B/16 (86M parameters in ~150
//! tensors), in GB/s and as a ratio to a device-to-device copy measured in the same run
//! (reference §7 target: the step at ≥ 80% of copy bandwidth).
//!
//! For each optimizer it times (1) the fused kernels alone through `vit_optim::cuda`
//! (every step reads the tensors the previous one wrote, as in training) and (2) the whole
//! `OptimizerChain::step` (gradient norm on the device with one host read, the kernels,
//! bookkeeping). Bytes per step count every tensor read and written by the kernels: parameter
//! (r+w), gradient (r; factored Adam reads a factored gradient twice, once for its row and
//! column statistics), momentum (r+w), second moment (r+w, or the factored rows and columns);
//! the chain adds one more gradient read for the norm. The copy reference moves the same
//! number of bytes (half read, half written).
//!
//! `cargo bench -p vit-optim --bench optim_cuda` (prints a note and exits on a machine without
//! a GPU; under `cargo test` it runs a single short iteration).

use std::time::Instant;
use vit_model::{ModelConfig, ParamStore, VisionTransformer};
use vit_optim::cuda::{
    self as fused, AdamWCoefficients, FactoredAdamCoefficients, ParamStep, SecondMoment, StepScalars,
};
use vit_optim::{
    AdamWConfig, Algorithm, FactoredAdamConfig, Optimizer, OptimizerChain, OptimizerConfig, SgdConfig, STATE_M,
    STATE_V, STATE_V_COL, STATE_V_ROW,
};
use vit_tensor::cuda;
use vit_tensor::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// Seconds per call of `f`, over `iters` calls after `warmup` ones, synchronised at both ends.
fn time(warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    cuda::synchronize(0).unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    cuda::synchronize(0).unwrap();
    start.elapsed().as_secs_f64() / iters as f64
}

/// One parameter's current tensors for the kernel-only loop.
struct Current {
    param: Tensor,
    m: Option<Tensor>,
    v: Vec<Tensor>,
    factored: Option<(usize, usize)>,
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.dtype().size_in_bytes()) as u64
}

fn main() {
    if !cuda::available() {
        println!("optim_cuda: no CUDA device here; run this bench on a GPU host (see docs/perf.md)");
        return;
    }
    let quick = !std::env::args().any(|a| a == "--bench");
    let (warmup, iters) = if quick { (1, 1) } else { (3, 20) };
    let cfg = ModelConfig::preset("B/16").unwrap();
    let shapes = VisionTransformer::new(&cfg, DType::F32, GPU).unwrap().param_shapes().unwrap();
    let mut params = ParamStore::new();
    let mut grads = ParamStore::new();
    for (k, (name, dims)) in shapes.iter().enumerate() {
        let k = k as u64;
        params.insert(name.as_str(), Tensor::randn(dims.clone(), 0.0, 0.02, k, DType::F32, GPU).unwrap()).unwrap();
        grads
            .insert(name.as_str(), Tensor::randn(dims.clone(), 0.0, 1e-3, 1000 + k, DType::F32, GPU).unwrap())
            .unwrap();
    }
    println!(
        "optim_cuda: ViT-B/16, {:.1}M parameters in {} tensors, f32 parameters and gradients",
        params.numel() as f64 / 1e6,
        params.len()
    );

    // The copy reference, at the size of the largest step's traffic.
    let copy_gbs = |total: u64| -> f64 {
        let x = Tensor::zeros([(total / 8) as usize], DType::F32, GPU).unwrap();
        let t = time(warmup, iters, || drop(fused::copy(&x).unwrap()));
        2.0 * bytes(&x) as f64 / t / 1e9
    };

    let cases: [(&str, Algorithm); 4] = [
        ("factored Adam, bf16 m", Algorithm::FactoredAdam(FactoredAdamConfig::default())),
        ("AdamW, f32 m", Algorithm::AdamW(AdamWConfig::default())),
        ("AdamW, bf16 m", Algorithm::AdamW(AdamWConfig { m_dtype: DType::BF16, ..Default::default() })),
        ("SGD, bf16 m", Algorithm::Sgd(SgdConfig::default())),
    ];
    let sc = StepScalars { schedule: 1.0, clip_scale: 0.5 };
    for (name, algorithm) in cases {
        let mut config = OptimizerConfig::new(algorithm, 1e-3);
        config.weight_decay = 1e-4;
        config.grad_clip_norm = Some(1.0);
        let mut opt = OptimizerChain::new(config, &params).unwrap();
        let state = opt.state().unwrap();
        let mut cur: Vec<Current> = params
            .iter()
            .map(|(n, t)| Current {
                param: t.clone(),
                m: state.get(&format!("{STATE_M}{n}")).ok().cloned(),
                v: [STATE_V, STATE_V_ROW, STATE_V_COL]
                    .iter()
                    .filter_map(|p| state.get(&format!("{p}{n}")).ok().cloned())
                    .collect(),
                factored: opt.factored(n).map(|f| (f.d0, f.d1)),
            })
            .collect();
        // Bytes the kernels move per step.
        let mut kernel_bytes = 0u64;
        for (c, (_, g)) in cur.iter().zip(grads.iter()) {
            kernel_bytes += 2 * bytes(&c.param) + bytes(g);
            kernel_bytes += c.m.as_ref().map_or(0, |m| 2 * bytes(m));
            kernel_bytes += c.v.iter().map(|v| 2 * bytes(v)).sum::<u64>();
            if c.factored.is_some() {
                kernel_bytes += bytes(g);
            }
        }
        let chain_bytes = kernel_bytes + grads.iter().map(|(_, g)| bytes(g)).sum::<u64>();

        let t_kernels = time(warmup, iters, || {
            let updates = {
                let steps: Vec<ParamStep<'_>> = cur
                    .iter()
                    .zip(grads.iter())
                    .map(|(c, (_, g))| ParamStep {
                        param: &c.param,
                        grad: g,
                        m: c.m.as_ref(),
                        second: match (c.v.len(), c.factored) {
                            (0, _) => SecondMoment::None,
                            (2, Some((d0, d1))) => SecondMoment::Factored { v_row: &c.v[0], v_col: &c.v[1], d0, d1 },
                            _ => SecondMoment::Full(&c.v[0]),
                        },
                        lr: 1e-3,
                        wd: 1e-4,
                    })
                    .collect();
                match algorithm {
                    Algorithm::FactoredAdam(_) => {
                        let k = FactoredAdamCoefficients {
                            beta2: 0.5,
                            one_minus_beta2: 0.5,
                            eps: 1e-30,
                            mu: 0.9,
                            one_minus_mu: 0.1,
                        };
                        fused::factored_adam_step(&steps, k, sc).unwrap()
                    }
                    Algorithm::AdamW(_) => {
                        let k = AdamWCoefficients {
                            b1: 0.9,
                            c1: 0.1,
                            b2: 0.999,
                            c2: 0.001,
                            bc1: 0.1,
                            bc2: 0.001,
                            eps: 1e-8,
                        };
                        fused::adamw_step(&steps, k, sc).unwrap()
                    }
                    Algorithm::Sgd(_) => fused::sgd_step(&steps, 0.9, sc).unwrap(),
                }
            };
            for (c, u) in cur.iter_mut().zip(updates) {
                c.param = u.param;
                c.m = u.m;
                c.v = u.v;
            }
        });
        let mut p = params.clone();
        let t_chain = time(warmup, iters, || {
            opt.step(&mut p, &grads).unwrap();
        });
        let copy = copy_gbs(kernel_bytes);
        let (gk, gc) = (kernel_bytes as f64 / t_kernels / 1e9, chain_bytes as f64 / t_chain / 1e9);
        println!("  {name} (copy of the same bytes: {copy:.1} GB/s)");
        println!(
            "    fused kernels        {:8.3} ms  {:6.3} GB  {gk:7.1} GB/s  ratio to copy {:.3}",
            t_kernels * 1e3,
            kernel_bytes as f64 / 1e9,
            gk / copy
        );
        println!(
            "    OptimizerChain::step {:8.3} ms  {:6.3} GB  {gc:7.1} GB/s  ratio to copy {:.3}",
            t_chain * 1e3,
            chain_bytes as f64 / 1e9,
            gc / copy
        );
    }
}
