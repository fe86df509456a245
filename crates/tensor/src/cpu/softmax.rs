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
    /// scores and the saved log-sum-exp (one row; the reference of `exp_scaled_shifted_rows`).
    #[cfg(test)]
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

multiversion! {
    /// Softmax of each `m`-long row of the block `s [rows, m]` after scaling it by `scale`, in
    /// place; writes each row's log-sum-exp (of the scaled row) to `lse [rows]`.
    ///
    /// The same IEEE operations in the same order as [`scale_row_max`], [`exp_shifted_sum`]
    /// and [`divide_row`] row by row (so the same bits), in one call per block, with the
    /// exponentials in one loop over the whole block (rows of 12 or 49 tokens are shorter than
    /// a few vectors). The split-heads attention uses it; the packed one, which the models use,
    /// has the faster column kernels below (docs/perf.md, session 21).
    pub(crate) fn scaled_softmax_rows(s: &mut [f32], m: usize, scale: f32, lse: &mut [f32]) {
        if m == 0 {
            return;
        }
        for (row, l) in s.chunks_mut(m).zip(lse.iter_mut()) {
            row.iter_mut().for_each(|v| *v *= scale);
            *l = vm::max(row);
            row.iter_mut().for_each(|v| *v -= *l);
        }
        s.iter_mut().for_each(|v| *v = vm::exp(*v));
        for (row, l) in s.chunks_mut(m).zip(lse.iter_mut()) {
            let sum = vm::sum(row);
            row.iter_mut().for_each(|v| *v /= sum);
            *l += sum.ln();
        }
    }
}

multiversion! {
    /// `p = e^{p · scale − lse_row}` for each `m`-long row of the block `p [rows, m]`, in place:
    /// attention's probabilities recomputed from the scores and the saved `lse [rows]`. The bits
    /// of `exp_scaled_shifted` row by row, with the exponentials in one loop over the block.
    pub(crate) fn exp_scaled_shifted_rows(p: &mut [f32], m: usize, scale: f32, lse: &[f32]) {
        if m == 0 {
            return;
        }
        for (row, &l) in p.chunks_mut(m).zip(lse) {
            row.iter_mut().for_each(|v| *v = *v * scale - l);
        }
        p.iter_mut().for_each(|v| *v = vm::exp(*v));
    }
}

/// Query columns of the transposed score blocks of attention ([`scaled_softmax_columns`]): a
/// whole number of 16-lane vectors per row.
pub(crate) const COLUMN_BLOCK: usize = 16;

multiversion! {
    /// Softmax down each column of the transposed scores `t [keys, width]` (query `q` in column
    /// `q`, `width` a multiple of [`COLUMN_BLOCK`]) after scaling them by `scale`, in place;
    /// `lse [width]` receives each column's log-sum-exp of the scaled scores, and `scratch
    /// [width]` is working space.
    ///
    /// The reductions run down the columns as vector operations across 16 queries at a time,
    /// and every row is whole vectors: a softmax along rows of 12 or 49 scores spent most of
    /// its time in horizontal reductions and remainder loops (docs/perf.md). The sum over keys
    /// is in key order; the probabilities are the exponentials times the reciprocal of the sum
    /// (one division per column instead of one per score).
    pub(crate) fn scaled_softmax_columns(t: &mut [f32], width: usize, scale: f32, lse: &mut [f32], scratch: &mut [f32]) {
        if width == 0 || t.is_empty() {
            return;
        }
        debug_assert_eq!(t.len() % width, 0, "a partial row of {width} columns");
        let (max, sum) = (lse, scratch);
        t.iter_mut().for_each(|v| *v *= scale);
        max.copy_from_slice(&t[..width]);
        for row in t[width..].chunks_exact(width) {
            max.iter_mut().zip(row).for_each(|(m, &v)| *m = vm::max_step(*m, v));
        }
        for row in t.chunks_exact_mut(width) {
            row.iter_mut().zip(max.iter()).for_each(|(v, &m)| *v = vm::exp(*v - m));
        }
        sum.copy_from_slice(&t[..width]);
        for row in t[width..].chunks_exact(width) {
            sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
        }
        for (m, s) in max.iter_mut().zip(sum.iter_mut()) {
            *m += s.ln();
            *s = 1.0 / *s;
        }
        for row in t.chunks_exact_mut(width) {
            row.iter_mut().zip(sum.iter()).for_each(|(v, &r)| *v *= r);
        }
    }
}

