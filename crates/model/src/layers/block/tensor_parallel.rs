//! Tensor-parallel blocks (Megatron with sequence parallelism, as ViT-22B shards them;
//! reference §5, design §5). Over a model axis of `n` ranks:
//!
//! - the residual stream is split by rows: rank `m` holds rows `m·R/n..(m+1)·R/n` of the
//!   block input `[R, D]` (`R = batch·tokens`), and norms run on those rows;
//! - column-parallel projections (qkv, fc1, the parallel block's fused in-projection) hold
//!   their heads' and hidden units' output rows and run as all-gather-matmul: every rank gets
//!   all `R` rows of its own output columns, so attention runs on all tokens of its own heads;
//! - row-parallel projections (attention out, fc2, the fused out-projection) hold the matching
//!   input columns and run as matmul-reduce-scatter, which sums the ranks' partial products
//!   and leaves each rank its own rows again.
//!
//! Backward mirrors it: a row-parallel layer's backward is an all-gather-matmul of `dy`, a
//! column-parallel layer's is a matmul-reduce-scatter. Weight gradients of split parameters
//! are complete on each rank (all rows took part); replicated parameters used on one rank's
//! rows only (norms, row-parallel biases) or on its own heads only (QK-norm scales) get a
//! partial gradient, summed over the model axis at the end of the block's backward.

use super::{Block, Ffn, ParallelBlock, SequentialBlock};
use crate::{
    layers::{
        heads::{HeadAttention, HeadSaved},
        linear::Linear,
        mlp::Mlp,
        norm::{Norm, NormSaved},
    },
    sharding::ShardSpec,
    ModelConfig, ModelError, ParamStore, Result,
};
use vit_collective::{all_gather_matmul, matmul_reduce_scatter, Communicator, MatmulComm, ReduceOp};
use vit_tensor::{ops, Shape, Tensor};

/// The model axis a tensor-parallel pass runs on: its communicator and how the
/// tensor-parallel matmuls move data ([`MatmulComm::Ring`] overlaps the transfers with the
/// matmuls; `Plain` runs the collective first, for comparison).
#[derive(Clone, Copy)]
pub struct ModelAxis<'a> {
    /// The ranks that share one copy of the model's parameters between them.
    pub comm: &'a dyn Communicator,
    /// Ring (collective matmul) or plain collectives.
    pub matmul: MatmulComm,
}

impl std::fmt::Debug for ModelAxis<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelAxis")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.world_size())
            .field("matmul", &self.matmul)
            .finish()
    }
}

/// What a tensor-parallel block's backward needs. Rows are this rank's (`r = R/n`) or all
/// (`R`); channels are this rank's share (`D/n` of attention, `M/n` of the MLP).
#[derive(Debug, Clone)]
pub enum TpSaved {
    /// Of a sequential block.
    Sequential(Box<TpSequentialSaved>),
    /// Of a parallel block.
    Parallel(Box<TpParallelSaved>),
}

/// Activations of a tensor-parallel sequential block.
#[derive(Debug, Clone)]
pub struct TpSequentialSaved {
    /// `norm1`'s statistics, `[r]`.
    s1: NormSaved,
    /// `norm1(x)` of all ranks' rows, the qkv projection's input, `[R, D]`.
    n1_all: Tensor,
    /// This rank's heads on all tokens.
    heads: HeadSaved,
    /// This rank's heads merged, `[R, D/n]`.
    merged: Tensor,
    /// `x + attention`, `[r, D]`.
    x1: Tensor,
    /// `norm2`'s statistics, `[r]`.
    s2: NormSaved,
    /// `norm2(x1)` of all rows, fc1's input, `[R, D]`.
    n2_all: Tensor,
    /// fc1's output before the GELU, `[R, M/n]`.
    h_pre: Tensor,
    /// After the GELU, fc2's input, `[R, M/n]`.
    h: Tensor,
}

