//! Every CPU op against an independent naive f64 reference on seeded random data, and every
//! backward against finite differences (design §7).

use vit_tensor::{
    ops::{self, Gelu, NormKind},
    testing::{assert_close, check_gradient},
    DType, Device, Result, Tensor,
};

const CPU: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F32, CPU).unwrap()
}

fn v(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

/// Naive `op(a) op(b)` in f64 for one `[m, k] x [k, n]` product.
fn naive_matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[test]
fn matmul_matches_naive_for_every_transpose() {
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (33, 65, 17), (128, 96, 200)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = randn(&if ta { [k, m] } else { [m, k] }, 1);
            let b = randn(&if tb { [n, k] } else { [k, n] }, 2);
            let c = ops::matmul_t(&a, &b, ta, tb).unwrap();
            assert_eq!(c.dims(), &[m, n]);
            assert_close(
                &format!("matmul {m}x{n}x{k} ta={ta} tb={tb}"),
                &v(&c),
                &naive_matmul(&v(&a), &v(&b), m, n, k, ta, tb),
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn matmul_folds_leading_dims_and_batches() {
    // [batch, tokens, width] x [width, out]: leading dims fold into rows.
    let x = randn(&[2, 3, 8], 3);
    let w = randn(&[8, 5], 4);
    let y = ops::matmul(&x, &w).unwrap();
    assert_eq!(y.dims(), &[2, 3, 5]);
    assert_close("folded", &v(&y), &naive_matmul(&v(&x), &v(&w), 6, 5, 8, false, false), 1e-4, 1e-4);
    // [batch, heads, n, d] x [batch, heads, m, d]^T: one product per (batch, head).
    let q = randn(&[2, 3, 5, 4], 5);
    let k = randn(&[2, 3, 6, 4], 6);
    let s = ops::matmul_t(&q, &k, false, true).unwrap();
    assert_eq!(s.dims(), &[2, 3, 5, 6]);
    let (qv, kv, sv) = (v(&q), v(&k), v(&s));
    for bh in 0..6 {
        let want = naive_matmul(&qv[bh * 20..], &kv[bh * 24..], 5, 6, 4, false, true);
        assert_close("batched", &sv[bh * 30..(bh + 1) * 30], &want, 1e-4, 1e-4);
    }
    // Many small products (the rayon-over-batch path).
    let a = randn(&[64, 3, 4], 7);
    let b = randn(&[64, 4, 2], 8);
    let c = ops::matmul(&a, &b).unwrap();
    let (av, bv, cv) = (v(&a), v(&b), v(&c));
    for i in 0..64 {
        assert_close(
            "many",
            &cv[i * 6..(i + 1) * 6],
            &naive_matmul(&av[i * 12..], &bv[i * 8..], 3, 2, 4, false, false),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn matmul_bf16_goes_through_f32() {
    let a = randn(&[16, 24], 9);
    let b = randn(&[24, 8], 10);
    let c = ops::matmul(&a.cast(DType::BF16).unwrap(), &b.cast(DType::BF16).unwrap()).unwrap();
    assert_eq!(c.dtype(), DType::BF16);
    assert_close("bf16", &v(&c), &naive_matmul(&v(&a), &v(&b), 16, 8, 24, false, false), 3e-2, 0.15);
}

#[test]
fn matmul_backward_matches_finite_differences() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, n, k) = (4, 3, 5);
        let a = randn(&if ta { [k, m] } else { [m, k] }, 11);
        let b = randn(&if tb { [n, k] } else { [k, n] }, 12);
        let r = randn(&[m, n], 13);
        let (da, db) = ops::matmul_bwd(&a, &b, &r, ta, tb).unwrap();
        check_gradient("matmul da", |x| ops::matmul_t(x, &b, ta, tb), &a, &r, &da, 1e-2, 1e-3, 64).unwrap();
        check_gradient("matmul db", |x| ops::matmul_t(&a, x, ta, tb), &b, &r, &db, 1e-2, 1e-3, 64).unwrap();
    }
    // Folded and batched forms.
    let x = randn(&[2, 3, 4], 14);
    let w = randn(&[4, 5], 15);
    let r = randn(&[2, 3, 5], 16);
    let (dx, dw) = ops::matmul_bwd(&x, &w, &r, false, false).unwrap();
    check_gradient("folded dx", |t| ops::matmul(t, &w), &x, &r, &dx, 1e-2, 1e-3, 64).unwrap();
    check_gradient("folded dw", |t| ops::matmul(&x, t), &w, &r, &dw, 1e-2, 1e-3, 64).unwrap();
    let q = randn(&[2, 2, 3, 4], 17);
    let k = randn(&[2, 2, 5, 4], 18);
    let r = randn(&[2, 2, 3, 5], 19);
    let (dq, dk) = ops::matmul_bwd(&q, &k, &r, false, true).unwrap();
    check_gradient("batched dq", |t| ops::matmul_t(t, &k, false, true), &q, &r, &dq, 1e-2, 1e-3, 64).unwrap();
    check_gradient("batched dk", |t| ops::matmul_t(&q, t, false, true), &k, &r, &dk, 1e-2, 1e-3, 64).unwrap();
}

#[test]
fn elementwise_ops_match_naive() {
    let a = randn(&[3, 7], 20);
    let b = randn(&[3, 7], 21);
    let (av, bv) = (v(&a), v(&b));
    let zip = |f: fn(f32, f32) -> f32| av.iter().zip(&bv).map(|(&x, &y)| f(x, y)).collect::<Vec<_>>();
    assert_close("add", &v(&ops::add(&a, &b).unwrap()), &zip(|x, y| x + y), 0.0, 0.0);
    assert_close("sub", &v(&ops::sub(&a, &b).unwrap()), &zip(|x, y| x - y), 0.0, 0.0);
    assert_close("mul", &v(&ops::mul(&a, &b).unwrap()), &zip(|x, y| x * y), 0.0, 0.0);
    assert_close(
        "scale",
        &v(&ops::scale(&a, -2.5).unwrap()),
        &av.iter().map(|x| x * -2.5).collect::<Vec<_>>(),
        0.0,
        0.0,
    );
    let bias = randn(&[7], 22);
    let want: Vec<f32> = av.iter().enumerate().map(|(i, x)| x + v(&bias)[i % 7]).collect();
    assert_close("bias_add", &v(&ops::bias_add(&a, &bias).unwrap()), &want, 0.0, 0.0);
    let sums: Vec<f32> = (0..7).map(|j| (0..3).map(|i| av[i * 7 + j]).sum()).collect();
    assert_close("bias_add_bwd", &v(&ops::bias_add_bwd(&a).unwrap()), &sums, 1e-6, 1e-6);
}

#[test]
fn elementwise_backward_matches_finite_differences() {
    let a = randn(&[4, 6], 23);
    let b = randn(&[4, 6], 24);
    let r = randn(&[4, 6], 25);
    let (da, db) = ops::mul_bwd(&a, &b, &r).unwrap();
    check_gradient("mul da", |x| ops::mul(x, &b), &a, &r, &da, 1e-2, 1e-3, 24).unwrap();
    check_gradient("mul db", |x| ops::mul(&a, x), &b, &r, &db, 1e-2, 1e-3, 24).unwrap();
    let bias = randn(&[6], 26);
    let dbias = ops::bias_add_bwd(&r).unwrap();
    check_gradient("bias", |x| ops::bias_add(&a, x), &bias, &r, &dbias, 1e-2, 1e-3, 6).unwrap();
    check_gradient("scale", |x| ops::scale(x, 0.7), &a, &r, &ops::scale(&r, 0.7).unwrap(), 1e-2, 1e-3, 24).unwrap();
}

#[test]
fn activations_match_formulas_and_finite_differences() {
    let x = Tensor::rand_uniform([5, 40], -4.0, 4.0, 27, DType::F32, CPU).unwrap();
    let xv = v(&x);
    let tanh: Vec<f32> = xv
        .iter()
        .map(|&t| {
            let t = t as f64;
            (0.5 * t * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (t + 0.044715 * t * t * t)).tanh())) as f32
        })
        .collect();
    assert_close("gelu tanh", &v(&ops::gelu_fwd(&x, Gelu::Tanh).unwrap()), &tanh, 1e-5, 1e-6);
    // erf GELU against a high-precision series for erf.
    let erf64 = |z: f64| {
        let (mut term, mut sum, mut k) = (z, z, 0.0);
        while term.abs() > 1e-17 {
            k += 1.0;
            term *= -z * z / k;
            sum += term / (2.0 * k + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    };
    let erf: Vec<f32> = xv.iter().map(|&t| (0.5 * t as f64 * (1.0 + erf64(t as f64 / 2f64.sqrt()))) as f32).collect();
    assert_close("gelu erf", &v(&ops::gelu_fwd(&x, Gelu::Erf).unwrap()), &erf, 1e-5, 1e-6);
    let r = randn(&[5, 40], 28);
    for kind in [Gelu::Tanh, Gelu::Erf] {
        let dx = ops::gelu_bwd(&x, &r, kind).unwrap();
        check_gradient("gelu", |t| ops::gelu_fwd(t, kind), &x, &r, &dx, 1e-2, 2e-3, 200).unwrap();
    }
    let want: Vec<f32> = xv.iter().map(|&t| (t as f64).tanh() as f32).collect();
    assert_close("tanh", &v(&ops::tanh_fwd(&x).unwrap()), &want, 1e-6, 1e-7);
    check_gradient("tanh", ops::tanh_fwd, &x, &r, &ops::tanh_bwd(&x, &r).unwrap(), 1e-2, 2e-3, 200).unwrap();
}

#[test]
fn layer_norm_matches_naive_and_finite_differences() {
    let (rows, d) = (6, 24);
    let x = Tensor::randn([2, 3, d], 0.5, 2.0, 29, DType::F32, CPU).unwrap();
    let w = Tensor::randn([d], 1.0, 0.3, 30, DType::F32, CPU).unwrap();
    let b = randn(&[d], 31);
    let (xv, wv, bv) = (v(&x), v(&w), v(&b));
    for kind in [NormKind::LayerNorm, NormKind::Rms] {
        for (wt, bt) in [(Some(&w), Some(&b)), (Some(&w), None), (None, None)] {
            let out = ops::layer_norm_fwd(&x, wt, bt, 1e-6, kind).unwrap();
            assert_eq!(out.mean.dims(), &[2, 3]);
            let mut want = vec![0.0f32; rows * d];
            for i in 0..rows {
                let r = &xv[i * d..(i + 1) * d];
                let mu = if kind == NormKind::Rms { 0.0 } else { r.iter().map(|&t| t as f64).sum::<f64>() / d as f64 };
                let var = r.iter().map(|&t| (t as f64 - mu).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    let xhat = (r[j] as f64 - mu) / (var + 1e-6).sqrt();
                    want[i * d + j] =
                        (xhat * wt.map_or(1.0, |_| wv[j] as f64) + bt.map_or(0.0, |_| bv[j] as f64)) as f32;
                }
            }
            assert_close(&format!("layer_norm {kind:?}"), &v(&out.y), &want, 1e-5, 1e-5);
            let r = randn(&[2, 3, d], 32);
            let g = ops::layer_norm_bwd(&x, wt, &out.mean, &out.rstd, &r, kind, bt.is_some()).unwrap();
            assert_eq!(g.dweight.is_some(), wt.is_some());
            assert_eq!(g.dbias.is_some(), bt.is_some());
            let f = |t: &Tensor| Ok(ops::layer_norm_fwd(t, wt, bt, 1e-6, kind)?.y);
            check_gradient(&format!("layer_norm dx {kind:?}"), f, &x, &r, &g.dx, 1e-2, 2e-3, 72).unwrap();
            if let Some(dw) = &g.dweight {
                let f = |t: &Tensor| Ok(ops::layer_norm_fwd(&x, Some(t), bt, 1e-6, kind)?.y);
                check_gradient("layer_norm dweight", f, &w, &r, dw, 1e-2, 2e-3, 24).unwrap();
            }
            if let Some(db) = &g.dbias {
                let f = |t: &Tensor| Ok(ops::layer_norm_fwd(&x, wt, Some(t), 1e-6, kind)?.y);
                check_gradient("layer_norm dbias", f, &b, &r, db, 1e-2, 2e-3, 24).unwrap();
            }
        }
    }
}

#[test]
fn add_layer_norm_matches_its_composition_and_finite_differences() {
    let d = 20;
    let x = Tensor::randn([2, 3, d], 0.5, 2.0, 33, DType::F32, CPU).unwrap();
    let r = Tensor::randn([2, 3, d], -0.5, 1.0, 34, DType::F32, CPU).unwrap();
    let w = Tensor::randn([d], 1.0, 0.3, 35, DType::F32, CPU).unwrap();
    let b = randn(&[d], 36);
    let (dy, dres) = (randn(&[2, 3, d], 37), randn(&[2, 3, d], 38));
    for kind in [NormKind::LayerNorm, NormKind::Rms] {
        for bt in [Some(&b), None] {
            let out = ops::add_layer_norm_fwd(&x, &r, Some(&w), bt, 1e-6, kind).unwrap();
            let h = ops::add(&x, &r).unwrap();
            let ln = ops::layer_norm_fwd(&h, Some(&w), bt, 1e-6, kind).unwrap();
            assert_eq!(v(&out.h), v(&h), "add_layer_norm h {kind:?}");
            assert_eq!(v(&out.y), v(&ln.y), "add_layer_norm y {kind:?}");
            assert_eq!(v(&out.rstd), v(&ln.rstd), "add_layer_norm rstd {kind:?}");
            let g = ops::add_layer_norm_bwd(&out.h, Some(&w), &out.mean, &out.rstd, &dy, &dres, kind, bt.is_some())
                .unwrap();
            // The loss Σ y·dy + Σ h·dres as one projection of [h, y] on [dres, dy]; x and r
            // enter only through h, so both have the gradient dh.
            let proj = ops::concat(&[&dres, &dy], 2).unwrap();
            let both = |x: &Tensor, r: &Tensor| -> Result<Tensor> {
                let o = ops::add_layer_norm_fwd(x, r, Some(&w), bt, 1e-6, kind)?;
                ops::concat(&[&o.h, &o.y], 2)
            };
            check_gradient(&format!("add_layer_norm dx {kind:?}"), |t| both(t, &r), &x, &proj, &g.dx, 1e-2, 2e-3, 60)
                .unwrap();
            check_gradient(&format!("add_layer_norm dr {kind:?}"), |t| both(&x, t), &r, &proj, &g.dx, 1e-2, 2e-3, 60)
                .unwrap();
            let f = |t: &Tensor| Ok(ops::add_layer_norm_fwd(&x, &r, Some(t), bt, 1e-6, kind)?.y);
            check_gradient("add_layer_norm dweight", f, &w, &dy, g.dweight.as_ref().unwrap(), 1e-2, 2e-3, 20).unwrap();
            assert_eq!(g.dbias.is_some(), bt.is_some());
        }
    }
    let bad = ops::add_layer_norm_fwd(&x, &randn(&[2, 3, d + 1], 39), Some(&w), None, 1e-6, NormKind::LayerNorm);
    let msg = bad.unwrap_err().to_string();
    assert!(msg.contains("add_layer_norm_fwd") && msg.contains(&format!("{}", d + 1)), "{msg}");
}

#[test]
fn softmax_and_losses_match_naive_and_finite_differences() {
    let z = Tensor::randn([5, 11], 0.0, 3.0, 33, DType::F32, CPU).unwrap();
    let zv = v(&z);
    let mut want = vec![0.0f32; zv.len()];
    for (i, row) in zv.chunks(11).enumerate() {
        let s: f64 = row.iter().map(|&t| (t as f64).exp()).sum();
        for j in 0..11 {
            want[i * 11 + j] = ((row[j] as f64).exp() / s) as f32;
        }
    }
    let y = ops::softmax_fwd(&z).unwrap();
    assert_close("softmax", &v(&y), &want, 1e-5, 1e-7);
    let r = randn(&[5, 11], 34);
    check_gradient("softmax", ops::softmax_fwd, &z, &r, &ops::softmax_bwd(&y, &r).unwrap(), 1e-2, 2e-3, 55).unwrap();

    // Soft targets (rows sum to 1) and one-hot targets.
    let t = ops::softmax_fwd(&randn(&[5, 11], 35)).unwrap();
    let labels = Tensor::from_vec(vec![0i32, 3, 10, 7, 7], [5], CPU).unwrap();
    let onehot = ops::one_hot(&labels, 11, DType::F32).unwrap();
    let dloss = Tensor::rand_uniform([5], 0.5, 1.5, 36, DType::F32, CPU).unwrap();
    for targets in [&t, &onehot] {
        let tv = v(targets);
        let loss = ops::softmax_cross_entropy_fwd(&z, targets).unwrap();
        let want: Vec<f32> = (0..5)
            .map(|i| {
                let row = &zv[i * 11..(i + 1) * 11];
                let lse = row.iter().map(|&t| (t as f64).exp()).sum::<f64>().ln();
                -(0..11).map(|j| tv[i * 11 + j] as f64 * (row[j] as f64 - lse)).sum::<f64>() as f32
            })
            .collect();
        assert_close("softmax xent", &v(&loss), &want, 1e-5, 1e-6);
        let dz = ops::softmax_cross_entropy_bwd(&z, targets, &dloss).unwrap();
        check_gradient("softmax xent", |x| ops::softmax_cross_entropy_fwd(x, targets), &z, &dloss, &dz, 1e-2, 2e-3, 55)
            .unwrap();
    }
    // Sigmoid cross-entropy with multi-hot targets.
    let tm = Tensor::rand_uniform([5, 11], 0.0, 1.0, 37, DType::F32, CPU).unwrap();
    let tmv = v(&tm);
    let want: Vec<f32> = (0..5)
        .map(|i| {
            (0..11)
                .map(|j| {
                    let (x, t) = (zv[i * 11 + j] as f64, tmv[i * 11 + j] as f64);
                    let s = 1.0 / (1.0 + (-x).exp());
                    -(t * s.ln() + (1.0 - t) * (1.0 - s).ln())
                })
                .sum::<f64>() as f32
        })
        .collect();
    assert_close("sigmoid xent", &v(&ops::sigmoid_cross_entropy_fwd(&z, &tm).unwrap()), &want, 1e-5, 1e-5);
    let dz = ops::sigmoid_cross_entropy_bwd(&z, &tm, &dloss).unwrap();
    check_gradient("sigmoid xent", |x| ops::sigmoid_cross_entropy_fwd(x, &tm), &z, &dloss, &dz, 1e-2, 2e-3, 55)
        .unwrap();
}

#[test]
fn attention_matches_naive_and_finite_differences() {
    let (b, h, n, m, d) = (2, 3, 5, 7, 4);
    let q = randn(&[b, h, n, d], 38);
    let k = randn(&[b, h, m, d], 39);
    let vv = randn(&[b, h, m, d], 40);
    let scale = 1.0 / (d as f32).sqrt();
    let out = ops::attention_fwd(&q, &k, &vv, scale).unwrap();
    // Naive: materialise scores with matmul, softmax, matmul.
    let s = ops::scale(&ops::matmul_t(&q, &k, false, true).unwrap(), scale).unwrap();
    let p = ops::softmax_fwd(&s).unwrap();
    let want = ops::matmul(&p, &vv).unwrap();
    assert_close("attention o", &v(&out.o), &v(&want), 1e-5, 1e-6);
    let sv = v(&s);
    let lse: Vec<f32> = sv.chunks(m).map(|r| r.iter().map(|&t| (t as f64).exp()).sum::<f64>().ln() as f32).collect();
    assert_close("attention lse", &v(&out.lse), &lse, 1e-5, 1e-6);
    // And against plain f64 loops, independent of the GEMM path.
    let (qv, kv, vv64) = (v(&q), v(&k), v(&vv));
    let mut naive = vec![0.0f32; b * h * n * d];
    for s in 0..b * h {
        for i in 0..n {
            let scores: Vec<f64> = (0..m)
                .map(|j| {
                    scale as f64
                        * (0..d).map(|c| qv[(s * n + i) * d + c] as f64 * kv[(s * m + j) * d + c] as f64).sum::<f64>()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
            for c in 0..d {
                naive[(s * n + i) * d + c] =
                    (0..m).map(|j| (scores[j] - mx).exp() / z * vv64[(s * m + j) * d + c] as f64).sum::<f64>() as f32;
            }
        }
    }
    assert_close("attention o (f64 loops)", &v(&out.o), &naive, 1e-5, 1e-6);
    let r = randn(&[b, h, n, d], 41);
    let g = ops::attention_bwd(&q, &k, &vv, &out.o, &out.lse, &r, scale).unwrap();
    let o = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> { Ok(ops::attention_fwd(q, k, v, scale)?.o) };
    check_gradient("attention dq", |t| o(t, &k, &vv), &q, &r, &g.dq, 1e-2, 2e-3, 60).unwrap();
    check_gradient("attention dk", |t| o(&q, t, &vv), &k, &r, &g.dk, 1e-2, 2e-3, 84).unwrap();
    check_gradient("attention dv", |t| o(&q, &k, t), &vv, &r, &g.dv, 1e-2, 2e-3, 84).unwrap();
}

/// The packed op reads q, k, v at channel offsets of one projection (here behind a 5-channel
/// prefix, like the parallel block's `[mlp, q, k, v]`) and merges heads: compared element by
/// element, through index math, with `attention_fwd` on separately built heads, and its packed
/// gradient with finite differences.
#[test]
fn packed_attention_matches_split_heads_and_finite_differences() {
    let (b, n, h, dh, pre) = (2, 5, 3, 4, 5);
    let w = h * dh;
    let x = randn(&[b, n, pre + 3 * w], 42);
    let xv = v(&x);
    let at = |bi: usize, t: usize, ch: usize| xv[(bi * n + t) * (pre + 3 * w) + pre + ch];
    // [b, h, n, dh] heads of block i, gathered with explicit indices.
    let heads = |i: usize| {
        let mut out = vec![0.0f32; b * h * n * dh];
        for bi in 0..b {
            for hh in 0..h {
                for t in 0..n {
                    for c in 0..dh {
                        out[((bi * h + hh) * n + t) * dh + c] = at(bi, t, i * w + hh * dh + c);
                    }
                }
            }
        }
        Tensor::from_f32(out, vec![b, h, n, dh], DType::F32, CPU).unwrap()
    };
    let scale = 0.4;
    let want = ops::attention_fwd(&heads(0), &heads(1), &heads(2), scale).unwrap();
    let got = ops::attention_fwd_packed(&x, pre, w, h, scale).unwrap();
    assert_eq!(got.o.dims(), &[b, n, w]);
    let (go, wo) = (v(&got.o), v(&want.o));
    for bi in 0..b {
        for t in 0..n {
            for hh in 0..h {
                for c in 0..dh {
                    let (g, e) = (go[(bi * n + t) * w + hh * dh + c], wo[((bi * h + hh) * n + t) * dh + c]);
                    assert!((g - e).abs() <= 1e-6, "o[{bi}, {t}, head {hh}, {c}]: {g} vs {e}");
                }
            }
        }
    }
    assert_close("packed lse", &v(&got.lse), &v(&want.lse), 1e-6, 1e-7);
    let r = randn(&[b, n, w], 43);
    let g = ops::attention_bwd_packed(&x, pre, w, h, &got.o, &got.lse, &r, scale).unwrap();
    assert_eq!(g.dims(), &[b, n, 3 * w]);
    // Against the backward of the split heads, merged back to [b, n, 3·w].
    let split = |t: &Tensor| ops::permute(&t.reshape([b, n, h, dh]).unwrap(), &[0, 2, 1, 3]).unwrap();
    let merge = |t: &Tensor| ops::permute(t, &[0, 2, 1, 3]).unwrap().reshape([b, n, w]).unwrap();
    let gs = ops::attention_bwd(&heads(0), &heads(1), &heads(2), &want.o, &want.lse, &split(&r), scale).unwrap();
    let want_g = ops::concat(&[&merge(&gs.dq), &merge(&gs.dk), &merge(&gs.dv)], 2).unwrap();
    assert_close("packed dqkv vs split heads", &v(&g), &v(&want_g), 1e-5, 1e-6);
    // The gradient with respect to the whole input, zero on the prefix.
    let gx = ops::concat(&[&Tensor::zeros(vec![b, n, pre], DType::F32, CPU).unwrap(), &g], 2).unwrap();
    let f = |t: &Tensor| -> Result<Tensor> { Ok(ops::attention_fwd_packed(t, pre, w, h, scale)?.o) };
    check_gradient("packed attention dqkv", f, &x, &r, &gx, 1e-2, 2e-3, 120).unwrap();
}

#[test]
fn reductions_match_naive_and_finite_differences() {
    let x = randn(&[3, 4, 5], 42);
    let xv = v(&x);
    let at = |i: usize, j: usize, l: usize| xv[(i * 4 + j) * 5 + l];
    // Along the middle dim.
    let mut sum = vec![0.0f32; 15];
    let mut max = vec![f32::NEG_INFINITY; 15];
    let mut arg = vec![0u32; 15];
    for i in 0..3 {
        for l in 0..5 {
            for j in 0..4 {
                sum[i * 5 + l] += at(i, j, l);
                if at(i, j, l) > max[i * 5 + l] {
                    max[i * 5 + l] = at(i, j, l);
                    arg[i * 5 + l] = j as u32;
                }
            }
        }
    }
    assert_close("sum", &v(&ops::sum(&x, 1).unwrap()), &sum, 1e-6, 1e-6);
    assert_close("mean", &v(&ops::mean(&x, 1).unwrap()), &sum.iter().map(|s| s / 4.0).collect::<Vec<_>>(), 1e-6, 1e-6);
    assert_close("max", &v(&ops::max(&x, 1).unwrap()), &max, 0.0, 0.0);
    assert_eq!(ops::argmax(&x, 1).unwrap().to_vec::<u32>().unwrap(), arg);
    assert_eq!(ops::sum(&x, 2).unwrap().dims(), &[3, 4]);
    assert!((ops::sum_all(&x).unwrap().to_scalar().unwrap() - xv.iter().sum::<f32>()).abs() < 1e-4);
    let r = randn(&[3, 5], 43);
    let shape = x.dims().to_vec();
    check_gradient("sum", |t| ops::sum(t, 1), &x, &r, &ops::sum_bwd(&r, &shape, 1).unwrap(), 1e-2, 1e-3, 60).unwrap();
    check_gradient("mean", |t| ops::mean(t, 1), &x, &r, &ops::mean_bwd(&r, &shape, 1).unwrap(), 1e-2, 1e-3, 60)
        .unwrap();
    check_gradient("max", |t| ops::max(t, 1), &x, &r, &ops::max_bwd(&x, &r, 1).unwrap(), 1e-3, 1e-3, 60).unwrap();
    // Ties go to the first index.
    let tied = Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 2.0], [1, 4], CPU).unwrap();
    assert_eq!(ops::argmax(&tied, 1).unwrap().to_vec::<u32>().unwrap(), vec![1]);
}

#[test]
fn topk_matches_a_sort() {
    let x = randn(&[6, 13], 44);
    let (vals, idx) = ops::topk(&x, 4).unwrap();
    assert_eq!(vals.dims(), &[6, 4]);
    let (xv, vv, iv) = (v(&x), v(&vals), idx.to_vec::<u32>().unwrap());
    for r in 0..6 {
        let mut row: Vec<(f32, usize)> = xv[r * 13..(r + 1) * 13].iter().copied().zip(0..).collect();
        row.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        for c in 0..4 {
            assert_eq!(vv[r * 4 + c], row[c].0);
            assert_eq!(iv[r * 4 + c] as usize, row[c].1);
        }
    }
    let tied = Tensor::from_vec(vec![2.0f32, 5.0, 2.0, 5.0], [1, 4], CPU).unwrap();
    assert_eq!(ops::topk(&tied, 3).unwrap().1.to_vec::<u32>().unwrap(), vec![1, 3, 0]);
}

#[test]
fn gather_and_scatter_are_adjoint_and_match_naive() {
    let src = randn(&[5, 3], 45);
    let idx = ops::RowIndex::from_host(vec![4i32, -1, 0, 4, 2, 1], 5, CPU).unwrap();
    let g = ops::gather_rows(&src, &idx).unwrap();
    let (sv, gv) = (v(&src), v(&g));
    for (i, &j) in [4i32, -1, 0, 4, 2, 1].iter().enumerate() {
        let want: Vec<f32> = if j < 0 { vec![0.0; 3] } else { sv[j as usize * 3..j as usize * 3 + 3].to_vec() };
        assert_eq!(&gv[i * 3..i * 3 + 3], want.as_slice());
    }
    let r = randn(&[6, 3], 46);
    let back = ops::scatter_add_rows(&r, &idx).unwrap();
    let rv = v(&r);
    let bv = v(&back);
    for c in 0..3 {
        assert!((bv[4 * 3 + c] - (rv[c] + rv[3 * 3 + c])).abs() < 1e-6, "row 4 sums two contributions");
        assert_eq!(bv[3 * 3 + c], 0.0, "row 3 receives nothing");
    }
    check_gradient("gather", |t| ops::gather_rows(t, &idx), &src, &r, &back, 1e-2, 1e-3, 15).unwrap();
    let r2 = randn(&[5, 3], 47);
    let y = randn(&[6, 3], 48);
    check_gradient(
        "scatter",
        |t| ops::scatter_add_rows(t, &idx),
        &y,
        &r2,
        &ops::gather_rows(&r2, &idx).unwrap(),
        1e-2,
        1e-3,
        18,
    )
    .unwrap();
}

#[test]
fn patchify_matches_naive_and_inverts() {
    let (b, c, h, w, p) = (2, 3, 8, 12, 4);
    let img = randn(&[b, c, h, w], 49);
    let patches = ops::patchify(&img, p).unwrap();
    assert_eq!(patches.dims(), &[b, 6, c * p * p]);
    let (iv, pv) = (v(&img), v(&patches));
    // Patch (1, 2) of image 1, channel 2, pixel (3, 1) inside the patch.
    let (bi, gy, gx, ci, py, px) = (1, 1, 2, 2, 3, 1);
    let pixel = iv[((bi * c + ci) * h + gy * p + py) * w + gx * p + px];
    let feature = pv[(bi * 6 + gy * 3 + gx) * c * p * p + (ci * p + py) * p + px];
    assert_eq!(pixel, feature);
    assert_eq!(v(&ops::unpatchify(&patches, c, h, w, p).unwrap()), iv);
    let r = randn(&[b, 6, c * p * p], 50);
    let back = ops::unpatchify(&r, c, h, w, p).unwrap();
    check_gradient("patchify", |t| ops::patchify(t, p), &img, &r, &back, 1e-2, 1e-3, 40).unwrap();
}

/// A convolution straight from its definition: `x [b, h, w, c]`, kernel `[o, k, k, c]`,
/// zero padding; `[b, oh, ow, o]`.
fn naive_conv(x: &[f32], [b, h, w, c]: [usize; 4], kernel: &[f32], o: usize, win: ops::ConvWindow) -> Vec<f32> {
    let (k, s, pad) = (win.kernel as isize, win.stride as isize, win.pad as isize);
    let (oh, ow) = (win.out_side(h).unwrap(), win.out_side(w).unwrap());
    let mut out = vec![0.0f32; b * oh * ow * o];
    for bi in 0..b {
        for oy in 0..oh {
            for ox in 0..ow {
                for oc in 0..o {
                    let mut acc = 0.0f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let (y, xx) = (oy as isize * s + ky - pad, ox as isize * s + kx - pad);
                            if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                continue;
                            }
                            for ci in 0..c {
                                let pixel = x[((bi * h + y as usize) * w + xx as usize) * c + ci];
                                let weight =
                                    kernel[((oc * win.kernel + ky as usize) * win.kernel + kx as usize) * c + ci];
                                acc += (pixel * weight) as f64;
                            }
                        }
                    }
                    out[((bi * oh + oy) * ow + ox) * o + oc] = acc as f32;
                }
            }
        }
    }
    out
}

