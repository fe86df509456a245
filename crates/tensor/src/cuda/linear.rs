//! Linear layers on cuBLASLt with fused epilogues (issue 14 item 3): forward BIAS and
//! GELU_AUX_BIAS (cuBLASLt's GELU is the tanh form), residual adds as `beta = 1` with C = the
//! residual, backward DGELU_BGRAD (the fc2 dgrad through fc1's GELU, with fc1's bias gradient),
//! and weight gradients accumulated in place (`beta = 1`, bf16/f16 inputs, f32 C = D = the
//! gradient) with BGRADB for the bias gradient.
//!
//! Each fused variant passes a self-check ([`super::self_check`]) against the unfused
//! composition before first use on a device; the reference runs in f32 (sgemm and the f32
//! reference kernels) on the same bf16/f16 inputs, so it shares no code with cuBLASLt's
//! epilogues. Each function returns `None`/`false` when it has no fused path for the problem
//! (dtype, alignment, a failed check, no cuBLASLt algorithm): the caller in `ops::linear` then
//! composes the op from the plain ops, which is also the CPU path.

use super::blas::{gemm_output, pointers, problem};
use super::lt::{self, Epilogue};
use super::{backend_of, kernel, self_check::relative_error, CudaBackend};
use crate::{
    op_kinds::{Gelu, MatmulDims},
    ops, DType, Device, Result, Shape, Tensor,
};
use std::sync::Arc;

/// Self-check names of the fused variants (as `vit devices` lists them).
pub(crate) const BIAS: &str = "gemm_bias";
pub(crate) const RESIDUAL: &str = "gemm_residual";
pub(crate) const GELU_AUX_BIAS: &str = "gemm_gelu_aux_bias";
pub(crate) const DGELU_BGRAD: &str = "gemm_dgelu_bgrad";
pub(crate) const WGRAD_ACCUMULATE: &str = "gemm_wgrad_accumulate";
pub(crate) const BGRADB: &str = "gemm_bgradb";

/// Relative L2 tolerance of the checks: the fused outputs are bf16 roundings of the f32
/// reference (1e-2); f16 errors count `TOLERANCE / F16_TOLERANCE` times (f16's 2e-3).
const TOLERANCE: f64 = 1e-2;
const F16_TOLERANCE: f64 = 2e-3;

/// Epilogue pointers (bias, aux) must be 16-byte aligned for the fused paths.
const EPILOGUE_ALIGN: u32 = 16;

fn half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// `x [.., in]` with `w [out, in]`: (rows, in, out).
fn dims_of(x: &Tensor, w: &Tensor) -> (usize, usize, usize) {
    let k = w.dims()[1];
    (x.numel().checked_div(k).unwrap_or(0), k, w.dims()[0])
}

/// The cuBLASLt call of a linear forward `y [rows, n] = x [rows, k] wᵀ (w [n, k]) (+ bias [n])
/// (+ residual)` with `epilogue`, from the addresses of x, w, bias, aux, residual (0: none) and
/// y: (problem, pointers, beta).
fn forward_call(
    rows: usize,
    k: usize,
    n: usize,
    dtype: DType,
    epilogue: Epilogue,
    [x, w, bias, aux, residual, y]: [u64; 6],
) -> Result<(lt::Problem, lt::Pointers, f32)> {
    let c = if residual != 0 { residual } else { y };
    let ptrs = pointers(x, w, c, y, bias, aux);
    let d = MatmulDims { batch: 1, m: rows, n, k, trans_a: false, trans_b: true };
    Ok((problem(&d, dtype, dtype, epilogue, n, &ptrs)?, ptrs, if residual != 0 { 1.0 } else { 0.0 }))
}

/// The cuBLASLt call of `dpre [rows, n] = (dy [rows, k] · w [k, n]) · gelu'(pre)` with
/// `dbias [n] = Σ_rows dpre` (DGELU_BGRAD), from the addresses of dy, w, pre, dpre and dbias.
fn dgrad_call(
    rows: usize,
    k: usize,
    n: usize,
    dtype: DType,
    [dy, w, pre, dpre, dbias]: [u64; 5],
) -> Result<(lt::Problem, lt::Pointers)> {
    let ptrs = pointers(dy, w, dpre, dpre, dbias, pre);
    let d = MatmulDims { batch: 1, m: rows, n, k, trans_a: false, trans_b: false };
    Ok((problem(&d, dtype, dtype, Epilogue::DGeluBGrad, n, &ptrs)?, ptrs))
}

