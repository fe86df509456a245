//! Multi-head attention on already-projected q, k, v: split into heads, optional QK-norm
//! (ViT-22B, reference §2), softmax attention, merge heads. Shared by the sequential block,
//! the parallel block and the MAP head. The blocks use the packed entry points
//! ([`HeadAttention::forward_packed`]), which read q, k, v straight from the projection output.

use super::norm::{Norm, NormSaved};
use crate::{ParamStore, Result};
use vit_tensor::{ops, Tensor};

/// `[batch, tokens, heads·head_dim] -> [batch, heads, tokens, head_dim]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    Ok(ops::permute(&x.reshape([b, t, heads, d / heads])?, &[0, 2, 1, 3])?)
}

/// `[batch, heads, tokens, head_dim] -> [batch, tokens, heads·head_dim]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, dh) = (x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]);
    Ok(ops::permute(x, &[0, 2, 1, 3])?.reshape([b, t, h * dh])?)
}

/// The attention core: heads and the optional QK-norm (one scale of size head_dim shared
/// across heads, as in flax and timm).
#[derive(Debug, Clone)]
pub struct HeadAttention {
    /// Number of heads.
    pub heads: usize,
    /// Width of each head (`D / heads`).
    pub head_dim: usize,
    /// QK-norm of the queries, over `head_dim`.
    pub q_norm: Option<Norm>,
    /// QK-norm of the keys, over `head_dim`.
    pub k_norm: Option<Norm>,
}

/// Activations [`HeadAttention::backward`] needs, for `q [B, Tq, D]` and `k, v [B, Tk, D]`
/// with H heads of width dh = D / H.
#[derive(Debug, Clone)]
pub struct HeadSaved {
    inner: Saved,
}

#[derive(Debug, Clone)]
enum Saved {
    /// From [`HeadAttention::forward`] (and the packed path with QK-norm): heads as copies.
    Split(Box<SplitSaved>),
    /// From [`HeadAttention::forward_packed`] without QK-norm: no copies of the heads.
    Packed {
        /// The packed projection `[B, T, 3D]` (q, k, v blocks).
        qkv: Tensor,
        /// Attention output with the heads merged, `[B, T, D]`.
        o: Tensor,
        /// Log-sum-exp of each query's scaled scores, f32 `[B, H, T]`.
        lse: Tensor,
    },
}

#[derive(Debug, Clone)]
struct SplitSaved {
    /// Queries split into heads, before QK-norm, `[B, H, Tq, dh]`.
    q_raw: Tensor,
    /// Keys split into heads, before QK-norm, `[B, H, Tk, dh]`.
    k_raw: Tensor,
    /// Queries as attention saw them (after QK-norm, if any), `[B, H, Tq, dh]`.
    q: Tensor,
    /// Keys as attention saw them (after QK-norm, if any), `[B, H, Tk, dh]`.
    k: Tensor,
    /// Values split into heads, `[B, H, Tk, dh]`.
    v: Tensor,
    /// QK-norm statistics of the queries, `[B, H, Tq]`; `None` without QK-norm.
    qn: Option<NormSaved>,
    /// QK-norm statistics of the keys, `[B, H, Tk]`; `None` without QK-norm.
    kn: Option<NormSaved>,
    /// Attention output per head, `[B, H, Tq, dh]`.
    o: Tensor,
    /// Log-sum-exp of each query's scaled scores, f32 `[B, H, Tq]`.
    lse: Tensor,
}

/// q, k, v slices `[.., D]` of a projection `[.., channels]` with blocks of `d` channels from `offset`.
fn split_qkv(z: &Tensor, offset: usize, d: usize) -> Result<[Tensor; 3]> {
    let last = z.rank() - 1;
    Ok([ops::slice(z, last, offset, d)?, ops::slice(z, last, offset + d, d)?, ops::slice(z, last, offset + 2 * d, d)?])
}

impl HeadAttention {
    /// `q [batch, queries, D]`, `k, v [batch, keys, D]` -> `[batch, queries, D]`.
    pub fn forward(&self, p: &ParamStore, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, HeadSaved)> {
        let (q_raw, k_raw) = (split_heads(q, self.heads)?, split_heads(k, self.heads)?);
        let v = split_heads(v, self.heads)?;
        let (q, qn) = norm_opt(&self.q_norm, p, &q_raw)?;
        let (k, kn) = norm_opt(&self.k_norm, p, &k_raw)?;
        let out = ops::attention_fwd(&q, &k, &v, self.scale())?;
        let merged = merge_heads(&out.o)?;
        Ok((
            merged,
            HeadSaved {
                inner: Saved::Split(Box::new(SplitSaved { q_raw, k_raw, q, k, v, qn, kn, o: out.o, lse: out.lse })),
            },
        ))
    }

