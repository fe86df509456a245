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

    /// `x [.., D] -> [.., D]`.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<(Tensor, MlpSaved)> {
        let h_pre = self.fc1.forward(p, x)?;
        let h = ops::gelu_fwd(&h_pre, self.gelu)?;
        let y = self.fc2.forward(p, &h)?;
        Ok((y, MlpSaved { h_pre, h }))
    }

    /// Accumulates parameter gradients; returns `dx`.
    pub fn backward(
        &self,
        p: &ParamStore,
        x: &Tensor,
        s: &MlpSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let dh = self.fc2.backward(p, &s.h, dy, g)?;
        let dh_pre = ops::gelu_bwd(&s.h_pre, &dh, self.gelu)?;
        self.fc1.backward(p, x, &dh_pre, g)
    }
}
