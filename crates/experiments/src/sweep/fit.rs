//! Saturating power-law fits (Scaling ViT §2): the error `E` of a run against a resource `x`
//! (training FLOPs, training images, parameters) follows `E = a·(x + d)^(−b) + c`, with
//! `a, b > 0` (the error falls with `x`), `c ≥ 0` (the irreducible error at infinite `x`) and
//! `d ≥ 0` (the offset that bends the curve flat at small `x`).
//!
//! The fit is nonlinear least squares on the error itself, by Levenberg–Marquardt (the
//! `levenberg-marquardt` crate), in parameters that keep the constraints by construction:
//! `a = e^p₀`, `b = e^p₁`, `c = p₂²`, `d = p₃²` (with `x` divided by its smallest value, so the
//! problem is well scaled whatever the unit). Starting points come from a grid over `(b, d)`: for
//! fixed `b` and `d` the model is linear in `a` and `c`, solved exactly (with `c` clamped at 0),
//! and the best few grid points start the nonlinear fit. Confidence intervals are percentile
//! bootstrap intervals: the points are resampled with replacement (seeded, so the same inputs
//! give the same intervals) and refitted.

use levenberg_marquardt::{LeastSquaresProblem, LevenbergMarquardt};
use nalgebra::{storage::Owned, DMatrix, DVector, Dyn};
use serde::Serialize;
use vit_tensor::rng::Philox;

/// Why a fit could not be made. Each message is one line naming the value and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    /// Fewer points than the fit needs (one more than its free parameters).
    #[error("{got} points: expected at least {need} to fit {params} parameters")]
    TooFewPoints { got: usize, need: usize, params: usize },
    /// A point with a non-finite coordinate, or an `x` that is not positive.
    #[error("point {index} = ({x}, {y}): expected a positive finite x and a finite error")]
    BadPoint { index: usize, x: f64, y: f64 },
    /// Every x is the same: nothing to fit a curve through.
    #[error("every point has x = {x}: expected at least two different x values")]
    OneX { x: f64 },
    /// No curve with `a, b > 0` fits: the error does not fall as x grows (the least-squares
    /// slope of the error against ln x is not negative).
    #[error("the error does not fall as x grows (slope {slope:.3e} per unit of ln x): expected a falling error for a power law with a, b > 0")]
    NotDecreasing { slope: f64 },
    /// No start of the nonlinear fit ended at finite parameters.
    #[error("no fit converged to finite parameters on these {points} points")]
    NoFit { points: usize },
    /// The best least-squares curve runs off to the edge of the law's family (its scale `a`
    /// overflows as `b` and `d` grow without bound): the points do not pin down a saturating
    /// power law, typically because they cover too short a range to show its bend.
    #[error(
        "the saturating power law is not identified by these {points} points: the least-squares fit runs off \
         (b = {b:.3e}, d = {d:.3e}, a = {a}); expected points that show the curve's bend (a wider range of x)"
    )]
    NotIdentified { points: usize, a: f64, b: f64, d: f64 },
    /// A bad option.
    #[error("{name} = {value}: expected {expected}")]
    Option { name: &'static str, value: String, expected: &'static str },
}

/// `E = a·(x + d)^(−b) + c`, in the units of the points it was fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct PowerLaw {
    /// Scale (> 0), in units of error · x^b.
    pub a: f64,
    /// Exponent (> 0): how fast the error falls.
    pub b: f64,
    /// The error at infinite x (≥ 0).
    pub c: f64,
    /// Offset (≥ 0), in units of x: the curve is flat for x ≪ d.
    pub d: f64,
}

impl PowerLaw {
    /// The predicted error at `x`.
    pub fn eval(&self, x: f64) -> f64 {
        self.a * (x + self.d).powf(-self.b) + self.c
    }
}

/// Whether `d` is fitted or held at 0 (a 3-parameter law `a·x^(−b) + c`, for few points or
/// when no flattening at small x is expected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Offset {
    /// `d` is a free parameter.
    #[default]
    Free,
    /// `d = 0`.
    Zero,
}

