//! A model as a chain of stages, run one at a time with only that stage's parameters at hand:
//! what full sharding (ZeRO-3, ViT-22B's parameters sharded over the data axis) needs, since it
//! gathers each stage's parameters just before the stage runs and frees them after, in forward
//! and again in backward. Stage 0 is the embedding, stages 1..=L the blocks, stage L+1 the final
//! norm, pooling and heads ("the tail").
//!
//! The passes equal [`VisionTransformer::forward`]/[`backward`](VisionTransformer::backward)
//! with every stage's parameters from one store; [`TensorParallelViT`]'s forward and backward
//! are the [`TpStages`] chain itself. Dense models only: MoE blocks route without noise here,
//! so trainers refuse V-MoE models with full sharding.

use crate::{
    layers::{BlockSaved, EmbedSaved},
    model::TailSaved,
    tensor_parallel::{ModelAxis, TensorParallelViT, TpSaved},
    ModelError, ParamStore, Result, VisionTransformer,
};
use vit_tensor::Tensor;

/// What one stage's backward needs from its forward.
#[derive(Debug, Clone)]
pub enum StageSaved {
    /// Of the embedding.
    Embed(EmbedSaved),
    /// Of a block; `None` under activation checkpointing (`remat`: run again in backward).
    Block(Option<BlockSaved>),
    /// Of a tensor-parallel block; `None` under remat.
    TpBlock(Option<TpSaved>),
    /// Of the tail.
    Tail(Box<TailSaved>),
}

/// A model run stage by stage (see the module docs).
pub trait StagedModel {
    /// The parameter names of each stage, in order: every parameter is in exactly one.
    fn stages(&self) -> Result<Vec<Vec<String>>>;

    /// Stage `s` on its input (images `[B, C, H, W]` for stage 0; the previous stage's output
    /// otherwise) with `p` holding at least the stage's parameters; the last stage gives the
    /// logits. A collective for the tensor-parallel model.
    fn stage_forward(&self, s: usize, p: &ParamStore, x: &Tensor) -> Result<(Tensor, StageSaved)>;

    /// Backward of stage `s` given its input `x`, what its forward saved, and the gradient of
    /// its output: accumulates the stage's parameter gradients into `g` (holding at least the
    /// stage's names) and returns the gradient of its input.
    fn stage_backward(
        &self,
        s: usize,
        p: &ParamStore,
        x: &Tensor,
        saved: &StageSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor>;
}

fn wrong_saved(s: usize) -> ModelError {
    ModelError::Param { name: format!("stage {s}"), msg: "saved activations of another kind of stage".into() }
}

fn no_stage(s: usize, n: usize) -> ModelError {
    ModelError::Param { name: format!("stage {s}"), msg: format!("the model has stages 0..{n}") }
}

impl StagedModel for VisionTransformer {
    fn stages(&self) -> Result<Vec<Vec<String>>> {
        self.stage_names()
    }

    fn stage_forward(&self, s: usize, p: &ParamStore, x: &Tensor) -> Result<(Tensor, StageSaved)> {
        let depth = self.blocks.len();
        match s {
            0 => {
                let (y, e) = self.embed.forward(p, x)?;
                Ok((y, StageSaved::Embed(e)))
            }
            s if s <= depth => {
                let (y, saved) = self.blocks[s - 1].forward(p, x)?;
                Ok((y, StageSaved::Block((!self.config.remat).then_some(saved))))
            }
            s if s == depth + 1 => {
                let (y, t) = self.tail_forward(p, x.clone())?;
                Ok((y, StageSaved::Tail(Box::new(t))))
            }
            _ => Err(no_stage(s, depth + 2)),
        }
    }

    fn stage_backward(
        &self,
        s: usize,
        p: &ParamStore,
        x: &Tensor,
        saved: &StageSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let depth = self.blocks.len();
        match (s, saved) {
            (0, StageSaved::Embed(e)) => self.embed.backward(p, e, dy, g),
            (s, StageSaved::Block(saved)) if (1..=depth).contains(&s) => {
                let b = &self.blocks[s - 1];
                match saved {
                    Some(saved) => b.backward(p, x, saved, dy, g),
                    None => b.backward(p, x, &b.forward(p, x)?.1, dy, g),
                }
            }
            (s, StageSaved::Tail(t)) if s == depth + 1 => self.tail_backward(p, t, dy, g),
            (s, _) if s < depth + 2 => Err(wrong_saved(s)),
            _ => Err(no_stage(s, depth + 2)),
        }
    }
}

/// A tensor-parallel model and its model axis, run stage by stage: between stages the
/// activations are this rank's rows `[r, D]` of `[batch·tokens, D]` (the embedding's output is
/// split, the tail gathers them back).
#[derive(Debug, Clone, Copy)]
pub struct TpStages<'a> {
    /// This rank's part of the model.
    pub tp: &'a TensorParallelViT,
    /// The model axis.
    pub axis: ModelAxis<'a>,
}

