//! Encoder blocks (reference §2). Sequential (ViT): `x += Attn(LN1(x)); x += MLP(LN2(x))`.
//! Parallel (ViT-22B): `y = x + Attn(LN(x)) + MLP(LN(x))` with one LN, the input projections
//! fused into one `D → M + 3D` matmul (timm's split order: mlp, q, k, v) and the output
//! projections into one `(D + M) → D` matmul.

use super::{
    heads::{HeadAttention, HeadSaved},
    init::{Fill, ParamSink},
    linear::Linear,
    mlp::{Mlp, MlpSaved},
    moe::{mix_seed, MoeMlp, MoeSaved, MoeStats},
    moe_parallel::MoeParallelSaved,
    norm::{Norm, NormSaved},
};
use crate::{BlockKind, ModelConfig, ParamStore, Result};
use vit_collective::Communicator;

mod tensor_parallel;
pub(crate) use tensor_parallel::check_divisible;
pub use tensor_parallel::{ModelAxis, TpParallelSaved, TpSaved, TpSequentialSaved};
use vit_tensor::{
    ops::{self, Gelu},
    Tensor,
};

/// One encoder block, either kind.
#[derive(Debug, Clone)]
pub enum Block {
    /// Pre-LN ViT block.
    Sequential(SequentialBlock),
    /// ViT-22B parallel block.
    Parallel(ParallelBlock),
}

/// What a block's backward needs; with activation checkpointing only the input is kept and
/// this is rebuilt by running the forward again.
#[derive(Debug, Clone)]
pub enum BlockSaved {
    /// Of a sequential block.
    Sequential(Box<SequentialSaved>),
    /// Of a parallel block.
    Parallel(Box<ParallelSaved>),
}

/// `{prefix}.norm1`, `{prefix}.attn.{qkv,q_norm,k_norm,proj}`, `{prefix}.norm2`, `{prefix}.mlp` (timm's names);
/// `{prefix}.moe` instead of `{prefix}.mlp` in a V-MoE block.
#[derive(Debug, Clone)]
pub struct SequentialBlock {
    norm1: Norm,
    qkv: Linear,
    core: HeadAttention,
    proj: Linear,
    norm2: Norm,
    mlp: Ffn,
}

/// The feed-forward half of a sequential block: the dense MLP or a sparse MoE of MLPs.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense(M) → GELU → Dense(D).
    Dense(Mlp),
    /// V-MoE's mixture of experts.
    Moe(Box<MoeMlp>),
}

/// The feed-forward half's activations.
#[derive(Debug, Clone)]
pub enum FfnSaved {
    /// Of a dense MLP, `[B, T, M]`.
    Dense(MlpSaved),
    /// Of a MoE MLP.
    Moe(Box<MoeSaved>),
    /// Of a MoE MLP whose experts are sharded over ranks ([`MoeMlp::forward_parallel`]).
    MoeParallel(Box<MoeParallelSaved>),
}

/// Activations of a sequential block with input `x [B, T, D]` (T tokens, M = mlp_dim).
#[derive(Debug, Clone)]
pub struct SequentialSaved {
    /// `norm1(x)`, input of the qkv projection, `[B, T, D]`.
    n1: Tensor,
    /// `norm1`'s statistics, `[B, T]`.
    s1: NormSaved,
    /// The attention core's activations (T queries, T keys).
    heads: HeadSaved,
    /// Attention output with the heads merged, input of `attn.proj`, `[B, T, D]`.
    merged: Tensor,
    /// `x + attention`, the residual stream between the two halves, `[B, T, D]`.
    x1: Tensor,
    /// `norm2(x1)`, input of the MLP, `[B, T, D]`.
    n2: Tensor,
    /// `norm2`'s statistics, `[B, T]`.
    s2: NormSaved,
    /// The MLP's (or MoE's) activations.
    mlp: FfnSaved,
}

/// `{prefix}.in_norm`, `{prefix}.in_proj`, `{prefix}.mlp_bias` (without QKV bias),
/// `{prefix}.q_norm`, `{prefix}.k_norm`, `{prefix}.out_proj` (timm's ParallelScalingBlock, fused).
#[derive(Debug, Clone)]
pub struct ParallelBlock {
    in_norm: Norm,
    in_proj: Linear,
    mlp_bias: Option<String>,
    core: HeadAttention,
    out_proj: Linear,
    gelu: Gelu,
    width: usize,
    mlp_dim: usize,
}

