//! Few-shot linear evaluation on frozen features (reference §6, big_vision `fewshot`):
//! for each shot count and seed, take the first `shots` training images of every class after a
//! seeded permutation (a Fisher–Yates shuffle of `0..count` on the Philox stream of the seed,
//! [`vit_tensor::rng::Philox::shuffle`]: the same images in every version), standardise the features with their statistics (std + 1e-5), append a
//! constant 100 column (a bias that is almost unregularised), regress targets `2·onehot − 1`
//! with the closed-form ridge solution, and report the test accuracy of the argmax.

use vit_tensor::rng::Philox;

/// big_vision's ridge strength `2^10`.
pub const L2_REG: f64 = 1024.0;
/// The constant feature appended for the bias.
pub const BIAS_CONSTANT: f64 = 100.0;

/// Frozen features `[count, dim]` (row-major) with their labels.
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    pub x: &'a [f32],
    pub labels: &'a [i32],
    pub dim: usize,
}

/// Why a few-shot evaluation cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FewShotError {
    #[error("few-shot: features have {len} values, expected {count} examples x dim {dim}")]
    Shape { len: usize, count: usize, dim: usize },
    #[error("few-shot: label {label} at index {index} is outside 0..{classes}")]
    Label { label: i32, index: usize, classes: usize },
    #[error("few-shot: class {class} has {have} training examples, {shots} shots need that many")]
    TooFewExamples { class: usize, have: usize, shots: usize },
    #[error("few-shot: the ridge system is not positive definite (non-finite features?)")]
    Singular,
}

impl Features<'_> {
    fn check(&self, classes: usize) -> Result<usize, FewShotError> {
        let count = self.labels.len();
        if self.dim == 0 || self.x.len() != count * self.dim {
            return Err(FewShotError::Shape { len: self.x.len(), count, dim: self.dim });
        }
        if let Some((index, &label)) = self.labels.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= classes) {
            return Err(FewShotError::Label { label, index, classes });
        }
        Ok(count)
    }
}

/// Test accuracy in [0, 1] of the `shots`-per-class ridge classifier for one `seed`.
pub fn fewshot_accuracy(
    train: Features,
    test: Features,
    classes: usize,
    shots: usize,
    seed: u64,
) -> Result<f64, FewShotError> {
    let n_train = train.check(classes)?;
    test.check(classes)?;
    if test.dim != train.dim {
        return Err(FewShotError::Shape { len: test.x.len(), count: test.labels.len(), dim: train.dim });
    }
    // First `shots` examples of each class in a seeded permutation.
    let mut order: Vec<usize> = (0..n_train).collect();
    Philox::new(seed).shuffle(&mut order);
    let mut per_class = vec![Vec::new(); classes];
    for i in order {
        let c = train.labels[i] as usize;
        if per_class[c].len() < shots {
            per_class[c].push(i);
        }
    }
    if let Some((class, have)) = per_class.iter().map(Vec::len).enumerate().find(|&(_, n)| n < shots) {
        return Err(FewShotError::TooFewExamples { class, have, shots });
    }
    ridge_accuracy(train, &per_class.concat(), test, classes)
}

/// Test accuracy in [0, 1] of the ridge classifier (big_vision's linear probe on frozen
/// features: standardised, a bias column, `L2_REG`) fitted on every training example.
pub fn linear_probe_accuracy(train: Features, test: Features, classes: usize) -> Result<f64, FewShotError> {
    let n_train = train.check(classes)?;
    test.check(classes)?;
    if test.dim != train.dim {
        return Err(FewShotError::Shape { len: test.x.len(), count: test.labels.len(), dim: train.dim });
    }
    ridge_accuracy(train, &(0..n_train).collect::<Vec<_>>(), test, classes)
}

/// The test accuracy of the ridge classifier fitted on the `chosen` training rows.
fn ridge_accuracy(train: Features, chosen: &[usize], test: Features, classes: usize) -> Result<f64, FewShotError> {
    let d = train.dim;
    let rows = |idx: &[usize]| -> Vec<Vec<f64>> {
        idx.iter().map(|&i| train.x[i * d..(i + 1) * d].iter().map(|&v| v as f64).collect()).collect()
    };
    let mut x = rows(chosen);
    let n = x.len();
    let mean: Vec<f64> = (0..d).map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64).collect();
    let std: Vec<f64> =
        (0..d).map(|j| (x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64).sqrt() + 1e-5).collect();
    let standardise = |r: &mut Vec<f64>| {
        for j in 0..d {
            r[j] = (r[j] - mean[j]) / std[j];
        }
        r.push(BIAS_CONSTANT);
    };
    x.iter_mut().for_each(standardise);
    let t: Vec<Vec<f64>> = chosen
        .iter()
        .map(|&i| (0..classes).map(|c| if train.labels[i] as usize == c { 1.0 } else { -1.0 }).collect())
        .collect();
    let w = ridge(&x, &t, L2_REG)?;
    let mut correct = 0;
    for (k, &label) in test.labels.iter().enumerate() {
        let mut r: Vec<f64> = test.x[k * d..(k + 1) * d].iter().map(|&v| v as f64).collect();
        standardise(&mut r);
        let scores = (0..classes).map(|c| r.iter().zip(&w).map(|(a, wr)| a * wr[c]).sum::<f64>());
        let pred =
            scores.enumerate().fold((0, f64::NEG_INFINITY), |best, (c, s)| if s > best.1 { (c, s) } else { best }).0;
        correct += usize::from(pred == label as usize);
    }
    Ok(correct as f64 / test.labels.len().max(1) as f64)
}

