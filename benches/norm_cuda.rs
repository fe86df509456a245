//! The fused LayerNorm kernels (issue 14 item 5) at ViT shapes, bf16: forward, backward (dx,
//! dγ, dβ) and the residual add folded in (`add_layer_norm` forward and backward), in GB/s of
//! compulsory traffic (each tensor read or written once), next to a device copy of the same
//! bytes (`ops::slice` of the whole tensor: one read and one write with 16-byte accesses), and
//! the unfused compositions (add, then LayerNorm; LayerNorm backward, then add) on the same
//! compulsory traffic, so their GB/s compare directly.
//! Times include the zeroing of the outputs (allocations are memset until the memory engine of
//! issue 14 item 2 lands), for the copy too. Rows: batch 256 × 197 tokens.
//! `cargo bench --bench norm_cuda` (prints a note and exits on a machine without a GPU).

mod common;

use std::hint::black_box;
use vit_tensor::{
    cuda,
    ops::{self, NormKind},
    DType, Device, Tensor,
};

/// `(name, rows, width)`: B/16 and L/16 at batch 256.
const SHAPES: &[(&str, usize, usize)] = &[("B/16", 256 * 197, 768), ("L/16", 256 * 197, 1024)];

fn main() {
    if !cuda::available() {
        println!("norm_cuda: no CUDA device here; run this bench on a GPU host (see docs/perf.md)");
        return;
    }
    let dev = Device::Cuda(0);
    let (samples, iters) = if common::quick() { (2, 1) } else { (10, 5) };
    for (kernel, status) in cuda::self_check::check_all(0).unwrap() {
        println!("norm_cuda: self-check {kernel}: {status}");
    }
    println!("norm_cuda: bf16, GB/s of compulsory traffic; copy = ops::slice of the same bytes");
    println!("  {:<6} {:<22} {:>10} {:>9} {:>10}", "shape", "op", "time (us)", "GB/s", "vs copy");
    for &(shape, rows, d) in SHAPES {
        let t = |seed| Tensor::randn([rows, d], 0.0, 1.0, seed, DType::BF16, dev).unwrap();
        let (x, r, dy, dres) = (t(1), t(2), t(3), t(4));
        let w = Tensor::randn([d], 1.0, 0.1, 5, DType::BF16, dev).unwrap();
        let b = Tensor::randn([d], 0.0, 0.1, 6, DType::BF16, dev).unwrap();
        let kind = NormKind::LayerNorm;
        let f = ops::add_layer_norm_fwd(&x, &r, Some(&w), Some(&b), 1e-6, kind).unwrap();
        let tensor_bytes = (rows * d * 2) as f64;
        let time = |f: &mut dyn FnMut()| {
            common::median_time(samples, iters, || {
                f();
                cuda::synchronize(0).unwrap();
            })
        };
        // (op, tensors moved, time); each moved tensor is rows x d bf16.
        let copy = time(&mut || {
            black_box(ops::slice(&x, 0, 0, rows).unwrap());
        });
        let copy_gbs = 2.0 * tensor_bytes / copy.as_secs_f64() / 1e9;
        let runs: Vec<(&str, f64, std::time::Duration)> = vec![
            ("copy", 2.0, copy),
            (
                "layer_norm fwd",
                2.0,
                time(&mut || {
                    black_box(ops::layer_norm_fwd(&x, Some(&w), Some(&b), 1e-6, kind).unwrap());
                }),
            ),
            (
                "layer_norm bwd",
                3.0,
                time(&mut || {
                    black_box(ops::layer_norm_bwd(&f.h, Some(&w), &f.mean, &f.rstd, &dy, kind, true).unwrap());
                }),
            ),
            (
                "add_layer_norm fwd",
                4.0,
                time(&mut || {
                    black_box(ops::add_layer_norm_fwd(&x, &r, Some(&w), Some(&b), 1e-6, kind).unwrap());
                }),
            ),
            (
                "add_layer_norm bwd",
                4.0,
                time(&mut || {
                    black_box(
                        ops::add_layer_norm_bwd(&f.h, Some(&w), &f.mean, &f.rstd, &dy, &dres, kind, true).unwrap(),
                    );
                }),
            ),
            // The unfused compositions, on the same compulsory traffic as the fused ops.
            (
                "add, layer_norm fwd",
                4.0,
                time(&mut || {
                    let h = ops::add(&x, &r).unwrap();
                    black_box(ops::layer_norm_fwd(&h, Some(&w), Some(&b), 1e-6, kind).unwrap());
                }),
            ),
            (
                "layer_norm bwd, add",
                4.0,
                time(&mut || {
                    let g = ops::layer_norm_bwd(&f.h, Some(&w), &f.mean, &f.rstd, &dy, kind, true).unwrap();
                    black_box(ops::add(&dres, &g.dx).unwrap());
                }),
            ),
        ];
        for (op, tensors, t) in runs {
            let gbs = tensors * tensor_bytes / t.as_secs_f64() / 1e9;
            println!("  {shape:<6} {op:<22} {:>10.1} {gbs:>9.0} {:>9.2}x", t.as_secs_f64() * 1e6, gbs / copy_gbs);
        }
    }
}
