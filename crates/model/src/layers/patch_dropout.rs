//! PatchDropout (Liu et al. 2022, "PatchDropout: Economizing Vision Transformers Using Patch
//! Dropout"; timm's `patch_drop_rate`): in training, each image keeps a random subset of its
//! patch tokens after the position embedding is added, so every block runs on fewer tokens
//! (and the patch projection too: [`kept_patch_rows`]).
//! The step costs less (the token-wise matmuls scale with the tokens kept, attention with their
//! square) and the model sees a new partial view of each image every time. Evaluation runs on
//! every token. The class token, when there is one, is always kept.

use super::moe::mix_seed;
use crate::{ModelError, Result};
use vit_tensor::{
    ops::{self, RowIndex},
    Device, Tensor,
};

/// What a training pass drops: each image keeps `keep` of its patch tokens. Image `i` of the
/// pass draws from stream `first_image + i` of `seed`, so what an image keeps does not depend
/// on how its batch is split into micro-batches or over data-parallel ranks (give each pass
/// the global index of its first image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchDrop {
    /// Patch tokens kept per image (the class token is kept besides).
    pub keep: usize,
    /// The step's seed.
    pub seed: u64,
    /// The global index of the pass's first image.
    pub first_image: u64,
}

/// Which tokens of a batch a pass keeps: the rows of `[B·N, D]` it gathered, and `N`.
#[derive(Debug, Clone)]
pub struct KeptTokens {
    /// `[B·K]` into the `B·N` tokens: for image b, its K kept tokens as rows `b·N + j` (j
    /// ascending).
    rows: RowIndex,
    /// Tokens per image before dropping (N).
    tokens: usize,
}

/// For each of `batch` images of `tokens` tokens, the first `prefix` tokens (the class token)
/// and `drop.keep` of the other `tokens − prefix`, chosen uniformly without replacement and
/// sorted: the rows `b·tokens + j` of the flattened `[batch·tokens, D]` activations.
pub fn kept_rows(batch: usize, tokens: usize, prefix: usize, drop: &PatchDrop) -> Vec<i32> {
    let (patches, keep) = (tokens - prefix, drop.keep);
    let mut out = Vec::with_capacity(batch * (prefix + keep));
    let mut order: Vec<usize> = Vec::with_capacity(patches);
    for b in 0..batch {
        // A partial Fisher-Yates shuffle driven by splitmix64 draws.
        order.clear();
        order.extend(0..patches);
        let mut state = mix_seed(drop.seed, drop.first_image + b as u64);
        for i in 0..keep {
            state = mix_seed(state, i as u64);
            // Multiply-shift of the high 32 bits: uniform on 0..patches − i up to 2^−32 · n.
            let j = i + (((state >> 32) * (patches - i) as u64) >> 32) as usize;
            order.swap(i, j);
        }
        let chosen = &mut order[..keep];
        chosen.sort_unstable();
        let base = b * tokens;
        out.extend((0..prefix).map(|j| (base + j) as i32));
        out.extend(chosen.iter().map(|&j| (base + prefix + j) as i32));
    }
    out
}

/// How many of `patches` patch tokens a drop rate of `rate` keeps: `round((1 − rate)·patches)`,
/// at least one.
pub fn tokens_kept(patches: usize, rate: f64) -> usize {
    (((1.0 - rate) * patches as f64).round() as usize).clamp(1, patches)
}

/// The rows of the patches that `drop` keeps among `batch` images of `patches` patches each,
/// as an index into their `[batch · patches]` rows on `device`: the same patches that
/// [`drop_tokens`] keeps of those images' tokens, whatever their prefix. The patch embedding
/// projects only these ([`crate::layers::Embedding::forward_kept`]).
pub fn kept_patch_rows(batch: usize, patches: usize, drop: &PatchDrop, device: Device) -> Result<RowIndex> {
    check_keep(patches, drop.keep)?;
    Ok(RowIndex::from_host(kept_rows(batch, patches, 0, drop), batch * patches, device)?)
}

/// `keep` must be in `1..=patches`.
fn check_keep(patches: usize, keep: usize) -> Result<()> {
    if keep == 0 || keep > patches {
        return Err(ModelError::InvalidConfig {
            field: "patch dropout: tokens kept",
            value: format!("{keep} of the {patches} patch tokens"),
            expected: format!("1..={patches}"),
        });
    }
    Ok(())
}

/// Keeps `drop.keep` patch tokens of each image of `x` `[B, N, D]` (and the first `prefix`):
/// returns `[B, prefix + keep, D]` and what [`restore`] needs.
pub fn drop_tokens(x: &Tensor, prefix: usize, drop: &PatchDrop) -> Result<(Tensor, KeptTokens)> {
    let keep = drop.keep;
    let dims = x.dims().to_vec();
    let [b, n, d] = dims[..] else {
        return Err(shape_error(format!("expected tokens [B, N, D], got {}", x.shape())));
    };
    check_keep(n.saturating_sub(prefix), keep)?;
    let rows = kept_rows(b, n, prefix, drop);
    let rows = RowIndex::from_host(rows, b * n, x.device())?;
    let kept = ops::gather_rows(&x.reshape([b * n, d])?, &rows)?.reshape([b, prefix + keep, d])?;
    Ok((kept, KeptTokens { rows, tokens: n }))
}

