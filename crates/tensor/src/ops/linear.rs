//! Linear layers as ops with fused epilogues (issue 14 item 3): the forward `y = act(x Wᵀ + b)`
//! or `y = x Wᵀ + b + residual`, and the backward pieces that fuse on cuBLASLt: the data
//! gradient through a GELU with its bias gradient, and the weight gradient accumulated in place
//! into a gradient store with the bias gradient alongside.
//!
//! The CPU path (and the CUDA fallback where nothing fuses: f32, erf GELU, unaligned or odd
//! shapes, a failed self-check) is the plain composition of `matmul_t`, `bias_add`, `gelu_*`,
//! `add` and `bias_add_bwd`, which is the reference the fused CUDA paths are tested against.

use super::{exact_shape, min_rank, same_device, same_float_dtype};
use crate::op_kinds::Gelu;
use crate::{cuda, ops, Device, Error, ParamStore, Result, Shape, Tensor};

/// The forward of a linear layer: `y [.., out]` and, when a GELU was applied, its input
/// `pre = x Wᵀ + b [.., out]` (what the backward needs).
#[derive(Debug, Clone)]
pub struct LinearOutput {
    /// The layer's output, `[.., out]`.
    pub y: Tensor,
    /// The pre-activation `x Wᵀ + b` when `act` was given (cuBLASLt's GELU_AUX output), `[.., out]`.
    pub pre: Option<Tensor>,
}

/// `y = act(x Wᵀ + bias)`, or `y = x Wᵀ + bias + residual` (not both an activation and a
/// residual): `x [.., in]`, `w [out, in]` (PyTorch layout), `bias [out]`, `residual [.., out]`,
/// one float dtype on one device. On CUDA with bf16/f16 the bias, the tanh GELU (keeping the
/// pre-activation) and the residual add run in the GEMM's epilogue; the erf GELU runs after a
/// BIAS epilogue.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Gelu>,
    residual: Option<&Tensor>,
) -> Result<LinearOutput> {
    const OP: &str = "linear";
    let mut all = vec![x, w];
    all.extend(bias);
    all.extend(residual);
    let device = same_device(OP, &all)?;
    same_float_dtype(OP, &all)?;
    if w.rank() != 2 {
        return Err(Error::shape(OP, format!("expected a weight of shape [out, in], got {}", w.shape())));
    }
    let (_, out_dims) = ops::matmul_dims(x, w, false, true)?;
    let (out, out_shape) = (w.dims()[0], Shape::new(out_dims));
    if let Some(b) = bias {
        exact_shape(OP, b, &[out], "bias")?;
    }
    if let Some(r) = residual {
        exact_shape(OP, r, out_shape.dims(), "residual")?;
        if act.is_some() {
            return Err(Error::value(OP, "a residual add after an activation is not a linear epilogue; got both"));
        }
    }
    if device != Device::Cpu {
        if let Some((y, pre)) = cuda::linear::forward(x, w, bias, act, residual, &out_shape)? {
            return Ok(LinearOutput { y, pre });
        }
    }
    let mut y = ops::matmul_t(x, w, false, true)?;
    if let Some(b) = bias {
        y = ops::bias_add(&y, b)?;
    }
    if let Some(r) = residual {
        y = ops::add(&y, r)?;
    }
    Ok(match act {
        Some(g) => LinearOutput { y: ops::gelu_fwd(&y, g)?, pre: Some(y) },
        None => LinearOutput { y, pre: None },
    })
}

/// Data gradient of a linear layer followed by a GELU's backward: with `dy [.., out]` the
/// gradient of `y = pre2 Wᵀ` (`w [out, hidden]`), and `pre [.., hidden]` the input of the GELU
/// that produced `pre2`, returns `(dpre, dbias)`: `dpre = (dy W) · gelu'(pre)` `[.., hidden]`
/// and its row sums `dbias [hidden]` (the gradient of the bias that produced `pre`): the MLP's
/// fc2 dgrad with fc1's bias gradient. A plain GEMM, the GELU backward kernel and a column sum
/// on every device: cuBLASLt's DGELU_BGRAD epilogue ([`linear_dgrad_gelu_fused`]) measured 1.8×
/// slower than this composition at the B/16, L/16 and G/14 MLP shapes on an H200
/// (docs/perf.md, 2026-11-26).
pub fn linear_dgrad_gelu(dy: &Tensor, w: &Tensor, pre: &Tensor, gelu: Gelu) -> Result<(Tensor, Tensor)> {
    dgrad_gelu(dy, w, pre, gelu, false)
}