#[test]
fn im2col_and_a_matmul_are_the_convolution_and_col2im_is_its_backward() {
    let (b, c, o) = (2, 3, 4);
    // Stride-2 3x3 with padding (a conv stem), odd sides, overlapping stride 1, a window as
    // large as the padded image, and non-overlapping patches.
    let cases = [(9, 7, 3, 2, 1), (6, 6, 3, 1, 1), (5, 4, 5, 1, 1), (8, 8, 4, 4, 0)];
    for (case, (h, w, k, s, pad)) in cases.into_iter().enumerate() {
        let win = ops::ConvWindow { kernel: k, stride: s, pad };
        let (oh, ow) = (win.out_side(h).unwrap(), win.out_side(w).unwrap());
        let x = randn(&[b, h, w, c], 60 + case as u64);
        let kernel = randn(&[o, k, k, c], 70 + case as u64);
        let cols = ops::im2col(&x, win).unwrap();
        assert_eq!(cols.dims(), &[b, oh * ow, k * k * c], "{win:?}");
        let y = ops::matmul_t(&cols, &kernel.reshape([o, k * k * c]).unwrap(), false, true).unwrap();
        let want = naive_conv(&v(&x), [b, h, w, c], &v(&kernel), o, win);
        assert_close(&format!("conv {win:?}"), &v(&y), &want, 1e-5, 1e-5);
        let r = randn(&[b, oh * ow, k * k * c], 80 + case as u64);
        let back = ops::col2im(&r, h, w, c, win).unwrap();
        assert_eq!(back.dims(), &[b, h, w, c]);
        check_gradient("im2col", |t| ops::im2col(t, win), &x, &r, &back, 1e-2, 1e-3, 40).unwrap();
    }
    // Non-overlapping windows on one channel are patchify: the same values in the same order.
    let img = randn(&[2, 1, 8, 12], 90);
    let win = ops::ConvWindow { kernel: 4, stride: 4, pad: 0 };
    let cols = ops::im2col(&img.reshape([2, 8, 12, 1]).unwrap(), win).unwrap();
    assert_eq!(v(&cols), v(&ops::patchify(&img, 4).unwrap()));
}

