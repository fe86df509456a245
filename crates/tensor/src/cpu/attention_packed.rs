//! Self-attention read straight from a packed qkv projection `[batch, tokens, channels]` and
//! written with its heads merged, through strided GEMMs: no split, permute or merge copies
//! (those copies were 5% of a CPU training step at ViT-Ti widths, issue 15). The math is
//! `attention.rs`'s, one batch per rayon task and its heads in turn.

use super::attention::softmax_grad_row;
use super::matmul::{gemm_strided, gemm_strided_uninit, MatRef};
use super::softmax::{divide_row, exp_scaled_shifted, exp_shifted_sum, scale_row_max};
use super::uninit_vec;
use rayon::prelude::*;

/// Where the heads lie: `qkv [batch, tokens, channels]` holds q, k and v as three blocks of
/// `width = heads · head_dim` channels from channel `offset` on, each head-major.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PackedHeads {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
    pub offset: usize,
    pub width: usize,
    pub heads: usize,
}

impl PackedHeads {
    fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    /// Head `h` of block `i` (0 q, 1 k, 2 v) in one batch's `[tokens, channels]` rows.
    fn head<'a>(&self, rows: &'a [f32], i: usize, h: usize) -> MatRef<'a> {
        let start = self.offset + i * self.width + h * self.head_dim();
        MatRef::rows(&rows[start..], self.tokens, self.head_dim(), self.channels)
    }
}

/// Returns `o [batch, tokens, width]` (heads merged) and `lse [batch, heads, tokens]`.
pub(crate) fn attention_fwd_packed(qkv: &[f32], p: PackedHeads, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let (n, w, dh) = (p.tokens, p.width, p.head_dim());
    let mut lse = vec![0.0f32; p.batch * p.heads * n];
    if n == 0 || w == 0 {
        return (vec![0.0; p.batch * n * w], lse);
    }
    // SAFETY: the heads' products write every column block of every row of `o`.
    let o = unsafe {
        uninit_vec(p.batch * n * w, |o| {
            o.par_chunks_mut(n * w).zip(lse.par_chunks_mut(p.heads * n)).enumerate().for_each(|(b, (ob, lb))| {
                let x = &qkv[b * n * p.channels..(b + 1) * n * p.channels];
                let mut s = vec![0.0f32; n * n];
                for h in 0..p.heads {
                    gemm_strided(p.head(x, 0, h), p.head(x, 1, h).t(), &mut s, n, false, 1);
                    for (row, l) in s.chunks_mut(n).zip(&mut lb[h * n..(h + 1) * n]) {
                        let max = scale_row_max(row, scale);
                        let sum = exp_shifted_sum(row, max);
                        divide_row(row, sum);
                        *l = max + sum.ln();
                    }
                    gemm_strided_uninit(MatRef::rows(&s, n, n, n), p.head(x, 2, h), &mut ob[h * dh..], w, 1);
                }
            })
        })
    };
    (o, lse)
}

/// The gradient of [`attention_fwd_packed`] with respect to its q, k and v channels, one packed
/// `[batch, tokens, 3·width]` buffer, from the saved `o`, `lse` and the output gradient `d_o`.
pub(crate) fn attention_bwd_packed(
    qkv: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    p: PackedHeads,
    scale: f32,
) -> Vec<f32> {
    let (n, w, dh) = (p.tokens, p.width, p.head_dim());
    if n == 0 || w == 0 {
        return vec![0.0; p.batch * n * 3 * w];
    }
    // SAFETY: dq, dk and dv of every head cover every column of every row of `g`.
    unsafe {
        uninit_vec(p.batch * n * 3 * w, |g| {
            g.par_chunks_mut(n * 3 * w).enumerate().for_each(|(b, gb)| {
                let x = &qkv[b * n * p.channels..(b + 1) * n * p.channels];
                let (ob, dob) = (&o[b * n * w..(b + 1) * n * w], &d_o[b * n * w..(b + 1) * n * w]);
                let lb = &lse[b * p.heads * n..(b + 1) * p.heads * n];
                let (mut pm, mut ds) = (vec![0.0f32; n * n], vec![0.0f32; n * n]);
                for h in 0..p.heads {
                    let (q, k, v) = (p.head(x, 0, h), p.head(x, 1, h), p.head(x, 2, h));
                    let doh = MatRef::rows(&dob[h * dh..], n, dh, w);
                    // P = exp(scale·QKᵀ − lse), recomputed.
                    gemm_strided(q, k.t(), &mut pm, n, false, 1);
                    for (row, &l) in pm.chunks_mut(n).zip(&lb[h * n..(h + 1) * n]) {
                        exp_scaled_shifted(row, scale, l);
                    }
                    // dV = Pᵀ dO; dP = dO Vᵀ.
                    gemm_strided_uninit(MatRef::rows(&pm, n, n, n).t(), doh, &mut gb[2 * w + h * dh..], 3 * w, 1);
                    gemm_strided(doh, v.t(), &mut ds, n, false, 1);
                    // dS = P ∘ (dP − δ)·scale with δ_i = dO_i · O_i.
                    for i in 0..n {
                        let at = i * w + h * dh..i * w + (h + 1) * dh;
                        let delta: f32 = dob[at.clone()].iter().zip(&ob[at]).map(|(a, b)| a * b).sum();
                        softmax_grad_row(&mut ds[i * n..(i + 1) * n], &pm[i * n..(i + 1) * n], delta, scale);
                    }
                    // dQ = dS K; dK = dSᵀ Q.
                    let dsm = MatRef::rows(&ds, n, n, n);
                    gemm_strided_uninit(dsm, k, &mut gb[h * dh..], 3 * w, 1);
                    gemm_strided_uninit(dsm.t(), q, &mut gb[w + h * dh..], 3 * w, 1);
                }
            })
        })
    }
}
