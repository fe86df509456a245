//! Multi-head attention on `[batch·heads, tokens, head_dim]` slabs: per slab the scores
//! `S = scale·QKᵀ` and the products with V are GEMMs (the `gemm` crate, one thread per slab,
//! rayon across slabs); softmax and the score gradient are row loops. Exact f32 math, no N×N
//! matrix kept between forward and backward (backward recomputes it from `lse`).

use super::multiversion::multiversion;
use super::softmax::{exp_scaled_shifted_rows, scaled_softmax_rows};
use super::{matmul::gemm_f32, zeroed};
use rayon::prelude::*;

/// Returns `(o [bh, n, d], lse [bh, n])` for `q [bh, n, d]`, `k, v [bh, m, d]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut o = zeroed(bh * n * d);
    let mut lse = vec![0.0f32; bh * n];
    if n * d == 0 {
        return (o, lse);
    }
    o.par_chunks_mut(n * d).zip(lse.par_chunks_mut(n)).enumerate().for_each(|(h, (oh, lh))| {
        let (qh, kh, vh) =
            (&q[h * n * d..(h + 1) * n * d], &k[h * m * d..(h + 1) * m * d], &v[h * m * d..(h + 1) * m * d]);
        let mut s = vec![0.0f32; n * m];
        gemm_f32(qh, kh, &mut s, n, m, d, false, true, 1);
        scaled_softmax_rows(&mut s, m, scale, lh);
        gemm_f32(&s, vh, oh, n, d, m, false, false, 1);
    });
    (o, lse)
}

/// Returns `(dq, dk, dv)`; see `ops::attention_bwd` for the formulas.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq = zeroed(bh * n * d);
    let mut dk = zeroed(bh * m * d);
    let mut dv = zeroed(bh * m * d);
    if n * d == 0 || m == 0 {
        return (dq, dk, dv);
    }
    dq.par_chunks_mut(n * d).zip(dk.par_chunks_mut(m * d).zip(dv.par_chunks_mut(m * d))).enumerate().for_each(
        |(h, (dqh, (dkh, dvh)))| {
            let slab = |rows: usize| h * rows * d..(h + 1) * rows * d;
            let (qh, kh, vh) = (&q[slab(n)], &k[slab(m)], &v[slab(m)]);
            let (oh, doh, lh) = (&o[slab(n)], &d_o[slab(n)], &lse[h * n..(h + 1) * n]);
            // P = exp(scale·QKᵀ − lse), recomputed.
            let mut p = vec![0.0f32; n * m];
            gemm_f32(qh, kh, &mut p, n, m, d, false, true, 1);
            exp_scaled_shifted_rows(&mut p, m, scale, lh);
            // dV = Pᵀ dO; dP = dO Vᵀ.
            gemm_f32(&p, doh, dvh, m, d, n, true, false, 1);
            let mut ds = vec![0.0f32; n * m];
            gemm_f32(doh, vh, &mut ds, n, m, d, false, true, 1);
            // dS = P ∘ (dP − δ)·scale with δ_i = dO_i · O_i (the softmax backward, folded with the scale).
            for i in 0..n {
                let delta: f32 = doh[i * d..(i + 1) * d].iter().zip(&oh[i * d..(i + 1) * d]).map(|(a, b)| a * b).sum();
                softmax_grad_row(&mut ds[i * m..(i + 1) * m], &p[i * m..(i + 1) * m], delta, scale);
            }
            // dQ = dS K; dK = dSᵀ Q.
            gemm_f32(&ds, kh, dqh, n, d, m, false, false, 1);
            gemm_f32(&ds, qh, dkh, m, d, n, true, false, 1);
        },
    );
    (dq, dk, dv)
}

multiversion! {
    /// `dp = p ∘ (dp − δ) · scale` in place: one row of the softmax backward with the scale.
    pub(crate) fn softmax_grad_row(dp: &mut [f32], p: &[f32], delta: f32, scale: f32) {
        dp.iter_mut().zip(p).for_each(|(x, &pij)| *x = pij * (*x - delta) * scale);
    }
}