#[test]
fn tensors_create_view_cast_and_copy() {
    let a = Tensor::randn([4, 3], 0.0, 1.0, 51, DType::F32, CPU).unwrap();
    let b = Tensor::randn([4, 3], 0.0, 1.0, 51, DType::F32, CPU).unwrap();
    assert_eq!(v(&a), v(&b), "same seed, same values");
    assert_ne!(v(&a), v(&Tensor::randn([4, 3], 0.0, 1.0, 52, DType::F32, CPU).unwrap()));
    let rows = a.narrow(1, 2).unwrap();
    assert_eq!(rows.dims(), &[2, 3]);
    assert_eq!(v(&rows), v(&a)[3..9].to_vec());
    // Ops on a view see only the view.
    assert_eq!(v(&ops::scale(&rows, 1.0).unwrap()), v(&a)[3..9].to_vec());
    assert_eq!(rows.reshape([3, 2]).unwrap().dims(), &[3, 2]);
    let h = a.cast(DType::BF16).unwrap();
    assert_eq!(h.dtype(), DType::BF16);
    assert_close("bf16 round trip", &v(&h), &v(&a), 4e-3, 0.0);
    assert_close("f16 round trip", &v(&a.cast(DType::F16).unwrap()), &v(&a), 5e-4, 0.0);
    let u = Tensor::rand_uniform([1000], -2.0, 3.0, 53, DType::F32, CPU).unwrap();
    assert!(v(&u).iter().all(|&x| (-2.0..3.0).contains(&x)));
    let n = Tensor::randn([20000], 1.5, 2.0, 54, DType::F32, CPU).unwrap();
    let nv = v(&n);
    let mean = nv.iter().sum::<f32>() / nv.len() as f32;
    let std = (nv.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / nv.len() as f32).sqrt();
    assert!((mean - 1.5).abs() < 0.05 && (std - 2.0).abs() < 0.05, "mean {mean} std {std}");
    assert_eq!(Tensor::full(2.5, [2], DType::F16, CPU).unwrap().to_f32_vec().unwrap(), vec![2.5, 2.5]);
    assert_eq!(Tensor::zeros([3], DType::I32, CPU).unwrap().to_vec::<i32>().unwrap(), vec![0, 0, 0]);
}

