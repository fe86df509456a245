//! Every CUDA op against the CPU reference: the same public `ops::*` call on the same seeded
//! random inputs, once on `Device::Cpu` and once on `Device::Cuda(0)`, compared with a
//! tolerance per dtype (indices and pure data movement exactly). Sizes include odd ones
//! (197 tokens, widths that are not multiples of 32 or 256) and ties for the index ops.
//!
//! These need a GPU and NVRTC: `cargo test -p vit-tensor --test cuda_ops -- --include-ignored`.

mod common;

use common::*;
use vit_tensor::{
    ops::{self, BinaryOp, Gelu, NormKind},
    DType, Device, Tensor,
};

fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dtype, Device::Cpu).unwrap()
}

fn randn_scaled(shape: &[usize], std: f32, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, std, seed, dtype, Device::Cpu).unwrap()
}

/// Random values rounded to multiples of 1/2 in [-8, 8]: many exact ties.
fn with_ties(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let v = randn_scaled(shape, 3.0, seed, DType::F32).to_f32_vec().unwrap();
    let v = v.into_iter().map(|x| ((x * 2.0).round() / 2.0).clamp(-8.0, 8.0)).collect();
    Tensor::from_f32(v, shape.to_vec(), dtype, Device::Cpu).unwrap()
}

/// Bit-exact float comparison (data movement, casts, top-k values); NaNs compare by NaN-ness.
fn check_exact(what: &str, cuda: &Tensor, cpu: &Tensor) {
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    assert_eq!(cuda.dtype(), cpu.dtype(), "{what}: dtypes differ");
    let (g, c) = (cuda.to_f32_vec().unwrap(), cpu.to_f32_vec().unwrap());
    for (i, (x, y)) in g.iter().zip(&c).enumerate() {
        let ok = x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
        assert!(ok, "{what}: element {i} of {}: cuda {x} ({:#x}), cpu {y} ({:#x})", g.len(), x.to_bits(), y.to_bits());
    }
}

fn check_u32(what: &str, cuda: &Tensor, cpu: &Tensor) {
    assert_eq!(cuda.dtype(), DType::U32, "{what}: expected U32 indices");
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    assert_eq!(cuda.to_vec::<u32>().unwrap(), cpu.to_vec::<u32>().unwrap(), "{what}: indices differ");
}

