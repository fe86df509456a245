//! Reductions on `[outer, n, inner]` views, their backward, and top-k.

use super::zeroed;
use crate::op_kinds::ReduceOp;

/// The first index of the maximum of line `(o, i)`.
fn line_argmax(x: &[f32], o: usize, n: usize, inner: usize, i: usize) -> usize {
    let mut best = 0;
    for j in 1..n {
        if x[(o * n + j) * inner + i] > x[(o * n + best) * inner + i] {
            best = j;
        }
    }
    best
}

pub(crate) fn reduce(x: &[f32], outer: usize, n: usize, inner: usize, op: ReduceOp) -> Vec<f32> {
    let mut out = zeroed(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let line = (0..n).map(|j| x[(o * n + j) * inner + i]);
            out[o * inner + i] = match op {
                ReduceOp::Sum => line.sum(),
                ReduceOp::Mean => line.sum::<f32>() / n as f32,
                ReduceOp::Max => line.fold(f32::NEG_INFINITY, f32::max),
            };
        }
    }
    out
}

pub(crate) fn argmax(x: &[f32], outer: usize, n: usize, inner: usize) -> Vec<u32> {
    (0..outer * inner).map(|l| line_argmax(x, l / inner, n, inner, l % inner) as u32).collect()
}

pub(crate) fn broadcast_along(dy: &[f32], outer: usize, n: usize, inner: usize, scale: f32) -> Vec<f32> {
    let mut dx = zeroed(outer * n * inner);
    for o in 0..outer {
        for j in 0..n {
            for i in 0..inner {
                dx[(o * n + j) * inner + i] = dy[o * inner + i] * scale;
            }
        }
    }
    dx
}

pub(crate) fn max_bwd(x: &[f32], dy: &[f32], outer: usize, n: usize, inner: usize) -> Vec<f32> {
    let mut dx = zeroed(x.len());
    for o in 0..outer {
        for i in 0..inner {
            let j = line_argmax(x, o, n, inner, i);
            dx[(o * n + j) * inner + i] = dy[o * inner + i];
        }
    }
    dx
}

/// Top `k` of each row of width `n`, descending, ties to the lower index.
pub(crate) fn topk(x: &[f32], n: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
    let rows = x.len() / n;
    let (mut vals, mut idx) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for r in x.chunks(n) {
        order.clear();
        order.extend(0..n);
        // Stable sort keeps the lower index first among equal values.
        order.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
        for &j in &order[..k] {
            vals.push(r[j]);
            idx.push(j as u32);
        }
    }
    (vals, idx)
}
