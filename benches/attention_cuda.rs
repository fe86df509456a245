//! CUDA attention, bf16: the tensor-core flash kernels (`kernels/flash_attention.cu`, on
//! contiguous `[B, H, N, d]` tensors and on the packed qkv projection) against the reference
//! warp-per-row kernels (`kernels/attention.cu`), forward and backward, in TFLOP/s: forward
//! 4·B·H·N²·d, backward 2.5× that (FlashAttention's convention; the recomputed forward GEMM is
//! not counted). Shapes: ViT-B/16 and L/16 at batch 256 (197 tokens), N = 256, and d = 128.
//! Targets (reference §1): ≥ 300 TFLOP/s forward and ≥ 250 backward at N = 256 on an H100.
//! `benches/reference/sdpa.py` prints the same table for PyTorch's scaled_dot_product_attention.
//! A second table times every flash kernel variant (`FlashVariant`, run explicitly, no
//! self-check) at the same shapes, so the defaults (`flash_attention::default_variant`) can be
//! set from one run; "-" marks a direction or head dim the variant has no kernels for.
//! `cargo bench --bench attention_cuda` (prints a note and exits on a machine without a GPU).

mod common;

use std::hint::black_box;
use vit_tensor::cuda::flash_attention::{self as fa, FlashVariant};
use vit_tensor::{cuda, ops, DType, Device, Tensor};

/// `(name, batch, heads, tokens, head_dim)`.
const SHAPES: &[(&str, usize, usize, usize, usize)] = &[
    ("B/16", 256, 12, 197, 64),
    ("L/16", 256, 16, 197, 64),
    ("N=256", 256, 12, 256, 64),
    ("N=256 d=128", 256, 6, 256, 128),
];

fn tflops(flops: f64, t: std::time::Duration) -> f64 {
    flops / t.as_secs_f64() / 1e12
}

