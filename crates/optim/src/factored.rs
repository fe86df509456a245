//! The factored second moment of Adafactor as optax's `scale_by_factored_rms` computes it
//! (reference §3), on host f32 slices of any rank, of a whole parameter or of one rank's part
//! of a parameter split over a tensor-parallel group ([`factored_update_sharded`]).

use crate::OptimError;

/// The two axes a factored second moment reduces over: optax's `_factored_dims`, which
/// returns `(d1, d0)` = (second-largest axis, largest axis).
///
/// `v_row` has the parameter's shape without axis `d0` (it is the mean of g² over `d0`) and
/// `v_col` the shape without axis `d1` (the mean over `d1`). For a `[out, in]` kernel with
/// `out > in`, `d0 = 0`: `v_row` has `in` entries and `v_col` has `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactoredDims {
    /// The largest axis.
    pub d0: usize,
    /// The second-largest axis.
    pub d1: usize,
}

impl FactoredDims {
    /// Shape of `v_row`: `dims` without axis `d0`.
    pub fn row_shape(&self, dims: &[usize]) -> Vec<usize> {
        without(dims, self.d0)
    }

    /// Shape of `v_col`: `dims` without axis `d1`.
    pub fn col_shape(&self, dims: &[usize]) -> Vec<usize> {
        without(dims, self.d1)
    }
}

fn without(dims: &[usize], axis: usize) -> Vec<usize> {
    dims.iter().enumerate().filter(|&(a, _)| a != axis).map(|(_, &d)| d).collect()
}

/// Whether (and over which axes) to factor the second moment of a parameter of shape `dims`:
/// `None` for rank < 2 or when the second-largest dim is below `min_dim_size_to_factor`.
///
/// The axes are chosen as optax does: `np.argsort(shape)` (ascending), `d0` = the last entry
/// (largest dim), `d1` = the one before (second largest). numpy's default argsort is stable for
/// arrays this short (insertion sort under 16 elements), so **among equal dims the one with the
/// higher axis index counts as larger**: `[64, 64]` gives `d0 = 1, d1 = 0`, and `[40, 8, 40]`
/// gives `d0 = 2, d1 = 0`. This uses a stable sort to do the same.
pub fn factored_dims(dims: &[usize], min_dim_size_to_factor: usize) -> Option<FactoredDims> {
    if dims.len() < 2 {
        return None;
    }
    let mut order: Vec<usize> = (0..dims.len()).collect();
    order.sort_by_key(|&a| dims[a]); // stable
    let (d1, d0) = (order[dims.len() - 2], order[dims.len() - 1]);
    (dims[d1] >= min_dim_size_to_factor).then_some(FactoredDims { d0, d1 })
}

/// Row-major strides of the tensor `dims` without axis `drop`, expressed per axis of the full
/// tensor (0 for the dropped axis): the offset into the reduced tensor of a full multi-index
/// is `Σ index[a] · strides[a]`.
fn reduced_strides(dims: &[usize], drop: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; dims.len()];
    let mut s = 1;
    for a in (0..dims.len()).rev() {
        if !drop.contains(&a) {
            strides[a] = s;
            s *= dims[a];
        }
    }
    strides
}

/// Walks the elements of a row-major tensor in order, tracking their offsets into `K`
/// reduced tensors.
struct Odometer<const K: usize> {
    dims: Vec<usize>,
    index: Vec<usize>,
    strides: [Vec<usize>; K],
    offsets: [usize; K],
}

impl<const K: usize> Odometer<K> {
    fn new(dims: &[usize], strides: [Vec<usize>; K]) -> Self {
        Odometer { dims: dims.to_vec(), index: vec![0; dims.len()], strides, offsets: [0; K] }
    }

    fn advance(&mut self) {
        for a in (0..self.dims.len()).rev() {
            self.index[a] += 1;
            for k in 0..K {
                self.offsets[k] += self.strides[k][a];
            }
            if self.index[a] < self.dims[a] {
                return;
            }
            for k in 0..K {
                self.offsets[k] -= self.strides[k][a] * self.dims[a];
            }
            self.index[a] = 0;
        }
    }
}