/// Options of [`fit_power_law`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// Whether `d` is fitted.
    pub offset: Offset,
    /// Bootstrap resamples for the intervals (0: no intervals).
    pub resamples: usize,
    /// Seed of the resampling.
    pub seed: u64,
    /// Coverage of the intervals, in (0, 1) (0.95: the 2.5th to 97.5th percentiles).
    pub confidence: f64,
}

impl Default for FitOptions {
    /// `d` free, 200 resamples, seed 0, 95% intervals.
    fn default() -> Self {
        FitOptions { offset: Offset::Free, resamples: 200, seed: 0, confidence: 0.95 }
    }
}

/// A confidence interval `[low, high]` of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// Whether `v` lies in the interval (ends included).
    pub fn contains(&self, v: f64) -> bool {
        self.low <= v && v <= self.high
    }
}

/// The bootstrap intervals of every parameter of a [`PowerLaw`] (`d`'s is `[0, 0]` when it is
/// held at 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Intervals {
    pub a: Interval,
    pub b: Interval,
    pub c: Interval,
    pub d: Interval,
    /// Their coverage (0.95 for 95% intervals).
    pub confidence: f64,
    /// Resamples whose fit succeeded (a resample with too few distinct x is skipped).
    pub resamples: usize,
}

/// A fitted power law with the points it was fitted to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    pub law: PowerLaw,
    /// Whether `d` was fitted or held at 0.
    pub offset: Offset,
    /// Bootstrap intervals (absent with 0 resamples).
    pub intervals: Option<Intervals>,
    /// Root-mean-square residual of the fit, in units of error.
    pub rmse: f64,
    /// The `(x, error)` points used.
    pub points: Vec<(f64, f64)>,
}

