//! `exp`, the two GELUs and their derivatives, written to vectorise.
//!
//! Each function is branch-free scalar code (`if` only between two computed values, which LLVM
//! turns into a blend) with no calls into libm, so a loop over a slice compiles to SIMD inside a
//! `multiversion!` kernel. libm's `expf` is a call per
//! element; it and the scalar GELU around it were 16% of a CPU training step at ViT-Ti widths
//! (docs/perf.md, issue 15).
//!
//! Accuracy (tested against f64 below): `exp` within 2 ulp over the whole f32 range; the GELUs
//! and their derivatives within a few 1e-7 absolute, which is f32's own rounding for `|x| ≲ 4`.

/// `e^x` for every f32: Cody–Waite reduction `x = n·ln2 + r` with `|r| ≤ ln2/2`, Cephes' degree-6
/// polynomial for `e^r`, and `2^n` applied as two powers of two so results down to the
/// subnormals and up to overflow (`inf`) come out right. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512, exact in f32
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer held in the mantissa

    // Outside [-104, 89] e^x is 0 or inf in f32; clamping keeps n in the range the two
    // scale factors can hold. `clamp` passes NaN through.
    let x = x.clamp(-104.0, 89.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // n as an integer, from t's mantissa, split so each half is a normal power of two.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    p * pow2(n1) * pow2(n2)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `u(x) = √(2/π)(x + 0.044715 x³)`, the tanh GELU's argument, and `u'(x)`.
#[inline(always)]
fn gelu_tanh_arg(x: f32) -> (f32, f32) {
    (SQRT_2_OVER_PI * (x + GELU_C * x * x * x), SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x))
}

/// The tanh GELU `x/2 · (1 + tanh u(x))`, as `x · σ(2u)` with `σ(2u) = 1/(1 + e^{−2u})`;
/// e^{−2u} overflows to inf for very negative x, giving exactly 0.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + exp(-2.0 * gelu_tanh_arg(x).0))
}

/// Its derivative `σ + 2x·σ(1 − σ)·u'` (from `1 + tanh u = 2σ`, `1 − tanh² u = 4σ(1 − σ)`),
/// with `1 − σ = e^{−2u}σ` computed directly (no cancellation where σ ≈ 1). Beyond |x| = 10
/// the derivative is 0 or 1 to within 1e-35; x is clamped there so nothing overflows.
#[inline(always)]
pub(crate) fn gelu_tanh_grad(x: f32) -> f32 {
    let x = x.clamp(-10.0, 10.0);
    let (u, du) = gelu_tanh_arg(x);
    let e = exp(-2.0 * u);
    let s = 1.0 / (1.0 + e);
    s + 2.0 * x * s * (e * s) * du
}

/// The normal CDF `Φ(x)` and density `φ(x)`. `erfc(|x|/√2)` by Abramowitz & Stegun 7.1.26
/// (absolute error < 1.5e-7), taken as `2Φ(−|x|)` so the lower tail keeps its small values
/// instead of cancelling in `1 + erf`.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    let e = exp(-z * z); // e^{−x²/2}
    let lower_tail = 0.5 * poly * e; // Φ(−|x|)
    let cdf = if x >= 0.0 { 1.0 - lower_tail } else { lower_tail };
    (cdf, FRAC_1_SQRT_2PI * e)
}

/// The exact GELU `x·Φ(x)`.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    x * normal_cdf_pdf(x).0
}

/// Its derivative `Φ(x) + x·φ(x)`.
#[inline(always)]
pub(crate) fn gelu_erf_grad(x: f32) -> f32 {
    let (cdf, pdf) = normal_cdf_pdf(x);
    cdf + x * pdf
}

/// Lanes of the explicit accumulators in [`sum`] and [`max`]: a fixed count, so the order of
/// the additions, and hence the bits, are the same on every CPU and vector width.
const LANES: usize = 16;

/// `Σ x` with 16 interleaved partial sums added pairwise at the end (vectorises; the same bits
/// everywhere, not the bits of a left-to-right sum).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
    }
    acc.iter_mut().zip(chunks.remainder()).for_each(|(a, v)| *a += v);
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// The larger of `a` and `v`; NaN if either is NaN. The step of [`max`], and of the column
/// maxima of attention's softmax (`softmax::scaled_softmax_columns`).
#[inline(always)]
pub(crate) fn max_step(a: f32, v: f32) -> f32 {
    if v > a || v.is_nan() {
        v
    } else {
        a
    }
}

