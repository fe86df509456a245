//! Softmax and the cross-entropy losses, row by row.

use super::multiversion::multiversion;
use super::vector_math as vm;
use super::zeroed;
use rayon::prelude::*;

multiversion! {
    /// `row = row · scale` in place; returns the largest scaled element.
    pub(crate) fn scale_row_max(row: &mut [f32], scale: f32) -> f32 {
        row.iter_mut().for_each(|v| *v *= scale);
        vm::max(row)
    }
}

multiversion! {
    /// `row = e^{row − shift}` in place (vectorised exp); returns the row's sum.
    pub(crate) fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
        row.iter_mut().for_each(|v| *v = vm::exp(*v - shift));
        vm::sum(row)
    }
}

multiversion! {
    /// `row = e^{row · scale − shift}` in place: attention's probabilities recomputed from the
    /// scores and the saved log-sum-exp.
    pub(crate) fn exp_scaled_shifted(row: &mut [f32], scale: f32, shift: f32) {
        row.iter_mut().for_each(|v| *v = vm::exp(*v * scale - shift));
    }
}

multiversion! {
    /// `row = row / sum` in place.
    pub(crate) fn divide_row(row: &mut [f32], sum: f32) {
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

/// Numerically stable softmax of one row into `out`.
pub(crate) fn softmax_row(x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    let max = scale_row_max(out, 1.0);
    let sum = exp_shifted_sum(out, max);
    divide_row(out, sum);
}

/// `log Σ exp(x)` of one row.
pub(crate) fn logsumexp(x: &[f32]) -> f32 {
    let max = vm::max(x);
    max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

pub(crate) fn softmax_fwd(x: &[f32], n: usize) -> Vec<f32> {
    let mut y = zeroed(x.len());
    if n > 0 {
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(yr, xr)| softmax_row(xr, yr));
    }
    y
}

pub(crate) fn softmax_bwd(y: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    let mut dx = zeroed(y.len());
    if n > 0 {
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(dxr, (yr, dyr))| {
            let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
            for ((d, &yv), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
                *d = yv * (g - dot);
            }
        });
    }
    dx
}

pub(crate) fn softmax_xent_fwd(z: &[f32], t: &[f32], k: usize) -> Vec<f32> {
    z.par_chunks(k)
        .zip(t.par_chunks(k))
        .map(|(zr, tr)| {
            let lse = logsumexp(zr);
            -zr.iter().zip(tr).map(|(&zv, &tv)| if tv == 0.0 { 0.0 } else { tv * (zv - lse) }).sum::<f32>()
        })
        .collect()
}

pub(crate) fn softmax_xent_bwd(z: &[f32], t: &[f32], dloss: &[f32], k: usize) -> Vec<f32> {
    let mut dz = zeroed(z.len());
    dz.par_chunks_mut(k).enumerate().for_each(|(i, dr)| {
        let (zr, tr) = (&z[i * k..(i + 1) * k], &t[i * k..(i + 1) * k]);
        softmax_row(zr, dr);
        let tsum: f32 = tr.iter().sum();
        for (d, &tv) in dr.iter_mut().zip(tr) {
            *d = dloss[i] * (*d * tsum - tv);
        }
    });
    dz
}

pub(crate) fn sigmoid_xent_fwd(z: &[f32], t: &[f32], k: usize) -> Vec<f32> {
    z.par_chunks(k)
        .zip(t.par_chunks(k))
        .map(|(zr, tr)| zr.iter().zip(tr).map(|(&zv, &tv)| zv.max(0.0) - zv * tv + (-zv.abs()).exp().ln_1p()).sum())
        .collect()
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(crate) fn sigmoid_xent_bwd(z: &[f32], t: &[f32], dloss: &[f32], k: usize) -> Vec<f32> {
    z.iter().zip(t).enumerate().map(|(j, (&zv, &tv))| dloss[j / k] * (sigmoid(zv) - tv)).collect()
}