/// Fits `E = a·(x + d)^(−b) + c` to `points` (`(x, error)`, x > 0) by least squares, with
/// bootstrap confidence intervals for every parameter.
pub fn fit_power_law(points: &[(f64, f64)], opts: &FitOptions) -> Result<Fit, FitError> {
    if !(opts.confidence > 0.0 && opts.confidence < 1.0) {
        return Err(FitError::Option {
            name: "confidence",
            value: opts.confidence.to_string(),
            expected: "a coverage in (0, 1)",
        });
    }
    let params = match opts.offset {
        Offset::Free => 4,
        Offset::Zero => 3,
    };
    if points.len() < params + 1 {
        return Err(FitError::TooFewPoints { got: points.len(), need: params + 1, params });
    }
    for (index, &(x, y)) in points.iter().enumerate() {
        if !(x > 0.0 && x.is_finite() && y.is_finite()) {
            return Err(FitError::BadPoint { index, x, y });
        }
    }
    let xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    if xs.iter().all(|&x| x == xs[0]) {
        return Err(FitError::OneX { x: xs[0] });
    }
    let slope = log_slope(&xs, &ys);
    if slope >= 0.0 {
        return Err(FitError::NotDecreasing { slope });
    }
    let law = fit_once(&xs, &ys, opts.offset, None).ok_or(FitError::NoFit { points: xs.len() })?;
    if ![law.a, law.b, law.c, law.d].iter().all(|v| v.is_finite()) {
        return Err(FitError::NotIdentified { points: xs.len(), a: law.a, b: law.b, d: law.d });
    }
    let rmse = (xs.iter().zip(&ys).map(|(&x, &y)| (law.eval(x) - y).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
    let intervals = (opts.resamples > 0).then(|| bootstrap(&xs, &ys, &law, opts, params));
    Ok(Fit { law, offset: opts.offset, intervals, rmse, points: points.to_vec() })
}

/// The least-squares slope of `ys` against `ln xs`.
fn log_slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let l: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
    let (ml, my) = (l.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov = l.iter().zip(ys).map(|(l, y)| (l - ml) * (y - my)).sum::<f64>();
    let var = l.iter().map(|l| (l - ml).powi(2)).sum::<f64>();
    cov / var
}

/// Percentile intervals from `opts.resamples` refits on points drawn with replacement.
fn bootstrap(xs: &[f64], ys: &[f64], full: &PowerLaw, opts: &FitOptions, params: usize) -> Intervals {
    let n = xs.len();
    let mut rng = Philox::new(opts.seed);
    let mut draws: [Vec<f64>; 4] = Default::default();
    let (mut bx, mut by) = (vec![0.0; n], vec![0.0; n]);
    for _ in 0..opts.resamples {
        for i in 0..n {
            let j = rng.below(n as u64) as usize;
            (bx[i], by[i]) = (xs[j], ys[j]);
        }
        let mut distinct = bx.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        if distinct.len() < params {
            continue;
        }
        if let Some(l) = fit_once(&bx, &by, opts.offset, Some(full)) {
            for (k, v) in [l.a, l.b, l.c, l.d].into_iter().enumerate() {
                draws[k].push(v);
            }
        }
    }
    let tail = (1.0 - opts.confidence) / 2.0;
    let interval = |v: &mut Vec<f64>, fallback: f64| {
        if v.is_empty() {
            return Interval { low: fallback, high: fallback };
        }
        v.sort_by(f64::total_cmp);
        Interval { low: quantile(v, tail), high: quantile(v, 1.0 - tail) }
    };
    let resamples = draws[0].len();
    let [da, db, dc, dd] = &mut draws;
    Intervals {
        a: interval(da, full.a),
        b: interval(db, full.b),
        c: interval(dc, full.c),
        d: interval(dd, full.d),
        confidence: opts.confidence,
        resamples,
    }
}

/// The `q`-quantile of sorted `v`, interpolating linearly between order statistics.
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 >= v.len() {
        v[v.len() - 1]
    } else {
        v[i] * (1.0 - frac) + v[i + 1] * frac
    }
}

/// The least-squares law through `(xs, ys)`, or None when no law with `a, b > 0` fits.
/// `extra_start` (a previous fit, in original units) is tried as a starting point too.
fn fit_once(xs: &[f64], ys: &[f64], offset: Offset, extra_start: Option<&PowerLaw>) -> Option<PowerLaw> {
    // Work in u = x / s, u ≥ 1: E = a'·(u + d')^(−b) + c with a = a'·s^b, d = d'·s.
    let s = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let u: Vec<f64> = xs.iter().map(|x| x / s).collect();
    let u_max = u.iter().copied().fold(1.0, f64::max);
    let y_scale = ys.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-12);
    let mut starts = grid_starts(&u, ys, offset, u_max);
    if let Some(l) = extra_start {
        starts.push(PowerLaw { a: l.a * s.powf(-l.b), b: l.b, c: l.c, d: l.d / s });
    }
    let mut best: Option<(f64, PowerLaw)> = None;
    let mut consider = |law: PowerLaw| {
        let ssr = u.iter().zip(ys).map(|(&u, &y)| (law.eval(u) - y).powi(2)).sum::<f64>();
        let ok = ssr.is_finite() && [law.a, law.b, law.c, law.d].iter().all(|v| v.is_finite()) && law.a > 0.0;
        if ok && best.as_ref().is_none_or(|(b, _)| ssr < *b) {
            best = Some((ssr, law));
        }
    };
    for start in starts {
        // The start itself counts: where the least squares has no finite minimum (the best
        // curve runs off to b, d → ∞, e.g. an error flat and then falling), the nonlinear fit
        // ends non-finite and the best grid point is the answer.
        consider(start);
        let problem = Problem::new(&u, ys, offset, &start, y_scale, u_max);
        let (problem, report) = LevenbergMarquardt::new().with_patience(200).minimize(problem);
        if !report.termination.was_usage_issue() {
            consider(problem.law());
        }
    }
    let (_, l) = best?;
    Some(PowerLaw { a: l.a * s.powf(l.b), b: l.b, c: l.c, d: l.d * s })
}