/// One factored step, in place on `v_row` and `v_col`; returns the scaled gradient `u`:
///
/// ```text
/// G2    = g² + eps
/// v_row = β2·v_row + (1−β2)·mean(G2, axis d0)
/// v_col = β2·v_col + (1−β2)·mean(G2, axis d1)
/// u     = g · (v_row / mean(v_row, axis d1 of v_row))^−½ [expanded at d0] · v_col^−½ [expanded at d1]
/// ```
///
/// For a 2-D parameter `mean(v_row, axis d1)` is the mean of all of `v_row` (Adafactor's
/// `R·C / 1ᵀR` with means); for rank ≥ 3 it is taken per index of the other axes, as optax
/// does (`reduced_d1`). Means accumulate in f64 and round to f32; everything else is f32.
pub fn factored_update(
    dims: &[usize],
    fd: FactoredDims,
    g: &[f32],
    v_row: &mut [f32],
    v_col: &mut [f32],
    beta2: f32,
    eps: f32,
) -> Vec<f32> {
    debug_assert_eq!(g.len(), dims.iter().product::<usize>());
    let mut never = |_: &mut [f64]| -> Result<(), std::convert::Infallible> { Ok(()) };
    match factored_core(dims, dims, None, fd, g, v_row, v_col, beta2, eps, &mut never) {
        Ok(u) => u,
        Err(never) => match never {},
    }
}

/// This rank's part of a parameter cut along one axis among the ranks of a group (tensor
/// parallelism): the rank holds `full_dims[axis] / ranks` of the indices along `axis` (any
/// subset, in order: the segment-by-segment split of a fused projection is one) and all of
/// every other axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamShard {
    /// The whole parameter's shape.
    pub full_dims: Vec<usize>,
    /// The axis that is cut.
    pub axis: usize,
    /// The ranks sharing the parameter: each holds `full_dims[axis] / ranks` indices along `axis`.
    pub ranks: usize,
}

impl ParamShard {
    /// The shape one rank holds: `full_dims` with `axis` divided by `ranks`.
    pub fn local_dims(&self) -> Vec<usize> {
        let mut d = self.full_dims.clone();
        if let Some(a) = d.get_mut(self.axis) {
            *a /= self.ranks.max(1);
        }
        d
    }

    /// Checks that the cut is possible: `axis` exists and `ranks` divides it.
    pub fn check(&self) -> Result<(), OptimError> {
        let bad = |msg: String| Err(OptimError::Shard { dims: self.full_dims.clone(), msg });
        match self.full_dims.get(self.axis) {
            None => bad(format!("shard axis {}: expected an axis < {}", self.axis, self.full_dims.len())),
            Some(_) if self.ranks == 0 => bad("0 ranks: expected at least 1".into()),
            Some(&d) if d % self.ranks != 0 => {
                bad(format!("axis {} of size {d} cannot be split evenly over {} ranks", self.axis, self.ranks))
            }
            Some(_) => Ok(()),
        }
    }

    /// Whether `v_row` (the shape without `d0`) is the same on every rank, rather than cut
    /// like the parameter: when the cut axis is `d0`.
    pub fn row_replicated(&self, fd: FactoredDims) -> bool {
        self.axis == fd.d0
    }

    /// Whether `v_col` (the shape without `d1`) is the same on every rank: when the cut axis
    /// is `d1`.
    pub fn col_replicated(&self, fd: FactoredDims) -> bool {
        self.axis == fd.d1
    }
}

/// Sums f64 partial sums over the ranks sharing a parameter, in place: every rank passes its
/// own values and gets the sum over all ranks, added in rank order (rank 0 first) so that
/// every rank gets the same bits and the run is deterministic. A collective: every rank calls
/// it the same number of times with the same lengths.
pub type SumOverShards<'a> = dyn FnMut(&mut [f64]) -> Result<(), OptimError> + 'a;