/// The cuBLASLt call of `dw [out, k] += dy [rows, out]ᵀ x [rows, k]` (beta = 1, C = D = dw) with,
/// for BGRADB, `dbias [out] = Σ_rows dy` of dtype `bias`, from the addresses of dy, x, dw and
/// dbias; inputs of dtype `ab`, dw of `cd`.
fn wgrad_call(
    out: usize,
    k: usize,
    rows: usize,
    (ab, cd, bias): (DType, DType, DType),
    epilogue: Epilogue,
    [dy, x, dw, dbias]: [u64; 4],
) -> Result<(lt::Problem, lt::Pointers)> {
    let ptrs = pointers(dy, x, dw, dw, dbias, 0);
    let d = MatmulDims { batch: 1, m: out, n: k, k: rows, trans_a: true, trans_b: false };
    let p = lt::Problem { bias, ..problem(&d, ab, cd, epilogue, 0, &ptrs)? };
    Ok((p, ptrs))
}

/// The forward GEMM with its epilogue, unchecked: `pre = x wᵀ + bias (+ residual)`, and with
/// `gelu_tanh` (needs a bias) `y = gelu_tanh(pre)` with `pre` returned as aux. `None` when
/// cuBLASLt has no algorithm for it or the pointers are not aligned for the epilogue.
fn forward_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gelu_tanh: bool,
    residual: Option<&Tensor>,
    out_shape: &Shape,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let backend = backend_of(x, "linear")?;
    let (rows, k, n) = dims_of(x, w);
    let dtype = x.dtype();
    let epilogue = match (bias.is_some(), gelu_tanh) {
        (true, true) => Epilogue::GeluAuxBias,
        (true, false) => Epilogue::Bias,
        (false, false) => Epilogue::None,
        (false, true) => return Ok(None),
    };
    if rows == 0 || k == 0 || n == 0 || (epilogue == Epilogue::GeluAuxBias && n % 8 != 0) {
        return Ok(None);
    }
    let y = gemm_output(&backend, out_shape, dtype)?;
    let aux = if gelu_tanh { Some(gemm_output(&backend, out_shape, dtype)?) } else { None };
    let ptr = |t: Option<&Tensor>| t.map_or(Ok(0), kernel::device_ptr);
    let (px, pw, py) = (kernel::device_ptr(x)?, kernel::device_ptr(w)?, kernel::device_ptr(&y)?);
    let (pb, paux, pr) = (ptr(bias)?, ptr(aux.as_ref())?, ptr(residual)?);
    if lt::alignment(&[pb, paux]) < EPILOGUE_ALIGN {
        return Ok(None);
    }
    let (p, ptrs, beta) = forward_call(rows, k, n, dtype, epilogue, [px, pw, pb, paux, pr, py])?;
    let handles = backend.blas()?;
    if !handles.lt().supports(&p) {
        return Ok(None);
    }
    // SAFETY: x [rows, k], w [n, k], bias [n], residual and y, aux [rows, n] of the checked
    // shapes; y and aux are fresh and written completely.
    unsafe { handles.lt().matmul(&p, &ptrs, 1.0, beta) }?;
    Ok(Some((y, aux)))
}

/// `y = act(x wᵀ + bias) + residual` with what can be fused fused; `(y, pre-activation)`.
/// `None`: compose it from the plain ops (no fused path for this problem on this device).
/// `x [.., in]`, `w [out, in]`, `bias [out]`, `residual` of `out_shape`, all of x's dtype;
/// `gelu` and `residual` are never both given (checked by `ops::linear`).
pub(crate) fn forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gelu: Option<Gelu>,
    residual: Option<&Tensor>,
    out_shape: &Shape,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    if !half(x.dtype()) || bias.is_none() && residual.is_none() {
        return Ok(None);
    }
    let backend = backend_of(x, "linear")?;
    let tanh_fused = gelu == Some(Gelu::Tanh) && w.dims()[0].is_multiple_of(8) && fast(&backend, GELU_AUX_BIAS);
    if !tanh_fused && bias.is_some() && !fast(&backend, BIAS) || residual.is_some() && !fast(&backend, RESIDUAL) {
        return Ok(None);
    }
    let Some((y, aux)) = forward_fused(x, w, bias, tanh_fused, residual, out_shape)? else {
        return Ok(None);
    };
    Ok(Some(match (gelu, tanh_fused) {
        (Some(_), true) => (y, aux),
        // erf GELU (or an unfusable tanh): BIAS epilogue, then the GELU kernel.
        (Some(g), false) => (ops::gelu_fwd(&y, g)?, Some(y)),
        (None, _) => (y, None),
    }))
}