/// Backward of [`drop_tokens`]: the gradient `[B, K, D]` of the kept tokens scattered back to
/// `[B, N, D]`, zero at the dropped ones.
pub fn restore(dkept: &Tensor, kept: &KeptTokens) -> Result<Tensor> {
    let [b, k, d] = dkept.dims()[..] else {
        return Err(shape_error(format!("expected the kept tokens' gradient [B, K, D], got {}", dkept.shape())));
    };
    let full = ops::scatter_add_rows(&dkept.reshape([b * k, d])?, &kept.rows)?;
    Ok(full.reshape([b, kept.tokens, d])?)
}

fn shape_error(msg: String) -> ModelError {
    vit_tensor::Error::Shape { op: "patch_dropout", msg }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pd(keep: usize, seed: u64, first_image: u64) -> PatchDrop {
        PatchDrop { keep, seed, first_image }
    }

    #[test]
    fn each_image_keeps_its_prefix_and_distinct_ascending_patches() {
        let rows = kept_rows(5, 17, 1, &pd(6, 42, 0));
        assert_eq!(rows.len(), 5 * 7);
        for (b, r) in rows.chunks(7).enumerate() {
            let base = (b * 17) as i32;
            assert_eq!(r[0], base, "the class token first");
            assert!(r.windows(2).all(|w| w[0] < w[1]), "ascending and distinct: {r:?}");
            assert!(r.iter().all(|&i| i >= base && i < base + 17), "inside image {b}: {r:?}");
        }
        // Images get different subsets, the same seed the same ones, another seed others.
        let sets: Vec<&[i32]> = rows.chunks(7).collect();
        let shifted: Vec<Vec<i32>> =
            sets.iter().enumerate().map(|(b, r)| r.iter().map(|&i| i - 17 * b as i32).collect()).collect();
        assert!(shifted.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(kept_rows(5, 17, 1, &pd(6, 42, 0)), rows);
        assert_ne!(kept_rows(5, 17, 1, &pd(6, 43, 0)), rows);
        // Split in two passes (the second starting at image 2), the images keep the same tokens.
        assert_eq!(kept_rows(2, 17, 1, &pd(6, 42, 0)), rows[..14]);
        let rest: Vec<i32> = kept_rows(3, 17, 1, &pd(6, 42, 2)).iter().map(|&i| i + 2 * 17).collect();
        assert_eq!(rest, rows[14..]);
    }

    #[test]
    fn every_patch_is_about_equally_likely() {
        let (n, keep, images) = (10, 3, 20_000);
        let mut counts = vec![0usize; n];
        for r in kept_rows(images, n, 0, &pd(keep, 7, 0)) {
            counts[r as usize % n] += 1;
        }
        let expected = (images * keep) as f64 / n as f64;
        for (j, &c) in counts.iter().enumerate() {
            assert!((c as f64 - expected).abs() < 0.05 * expected, "patch {j}: {c} of ~{expected}");
        }
    }

    #[test]
    fn the_kept_count_rounds_and_stays_in_range() {
        assert_eq!(tokens_kept(49, 0.5), 25);
        assert_eq!(tokens_kept(49, 0.0), 49);
        assert_eq!(tokens_kept(49, 0.99), 1);
        assert_eq!(tokens_kept(196, 0.25), 147);
    }

    #[test]
    fn drop_then_restore_moves_the_kept_rows_and_zeros_the_rest() {
        let (b, n, d) = (3, 6, 4);
        let v: Vec<f32> = (0..b * n * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(v.clone(), [b, n, d], Device::Cpu).unwrap();
        let (kept, k) = drop_tokens(&x, 1, &pd(2, 9, 0)).unwrap();
        assert_eq!(kept.dims(), [b, 3, d]);
        let rows = kept_rows(b, n, 1, &pd(2, 9, 0));
        let got = kept.to_f32_vec().unwrap();
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(got[i * d..][..d], v[r as usize * d..][..d]);
        }
        // restore is the adjoint: <drop(x), y> = <x, restore(y)>.
        let y: Vec<f32> = (0..b * 3 * d).map(|i| (i as f32 * 0.71).cos()).collect();
        let back = restore(&Tensor::from_vec(y.clone(), [b, 3, d], Device::Cpu).unwrap(), &k).unwrap();
        assert_eq!(back.dims(), [b, n, d]);
        let lhs: f64 = got.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = v.iter().zip(back.to_f32_vec().unwrap()).map(|(a, b)| (a * b) as f64).sum();
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
        let zero_rows = back.to_f32_vec().unwrap().chunks(d).filter(|r| r.iter().all(|&x| x == 0.0)).count();
        assert_eq!(zero_rows, b * (n - 3));
    }

    #[test]
    fn keeping_nothing_or_more_than_there_is_is_an_error() {
        let x = Tensor::from_vec(vec![0.5f32; 2 * 5 * 3], [2, 5, 3], Device::Cpu).unwrap();
        for keep in [0, 5] {
            let e = drop_tokens(&x, 1, &pd(keep, 0, 0)).unwrap_err().to_string();
            assert!(e.contains(&format!("{keep} of the 4 patch tokens: expected 1..=4")), "{e}");
        }
    }
}