/// Activations of a tensor-parallel parallel block.
#[derive(Debug, Clone)]
pub struct TpParallelSaved {
    /// `in_norm`'s statistics, `[r]`.
    s: NormSaved,
    /// `in_norm(x)` of all rows, the in-projection's input, `[R, D]`.
    h_all: Tensor,
    /// The MLP's pre-activation (with `mlp_bias`), `[R, M/n]`.
    u: Tensor,
    /// This rank's heads on all tokens.
    heads: HeadSaved,
    /// `[attention output, GELU(u)]`, the out-projection's input, `[R, D/n + M/n]`.
    cat: Tensor,
}

impl Block {
    /// Block `index` of `cfg` as each of `n` model ranks holds it: its heads and hidden units
    /// divided by `n` (the same parameter names, local shapes). Errors if `n` does not divide
    /// the heads and the MLP width, or for a MoE block (use expert parallelism).
    pub fn sharded(index: usize, cfg: &ModelConfig, n: usize) -> Result<Self> {
        check_divisible(cfg, n)?;
        let full = Block::new(index, cfg);
        let (d, dl, ml) = (cfg.width, cfg.width / n, cfg.mlp_dim / n);
        let core_of = |c: &HeadAttention| HeadAttention { heads: c.heads / n, ..c.clone() };
        let linear = |l: &Linear, in_dim: usize, out_dim: usize| Linear { in_dim, out_dim, ..l.clone() };
        Ok(match full {
            Block::Sequential(b) => {
                let Ffn::Dense(mlp) = &b.mlp else {
                    return Err(ModelError::InvalidConfig {
                        field: "moe",
                        value: format!("block {index} is a MoE block"),
                        expected: "dense blocks under tensor parallelism (MoE layers shard their experts instead)"
                            .into(),
                    });
                };
                Block::Sequential(SequentialBlock {
                    qkv: linear(&b.qkv, d, 3 * dl),
                    core: core_of(&b.core),
                    proj: linear(&b.proj, dl, d),
                    mlp: Ffn::Dense(Mlp { fc1: linear(&mlp.fc1, d, ml), fc2: linear(&mlp.fc2, ml, d), gelu: mlp.gelu }),
                    ..b
                })
            }
            Block::Parallel(b) => Block::Parallel(ParallelBlock {
                in_proj: linear(&b.in_proj, d, ml + 3 * dl),
                core: core_of(&b.core),
                out_proj: linear(&b.out_proj, dl + ml, d),
                width: dl,
                mlp_dim: ml,
                ..b
            }),
        })
    }

    /// The split parameters of this (whole, unsharded) block and how they split; every other
    /// parameter of the block is replicated.
    pub fn shard_specs(&self) -> Vec<(String, ShardSpec)> {
        let mut out = Vec::new();
        let mut add = |name: &Option<String>, spec: ShardSpec| {
            if let Some(n) = name {
                out.push((n.clone(), spec));
            }
        };
        match self {
            Block::Sequential(b) => {
                let d = b.proj.out_dim;
                let qkv = ShardSpec::split(0, &[d, d, d]);
                add(&Some(b.qkv.weight.clone()), qkv.clone());
                add(&b.qkv.bias, qkv);
                add(&Some(b.proj.weight.clone()), ShardSpec::split(1, &[d]));
                if let Ffn::Dense(mlp) = &b.mlp {
                    let m = mlp.fc1.out_dim;
                    add(&Some(mlp.fc1.weight.clone()), ShardSpec::split(0, &[m]));
                    add(&mlp.fc1.bias, ShardSpec::split(0, &[m]));
                    add(&Some(mlp.fc2.weight.clone()), ShardSpec::split(1, &[m]));
                }
            }
            Block::Parallel(b) => {
                let (d, m) = (b.width, b.mlp_dim);
                let in_spec = ShardSpec::split(0, &[m, d, d, d]);
                add(&Some(b.in_proj.weight.clone()), in_spec.clone());
                add(&b.in_proj.bias, in_spec);
                add(&b.mlp_bias, ShardSpec::split(0, &[m]));
                add(&Some(b.out_proj.weight.clone()), ShardSpec::split(1, &[d, m]));
            }
        }
        out
    }

