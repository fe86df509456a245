//! The GEMM alone on CUDA (issue 14 items 3 and 9): our cuBLASLt path (`cuda::matmul_into`:
//! preallocated output, cached plan, no memset, no heuristic query in the timed loop) at the ViT
//! shapes — qkv, out-proj, fc1, fc2 of B/16 and L/16 at 256 × 196 tokens and G/14 at 256 × 256
//! tokens, each as forward (`x Wᵀ`), dgrad (`dy W`) and wgrad (`dyᵀ x`, accumulated into an f32
//! gradient, beta = 1, as the trainer does) — and squares 4096 and 8192; bf16 inputs, f32
//! accumulation. Then the fused-epilogue rows through the ops: fc1 forward with bias + tanh GELU
//! (GELU_AUX_BIAS; these allocate their two outputs per call) and fc2's dgrad through the GELU
//! with fc1's bias gradient (DGELU_BGRAD).
//!
//! Several operand sets, at different places of one 1.4 GB device buffer, are rotated so L2
//! (50 MB on H100/H200) never serves an operand from the previous call. Each row is the median
//! of 5 samples of back-to-back calls (about 30 ms each) timed on the host around a stream
//! synchronisation. `benches/reference/gemm_torch.py` prints the same table for `torch.matmul`.
//! `cargo bench --bench gemm_cuda` (prints a note and exits on a machine without a GPU).

mod common;

use vit_tensor::{
    cuda,
    ops::{self, Gelu},
    DType, Device, Tensor,
};

const H100_BF16_PEAK_TFLOPS: f64 = 989.4;
/// Elements of the random source buffer (bf16): the largest row (G/14 fc1 wgrad) reads 646 M.
const SOURCE_ELEMS: usize = 11 << 26;
/// Operand bytes the rotated sets should span, a few times the L2 size.
const ROTATE_BYTES: usize = 256 << 20;

/// `(model, width, mlp, tokens)`.
const MODELS: &[(&str, usize, usize, usize)] =
    &[("B/16", 768, 3072, 256 * 196), ("L/16", 1024, 4096, 256 * 196), ("G/14", 1664, 8192, 256 * 256)];

/// One timed GEMM: `out [m, n] (+)= op(a) op(b)`.
struct Row {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    /// wgrad: f32 output, accumulated.
    accumulate_f32: bool,
}

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for &(model, d, mlp, t) in MODELS {
        for (layer, inp, out) in [("qkv", d, 3 * d), ("out-proj", d, d), ("fc1", d, mlp), ("fc2", mlp, d)] {
            let row = |pass: &str, m, n, k, trans_a, trans_b, acc| Row {
                name: format!("{model} {layer} {pass}"),
                m,
                n,
                k,
                trans_a,
                trans_b,
                accumulate_f32: acc,
            };
            rows.push(row("fwd", t, out, inp, false, true, false));
            rows.push(row("dgrad", t, inp, out, false, false, false));
            rows.push(row("wgrad", out, inp, t, true, false, true));
        }
    }
    for s in [4096, 8192] {
        rows.push(Row {
            name: format!("square {s}"),
            m: s,
            n: s,
            k: s,
            trans_a: false,
            trans_b: false,
            accumulate_f32: false,
        });
    }
    rows
}

/// A `[rows, cols]` view of `source` at element `offset`.
fn view(source: &Tensor, offset: usize, rows: usize, cols: usize) -> Tensor {
    source.narrow(offset, rows * cols).unwrap().reshape([rows, cols]).unwrap()
}

/// Operand sets `(a, b)` for `a [ra, ca]`, `b [rb, cb]`, spread over `source` (offsets on
/// 256-byte boundaries, so every set has the same plan).
fn operand_sets(source: &Tensor, a: (usize, usize), b: (usize, usize)) -> Vec<(Tensor, Tensor)> {
    let round = |x: usize| x.div_ceil(128) * 128;
    let (na, nb) = (round(a.0 * a.1), round(b.0 * b.1));
    let need = na + nb;
    assert!(need <= SOURCE_ELEMS, "operands of {need} elements exceed the source");
    let sets = (ROTATE_BYTES / (2 * need)).clamp(2, 8);
    let stride = (need).min((SOURCE_ELEMS - need) / (sets - 1)) / 128 * 128;
    (0..sets).map(|i| (view(source, i * stride, a.0, a.1), view(source, i * stride + na, b.0, b.1))).collect()
}

/// Median seconds per call of `call(i)` (i rotates the operand sets), `flops` per call: each
/// sample enqueues a batch of calls (about 30 ms) and waits for the stream; one warm-up batch
/// (which plans) first.
fn time(flops: f64, quick: bool, mut call: impl FnMut(usize)) -> f64 {
    let estimate = flops / 500e12;
    let (samples, iters) = if quick { (1, 1) } else { (5, ((0.03 / estimate).ceil() as usize).clamp(3, 500)) };
    let mut i = 0;
    let batch = common::median_time(samples, 1, || {
        for _ in 0..iters {
            call(i);
            i += 1;
        }
        cuda::synchronize(0).unwrap();
    });
    batch.as_secs_f64() / iters as f64
}