    /// Self-attention on a packed projection `z [batch, tokens, channels]` whose q, k, v are the
    /// blocks of D = heads·head_dim channels from channel `offset` (`offset` 0 for the qkv
    /// projection `[B, T, 3D]`, `mlp_dim` for the parallel block's `[B, T, M+3D]`) ->
    /// `[batch, tokens, D]`. Without QK-norm the heads are never copied out
    /// ([`ops::attention_fwd_packed`]; the flash kernels read them in place on CUDA); with it,
    /// this is [`HeadAttention::forward`] on slices.
    pub fn forward_packed(&self, p: &ParamStore, z: &Tensor, offset: usize) -> Result<(Tensor, HeadSaved)> {
        let d = self.heads * self.head_dim;
        if self.q_norm.is_some() || self.k_norm.is_some() {
            let [q, k, v] = split_qkv(z, offset, d)?;
            return self.forward(p, &q, &k, &v);
        }
        // Keep only the q, k, v channels for backward (one copy when z holds more, e.g. the MLP's).
        let last = z.rank() - 1;
        let (qkv, offset) = if offset == 0 && z.dims()[last] == 3 * d {
            (z.clone(), 0)
        } else {
            (ops::slice(z, last, offset, 3 * d)?, 0)
        };
        let out = ops::attention_fwd_packed(&qkv, offset, d, self.heads, self.scale())?;
        Ok((out.o.clone(), HeadSaved { inner: Saved::Packed { qkv, o: out.o, lse: out.lse } }))
    }

    /// Gradient of [`HeadAttention::forward_packed`] with respect to the q, k, v channels:
    /// `[batch, tokens, 3D]` (dq, dk, dv blocks).
    pub fn backward_packed(&self, p: &ParamStore, s: &HeadSaved, dy: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        match &s.inner {
            Saved::Packed { qkv, o, lse } => {
                let d = self.heads * self.head_dim;
                Ok(ops::attention_bwd_packed(qkv, 0, d, self.heads, o, lse, dy, self.scale())?)
            }
            Saved::Split(_) => {
                let (dq, dk, dv) = self.backward(p, s, dy, g)?;
                Ok(ops::concat(&[&dq, &dk, &dv], 2)?)
            }
        }
    }

    /// The softmax scale `1 / sqrt(head_dim)`.
    fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }

    /// Returns `(dq, dk, dv)` in the input layout `[batch, tokens, D]`.
    pub fn backward(
        &self,
        p: &ParamStore,
        s: &HeadSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q_raw, k_raw, q, k, v, qn, kn, o, lse) = match &s.inner {
            Saved::Split(s) => (&s.q_raw, &s.k_raw, &s.q, &s.k, &s.v, &s.qn, &s.kn, &s.o, &s.lse),
            Saved::Packed { .. } => {
                // Saved by forward_packed: its gradient, sliced.
                let dqkv = self.backward_packed(p, s, dy, g)?;
                let [dq, dk, dv] = split_qkv(&dqkv, 0, self.heads * self.head_dim)?;
                return Ok((dq, dk, dv));
            }
        };
        let d_o = split_heads(dy, self.heads)?;
        let gr = ops::attention_bwd(q, k, v, o, lse, &d_o, self.scale())?;
        let dq = norm_opt_bwd(&self.q_norm, p, q_raw, qn.as_ref(), gr.dq, g)?;
        let dk = norm_opt_bwd(&self.k_norm, p, k_raw, kn.as_ref(), gr.dk, g)?;
        Ok((merge_heads(&dq)?, merge_heads(&dk)?, merge_heads(&gr.dv)?))
    }
}

fn norm_opt(norm: &Option<Norm>, p: &ParamStore, x: &Tensor) -> Result<(Tensor, Option<NormSaved>)> {
    match norm {
        Some(n) => {
            let (y, s) = n.forward(p, x)?;
            Ok((y, Some(s)))
        }
        None => Ok((x.clone(), None)),
    }
}

fn norm_opt_bwd(
    norm: &Option<Norm>,
    p: &ParamStore,
    x: &Tensor,
    s: Option<&NormSaved>,
    dy: Tensor,
    g: &mut ParamStore,
) -> Result<Tensor> {
    match (norm, s) {
        (Some(n), Some(s)) => n.backward(p, x, s, &dy, g),
        _ => Ok(dy),
    }
}