multiversion! {
    /// `t = e^{t · scale − lse[q]}` down each column `q` of the transposed scores
    /// `t [keys, width]`: attention's probabilities recomputed from the scores and the saved
    /// log-sum-exp `lse [width]` (the layout of [`scaled_softmax_columns`]).
    pub(crate) fn exp_scaled_shifted_columns(t: &mut [f32], width: usize, scale: f32, lse: &[f32]) {
        if width == 0 {
            return;
        }
        debug_assert_eq!(t.len() % width, 0, "a partial row of {width} columns");
        for row in t.chunks_exact_mut(width) {
            row.iter_mut().zip(lse).for_each(|(v, &l)| *v = vm::exp(*v * scale - l));
        }
    }
}

multiversion! {
    /// `ds = p ∘ (ds − δ[q]) · scale` down each column `q` of the transposed blocks
    /// `ds, p [keys, width]`: the softmax backward with the scale, `δ [width]` one per query.
    pub(crate) fn softmax_grad_columns(ds: &mut [f32], p: &[f32], delta: &[f32], width: usize, scale: f32) {
        if width == 0 {
            return;
        }
        debug_assert!(ds.len().is_multiple_of(width) && ds.len() == p.len(), "blocks of {} and {} for {width} columns", ds.len(), p.len());
        for (row, prow) in ds.chunks_exact_mut(width).zip(p.chunks_exact(width)) {
            row.iter_mut().zip(prow).zip(delta).for_each(|((x, &pij), &d)| *x = pij * (*x - d) * scale);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Rows of attention's lengths and around the vector widths, random scores of a few
    /// magnitudes (so some exponentials underflow), and the per-row functions as reference.
    #[test]
    fn block_softmax_gives_the_row_functions_bits() {
        let mut rng = crate::rng::Philox::new(7);
        for m in [1, 3, 4, 5, 8, 12, 15, 16, 17, 25, 49, 64, 197] {
            for magnitude in [0.1f32, 3.0, 40.0] {
                let rows = 1 + (rng.uniform_f32() * 20.0) as usize;
                let x: Vec<f32> = (0..rows * m).map(|_| (rng.uniform_f32() * 2.0 - 1.0) * magnitude).collect();
                let scale = 0.25f32;

                let (mut want, mut want_lse) = (x.clone(), vec![0.0f32; rows]);
                for (row, l) in want.chunks_mut(m).zip(want_lse.iter_mut()) {
                    let max = scale_row_max(row, scale);
                    let sum = exp_shifted_sum(row, max);
                    divide_row(row, sum);
                    *l = max + sum.ln();
                }
                let (mut got, mut got_lse) = (x.clone(), vec![0.0f32; rows]);
                scaled_softmax_rows(&mut got, m, scale, &mut got_lse);
                assert_eq!(bits(&got), bits(&want), "probabilities, m = {m}, magnitude {magnitude}");
                assert_eq!(bits(&got_lse), bits(&want_lse), "lse, m = {m}, magnitude {magnitude}");
                for row in got.chunks(m) {
                    let total: f32 = row.iter().sum();
                    assert!((total - 1.0).abs() < 1e-5, "a row sums to {total}");
                }

                let mut want_p = x.clone();
                for (row, &l) in want_p.chunks_mut(m).zip(&want_lse) {
                    exp_scaled_shifted(row, scale, l);
                }
                let mut got_p = x.clone();
                exp_scaled_shifted_rows(&mut got_p, m, scale, &want_lse);
                assert_eq!(bits(&got_p), bits(&want_p), "recomputed probabilities, m = {m}");
                for (a, b) in got_p.iter().zip(&got) {
                    assert!((a - b).abs() <= 1e-5, "recomputed {a} against the forward's {b}, m = {m}");
                }
            }
        }
    }

    /// The column kernels on transposed blocks against the row kernels on the blocks
    /// themselves: the same math, a different order of the sum and a reciprocal instead of a
    /// division, so agreement to a few ulp, not bits. Padding columns do not leak into others.
    #[test]
    fn column_softmax_matches_the_row_softmax_of_the_transpose() {
        let mut rng = crate::rng::Philox::new(11);
        for n in [1usize, 3, 12, 16, 17, 49] {
            let width = n.div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
            let scale = 0.3f32;
            // Rows are queries in `s`; `t` holds its transpose, with garbage in the padding.
            let s: Vec<f32> = (0..n * n).map(|_| (rng.uniform_f32() * 2.0 - 1.0) * 12.0).collect();
            let mut t = vec![f32::NAN; n * width];
            for q in 0..n {
                for k in 0..n {
                    t[k * width + q] = s[q * n + k];
                }
            }
            let (mut rows, mut row_lse) = (s.clone(), vec![0.0f32; n]);
            scaled_softmax_rows(&mut rows, n, scale, &mut row_lse);
            let (mut lse, mut scratch) = (vec![0.0f32; width], vec![0.0f32; width]);
            let scores = t.clone();
            scaled_softmax_columns(&mut t, width, scale, &mut lse, &mut scratch);
            for q in 0..n {
                assert!((lse[q] - row_lse[q]).abs() <= 1e-6 * (1.0 + row_lse[q].abs()), "lse[{q}], n = {n}");
                for k in 0..n {
                    let (got, want) = (t[k * width + q], rows[q * n + k]);
                    assert!(
                        (got - want).abs() <= 1e-6 * (want.abs() + 1e-30) + 1e-38,
                        "p[{q}, {k}] {got} vs {want}, n = {n}"
                    );
                }
            }
            // Recomputed from the scores and lse: the forward's probabilities.
            let mut p = scores.clone();
            exp_scaled_shifted_columns(&mut p, width, scale, &lse);
            for k in 0..n {
                for q in 0..n {
                    let (got, want) = (p[k * width + q], t[k * width + q]);
                    assert!((got - want).abs() <= 2e-6 * want.abs() + 1e-38, "recomputed p[{q}, {k}], n = {n}");
                }
            }
            // The backward against the row kernel.
            let dp: Vec<f32> = (0..n * width).map(|_| rng.uniform_f32() * 2.0 - 1.0).collect();
            let delta: Vec<f32> = (0..width).map(|_| rng.uniform_f32() - 0.5).collect();
            let mut ds = dp.clone();
            softmax_grad_columns(&mut ds, &p, &delta, width, scale);
            for q in 0..n {
                let mut row: Vec<f32> = (0..n).map(|k| dp[k * width + q]).collect();
                let prow: Vec<f32> = (0..n).map(|k| p[k * width + q]).collect();
                crate::cpu::attention::softmax_grad_row(&mut row, &prow, delta[q], scale);
                for k in 0..n {
                    assert_eq!(ds[k * width + q].to_bits(), row[k].to_bits(), "ds[{q}, {k}], n = {n}");
                }
            }
        }
    }

    /// A NaN score makes its own query's column NaN and no other.
    #[test]
    fn a_nan_stays_in_its_column() {
        let (n, width) = (5, COLUMN_BLOCK);
        let mut t: Vec<f32> = (0..n * width).map(|i| (i % 7) as f32 * 0.1).collect();
        t[2 * width + 3] = f32::NAN;
        let (mut lse, mut scratch) = (vec![0.0f32; width], vec![0.0f32; width]);
        scaled_softmax_columns(&mut t, width, 1.0, &mut lse, &mut scratch);
        for q in 0..n {
            assert_eq!(lse[q].is_nan(), q == 3, "lse[{q}]");
            for k in 0..n {
                assert_eq!(t[k * width + q].is_nan(), q == 3, "p[{q}, {k}]");
            }
        }
    }
}