fn print_row(name: &str, m: usize, n: usize, k: usize, secs: f64) {
    let tflops = 2.0 * (m * n * k) as f64 / secs / 1e12;
    println!(
        "  {name:<26} {:>22} {:>9.1} {:>8.1} {:>7.3}",
        format!("{m}x{n}x{k}"),
        secs * 1e6,
        tflops,
        tflops / H100_BF16_PEAK_TFLOPS
    );
}

fn main() {
    if !cuda::available() {
        println!("gemm_cuda: no CUDA device here; run this bench on a GPU host (see docs/perf.md)");
        return;
    }
    let quick = common::quick();
    let dev = Device::Cuda(0);
    // 64 Mi random bf16 values, tiled 11 times on the device (random data for realistic power
    // draw, without generating 1.4 GB on the host).
    let base = Tensor::randn([1usize << 26], 0.0, 1.0, 7, DType::BF16, dev).unwrap();
    let source = ops::concat(&[&base; SOURCE_ELEMS >> 26], 0).unwrap();
    drop(base);
    println!(
        "gemm_cuda: bf16 in, f32 accumulation; cuBLASLt through cuda::matmul_into (cached plan, preallocated \
         output); ratio = TFLOP/s / {H100_BF16_PEAK_TFLOPS} (H100/H200 dense bf16 peak)"
    );
    println!("  {:<26} {:>22} {:>9} {:>8} {:>7}", "gemm", "m x n x k", "us", "TFLOP/s", "ratio");
    for r in rows() {
        let a_dims = if r.trans_a { (r.k, r.m) } else { (r.m, r.k) };
        let b_dims = if r.trans_b { (r.n, r.k) } else { (r.k, r.n) };
        let sets = operand_sets(&source, a_dims, b_dims);
        let out_dtype = if r.accumulate_f32 { DType::F32 } else { DType::BF16 };
        // Zeroed once here, outside the timed loop (the wgrad rows accumulate into it).
        let out = Tensor::zeros([r.m, r.n], out_dtype, dev).unwrap();
        let secs = time(2.0 * (r.m * r.n * r.k) as f64, quick, |i| {
            let (a, b) = &sets[i % sets.len()];
            // SAFETY: `out` is this bench's own, never shared.
            unsafe { cuda::matmul_into(a, b, r.trans_a, r.trans_b, &out, r.accumulate_f32) }.unwrap();
        });
        print_row(&r.name, r.m, r.n, r.k, secs);
    }
    println!("  fused epilogues through the ops (outputs allocated per call):");
    for &(model, d, mlp, t) in MODELS {
        let sets = operand_sets(&source, (t, d), (mlp, d));
        let bias = Tensor::randn([mlp], 0.0, 0.5, 8, DType::BF16, dev).unwrap();
        let secs = time(2.0 * (t * mlp * d) as f64, quick, |i| {
            let (x, w) = &sets[i % sets.len()];
            std::hint::black_box(ops::linear(x, w, Some(&bias), Some(Gelu::Tanh), None).unwrap());
        });
        print_row(&format!("{model} fc1 fwd bias+gelu"), t, mlp, d, secs);
        // fc2 dgrad through the GELU: dy [t, d] · W2 [d, mlp], aux = pre [t, mlp].
        let sets = operand_sets(&source, (t, d), (d, mlp));
        let pre = view(&source, SOURCE_ELEMS - t * mlp, t, mlp);
        let secs = time(2.0 * (t * mlp * d) as f64, quick, |i| {
            let (dy, w2) = &sets[i % sets.len()];
            std::hint::black_box(ops::linear_dgrad_gelu_fused(dy, w2, &pre, Gelu::Tanh).unwrap());
        });
        print_row(&format!("{model} fc2 dgrad+dgelu+bgrad"), t, mlp, d, secs);
        // What the model runs: the plain dgrad GEMM, the GELU backward and a column sum.
        let secs = time(2.0 * (t * mlp * d) as f64, quick, |i| {
            let (dy, w2) = &sets[i % sets.len()];
            std::hint::black_box(ops::linear_dgrad_gelu(dy, w2, &pre, Gelu::Tanh).unwrap());
        });
        print_row(&format!("{model} fc2 dgrad, dgelu, bgrad"), t, mlp, d, secs);
    }
    println!("  cuBLASLt plans cached: {}", cuda::cached_gemm_plans(0).unwrap());
    for (name, status) in cuda::self_check::fast_kernel_report(0).unwrap() {
        println!("  self-check {name}: {status}");
    }
}