/// `(dpre, dbias)` of `dpre = (dy w) · gelu_tanh'(pre)`, `dbias = Σ_rows dpre`, unchecked.
fn dgrad_gelu_fused(dy: &Tensor, w: &Tensor, pre: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let backend = backend_of(dy, "linear_dgrad_gelu")?;
    let (k, n) = (w.dims()[0], w.dims()[1]);
    let rows = pre.numel().checked_div(n).unwrap_or(0);
    let dtype = dy.dtype();
    if rows == 0 || k == 0 || n == 0 || n % 8 != 0 {
        return Ok(None);
    }
    let dpre = gemm_output(&backend, pre.shape(), dtype)?;
    let db = gemm_output(&backend, &Shape::new([n]), dtype)?;
    let (pdy, pw, pd) = (kernel::device_ptr(dy)?, kernel::device_ptr(w)?, kernel::device_ptr(&dpre)?);
    let (pdb, ppre) = (kernel::device_ptr(&db)?, kernel::device_ptr(pre)?);
    if lt::alignment(&[pdb, ppre]) < EPILOGUE_ALIGN {
        return Ok(None);
    }
    let (p, ptrs) = dgrad_call(rows, k, n, dtype, [pdy, pw, ppre, pd, pdb])?;
    let handles = backend.blas()?;
    if !handles.lt().supports(&p) {
        return Ok(None);
    }
    // SAFETY: dy [rows, k], w [k, n], pre [rows, n]; dpre and db fresh, written completely.
    unsafe { handles.lt().matmul(&p, &ptrs, 1.0, 0.0) }?;
    Ok(Some((dpre, db)))
}

/// The DGELU_BGRAD path of `ops::linear_dgrad_gelu`, or `None` (compose it).
pub(crate) fn dgrad_gelu(dy: &Tensor, w: &Tensor, pre: &Tensor, gelu: Gelu) -> Result<Option<(Tensor, Tensor)>> {
    if gelu != Gelu::Tanh || !half(dy.dtype()) || !w.dims()[1].is_multiple_of(8) {
        return Ok(None);
    }
    if !fast(&backend_of(dy, "linear_dgrad_gelu")?, DGELU_BGRAD) {
        return Ok(None);
    }
    dgrad_gelu_fused(dy, w, pre)
}

/// `dw += dyᵀ x` in place (beta = 1) and, with `bias_grad`, `Σ_rows dy` in dw's dtype (BGRADB),
/// unchecked. `dw` must own its storage alone (the caller's guarantee: a store's gradient view
/// from `ParamStore::view_for_write`, or a fresh tensor). `None`: nothing was written.
fn wgrad_fused(dw: &Tensor, x: &Tensor, dy: &Tensor, bias_grad: bool) -> Result<Option<Option<Tensor>>> {
    let backend = backend_of(x, "linear_wgrad")?;
    let (out, k) = (dw.dims()[0], dw.dims()[1]);
    let rows = x.numel().checked_div(k).unwrap_or(0);
    if rows == 0 || k == 0 || out == 0 {
        return Ok(None);
    }
    let handles = backend.blas()?;
    let (px, pdy, pdw) = (kernel::device_ptr(x)?, kernel::device_ptr(dy)?, kernel::device_ptr(dw)?);
    let (ab, cd) = (x.dtype(), dw.dtype());
    // The bias gradient in the gradient's dtype if cuBLASLt has an algorithm for that, else in
    // the inputs' (the caller's accumulate casts it).
    let mut call = None;
    for bias in if bias_grad { vec![cd, ab] } else { vec![cd] } {
        let db = if bias_grad { Some(gemm_output(&backend, &Shape::new([out]), bias)?) } else { None };
        let pdb = db.as_ref().map_or(Ok(0), kernel::device_ptr)?;
        let epilogue = if bias_grad { Epilogue::BGradB } else { Epilogue::None };
        let (p, ptrs) = wgrad_call(out, k, rows, (ab, cd, bias), epilogue, [pdy, px, pdw, pdb])?;
        if handles.lt().supports(&p) {
            call = Some((p, ptrs, db));
            break;
        }
    }
    let Some((p, ptrs, db)) = call else {
        return Ok(None);
    };
    // SAFETY: dy [rows, out], x [rows, k], dw [out, k] of the checked shapes, dw written in
    // place (C = D, same layout) and owned alone (the caller's guarantee); db fresh.
    unsafe { handles.lt().matmul(&p, &ptrs, 1.0, 1.0) }?;
    Ok(Some(db))
}

