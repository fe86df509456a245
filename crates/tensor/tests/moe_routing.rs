//! The V-MoE routing op and dispatch/combine ops on the CPU: the worked example of docs/moe.md,
//! invariants and adjoint identities on random inputs, agreement with the existing row
//! gather/scatter ops, and clear errors. (That the routing equals vit-model's host routing is
//! checked in `crates/model/tests/moe_routing_ops.rs`.)

use vit_tensor::{
    ops::{self, RouteGroup},
    DType, Device, Error, Tensor,
};

fn randn(shape: &[usize], std: f32, seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, std, seed, DType::F32, Device::Cpu).unwrap()
}

fn i32s(t: &Tensor) -> Vec<i32> {
    t.to_vec::<i32>().unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

/// The example of docs/moe.md: 4 tokens, E = 3, k = 2, capacity 2, no noise.
fn worked_example_logits() -> Tensor {
    let z = vec![2.0, 1.0, 0.0, 0.0, 3.0, 1.0, 4.0, 0.0, 1.0, 5.0, 0.0, 0.0];
    Tensor::from_vec(z, [4, 3], Device::Cpu).unwrap()
}

#[test]
fn worked_example_vanilla_and_bpr() {
    let z = worked_example_logits();
    let g = [RouteGroup { tokens: 4, capacity: 2 }];
    let v = ops::moe_route(&z, None, 2, &g, false).unwrap();
    assert_eq!(v.slots(), 2);
    assert_eq!(i32s(v.choice()), [0, 1, 1, 2, 0, 2, 0, 1], "t3's tie goes to the lower expert");
    assert_eq!(i32s(v.order()), [0, 1, 2, 3]);
    // Rows: expert x owns rows 2x, 2x+1. t3 loses both choices.
    assert_eq!(i32s(v.pos()), [0, 3, 2, 4, 1, 5, -1, -1]);
    assert_eq!(i32s(v.slot_src()), [0, 4, 2, 1, 3, 5]);
    let w = f32s(v.weight());
    assert!((w[0] - 0.665).abs() < 1e-3 && (w[4] - 0.936).abs() < 1e-3 && w[6] == 0.0 && w[7] == 0.0, "{w:?}");

    let b = ops::moe_route(&z, None, 2, &g, true).unwrap();
    assert_eq!(i32s(b.order()), [3, 2, 1, 0]);
    assert_eq!(i32s(b.pos()), [-1, -1, 2, 5, 1, 4, 0, 3], "BPR drops t0, the least confident");
    assert_eq!(i32s(b.slot_src()), [6, 4, 2, 7, 5, 3]);
}

#[test]
fn k_major_assignment_keeps_both_first_choices() {
    // Two tokens that want each other's expert second, one slot each (capacity 1).
    let z = Tensor::from_vec(vec![3.0f32, 1.0, 1.0, 3.0], [2, 2], Device::Cpu).unwrap();
    let r = ops::moe_route(&z, None, 2, &[RouteGroup { tokens: 2, capacity: 1 }], false).unwrap();
    assert_eq!(i32s(r.pos()), [0, -1, 1, -1]);
}

/// Random routing over several groups (the last smaller) with noise and overflow.
fn random_routing(bpr: bool, seed: u64) -> (ops::MoeRouting, Vec<RouteGroup>, Tensor) {
    let (e, k) = (7, 3);
    let groups = vec![
        RouteGroup { tokens: 30, capacity: 8 },
        RouteGroup { tokens: 30, capacity: 12 },
        RouteGroup { tokens: 11, capacity: 4 },
    ];
    let s: usize = groups.iter().map(|g| g.tokens).sum();
    let z = randn(&[s, e], 1.5, seed);
    let n = randn(&[s, e], 1.0, seed + 1);
    (ops::moe_route(&z, Some((&n, 0.2)), k, &groups, bpr).unwrap(), groups, z)
}

#[test]
fn random_routing_is_consistent_and_respects_capacity() {
    for bpr in [false, true] {
        let (r, groups, _) = random_routing(bpr, 11 + bpr as u64);
        let (e, k, slots) = (r.experts(), r.k(), r.slots());
        assert_eq!(slots, 24);
        let (gates, choice, order, pos, src, w) =
            (f32s(r.gates()), i32s(r.choice()), i32s(r.order()), i32s(r.pos()), i32s(r.slot_src()), f32s(r.weight()));
        let mut dropped = 0;
        for (a, &p) in pos.iter().enumerate() {
            let (t, x) = (a / k, choice[a] as usize);
            if p < 0 {
                dropped += 1;
                assert_eq!(w[a], 0.0);
                continue;
            }
            assert_eq!(src[p as usize], a as i32, "slot_src inverts pos");
            assert_eq!(p as usize / slots, x, "the row is in the chosen expert's buffer");
            assert_eq!(w[a], gates[t * e + x], "the weight is the gate, not renormalised");
        }
        assert!(dropped > 0, "the test must overflow some expert");
        assert_eq!(src.iter().filter(|&&a| a >= 0).count() + dropped, pos.len());
        // Gates: rows of a softmax; choices: descending, distinct.
        for t in 0..r.tokens() {
            let row = &gates[t * e..(t + 1) * e];
            assert!((row.iter().map(|&g| g as f64).sum::<f64>() - 1.0).abs() < 1e-5);
            let c = &choice[t * k..(t + 1) * k];
            let best = row.iter().copied().fold(f32::MIN, f32::max);
            assert_eq!(row[c[0] as usize], best);
            assert!(c.windows(2).all(|p| row[p[0] as usize] >= row[p[1] as usize] && p[0] != p[1]));
        }
        // Order: a permutation of each group's tokens, by descending top-1 gate under BPR.
        let mut start = 0;
        for g in &groups {
            let o = &order[start..start + g.tokens];
            let mut sorted = o.to_vec();
            sorted.sort();
            assert_eq!(sorted, (start as i32..(start + g.tokens) as i32).collect::<Vec<_>>());
            let top1 = |t: i32| gates[t as usize * e + choice[t as usize * k] as usize];
            if bpr {
                assert!(o.windows(2).all(|p| top1(p[0]) > top1(p[1]) || (top1(p[0]) == top1(p[1]) && p[0] < p[1])));
            } else {
                assert!(o.windows(2).all(|p| p[0] < p[1]));
            }
            start += g.tokens;
        }
    }
}

#[test]
fn dispatch_and_combine_agree_with_the_row_gather_and_scatter_ops() {
    let (r, _, _) = random_routing(true, 5);
    let (s, k, rows, d) = (r.tokens(), r.k(), r.experts() * r.slots(), 13);
    let token_of_row: Vec<i32> = i32s(r.slot_src()).iter().map(|&a| if a < 0 { -1 } else { a / k as i32 }).collect();
    let token_of_row = ops::RowIndex::from_host(token_of_row, s, Device::Cpu).unwrap();
    let w = f32s(r.weight());
    let row_w: Vec<f32> = i32s(r.slot_src()).iter().map(|&a| if a < 0 { 0.0 } else { w[a as usize] }).collect();
    let row_w = Tensor::from_vec(row_w, [rows], Device::Cpu).unwrap();
    let x = randn(&[s, d], 1.0, 21);
    let out = randn(&[rows, d], 1.0, 22);
    let dy = randn(&[s, d], 1.0, 23);
    let close = |what: &str, a: &Tensor, b: &Tensor| {
        assert_eq!(a.dims(), b.dims(), "{what}");
        for (i, (p, q)) in f32s(a).iter().zip(f32s(b)).enumerate() {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{what}[{i}]: {p} vs {q}");
        }
    };
    let xin = ops::moe_dispatch(&x, &r).unwrap();
    assert_eq!(f32s(&xin), f32s(&ops::gather_rows(&x, &token_of_row).unwrap()), "dispatch is a gather");
    close(
        "dispatch backward",
        &ops::moe_dispatch_bwd(&out, &r).unwrap(),
        &ops::scatter_add_rows(&out, &token_of_row).unwrap(),
    );
    let weighted = ops::mul(&out, &ops::broadcast(&row_w, 1, d).unwrap()).unwrap();
    let y = ops::moe_combine(&out, &r).unwrap();
    close("combine", &y, &ops::scatter_add_rows(&weighted, &token_of_row).unwrap());
    let (dout, dw) = ops::moe_combine_bwd(&out, &dy, &r).unwrap();
    let want_dout = ops::mul(&ops::gather_rows(&dy, &token_of_row).unwrap(), &ops::broadcast(&row_w, 1, d).unwrap());
    close("combine backward (buffers)", &dout, &want_dout.unwrap());
    // The adjoint identities: <dy, combine(out)> = <dout, out> = Σ dweight·weight.
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
    let lhs = dot(&f32s(&dy), &f32s(&y));
    assert!((lhs - dot(&f32s(&dout), &f32s(&out))).abs() < 1e-4 * lhs.abs().max(1.0));
    assert!((lhs - dot(&f32s(&dw), &w)).abs() < 1e-4 * lhs.abs().max(1.0));
    assert_eq!(dw.dims(), [s, k]);
    let pos = i32s(r.pos());
    assert!(pos.iter().zip(f32s(&dw)).all(|(p, g)| *p >= 0 || g == 0.0), "dropped assignments get no gradient");
    assert!(f32s(&dw).iter().any(|g| *g != 0.0));
    // bf16 inputs: same maps, results rounded once.
    let xb = x.cast(DType::BF16).unwrap();
    let yb = ops::moe_dispatch(&xb, &r).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    assert_eq!(f32s(&yb), f32s(&ops::moe_dispatch(&xb.cast(DType::F32).unwrap(), &r).unwrap()));
}

#[test]
fn bad_routing_inputs_are_clear_errors() {
    let z = randn(&[6, 4], 1.0, 3);
    let g = [RouteGroup { tokens: 6, capacity: 2 }];
    let msg = |e: Error| e.to_string();
    assert!(msg(ops::moe_route(&z, None, 5, &g, true).unwrap_err()).contains("k = 5"));
    assert!(msg(ops::moe_route(&z, None, 0, &g, true).unwrap_err()).contains("k = 0"));
    let wide = randn(&[2, 300], 1.0, 3);
    let e = msg(ops::moe_route(&wide, None, 2, &[RouteGroup { tokens: 2, capacity: 1 }], true).unwrap_err());
    assert!(e.contains("300 experts") && e.contains("256"), "{e}");
    let e = msg(ops::moe_route(&z, None, 2, &[RouteGroup { tokens: 5, capacity: 2 }], true).unwrap_err());
    assert!(e.contains("5 tokens") && e.contains('6'), "{e}");
    let e = msg(ops::moe_route(&z, None, 2, &[RouteGroup { tokens: 6, capacity: 0 }], true).unwrap_err());
    assert!(e.contains("capacity 0"), "{e}");
    let n = randn(&[6, 3], 1.0, 4);
    assert!(msg(ops::moe_route(&z, Some((&n, 0.1)), 2, &g, true).unwrap_err()).contains("noise"));
    let nb = randn(&[6, 4], 1.0, 4).cast(DType::BF16).unwrap();
    assert!(matches!(ops::moe_route(&z, Some((&nb, 0.1)), 2, &g, true), Err(Error::DType { .. })));
    let zi = Tensor::from_vec(vec![0i32; 24], [6, 4], Device::Cpu).unwrap();
    assert!(matches!(ops::moe_route(&zi, None, 2, &g, true), Err(Error::DType { .. })));
    let gb = ops::moe_gates(&z, None).unwrap().cast(DType::BF16).unwrap();
    assert!(matches!(ops::moe_assign(&gb, 2, &g, true), Err(Error::DType { op: "moe_assign", .. })));
    let r = ops::moe_route(&z, None, 2, &g, true).unwrap();
    let e = msg(ops::moe_dispatch(&randn(&[5, 3], 1.0, 1), &r).unwrap_err());
    assert!(e.contains("[6, width]"), "{e}");
    let e = msg(ops::moe_combine(&randn(&[6, 3], 1.0, 1), &r).unwrap_err());
    assert!(e.contains("[8, width]"), "{e}");
    let e = msg(ops::moe_combine_bwd(&randn(&[8, 3], 1.0, 1), &randn(&[6, 2], 1.0, 1), &r).unwrap_err());
    assert!(e.contains("dy"), "{e}");
}