/// Activations of a parallel block with input `x [B, T, D]` (T tokens, M = mlp_dim). The
/// fused in-projection's output `[B, T, M+3D]` is not kept: its MLP part is `u`, its q, k, v
/// parts are in `heads`.
#[derive(Debug, Clone)]
pub struct ParallelSaved {
    /// `in_norm(x)`, input of the fused in-projection, `[B, T, D]`.
    h: Tensor,
    /// `in_norm`'s statistics, `[B, T]`.
    s: NormSaved,
    /// The MLP's pre-activation (with `mlp_bias`, if any), `[B, T, M]`.
    u: Tensor,
    /// The attention core's activations (T queries, T keys).
    heads: HeadSaved,
    /// `[attention output, GELU(u)]`, input of the fused out-projection, `[B, T, D+M]`.
    cat: Tensor,
}

fn qk_norms(prefix: &str, cfg: &ModelConfig) -> (Option<Norm>, Option<Norm>) {
    let dh = cfg.head_dim();
    let make = |n: &str| cfg.qk_norm.then(|| Norm::new(&format!("{prefix}.{n}"), dh, cfg.norm_bias));
    (make("q_norm"), make("k_norm"))
}

pub(crate) fn gelu_of(cfg: &ModelConfig) -> Gelu {
    match cfg.gelu {
        crate::Gelu::Tanh => Gelu::Tanh,
        crate::Gelu::Erf => Gelu::Erf,
    }
}

impl BlockSaved {
    /// What a MoE block's forward measured; `None` for a dense block.
    pub fn moe_stats(&self) -> Option<&MoeStats> {
        match self {
            BlockSaved::Sequential(s) => match &s.mlp {
                FfnSaved::Moe(m) => Some(&m.stats),
                FfnSaved::MoeParallel(m) => Some(&m.stats),
                FfnSaved::Dense(_) => None,
            },
            BlockSaved::Parallel(_) => None,
        }
    }
}

/// The router-noise seed of block `index` in a forward pass with noise seed `seed`.
pub fn block_noise_seed(seed: u64, index: usize) -> u64 {
    mix_seed(seed, index as u64)
}

impl Block {
    /// Block `index` of a model with config `cfg`.
    pub fn new(index: usize, cfg: &ModelConfig) -> Self {
        let prefix = format!("blocks.{index}");
        let (d, m) = (cfg.width, cfg.mlp_dim);
        // timm keeps the QK norms under `attn` in the sequential block, on the block in the parallel one.
        let norm_prefix = match cfg.block {
            BlockKind::Sequential => format!("{prefix}.attn"),
            BlockKind::Parallel => prefix.clone(),
        };
        let (q_norm, k_norm) = qk_norms(&norm_prefix, cfg);
        let core = HeadAttention { heads: cfg.heads, head_dim: cfg.head_dim(), q_norm, k_norm };
        match cfg.block {
            BlockKind::Sequential => Block::Sequential(SequentialBlock {
                norm1: Norm::new(&format!("{prefix}.norm1"), d, cfg.norm_bias),
                qkv: Linear::new(&format!("{prefix}.attn.qkv"), d, 3 * d, cfg.qkv_bias),
                core,
                proj: Linear::new(&format!("{prefix}.attn.proj"), d, d, true),
                norm2: Norm::new(&format!("{prefix}.norm2"), d, cfg.norm_bias),
                mlp: match &cfg.moe {
                    Some(moe) if moe.is_moe_block(index, cfg.depth) => {
                        Ffn::Moe(Box::new(MoeMlp::new(&format!("{prefix}.moe"), d, m, moe, gelu_of(cfg))))
                    }
                    _ => Ffn::Dense(Mlp::new(&format!("{prefix}.mlp"), d, m, gelu_of(cfg))),
                },
            }),
            BlockKind::Parallel => Block::Parallel(ParallelBlock {
                in_norm: Norm::new(&format!("{prefix}.in_norm"), d, cfg.norm_bias),
                in_proj: Linear::new(&format!("{prefix}.in_proj"), d, m + 3 * d, cfg.qkv_bias),
                mlp_bias: (!cfg.qkv_bias).then(|| format!("{prefix}.mlp_bias")),
                core,
                out_proj: Linear::new(&format!("{prefix}.out_proj"), d + m, d, true),
                gelu: gelu_of(cfg),
                width: d,
                mlp_dim: m,
            }),
        }
    }