/// [`factored_update`] of one rank's part of a parameter cut along `shard.axis`: the same
/// arithmetic as on the whole parameter, with the sums over the cut axis completed by
/// `sum_over_shards` (one call per parameter when the cut axis is `d0` or `d1`, none
/// otherwise).
///
/// `fd` must be the whole parameter's axes (`factored_dims(&shard.full_dims, ..)`: with ties a
/// part's own shape may choose others). `g` has the part's shape ([`ParamShard::local_dims`]);
/// `v_row` is `fd.row_shape(local)` and `v_col` is `fd.col_shape(local)`, so:
///
/// - cut along `d0`: the row sums (over `d0`) are partial and summed over the ranks; `v_row`
///   is replicated (the same on every rank), `v_col` is cut like the parameter;
/// - cut along `d1`: the column sums and the sums of `v_row` over `d1` (for its mean) are
///   partial and summed, in one call; `v_col` is replicated, `v_row` is cut;
/// - cut along another axis (rank ≥ 3): nothing is partial, both are cut.
///
/// Each rank's partial sums add its own indices in order in f64 and the ranks' partials add in
/// rank order, so `u`, `v_row` and `v_col` equal the whole update's part within f32 rounding
/// (in most elements bit for bit: only an f64 sum rounding to a different f32 differs).
#[allow(clippy::too_many_arguments)]
pub fn factored_update_sharded(
    shard: &ParamShard,
    fd: FactoredDims,
    g: &[f32],
    v_row: &mut [f32],
    v_col: &mut [f32],
    beta2: f32,
    eps: f32,
    sum_over_shards: &mut SumOverShards,
) -> Result<Vec<f32>, OptimError> {
    shard.check()?;
    let dims = &shard.full_dims;
    let bad = |msg: String| Err(OptimError::Shard { dims: dims.clone(), msg });
    if fd.d0 == fd.d1 || fd.d0 >= dims.len() || fd.d1 >= dims.len() {
        return bad(format!("factored axes d0 = {}, d1 = {}: expected two distinct axes", fd.d0, fd.d1));
    }
    let local = shard.local_dims();
    let numel = |d: &[usize]| d.iter().product::<usize>();
    for (what, got, want) in [
        ("gradient", g.len(), numel(&local)),
        ("v_row", v_row.len(), numel(&fd.row_shape(&local))),
        ("v_col", v_col.len(), numel(&fd.col_shape(&local))),
    ] {
        if got != want {
            return bad(format!(
                "{what} of {got} elements: expected {want} for the part {local:?} (axis {} over {} ranks)",
                shard.axis, shard.ranks
            ));
        }
    }
    factored_core(dims, &local, Some(shard.axis), fd, g, v_row, v_col, beta2, eps, sum_over_shards)
}

