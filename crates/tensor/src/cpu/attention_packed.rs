//! Self-attention read straight from a packed qkv projection `[batch, tokens, channels]` and
//! written with its heads merged, through strided GEMMs: no split, permute or merge copies
//! (those copies were 5% of a CPU training step at ViT-Ti widths, issue 15). The math is
//! `attention.rs`'s, one batch per rayon task and its heads in turn, with the scores kept
//! transposed, `[keys, queries]`, and each row padded to whole vectors, so that the softmax
//! runs down the columns in vector operations across queries (`softmax::scaled_softmax_columns`).
//! The padding columns hold values that nothing reads.

use super::matmul::{gemm_strided, gemm_strided_uninit, MatRef};
use super::softmax::{exp_scaled_shifted_columns, scaled_softmax_columns, softmax_grad_columns, COLUMN_BLOCK};
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
                let np = n.div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
                // Sᵀ [keys, queries] with rows np apart; lse and sums of the padded columns.
                let (mut st, mut l, mut scratch) = (vec![0.0f32; n * np], vec![0.0f32; np], vec![0.0f32; np]);
                for h in 0..p.heads {
                    gemm_strided(p.head(x, 1, h), p.head(x, 0, h).t(), &mut st, np, false, 1);
                    scaled_softmax_columns(&mut st, np, scale, &mut l, &mut scratch);
                    lb[h * n..(h + 1) * n].copy_from_slice(&l[..n]);
                    // O = P V = (Pᵀ)ᵀ V.
                    gemm_strided_uninit(MatRef::rows(&st, n, n, np).t(), p.head(x, 2, h), &mut ob[h * dh..], w, 1);
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
                let np = n.div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
                // Pᵀ and dSᵀ [keys, queries] with rows np apart; lse and δ of the padded columns.
                let (mut pt, mut dst) = (vec![0.0f32; n * np], vec![0.0f32; n * np]);
                let (mut l, mut delta) = (vec![0.0f32; np], vec![0.0f32; np]);
                for h in 0..p.heads {
                    let (q, k, v) = (p.head(x, 0, h), p.head(x, 1, h), p.head(x, 2, h));
                    let doh = MatRef::rows(&dob[h * dh..], n, dh, w);
                    // Pᵀ = exp(scale·K Qᵀ − lse), recomputed.
                    gemm_strided(k, q.t(), &mut pt, np, false, 1);
                    l[..n].copy_from_slice(&lb[h * n..(h + 1) * n]);
                    exp_scaled_shifted_columns(&mut pt, np, scale, &l);
                    let ptm = MatRef::rows(&pt, n, n, np);
                    // dV = Pᵀ dO; dPᵀ = V dOᵀ.
                    gemm_strided_uninit(ptm, doh, &mut gb[2 * w + h * dh..], 3 * w, 1);
                    gemm_strided(v, doh.t(), &mut dst, np, false, 1);
                    // dSᵀ = Pᵀ ∘ (dPᵀ − δ)·scale with δ_i = dO_i · O_i, one per query column.
                    for (i, d) in delta[..n].iter_mut().enumerate() {
                        let at = i * w + h * dh..i * w + (h + 1) * dh;
                        *d = dob[at.clone()].iter().zip(&ob[at]).map(|(a, b)| a * b).sum();
                    }
                    softmax_grad_columns(&mut dst, &pt, &delta, np, scale);
                    // dQ = dS K = (dSᵀ)ᵀ K; dK = dSᵀ Q.
                    let dstm = MatRef::rows(&dst, n, n, np);
                    gemm_strided_uninit(dstm.t(), k, &mut gb[h * dh..], 3 * w, 1);
                    gemm_strided_uninit(dstm, q, &mut gb[w + h * dh..], 3 * w, 1);
                }
            })
        })
    }
}