    /// The replicated parameters whose gradient each rank computes only in part.
    fn partial_grad_params(&self) -> Vec<String> {
        let mut names = Vec::new();
        let norm = |n: &Norm, names: &mut Vec<String>| {
            names.push(n.weight.clone());
            names.extend(n.bias.clone());
        };
        let core = match self {
            Block::Sequential(b) => {
                norm(&b.norm1, &mut names);
                norm(&b.norm2, &mut names);
                names.extend(b.proj.bias.clone());
                if let Ffn::Dense(mlp) = &b.mlp {
                    names.extend(mlp.fc2.bias.clone());
                }
                &b.core
            }
            Block::Parallel(b) => {
                norm(&b.in_norm, &mut names);
                names.extend(b.out_proj.bias.clone());
                &b.core
            }
        };
        for n in [&core.q_norm, &core.k_norm].into_iter().flatten() {
            norm(n, &mut names);
        }
        names
    }

    /// Forward of a block made by [`Block::sharded`] on this rank's rows `x [r, D]` of the
    /// block input `[batch·tokens, D]` (`r = batch·tokens / n`) -> this rank's rows of the
    /// output, `[r, D]`. Every rank of `axis` calls it together.
    pub fn forward_tp(
        &self,
        p: &ParamStore,
        x: &Tensor,
        batch: usize,
        tokens: usize,
        axis: ModelAxis<'_>,
    ) -> Result<(Tensor, TpSaved)> {
        let to_bt = |t: &Tensor| t.reshape([batch, tokens, t.dims()[1]]);
        let to_rows = |t: &Tensor| t.reshape([batch * tokens, t.dims()[2]]);
        match self {
            Block::Sequential(b) => {
                let Ffn::Dense(mlp) = &b.mlp else { return Err(moe_err()) };
                let (n1, s1) = b.norm1.forward(p, x)?;
                let (qkv, n1_all) = column_parallel(p, &b.qkv, &n1, axis)?;
                let (merged, heads) = b.core.forward_packed(p, &to_bt(&qkv)?, 0)?;
                let merged = to_rows(&merged)?;
                let x1 = ops::add(x, &row_parallel(p, &b.proj, &merged, axis)?)?;
                let (n2, s2) = b.norm2.forward(p, &x1)?;
                let (h_pre, n2_all) = column_parallel(p, &mlp.fc1, &n2, axis)?;
                let h = ops::gelu_fwd(&h_pre, mlp.gelu)?;
                let y = ops::add(&x1, &row_parallel(p, &mlp.fc2, &h, axis)?)?;
                let saved = TpSequentialSaved { s1, n1_all, heads, merged, x1, s2, n2_all, h_pre, h };
                Ok((y, TpSaved::Sequential(Box::new(saved))))
            }
            Block::Parallel(b) => {
                let (hn, s) = b.in_norm.forward(p, x)?;
                let (z, h_all) = column_parallel(p, &b.in_proj, &hn, axis)?;
                let mut u = ops::slice(&z, 1, 0, b.mlp_dim)?;
                if let Some(mb) = &b.mlp_bias {
                    u = ops::bias_add(&u, p.get(mb)?)?;
                }
                let (a, heads) = b.core.forward_packed(p, &to_bt(&z)?, b.mlp_dim)?;
                let cat = ops::concat(&[&to_rows(&a)?, &ops::gelu_fwd(&u, b.gelu)?], 1)?;
                let y = ops::add(x, &row_parallel(p, &b.out_proj, &cat, axis)?)?;
                Ok((y, TpSaved::Parallel(Box::new(TpParallelSaved { s, h_all, u, heads, cat }))))
            }
        }
    }