/// The fused weight-gradient path of `ops::linear_wgrad`: `dw += dyᵀ x` in place, and the
/// bias gradient `Σ_rows dy` (in dw's dtype, else the inputs') when `bias_grad` and BGRADB passed its check
/// (else `None`: the caller reduces it). Returns `None` when nothing was done.
pub(crate) fn wgrad(dw: &Tensor, x: &Tensor, dy: &Tensor, bias_grad: bool) -> Result<Option<Option<Tensor>>> {
    if !half(x.dtype()) || !(dw.dtype() == DType::F32 || dw.dtype() == x.dtype()) || dw.device() != x.device() {
        return Ok(None);
    }
    let backend = backend_of(x, "linear_wgrad")?;
    if !fast(&backend, WGRAD_ACCUMULATE) {
        return Ok(None);
    }
    if bias_grad && fast(&backend, BGRADB) {
        if let Some(r) = wgrad_fused(dw, x, dy, true)? {
            return Ok(Some(r));
        }
    }
    wgrad_fused(dw, x, dy, false)
}

// ---- self-checks ----

fn fast(backend: &Arc<CudaBackend>, name: &'static str) -> bool {
    let b = backend.clone();
    backend.fast_kernel_ok(name, TOLERANCE, || run_check(&b, name))
}

/// The `ALL_CHECKS` entries (`vit devices`).
pub(crate) fn check_bias(b: &Arc<CudaBackend>) -> bool {
    fast(b, BIAS)
}
pub(crate) fn check_residual(b: &Arc<CudaBackend>) -> bool {
    fast(b, RESIDUAL)
}
pub(crate) fn check_gelu_aux_bias(b: &Arc<CudaBackend>) -> bool {
    fast(b, GELU_AUX_BIAS)
}
pub(crate) fn check_dgelu_bgrad(b: &Arc<CudaBackend>) -> bool {
    fast(b, DGELU_BGRAD)
}
pub(crate) fn check_wgrad_accumulate(b: &Arc<CudaBackend>) -> bool {
    fast(b, WGRAD_ACCUMULATE)
}
pub(crate) fn check_bgradb(b: &Arc<CudaBackend>) -> bool {
    fast(b, BGRADB)
}

fn f32_of(t: &Tensor) -> Result<Tensor> {
    t.cast(DType::F32)
}

fn worst(pairs: &[(&Tensor, &Tensor)]) -> Result<f64> {
    let mut e = 0.0f64;
    for (got, want) in pairs {
        let r = relative_error(&got.to_f32_vec()?, &want.to_f32_vec()?);
        e = if r.is_nan() || e.is_nan() { f64::NAN } else { e.max(r) };
    }
    Ok(e)
}

fn no_path(name: &str) -> crate::Error {
    crate::Error::Cuda(format!("{name}: cuBLASLt offers no algorithm for the check problem"))
}

