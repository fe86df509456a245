//! Reference multi-head attention on `[batch·heads, tokens, head_dim]` slabs.

use super::softmax::{logsumexp, softmax_row};
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
    let mut o = vec![0.0f32; bh * n * d];
    let mut lse = vec![0.0f32; bh * n];
    o.par_chunks_mut(n * d).zip(lse.par_chunks_mut(n)).enumerate().for_each(|(h, (oh, lh))| {
        let (qh, kh, vh) = (&q[h * n * d..], &k[h * m * d..], &v[h * m * d..]);
        let mut s = vec![0.0f32; m];
        let mut p = vec![0.0f32; m];
        for i in 0..n {
            let qi = &qh[i * d..(i + 1) * d];
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = scale * qi.iter().zip(&kh[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f32>();
            }
            lh[i] = logsumexp(&s);
            softmax_row(&s, &mut p);
            let oi = &mut oh[i * d..(i + 1) * d];
            for (j, &pj) in p.iter().enumerate() {
                oi.iter_mut().zip(&vh[j * d..(j + 1) * d]).for_each(|(ov, &vv)| *ov += pj * vv);
            }
        }
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
    let mut dq = vec![0.0f32; bh * n * d];
    let mut dk = vec![0.0f32; bh * m * d];
    let mut dv = vec![0.0f32; bh * m * d];
    dq.par_chunks_mut(n * d).zip(dk.par_chunks_mut(m * d).zip(dv.par_chunks_mut(m * d))).enumerate().for_each(
        |(h, (dqh, (dkh, dvh)))| {
            let (qh, kh, vh) = (&q[h * n * d..], &k[h * m * d..], &v[h * m * d..]);
            let (oh, doh, lh) = (&o[h * n * d..], &d_o[h * n * d..], &lse[h * n..]);
            let mut p = vec![0.0f32; m];
            for i in 0..n {
                let (qi, oi, doi) = (&qh[i * d..(i + 1) * d], &oh[i * d..(i + 1) * d], &doh[i * d..(i + 1) * d]);
                let delta: f32 = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
                for (j, pj) in p.iter_mut().enumerate() {
                    let s = scale * qi.iter().zip(&kh[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f32>();
                    *pj = (s - lh[i]).exp();
                }
                for (j, &pj) in p.iter().enumerate() {
                    let (kj, vj) = (&kh[j * d..(j + 1) * d], &vh[j * d..(j + 1) * d]);
                    let dp: f32 = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                    let ds = pj * (dp - delta);
                    dvh[j * d..(j + 1) * d].iter_mut().zip(doi).for_each(|(a, &g)| *a += pj * g);
                    dqh[i * d..(i + 1) * d].iter_mut().zip(kj).for_each(|(a, &kv)| *a += scale * ds * kv);
                    dkh[j * d..(j + 1) * d].iter_mut().zip(qi).for_each(|(a, &qv)| *a += scale * ds * qv);
                }
            }
        },
    );
    (dq, dk, dv)
}