/// A deterministic pseudo-random i32 sequence in `lo..hi`.
fn indices(m: usize, lo: i32, hi: i32, seed: u64) -> Vec<i32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..m)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            lo + ((s >> 33) % (hi - lo) as u64) as i32
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn cast_between_float_dtypes() {
    require_gpu();
    let mut v: Vec<f32> = vec![
        1.0 + 1.0 / 256.0, // bf16 halfway: ties to even (1.0)
        1.0 + 3.0 / 256.0, // bf16 halfway: ties to even (1.015625)
        -1.0 - 1.0 / 256.0,
        1.0 + 1.0 / 2048.0, // f16 halfway
        1.0 + 3.0 / 2048.0,
        1e-8, // f16 subnormal / zero
        -3e-6,
        6e-5,
        65504.0,
        65520.0, // f16 overflow to inf
        70000.0,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        1.17e-38,
        3.3895e38, // rounds to bf16 inf
    ];
    v.extend(randn(&[1001], 1, DType::F32).to_f32_vec().unwrap());
    let n = v.len();
    let base = Tensor::from_f32(v, [n], DType::F32, Device::Cpu).unwrap();
    for from in FLOATS {
        let x = base.cast(from).unwrap();
        let xg = gpu(&x);
        for to in FLOATS {
            check_exact(&format!("cast {from} -> {to}"), &xg.cast(to).unwrap(), &x.cast(to).unwrap());
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn binary_add_sub_mul() {
    require_gpu();
    for dt in FLOATS {
        let shape = [3, 197, 77];
        let (a, b) = (randn(&shape, 2, dt), randn(&shape, 3, dt));
        let (ag, bg) = (gpu(&a), gpu(&b));
        for (op, name) in [(BinaryOp::Add, "add"), (BinaryOp::Sub, "sub"), (BinaryOp::Mul, "mul")] {
            let f = |x: &Tensor, y: &Tensor| match op {
                BinaryOp::Add => ops::add(x, y),
                BinaryOp::Sub => ops::sub(x, y),
                BinaryOp::Mul => ops::mul(x, y),
            };
            check(name, &f(&ag, &bg).unwrap(), &f(&a, &b).unwrap(), dt);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn scale() {
    require_gpu();
    for dt in FLOATS {
        let x = randn(&[5, 1001], 4, dt);
        check("scale", &ops::scale(&gpu(&x), -0.37).unwrap(), &ops::scale(&x, -0.37).unwrap(), dt);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bias_add() {
    require_gpu();
    for dt in FLOATS {
        for (shape, seed) in [(vec![2, 197, 771], 5), (vec![13], 6)] {
            let x = randn(&shape, seed, dt);
            let b = randn(&[*shape.last().unwrap()], seed + 100, dt);
            check(
                &format!("bias_add {shape:?}"),
                &ops::bias_add(&gpu(&x), &gpu(&b)).unwrap(),
                &ops::bias_add(&x, &b).unwrap(),
                dt,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bias_add_bwd_column_sums() {
    require_gpu();
    for dt in FLOATS {
        // Tall and narrow exercises the split over row chunks; [0, 5] gives zeros.
        for (shape, seed) in [(vec![4, 197, 771], 7), (vec![50_000, 3], 8), (vec![1, 9], 9), (vec![0, 5], 10)] {
            let dy = randn(&shape, seed, dt);
            check(
                &format!("bias_add_bwd {shape:?}"),
                &ops::bias_add_bwd(&gpu(&dy)).unwrap(),
                &ops::bias_add_bwd(&dy).unwrap(),
                dt,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn activations_forward_and_backward() {
    require_gpu();
    for dt in FLOATS {
        let x = randn_scaled(&[7, 197, 33], 2.5, 11, dt);
        let dy = randn(&[7, 197, 33], 12, dt);
        let (xg, dyg) = (gpu(&x), gpu(&dy));
        for kind in [Gelu::Tanh, Gelu::Erf] {
            check(
                &format!("gelu_fwd {kind:?}"),
                &ops::gelu_fwd(&xg, kind).unwrap(),
                &ops::gelu_fwd(&x, kind).unwrap(),
                dt,
            );
            check(
                &format!("gelu_bwd {kind:?}"),
                &ops::gelu_bwd(&xg, &dyg, kind).unwrap(),
                &ops::gelu_bwd(&x, &dy, kind).unwrap(),
                dt,
            );
        }
        check("tanh_fwd", &ops::tanh_fwd(&xg).unwrap(), &ops::tanh_fwd(&x).unwrap(), dt);
        check("tanh_bwd", &ops::tanh_bwd(&xg, &dyg).unwrap(), &ops::tanh_bwd(&x, &dy).unwrap(), dt);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn layer_norm_forward() {
    require_gpu();
    for dt in FLOATS {
        for (shape, seed) in [(vec![2, 197, 768], 13), (vec![5, 37], 14), (vec![3, 1000], 15), (vec![4, 1], 16)] {
            let d = *shape.last().unwrap();
            let x = Tensor::randn(shape.clone(), 0.5, 2.0, seed, dt, Device::Cpu).unwrap();
            let w = Tensor::randn(vec![d], 1.0, 0.5, seed + 1, dt, Device::Cpu).unwrap();
            let b = randn(&[d], seed + 2, dt);
            let (xg, wg, bg) = (gpu(&x), gpu(&w), gpu(&b));
            for kind in [NormKind::LayerNorm, NormKind::Rms] {
                for (use_w, use_b) in [(true, true), (true, false), (false, false), (false, true)] {
                    let what = format!("layer_norm_fwd {shape:?} {kind:?} weight {use_w} bias {use_b}");
                    let cpu = ops::layer_norm_fwd(&x, use_w.then_some(&w), use_b.then_some(&b), 1e-6, kind).unwrap();
                    let cuda =
                        ops::layer_norm_fwd(&xg, use_w.then_some(&wg), use_b.then_some(&bg), 1e-6, kind).unwrap();
                    check(&format!("{what}: y"), &cuda.y, &cpu.y, dt);
                    check(&format!("{what}: mean"), &cuda.mean, &cpu.mean, DType::F32);
                    check(&format!("{what}: rstd"), &cuda.rstd, &cpu.rstd, dt);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn layer_norm_backward() {
    require_gpu();
    for dt in FLOATS {
        // 394 rows of 768 split the parameter gradients over several row chunks.
        for (shape, seed) in [(vec![2, 197, 768], 17), (vec![5, 37], 18), (vec![3, 1000], 19)] {
            let d = *shape.last().unwrap();
            let x = Tensor::randn(shape.clone(), 0.5, 2.0, seed, dt, Device::Cpu).unwrap();
            let w = Tensor::randn(vec![d], 1.0, 0.5, seed + 1, dt, Device::Cpu).unwrap();
            let dy = randn(&shape, seed + 2, dt);
            let (xg, wg, dyg) = (gpu(&x), gpu(&w), gpu(&dy));
            for kind in [NormKind::LayerNorm, NormKind::Rms] {
                // Both sides get the same saved statistics (the CPU forward's).
                let fwd = ops::layer_norm_fwd(&x, Some(&w), None, 1e-6, kind).unwrap();
                let (mg, rg) = (gpu(&fwd.mean), gpu(&fwd.rstd));
                for (use_w, with_bias) in [(true, true), (true, false), (false, true), (false, false)] {
                    let what = format!("layer_norm_bwd {shape:?} {kind:?} weight {use_w} bias {with_bias}");
                    let cpu = ops::layer_norm_bwd(&x, use_w.then_some(&w), &fwd.mean, &fwd.rstd, &dy, kind, with_bias)
                        .unwrap();
                    let cuda = ops::layer_norm_bwd(&xg, use_w.then_some(&wg), &mg, &rg, &dyg, kind, with_bias).unwrap();
                    check(&format!("{what}: dx"), &cuda.dx, &cpu.dx, dt);
                    assert_eq!(cuda.dweight.is_some(), use_w, "{what}: dweight presence");
                    assert_eq!(cuda.dbias.is_some(), with_bias, "{what}: dbias presence");
                    if let (Some(g), Some(c)) = (&cuda.dweight, &cpu.dweight) {
                        check(&format!("{what}: dweight"), g, c, dt);
                    }
                    if let (Some(g), Some(c)) = (&cuda.dbias, &cpu.dbias) {
                        check(&format!("{what}: dbias"), g, c, dt);
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn softmax_forward_and_backward() {
    require_gpu();
    for dt in FLOATS {
        for (shape, seed) in [(vec![3, 5, 197], 20), (vec![7, 1000], 21), (vec![4, 1], 22), (vec![2, 5000], 23)] {
            let x = randn_scaled(&shape, 3.0, seed, dt);
            let dy = randn(&shape, seed + 1, dt);
            check(
                &format!("softmax_fwd {shape:?}"),
                &ops::softmax_fwd(&gpu(&x)).unwrap(),
                &ops::softmax_fwd(&x).unwrap(),
                dt,
            );
            let y = ops::softmax_fwd(&x).unwrap();
            check(
                &format!("softmax_bwd {shape:?}"),
                &ops::softmax_bwd(&gpu(&y), &gpu(&dy)).unwrap(),
                &ops::softmax_bwd(&y, &dy).unwrap(),
                dt,
            );
        }
    }
}

/// Soft (a teacher's softmax), one-hot, and uniform multi-label targets for `[b, k]` logits.
fn targets(b: usize, k: usize, seed: u64, dtype: DType) -> Vec<(&'static str, Tensor)> {
    let soft = ops::softmax_fwd(&randn(&[b, k], seed, DType::F32)).unwrap().cast(dtype).unwrap();
    let labels = Tensor::from_vec(indices(b, 0, k as i32, seed), [b], Device::Cpu).unwrap();
    let one_hot = ops::one_hot(&labels, k, dtype).unwrap();
    let uniform = Tensor::rand_uniform([b, k], 0.0, 1.0, seed + 1, dtype, Device::Cpu).unwrap();
    vec![("soft", soft), ("one-hot", one_hot), ("uniform", uniform)]
}

#[test]
#[ignore = "needs a CUDA device"]
fn softmax_cross_entropy() {
    require_gpu();
    for dt in FLOATS {
        for (b, k, seed) in [(16, 1000, 24), (5, 37, 25), (3, 1, 26)] {
            let z = randn_scaled(&[b, k], 2.0, seed, dt);
            let dloss = randn(&[b], seed + 2, DType::F32);
            let (zg, dlg) = (gpu(&z), gpu(&dloss));
            // Targets in the logits' dtype and in another one (the kernels read f32 targets).
            for tdt in [dt, DType::BF16] {
                for (name, t) in targets(b, k, seed + 3, tdt) {
                    let what = format!("softmax_cross_entropy [{b}, {k}] {name} targets {tdt}");
                    let tg = gpu(&t);
                    check(
                        &format!("{what}: fwd"),
                        &ops::softmax_cross_entropy_fwd(&zg, &tg).unwrap(),
                        &ops::softmax_cross_entropy_fwd(&z, &t).unwrap(),
                        dt,
                    );
                    check(
                        &format!("{what}: bwd"),
                        &ops::softmax_cross_entropy_bwd(&zg, &tg, &dlg).unwrap(),
                        &ops::softmax_cross_entropy_bwd(&z, &t, &dloss).unwrap(),
                        dt,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sigmoid_cross_entropy() {
    require_gpu();
    for dt in FLOATS {
        for (b, k, seed) in [(16, 1000, 27), (5, 37, 28), (3, 1, 29)] {
            let z = randn_scaled(&[b, k], 4.0, seed, dt);
            let dloss = randn(&[b], seed + 2, DType::F32);
            let (zg, dlg) = (gpu(&z), gpu(&dloss));
            for tdt in [dt, DType::F32] {
                for (name, t) in targets(b, k, seed + 3, tdt) {
                    let what = format!("sigmoid_cross_entropy [{b}, {k}] {name} targets {tdt}");
                    let tg = gpu(&t);
                    check(
                        &format!("{what}: fwd"),
                        &ops::sigmoid_cross_entropy_fwd(&zg, &tg).unwrap(),
                        &ops::sigmoid_cross_entropy_fwd(&z, &t).unwrap(),
                        dt,
                    );
                    check(
                        &format!("{what}: bwd"),
                        &ops::sigmoid_cross_entropy_bwd(&zg, &tg, &dlg).unwrap(),
                        &ops::sigmoid_cross_entropy_bwd(&z, &t, &dloss).unwrap(),
                        dt,
                    );
                }
            }
        }
    }
}

/// `(q shape, keys)` cases: ViT's 197 tokens, queries != keys (257), head_dim 256 and 8.
const ATTENTION_CASES: [([usize; 4], usize); 4] =
    [([2, 3, 197, 64], 197), ([1, 2, 33, 40], 257), ([1, 1, 17, 256], 17), ([2, 2, 5, 8], 3)];

#[test]
#[ignore = "needs a CUDA device"]
fn attention_forward() {
    require_gpu();
    for dt in FLOATS {
        for (i, (qs, m)) in ATTENTION_CASES.into_iter().enumerate() {
            let seed = 30 + 10 * i as u64;
            let ks = [qs[0], qs[1], m, qs[3]];
            let (q, k, v) = (randn(&qs, seed, dt), randn(&ks, seed + 1, dt), randn(&ks, seed + 2, dt));
            let scale = 1.0 / (qs[3] as f32).sqrt();
            let cpu = ops::attention_fwd(&q, &k, &v, scale).unwrap();
            let cuda = ops::attention_fwd(&gpu(&q), &gpu(&k), &gpu(&v), scale).unwrap();
            check(&format!("attention_fwd q {qs:?} keys {m}: o"), &cuda.o, &cpu.o, dt);
            check(&format!("attention_fwd q {qs:?} keys {m}: lse"), &cuda.lse, &cpu.lse, dt);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn attention_backward() {
    require_gpu();
    for dt in FLOATS {
        for (i, (qs, m)) in ATTENTION_CASES.into_iter().enumerate() {
            let seed = 80 + 10 * i as u64;
            let ks = [qs[0], qs[1], m, qs[3]];
            let (q, k, v) = (randn(&qs, seed, dt), randn(&ks, seed + 1, dt), randn(&ks, seed + 2, dt));
            let d_o = randn(&qs, seed + 3, dt);
            let scale = 1.0 / (qs[3] as f32).sqrt();
            // Both sides get the same saved forward outputs (the CPU's).
            let fwd = ops::attention_fwd(&q, &k, &v, scale).unwrap();
            let cpu = ops::attention_bwd(&q, &k, &v, &fwd.o, &fwd.lse, &d_o, scale).unwrap();
            let cuda =
                ops::attention_bwd(&gpu(&q), &gpu(&k), &gpu(&v), &gpu(&fwd.o), &gpu(&fwd.lse), &gpu(&d_o), scale)
                    .unwrap();
            check(&format!("attention_bwd q {qs:?} keys {m}: dq"), &cuda.dq, &cpu.dq, dt);
            check(&format!("attention_bwd q {qs:?} keys {m}: dk"), &cuda.dk, &cpu.dk, dt);
            check(&format!("attention_bwd q {qs:?} keys {m}: dv"), &cuda.dv, &cpu.dv, dt);
        }
    }
}

/// Shapes for the axis reductions: every dim of each is reduced in turn.
const REDUCE_SHAPES: [&[usize]; 6] = [&[3, 197, 5], &[4, 1000], &[1000], &[30_000, 3], &[2, 3, 4, 5], &[1, 1]];

#[test]
#[ignore = "needs a CUDA device"]
fn reduce_sum_mean_max() {
    require_gpu();
    for dt in FLOATS {
        for (i, shape) in REDUCE_SHAPES.into_iter().enumerate() {
            let x = randn(shape, 130 + i as u64, dt);
            let xg = gpu(&x);
            for dim in 0..shape.len() {
                check(
                    &format!("sum {shape:?} dim {dim}"),
                    &ops::sum(&xg, dim).unwrap(),
                    &ops::sum(&x, dim).unwrap(),
                    dt,
                );
                check(
                    &format!("mean {shape:?} dim {dim}"),
                    &ops::mean(&xg, dim).unwrap(),
                    &ops::mean(&x, dim).unwrap(),
                    dt,
                );
                check(
                    &format!("max {shape:?} dim {dim}"),
                    &ops::max(&xg, dim).unwrap(),
                    &ops::max(&x, dim).unwrap(),
                    dt,
                );
            }
        }
        let x = randn(&[3, 197, 7], 140, dt);
        check("sum_all", &ops::sum_all(&gpu(&x)).unwrap(), &ops::sum_all(&x).unwrap(), dt);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn argmax_first_index_on_ties() {
    require_gpu();
    for dt in FLOATS {
        for (i, shape) in REDUCE_SHAPES.into_iter().enumerate() {
            for x in [randn(shape, 150 + i as u64, dt), with_ties(shape, 160 + i as u64, dt)] {
                let xg = gpu(&x);
                for dim in 0..shape.len() {
                    check_u32(
                        &format!("argmax {shape:?} dim {dim} ({dt})"),
                        &ops::argmax(&xg, dim).unwrap(),
                        &ops::argmax(&x, dim).unwrap(),
                    );
                }
            }
        }
    }
    // NaN follows the CPU's sequential scan: a NaN first wins, a later NaN is skipped.
    let mut v = with_ties(&[5, 300], 170, DType::F32).to_f32_vec().unwrap();
    v[0] = f32::NAN;
    v[300 + 7] = f32::NAN;
    v[600..900].fill(f32::NAN);
    v[900..1200].fill(f32::NEG_INFINITY);
    let x = Tensor::from_f32(v, [5, 300], DType::F32, Device::Cpu).unwrap();
    for dim in 0..2 {
        check_u32(
            &format!("argmax with NaN dim {dim}"),
            &ops::argmax(&gpu(&x), dim).unwrap(),
            &ops::argmax(&x, dim).unwrap(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sum_and_mean_backward() {
    require_gpu();
    for dt in FLOATS {
        for (i, shape) in REDUCE_SHAPES.into_iter().enumerate() {
            for dim in 0..shape.len() {
                let mut dy_shape = shape.to_vec();
                dy_shape.remove(dim);
                let dy = randn(&dy_shape, 180 + i as u64, dt);
                let dyg = gpu(&dy);
                check(
                    &format!("sum_bwd {shape:?} dim {dim}"),
                    &ops::sum_bwd(&dyg, shape, dim).unwrap(),
                    &ops::sum_bwd(&dy, shape, dim).unwrap(),
                    dt,
                );
                check(
                    &format!("mean_bwd {shape:?} dim {dim}"),
                    &ops::mean_bwd(&dyg, shape, dim).unwrap(),
                    &ops::mean_bwd(&dy, shape, dim).unwrap(),
                    dt,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn max_backward_routes_to_the_first_maximum() {
    require_gpu();
    for dt in FLOATS {
        for (i, shape) in REDUCE_SHAPES.into_iter().enumerate() {
            for x in [randn(shape, 190 + i as u64, dt), with_ties(shape, 200 + i as u64, dt)] {
                for dim in 0..shape.len() {
                    let mut dy_shape = shape.to_vec();
                    dy_shape.remove(dim);
                    let dy = randn(&dy_shape, 210 + i as u64, dt);
                    check_exact(
                        &format!("max_bwd {shape:?} dim {dim} ({dt})"),
                        &ops::max_bwd(&gpu(&x), &gpu(&dy), dim).unwrap(),
                        &ops::max_bwd(&x, &dy, dim).unwrap(),
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn topk_descending_lower_index_first() {
    require_gpu();
    for dt in FLOATS {
        // Small k (selection rounds) and k close to n (ranks), rank-3 input, wide rows.
        let cases: [(&[usize], usize); 7] = [
            (&[7, 1000], 5),
            (&[9, 50], 50),
            (&[4, 300], 200),
            (&[3, 20_000], 3),
            (&[2, 5, 37], 10),
            (&[6, 64], 1),
            (&[1, 1], 1),
        ];
        for (i, (shape, k)) in cases.into_iter().enumerate() {
            for x in [randn(shape, 220 + i as u64, dt), with_ties(shape, 230 + i as u64, dt)] {
                let (cv, ci) = ops::topk(&x, k).unwrap();
                let (gv, gi) = ops::topk(&gpu(&x), k).unwrap();
                check_u32(&format!("topk {shape:?} k {k} ({dt}): indices"), &gi, &ci);
                check_exact(&format!("topk {shape:?} k {k} ({dt}): values"), &gv, &cv);
            }
        }
        // All-equal rows: indices 0..k in order.
        let x = Tensor::full(1.5, [3, 40], dt, Device::Cpu).unwrap();
        let (_, gi) = ops::topk(&gpu(&x), 7).unwrap();
        assert_eq!(
            gi.to_vec::<u32>().unwrap(),
            (0..3).flat_map(|_| 0..7u32).collect::<Vec<_>>(),
            "topk of equal values ({dt})"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gather_rows_with_missing_entries() {
    require_gpu();
    for dt in FLOATS {
        let src = randn(&[50, 771], 240, dt);
        let idx = ops::RowIndex::from_host(indices(120, -1, 50, 241), 50, Device::Cpu).unwrap();
        let on_gpu = ops::RowIndex::from_host(indices(120, -1, 50, 241), 50, GPU).unwrap();
        check_exact(
            &format!("gather_rows ({dt})"),
            &ops::gather_rows(&gpu(&src), &on_gpu).unwrap(),
            &ops::gather_rows(&src, &idx).unwrap(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn scatter_add_rows_accumulates_repeats() {
    require_gpu();
    for dt in FLOATS {
        let src = randn(&[120, 771], 250, dt);
        let idx = ops::RowIndex::from_host(indices(120, -1, 50, 251), 50, Device::Cpu).unwrap();
        let on_gpu = ops::RowIndex::from_tensor(gpu(idx.tensor()), 50).unwrap();
        check(
            "scatter_add_rows",
            &ops::scatter_add_rows(&gpu(&src), &on_gpu).unwrap(),
            &ops::scatter_add_rows(&src, &idx).unwrap(),
            dt,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn patchify_and_unpatchify() {
    require_gpu();
    for dt in FLOATS {
        for (b, c, h, w, p) in [(2, 3, 224, 224, 16), (3, 5, 12, 20, 4), (1, 1, 7, 7, 7), (1, 2, 3, 3, 1)] {
            let img = randn(&[b, c, h, w], 260, dt);
            let what = format!("[{b}, {c}, {h}, {w}] patch {p} ({dt})");
            let (cp, gp) = (ops::patchify(&img, p).unwrap(), ops::patchify(&gpu(&img), p).unwrap());
            check_exact(&format!("patchify {what}"), &gp, &cp);
            let patches = randn(cp.dims(), 261, dt);
            check_exact(
                &format!("unpatchify {what}"),
                &ops::unpatchify(&gpu(&patches), c, h, w, p).unwrap(),
                &ops::unpatchify(&patches, c, h, w, p).unwrap(),
            );
            check_exact(&format!("unpatchify(patchify) {what}"), &ops::unpatchify(&gp, c, h, w, p).unwrap(), &img);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn im2col_and_col2im() {
    require_gpu();
    for dt in FLOATS {
        // A conv stem's stride-2 3x3 windows, overlapping stride 1, non-overlapping patches.
        for (b, h, w, c, k, s, pad) in
            [(3, 28, 28, 1, 3, 2, 1), (2, 14, 13, 16, 3, 2, 1), (2, 9, 9, 5, 3, 1, 1), (1, 8, 8, 3, 4, 4, 0)]
        {
            let win = ops::ConvWindow { kernel: k, stride: s, pad };
            let x = randn(&[b, h, w, c], 262, dt);
            let what = format!("[{b}, {h}, {w}, {c}] {win:?} ({dt})");
            let cols = ops::im2col(&x, win).unwrap();
            check_exact(&format!("im2col {what}"), &ops::im2col(&gpu(&x), win).unwrap(), &cols);
            // The same additions in the same order: exact in f32, one rounding in bf16/f16.
            let r = randn(cols.dims(), 263, dt);
            check_exact(
                &format!("col2im {what}"),
                &ops::col2im(&gpu(&r), h, w, c, win).unwrap(),
                &ops::col2im(&r, h, w, c, win).unwrap(),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn ops_read_narrowed_views_at_their_offset() {
    require_gpu();
    for dt in [DType::F32, DType::BF16] {
        let x = randn(&[6, 197, 65], 270, dt);
        let (xv, xgv) = (x.narrow(2, 3).unwrap(), gpu(&x).narrow(2, 3).unwrap());
        check("softmax_fwd of a view", &ops::softmax_fwd(&xgv).unwrap(), &ops::softmax_fwd(&xv).unwrap(), dt);
        check(
            "gelu_fwd of a view",
            &ops::gelu_fwd(&xgv, Gelu::Tanh).unwrap(),
            &ops::gelu_fwd(&xv, Gelu::Tanh).unwrap(),
            dt,
        );
        let ln_c = ops::layer_norm_fwd(&xv, None, None, 1e-6, NormKind::LayerNorm).unwrap();
        let ln_g = ops::layer_norm_fwd(&xgv, None, None, 1e-6, NormKind::LayerNorm).unwrap();
        check("layer_norm_fwd of a view", &ln_g.y, &ln_c.y, dt);
        check("sum of a view", &ops::sum(&xgv, 1).unwrap(), &ops::sum(&xv, 1).unwrap(), dt);
    }
}

/// `Tensor::fill_zero` on the device: a unique tensor is zeroed in place (same address: no
/// second buffer at the peak), a shared storage or a view of one is left to its other owners.
#[test]
#[ignore = "needs a CUDA device"]
fn fill_zero_writes_in_place_and_spares_shared_storage() {
    require_gpu();
    let zeros = |t: &Tensor| t.to_f32_vec().unwrap().iter().all(|&v| v == 0.0);
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        let seed = 900 + 10 * i as u64;
        let mut t = gpu(&randn(&[5, 7], seed, dtype));
        let before = vit_tensor::cuda::kernel::device_ptr(&t).unwrap();
        t.fill_zero().unwrap();
        assert!(zeros(&t), "{dtype}: not zeroed");
        assert_eq!(vit_tensor::cuda::kernel::device_ptr(&t).unwrap(), before, "{dtype}: not in place");

        let mut a = gpu(&randn(&[4, 3], seed + 1, dtype));
        let kept = a.clone();
        let want = kept.to_f32_vec().unwrap();
        a.fill_zero().unwrap();
        assert!(zeros(&a) && kept.to_f32_vec().unwrap() == want, "{dtype}: shared storage");

        let base = gpu(&randn(&[6, 3], seed + 2, dtype));
        let want = base.to_f32_vec().unwrap();
        let mut view = base.narrow(2, 3).unwrap();
        view.fill_zero().unwrap();
        assert!(zeros(&view) && view.dims() == [3, 3], "{dtype}: view");
        assert_eq!(base.to_f32_vec().unwrap(), want, "{dtype}: the view's base changed");
    }
}
