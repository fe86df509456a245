//! LayerNorm, centred or RMS, with or without scale and bias (ViT-22B drops the bias).

use super::{min_rank, same_device, same_float_dtype, same_shape};
use crate::op_kinds::NormKind;
use crate::{cpu, cuda, Device, Error, Result, Tensor};

/// What [`layer_norm_fwd`] returns: the output and the per-row statistics backward needs.
#[derive(Debug, Clone)]
pub struct LayerNormOut {
    /// Normalised output, `x`'s shape and dtype.
    pub y: Tensor,
    /// Row means, f32, `x`'s shape without the last dim (zeros for RMS).
    pub mean: Tensor,
    /// Reciprocal standard deviations `1/sqrt(var + eps)`, f32, like `mean`.
    pub rstd: Tensor,
}

/// Gradients from [`layer_norm_bwd`].
#[derive(Debug, Clone)]
pub struct LayerNormGrads {
    pub dx: Tensor,
    /// Present iff a weight was given.
    pub dweight: Option<Tensor>,
    /// Present iff `with_bias`.
    pub dbias: Option<Tensor>,
}

fn check_params(op: &'static str, x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<()> {
    min_rank(op, x, 1, "x")?;
    let d = x.shape().last();
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            same_device(op, &[x, p])?;
            same_float_dtype(op, &[x, p])?;
            if p.dims() != [d] {
                return Err(Error::shape(
                    op,
                    format!("expected {name} of shape [{d}] for x {}, got {}", x.shape(), p.shape()),
                ));
            }
        }
    }
    Ok(())
}

/// Checks the inputs of a norm backward: `x` and `dy` of one shape and float dtype, `mean` and
/// `rstd` f32 of `x`'s shape without the last dim, `weight` `[d]`.
fn check_bwd(
    op: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
) -> Result<()> {
    same_device(op, &[x, mean, rstd, dy])?;
    same_float_dtype(op, &[x, dy])?;
    check_params(op, x, weight, None)?;
    same_shape(op, x, dy)?;
    let stat_shape = &x.dims()[..x.rank() - 1];
    for (name, s) in [("mean", mean), ("rstd", rstd)] {
        if s.dims() != stat_shape || s.dtype() != crate::DType::F32 {
            return Err(Error::shape(
                op,
                format!("expected f32 {name} of shape {stat_shape:?}, got {:?} {}", s.dtype(), s.shape()),
            ));
        }
    }
    Ok(())
}

/// Normalises each row of `x [.., d]`: `y = xhat * weight + bias` (reference §2; eps 1e-6 in ViT).
pub fn layer_norm_fwd(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<LayerNormOut> {
    same_float_dtype("layer_norm_fwd", &[x])?;
    check_params("layer_norm_fwd", x, weight, bias)?;
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::value("layer_norm_fwd", format!("expected a finite eps > 0, got {eps}")));
    }
    let stat_shape = x.dims()[..x.rank() - 1].to_vec();
    match x.device() {
        Device::Cpu => {
            let w = weight.map(|w| w.cpu_f32("layer_norm_fwd")).transpose()?;
            let b = bias.map(|b| b.cpu_f32("layer_norm_fwd")).transpose()?;
            let (y, mean, rstd) = cpu::layer_norm_fwd(
                &x.cpu_f32("layer_norm_fwd")?,
                x.shape().last(),
                w.as_deref(),
                b.as_deref(),
                eps,
                kind,
            );
            Ok(LayerNormOut {
                y: Tensor::cpu_like(y, x.shape().clone(), x.dtype()),
                mean: Tensor::cpu_like(mean, stat_shape.clone(), crate::DType::F32),
                rstd: Tensor::cpu_like(rstd, stat_shape, crate::DType::F32),
            })
        }
        Device::Cuda(_) => {
            let (_, y, mean, rstd) = cuda::norm::layer_norm_fwd(x, None, weight, bias, eps, kind)?;
            Ok(LayerNormOut { y, mean, rstd })
        }
    }
}

