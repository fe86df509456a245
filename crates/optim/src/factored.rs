//! The factored second moment of Adafactor as optax's `scale_by_factored_rms` computes it
//! (reference §3), on host f32 slices of any rank.

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
    let n: usize = dims.iter().product();
    debug_assert_eq!(g.len(), n);
    let (n0, n1) = (dims[fd.d0] as f64, dims[fd.d1] as f64);
    let row_strides = reduced_strides(dims, &[fd.d0]);
    let col_strides = reduced_strides(dims, &[fd.d1]);

    // Means of G2 over d0 (rows) and d1 (columns).
    let mut row_sum = vec![0f64; v_row.len()];
    let mut col_sum = vec![0f64; v_col.len()];
    let mut it = Odometer::new(dims, [row_strides.clone(), col_strides.clone()]);
    for &gi in g {
        let g2 = (gi * gi + eps) as f64;
        row_sum[it.offsets[0]] += g2;
        col_sum[it.offsets[1]] += g2;
        it.advance();
    }
    for (v, s) in v_row.iter_mut().zip(&row_sum) {
        *v = beta2 * *v + (1.0 - beta2) * (s / n0) as f32;
    }
    for (v, s) in v_col.iter_mut().zip(&col_sum) {
        *v = beta2 * *v + (1.0 - beta2) * (s / n1) as f32;
    }

    // Mean of v_row over its d1 axis: v_row's shape is dims without d0, so walk that shape
    // with the d1 axis dropped.
    let row_dims = without(dims, fd.d0);
    let reduced_d1 = if fd.d1 > fd.d0 { fd.d1 - 1 } else { fd.d1 };
    let mut mean_sum = vec![0f64; v_row.len() / row_dims[reduced_d1]];
    let mut it = Odometer::new(&row_dims, [reduced_strides(&row_dims, &[reduced_d1])]);
    for &v in v_row.iter() {
        mean_sum[it.offsets[0]] += v as f64;
        it.advance();
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

    let mut u = Vec::with_capacity(n);
    let mut it = Odometer::new(dims, [row_strides, col_strides]);
    for &gi in g {
        u.push(gi * row_factor[it.offsets[0]] * col_factor[it.offsets[1]]);
        it.advance();
    }
    u
}

#[cfg(test)]
mod tests {
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
}
