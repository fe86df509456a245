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
            let (y, mean, rstd) = cuda::norm::layer_norm_fwd(x, weight, bias, eps, kind)?;
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
    same_device(OP, &[x, mean, rstd, dy])?;
    same_float_dtype(OP, &[x, dy])?;
    check_params(OP, x, weight, None)?;
    same_shape(OP, x, dy)?;
    let stat_shape = &x.dims()[..x.rank() - 1];
    for (name, s) in [("mean", mean), ("rstd", rstd)] {
        if s.dims() != stat_shape || s.dtype() != crate::DType::F32 {
            return Err(Error::shape(
                OP,
                format!("expected f32 {name} of shape {stat_shape:?}, got {:?} {}", s.dtype(), s.shape()),
            ));
        }
    }
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
            let (dx, dweight, dbias) = cuda::norm::layer_norm_bwd(x, weight, mean, rstd, dy, kind, with_bias)?;
            Ok(LayerNormGrads { dx, dweight, dbias })
        }
    }
}