/// The best few grid points over `(b, d')` (normalised units), each with the exact least-squares
/// `a' > 0, c ≥ 0` for that `b` and `d'`.
fn grid_starts(u: &[f64], ys: &[f64], offset: Offset, u_max: f64) -> Vec<PowerLaw> {
    let bs: Vec<f64> = (0..=40).map(|i| 0.01 * 500f64.powf(i as f64 / 40.0)).collect(); // 0.01 .. 5
    let ds: Vec<f64> = match offset {
        Offset::Zero => vec![0.0],
        Offset::Free => std::iter::once(0.0).chain((-24..=4).map(|j| u_max * 10f64.powf(j as f64 / 4.0))).collect(),
    };
    let mut found: Vec<(f64, PowerLaw)> = Vec::new();
    let n = u.len() as f64;
    for &b in &bs {
        for &d in &ds {
            let g: Vec<f64> = u.iter().map(|&u| (u + d).powf(-b)).collect();
            let (sg, sy) = (g.iter().sum::<f64>(), ys.iter().sum::<f64>());
            let sgg = g.iter().map(|g| g * g).sum::<f64>();
            let sgy = g.iter().zip(ys).map(|(g, y)| g * y).sum::<f64>();
            let det = n * sgg - sg * sg;
            let (mut a, mut c) =
                if det.abs() > 1e-300 { ((n * sgy - sg * sy) / det, (sgg * sy - sg * sgy) / det) } else { (0.0, 0.0) };
            if c.is_nan() || c < 0.0 {
                (a, c) = (sgy / sgg, 0.0);
            }
            if !(a > 0.0 && a.is_finite()) {
                continue;
            }
            let ssr = g.iter().zip(ys).map(|(g, y)| (a * g + c - y).powi(2)).sum::<f64>();
            found.push((ssr, PowerLaw { a, b, c, d }));
        }
    }
    found.sort_by(|p, q| p.0.total_cmp(&q.0));
    found.into_iter().take(3).map(|(_, l)| l).collect()
}

/// The least-squares problem in unconstrained parameters `p = [ln a', ln b, √c, √d']` (the last
/// one absent with `d = 0`), on normalised `u`.
struct Problem<'a> {
    u: &'a [f64],
    y: &'a [f64],
    p: DVector<f64>,
}

impl<'a> Problem<'a> {
    fn new(u: &'a [f64], y: &'a [f64], offset: Offset, start: &PowerLaw, y_scale: f64, u_max: f64) -> Self {
        // √c and √d' start a little above 0: at exactly 0 their gradient vanishes and the
        // fit could never move them.
        let c = start.c.max(1e-4 * y_scale).sqrt();
        let mut p = vec![start.a.ln(), start.b.ln(), c];
        if offset == Offset::Free {
            p.push(start.d.max(1e-6 * u_max).sqrt());
        }
        Problem { u, y, p: DVector::from_vec(p) }
    }

    fn law(&self) -> PowerLaw {
        let p = &self.p;
        let d = if p.len() == 4 { p[3] * p[3] } else { 0.0 };
        PowerLaw { a: p[0].exp(), b: p[1].exp(), c: p[2] * p[2], d }
    }
}

impl LeastSquaresProblem<f64, Dyn, Dyn> for Problem<'_> {
    type ResidualStorage = Owned<f64, Dyn>;
    type JacobianStorage = Owned<f64, Dyn, Dyn>;
    type ParameterStorage = Owned<f64, Dyn>;

    fn set_params(&mut self, p: &DVector<f64>) {
        self.p.copy_from(p);
    }

    fn params(&self) -> DVector<f64> {
        self.p.clone()
    }

    fn residuals(&self) -> Option<DVector<f64>> {
        let l = self.law();
        let r = DVector::from_iterator(self.u.len(), self.u.iter().zip(self.y).map(|(&u, &y)| l.eval(u) - y));
        r.iter().all(|v| v.is_finite()).then_some(r)
    }

    fn jacobian(&self) -> Option<DMatrix<f64>> {
        let l = self.law();
        let cols = self.p.len();
        let mut j = DMatrix::zeros(self.u.len(), cols);
        for (i, &u) in self.u.iter().enumerate() {
            let t = u + l.d;
            let ag = l.a * t.powf(-l.b);
            j[(i, 0)] = ag; // ∂/∂ln a
            j[(i, 1)] = -ag * t.ln() * l.b; // ∂/∂ln b
            j[(i, 2)] = 2.0 * self.p[2]; // ∂/∂√c
            if cols == 4 {
                j[(i, 3)] = -l.b * ag / t * 2.0 * self.p[3]; // ∂/∂√d
            }
        }
        j.iter().all(|v| v.is_finite()).then_some(j)
    }
}

