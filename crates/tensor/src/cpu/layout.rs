//! Byte-level layout copies, the same for every dtype (elements are `es` bytes).

use super::PAR_MIN_ELEMS;
use rayon::prelude::*;

/// Permutes a row-major tensor of `dims` into `dst` so output dim `i` is input dim `perm[i]`. Trailing
/// axes that stay in place (e.g. `head_dim` when splitting heads) are copied as contiguous runs.
pub(crate) fn permute_bytes(src: &[u8], es: usize, dims: &[usize], perm: &[usize], dst: &mut [u8]) {
    let r = dims.len();
    // The longest suffix of axes that stay in place moves as one contiguous run.
    let kept = (0..r).rev().take_while(|&i| perm[i] == i).count();
    let run: usize = dims[r - kept..].iter().product::<usize>() * es;
    let outer_rank = r - kept;
    let mut in_strides = vec![1usize; r];
    for i in (0..r.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let out_dims: Vec<usize> = perm[..outer_rank].iter().map(|&p| dims[p]).collect();
    let strides: Vec<usize> = perm[..outer_rank].iter().map(|&p| in_strides[p] * es).collect();
    let runs: usize = out_dims.iter().product();
    debug_assert_eq!(dst.len(), runs * run);
    if run == 0 || runs == 0 {
        return;
    }
    // Blocks of whole runs (about 128 KiB), each starting from its own output multi-index, are
    // copied in parallel.
    let runs_per_block = ((PAR_MIN_ELEMS * 4) / run).max(1);
    dst.par_chunks_mut(run * runs_per_block).enumerate().for_each(|(b, block)| {
        let mut idx = vec![0usize; outer_rank];
        let mut rest = b * runs_per_block;
        for d in (0..outer_rank).rev() {
            idx[d] = rest % out_dims[d];
            rest /= out_dims[d];
        }
        for chunk in block.chunks_exact_mut(run) {
            let i: usize = idx.iter().zip(&strides).map(|(a, s)| a * s).sum();
            chunk.copy_from_slice(&src[i..i + run]);
            // Advance the output multi-index, last axis fastest.
            for d in (0..outer_rank).rev() {
                idx[d] += 1;
                if idx[d] < out_dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    });
}

/// For each of `outer` blocks, copies rows `src_off..src_off + len` of a `[src_n, inner_bytes]`
/// source block to rows `dst_off..` of a `[dst_n, inner_bytes]` destination block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_block(
    src: &[u8],
    dst: &mut [u8],
    outer: usize,
    src_n: usize,
    src_off: usize,
    dst_n: usize,
    dst_off: usize,
    len: usize,
    inner_bytes: usize,
) {
    let (block, bytes) = (dst_n * inner_bytes, len * inner_bytes);
    if block == 0 || bytes == 0 {
        return;
    }
    let min_blocks = (PAR_MIN_ELEMS * 4 / bytes).max(1);
    dst[..outer * block].par_chunks_mut(block).with_min_len(min_blocks).enumerate().for_each(|(o, d)| {
        let s = (o * src_n + src_off) * inner_bytes;
        d[dst_off * inner_bytes..][..bytes].copy_from_slice(&src[s..s + bytes]);
    });
}
