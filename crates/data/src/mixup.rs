//! Mixup (Zhang et al. 2018) as big_vision's `get_mixup(rng, p)`: one ratio per batch,
//! `λ ~ Beta(p, p)` folded to `max(λ, 1 − λ)`, and every example and its soft target mixed with
//! the previous example of the batch (`roll` by one): `x_i ← λ·x_i + (1 − λ)·x_{i−1}`, the same
//! for the targets. "Better plain ViT baselines" uses `p = 0.2`.
//!
//! A batch op, not a per-image [`crate::Transform`]: it needs the batch and its targets. The
//! `vit` trainer applies it to the whole global batch with `data.mixup = { p = 0.2 }`
//! (`vit_experiments::train::mixup`).

use crate::{augment::Rng, DataError};

/// Mixes `images` (`[batch, per_image]`, row-major) and `targets` (`[batch, classes]`, soft
/// targets, e.g. one-hot) in place with one ratio drawn from `rng`; returns the ratio λ in
/// [0.5, 1]. `p > 0` is the Beta distribution's parameter.
pub fn mixup(images: &mut [f32], targets: &mut [f32], batch: usize, p: f64, rng: &mut Rng) -> Result<f64, DataError> {
    let bad = |msg: String| DataError::Transform { op: "mixup", msg };
    if !(p > 0.0 && p.is_finite()) {
        return Err(bad(format!("p = {p}: expected a positive Beta parameter (big_vision uses 0.2)")));
    }
    if batch == 0 || !images.len().is_multiple_of(batch) || !targets.len().is_multiple_of(batch) {
        return Err(bad(format!(
            "a batch of {batch} with {} image values and {} target values: expected whole rows per example",
            images.len(),
            targets.len()
        )));
    }
    let l = beta(p, p, rng);
    let lambda = l.max(1.0 - l);
    roll_mix(images, batch, lambda as f32);
    roll_mix(targets, batch, lambda as f32);
    Ok(lambda)
}

/// `row_i ← λ·row_i + (1 − λ)·row_{i−1}` (row −1 is the last), from the unmixed rows.
fn roll_mix(v: &mut [f32], batch: usize, lambda: f32) {
    let n = v.len() / batch;
    let orig = v.to_vec();
    for i in 0..batch {
        let prev = (i + batch - 1) % batch;
        for k in 0..n {
            v[i * n + k] = lambda * orig[i * n + k] + (1.0 - lambda) * orig[prev * n + k];
        }
    }
}

/// A standard normal draw (Box–Muller on two uniforms).
fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.uniform(); // (0, 1]
    let u2 = rng.uniform();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gamma(`a`, 1) draw (Marsaglia and Tsang 2000; for `a < 1`, Gamma(a + 1)·U^(1/a)).
fn gamma(a: f64, rng: &mut Rng) -> f64 {
    if a < 1.0 {
        let u = 1.0 - rng.uniform();
        return gamma(a + 1.0, rng) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.uniform();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A Beta(`a`, `b`) draw as `G_a / (G_a + G_b)`.
fn beta(a: f64, b: f64, rng: &mut Rng) -> f64 {
    let (x, y) = (gamma(a, rng), gamma(b, rng));
    if x + y > 0.0 {
        x / (x + y)
    } else {
        0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_draws_have_the_beta_mean_and_variance() {
        for (a, b) in [(0.2, 0.2), (2.0, 5.0), (1.0, 1.0)] {
            let mut rng = Rng::new(7);
            let n = 40_000;
            let xs: Vec<f64> = (0..n).map(|_| beta(a, b, &mut rng)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let (m, v) = (a / (a + b), a * b / ((a + b).powi(2) * (a + b + 1.0)));
            assert!((mean - m).abs() < 0.01, "Beta({a}, {b}): mean {mean} vs {m}");
            assert!((var - v).abs() < 0.1 * v, "Beta({a}, {b}): variance {var} vs {v}");
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn mixup_mixes_each_example_with_the_previous_one_by_one_ratio() {
        let (batch, d, k) = (4, 3, 5);
        let images: Vec<f32> = (0..batch * d).map(|i| i as f32).collect();
        let mut targets = vec![0f32; batch * k];
        for (i, label) in [0, 3, 3, 1].into_iter().enumerate() {
            targets[i * k + label] = 1.0;
        }
        let (mut x, mut t) = (images.clone(), targets.clone());
        let lambda = mixup(&mut x, &mut t, batch, 0.2, &mut Rng::new(3)).unwrap();
        assert!((0.5..=1.0).contains(&lambda), "{lambda}");
        let l = lambda as f32;
        for i in 0..batch {
            let prev = (i + batch - 1) % batch;
            for j in 0..d {
                let want = l * images[i * d + j] + (1.0 - l) * images[prev * d + j];
                assert!((x[i * d + j] - want).abs() < 1e-5, "image {i}[{j}]");
            }
            let row = &t[i * k..(i + 1) * k];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "targets of {i} sum to 1");
            // Its own label gets λ (plus the neighbour's share when they agree).
            let own = targets[i * k..(i + 1) * k].iter().position(|&v| v == 1.0).unwrap();
            assert!(row[own] >= l - 1e-6);
        }
        // Same seed, same ratio; over many batches λ covers [0.5, 1] with Beta(0.2)'s mass near 1.
        let mut again = images.clone();
        assert_eq!(mixup(&mut again, &mut targets.clone(), batch, 0.2, &mut Rng::new(3)).unwrap(), lambda);
        let mut rng = Rng::new(11);
        let ls: Vec<f64> = (0..2000)
            .map(|_| mixup(&mut images.clone(), &mut targets.clone(), batch, 0.2, &mut rng).unwrap())
            .collect();
        assert!(ls.iter().all(|l| (0.5..=1.0).contains(l)));
        assert!(ls.iter().filter(|&&l| l > 0.9).count() > 1000, "Beta(0.2, 0.2) folded is mostly near 1");
        assert!(ls.iter().any(|&l| l < 0.6));
    }

    #[test]
    fn bad_settings_are_errors() {
        let (mut x, mut t) = (vec![0f32; 6], vec![0f32; 4]);
        let e = mixup(&mut x, &mut t, 2, 0.0, &mut Rng::new(0)).unwrap_err().to_string();
        assert!(e.contains("mixup") && e.contains("p = 0"), "{e}");
        let e = mixup(&mut x, &mut t, 4, 0.2, &mut Rng::new(0)).unwrap_err().to_string();
        assert!(e.contains("batch of 4"), "{e}");
    }
}
