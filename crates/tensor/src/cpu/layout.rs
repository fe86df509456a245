//! Byte-level layout copies, the same for every dtype (elements are `es` bytes).

/// Permutes a row-major tensor of `dims` so output dim `i` is input dim `perm[i]`. Trailing
/// axes that stay in place (e.g. `head_dim` when splitting heads) are copied as contiguous runs.
pub(crate) fn permute_bytes(src: &[u8], es: usize, dims: &[usize], perm: &[usize]) -> Vec<u8> {
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
    let mut dst = vec![0u8; runs * run];
    let mut idx = vec![0usize; outer_rank];
    for chunk in dst.chunks_exact_mut(run.max(1)).take(runs) {
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
    dst
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
    for o in 0..outer {
        let s = (o * src_n + src_off) * inner_bytes;
        let d = (o * dst_n + dst_off) * inner_bytes;
        dst[d..d + len * inner_bytes].copy_from_slice(&src[s..s + len * inner_bytes]);
    }
}