    /// Backward of [`Block::forward_tp`]: accumulates this rank's parameter gradients (split
    /// parameters: its part; replicated ones: the whole gradient, summed over the model axis)
    /// and returns `dx [r, D]` for its rows. Every rank of `axis` calls it together.
    #[allow(clippy::too_many_arguments)] // the block's pass: params, input, saved, dy, grads, shape, axis
    pub fn backward_tp(
        &self,
        p: &ParamStore,
        x: &Tensor,
        saved: &TpSaved,
        dy: &Tensor,
        g: &mut ParamStore,
        batch: usize,
        tokens: usize,
        axis: ModelAxis<'_>,
    ) -> Result<Tensor> {
        // Replicated parameters' partial gradients go to a scratch store, summed over the
        // model axis in one all-reduce, then added to `g` (adding `g`'s earlier micro-batches
        // into the all-reduce would count them n times).
        let partial = self.partial_grad_params();
        let specs = partial
            .iter()
            .map(|n| Ok((n.clone(), Shape::new(p.get(n)?.dims().to_vec()), grad_dtype(g, n)?, p.get(n)?.device())))
            .collect::<Result<Vec<_>>>()?;
        let mut scratch = ParamStore::zeros(specs)?;
        let to_bt = |t: &Tensor| t.reshape([batch, tokens, t.dims()[1]]);
        let dx = match (self, saved) {
            (Block::Sequential(b), TpSaved::Sequential(s)) => {
                let Ffn::Dense(mlp) = &b.mlp else { return Err(moe_err()) };
                let dh = row_parallel_backward(p, &mlp.fc2, &s.h, dy, axis, g, &mut scratch)?;
                let dh_pre = ops::gelu_bwd(&s.h_pre, &dh, mlp.gelu)?;
                let dn2 = column_parallel_backward(p, &mlp.fc1, &s.n2_all, &dh_pre, axis, g)?;
                let dx1 = b.norm2.backward_add(p, &s.x1, &s.s2, &dn2, dy, &mut scratch)?;
                let dmerged = row_parallel_backward(p, &b.proj, &s.merged, &dx1, axis, g, &mut scratch)?;
                let dqkv = b.core.backward_packed(p, &s.heads, &to_bt(&dmerged)?, &mut scratch)?;
                let dqkv = dqkv.reshape([batch * tokens, dqkv.dims()[2]])?;
                let dn1 = column_parallel_backward(p, &b.qkv, &s.n1_all, &dqkv, axis, g)?;
                b.norm1.backward_add(p, x, &s.s1, &dn1, &dx1, &mut scratch)?
            }
            (Block::Parallel(b), TpSaved::Parallel(s)) => {
                let dcat = row_parallel_backward(p, &b.out_proj, &s.cat, dy, axis, g, &mut scratch)?;
                let da = ops::slice(&dcat, 1, 0, b.width)?;
                let du = ops::gelu_bwd(&s.u, &ops::slice(&dcat, 1, b.width, b.mlp_dim)?, b.gelu)?;
                if let Some(mb) = &b.mlp_bias {
                    g.accumulate(mb, &ops::bias_add_bwd(&du)?)?;
                }
                let dqkv = b.core.backward_packed(p, &s.heads, &to_bt(&da)?, &mut scratch)?;
                let dz = ops::concat(&[&du, &dqkv.reshape([batch * tokens, dqkv.dims()[2]])?], 1)?;
                let dh = column_parallel_backward(p, &b.in_proj, &s.h_all, &dz, axis, g)?;
                b.in_norm.backward_add(p, x, &s.s, &dh, dy, &mut scratch)?
            }
            _ => {
                return Err(ModelError::Param {
                    name: "blocks".into(),
                    msg: "saved activations are of the other block kind".into(),
                })
            }
        };
        for b in 0..scratch.buffers().len() {
            let summed = axis.comm.all_reduce(scratch.buffer(b), ReduceOp::Sum)?;
            *scratch.buffer_mut(b) = summed;
        }
        for name in &partial {
            g.accumulate(name, scratch.get(name)?)?;
        }
        Ok(dx)
    }
}

