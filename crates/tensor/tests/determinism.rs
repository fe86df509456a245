//! Results are a function of the inputs alone: every CPU op gives the same bits on 1, 2 or 3
//! rayon threads, and the GEMM the same bits whatever the alignment of its buffers (a training
//! run must be repeatable bit for bit, and a resumed run equal a straight one).

use vit_tensor::{
    cpu::gemm_f32,
    ops::{self, Gelu, NormKind},
    DType, Device, Tensor,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Runs `f` on a rayon pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

/// `f` gives the same bits on 1, 2 and 3 threads (`f` returns the bits of its outputs).
fn same_on_any_thread_count(what: &str, f: impl Fn() -> Vec<Vec<u32>> + Send + Sync) {
    let one = on_threads(1, &f);
    for threads in [2, 3] {
        let many = on_threads(threads, &f);
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
            assert_eq!(diff, 0, "{what}: output {i} differs in {diff} of {} values on 1 vs {threads} threads", a.len());
        }
    }
}

/// `(m, n, k)`: the horizontal small-product kernel, GEMV and k ≤ 2 paths, edge tiles, and
/// products large enough for gemm to split them over threads.
const GEMM_SHAPES: [(usize, usize, usize); 9] = [
    (3, 5, 40),
    (1, 70, 33),
    (70, 1, 33),
    (19, 23, 2),
    (37, 53, 29),
    (64, 192, 64),
    (2048, 192, 64),
    (301, 257, 130),
    (128, 640, 300),
];

/// `gemm_f32` with each operand and the output starting `offset` floats into its buffer.
#[allow(clippy::too_many_arguments)]
fn gemm_at(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    threads: usize,
    offset: usize,
) -> Vec<u32> {
    let shifted = |x: &[f32]| {
        let mut buf = vec![f32::NAN; x.len() + offset];
        buf[offset..].copy_from_slice(x);
        buf
    };
    let (a, b) = (shifted(a), shifted(b));
    let mut c = vec![f32::NAN; m * n + offset];
    gemm_f32(&a[offset..], &b[offset..], &mut c[offset..], m, n, k, ta, tb, threads);
    c[offset..].iter().map(|v| v.to_bits()).collect()
}

#[test]
fn gemm_gives_the_same_bits_on_any_thread_count_and_alignment() {
    for (s, &(m, n, k)) in GEMM_SHAPES.iter().enumerate() {
        let a = randn(&[m * k], 100 + s as u64).to_f32_vec().unwrap();
        let b = randn(&[k * n], 200 + s as u64).to_f32_vec().unwrap();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = gemm_at(&a, &b, m, n, k, ta, tb, 1, 0);
            for (threads, offset) in [(1, 1), (1, 3), (1, 7), (2, 0), (3, 0), (3, 5), (4, 2)] {
                let got = on_threads(threads, || gemm_at(&a, &b, m, n, k, ta, tb, threads, offset));
                let diff = want.iter().zip(&got).filter(|(x, y)| x != y).count();
                assert_eq!(
                    diff, 0,
                    "gemm m={m} n={n} k={k} ta={ta} tb={tb}: {diff} values differ on {threads} threads at offset {offset}"
                );
            }
        }
    }
}

#[test]
fn matmul_gives_the_same_bits_on_any_thread_count() {
    // Single products (gemm's own threading) and batches (one product per thread).
    for (s, (a_dims, b_dims)) in [
        (vec![2048, 64], vec![64, 192]),
        (vec![16, 128, 64], vec![64, 256]),
        (vec![64, 16, 16], vec![64, 16, 16]),
        (vec![4, 300, 70], vec![4, 70, 90]),
    ]
    .into_iter()
    .enumerate()
    {
        let (a, b) = (randn(&a_dims, 10 + s as u64), randn(&b_dims, 20 + s as u64));
        same_on_any_thread_count(&format!("matmul {a_dims:?} x {b_dims:?}"), || {
            let c = ops::matmul(&a, &b).unwrap();
            let dc = randn(c.dims(), 30);
            let (da, db) = ops::matmul_bwd(&a, &b, &dc, false, false).unwrap();
            vec![bits(&c), bits(&da), bits(&db)]
        });
    }
}