/// Indices of the Pareto frontier of `(cost, error)` points: those no other point beats on both
/// (at most the cost and a lower error), sorted by cost. Of points with equal cost and error,
/// the first is kept. Points with a non-finite coordinate are never on it.
pub fn pareto_frontier(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> =
        (0..points.len()).filter(|&i| points[i].0.is_finite() && points[i].1.is_finite()).collect();
    order.sort_by(|&i, &j| {
        points[i].0.total_cmp(&points[j].0).then(points[i].1.total_cmp(&points[j].1)).then(i.cmp(&j))
    });
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for i in order {
        if points[i].1 < best {
            best = points[i].1;
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_tensor::rng;

    /// `n` points log-spaced over `[lo, hi]` on `law`, plus Gaussian noise of standard deviation
    /// `sd` drawn from `seed`.
    fn synthetic(law: &PowerLaw, lo: f64, hi: f64, n: usize, sd: f64, seed: u64) -> Vec<(f64, f64)> {
        let mut g = Philox::new(seed);
        (0..n)
            .map(|i| {
                let x = lo * (hi / lo).powf(i as f64 / (n - 1) as f64);
                let (z, _) = rng::box_muller(g.next_u32(), g.next_u32());
                (x, law.eval(x) + sd * z)
            })
            .collect()
    }

    /// Error against training FLOPs in the range of a small sweep.
    const TRUTH: PowerLaw = PowerLaw { a: 1100.0, b: 0.35, c: 0.08, d: 2e9 };

    #[test]
    fn noise_free_points_give_the_law_back() {
        let pts = synthetic(&TRUTH, 1e8, 1e14, 12, 0.0, 0);
        let fit = fit_power_law(&pts, &FitOptions { resamples: 0, ..Default::default() }).unwrap();
        let l = fit.law;
        for (got, want, name) in [(l.a, TRUTH.a, "a"), (l.b, TRUTH.b, "b"), (l.c, TRUTH.c, "c"), (l.d, TRUTH.d, "d")] {
            assert!((got / want - 1.0).abs() < 1e-5, "{name}: {got} vs {want}");
        }
        assert!(fit.rmse < 1e-9, "{}", fit.rmse);
        assert!(fit.intervals.is_none());
    }

    #[test]
    fn noisy_points_recover_the_law_and_the_intervals_contain_it() {
        // Three noise draws, 1% of the error range: the fit is within the tolerances and every
        // 95% interval contains the true value.
        for seed in [1, 2, 3] {
            let pts = synthetic(&TRUTH, 1e8, 1e14, 30, 0.004, seed);
            let fit = fit_power_law(&pts, &FitOptions { seed, ..Default::default() }).unwrap();
            let l = fit.law;
            // (Seen: b within 3%, c within 0.003, d within 6%, a within a factor 1.25; a and b
            // trade off against each other, so a is the loosest.)
            assert!((l.b / TRUTH.b - 1.0).abs() < 0.08, "seed {seed}: b = {}", l.b);
            assert!((l.c - TRUTH.c).abs() < 0.006, "seed {seed}: c = {}", l.c);
            assert!((l.d / TRUTH.d - 1.0).abs() < 0.25, "seed {seed}: d = {:e}", l.d);
            assert!((l.a / TRUTH.a).ln().abs() < 1.6f64.ln(), "seed {seed}: a = {}", l.a);
            // The curve itself, where the points are, within twice the noise.
            for &(x, _) in &pts {
                assert!((l.eval(x) - TRUTH.eval(x)).abs() < 0.008, "seed {seed}: at x = {x:e}");
            }
            let iv = fit.intervals.unwrap();
            assert!(iv.resamples >= 190, "seed {seed}: {} resamples", iv.resamples);
            for (i, v, name) in [(iv.a, TRUTH.a, "a"), (iv.b, TRUTH.b, "b"), (iv.c, TRUTH.c, "c"), (iv.d, TRUTH.d, "d")]
            {
                assert!(i.contains(v), "seed {seed}: {name} = {v} outside [{}, {}]", i.low, i.high);
                assert!(i.low < i.high, "seed {seed}: {name}: empty interval");
            }
            // ... and are informative: 20% off in b or 0.02 off in c lies outside them.
            assert!(!iv.b.contains(1.2 * TRUTH.b) && !iv.b.contains(0.8 * TRUTH.b), "seed {seed}: {:?}", iv.b);
            assert!(!iv.c.contains(TRUTH.c + 0.02) && !iv.c.contains(TRUTH.c - 0.02), "seed {seed}: {:?}", iv.c);
            assert!((fit.rmse - 0.004).abs() < 0.0015, "seed {seed}: rmse {}", fit.rmse);
        }
    }

    /// The Fashion-MNIST sweep's compute frontier (docs/scaling.md: training FLOPs, test
    /// error): 1.5 decades with no visible bend, where the best curve runs off (a overflowed
    /// and was reported as `inf`): refused as not identified, never returned.
    #[test]
    fn points_that_do_not_pin_the_law_down_are_not_identified() {
        let pts = [
            (754089984000.0, 0.3135),
            (1488666624000.0, 0.2833),
            (2957819904000.0, 0.2673),
            (3016359936000.0, 0.2178),
            (5954666496000.0, 0.1786),
            (11831279616000.0, 0.1586),
            (23584505856000.0, 0.1492),
        ];
        match fit_power_law(&pts, &FitOptions { resamples: 20, ..Default::default() }) {
            Err(e @ FitError::NotIdentified { points: 7, .. }) => {
                assert!(e.to_string().contains("not identified"), "{e}")
            }
            other => panic!("expected NotIdentified, got {other:?}"),
        }
    }

    #[test]
    fn a_law_without_offset_is_fitted_with_d_held_at_zero() {
        let truth = PowerLaw { a: 3.0, b: 0.5, c: 0.1, d: 0.0 };
        let pts = synthetic(&truth, 100.0, 1e6, 20, 0.002, 7);
        let fit = fit_power_law(&pts, &FitOptions { offset: Offset::Zero, ..Default::default() }).unwrap();
        assert_eq!(fit.law.d, 0.0);
        assert!((fit.law.b / truth.b - 1.0).abs() < 0.1, "b = {}", fit.law.b);
        assert!((fit.law.c - truth.c).abs() < 0.005, "c = {}", fit.law.c);
        let iv = fit.intervals.unwrap();
        assert!(iv.b.contains(truth.b) && iv.c.contains(truth.c) && iv.a.contains(truth.a), "{iv:?}");
        assert_eq!((iv.d.low, iv.d.high), (0.0, 0.0));
    }

    #[test]
    fn a_pure_power_law_fits_with_c_at_the_lower_bound() {
        // c = 0 is the edge of the allowed set: the fit goes there, never below.
        let truth = PowerLaw { a: 5.0, b: 0.7, c: 0.0, d: 0.0 };
        let pts = synthetic(&truth, 1.0, 1e4, 15, 0.0, 0);
        let fit = fit_power_law(&pts, &FitOptions { resamples: 20, ..Default::default() }).unwrap();
        assert!(fit.law.c >= 0.0 && fit.law.c < 1e-4, "c = {}", fit.law.c);
        assert!((fit.law.b - 0.7).abs() < 1e-3, "b = {}", fit.law.b);
        assert!(fit.intervals.unwrap().c.low >= 0.0);
    }

    #[test]
    fn the_intervals_are_deterministic_per_seed() {
        let pts = synthetic(&TRUTH, 1e8, 1e14, 20, 0.005, 11);
        let o = FitOptions { resamples: 50, seed: 5, ..Default::default() };
        let (f1, f2) = (fit_power_law(&pts, &o).unwrap(), fit_power_law(&pts, &o).unwrap());
        assert_eq!(f1, f2);
        let f3 = fit_power_law(&pts, &FitOptions { seed: 6, ..o }).unwrap();
        assert_eq!(f1.law, f3.law);
        assert_ne!(f1.intervals, f3.intervals, "another seed draws other resamples");
    }

    #[test]
    fn the_jacobian_matches_finite_differences() {
        let u = [1.0, 3.0, 10.0, 40.0, 200.0];
        let y = [0.9, 0.6, 0.4, 0.3, 0.25];
        let start = PowerLaw { a: 2.0, b: 0.6, c: 0.2, d: 1.5 };
        let mut p = Problem::new(&u, &y, Offset::Free, &start, 1.0, 200.0);
        let j = p.jacobian().unwrap();
        let p0 = p.params();
        for k in 0..4 {
            let h = 1e-6;
            let (mut up, mut dn) = (p0.clone(), p0.clone());
            up[k] += h;
            dn[k] -= h;
            p.set_params(&up);
            let ru = p.residuals().unwrap();
            p.set_params(&dn);
            let rd = p.residuals().unwrap();
            for i in 0..u.len() {
                let fd = (ru[i] - rd[i]) / (2.0 * h);
                assert!((fd - j[(i, k)]).abs() < 1e-6 * (1.0 + fd.abs()), "d r{i} / d p{k}: {fd} vs {}", j[(i, k)]);
            }
        }
    }

    #[test]
    fn bad_inputs_are_one_line_errors() {
        let good = synthetic(&TRUTH, 1e8, 1e14, 8, 0.0, 0);
        let o = FitOptions { resamples: 0, ..Default::default() };
        let e = fit_power_law(&good[..4], &o).unwrap_err();
        assert_eq!(e, FitError::TooFewPoints { got: 4, need: 5, params: 4 });
        assert!(fit_power_law(&good[..4], &FitOptions { offset: Offset::Zero, ..o }).is_ok());
        let mut bad = good.clone();
        bad[2].1 = f64::NAN;
        assert!(matches!(fit_power_law(&bad, &o), Err(FitError::BadPoint { index: 2, .. })));
        bad[2] = (0.0, 0.5);
        let e = fit_power_law(&bad, &o).unwrap_err().to_string();
        assert!(e.contains("point 2 = (0, 0.5)") && e.contains("positive finite x"), "{e}");
        let same: Vec<_> = (0..6).map(|i| (10.0, 0.1 * i as f64)).collect();
        assert_eq!(fit_power_law(&same, &o).unwrap_err(), FitError::OneX { x: 10.0 });
        let rising: Vec<_> = (1..8).map(|i| (i as f64, 0.1 * i as f64)).collect();
        let e = fit_power_law(&rising, &o).unwrap_err();
        assert!(matches!(e, FitError::NotDecreasing { .. }), "{e}");
        let e = fit_power_law(&good, &FitOptions { confidence: 1.5, ..o }).unwrap_err().to_string();
        assert_eq!(e, "confidence = 1.5: expected a coverage in (0, 1)");
        // Every kind of message is one line.
        let all = [
            FitError::TooFewPoints { got: 1, need: 5, params: 4 },
            FitError::BadPoint { index: 0, x: -1.0, y: 0.1 },
            FitError::OneX { x: 1.0 },
            FitError::NotDecreasing { slope: 0.1 },
            FitError::NoFit { points: 5 },
        ];
        for e in all.iter().map(|e| e.to_string()).chain([e]) {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn the_frontier_keeps_the_points_nothing_beats() {
        let pts = [(4.0, 0.30), (1.0, 0.50), (2.0, 0.55), (2.0, 0.40), (8.0, 0.31), (16.0, 0.20), (3.0, f64::NAN)];
        // (2, .55) is beaten by (2, .40); (8, .31) by (4, .30); NaN is never on it.
        assert_eq!(pareto_frontier(&pts), vec![1, 3, 0, 5]);
        assert!(pareto_frontier(&[]).is_empty());
        // Equal points: the first only.
        assert_eq!(pareto_frontier(&[(1.0, 0.5), (1.0, 0.5)]), vec![0]);
    }
}