fn main() {
    if !cuda::available() {
        println!("attention_cuda: no CUDA device here; run this bench on a GPU host (see docs/perf.md)");
        return;
    }
    let dev = Device::Cuda(0);
    let quick = common::quick();
    let (samples, iters) = if quick { (2, 1) } else { (10, 5) };
    let dt = DType::BF16;
    println!("attention_cuda: bf16, TFLOP/s (forward 4·B·H·N²·d, backward 2.5× that), median of {samples}×{iters}");
    println!(
        "| shape | B | H | N | d | fwd flash | fwd packed | fwd reference | bwd flash | bwd packed | bwd reference |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &(name, b, h, n, d) in SHAPES {
        // Quick mode (cargo test --benches): a small batch, only to show the bench runs.
        let b = if quick { 4 } else { b };
        let w = h * d;
        let scale = (d as f32).powf(-0.5);
        let qkv = Tensor::randn([b, n, 3 * w], 0.0, 1.0, 1, dt, dev).unwrap();
        let split = |i: usize| {
            let x = ops::slice(&qkv, 2, i * w, w).unwrap();
            ops::permute(&x.reshape([b, n, h, d]).unwrap(), &[0, 2, 1, 3]).unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let d_o = Tensor::randn([b, h, n, d], 0.0, 1.0, 2, dt, dev).unwrap();
        let d_o_packed = Tensor::randn([b, n, w], 0.0, 1.0, 3, dt, dev).unwrap();
        let fwd_flops = 4.0 * (b * h * n * n * d) as f64;
        let bwd_flops = 2.5 * fwd_flops;
        let sync = || cuda::synchronize(0).unwrap();

        let t_fwd = common::median_time(samples, iters, || {
            black_box(ops::attention_fwd(&q, &k, &v, scale).unwrap());
            sync();
        });
        let t_fwd_packed = common::median_time(samples, iters, || {
            black_box(ops::attention_fwd_packed(&qkv, 0, w, h, scale).unwrap());
            sync();
        });
        let t_fwd_ref = common::median_time(samples, iters, || {
            black_box(cuda::flash_attention::reference_fwd(&q, &k, &v, scale).unwrap());
            sync();
        });
        let out = ops::attention_fwd(&q, &k, &v, scale).unwrap();
        let packed = ops::attention_fwd_packed(&qkv, 0, w, h, scale).unwrap();
        let t_bwd = common::median_time(samples, iters, || {
            black_box(ops::attention_bwd(&q, &k, &v, &out.o, &out.lse, &d_o, scale).unwrap());
            sync();
        });
        let t_bwd_packed = common::median_time(samples, iters, || {
            black_box(ops::attention_bwd_packed(&qkv, 0, w, h, &packed.o, &packed.lse, &d_o_packed, scale).unwrap());
            sync();
        });
        let t_bwd_ref = common::median_time(samples, iters, || {
            black_box(cuda::flash_attention::reference_bwd(&q, &k, &v, &out.o, &out.lse, &d_o, scale).unwrap());
            sync();
        });
        println!(
            "| {name} | {b} | {h} | {n} | {d} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            tflops(fwd_flops, t_fwd),
            tflops(fwd_flops, t_fwd_packed),
            tflops(fwd_flops, t_fwd_ref),
            tflops(bwd_flops, t_bwd),
            tflops(bwd_flops, t_bwd_packed),
            tflops(bwd_flops, t_bwd_ref),
        );
    }
    variant_table(&dev, quick, samples, iters);
    // Which path the ops took: "passed" means the flash columns are the flash kernels.
    for (kernel, status) in cuda::self_check::fast_kernel_report(0).unwrap() {
        if kernel.starts_with("flash_attention") {
            println!("  {kernel}: {status}");
        }
    }
}

/// One row per (shape, variant): forward and backward TFLOP/s of the explicit variant on
/// contiguous and on packed tensors.
fn variant_table(dev: &Device, quick: bool, samples: usize, iters: usize) {
    let dt = DType::BF16;
    println!();
    println!("attention_cuda variants: bf16, TFLOP/s, median of {samples}×{iters} (- : no kernel for this head dim)");
    println!("| shape | B | H | N | d | variant | fwd flash | fwd packed | bwd flash | bwd packed |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let sync = || cuda::synchronize(0).unwrap();
    for &(name, b, h, n, d) in SHAPES {
        let b = if quick { 4 } else { b };
        let w = h * d;
        let scale = (d as f32).powf(-0.5);
        let qkv = Tensor::randn([b, n, 3 * w], 0.0, 1.0, 1, dt, *dev).unwrap();
        let shape = [b, h, n, d];
        let (q, k, v) = (
            Tensor::randn(shape, 0.0, 1.0, 4, dt, *dev).unwrap(),
            Tensor::randn(shape, 0.0, 1.0, 5, dt, *dev).unwrap(),
            Tensor::randn(shape, 0.0, 1.0, 6, dt, *dev).unwrap(),
        );
        let d_o = Tensor::randn(shape, 0.0, 1.0, 2, dt, *dev).unwrap();
        let d_o_packed = Tensor::randn([b, n, w], 0.0, 1.0, 3, dt, *dev).unwrap();
        let fwd_flops = 4.0 * (b * h * n * n * d) as f64;
        let bwd_flops = 2.5 * fwd_flops;
        // Saved forward outputs from the default kernels, shared by every variant's backward.
        let (o, lse) = fa::fwd_variant(&q, &k, &v, scale, FlashVariant::M64).unwrap();
        let (po, plse) = fa::fwd_packed_variant(&qkv, 0, w, h, scale, FlashVariant::M64).unwrap();
        let cell = |ok: bool, flops: f64, f: &mut dyn FnMut()| {
            if ok {
                format!("{:.1}", tflops(flops, common::median_time(samples, iters, f)))
            } else {
                "-".to_string()
            }
        };
        for variant in FlashVariant::ALL {
            let dp = (d.div_ceil(16) * 16).max(64);
            let (fwd_ok, bwd_ok) = (variant.supports(false, dp), variant.supports(true, dp));
            let fwd = cell(fwd_ok, fwd_flops, &mut || {
                black_box(fa::fwd_variant(&q, &k, &v, scale, variant).unwrap());
                sync();
            });
            let fwd_packed = cell(fwd_ok, fwd_flops, &mut || {
                black_box(fa::fwd_packed_variant(&qkv, 0, w, h, scale, variant).unwrap());
                sync();
            });
            let bwd = cell(bwd_ok, bwd_flops, &mut || {
                black_box(fa::bwd_variant(&q, &k, &v, &o, &lse, &d_o, scale, variant).unwrap());
                sync();
            });
            let bwd_packed = cell(bwd_ok, bwd_flops, &mut || {
                black_box(fa::bwd_packed_variant(&qkv, 0, w, h, &po, &plse, &d_o_packed, scale, variant).unwrap());
                sync();
            });
            println!("| {name} | {b} | {h} | {n} | {d} | {variant} | {fwd} | {fwd_packed} | {bwd} | {bwd_packed} |");
        }
    }
}