/// `W [D, C]` minimising `‖XW − T‖² + λ‖W‖²` for `X [N, D]`, `T [N, C]`: `(XᵀX + λI)⁻¹XᵀT`, or
/// `Xᵀ(XXᵀ + λI)⁻¹T` when N < D (the smaller system, as big_vision).
pub fn ridge(x: &[Vec<f64>], t: &[Vec<f64>], l2: f64) -> Result<Vec<Vec<f64>>, FewShotError> {
    let (n, d, c) = (x.len(), x.first().map_or(0, Vec::len), t.first().map_or(0, Vec::len));
    if n < d {
        // K = XXᵀ + λI [N, N]; A = K⁻¹T; W = XᵀA.
        let mut k: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| dot(&x[i], &x[j])).collect()).collect();
        (0..n).for_each(|i| k[i][i] += l2);
        let a = cholesky_solve(k, t.to_vec())?;
        Ok((0..d).map(|p| (0..c).map(|q| (0..n).map(|i| x[i][p] * a[i][q]).sum()).collect()).collect())
    } else {
        // G = XᵀX + λI [D, D]; W = G⁻¹XᵀT.
        let mut g = vec![vec![0.0; d]; d];
        let mut xt_t = vec![vec![0.0; c]; d];
        for (xi, ti) in x.iter().zip(t) {
            for p in 0..d {
                for q in 0..d {
                    g[p][q] += xi[p] * xi[q];
                }
                for q in 0..c {
                    xt_t[p][q] += xi[p] * ti[q];
                }
            }
        }
        (0..d).for_each(|p| g[p][p] += l2);
        cholesky_solve(g, xt_t)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `A X = B` for symmetric positive definite `A [n, n]` and `B [n, c]` by Cholesky
/// (`A = LLᵀ`, then two triangular solves). A textbook routine kept here rather than a
/// linear-algebra dependency for this one solve.
fn cholesky_solve(mut a: Vec<Vec<f64>>, mut b: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>, FewShotError> {
    let n = a.len();
    for j in 0..n {
        let diag = a[j][j] - (0..j).map(|k| a[j][k] * a[j][k]).sum::<f64>();
        if diag.is_nan() || diag <= 0.0 {
            return Err(FewShotError::Singular);
        }
        a[j][j] = diag.sqrt();
        for i in j + 1..n {
            a[i][j] = (a[i][j] - (0..j).map(|k| a[i][k] * a[j][k]).sum::<f64>()) / a[j][j];
        }
    }
    // L Y = B, rows top to bottom.
    for (i, li) in a.iter().enumerate() {
        let (done, rest) = b.split_at_mut(i);
        let bi = &mut rest[0];
        for (bk, lik) in done.iter().zip(li) {
            bi.iter_mut().zip(bk).for_each(|(x, y)| *x -= lik * y);
        }
        bi.iter_mut().for_each(|x| *x /= li[i]);
    }
    // Lᵀ X = Y, rows bottom to top.
    for i in (0..n).rev() {
        let (head, done) = b.split_at_mut(i + 1);
        let bi = &mut head[i];
        for (k, bk) in done.iter().enumerate() {
            bi.iter_mut().zip(bk).for_each(|(x, y)| *x -= a[i + 1 + k][i] * y);
        }
        bi.iter_mut().for_each(|x| *x /= a[i][i]);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_tensor::rng::fill_normal;

    /// `n` standard normals of the Philox stream of `seed`.
    fn normals(seed: u64, n: usize) -> Vec<f32> {
        let mut z = vec![0.0f32; n];
        fill_normal(seed, 0, 0.0, 1.0, &mut z);
        z
    }

    /// `classes` Gaussian clusters in `dim` dims (centres from seed 99), `per_class` points each
    /// drawn from `seed`.
    fn clusters(classes: usize, dim: usize, per_class: usize, seed: u64) -> (Vec<f32>, Vec<i32>) {
        let centres: Vec<f32> = normals(99, classes * dim).iter().map(|z| 3.0 * z).collect();
        let noise = normals(seed, classes * per_class * dim);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..classes * per_class {
            let c = i % classes;
            x.extend(centres[c * dim..(c + 1) * dim].iter().zip(&noise[i * dim..(i + 1) * dim]).map(|(m, z)| m + z));
            y.push(c as i32);
        }
        (x, y)
    }

    #[test]
    fn the_linear_probe_fits_every_training_example() {
        let (xtr, ytr) = clusters(4, 8, 25, 1);
        let (xte, yte) = clusters(4, 8, 20, 2);
        let train = Features { x: &xtr, labels: &ytr, dim: 8 };
        let test = Features { x: &xte, labels: &yte, dim: 8 };
        let acc = linear_probe_accuracy(train, test, 4).unwrap();
        assert!(acc > 0.9, "accuracy {acc}");
        // Labels that no longer match the features: chance, not the clusters' accuracy.
        let shuffled: Vec<i32> = (0..yte.len()).map(|i| ((i * 7 / 3) % 4) as i32).collect();
        let wrong = linear_probe_accuracy(train, Features { labels: &shuffled, ..test }, 4).unwrap();
        assert!(wrong < 0.6, "accuracy against unrelated labels {wrong}");
        assert!(linear_probe_accuracy(train, test, 3).unwrap_err().to_string().contains("outside 0..3"));
    }

    /// The few-shot sample is a function of the seed alone: pinned first picks of the
    /// permutation that chooses the shots.
    #[test]
    fn the_shot_permutation_is_pinned() {
        let mut order: Vec<usize> = (0..10).collect();
        Philox::new(0).shuffle(&mut order);
        assert_eq!(order, PINNED_ORDER);
    }
    const PINNED_ORDER: [usize; 10] = [6, 7, 3, 4, 9, 1, 0, 2, 5, 8];

    #[test]
    fn separable_clusters_are_learned_from_few_shots() {
        let (xtr, ytr) = clusters(5, 16, 30, 1);
        let (xte, yte) = clusters(5, 16, 20, 2); // same centres, other points
        let train = Features { x: &xtr, labels: &ytr, dim: 16 };
        let test = Features { x: &xte, labels: &yte, dim: 16 };
        for shots in [1, 5, 10, 25] {
            let acc = fewshot_accuracy(train, test, 5, shots, 0).unwrap();
            assert!(acc > 0.9, "{shots} shots: accuracy {acc}");
        }
        // Deterministic per seed.
        assert_eq!(fewshot_accuracy(train, test, 5, 1, 3).unwrap(), fewshot_accuracy(train, test, 5, 1, 3).unwrap());
    }

    #[test]
    fn both_ridge_forms_agree_with_the_normal_equations() {
        let mut seed = 5;
        let mut m = |r: usize, c: usize| {
            seed += 1;
            let z = normals(seed, r * c);
            z.chunks(c).map(|row| row.iter().map(|&v| f64::from(v)).collect()).collect::<Vec<Vec<f64>>>()
        };
        for (n, d) in [(4, 7), (9, 3)] {
            let (x, t) = (m(n, d), m(n, 2));
            let w = ridge(&x, &t, 0.5).unwrap();
            // Check (XᵀX + λI) W = XᵀT directly.
            for p in 0..d {
                for q in 0..2 {
                    let lhs: f64 =
                        (0..d).map(|r| (0..n).map(|i| x[i][p] * x[i][r]).sum::<f64>() * w[r][q]).sum::<f64>()
                            + 0.5 * w[p][q];
                    let rhs: f64 = (0..n).map(|i| x[i][p] * t[i][q]).sum();
                    assert!((lhs - rhs).abs() < 1e-9, "n={n} d={d}: {lhs} vs {rhs}");
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let (x, y) = clusters(3, 4, 2, 0);
        let f = Features { x: &x, labels: &y, dim: 4 };
        assert_eq!(
            fewshot_accuracy(f, f, 3, 5, 0).unwrap_err().to_string(),
            "few-shot: class 0 has 2 training examples, 5 shots need that many"
        );
        let bad = Features { x: &x[1..], labels: &y, dim: 4 };
        assert!(fewshot_accuracy(bad, f, 3, 1, 0).unwrap_err().to_string().contains("expected 6 examples x dim 4"));
        assert!(fewshot_accuracy(f, f, 2, 1, 0)
            .unwrap_err()
            .to_string()
            .contains("label 2 at index 2 is outside 0..2"));
    }
}
