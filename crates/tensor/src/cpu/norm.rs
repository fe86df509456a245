//! LayerNorm and RMSNorm over the last dim: vectorised row kernels (`multiversion!`), the
//! backward in one pass over the rows that also sums the weight and bias gradients.

use super::multiversion::multiversion;
use super::vector_math as vm;
use super::{uninit_vec, PAR_MIN_ELEMS};
use crate::op_kinds::NormKind;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per rayon task: the block size of the deterministic column sums (`blocked_column_sums`).
fn block_rows(d: usize) -> usize {
    (PAR_MIN_ELEMS / d).max(1)
}

multiversion! {
    /// Normalises the rows of `x [rows, d]` into `y`, writing each row's mean and 1/std.
    #[allow(clippy::too_many_arguments)]
    fn norm_fwd_rows(x: &[f32], y: &mut [MaybeUninit<f32>], mean: &mut [f32], rstd: &mut [f32], w: &[f32], b: &[f32], eps: f32, rms: bool) {
        let d = w.len();
        let mut centred = vec![0.0f32; d];
        for (((xr, yr), m), r) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
            let mu = if rms { 0.0 } else { vm::sum(xr) / d as f32 };
            centred.iter_mut().zip(xr).for_each(|(c, &v)| *c = (v - mu) * (v - mu));
            let rs = 1.0 / (vm::sum(&centred) / d as f32 + eps).sqrt();
            for (((yv, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                yv.write((xv - mu) * rs * wv + bv);
            }
            *m = mu;
            *r = rs;
        }
    }
}

multiversion! {
    /// The backward of [`norm_fwd_rows`] for a block of rows: `dx`, and the block's weight and
    /// bias gradients added into `dw` and `db`.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd_rows(
        x: &[f32],
        dy: &[f32],
        dx: &mut [MaybeUninit<f32>],
        mean: &[f32],
        rstd: &[f32],
        w: &[f32],
        rms: bool,
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let d = w.len();
        let (mut g, mut xhat, mut gx) = (vec![0.0f32; d], vec![0.0f32; d], vec![0.0f32; d]);
        // Every slice cut to `d` elements, so the loops below have no bounds checks and
        // vectorise (indexed loops over slices of unknown lengths stayed partly scalar).
        let (g, xhat, gx) = (&mut g[..d], &mut xhat[..d], &mut gx[..d]);
        let (w, dw, db) = (&w[..d], &mut dw[..d], &mut db[..d]);
        for (((xr, dyr), dxr), (&mu, &rs)) in
            x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(mean.iter().zip(rstd))
        {
            let (xr, dyr, dxr) = (&xr[..d], &dyr[..d], &mut dxr[..d]);
            for j in 0..d {
                g[j] = dyr[j] * w[j];
                xhat[j] = (xr[j] - mu) * rs;
                gx[j] = g[j] * xhat[j];
                dw[j] += dyr[j] * xhat[j];
                db[j] += dyr[j];
            }
            let g_mean = if rms { 0.0 } else { vm::sum(g) / d as f32 };
            let gx_mean = vm::sum(gx) / d as f32;
            for j in 0..d {
                dxr[j].write(rs * (g[j] - g_mean - xhat[j] * gx_mean));
            }
        }
    }
}

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
    let mut mean = vec![0.0f32; rows];
    let mut rstd = vec![0.0f32; rows];
    if d == 0 {
        return (vec![0.0; x.len()], mean, rstd);
    }
    let (ones, zeros) = (vec![1.0f32; d], vec![0.0f32; d]);
    let (w, b) = (w.unwrap_or(&ones), b.unwrap_or(&zeros));
    let br = block_rows(d);
    // SAFETY: the row blocks cover `y` and the kernel writes every element of each row.
    let y = unsafe {
        uninit_vec(x.len(), |y| {
            y.par_chunks_mut(br * d)
                .zip(x.par_chunks(br * d))
                .zip(mean.par_chunks_mut(br).zip(rstd.par_chunks_mut(br)))
                .for_each(|((yb, xb), (mb, rb))| norm_fwd_rows(xb, yb, mb, rb, w, b, eps, kind == NormKind::Rms))
        })
    };
    (y, mean, rstd)
}

/// Returns `(dx, dweight, dbias)` (the latter two always computed, as `[d]`). The weight and
/// bias gradients are summed per fixed block of rows and the blocks added in order: the same
/// bits on any thread count.
pub(crate) fn layer_norm_bwd(
    x: &[f32],
    d: usize,
    w: Option<&[f32]>,
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    kind: NormKind,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if d == 0 {
        return (vec![0.0; x.len()], Vec::new(), Vec::new());
    }
    let ones = vec![1.0f32; d];
    let w = w.unwrap_or(&ones);
    let br = block_rows(d);
    let mut partials: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    // SAFETY: the row blocks cover `dx` and the kernel writes every element of each row.
    let dx = unsafe {
        uninit_vec(x.len(), |dx| {
            partials = dx
                .par_chunks_mut(br * d)
                .enumerate()
                .map(|(i, dxb)| {
                    let rows = i * br..i * br + dxb.len() / d;
                    let span = rows.start * d..rows.end * d;
                    let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
                    let (mb, rb) = (&mean[rows.clone()], &rstd[rows]);
                    norm_bwd_rows(&x[span.clone()], &dy[span], dxb, mb, rb, w, kind == NormKind::Rms, &mut dw, &mut db);
                    (dw, db)
                })
                .collect()
        })
    };
    let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pw, pb) in &partials {
        dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
    }
    (dx, dw, db)
}
