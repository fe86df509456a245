//! LayerNorm and RMSNorm over the last dim.

use super::{blocked_column_sums, column_sums, zeroed};
use crate::op_kinds::NormKind;
use rayon::prelude::*;

/// Returns `(y, mean, rstd)` for rows of width `d`.
pub(crate) fn layer_norm_fwd(
    x: &[f32],
    d: usize,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f32,
    kind: NormKind,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / d.max(1);
    let mut y = zeroed(x.len());
    let mut mean = vec![0.0f32; rows];
    let mut rstd = vec![0.0f32; rows];
    if d == 0 {
        return (y, mean, rstd);
    }
    y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((yr, xr), (m, r))| {
            let mu = match kind {
                NormKind::LayerNorm => xr.iter().sum::<f32>() / d as f32,
                NormKind::Rms => 0.0,
            };
            let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d as f32;
            let rs = 1.0 / (var + eps).sqrt();
            for (j, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
                let xhat = (xv - mu) * rs;
                *yv = xhat * w.map_or(1.0, |w| w[j]) + b.map_or(0.0, |b| b[j]);
            }
            *m = mu;
            *r = rs;
        },
    );
    (y, mean, rstd)
}

/// Returns `(dx, dweight, dbias)` (the latter two always computed, as `[d]`).
pub(crate) fn layer_norm_bwd(
    x: &[f32],
    d: usize,
    w: Option<&[f32]>,
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    kind: NormKind,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = zeroed(x.len());
    if d == 0 {
        return (dx, Vec::new(), Vec::new());
    }
    dx.par_chunks_mut(d).enumerate().for_each(|(i, dxr)| {
        let (xr, dyr) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
        let (mu, rs) = (mean[i], rstd[i]);
        let (mut g_mean, mut gx_mean) = (0.0f32, 0.0f32);
        for j in 0..d {
            let g = dyr[j] * w.map_or(1.0, |w| w[j]);
            g_mean += g;
            gx_mean += g * (xr[j] - mu) * rs;
        }
        g_mean /= d as f32;
        gx_mean /= d as f32;
        if kind == NormKind::Rms {
            g_mean = 0.0;
        }
        for j in 0..d {
            let g = dyr[j] * w.map_or(1.0, |w| w[j]);
            let xhat = (xr[j] - mu) * rs;
            dxr[j] = rs * (g - g_mean - xhat * gx_mean);
        }
    });
    // dweight and dbias as blocked column sums: the same bits on any thread count.
    let dw = blocked_column_sums(x.len() / d, d, |i, acc| {
        let (xr, dyr) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
        for j in 0..d {
            acc[j] += dyr[j] * (xr[j] - mean[i]) * rstd[i];
        }
    });
    let db = column_sums(dy, d);
    (dx, dw, db)
}
