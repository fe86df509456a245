//! CUDA GEMM baseline (cuBLASLt, bf16 in and out, f32 accumulation) at ViT shapes, in TFLOP/s
//! and as a ratio to the H100's dense bf16 peak (reference §1: 989.4 TFLOP/s). The fast
//! kernels of the kernels issue report their ratio to this baseline.
//! `cargo bench --bench gemm_cuda` (prints a note and exits on a machine without a GPU).

mod common;

use std::hint::black_box;
use vit_tensor::{cuda, ops, DType, Device, Tensor};

const H100_BF16_PEAK_TFLOPS: f64 = 989.4;

/// `(name, m, n, k)`: B/16 and L/16 layers at batch 256 × 196 tokens, and squares.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("B/16 qkv fwd", 50176, 2304, 768),
    ("B/16 fc1 fwd", 50176, 3072, 768),
    ("B/16 fc2 fwd", 50176, 768, 3072),
    ("L/16 fc1 fwd", 50176, 4096, 1024),
    ("square 4096", 4096, 4096, 4096),
    ("square 8192", 8192, 8192, 8192),
];

fn main() {
    if !cuda::available() {
        println!("gemm_cuda: no CUDA device here; run this bench on a GPU host (see docs/perf.md)");
        return;
    }
    let dev = Device::Cuda(0);
    let (samples, iters) = if common::quick() { (2, 1) } else { (10, 5) };
    println!("gemm_cuda: cuBLASLt bf16, ratio = achieved / {H100_BF16_PEAK_TFLOPS} TFLOP/s");
    for &(name, m, n, k) in SHAPES {
        let a = Tensor::randn([m, k], 0.0, 1.0, 1, DType::BF16, dev).unwrap();
        let b = Tensor::randn([k, n], 0.0, 1.0, 2, DType::BF16, dev).unwrap();
        let t = common::median_time(samples, iters, || {
            black_box(ops::matmul(&a, &b).unwrap());
            cuda::synchronize(0).unwrap();
        });
        let tflops = 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e12;
        println!(
            "  {name:<14} {m}x{n}x{k}: {tflops:7.1} TFLOP/s (ratio to peak {:.3})",
            tflops / H100_BF16_PEAK_TFLOPS
        );
    }
}