#[test]
fn layout_ops_match_naive_and_finite_differences() {
    // permute [2, 3, 4, 5] -> [2, 4, 3, 5] (heads <-> tokens) against index arithmetic.
    let x = randn(&[2, 3, 4, 5], 55);
    let y = ops::permute(&x, &[0, 2, 1, 3]).unwrap();
    assert_eq!(y.dims(), &[2, 4, 3, 5]);
    let (xv, yv) = (v(&x), v(&y));
    for (a, b, c, d) in [(0, 0, 0, 0), (1, 2, 3, 4), (1, 0, 2, 1), (0, 1, 3, 2)] {
        assert_eq!(yv[((a * 4 + c) * 3 + b) * 5 + d], xv[((a * 3 + b) * 4 + c) * 5 + d]);
    }
    let back = ops::permute(&y, &ops::inverse_permutation(&[0, 2, 1, 3])).unwrap();
    assert_eq!(v(&back), xv);
    // A 5-D permute on bf16 keeps the bits.
    let h = randn(&[2, 3, 2, 4, 3], 56).cast(DType::BF16).unwrap();
    let p = ops::permute(&h, &[2, 0, 3, 1, 4]).unwrap();
    assert_eq!(v(&ops::permute(&p, &ops::inverse_permutation(&[2, 0, 3, 1, 4])).unwrap()), v(&h));
    // slice / pad / concat along the middle dim.
    let s = ops::slice(&x, 2, 1, 2).unwrap();
    assert_eq!(s.dims(), &[2, 3, 2, 5]);
    assert_eq!(v(&s)[..5], xv[5..10]);
    let parts = [ops::slice(&x, 2, 0, 1).unwrap(), ops::slice(&x, 2, 1, 3).unwrap()];
    assert_eq!(v(&ops::concat(&[&parts[0], &parts[1]], 2).unwrap()), xv);
    let padded = ops::pad_along(&s, x.dims(), 2, 1).unwrap();
    let pv = v(&padded);
    assert_eq!(pv[..5], [0.0; 5]);
    assert_eq!(pv[5..10], xv[5..10]);
    // Gradients: slice's is pad, permute's is the inverse permute, concat's is slices.
    let r = randn(&[2, 3, 2, 5], 57);
    check_gradient(
        "slice",
        |t| ops::slice(t, 2, 1, 2),
        &x,
        &r,
        &ops::pad_along(&r, x.dims(), 2, 1).unwrap(),
        1e-2,
        1e-3,
        60,
    )
    .unwrap();
    let r = randn(&[2, 4, 3, 5], 58);
    let dx = ops::permute(&r, &ops::inverse_permutation(&[0, 2, 1, 3])).unwrap();
    check_gradient("permute", |t| ops::permute(t, &[0, 2, 1, 3]), &x, &r, &dx, 1e-2, 1e-3, 60).unwrap();
    let a = randn(&[2, 3], 59);
    let b = randn(&[2, 5], 60);
    let r = randn(&[2, 8], 61);
    let da = ops::slice(&r, 1, 0, 3).unwrap();
    check_gradient("concat", |t| ops::concat(&[t, &b], 1), &a, &r, &da, 1e-2, 1e-3, 6).unwrap();
    // broadcast along a new dim, and its gradient (a sum).
    let bc = ops::broadcast(&a, 0, 4).unwrap();
    assert_eq!(bc.dims(), &[4, 2, 3]);
    assert_eq!(v(&bc)[18..24], v(&a)[..]);
    let r = randn(&[4, 2, 3], 62);
    check_gradient("broadcast", |t| ops::broadcast(t, 0, 4), &a, &r, &ops::sum(&r, 0).unwrap(), 1e-2, 1e-3, 6).unwrap();
    assert!(ops::permute(&x, &[0, 1, 1, 3]).is_err());
    assert!(ops::concat(&[&a, &randn(&[3, 5], 63)], 1).unwrap_err().to_string().contains("[2, 3] with [3, 5]"));
}