/// Gradients of [`layer_norm_fwd`] given its saved `mean` and `rstd`.
pub fn layer_norm_bwd(
    x: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    kind: NormKind,
    with_bias: bool,
) -> Result<LayerNormGrads> {
    const OP: &str = "layer_norm_bwd";
    check_bwd(OP, x, weight, mean, rstd, dy)?;
    let pdtype = weight.map_or(x.dtype(), |w| w.dtype());
    let d = x.shape().last();
    match x.device() {
        Device::Cpu => {
            let w = weight.map(|w| w.cpu_f32(OP)).transpose()?;
            let (dx, dw, db) = cpu::layer_norm_bwd(
                &x.cpu_f32(OP)?,
                d,
                w.as_deref(),
                &mean.cpu_f32(OP)?,
                &rstd.cpu_f32(OP)?,
                &dy.cpu_f32(OP)?,
                kind,
            );
            Ok(LayerNormGrads {
                dx: Tensor::cpu_like(dx, x.shape().clone(), x.dtype()),
                dweight: weight.map(|_| Tensor::cpu_like(dw, [d], pdtype)),
                dbias: with_bias.then(|| Tensor::cpu_like(db, [d], pdtype)),
            })
        }
        Device::Cuda(_) => {
            let (dx, dweight, dbias) = cuda::norm::layer_norm_bwd(x, weight, mean, rstd, dy, None, kind, with_bias)?;
            Ok(LayerNormGrads { dx, dweight, dbias })
        }
    }
}

/// What [`add_layer_norm_fwd`] returns: the residual sum and its normalisation.
#[derive(Debug, Clone)]
pub struct AddLayerNormOut {
    /// `h = x + r`, the residual stream after the add, `x`'s shape and dtype.
    pub h: Tensor,
    /// `LayerNorm(h)`, `x`'s shape and dtype.
    pub y: Tensor,
    /// Row means of `h`, f32, `x`'s shape without the last dim (zeros for RMS).
    pub mean: Tensor,
    /// Reciprocal standard deviations of `h`'s rows, f32, like `mean`.
    pub rstd: Tensor,
}

/// The residual add of a pre-LN block folded into the norm that follows it: `h = x + r`,
/// `y = LayerNorm(h)` over the last dim of `x, r [.., d]` (one kernel on CUDA; on the CPU
/// exactly [`add`](super::add) then [`layer_norm_fwd`]). `h` is rounded to `x`'s dtype before
/// it is normalised, as in the composition.
pub fn add_layer_norm_fwd(
    x: &Tensor,
    r: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<AddLayerNormOut> {
    const OP: &str = "add_layer_norm_fwd";
    same_device(OP, &[x, r])?;
    same_float_dtype(OP, &[x, r])?;
    same_shape(OP, x, r)?;
    check_params(OP, x, weight, bias)?;
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::value(OP, format!("expected a finite eps > 0, got {eps}")));
    }
    match x.device() {
        Device::Cpu => {
            let h = super::add(x, r)?;
            let out = layer_norm_fwd(&h, weight, bias, eps, kind)?;
            Ok(AddLayerNormOut { h, y: out.y, mean: out.mean, rstd: out.rstd })
        }
        Device::Cuda(_) => {
            let (h, y, mean, rstd) = cuda::norm::layer_norm_fwd(x, Some(r), weight, bias, eps, kind)?;
            let h = h.ok_or_else(|| Error::Cuda(format!("{OP}: the kernel returned no residual sum")))?;
            Ok(AddLayerNormOut { h, y, mean, rstd })
        }
    }
}

/// Backward of [`add_layer_norm_fwd`]: `dh = LayerNorm-backward(dy) + dres`, where `dres`
/// (`h`'s shape) is the gradient reaching `h` through the residual stream; `dh` is the gradient
/// of both `x` and `r`. `h`, `mean`, `rstd` are the forward's. One kernel on CUDA; on the CPU
/// exactly [`layer_norm_bwd`] then [`add`](super::add)`(dres, dx)`.
#[allow(clippy::too_many_arguments)]
pub fn add_layer_norm_bwd(
    h: &Tensor,
    weight: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dres: &Tensor,
    kind: NormKind,
    with_bias: bool,
) -> Result<LayerNormGrads> {
    const OP: &str = "add_layer_norm_bwd";
    check_bwd(OP, h, weight, mean, rstd, dy)?;
    same_device(OP, &[h, dres])?;
    same_float_dtype(OP, &[h, dres])?;
    same_shape(OP, h, dres)?;
    match h.device() {
        Device::Cpu => {
            let g = layer_norm_bwd(h, weight, mean, rstd, dy, kind, with_bias)?;
            Ok(LayerNormGrads { dx: super::add(dres, &g.dx)?, ..g })
        }
        Device::Cuda(_) => {
            let (dx, dweight, dbias) =
                cuda::norm::layer_norm_bwd(h, weight, mean, rstd, dy, Some(dres), kind, with_bias)?;
            Ok(LayerNormGrads { dx, dweight, dbias })
        }
    }
}