/// The largest element (−inf for an empty slice; NaN if any element is NaN).
///
/// The 16 lanes are combined pairwise, as in [`sum`] (four vector steps instead of a chain of
/// 16 dependent compares).
/// The maximum does not depend on the order, except which of `+0` and `−0` is returned when
/// both are the largest, and softmax only subtracts it, where the two give the same result.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a = max_step(*a, v));
    }
    acc.iter_mut().zip(chunks.remainder()).for_each(|(a, &v)| *a = max_step(*a, v));
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = max_step(acc[i], acc[i + width]);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i32 - b.to_bits() as i32).unsigned_abs()
    }

    /// Every 4099th positive f32 bit pattern with e^x a normal number, and its negation.
    fn exp_args() -> impl Iterator<Item = f32> {
        (0..u32::MAX / 4099)
            .map(|i| f32::from_bits(i * 4099))
            .filter(|x| x.is_finite() && x.abs() < 87.0)
            .flat_map(|x| [x, -x])
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0;
        for x in exp_args() {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), want));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(88.8), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        let big = exp(88.7);
        assert!(big.is_finite() && ulps(big, (88.7f32 as f64).exp() as f32) <= 2, "{big}");
        // Subnormal results: relative error grows as their precision shrinks; absolute stays tiny.
        for x in [-88.0f32, -95.0, -100.0, -103.0] {
            let want = (x as f64).exp();
            assert!((exp(x) as f64 - want).abs() <= 2.0 * f32::from_bits(1) as f64 + want * 1e-6, "{x}");
        }
    }

    fn gelu_tanh_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    }

    fn erf_f64(x: f64) -> f64 {
        1.0 - crate::cpu::erfc(x)
    }

    #[test]
    fn gelus_and_derivatives_match_f64() {
        let h = 1e-4;
        for i in -4000..=4000 {
            let x = i as f32 * 0.0031 + 0.0007; // [-12.4, 12.4]
            let xd = x as f64;
            let cases = [
                ("gelu_tanh", gelu_tanh(x) as f64, gelu_tanh_f64(xd)),
                (
                    "gelu_tanh_grad",
                    gelu_tanh_grad(x) as f64,
                    (gelu_tanh_f64(xd + h) - gelu_tanh_f64(xd - h)) / (2.0 * h),
                ),
                ("gelu_erf", gelu_erf(x) as f64, 0.5 * xd * (1.0 + erf_f64(xd / 2f64.sqrt()))),
                (
                    "gelu_erf_grad",
                    gelu_erf_grad(x) as f64,
                    0.5 * (1.0 + erf_f64(xd / 2f64.sqrt()))
                        + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt(),
                ),
            ];
            for (name, got, want) in cases {
                let tol = 4e-7 * want.abs().max(1.0) + 2e-7 * xd.abs();
                assert!((got - want).abs() <= tol, "{name}({x}) = {got}, expected {want}");
            }
        }
        for f in [gelu_tanh, gelu_erf] {
            assert_eq!(f(-1e30), 0.0);
            assert_eq!(f(1e30), 1e30);
            assert!(f(f32::NAN).is_nan());
        }
        for f in [gelu_tanh_grad, gelu_erf_grad] {
            assert!(f(-1e3).abs() < 1e-30 && f(-1e30).abs() < 1e-30, "{}", f(-1e3));
            assert_eq!(f(1e3), 1.0);
            assert_eq!(f(1e30), 1.0);
            assert!(f(f32::NAN).is_nan());
        }
    }

    #[test]
    fn sum_and_max_of_random_rows() {
        let mut rng = crate::rng::Philox::new(3);
        for len in [0usize, 1, 7, 16, 17, 49, 197, 1000] {
            let x: Vec<f32> = (0..len).map(|_| rng.uniform_f32() * 8.0 - 4.0).collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(&x) as f64 - want).abs() <= 1e-5 * (len as f64).max(1.0), "sum of {len}");
            assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max), "max of {len}");
        }
        assert!(max(&[1.0, f32::NAN, 2.0]).is_nan());
        for at in [0, 5, 16, 40] {
            let mut x = vec![1.0f32; 49];
            x[at] = f32::NAN;
            assert!(max(&x).is_nan(), "a NaN at {at} of 49");
        }
        assert_eq!(max(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
