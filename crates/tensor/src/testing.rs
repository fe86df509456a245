//! Test helpers shared by every vitrs crate: closeness checks and finite-difference gradient
//! checks against a random projection of the output (so one scalar loss tests every element).

use crate::{DType, Device, Result, Tensor};

/// Largest `|a - b| / (atol + rtol·|b|)` over all elements; ≤ 1 means close.
pub fn closeness(a: &[f32], b: &[f32], rtol: f32, atol: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "closeness: lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() / (atol + rtol * y.abs()) })
        .fold(0.0, f32::max)
}

/// Panics with the worst element when `a` and `b` differ beyond `atol + rtol·|b|`.
pub fn assert_close(what: &str, a: &[f32], b: &[f32], rtol: f32, atol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ ({} vs {})", a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x - y).abs() <= atol + rtol * y.abs();
        assert!(ok, "{what}: element {i}: got {x}, expected {y} (rtol {rtol}, atol {atol}); {} elements", a.len());
    }
}

/// `Σ f(x) ⊙ r` in f64: the scalar loss whose gradient with respect to `f(x)` is `r`.
fn projected(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, r: &[f32]) -> Result<f64> {
    let y = f(x)?.to_f32_vec()?;
    assert_eq!(y.len(), r.len(), "finite_difference: projection has the wrong size");
    Ok(y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum())
}

/// Checks `analytic` (the gradient of `Σ f(x) ⊙ r` with respect to f32 CPU tensor `x`) against
/// central differences with step `h` at up to `samples` positions spread over `x`.
/// Passes when every sampled `|analytic − numeric| ≤ tol · max(1, max|numeric|)`.
#[allow(clippy::too_many_arguments)]
pub fn check_gradient(
    what: &str,
    f: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    r: &Tensor,
    analytic: &Tensor,
    h: f32,
    tol: f32,
    samples: usize,
) -> Result<()> {
    assert_eq!(x.dtype(), DType::F32, "{what}: finite differences need f32 inputs");
    assert_eq!(
        analytic.dims(),
        x.dims(),
        "{what}: gradient shape {:?} differs from input shape {:?}",
        analytic.dims(),
        x.dims()
    );
    let base = x.to_f32_vec()?;
    let rv = r.to_f32_vec()?;
    let grad = analytic.to_f32_vec()?;
    let n = base.len();
    let step = (n / samples.max(1)).max(1);
    let mut checked = Vec::new();
    let mut i = (n / 7) % step;
    while i < n && checked.len() < samples {
        let mut xp = base.clone();
        xp[i] += h;
        let mut xm = base.clone();
        xm[i] -= h;
        let lp = projected(&f, &Tensor::from_vec(xp, x.shape().clone(), Device::Cpu)?, &rv)?;
        let lm = projected(&f, &Tensor::from_vec(xm, x.shape().clone(), Device::Cpu)?, &rv)?;
        checked.push((i, ((lp - lm) / (2.0 * h as f64)) as f32));
        i += step;
    }
    let scale = checked.iter().map(|(_, g)| g.abs()).fold(1.0f32, f32::max);
    for (i, numeric) in checked {
        let diff = (grad[i] - numeric).abs();
        assert!(
            diff <= tol * scale,
            "{what}: gradient at element {i}: analytic {} vs finite difference {numeric} (|diff| {diff} > {tol} x {scale})",
            grad[i]
        );
    }
    Ok(())
}