/// [`linear_dgrad_gelu`] through cuBLASLt's DGELU_BGRAD epilogue where it applies (CUDA,
/// bf16/f16, tanh GELU, hidden a multiple of 8, and its self-check passed), else the
/// composition. Kept for `benches/gemm_cuda.rs`, which times it against the composition.
pub fn linear_dgrad_gelu_fused(dy: &Tensor, w: &Tensor, pre: &Tensor, gelu: Gelu) -> Result<(Tensor, Tensor)> {
    dgrad_gelu(dy, w, pre, gelu, true)
}

fn dgrad_gelu(dy: &Tensor, w: &Tensor, pre: &Tensor, gelu: Gelu, fused: bool) -> Result<(Tensor, Tensor)> {
    const OP: &str = "linear_dgrad_gelu";
    let device = same_device(OP, &[dy, w, pre])?;
    same_float_dtype(OP, &[dy, w, pre])?;
    if w.rank() != 2 {
        return Err(Error::shape(OP, format!("expected a weight of shape [out, hidden], got {}", w.shape())));
    }
    let (_, out_dims) = ops::matmul_dims(dy, w, false, false)?;
    exact_shape(OP, pre, &out_dims, "pre")?;
    if fused && device != Device::Cpu {
        if let Some(r) = cuda::linear::dgrad_gelu(dy, w, pre, gelu)? {
            return Ok(r);
        }
    }
    let dh = ops::matmul_t(dy, w, false, false)?;
    let dpre = ops::gelu_bwd(pre, &dh, gelu)?;
    let db = ops::bias_add_bwd(&dpre)?;
    Ok((dpre, db))
}

/// Weight (and bias) gradients of a linear layer `y = x Wᵀ + b`, accumulated into the store
/// `g`: `g[weight] += dyᵀ x` (`[out, in]`, or a gradient of that many elements such as a patch
/// embedding's `[out, C, p, p]`) and, with `bias`, `g[bias] += Σ dy` (`[out]`), for
/// `x [.., in]` and `dy [.., out]`. On CUDA with bf16/f16 `x`, `dy` and an f32 (or same-dtype)
/// gradient store, the GEMM accumulates straight into the store's buffer (`beta = 1`) and the
/// bias gradient comes from its epilogue (BGRADB).
pub fn linear_wgrad(g: &mut ParamStore, weight: &str, bias: Option<&str>, x: &Tensor, dy: &Tensor) -> Result<()> {
    const OP: &str = "linear_wgrad";
    let device = same_device(OP, &[x, dy])?;
    same_float_dtype(OP, &[x, dy])?;
    min_rank(OP, x, 1, "x")?;
    min_rank(OP, dy, 1, "dy")?;
    let (k, n) = (x.shape().last(), dy.shape().last());
    if x.dims()[..x.rank() - 1] != dy.dims()[..dy.rank() - 1] {
        return Err(Error::shape(
            OP,
            format!("expected x and dy with equal leading dims, got {} and {}", x.shape(), dy.shape()),
        ));
    }
    let rows = x.numel().checked_div(k).unwrap_or(0);
    let gw = g.get(weight)?;
    if gw.numel() != n * k {
        return Err(Error::shape(
            OP,
            format!("expected gradient {weight} of shape [{n}, {k}] (or that many elements), got {}", gw.shape()),
        ));
    }
    let stored = gw.shape().clone();
    if device != Device::Cpu && gw.device() == device {
        let dw = g.view_for_write(weight)?.reshape([n, k])?;
        let done = cuda::linear::wgrad(&dw, x, dy, bias.is_some())?;
        drop(dw); // before the store's next write, which would copy the buffer while shared
        if let Some(db) = done {
            if let Some(b) = bias {
                let db = match db {
                    Some(db) => db,
                    None => ops::bias_add_bwd(dy)?,
                };
                g.accumulate(b, &db)?;
            }
            return Ok(());
        }
    }
    let (x2, dy2) = (x.reshape([rows, k])?, dy.reshape([rows, n])?);
    g.accumulate(weight, &ops::matmul_t(&dy2, &x2, true, false)?.reshape(stored)?)?;
    if let Some(b) = bias {
        g.accumulate(b, &ops::bias_add_bwd(dy)?)?;
    }
    Ok(())
}
