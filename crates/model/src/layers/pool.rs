//! Pooling the encoded tokens into one vector per image: class token, global average (GAP),
//! or multihead attention pooling (MAP: a learned probe attends to the tokens, reference §2).

use super::{
    heads::{HeadAttention, HeadSaved},
    init::{Fill, ParamSink},
    linear::Linear,
    mlp::{Mlp, MlpSaved},
    norm::{Norm, NormSaved},
};
use crate::{ModelConfig, ParamStore, Pool, Result};
use vit_tensor::{ops, Tensor};

/// How tokens `[batch, T, D]` become `[batch, D]`.
#[derive(Debug, Clone)]
pub enum Pooling {
    /// Token 0 (the class token).
    Tok,
    /// Mean over tokens.
    Gap,
    /// timm's `AttentionPoolLatent` names: `attn_pool.{latent,q,kv,proj,norm,mlp}`.
    Map(Box<MapHead>),
}

/// The MAP head: probe → attention over the tokens → `y = LN(x)` → `x + MLP(y)` → `x[:, 0]`;
/// no LN before the attention and no residual from the probe (big_vision `MAPHead`).
#[derive(Debug, Clone)]
pub struct MapHead {
    width: usize,
    q: Linear,
    kv: Linear,
    core: HeadAttention,
    proj: Linear,
    norm: Norm,
    mlp: Mlp,
}

/// What pooling's backward needs.
#[derive(Debug, Clone)]
pub enum PoolSaved {
    /// Class-token pooling of tokens with these dims, `[B, T, D]`.
    Tok(Vec<usize>),
    /// Average pooling of tokens with these dims, `[B, T, D]`.
    Gap(Vec<usize>),
    /// The MAP head's activations.
    Map(Box<MapSaved>),
}

/// Activations of the MAP head, for tokens `[B, T, D]` (one probe query per image; M = mlp_dim).
#[derive(Debug, Clone)]
pub struct MapSaved {
    /// The encoded tokens, input of the `kv` projection, `[B, T, D]`.
    x: Tensor,
    /// The probe broadcast over the batch, input of the `q` projection, `[B, 1, D]`.
    probe: Tensor,
    /// The attention core's activations: 1 query, T keys.
    heads: HeadSaved,
    /// Attention output with the heads merged, input of `proj`, `[B, 1, D]`.
    merged: Tensor,
    /// Output of `proj` (also the residual into the MLP's output), `[B, 1, D]`.
    a: Tensor,
    /// `LN(a)`, input of the MLP, `[B, 1, D]`.
    n: Tensor,
    /// The LayerNorm's statistics, `[B, 1]`.
    ns: NormSaved,
    /// The MLP's activations, `[B, 1, M]`.
    mlp: MlpSaved,
}