impl TpStages<'_> {
    /// `(batch, tokens)` of this rank's rows `x [r, D]`.
    pub(crate) fn shape_of(&self, x: &Tensor) -> (usize, usize) {
        let tokens = self.tp.model.config.seq_len().max(1);
        (x.dims()[0] * self.tp.ranks() / tokens, tokens)
    }

    /// The tail stage's backward given only the shape of its input (this rank's rows of
    /// `[batch, tokens, width]`), so a caller need not keep the input itself.
    pub(crate) fn tail_backward(
        &self,
        p: &ParamStore,
        tail: &TailSaved,
        dy: &Tensor,
        g: &mut ParamStore,
        (batch, tokens, width): (usize, usize, usize),
    ) -> Result<Tensor> {
        let dx = self.tp.model.tail_backward(p, tail, dy, g)?;
        self.tp.my_rows(&dx, batch, tokens, width)
    }
}

impl StagedModel for TpStages<'_> {
    fn stages(&self) -> Result<Vec<Vec<String>>> {
        self.tp.model.stage_names()
    }

    fn stage_forward(&self, s: usize, p: &ParamStore, x: &Tensor) -> Result<(Tensor, StageSaved)> {
        let depth = self.tp.blocks.len();
        match s {
            0 => {
                let (y, e) = self.tp.model.embed.forward(p, x)?;
                let (b, t, d) = (y.dims()[0], y.dims()[1], y.dims()[2]);
                Ok((self.tp.my_rows(&y, b, t, d)?, StageSaved::Embed(e)))
            }
            s if s <= depth => {
                let (b, t) = self.shape_of(x);
                let (y, saved) = self.tp.blocks[s - 1].forward_tp(p, x, b, t, self.axis)?;
                Ok((y, StageSaved::TpBlock((!self.tp.model.config.remat).then_some(saved))))
            }
            s if s == depth + 1 => {
                let (b, t) = self.shape_of(x);
                let all = self.axis.comm.all_gather(x)?.reshape([b, t, x.dims()[1]])?;
                let (y, tail) = self.tp.model.tail_forward(p, all)?;
                Ok((y, StageSaved::Tail(Box::new(tail))))
            }
            _ => Err(no_stage(s, depth + 2)),
        }
    }

    fn stage_backward(
        &self,
        s: usize,
        p: &ParamStore,
        x: &Tensor,
        saved: &StageSaved,
        dy: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let depth = self.tp.blocks.len();
        match (s, saved) {
            (0, StageSaved::Embed(e)) => {
                // Every rank runs the embedding's backward on all rows (its gradients whole).
                let all = self.axis.comm.all_gather(dy)?;
                let all = all.reshape([x.dims()[0], all.dims()[0] / x.dims()[0], dy.dims()[1]])?;
                self.tp.model.embed.backward(p, e, &all, g)
            }
            (s, StageSaved::TpBlock(saved)) if (1..=depth).contains(&s) => {
                let (b, t) = self.shape_of(x);
                let block = &self.tp.blocks[s - 1];
                let recomputed;
                let saved = match saved {
                    Some(saved) => saved,
                    None => {
                        recomputed = block.forward_tp(p, x, b, t, self.axis)?.1;
                        &recomputed
                    }
                };
                block.backward_tp(p, x, saved, dy, g, b, t, self.axis)
            }
            (s, StageSaved::Tail(tail)) if s == depth + 1 => {
                let (b, t) = self.shape_of(x);
                self.tail_backward(p, tail, dy, g, (b, t, x.dims()[1]))
            }
            (s, _) if s < depth + 2 => Err(wrong_saved(s)),
            _ => Err(no_stage(s, depth + 2)),
        }
    }
}
