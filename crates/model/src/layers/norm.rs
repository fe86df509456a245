//! LayerNorm (or RMSNorm) over the last dim with a scale and an optional bias (ViT-22B drops it).

use super::init::{Fill, ParamSink};
use crate::{ParamStore, Result};
use vit_tensor::{
    ops::{self, NormKind},
    Tensor,
};

/// LayerNorm epsilon of ViT (reference §2).
pub const LAYER_NORM_EPS: f32 = 1e-6;

/// A norm layer's parameter names.
#[derive(Debug, Clone)]
pub struct Norm {
    /// `{name}.weight`, `[dim]`.
    pub weight: String,
    /// `{name}.bias`, `[dim]`, if any.
    pub bias: Option<String>,
    /// Normalised (last) dimension.
    pub dim: usize,
    /// Centred LayerNorm or RMSNorm.
    pub kind: NormKind,
}

/// What a norm's backward needs from its forward (besides its input `[.., dim]`).
#[derive(Debug, Clone)]
pub struct NormSaved {
    /// Row means, f32, the input's shape without the last dim (`[B, T]` for tokens
    /// `[B, T, D]`); zeros for RMSNorm.
    mean: Tensor,
    /// Reciprocal standard deviations `1/sqrt(var + eps)`, f32, shaped like `mean`.
    rstd: Tensor,
}

impl Norm {
    /// A centred LayerNorm `{name}` over `dim` features, with or without bias.
    pub fn new(name: &str, dim: usize, bias: bool) -> Self {
        Norm {
            weight: format!("{name}.weight"),
            bias: bias.then(|| format!("{name}.bias")),
            dim,
            kind: NormKind::LayerNorm,
        }
    }

    /// Scale 1, bias 0.
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        sink.add(&self.weight, &[self.dim], Fill::Ones)?;
        if let Some(b) = &self.bias {
            sink.add(b, &[self.dim], Fill::Zeros)?;
        }
        Ok(())
    }

    /// `x [.., dim]` normalised per row.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<(Tensor, NormSaved)> {
        let b = self.bias.as_ref().map(|b| p.get(b)).transpose()?;
        let out = ops::layer_norm_fwd(x, Some(p.get(&self.weight)?), b, LAYER_NORM_EPS, self.kind)?;
        Ok((out.y, NormSaved { mean: out.mean, rstd: out.rstd }))
    }

    /// The residual add before the norm folded into it: `h = x + r` and `norm(h)` for
    /// `x, r [.., dim]` (one kernel on CUDA; on the CPU exactly `add` then the norm). Returns
    /// `(h, norm(h), saved)`; `h` is the input [`Norm::backward_add`] takes.
    pub fn forward_add(&self, p: &ParamStore, x: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor, NormSaved)> {
        let b = self.bias.as_ref().map(|b| p.get(b)).transpose()?;
        let out = ops::add_layer_norm_fwd(x, r, Some(p.get(&self.weight)?), b, LAYER_NORM_EPS, self.kind)?;
        Ok((out.h, out.y, NormSaved { mean: out.mean, rstd: out.rstd }))
    }

    /// Accumulates scale and bias gradients; returns `dx`.
    pub fn backward(
        &self,
        p: &ParamStore,
        x: &Tensor,
        s: &NormSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let w = p.get(&self.weight)?;
        let grads = ops::layer_norm_bwd(x, Some(w), &s.mean, &s.rstd, dy, self.kind, self.bias.is_some())?;
        self.accumulate(grads, g)
    }

    /// Backward of a norm whose input `x` also feeds a residual stream that brings back the
    /// gradient `dres` (`x`'s shape): accumulates scale and bias gradients and returns the total
    /// `dx = dnorm + dres` (one kernel on CUDA; on the CPU exactly the backward then `add`).
    pub fn backward_add(
        &self,
        p: &ParamStore,
        x: &Tensor,
        s: &NormSaved,
        dy: &Tensor,
        dres: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let w = p.get(&self.weight)?;
        let grads = ops::add_layer_norm_bwd(x, Some(w), &s.mean, &s.rstd, dy, dres, self.kind, self.bias.is_some())?;
        self.accumulate(grads, g)
    }

    fn accumulate(&self, grads: ops::LayerNormGrads, g: &mut ParamStore) -> Result<Tensor> {
        if let Some(dw) = &grads.dweight {
            g.accumulate(&self.weight, dw)?;
        }
        if let (Some(b), Some(db)) = (&self.bias, &grads.dbias) {
            g.accumulate(b, db)?;
        }
        Ok(grads.dx)
    }
}