    /// Adds the block's parameters to `store`.
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        let core = match self {
            Block::Sequential(b) => {
                b.norm1.init(sink)?;
                b.qkv.init_default(sink)?;
                &b.core
            }
            Block::Parallel(b) => {
                b.in_norm.init(sink)?;
                b.in_proj.init_default(sink)?;
                if let Some(mb) = &b.mlp_bias {
                    sink.add(mb, &[b.mlp_dim], Fill::Normal { std: 1e-6 })?;
                }
                &b.core
            }
        };
        for n in [&core.q_norm, &core.k_norm].into_iter().flatten() {
            n.init(sink)?;
        }
        match self {
            Block::Sequential(b) => {
                b.proj.init_default(sink)?;
                b.norm2.init(sink)?;
                match &b.mlp {
                    Ffn::Dense(mlp) => mlp.init(sink),
                    Ffn::Moe(moe) => moe.init(sink),
                }
            }
            Block::Parallel(b) => b.out_proj.init_default(sink),
        }
    }

    /// `x [batch, tokens, D] -> [batch, tokens, D]`, a MoE routed without noise (inference).
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<(Tensor, BlockSaved)> {
        self.forward_routed(p, x, None)
    }

    /// Whether the block's MLP is a mixture of experts.
    pub fn is_moe(&self) -> bool {
        matches!(self, Block::Sequential(b) if matches!(b.mlp, Ffn::Moe(_)))
    }

    /// The block's mixture of experts, if its MLP is one.
    pub fn moe(&self) -> Option<&MoeMlp> {
        match self {
            Block::Sequential(SequentialBlock { mlp: Ffn::Moe(m), .. }) => Some(m),
            _ => None,
        }
    }

    /// [`Block::forward`] with router noise drawn from `noise_seed` in a MoE block (training;
    /// `None`: no noise). Dense blocks ignore it.
    pub fn forward_routed(&self, p: &ParamStore, x: &Tensor, noise_seed: Option<u64>) -> Result<(Tensor, BlockSaved)> {
        self.forward_ep(p, x, noise_seed, None)
    }

    /// [`Block::forward_routed`] with, when `ep` is given, a MoE MLP whose experts are sharded
    /// over `ep`'s ranks ([`MoeMlp::forward_parallel`]; `p` holds this rank's experts). Dense
    /// blocks ignore `ep`.
    pub fn forward_ep(
        &self,
        p: &ParamStore,
        x: &Tensor,
        noise_seed: Option<u64>,
        ep: Option<&dyn Communicator>,
    ) -> Result<(Tensor, BlockSaved)> {
        match self {
            Block::Sequential(b) => {
                let (n1, s1) = b.norm1.forward(p, x)?;
                let qkv = b.qkv.forward(p, &n1)?;
                let (merged, heads) = b.core.forward_packed(p, &qkv, 0)?;
                let x1 = b.proj.forward_with(p, &merged, None, Some(x))?.y; // x + proj(merged), fused
                let (n2, s2) = b.norm2.forward(p, &x1)?;
                let (y, mlp) = match &b.mlp {
                    Ffn::Dense(mlp) => {
                        let (y, s) = mlp.forward_with(p, &n2, Some(&x1))?; // x1 + mlp(n2), fused
                        (y, FfnSaved::Dense(s))
                    }
                    Ffn::Moe(moe) => match ep {
                        Some(comm) => {
                            let (y, s) = moe.forward_parallel(p, &n2, noise_seed, comm)?;
                            (ops::add(&x1, &y)?, FfnSaved::MoeParallel(Box::new(s)))
                        }
                        None => {
                            let (y, s) = moe.forward(p, &n2, noise_seed)?;
                            (ops::add(&x1, &y)?, FfnSaved::Moe(Box::new(s)))
                        }
                    },
                };
                let saved = SequentialSaved { n1, s1, heads, merged, x1, n2, s2, mlp };
                Ok((y, BlockSaved::Sequential(Box::new(saved))))
            }
            Block::Parallel(b) => {
                let (h, s) = b.in_norm.forward(p, x)?;
                let z = b.in_proj.forward(p, &h)?;
                let mut u = ops::slice(&z, 2, 0, b.mlp_dim)?;
                if let Some(mb) = &b.mlp_bias {
                    u = ops::bias_add(&u, p.get(mb)?)?;
                }
                let (a, heads) = b.core.forward_packed(p, &z, b.mlp_dim)?;
                let cat = ops::concat(&[&a, &ops::gelu_fwd(&u, b.gelu)?], 2)?;
                let y = b.out_proj.forward_with(p, &cat, None, Some(x))?.y; // x + out_proj(cat), fused
                Ok((y, BlockSaved::Parallel(Box::new(ParallelSaved { h, s, u, heads, cat }))))
            }
        }
    }

    /// Accumulates parameter gradients; returns `dx`. A MoE block's auxiliary loss counts
    /// with weight 1 (see [`Block::backward_scaled`]).
    pub fn backward(
        &self,
        p: &ParamStore,
        x: &Tensor,
        saved: &BlockSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        self.backward_scaled(p, x, saved, dy, 1.0, g)
    }

    /// [`Block::backward`] of a loss that holds a MoE block's auxiliary loss
    /// ([`MoeStats::aux_loss`]) times `aux_scale`.
    pub fn backward_scaled(
        &self,
        p: &ParamStore,
        x: &Tensor,
        saved: &BlockSaved,
        dy: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        self.backward_ep(p, x, saved, dy, aux_scale, g, None)
    }

    /// [`Block::backward_scaled`] of [`Block::forward_ep`]: with `ep`, a MoE MLP's experts are
    /// sharded over its ranks (this rank's expert gradients are complete, the router's is this
    /// rank's part; [`MoeMlp::backward_parallel`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_ep(
        &self,
        p: &ParamStore,
        x: &Tensor,
        saved: &BlockSaved,
        dy: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
        ep: Option<&dyn Communicator>,
    ) -> Result<Tensor> {
        match (self, saved) {
            (Block::Sequential(b), BlockSaved::Sequential(s)) => {
                let dn2 = match (&b.mlp, &s.mlp, ep) {
                    (Ffn::Dense(mlp), FfnSaved::Dense(ms), _) => mlp.backward(p, &s.n2, ms, dy, g)?,
                    (Ffn::Moe(moe), FfnSaved::Moe(ms), None) => moe.backward(p, &s.n2, ms, dy, aux_scale, g)?,
                    (Ffn::Moe(moe), FfnSaved::MoeParallel(ms), Some(comm)) => {
                        moe.backward_parallel(p, &s.n2, ms, dy, aux_scale, g, comm)?
                    }
                    _ => {
                        return Err(crate::ModelError::Param {
                            name: "blocks".into(),
                            msg: "saved activations are of another MLP kind (dense, MoE, or MoE with experts \
                                  sharded over ranks) than this backward"
                                .into(),
                        })
                    }
                };
                // The residual stream's dy plus norm2's backward, in one op (likewise norm1's).
                let dx1 = b.norm2.backward_add(p, &s.x1, &s.s2, &dn2, dy, g)?;
                let dmerged = b.proj.backward(p, &s.merged, &dx1, g)?;
                let dqkv = b.core.backward_packed(p, &s.heads, &dmerged, g)?;
                let dn1 = b.qkv.backward(p, &s.n1, &dqkv, g)?;
                b.norm1.backward_add(p, x, &s.s1, &dn1, &dx1, g)
            }
            (Block::Parallel(b), BlockSaved::Parallel(s)) => {
                let dcat = b.out_proj.backward(p, &s.cat, dy, g)?;
                let da = ops::slice(&dcat, 2, 0, b.width)?;
                let du = ops::gelu_bwd(&s.u, &ops::slice(&dcat, 2, b.width, b.mlp_dim)?, b.gelu)?;
                if let Some(mb) = &b.mlp_bias {
                    g.accumulate(mb, &ops::bias_add_bwd(&du)?)?;
                }
                let dqkv = b.core.backward_packed(p, &s.heads, &da, g)?;
                let dz = ops::concat(&[&du, &dqkv], 2)?;
                let dh = b.in_proj.backward(p, &s.h, &dz, g)?;
                b.in_norm.backward_add(p, x, &s.s, &dh, dy, g)
            }
            _ => Err(crate::ModelError::Param {
                name: "blocks".into(),
                msg: "saved activations are of the other block kind".into(),
            }),
        }
    }
}
