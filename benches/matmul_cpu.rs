//! CPU matmul: `ops::matmul` against the `gemm` crate called directly (the wrapper must cost
//! < 5%) and against a naive triple loop, each ratio measured in the same run; then bf16 GEMMs
//! (`cpu::set_matmul_precision(Bf16)`: the AMX tiles where the CPU has them) against f32, the
//! two timed alternately, sample by sample.
//! `cargo bench --bench matmul_cpu`

mod common;

use criterion::{criterion_group, Criterion, Throughput};
use std::hint::black_box;
use vit_tensor::{
    cpu::{self, gemm_f32, MatmulPrecision},
    ops, DType, Device, Tensor,
};

/// `[m, k] x [k, n]` shapes: square, ViT-like linear layers on a small batch of tokens, and
/// the four linear layers of ViT-B/16's forward at batch 8 (1,576 tokens; the shapes of `vit
/// bench infer --model B/16 --batch 8`, compared with PyTorch's `torch.matmul` at the same
/// shapes by `benches/reference/matmul_torch_cpu.py`).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("square 256", 256, 256, 256),
    ("S/16 qkv, 4x197 tokens", 788, 1152, 384),
    ("Ti/16 fc1, 8x197 tokens", 1576, 768, 192),
    ("B/16 qkv, 8x197 tokens", 1576, 2304, 768),
    ("B/16 proj, 8x197 tokens", 1576, 768, 768),
    ("B/16 fc1, 8x197 tokens", 1576, 3072, 768),
    ("B/16 fc2, 8x197 tokens", 1576, 768, 3072),
];

fn naive(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for p in 0..k {
                s += a[i * k + p] * b[p * n + j];
            }
            c[i * n + j] = s;
        }
    }
}

fn inputs(m: usize, n: usize, k: usize) -> (Tensor, Tensor) {
    let a = Tensor::randn([m, k], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
    let b = Tensor::randn([k, n], 0.0, 1.0, 2, DType::F32, Device::Cpu).unwrap();
    (a, b)
}

/// Prints, per shape, GFLOP/s of each path and the ratios the issue asks for.
fn ratios() {
    let threads = rayon::current_num_threads();
    let (samples, iters) = if common::quick() { (3, 1) } else { (15, 3) };
    println!("matmul_cpu: {threads} threads; ratio = time / time of gemm called directly");
    for &(name, m, n, k) in SHAPES {
        let (a, b) = inputs(m, n, k);
        let (av, bv) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        let direct = common::median_time(samples, iters, || {
            let mut c = vec![0.0f32; m * n];
            gemm_f32(&av, &bv, &mut c, m, n, k, false, false, threads);
            black_box(c);
        });
        let ours = common::median_time(samples, iters, || {
            black_box(ops::matmul(&a, &b).unwrap());
        });
        let gflops = |t: std::time::Duration| 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
        // The naive loop only where it takes under a second (the B/16 shapes would take ~10 s).
        let naive_col = if m * n * k <= 400_000_000 {
            let naive_t = common::median_time(if common::quick() { 1 } else { 3 }, 1, || {
                let mut c = vec![0.0f32; m * n];
                naive(&av, &bv, &mut c, m, n, k);
                black_box(c);
            });
            format!("{:6.2} (ratio {:.1})", gflops(naive_t), naive_t.as_secs_f64() / direct.as_secs_f64())
        } else {
            "skipped (too slow)".into()
        };
        println!(
            "  {name:<26} [{m}x{k}]x[{k}x{n}]  gemm {:7.1} GFLOP/s | ops::matmul {:7.1} (ratio {:.3}) | naive loop {naive_col}",
            gflops(direct),
            gflops(ours),
            ours.as_secs_f64() / direct.as_secs_f64(),
        );
    }
}

/// `(name, m, n, k, trans_a, trans_b)`: the three products of each linear layer of the
/// Fashion-MNIST recipe's model (width 64, qkv 192, MLP 128) over 128 images of 50 tokens
/// (forward `x·Wᵀ`, input gradient `dy·W`, weight gradient `dyᵀ·x`), and ViT-B/16's qkv.
const BF16_SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("recipe qkv forward", 6400, 192, 64, false, true),
    ("recipe qkv input grad", 6400, 64, 192, false, false),
    ("recipe qkv weight grad", 192, 64, 6400, true, false),
    ("recipe fc2 forward", 6400, 64, 128, false, true),
    ("recipe fc2 weight grad", 64, 128, 6400, true, false),
    ("B/16 qkv, 8x197 tokens", 1576, 2304, 768, false, true),
];

/// Prints GFLOP/s of f32 and bf16 GEMMs per shape and their ratio; the two alternate sample by
/// sample, so the host's drift falls on both.
fn bf16_ratios() {
    let threads = rayon::current_num_threads();
    let samples = if common::quick() { 3 } else { 21 };
    let path = if cpu::amx_available() { "AMX tiles" } else { "emulated (no AMX): rounding, then f32 gemm" };
    println!("matmul_cpu bf16: {threads} threads, bf16 on {path}; ratio = f32 time / bf16 time");
    for &(name, m, n, k, ta, tb) in BF16_SHAPES {
        let (a, b) = inputs(m, n, k);
        let (av, bv) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        let mut c = vec![0.0f32; m * n];
        let mut times = [Vec::new(), Vec::new()];
        for s in 0..=samples {
            for (which, p) in [MatmulPrecision::F32, MatmulPrecision::Bf16].into_iter().enumerate() {
                cpu::set_matmul_precision(p);
                let t = std::time::Instant::now();
                gemm_f32(&av, &bv, &mut c, m, n, k, ta, tb, threads);
                black_box(&mut c);
                if s > 0 {
                    times[which].push(t.elapsed().as_secs_f64());
                }
            }
        }
        cpu::set_matmul_precision(MatmulPrecision::F32);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (f, h) = (median(&mut times[0]), median(&mut times[1]));
        let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "  {name:<24} [{m}x{k}]x[{k}x{n}]{}  f32 {:7.1} GFLOP/s | bf16 {:7.1} (ratio {:.2})",
            if ta { " (a stored transposed)" } else { "" },
            gflops(f),
            gflops(h),
            f / h
        );
    }
}

fn bench(c: &mut Criterion) {
    ratios();
    bf16_ratios();
    let threads = rayon::current_num_threads();
    let mut g = c.benchmark_group("matmul_cpu");
    for &(name, m, n, k) in SHAPES {
        let (a, b) = inputs(m, n, k);
        let (av, bv) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(format!("{name}/ops::matmul"), |bch| bch.iter(|| ops::matmul(&a, &b).unwrap()));
        g.bench_function(format!("{name}/gemm direct"), |bch| {
            bch.iter(|| {
                let mut c = vec![0.0f32; m * n];
                gemm_f32(&av, &bv, &mut c, m, n, k, false, false, threads);
                c
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
