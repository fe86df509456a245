//! Dense layer `y = x Wᵀ + b`, weights stored `[out, in]` (PyTorch/timm layout, so imports copy).

use super::init::{Fill, ParamSink};
use crate::{ParamStore, Result};
use vit_tensor::{ops, Tensor};

/// A dense layer's parameter names and sizes.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `{name}.weight`, `[out_dim, in_dim]`.
    pub weight: String,
    /// `{name}.bias`, `[out_dim]`, if the layer has one.
    pub bias: Option<String>,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
}

impl Linear {
    /// The layer `{name}` mapping `in_dim` to `out_dim` features, with or without bias.
    pub fn new(name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Self {
        Linear { weight: format!("{name}.weight"), bias: bias.then(|| format!("{name}.bias")), in_dim, out_dim }
    }

    /// Adds the parameters: `weight` filled by `fill`, the bias by `bias_fill`.
    pub fn init(&self, sink: &mut dyn ParamSink, fill: Fill, bias_fill: Fill) -> Result<()> {
        sink.add(&self.weight, &[self.out_dim, self.in_dim], fill)?;
        if let Some(b) = &self.bias {
            sink.add(b, &[self.out_dim], bias_fill)?;
        }
        Ok(())
    }

    /// Xavier-uniform kernel and zero bias (big_vision's Dense defaults).
    pub fn init_default(&self, sink: &mut dyn ParamSink) -> Result<()> {
        self.init(sink, Fill::Xavier { fan_in: self.in_dim, fan_out: self.out_dim }, Fill::Zeros)
    }

    /// `x [.., in] -> [.., out]`.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let y = ops::matmul_t(x, p.get(&self.weight)?, false, true)?;
        Ok(match &self.bias {
            Some(b) => ops::bias_add(&y, p.get(b)?)?,
            None => y,
        })
    }

    /// Accumulates the weight and bias gradients into `g`; returns `dx`.
    pub fn backward(&self, p: &ParamStore, x: &Tensor, dy: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        let (dx, dw) = ops::matmul_bwd(x, p.get(&self.weight)?, dy, false, true)?;
        g.accumulate(&self.weight, &dw)?;
        if let Some(b) = &self.bias {
            g.accumulate(b, &ops::bias_add_bwd(dy)?)?;
        }
        Ok(dx)
    }
}