/// Inputs above the CPU backend's parallel threshold take the blocked, multi-threaded paths:
/// they must match naive loops exactly (copies) or to f32 rounding (sums), and give the same
/// bits on 1 and 3 threads (a resumed run must not depend on the machine's core count).
#[test]
fn large_inputs_take_the_parallel_paths_and_match_naive() {
    // [batch, tokens, 3, heads, head_dim] -> [3, batch, heads, tokens, head_dim]: 301,056 elements.
    let dims = [32usize, 49, 3, 4, 16];
    let perm = [2usize, 0, 3, 1, 4];
    let x = randn(&dims, 70);
    let xv = v(&x);
    let y = ops::permute(&x, &perm).unwrap();
    let yv = v(&y);
    let od: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let mut want = vec![0.0f32; xv.len()];
    for (i, w) in want.iter_mut().enumerate() {
        let (mut rest, mut o) = (i, [0usize; 5]);
        for d in (0..5).rev() {
            o[d] = rest % od[d];
            rest /= od[d];
        }
        let mut src = [0usize; 5];
        for d in 0..5 {
            src[perm[d]] = o[d];
        }
        *w = xv[(((src[0] * dims[1] + src[1]) * dims[2] + src[2]) * dims[3] + src[3]) * dims[4] + src[4]];
    }
    assert_eq!(yv, want, "large permute");
    let h = x.cast(DType::BF16).unwrap();
    assert_eq!(v(&ops::permute(&h, &perm).unwrap()), v(&y.cast(DType::BF16).unwrap()), "large bf16 permute");

    // slice + concat along tokens (block copies), elementwise ops, bias add.
    let parts = [ops::slice(&x, 1, 0, 1).unwrap(), ops::slice(&x, 1, 1, 48).unwrap()];
    assert_eq!(v(&parts[1])[..16], xv[3 * 4 * 16..3 * 4 * 16 + 16]);
    assert_eq!(v(&ops::concat(&[&parts[0], &parts[1]], 1).unwrap()), xv, "large concat");
    let (rows, n) = (32 * 49, 192);
    let a = randn(&[rows, n], 71);
    let b = randn(&[rows, n], 72);
    let (av, bv) = (v(&a), v(&b));
    let add: Vec<f32> = av.iter().zip(&bv).map(|(x, y)| x + y).collect();
    assert_eq!(v(&ops::add(&a, &b).unwrap()), add, "large add");
    assert_eq!(v(&ops::scale(&a, 0.75).unwrap()), av.iter().map(|x| x * 0.75).collect::<Vec<_>>());
    let bias = randn(&[n], 73);
    let biasv = v(&bias);
    let want: Vec<f32> = av.iter().enumerate().map(|(i, x)| x + biasv[i % n]).collect();
    assert_eq!(v(&ops::bias_add(&a, &bias).unwrap()), want, "large bias_add");
    let sums: Vec<f32> = (0..n).map(|j| (0..rows).map(|i| av[i * n + j] as f64).sum::<f64>() as f32).collect();
    assert_close("large bias_add_bwd", &v(&ops::bias_add_bwd(&a).unwrap()), &sums, 1e-4, 1e-4);

    // LayerNorm's dweight/dbias: blocked row sums against f64.
    let w = Tensor::randn([n], 1.0, 0.3, 74, DType::F32, CPU).unwrap();
    let out = ops::layer_norm_fwd(&a, Some(&w), Some(&bias), 1e-6, NormKind::LayerNorm).unwrap();
    let g = ops::layer_norm_bwd(&a, Some(&w), &out.mean, &out.rstd, &b, NormKind::LayerNorm, true).unwrap();
    let (mean, rstd) = (v(&out.mean), v(&out.rstd));
    let dw: Vec<f32> = (0..n)
        .map(|j| {
            (0..rows).map(|i| bv[i * n + j] as f64 * (av[i * n + j] - mean[i]) as f64 * rstd[i] as f64).sum::<f64>()
                as f32
        })
        .collect();
    let db: Vec<f32> = (0..n).map(|j| (0..rows).map(|i| bv[i * n + j] as f64).sum::<f64>() as f32).collect();
    assert_close("large layer_norm dweight", &v(g.dweight.as_ref().unwrap()), &dw, 1e-4, 1e-4);
    assert_close("large layer_norm dbias", &v(g.dbias.as_ref().unwrap()), &db, 1e-4, 1e-4);

    // The same bits on 1 and 3 threads.
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let g = ops::layer_norm_bwd(&a, Some(&w), &out.mean, &out.rstd, &b, NormKind::LayerNorm, true).unwrap();
            [v(&g.dx), v(g.dweight.as_ref().unwrap()), v(g.dbias.as_ref().unwrap()), v(&ops::bias_add_bwd(&a).unwrap())]
        })
    };
    assert_eq!(on(1), on(3), "blocked sums depend on the thread count");
}