#[test]
fn attention_gives_the_same_bits_on_any_thread_count() {
    let (q, k, v) = (randn(&[8, 4, 17, 16], 1), randn(&[8, 4, 17, 16], 2), randn(&[8, 4, 17, 16], 3));
    let d_o = randn(&[8, 4, 17, 16], 4);
    same_on_any_thread_count("attention", || {
        let out = ops::attention_fwd(&q, &k, &v, 0.25).unwrap();
        let g = ops::attention_bwd(&q, &k, &v, &out.o, &out.lse, &d_o, 0.25).unwrap();
        vec![bits(&out.o), bits(&out.lse), bits(&g.dq), bits(&g.dk), bits(&g.dv)]
    });
}

#[test]
fn norms_and_reductions_give_the_same_bits_on_any_thread_count() {
    // 2048 rows of 192: several blocks of the blocked column sums.
    let (x, dy) = (randn(&[2048, 192], 5), randn(&[2048, 192], 6));
    let (w, b) = (randn(&[192], 7), randn(&[192], 8));
    for kind in [NormKind::LayerNorm, NormKind::Rms] {
        same_on_any_thread_count(&format!("{kind:?}"), || {
            let out = ops::layer_norm_fwd(&x, Some(&w), Some(&b), 1e-6, kind).unwrap();
            let g = ops::layer_norm_bwd(&x, Some(&w), &out.mean, &out.rstd, &dy, kind, true).unwrap();
            let (dw, db) = (g.dweight.expect("a weight was given"), g.dbias.expect("with_bias"));
            vec![bits(&out.y), bits(&out.mean), bits(&out.rstd), bits(&g.dx), bits(&dw), bits(&db)]
        });
    }
    same_on_any_thread_count("bias, sums, softmax, GELU, losses", || {
        let targets = ops::softmax_fwd(&randn(&[2048, 192], 9)).unwrap();
        let losses = ops::softmax_cross_entropy_fwd(&x, &targets).unwrap();
        vec![
            bits(&ops::bias_add(&x, &b).unwrap()),
            bits(&ops::bias_add_bwd(&dy).unwrap()),
            bits(&ops::sum(&x, 0).unwrap()),
            bits(&ops::sum_all(&x).unwrap()),
            bits(&ops::softmax_bwd(&targets, &dy).unwrap()),
            bits(&ops::gelu_bwd(&x, &dy, Gelu::Tanh).unwrap()),
            bits(&losses),
            bits(&ops::softmax_cross_entropy_bwd(&x, &targets, &losses).unwrap()),
        ]
    });
}

#[test]
fn im2col_and_col2im_give_the_same_bits_on_any_thread_count() {
    // A conv stem's overlapping 3x3 stride-2 windows: col2im sums up to four reads per pixel.
    let win = ops::ConvWindow { kernel: 3, stride: 2, pad: 1 };
    let x = randn(&[64, 14, 14, 16], 10);
    let cols = randn(&[64, 49, 144], 11);
    same_on_any_thread_count("im2col, col2im", || {
        vec![bits(&ops::im2col(&x, win).unwrap()), bits(&ops::col2im(&cols, 14, 14, 16, win).unwrap())]
    });
}

#[test]
fn random_tensors_are_the_same_on_any_thread_count() {
    // More than one parallel piece (16,384 elements each) and an odd length.
    same_on_any_thread_count("randn / rand_uniform", || {
        vec![
            bits(&Tensor::randn([40_001], 0.5, 2.0, 3, DType::F32, Device::Cpu).unwrap()),
            bits(&Tensor::rand_uniform([40_001], -1.0, 2.0, 3, DType::F32, Device::Cpu).unwrap()),
        ]
    });
}