/// The factored step on a tensor of shape `local`, part of one of shape `full` cut along
/// `cut` (or the whole, `cut = None`): the sums over the cut axis go through `reduce`.
#[allow(clippy::too_many_arguments)]
fn factored_core<E>(
    full: &[usize],
    local: &[usize],
    cut: Option<usize>,
    fd: FactoredDims,
    g: &[f32],
    v_row: &mut [f32],
    v_col: &mut [f32],
    beta2: f32,
    eps: f32,
    reduce: &mut dyn FnMut(&mut [f64]) -> Result<(), E>,
) -> Result<Vec<f32>, E> {
    let (n0, n1) = (full[fd.d0] as f64, full[fd.d1] as f64);
    let (cut_d0, cut_d1) = (cut == Some(fd.d0), cut == Some(fd.d1));
    let row_strides = reduced_strides(local, &[fd.d0]);
    let col_strides = reduced_strides(local, &[fd.d1]);

    // Sums of G2 over d0 (rows) and d1 (columns).
    let mut row_sum = vec![0f64; v_row.len()];
    let mut col_sum = vec![0f64; v_col.len()];
    let mut it = Odometer::new(local, [row_strides.clone(), col_strides.clone()]);
    for &gi in g {
        let g2 = (gi * gi + eps) as f64;
        row_sum[it.offsets[0]] += g2;
        col_sum[it.offsets[1]] += g2;
        it.advance();
    }
    if cut_d0 {
        reduce(&mut row_sum)?;
    }
    for (v, s) in v_row.iter_mut().zip(&row_sum) {
        *v = beta2 * *v + (1.0 - beta2) * (s / n0) as f32;
    }

    // Sum of v_row over its d1 axis: v_row's shape is dims without d0, so walk that shape
    // with the d1 axis dropped.
    let row_dims = without(local, fd.d0);
    let reduced_d1 = if fd.d1 > fd.d0 { fd.d1 - 1 } else { fd.d1 };
    let mean_len = v_row.len() / row_dims[reduced_d1].max(1);
    let mut mean_sum = vec![0f64; mean_len];
    let mut it = Odometer::new(&row_dims, [reduced_strides(&row_dims, &[reduced_d1])]);
    for &v in v_row.iter() {
        mean_sum[it.offsets[0]] += v as f64;
        it.advance();
    }
    if cut_d1 {
        // Both are partial over d1: one reduction of [col_sum, mean_sum].
        let mut both = col_sum;
        both.extend_from_slice(&mean_sum);
        reduce(&mut both)?;
        mean_sum = both.split_off(v_col.len());
        col_sum = both;
    }
    for (v, s) in v_col.iter_mut().zip(&col_sum) {
        *v = beta2 * *v + (1.0 - beta2) * (s / n1) as f32;
    }
    let row_col_mean: Vec<f32> = mean_sum.iter().map(|s| (s / n1) as f32).collect();

    // Row factors need the row-col mean of their own slice: walk v_row again.
    let mut row_factor = vec![0f32; v_row.len()];
    let mut it = Odometer::new(&row_dims, [reduced_strides(&row_dims, &[reduced_d1])]);
    for (rf, &v) in row_factor.iter_mut().zip(v_row.iter()) {
        *rf = 1.0 / (v / row_col_mean[it.offsets[0]]).sqrt();
        it.advance();
    }
    let col_factor: Vec<f32> = v_col.iter().map(|&v| 1.0 / v.sqrt()).collect();

    let mut u = Vec::with_capacity(g.len());
    let mut it = Odometer::new(local, [row_strides, col_strides]);
    for &gi in g {
        u.push(gi * row_factor[it.offsets[0]] * col_factor[it.offsets[1]]);
        it.advance();
    }
    Ok(u)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn axis_choice_follows_optax_argsort() {
        let fd = |dims: &[usize], min| factored_dims(dims, min).map(|f| (f.d0, f.d1));
        assert_eq!(fd(&[100], 32), None); // rank 1
        assert_eq!(fd(&[31, 100], 32), None); // second largest below the threshold
        assert_eq!(fd(&[32, 100], 32), Some((1, 0)));
        assert_eq!(fd(&[4992, 1664], 32), Some((0, 1))); // qkv [3D, D]
        assert_eq!(fd(&[1664, 8192], 32), Some((1, 0))); // fc2 [D, M]
        assert_eq!(fd(&[64, 64], 32), Some((1, 0))); // tie: the later axis is the larger
        assert_eq!(fd(&[40, 8, 40], 32), Some((2, 0)));
        assert_eq!(fd(&[3, 40, 33], 32), Some((1, 2)));
        assert_eq!(fd(&[768, 3, 16, 16], 32), None); // patch embedding at p = 16
        assert_eq!(fd(&[768, 3, 32, 32], 32), Some((0, 3)));
        assert_eq!(fd(&[1, 257, 768], 32), Some((2, 1))); // pos_embed
        let f = factored_dims(&[40, 8, 40], 32).unwrap();
        assert_eq!(f.row_shape(&[40, 8, 40]), [40, 8]);
        assert_eq!(f.col_shape(&[40, 8, 40]), [8, 40]);
    }

    #[test]
    fn hand_computed_2d_step() {
        // g = [[1, 0], [0, 2]], β2 = 0 (the first step): G2 = [[1, 0], [0, 4]] (+1e-30).
        // d0 = 1 (tie), d1 = 0: v_row = means over axis 1 = [0.5, 2], v_col = means over axis 0
        // = [0.5, 2], mean(v_row) = 1.25; u_00 = 1/sqrt(0.5·0.5/1.25) = sqrt(5),
        // u_11 = 2/sqrt(2·2/1.25) = 2/sqrt(3.2), u_01 = u_10 = 0.
        let fd = factored_dims(&[2, 2], 2).unwrap();
        let (mut vr, mut vc) = (vec![7.0; 2], vec![7.0; 2]);
        let u = factored_update(&[2, 2], fd, &[1.0, 0.0, 0.0, 2.0], &mut vr, &mut vc, 0.0, 1e-30);
        assert_eq!(vr, [0.5, 2.0]);
        assert_eq!(vc, [0.5, 2.0]);
        let want = [5f32.sqrt(), 0.0, 0.0, 2.0 / 3.2f32.sqrt()];
        for (a, b) in u.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{u:?} vs {want:?}");
        }
        // A rank-one g² is factored exactly: u = sign(g).
        let (a, b) = ([1.0f32, -2.0, 0.5], [3.0f32, 0.25]);
        let g: Vec<f32> = a.iter().flat_map(|x| b.iter().map(move |y| x * y)).collect();
        let fd = factored_dims(&[3, 2], 2).unwrap();
        let (mut vr, mut vc) = (vec![0.0; 2], vec![0.0; 3]);
        let u = factored_update(&[3, 2], fd, &g, &mut vr, &mut vc, 0.0, 1e-30);
        for (ui, gi) in u.iter().zip(&g) {
            assert!((ui - gi.signum()).abs() < 1e-6, "{u:?}");
        }
    }

    #[test]
    fn second_step_decays_the_statistics() {
        let fd = factored_dims(&[2, 3], 2).unwrap(); // d0 = 1, d1 = 0
        let (mut vr, mut vc) = (vec![1.0, 2.0], vec![3.0, 4.0, 5.0]);
        let g = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let beta2 = 0.425651f32;
        factored_update(&[2, 3], fd, &g, &mut vr, &mut vc, beta2, 0.0);
        let (r0, r1) = ((1.0 + 4.0 + 9.0) / 3.0, (16.0 + 25.0 + 36.0) / 3.0);
        let (c0, c1, c2) = ((1.0 + 16.0) / 2.0, (4.0 + 25.0) / 2.0, (9.0 + 36.0) / 2.0);
        let want_r = [beta2 * 1.0 + (1.0 - beta2) * r0, beta2 * 2.0 + (1.0 - beta2) * r1];
        let want_c =
            [beta2 * 3.0 + (1.0 - beta2) * c0, beta2 * 4.0 + (1.0 - beta2) * c1, beta2 * 5.0 + (1.0 - beta2) * c2];
        for (a, b) in vr.iter().zip(want_r).chain(vc.iter().zip(want_c)) {
            assert!((a - b).abs() < 1e-5 * b, "{vr:?} {vc:?}");
        }
    }

    /// Straightforward loops for a `[A, B, C]` tensor factored with d0 = 1 (B largest),
    /// d1 = 2 (C second): v_row [A, C], v_col [A, B], and the row mean per `a`.
    fn naive_3d(dims: [usize; 3], g: &[f32], beta2: f32, vr: &mut [f32], vc: &mut [f32]) -> Vec<f32> {
        let [na, nb, nc] = dims;
        let at = |a: usize, b: usize, c: usize| g[(a * nb + b) * nc + c] as f64;
        for a in 0..na {
            for c in 0..nc {
                let m = (0..nb).map(|b| at(a, b, c).powi(2) + 1e-30).sum::<f64>() / nb as f64;
                vr[a * nc + c] = beta2 * vr[a * nc + c] + (1.0 - beta2) * m as f32;
            }
            for b in 0..nb {
                let m = (0..nc).map(|c| at(a, b, c).powi(2) + 1e-30).sum::<f64>() / nc as f64;
                vc[a * nb + b] = beta2 * vc[a * nb + b] + (1.0 - beta2) * m as f32;
            }
        }
        let mut u = vec![0.0; g.len()];
        for a in 0..na {
            let mean = (0..nc).map(|c| vr[a * nc + c] as f64).sum::<f64>() / nc as f64;
            for b in 0..nb {
                for c in 0..nc {
                    let denom = (vr[a * nc + c] as f64 * vc[a * nb + b] as f64 / mean).sqrt();
                    u[(a * nb + b) * nc + c] = (at(a, b, c) / denom) as f32;
                }
            }
        }
        u
    }

    #[test]
    fn three_d_step_matches_naive_loops_and_slices() {
        let dims = [2usize, 5, 4];
        let fd = factored_dims(&dims, 3).unwrap();
        assert_eq!((fd.d0, fd.d1), (1, 2));
        let g: Vec<f32> = (0..40).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3 + 0.1).collect();
        let (mut vr, mut vc) = (vec![0.5f32; 8], vec![0.25f32; 10]);
        let (mut vr2, mut vc2) = (vr.clone(), vc.clone());
        let u = factored_update(&dims, fd, &g, &mut vr, &mut vc, 0.6, 1e-30);
        let want = naive_3d(dims, &g, 0.6, &mut vr2, &mut vc2);
        for (x, y) in vr.iter().zip(&vr2).chain(vc.iter().zip(&vc2)).chain(u.iter().zip(&want)) {
            assert!((x - y).abs() <= 2e-6 * y.abs().max(1e-3), "{x} vs {y}");
        }
        // Each leading slice is factored on its own: equal to the 2-D step on [5, 4].
        let fd2 = factored_dims(&[5, 4], 3).unwrap();
        assert_eq!((fd2.d0, fd2.d1), (0, 1));
        for a in 0..2 {
            let (mut r, mut c) = (vec![0.5f32; 4], vec![0.25f32; 5]);
            let ua = factored_update(&[5, 4], fd2, &g[a * 20..(a + 1) * 20], &mut r, &mut c, 0.6, 1e-30);
            assert_eq!(ua, u[a * 20..(a + 1) * 20]);
            assert_eq!(r, vr[a * 4..(a + 1) * 4]);
            assert_eq!(c, vc[a * 5..(a + 1) * 5]);
        }
    }

    /// The indices rank `m` of `n` holds along an axis of size `d`: each of the segments
    /// (`[d/2, d/2]` when that splits evenly, else `[d]`) cut in `n` parts, part `m` of each,
    /// as the model's `ShardSpec` cuts a fused projection.
    fn shard_indices(d: usize, m: usize, n: usize) -> Vec<usize> {
        let segments = if d.is_multiple_of(2 * n) { vec![d / 2, d / 2] } else { vec![d] };
        let mut out = Vec::new();
        let mut start = 0;
        for s in segments {
            out.extend(start + m * s / n..start + (m + 1) * s / n);
            start += s;
        }
        out
    }

    /// The elements of a row-major tensor `dims` at `idx` along `axis`, in order.
    pub(crate) fn take(x: &[f32], dims: &[usize], axis: usize, idx: &[usize]) -> Vec<f32> {
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &i in idx {
                let at = (o * dims[axis] + i) * inner;
                out.extend_from_slice(&x[at..at + inner]);
            }
        }
        out
    }

    /// Runs `f(rank, reduction)` on `n` threads whose reductions sum in rank order (the
    /// in-process stand-in for an all-reduce over the model axis).
    pub(crate) fn on_ranks<T: Send>(n: usize, f: impl Fn(usize, &mut SumOverShards) -> T + Sync) -> Vec<T> {
        let slots = std::sync::Mutex::new(vec![Vec::<f64>::new(); n]);
        let barrier = std::sync::Barrier::new(n);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    let (slots, barrier, f) = (&slots, &barrier, &f);
                    scope.spawn(move || {
                        let mut reduce = |x: &mut [f64]| -> Result<(), OptimError> {
                            slots.lock().unwrap()[r] = x.to_vec();
                            barrier.wait();
                            {
                                let all = slots.lock().unwrap();
                                x.fill(0.0);
                                for part in all.iter() {
                                    for (a, b) in x.iter_mut().zip(part) {
                                        *a += b;
                                    }
                                }
                            }
                            barrier.wait();
                            Ok(())
                        };
                        f(r, &mut reduce)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// `got` equals `want` within f32 rounding; returns how many elements differ in any bit.
    fn close_count(what: &str, got: &[f32], want: &[f32]) -> usize {
        assert_eq!(got.len(), want.len(), "{what}");
        let mut differ = 0;
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(a.is_finite() && (a - b).abs() <= 4e-7 * b.abs().max(1e-30), "{what}[{i}]: {a} vs {b}");
            differ += (a.to_bits() != b.to_bits()) as usize;
        }
        differ
    }

    #[test]
    fn sharded_update_equals_the_whole_one_on_every_axis_and_rank_count() {
        let shapes: [&[usize]; 6] = [&[12, 8], &[8, 12], &[12, 12], &[6, 12, 12], &[12, 6, 8], &[4, 12, 6]];
        let mut checked = [0usize; 3]; // cuts along d0, d1, another axis
        let (mut elements, mut differ) = (0usize, 0usize);
        for (k, &dims) in shapes.iter().enumerate() {
            let fd = factored_dims(dims, 2).unwrap();
            let numel: usize = dims.iter().product();
            let grads: Vec<Vec<f32>> = (0..3)
                .map(|step| {
                    let t = vit_tensor::Tensor::randn(
                        dims.to_vec(),
                        0.0,
                        1.0,
                        100 * k as u64 + step,
                        vit_tensor::DType::F32,
                        vit_tensor::Device::Cpu,
                    )
                    .unwrap();
                    t.to_f32_vec().unwrap()
                })
                .collect();
            // The whole update over three steps.
            let (row_shape, col_shape) = (fd.row_shape(dims), fd.col_shape(dims));
            let mut vr = vec![0f32; row_shape.iter().product()];
            let mut vc = vec![0f32; col_shape.iter().product()];
            let mut us = Vec::new();
            for (t, g) in grads.iter().enumerate() {
                let beta2 = [0.0, 0.425651, 0.6][t];
                us.push(factored_update(dims, fd, g, &mut vr, &mut vc, beta2, 1e-30));
            }
            assert_eq!(us[0].len(), numel);
            for axis in 0..dims.len() {
                for n in [2usize, 3] {
                    if dims[axis] % n != 0 {
                        continue;
                    }
                    let shard = ParamShard { full_dims: dims.to_vec(), axis, ranks: n };
                    let local = shard.local_dims();
                    let results = on_ranks(n, |m, reduce| {
                        let idx = shard_indices(dims[axis], m, n);
                        let mut lr = vec![0f32; fd.row_shape(&local).iter().product()];
                        let mut lc = vec![0f32; fd.col_shape(&local).iter().product()];
                        let mut lu = Vec::new();
                        for (t, g) in grads.iter().enumerate() {
                            let beta2 = [0.0, 0.425651, 0.6][t];
                            let part = take(g, dims, axis, &idx);
                            lu.push(
                                factored_update_sharded(&shard, fd, &part, &mut lr, &mut lc, beta2, 1e-30, reduce)
                                    .unwrap(),
                            );
                        }
                        (idx, lu, lr, lc)
                    });
                    let what = format!("{dims:?} cut along {axis} over {n}");
                    for (idx, lu, lr, lc) in &results {
                        for (t, u) in lu.iter().enumerate() {
                            differ += close_count(&format!("u step {t} of {what}"), u, &take(&us[t], dims, axis, idx));
                            elements += u.len();
                        }
                        let want_r = if shard.row_replicated(fd) {
                            vr.clone()
                        } else {
                            take(&vr, &row_shape, axis - (axis > fd.d0) as usize, idx)
                        };
                        let want_c = if shard.col_replicated(fd) {
                            vc.clone()
                        } else {
                            take(&vc, &col_shape, axis - (axis > fd.d1) as usize, idx)
                        };
                        differ += close_count(&format!("v_row of {what}"), lr, &want_r);
                        differ += close_count(&format!("v_col of {what}"), lc, &want_c);
                        elements += lr.len() + lc.len();
                    }
                    // A replicated statistic is the same bits on every rank.
                    for (_, _, lr, lc) in &results[1..] {
                        if shard.row_replicated(fd) {
                            assert_eq!(lr, &results[0].2, "{what}");
                        }
                        if shard.col_replicated(fd) {
                            assert_eq!(lc, &results[0].3, "{what}");
                        }
                    }
                    checked[if axis == fd.d0 {
                        0
                    } else if axis == fd.d1 {
                        1
                    } else {
                        2
                    }] += 1;
                }
            }
        }
        assert!(checked.iter().all(|&c| c >= 2), "cuts along d0, d1, other: {checked:?}");
        assert!(differ * 100 <= elements, "{differ} of {elements} elements differ in some bit");
    }

    #[test]
    fn sharded_axes_come_from_the_whole_shape() {
        // [12, 12] ties: d0 = 1. Its part cut along axis 1 is [12, 6], which alone would take
        // d0 = 0: the sharded update must keep the whole shape's axes and sum the rows (over
        // d0 = the cut axis) over the ranks: v_row whole on each, v_col cut.
        let dims = [12usize, 12];
        let fd = factored_dims(&dims, 2).unwrap();
        assert_eq!((fd.d0, fd.d1), (1, 0));
        assert_eq!(factored_dims(&[12, 6], 2).map(|f| f.d0), Some(0));
        let g: Vec<f32> = (0..144).map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.1 + 0.05).collect();
        let (mut vr, mut vc) = (vec![0f32; 12], vec![0f32; 12]);
        let u = factored_update(&dims, fd, &g, &mut vr, &mut vc, 0.0, 1e-30);
        let shard = ParamShard { full_dims: dims.to_vec(), axis: 1, ranks: 2 };
        let parts = on_ranks(2, |m, reduce| {
            let idx: Vec<usize> = (6 * m..6 * m + 6).collect();
            let (mut lr, mut lc) = (vec![0f32; 12], vec![0f32; 6]);
            let lu =
                factored_update_sharded(&shard, fd, &take(&g, &dims, 1, &idx), &mut lr, &mut lc, 0.0, 1e-30, reduce)
                    .unwrap();
            (idx, lu, lr, lc)
        });
        for (idx, lu, lr, lc) in parts {
            close_count("u", &lu, &take(&u, &dims, 1, &idx));
            close_count("v_row", &lr, &vr);
            close_count("v_col", &lc, &vc[idx[0]..idx[0] + 6]);
        }
    }

    #[test]
    fn sharded_update_refuses_what_does_not_fit() {
        let fd = FactoredDims { d0: 0, d1: 1 };
        let mut none = |_: &mut [f64]| -> Result<(), OptimError> { panic!("no reduction expected") };
        let mut call = |shard: ParamShard, fd: FactoredDims, g: usize, r: usize, c: usize| {
            let (mut vr, mut vc) = (vec![0f32; r], vec![0f32; c]);
            factored_update_sharded(&shard, fd, &vec![1.0; g], &mut vr, &mut vc, 0.0, 1e-30, &mut none)
                .unwrap_err()
                .to_string()
        };
        let sh = |axis, ranks| ParamShard { full_dims: vec![12, 8], axis, ranks };
        let e = call(sh(2, 2), fd, 48, 8, 6);
        assert!(e.contains("[12, 8]") && e.contains("shard axis 2") && e.contains("< 2"), "{e}");
        let e = call(sh(1, 3), fd, 32, 8, 12);
        assert!(e.contains("size 8") && e.contains("3 ranks"), "{e}");
        let e = call(sh(0, 0), fd, 96, 8, 12);
        assert!(e.contains("0 ranks"), "{e}");
        let e = call(sh(0, 2), fd, 47, 8, 6);
        assert!(e.contains("gradient of 47 elements: expected 48") && e.contains("[6, 8]"), "{e}");
        let e = call(sh(0, 2), fd, 48, 7, 6);
        assert!(e.contains("v_row of 7 elements: expected 8"), "{e}");
        let e = call(sh(0, 2), fd, 48, 8, 12);
        assert!(e.contains("v_col of 12 elements: expected 6"), "{e}");
        let e = call(sh(0, 2), FactoredDims { d0: 1, d1: 1 }, 48, 8, 6);
        assert!(e.contains("d0 = 1, d1 = 1"), "{e}");
    }
}
