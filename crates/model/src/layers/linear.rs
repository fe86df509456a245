//! Dense layer `y = x Wᵀ + b`, weights stored `[out, in]` (PyTorch/timm layout, so imports copy).

use super::init::{Fill, ParamSink};
use crate::{ParamStore, Result};
use vit_tensor::{
    ops::{self, Gelu},
    Tensor,
};

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
        Ok(self.forward_with(p, x, None, None)?.y)
    }

    /// `act(x Wᵀ + b)` or `x Wᵀ + b + residual` (`residual [.., out]`; not with `act`), the bias,
    /// GELU and residual fused into the GEMM's epilogue where the device can ([`ops::linear`]);
    /// `pre` holds `x Wᵀ + b` when `act` is given.
    pub fn forward_with(
        &self,
        p: &ParamStore,
        x: &Tensor,
        act: Option<Gelu>,
        residual: Option<&Tensor>,
    ) -> Result<ops::LinearOutput> {
        let bias = self.bias.as_ref().map(|b| p.get(b)).transpose()?;
        Ok(ops::linear(x, p.get(&self.weight)?, bias, act, residual)?)
    }

    /// Accumulates the weight and bias gradients into `g`; returns `dx`.
    pub fn backward(&self, p: &ParamStore, x: &Tensor, dy: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        self.accumulate_grads(x, dy, g, true)?;
        self.backward_data(p, dy)
    }

    /// `dx = dy W` (`dy [.., out] -> [.., in]`), the data gradient alone.
    pub fn backward_data(&self, p: &ParamStore, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::matmul_t(dy, p.get(&self.weight)?, false, false)?)
    }

    /// `g[weight] += dyᵀ x` and, with `with_bias` (and a bias), `g[bias] += Σ dy`: accumulated
    /// in place into `g`'s buffer on CUDA ([`ops::linear_wgrad`]).
    pub fn accumulate_grads(&self, x: &Tensor, dy: &Tensor, g: &mut ParamStore, with_bias: bool) -> Result<()> {
        let bias = if with_bias { self.bias.as_deref() } else { None };
        Ok(ops::linear_wgrad(g, &self.weight, bias, x, dy)?)
    }
}