#[test]
fn fused_softmax_cross_entropy_is_the_two_ops_and_checks_dloss() {
    let (z, t) = (randn(&[5, 11], 40), ops::softmax_fwd(&randn(&[5, 11], 41)).unwrap());
    let dloss = randn(&[5], 42);
    let (loss, dz) = ops::softmax_cross_entropy_fwd_bwd(&z, &t, &dloss).unwrap();
    assert_eq!(v(&loss), v(&ops::softmax_cross_entropy_fwd(&z, &t).unwrap()));
    assert_eq!(v(&dz), v(&ops::softmax_cross_entropy_bwd(&z, &t, &dloss).unwrap()));
    let msg = ops::softmax_cross_entropy_fwd_bwd(&z, &t, &randn(&[4], 43)).unwrap_err().to_string();
    assert!(msg.contains("softmax_cross_entropy_fwd_bwd") && msg.contains("dloss"), "{msg}");
}

/// The fused CPU linear (bias and residual written into the output, the GEMM accumulating into
/// it, the GELU in one vectorised pass) equals the plain composition and a naive f64 product;
/// the fused GELU backward with its bias gradient equals `gelu_bwd` then `bias_add_bwd`.
#[test]
fn fused_linear_equals_the_composition() {
    let (rows, k, n) = (37, 24, 40);
    let x = randn(&[1, rows, k], 11);
    let w = randn(&[n, k], 12);
    let b = randn(&[n], 13);
    let r = randn(&[1, rows, n], 14);
    let naive = naive_matmul(&v(&x), &v(&w), rows, n, k, false, true);
    for (bias, act, res) in [
        (None, None, None),
        (Some(&b), None, None),
        (None, None, Some(&r)),
        (Some(&b), None, Some(&r)),
        (Some(&b), Some(Gelu::Tanh), None),
        (None, Some(Gelu::Erf), None),
    ] {
        let what = format!("bias {} act {act:?} residual {}", bias.is_some(), res.is_some());
        let fused = ops::linear(&x, &w, bias, act, res).unwrap();
        let plain = ops::linear_reference(&x, &w, bias, act, res).unwrap();
        assert_close(&what, &v(&fused.y), &v(&plain.y), 1e-5, 1e-5);
        assert_eq!(fused.pre.is_some(), act.is_some(), "{what}");
        let mut want: Vec<f32> = naive.clone();
        for (i, y) in want.iter_mut().enumerate() {
            *y += bias.map_or(0.0, |b| v(b)[i % n]) + res.map_or(0.0, |r| v(r)[i]);
        }
        match (&fused.pre, &plain.pre) {
            (Some(fp), Some(pp)) => {
                assert_close(&what, &v(fp), &v(pp), 1e-5, 1e-5);
                assert_close(&what, &v(fp), &want, 1e-4, 1e-4);
            }
            _ => assert_close(&what, &v(&fused.y), &want, 1e-4, 1e-4),
        }
        assert_eq!(fused.y.dims(), &[1, rows, n], "{what}");
    }
    // fc2's data gradient through fc1's GELU, with fc1's bias gradient.
    let dy = randn(&[1, rows, k], 15);
    let w2 = randn(&[k, n], 16);
    let pre = randn(&[1, rows, n], 17);
    for kind in [Gelu::Tanh, Gelu::Erf] {
        let (dpre, db) = ops::linear_dgrad_gelu(&dy, &w2, &pre, kind).unwrap();
        let dh = ops::matmul_t(&dy, &w2, false, false).unwrap();
        let want = ops::gelu_bwd(&pre, &dh, kind).unwrap();
        assert_close("dgrad_gelu", &v(&dpre), &v(&want), 0.0, 0.0);
        assert_close("dgrad_gelu bias", &v(&db), &v(&ops::bias_add_bwd(&want).unwrap()), 0.0, 0.0);
    }
}
