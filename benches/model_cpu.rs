//! CPU training-step throughput (forward + backward, images/s) of a small ViT and of ViT-B/16
//! at batch 8, with the forward-only rate in the same run as the reference ratio.
//! `cargo bench --bench model_cpu`

mod common;

use std::hint::black_box;
use vit_model::{ModelConfig, VisionTransformer};
use vit_tensor::{DType, Device, Tensor};

/// Forward FLOPs per image (reference §1): `L·[2·N·(4D² + 2DM) + 4·N²·D] + 2·N·p²·C·D`.
fn forward_flops(c: &ModelConfig) -> f64 {
    let (n, d, m, l) = (c.seq_len() as f64, c.width as f64, c.mlp_dim as f64, c.depth as f64);
    l * (2.0 * n * (4.0 * d * d + 2.0 * d * m) + 4.0 * n * n * d)
        + 2.0 * n * (c.patch * c.patch * c.channels) as f64 * d
}

fn run(name: &str, cfg: &ModelConfig, batch: usize, samples: usize) {
    let model = VisionTransformer::new(cfg, DType::F32, Device::Cpu).unwrap();
    let p = model.init_params(0, DType::F32, Device::Cpu).unwrap();
    let images =
        Tensor::randn([batch, cfg.channels, cfg.image_size, cfg.image_size], 0.0, 1.0, 1, DType::F32, Device::Cpu)
            .unwrap();
    let dout = Tensor::randn([batch, cfg.classes], 0.0, 1.0, 2, DType::F32, Device::Cpu).unwrap();
    let fwd = common::median_time(samples, 1, || {
        black_box(model.predict(&p, &images).unwrap());
    });
    let step = common::median_time(samples, 1, || {
        let (_, saved) = model.forward(&p, &images).unwrap();
        let mut g = p.zeros_like(DType::F32).unwrap();
        black_box(model.backward(&p, &saved, &dout, &mut g).unwrap());
    });
    let ips = batch as f64 / step.as_secs_f64();
    let gflops = 3.0 * forward_flops(cfg) * ips / 1e9;
    println!(
        "  {name:<28} batch {batch:>2}: fwd+bwd {ips:8.2} images/s ({gflops:6.1} GFLOP/s) | forward only {:8.2} images/s (step/forward time {:.2})",
        batch as f64 / fwd.as_secs_f64(),
        step.as_secs_f64() / fwd.as_secs_f64()
    );
}

fn custom(fields: &[&str]) -> ModelConfig {
    let mut c = ModelConfig::custom();
    for s in ["image_size=28", "patch=4", "channels=1", "heads=4", "classes=10", "pool=gap"].iter().chain(fields) {
        c.set(s).unwrap();
    }
    c
}

fn main() {
    let quick = common::quick();
    println!("model_cpu: {} threads, f32", rayon::current_num_threads());
    let small = custom(&["width=128", "depth=6", "mlp_dim=512"]);
    // configs/fashion-mnist-vit.toml's model at its batch size.
    let fmnist = custom(&["width=64", "depth=6", "mlp_dim=128"]);
    let (batch, samples) = if quick { (4, 1) } else { (64, 5) };
    let (fm_batch, fm_samples) = if quick { (4, 1) } else { (128, 7) };
    // First with the allocator's defaults, then keeping freed memory (what `vit` does): the
    // ratio of the two lines is the cost of page faults on recycled activation buffers.
    println!(" glibc default heap:");
    run("small (28px/4, D128, L6, GAP)", &small, batch, samples);
    run("fmnist (28px/4, D64, L6, M128)", &fmnist, fm_batch, fm_samples);
    println!(" retain_freed_memory: {}", vit_tensor::cpu::retain_freed_memory());
    run("small (28px/4, D128, L6, GAP)", &small, batch, samples);
    run("fmnist (28px/4, D64, L6, M128)", &fmnist, fm_batch, fm_samples);
    let b16 = ModelConfig::preset("B/16").unwrap();
    run("B/16 (224px, MAP)", &b16, if quick { 1 } else { 8 }, if quick { 1 } else { 3 });
}
