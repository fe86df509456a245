//! The MLP block: Dense(M) → GELU → Dense(D) (reference §2).

use super::{init::Fill, init::ParamSink, linear::Linear};
use crate::{ParamStore, Result};
use vit_tensor::{
    ops::{self, Gelu},
    Tensor,
};

/// `{name}.fc1` and `{name}.fc2` with biases.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `D -> M`.
    pub fc1: Linear,
    /// `M -> D`.
    pub fc2: Linear,
    /// tanh approximation (big_vision) or exact erf (timm).
    pub gelu: Gelu,
}

/// Activations of [`Mlp::forward`] for an input `[.., D]` (`[B, T, D]` in a block, `[B, 1, D]`
/// in the MAP head), with hidden width M.
#[derive(Debug, Clone)]
pub struct MlpSaved {
    /// `fc1`'s output, before the GELU, `[.., M]`.
    h_pre: Tensor,
    /// `GELU(h_pre)`, input of `fc2`, `[.., M]`.
    h: Tensor,
}

impl Mlp {
    /// The MLP `{name}`: `dim -> hidden -> dim`.
    pub fn new(name: &str, dim: usize, hidden: usize, gelu: Gelu) -> Self {
        Mlp {
            fc1: Linear::new(&format!("{name}.fc1"), dim, hidden, true),
            fc2: Linear::new(&format!("{name}.fc2"), hidden, dim, true),
            gelu,
        }
    }

    /// Xavier kernels, biases normal(1e-6) as big_vision's MlpBlock.
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        for l in [&self.fc1, &self.fc2] {
            l.init(sink, Fill::Xavier { fan_in: l.in_dim, fan_out: l.out_dim }, Fill::Normal { std: 1e-6 })?;
        }
        Ok(())
    }

    /// `x [.., D] -> [.., D]`. On CUDA in bf16/f16, fc1's bias and a tanh GELU run in its
    /// GEMM's epilogue (cuBLASLt GELU_AUX_BIAS), which also keeps the pre-activation.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<(Tensor, MlpSaved)> {
        self.forward_with(p, x, None)
    }

    /// [`Mlp::forward`] with `residual [.., D]` added to the output in fc2's epilogue
    /// (`residual + MLP(x)`, the block's second residual add).
    pub fn forward_with(&self, p: &ParamStore, x: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, MlpSaved)> {
        let out = self.fc1.forward_with(p, x, Some(self.gelu), None)?;
        let h = out.y;
        // ops::linear returns the pre-activation whenever it applied an activation.
        let h_pre = match out.pre {
            Some(pre) => pre,
            None => {
                ops::linear(
                    x,
                    p.get(&self.fc1.weight)?,
                    self.fc1.bias.as_ref().map(|b| p.get(b)).transpose()?,
                    None,
                    None,
                )?
                .y
            }
        };
        let y = self.fc2.forward_with(p, &h, None, residual)?.y;
        Ok((y, MlpSaved { h_pre, h }))
    }

    /// Accumulates parameter gradients; returns `dx`. fc2's dgrad, the GELU's backward and
    /// fc1's bias gradient are one GEMM on CUDA (DGELU_BGRAD, tanh GELU); the weight gradients
    /// accumulate in place into `g` with fc2's bias gradient alongside (BGRADB).
    pub fn backward(
        &self,
        p: &ParamStore,
        x: &Tensor,
        s: &MlpSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        self.fc2.accumulate_grads(&s.h, dy, g, true)?;
        let (dh_pre, db1) = ops::linear_dgrad_gelu(dy, p.get(&self.fc2.weight)?, &s.h_pre, self.gelu)?;
        if let Some(b) = &self.fc1.bias {
            g.accumulate(b, &db1)?;
        }
        self.fc1.accumulate_grads(x, &dh_pre, g, false)?;
        self.fc1.backward_data(p, &dh_pre)
    }
}