/// Checks that `n` model ranks can split `cfg`'s heads and MLP evenly.
pub(crate) fn check_divisible(cfg: &ModelConfig, n: usize) -> Result<()> {
    if n == 0 || !cfg.heads.is_multiple_of(n) {
        return Err(ModelError::InvalidConfig {
            field: "heads",
            value: cfg.heads.to_string(),
            expected: format!("a multiple of the model axis size {n} (each model rank holds whole heads)"),
        });
    }
    if !cfg.mlp_dim.is_multiple_of(n) {
        return Err(ModelError::InvalidConfig {
            field: "mlp_dim",
            value: cfg.mlp_dim.to_string(),
            expected: format!("a multiple of the model axis size {n}"),
        });
    }
    Ok(())
}

fn moe_err() -> ModelError {
    ModelError::InvalidConfig {
        field: "moe",
        value: "a MoE block".into(),
        expected: "dense blocks under tensor parallelism".into(),
    }
}

fn grad_dtype(g: &ParamStore, name: &str) -> Result<vit_tensor::DType> {
    Ok(g.get(name)?.dtype())
}

/// A column-parallel layer on this rank's rows `x [r, in]`: all-gather-matmul with the local
/// weight `[out/n, in]`, plus the local bias. Returns `(y [R, out/n], x of all rows [R, in])`.
fn column_parallel(p: &ParamStore, l: &Linear, x: &Tensor, axis: ModelAxis<'_>) -> Result<(Tensor, Tensor)> {
    let (y, x_all) = all_gather_matmul(axis.comm, x, p.get(&l.weight)?, true, axis.matmul)?;
    let y = match &l.bias {
        Some(b) => ops::bias_add(&y, p.get(b)?)?,
        None => y,
    };
    Ok((y, x_all))
}

/// A row-parallel layer on all rows of this rank's input columns `x [R, in/n]`:
/// matmul-reduce-scatter with the local weight `[out, in/n]`, plus the (replicated) bias.
/// Returns this rank's rows of the sum over ranks, `[r, out]`.
fn row_parallel(p: &ParamStore, l: &Linear, x: &Tensor, axis: ModelAxis<'_>) -> Result<Tensor> {
    let y = matmul_reduce_scatter(axis.comm, x, p.get(&l.weight)?, true, axis.matmul)?;
    Ok(match &l.bias {
        Some(b) => ops::bias_add(&y, p.get(b)?)?,
        None => y,
    })
}

/// Backward of [`row_parallel`]: `dy [r, out]` is gathered while multiplied by the weight
/// (`dx = dy_all · W`, `[R, in/n]`); the weight gradient uses all rows, the bias gradient
/// only this rank's (a partial sum, into `scratch`).
fn row_parallel_backward(
    p: &ParamStore,
    l: &Linear,
    x: &Tensor,
    dy: &Tensor,
    axis: ModelAxis<'_>,
    g: &mut ParamStore,
    scratch: &mut ParamStore,
) -> Result<Tensor> {
    let (dx, dy_all) = all_gather_matmul(axis.comm, dy, p.get(&l.weight)?, false, axis.matmul)?;
    ops::linear_wgrad(g, &l.weight, None, x, &dy_all)?;
    if let Some(b) = &l.bias {
        scratch.accumulate(b, &ops::bias_add_bwd(dy)?)?;
    }
    Ok(dx)
}

/// Backward of [`column_parallel`]: weight and bias gradients from all rows (complete), and
/// this rank's rows of `dx = Σ_ranks dy · W` by matmul-reduce-scatter, `[r, in]`.
fn column_parallel_backward(
    p: &ParamStore,
    l: &Linear,
    x_all: &Tensor,
    dy: &Tensor,
    axis: ModelAxis<'_>,
    g: &mut ParamStore,
) -> Result<Tensor> {
    ops::linear_wgrad(g, &l.weight, l.bias.as_deref(), x_all, dy)?;
    Ok(matmul_reduce_scatter(axis.comm, dy, p.get(&l.weight)?, false, axis.matmul)?)
}
