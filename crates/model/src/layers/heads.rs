//! Multi-head attention on already-projected q, k, v: split into heads, optional QK-norm
//! (ViT-22B, reference §2), softmax attention, merge heads. Shared by the sequential block,
//! the parallel block and the MAP head.

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

impl HeadAttention {
    /// `q [batch, queries, D]`, `k, v [batch, keys, D]` -> `[batch, queries, D]`.
    pub fn forward(&self, p: &ParamStore, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, HeadSaved)> {
        let (q_raw, k_raw) = (split_heads(q, self.heads)?, split_heads(k, self.heads)?);
        let v = split_heads(v, self.heads)?;
        let (q, qn) = norm_opt(&self.q_norm, p, &q_raw)?;
        let (k, kn) = norm_opt(&self.k_norm, p, &k_raw)?;
        let out = ops::attention_fwd(&q, &k, &v, (self.head_dim as f32).powf(-0.5))?;
        let merged = merge_heads(&out.o)?;
        Ok((merged, HeadSaved { q_raw, k_raw, q, k, v, qn, kn, o: out.o, lse: out.lse }))
    }

    /// Returns `(dq, dk, dv)` in the input layout `[batch, tokens, D]`.
    pub fn backward(
        &self,
        p: &ParamStore,
        s: &HeadSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d_o = split_heads(dy, self.heads)?;
        let gr = ops::attention_bwd(&s.q, &s.k, &s.v, &s.o, &s.lse, &d_o, (self.head_dim as f32).powf(-0.5))?;
        let dq = norm_opt_bwd(&self.q_norm, p, &s.q_raw, s.qn.as_ref(), gr.dq, g)?;
        let dk = norm_opt_bwd(&self.k_norm, p, &s.k_raw, s.kn.as_ref(), gr.dk, g)?;
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
