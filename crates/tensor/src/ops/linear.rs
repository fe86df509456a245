//! Linear layers as ops with fused epilogues (issue 14 item 3): the forward `y = act(x Wᵀ + b)`
//! or `y = x Wᵀ + b + residual`, and the backward pieces that fuse on cuBLASLt: the data
//! gradient through a GELU with its bias gradient, and the weight gradient accumulated in place
//! into a gradient store with the bias gradient alongside.
//!
//! The CPU path (and the CUDA fallback where nothing fuses: f32, erf GELU, unaligned or odd
//! shapes, a failed self-check) is the plain composition of `matmul_t`, `bias_add`, `gelu_*`,
//! `add` and `bias_add_bwd`, which is the reference the fused CUDA paths are tested against.

use super::{exact_shape, min_rank, same_device, same_float_dtype};
use crate::op_kinds::{Activation, Gelu};
use crate::{cpu, cuda, ops, Device, Error, ParamStore, Result, Shape, Tensor};

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
    if device == Device::Cpu {
        return cpu_forward(x, w, bias, act, residual, out_shape);
    }
    linear_reference(x, w, bias, act, residual)
}

/// The CPU forward: bias and residual written into the output before the GEMM accumulates
/// into it, then the GELU in one vectorised pass (`cpu::linear_fwd`, `cpu::activation_fwd`).
/// Equal to the composition below within f32 rounding (tested).
fn cpu_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Gelu>,
    residual: Option<&Tensor>,
    out_shape: Shape,
) -> Result<LinearOutput> {
    const OP: &str = "linear";
    let (n, k) = (w.dims()[0], w.dims()[1]);
    let m = x.numel().checked_div(k).unwrap_or(0);
    let b = bias.map(|b| b.cpu_f32(OP)).transpose()?;
    let r = residual.map(|r| r.cpu_f32(OP)).transpose()?;
    let pre = cpu::linear_fwd(&x.cpu_f32(OP)?, &w.cpu_f32(OP)?, b.as_deref(), r.as_deref(), m, n, k);
    let dtype = x.dtype();
    Ok(match act {
        Some(g) => LinearOutput {
            y: Tensor::cpu_like(cpu::activation_fwd(&pre, Activation::Gelu(g)), out_shape.clone(), dtype),
            pre: Some(Tensor::cpu_like(pre, out_shape, dtype)),
        },
        None => LinearOutput { y: Tensor::cpu_like(pre, out_shape, dtype), pre: None },
    })
}

/// The composition `linear` is on every device where nothing fuses: `matmul_t`, `bias_add`,
/// `add`, `gelu_fwd`. The reference the fused CPU and CUDA paths are tested against.
#[doc(hidden)]
pub fn linear_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Gelu>,
    residual: Option<&Tensor>,
) -> Result<LinearOutput> {
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
/// fc2 dgrad with fc1's bias gradient. A plain GEMM, then the GELU backward and the column sum
/// (on CUDA one fused kernel, `act_bwd_colsum`, where it applies and passed its self-check):
/// cuBLASLt's DGELU_BGRAD epilogue ([`linear_dgrad_gelu_fused`]) measured 1.8×
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
    if device == Device::Cpu {
        // GELU backward in place on the GEMM's output, fused with fc1's bias gradient.
        let (dims, out_shape) = ops::matmul_dims(dy, w, false, false)?;
        let mut dh = cpu::matmul(&dy.cpu_f32(OP)?, &w.cpu_f32(OP)?, dims);
        let hidden = w.dims()[1];
        let db = cpu::activation_bwd_in_place_column_sums(&pre.cpu_f32(OP)?, &mut dh, hidden, Activation::Gelu(gelu));
        return Ok((Tensor::cpu_like(dh, out_shape, dy.dtype()), Tensor::cpu_like(db, [hidden], dy.dtype())));
    }
    let dh = ops::matmul_t(dy, w, false, false)?;
    // GELU backward and bias gradient in one pass where the fused kernel applies.
    if let Some(r) = cuda::elementwise::activation_bwd_bias_grad(pre, &dh, Activation::Gelu(gelu))? {
        return Ok(r);
    }
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
