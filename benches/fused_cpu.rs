//! Regression guard of the fused and vectorised CPU ops (issue 15 item 5): each against the
//! unfused composition it replaced, timed in the same run, at a ViT-Ti-sized step
//! (128 images × 49 tokens = 6,272 rows, width 192, MLP 768, 3 heads). A ratio above 1 means
//! the fused form got slower than the composition.
//! `cargo bench --bench fused_cpu`

mod common;

use criterion::{criterion_group, Criterion};
use std::hint::black_box;
use std::time::Duration;
use vit_tensor::{
    ops::{self, Gelu},
    DType, Device, Tensor,
};

const BATCH: usize = 128;
const TOKENS: usize = 49;
const WIDTH: usize = 192;
const MLP: usize = 768;
const HEADS: usize = 3;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
}

/// The tanh GELU as it was before the vectorised kernels: libm's `expf` per element.
fn scalar_gelu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let u = 0.797_884_6 * (v + 0.044_715 * v * v * v);
            0.5 * v * (2.0 - 2.0 / ((2.0 * u).exp() + 1.0))
        })
        .collect()
}

/// One op pair: a name, the fused form and the unfused composition.
struct Pair {
    name: &'static str,
    fused: Box<dyn Fn()>,
    unfused: Box<dyn Fn()>,
}

fn pairs() -> Vec<Pair> {
    let x = randn(&[BATCH, TOKENS, WIDTH], 1);
    let w1 = randn(&[MLP, WIDTH], 2);
    let b1 = randn(&[MLP], 3);
    let w2 = randn(&[WIDTH, MLP], 4);
    let b2 = randn(&[WIDTH], 5);
    let pre = randn(&[BATCH, TOKENS, MLP], 6);
    let dy = randn(&[BATCH, TOKENS, WIDTH], 7);
    let qkv = randn(&[BATCH, TOKENS, 3 * WIDTH], 8);
    let pre_v = pre.to_f32_vec().unwrap();
    let scale = 1.0 / ((WIDTH / HEADS) as f32).sqrt();
    let (x1, w1a, b1a) = (x.clone(), w1.clone(), b1.clone());
    let (x2, h, w2a, b2a, r) = (pre.clone(), pre.clone(), w2.clone(), b2.clone(), x.clone());
    let (w2b, b2b, r2) = (w2.clone(), b2.clone(), x.clone());
    let (dy1, w2c, pre1) = (dy.clone(), w2.clone(), pre.clone());
    let (dy2, w2d, pre2) = (dy.clone(), w2.clone(), pre.clone());
    let qkv1 = qkv.clone();
    let split = |t: &Tensor, i: usize| {
        let s = ops::slice(t, 2, i * WIDTH, WIDTH).unwrap();
        ops::permute(&s.reshape([BATCH, TOKENS, HEADS, WIDTH / HEADS]).unwrap(), &[0, 2, 1, 3]).unwrap()
    };
    let pre3 = pre.clone();
    vec![
        Pair {
            name: "fc1 + bias + GELU forward",
            fused: Box::new(move || {
                black_box(ops::linear(&x1, &w1a, Some(&b1a), Some(Gelu::Tanh), None).unwrap());
            }),
            unfused: Box::new(move || {
                black_box(ops::linear_reference(&x, &w1, Some(&b1), Some(Gelu::Tanh), None).unwrap());
            }),
        },
        Pair {
            name: "fc2 + bias + residual forward",
            fused: Box::new(move || {
                black_box(ops::linear(&x2, &w2a, Some(&b2a), None, Some(&r)).unwrap());
            }),
            unfused: Box::new(move || {
                black_box(ops::linear_reference(&h, &w2b, Some(&b2b), None, Some(&r2)).unwrap());
            }),
        },
        Pair {
            name: "fc2 dgrad + GELU backward + fc1 bias gradient",
            fused: Box::new(move || {
                black_box(ops::linear_dgrad_gelu(&dy1, &w2c, &pre1, Gelu::Tanh).unwrap());
            }),
            unfused: Box::new(move || {
                let dh = ops::matmul_t(&dy2, &w2d, false, false).unwrap();
                let dpre = ops::gelu_bwd(&pre2, &dh, Gelu::Tanh).unwrap();
                black_box((ops::bias_add_bwd(&dpre).unwrap(), dpre));
            }),
        },
        Pair {
            name: "attention forward, packed qkv",
            fused: Box::new(move || {
                black_box(ops::attention_fwd_packed(&qkv1, 0, WIDTH, HEADS, scale).unwrap());
            }),
            unfused: Box::new(move || {
                let out = ops::attention_fwd(&split(&qkv, 0), &split(&qkv, 1), &split(&qkv, 2), scale).unwrap();
                let o = ops::permute(&out.o, &[0, 2, 1, 3]).unwrap().reshape([BATCH, TOKENS, WIDTH]).unwrap();
                black_box(o);
            }),
        },
        Pair {
            name: "tanh GELU forward, vectorised vs libm expf",
            fused: Box::new(move || {
                black_box(ops::gelu_fwd(&pre3, Gelu::Tanh).unwrap());
            }),
            unfused: Box::new(move || {
                black_box(scalar_gelu(&pre_v));
            }),
        },
    ]
}

/// Prints the same-run ratio of every pair.
fn ratios() {
    let (samples, iters) = if common::quick() { (3, 1) } else { (15, 3) };
    println!("fused_cpu: {} threads; ratio = fused time / unfused time", rayon::current_num_threads());
    for p in pairs() {
        let fused = common::median_time(samples, iters, &*p.fused);
        let unfused = common::median_time(samples, iters, &*p.unfused);
        let ms = |t: Duration| t.as_secs_f64() * 1e3;
        println!(
            "  {:<48} fused {:8.3} ms | unfused {:8.3} ms | ratio {:.3}",
            p.name,
            ms(fused),
            ms(unfused),
            fused.as_secs_f64() / unfused.as_secs_f64()
        );
    }
}

fn bench(c: &mut Criterion) {
    ratios();
    let mut g = c.benchmark_group("fused_cpu");
    for p in pairs() {
        g.bench_function(format!("{}/fused", p.name), |b| b.iter(&*p.fused));
        g.bench_function(format!("{}/unfused", p.name), |b| b.iter(&*p.unfused));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}

fn main() {
    // As `vit` does: keep freed buffers in the heap, so the timings are not page faults.
    vit_tensor::cpu::retain_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