/// One check problem of kernel `name` in bf16 and f16: the fused path against the f32
/// composition of the plain ops on the same inputs; the worst relative error, f16's scaled to
/// the bf16 tolerance.
fn run_check(b: &Arc<CudaBackend>, name: &'static str) -> Result<f64> {
    let dev = Device::Cuda(b.ordinal);
    // Odd rows and inner sizes; output widths multiples of 8 (the aux matrices' requirement).
    let (lead, rows, k, n) = (3usize, 29usize, 72usize, 136usize);
    let mut err = 0.0f64;
    for (i, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
        let seed = 1000 + 10 * i as u64;
        let rnd = |shape: &[usize], std: f32, s: u64| Tensor::randn(shape.to_vec(), 0.0, std, seed + s, dtype, dev);
        let e = match name {
            BIAS | RESIDUAL | GELU_AUX_BIAS => {
                let (x, w, bias) = (rnd(&[lead, rows, k], 1.0, 0)?, rnd(&[n, k], 0.1, 1)?, rnd(&[n], 0.5, 2)?);
                let r = rnd(&[lead, rows, n], 1.0, 3)?;
                let shape = Shape::new([lead, rows, n]);
                let residual = (name == RESIDUAL).then_some(&r);
                let gelu = name == GELU_AUX_BIAS;
                let (y, aux) =
                    forward_fused(&x, &w, Some(&bias), gelu, residual, &shape)?.ok_or_else(|| no_path(name))?;
                let pre = ops::bias_add(&ops::matmul_t(&f32_of(&x)?, &f32_of(&w)?, false, true)?, &f32_of(&bias)?)?;
                match name {
                    BIAS => worst(&[(&y, &pre)])?,
                    RESIDUAL => worst(&[(&y, &ops::add(&pre, &f32_of(&r)?)?)])?,
                    _ => {
                        let aux = aux.ok_or_else(|| no_path(name))?;
                        worst(&[(&y, &ops::gelu_fwd(&pre, Gelu::Tanh)?), (&aux, &pre)])?
                    }
                }
            }
            DGELU_BGRAD => {
                let (dy, w, pre) =
                    (rnd(&[lead, rows, k], 1.0, 0)?, rnd(&[k, n], 0.1, 1)?, rnd(&[lead, rows, n], 1.5, 2)?);
                let (dpre, db) = dgrad_gelu_fused(&dy, &w, &pre)?.ok_or_else(|| no_path(name))?;
                let dh = ops::matmul_t(&f32_of(&dy)?, &f32_of(&w)?, false, false)?;
                let want = ops::gelu_bwd(&f32_of(&pre)?, &dh, Gelu::Tanh)?;
                worst(&[(&dpre, &want), (&db, &ops::bias_add_bwd(&want)?)])?
            }
            WGRAD_ACCUMULATE | BGRADB => {
                let (x, dy) = (rnd(&[lead, rows, k], 1.0, 0)?, rnd(&[lead, rows, n], 1.0, 1)?);
                let g0 = Tensor::randn([n, k], 0.0, 10.0, seed + 2, DType::F32, dev)?;
                let dw = kernel::copy(&g0)?; // storage of its own, written in place
                let bias_grad = name == BGRADB;
                let db = wgrad_fused(&dw, &x, &dy, bias_grad)?.ok_or_else(|| no_path(name))?;
                let (x2, dy2) = (f32_of(&x)?.reshape([lead * rows, k])?, f32_of(&dy)?.reshape([lead * rows, n])?);
                let want = ops::add(&g0, &ops::matmul_t(&dy2, &x2, true, false)?)?;
                match (bias_grad, db) {
                    (true, Some(db)) => worst(&[(&dw, &want), (&db, &ops::bias_add_bwd(&dy2)?)])?,
                    (true, None) => return Err(no_path(name)),
                    (false, _) => worst(&[(&dw, &want)])?,
                }
            }
            other => return Err(crate::Error::Cuda(format!("no self-check for {other}"))),
        };
        let e = if dtype == DType::F16 { e * TOLERANCE / F16_TOLERANCE } else { e };
        err = if e.is_nan() || err.is_nan() { f64::NAN } else { err.max(e) };
    }
    Ok(err)
}

/// The row-major mapping of the fused calls, run through the host model of cuBLASLt
/// (`lt::emulate`) against naive row-major loops: which operand is cuBLAS's A, the leading
/// dimensions, which way each bias runs and what it sums over, beta and C. Buffers are named by
/// fake addresses.
#[cfg(test)]
mod tests {
    use super::{dgrad_call, forward_call, wgrad_call};
    use crate::cuda::lt::{emulate, Epilogue};
    use crate::DType;
    use std::collections::HashMap;

    const X: u64 = 1 << 8;
    const W: u64 = 2 << 8;
    const R: u64 = 3 << 8;
    const Y: u64 = 4 << 8;
    const BIAS: u64 = 5 << 8;
    const AUX: u64 = 6 << 8;

    fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }

    fn gelu_grad(x: f64) -> f64 {
        (gelu(x + 1e-5) - gelu(x - 1e-5)) / 2e-5
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::Tensor::randn([n], 0.0, 1.0, seed, DType::F32, crate::Device::Cpu).unwrap().to_f32_vec().unwrap()
    }

    fn close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
        }
    }

    /// `x [rows, k] · w [n, k]ᵀ`, row-major, in f64.
    fn xwt(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                y[r * n + j] = (0..k).map(|l| x[r * k + l] as f64 * w[j * k + l] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn forward_call_adds_the_bias_per_output_feature_and_the_residual_through_c() {
        let (rows, k, n) = (6, 5, 8);
        let (x, w, b, r) = (values(rows * k, 1), values(n * k, 2), values(n, 3), values(rows * n, 4));
        let pre: Vec<f64> = xwt(&x, &w, rows, k, n).iter().enumerate().map(|(i, v)| v + b[i % n] as f64).collect();
        // BIAS with a residual (beta = 1, C = residual).
        let mut bufs = HashMap::from([
            (X, x.clone()),
            (W, w.clone()),
            (BIAS, b.clone()),
            (R, r.clone()),
            (Y, vec![0.0; rows * n]),
        ]);
        let (p, ptrs, beta) = forward_call(rows, k, n, DType::BF16, Epilogue::Bias, [X, W, BIAS, 0, R, Y]).unwrap();
        assert_eq!(beta, 1.0);
        emulate(&p, &ptrs, 1.0, beta, &mut bufs, gelu, gelu_grad);
        let want: Vec<f64> = pre.iter().zip(&r).map(|(p, &r)| p + r as f64).collect();
        close("bias + residual", &bufs[&Y], &want);
        // GELU_AUX_BIAS: y = gelu(pre), aux = pre.
        let mut bufs = HashMap::from([(X, x), (W, w), (BIAS, b), (AUX, vec![0.0; rows * n]), (Y, vec![0.0; rows * n])]);
        let (p, ptrs, beta) =
            forward_call(rows, k, n, DType::BF16, Epilogue::GeluAuxBias, [X, W, BIAS, AUX, 0, Y]).unwrap();
        assert_eq!(beta, 0.0);
        emulate(&p, &ptrs, 1.0, beta, &mut bufs, gelu, gelu_grad);
        close("gelu(pre)", &bufs[&Y], &pre.iter().map(|&v| gelu(v)).collect::<Vec<_>>());
        close("aux = pre", &bufs[&AUX], &pre);
    }

    #[test]
    fn dgrad_call_applies_gelu_grad_of_pre_and_sums_the_bias_gradient_over_rows() {
        let (rows, k, n) = (7, 3, 8); // dy [rows, k], w [k, n], pre [rows, n]
        let (dy, w, pre) = (values(rows * k, 5), values(k * n, 6), values(rows * n, 7));
        let mut bufs = HashMap::from([
            (X, dy.clone()),
            (W, w.clone()),
            (AUX, pre.clone()),
            (Y, vec![0.0; rows * n]),
            (BIAS, vec![0.0; n]),
        ]);
        let (p, ptrs) = dgrad_call(rows, k, n, DType::BF16, [X, W, AUX, Y, BIAS]).unwrap();
        emulate(&p, &ptrs, 1.0, 0.0, &mut bufs, gelu, gelu_grad);
        let mut want = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let dh: f64 = (0..k).map(|l| dy[r * k + l] as f64 * w[l * n + j] as f64).sum();
                want[r * n + j] = dh * gelu_grad(pre[r * n + j] as f64);
            }
        }
        let want_db: Vec<f64> = (0..n).map(|j| (0..rows).map(|r| want[r * n + j]).sum()).collect();
        close("dpre", &bufs[&Y], &want);
        close("dbias", &bufs[&BIAS], &want_db);
    }

    #[test]
    fn wgrad_call_accumulates_dy_transposed_x_and_sums_dy_for_the_bias() {
        let (rows, k, out) = (9, 5, 4); // dy [rows, out], x [rows, k], dw [out, k]
        let (dy, x, dw0) = (values(rows * out, 8), values(rows * k, 9), values(out * k, 10));
        let mut bufs = HashMap::from([(R, dy.clone()), (X, x.clone()), (Y, dw0.clone()), (BIAS, vec![0.0; out])]);
        let dtypes = (DType::BF16, DType::F32, DType::F32);
        let (p, ptrs) = wgrad_call(out, k, rows, dtypes, Epilogue::BGradB, [R, X, Y, BIAS]).unwrap();
        assert_eq!((p.ab, p.cd, p.bias), dtypes);
        emulate(&p, &ptrs, 1.0, 1.0, &mut bufs, gelu, gelu_grad);
        let mut want = vec![0.0f64; out * k];
        for o in 0..out {
            for i in 0..k {
                want[o * k + i] = dw0[o * k + i] as f64
                    + (0..rows).map(|r| dy[r * out + o] as f64 * x[r * k + i] as f64).sum::<f64>();
            }
        }
        let want_db: Vec<f64> = (0..out).map(|o| (0..rows).map(|r| dy[r * out + o] as f64).sum()).collect();
        close("dw", &bufs[&Y], &want);
        close("dbias", &bufs[&BIAS], &want_db);
    }
}