impl Pooling {
    /// The pooling `cfg.pool` selects.
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.width;
        match cfg.pool {
            Pool::Tok => Pooling::Tok,
            Pool::Gap => Pooling::Gap,
            Pool::Map => Pooling::Map(Box::new(MapHead {
                width: d,
                // Always biased, whatever `qkv_bias` (an encoder-block switch) says: big_vision's
                // MAPHead uses a biased MultiHeadDotProductAttention and timm's
                // AttentionPoolLatent has `q.bias`/`kv.bias` even in `qkv_bias=False` models.
                q: Linear::new("attn_pool.q", d, d, true),
                kv: Linear::new("attn_pool.kv", d, 2 * d, true),
                core: HeadAttention { heads: cfg.heads, head_dim: cfg.head_dim(), q_norm: None, k_norm: None },
                proj: Linear::new("attn_pool.proj", d, d, true),
                norm: Norm::new("attn_pool.norm", d, cfg.norm_bias),
                mlp: Mlp::new("attn_pool.mlp", d, cfg.mlp_dim, super::block::gelu_of(cfg)),
            })),
        }
    }

    /// Adds the MAP head's parameters (the other poolings have none).
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        if let Pooling::Map(m) = self {
            // big_vision: probe xavier_uniform over (1, 1, D): fan_in 1, fan_out D.
            sink.add("attn_pool.latent", &[1, 1, m.width], Fill::Xavier { fan_in: 1, fan_out: m.width })?;
            m.q.init_default(sink)?;
            m.kv.init_default(sink)?;
            m.proj.init_default(sink)?;
            m.norm.init(sink)?;
            m.mlp.init(sink)?;
        }
        Ok(())
    }

    /// `x [batch, T, D] -> [batch, D]`.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<(Tensor, PoolSaved)> {
        let (b, d) = (x.dims()[0], x.dims()[2]);
        match self {
            Pooling::Tok => Ok((ops::slice(x, 1, 0, 1)?.reshape([b, d])?, PoolSaved::Tok(x.dims().to_vec()))),
            Pooling::Gap => Ok((ops::mean(x, 1)?, PoolSaved::Gap(x.dims().to_vec()))),
            Pooling::Map(m) => {
                let probe = ops::broadcast(&p.get("attn_pool.latent")?.reshape([1, d])?, 0, b)?; // [b, 1, d]
                let q = m.q.forward(p, &probe)?;
                let kv = m.kv.forward(p, x)?;
                let (k, v) = (ops::slice(&kv, 2, 0, d)?, ops::slice(&kv, 2, d, d)?);
                let (merged, heads) = m.core.forward(p, &q, &k, &v)?;
                let a = m.proj.forward(p, &merged)?;
                let (n, ns) = m.norm.forward(p, &a)?;
                let (y, mlp) = m.mlp.forward_with(p, &n, Some(&a))?; // a + mlp(n), fused
                let y = y.reshape([b, d])?;
                Ok((y, PoolSaved::Map(Box::new(MapSaved { x: x.clone(), probe, heads, merged, a, n, ns, mlp }))))
            }
        }
    }

    /// Accumulates parameter gradients; returns the gradient of the tokens.
    pub fn backward(&self, p: &ParamStore, s: &PoolSaved, dy: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        match (self, s) {
            (Pooling::Tok, PoolSaved::Tok(dims)) => {
                Ok(ops::pad_along(&dy.reshape([dims[0], 1, dims[2]])?, dims, 1, 0)?)
            }
            (Pooling::Gap, PoolSaved::Gap(dims)) => Ok(ops::mean_bwd(dy, dims, 1)?),
            (Pooling::Map(m), PoolSaved::Map(s)) => {
                let (b, d) = (dy.dims()[0], m.width);
                let dy = dy.reshape([b, 1, d])?;
                let dn = m.mlp.backward(p, &s.n, &s.mlp, &dy, g)?;
                let da = m.norm.backward_add(p, &s.a, &s.ns, &dn, &dy, g)?;
                let dmerged = m.proj.backward(p, &s.merged, &da, g)?;
                let (dq, dk, dv) = m.core.backward(p, &s.heads, &dmerged, g)?;
                let dprobe = m.q.backward(p, &s.probe, &dq, g)?;
                g.accumulate("attn_pool.latent", &ops::sum(&dprobe, 0)?.reshape([1, 1, d])?)?;
                m.kv.backward(p, &s.x, &ops::concat(&[&dk, &dv], 2)?, g)
            }
            _ => Err(crate::ModelError::Param {
                name: "pool".into(),
                msg: "saved activations are of another pooling".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::init::ShapeList;

    fn map_shapes(qkv_bias: bool) -> Vec<(String, Vec<usize>)> {
        let mut cfg = ModelConfig::custom();
        for s in ["width=32", "heads=4", "mlp_dim=64", "pool=map", "norm_bias=false"] {
            cfg.set(s).unwrap();
        }
        cfg.qkv_bias = qkv_bias;
        let mut list = ShapeList(Vec::new());
        Pooling::new(&cfg).init(&mut list).unwrap();
        list.0
    }

    #[test]
    fn map_head_attention_keeps_its_biases_without_qkv_bias() {
        let shapes = map_shapes(false);
        for (name, dims) in [("attn_pool.q.bias", [32]), ("attn_pool.kv.bias", [64]), ("attn_pool.proj.bias", [32])] {
            let found = shapes.iter().find(|(n, _)| n == name);
            assert_eq!(found.map(|(_, d)| d.as_slice()), Some(&dims[..]), "{name} in {shapes:?}");
        }
        // norm_bias still applies to the head's LayerNorm.
        assert!(!shapes.iter().any(|(n, _)| n == "attn_pool.norm.bias"), "{shapes:?}");
        assert_eq!(shapes, map_shapes(true), "qkv_bias is an encoder-block setting only");
    }
}
