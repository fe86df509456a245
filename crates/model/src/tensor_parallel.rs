//! [`TensorParallelViT`]: a Vision Transformer whose blocks are split over the `model` mesh
//! axis (ViT-22B's model parallelism, reference §5, design §5). Each rank of the axis holds
//! its share of every block matrix (whole heads, `M/n` hidden units) and one row slice of the
//! residual stream; the patch embedding, the final norm, the pooling and the heads are
//! replicated and run on the whole batch on every rank, so their gradients need no exchange.
//!
//! With the same parameters it computes the unsharded model's outputs and gradients (within
//! float tolerance: sums run in another order); checkpoints hold the whole model
//! ([`TensorParallelViT::gather_params`], [`TensorParallelViT::shard_params`]).

pub use crate::layers::block::{ModelAxis, TpSaved};
use crate::{
    layers::{block::check_divisible, Block, Init, ParamSink},
    sharding::{ShardPlan, ShardSpec},
    stages::{StageSaved, StagedModel, TpStages},
    ModelError, ParamStore, Result, VisionTransformer,
};
use vit_tensor::{ops, DType, Device, Tensor};

/// One model rank's view of a tensor-parallel Vision Transformer.
#[derive(Debug, Clone)]
pub struct TensorParallelViT {
    /// The whole model: its embedding, final norm, pooling and heads run as they are.
    pub model: VisionTransformer,
    /// This rank's blocks ([`Block::sharded`]).
    pub(crate) blocks: Vec<Block>,
    plan: ShardPlan,
    /// This rank's coordinate on the model axis.
    rank: usize,
}

/// What [`TensorParallelViT::backward`] needs from a forward pass: each stage's input and
/// what it saved (the forward and backward run the [`TpStages`] chain, the one code path the
/// fully sharded trainer runs stage by stage too).
#[derive(Debug, Clone)]
pub struct TpForwardSaved {
    /// The input of each stage but the tail: the images, then this rank's rows `[r, D]` of
    /// each block's input (the tail's backward needs only its input's shape, below).
    inputs: Vec<Tensor>,
    saved: Vec<StageSaved>,
    /// `(batch, tokens, width)` of the encoder output, the tail's input.
    encoded: (usize, usize, usize),
}

impl TpForwardSaved {
    /// The pre-logit features `[batch, F]` (the same on every model rank).
    pub fn features(&self) -> &Tensor {
        match self.saved.last() {
            Some(StageSaved::Tail(tail)) => &tail.features,
            _ => unreachable!("a forward pass ends with the tail stage"),
        }
    }
}

impl TensorParallelViT {
    /// `model` split over `n` model ranks, as rank `rank` holds it. Errors if `n` does not
    /// divide the heads or the MLP width, or if the model has MoE blocks.
    pub fn new(model: &VisionTransformer, n: usize, rank: usize) -> Result<Self> {
        let cfg = &model.config;
        check_divisible(cfg, n)?;
        if rank >= n {
            return Err(ModelError::Param {
                name: "model axis".into(),
                msg: format!("rank {rank} is outside a model axis of {n} ranks"),
            });
        }
        let blocks = (0..cfg.depth).map(|i| Block::sharded(i, cfg, n)).collect::<Result<Vec<_>>>()?;
        let mut splits = Vec::new();
        for i in 0..cfg.depth {
            splits.extend(Block::new(i, cfg).shard_specs());
        }
        let mut params = Vec::new();
        for (name, dims) in model.param_shapes()? {
            let spec = splits.iter().find(|(n, _)| *n == name).map_or(ShardSpec::Replicated, |(_, s)| s.clone());
            spec.check(&name, &dims, n)?;
            params.push((name, dims, spec));
        }
        Ok(TensorParallelViT { model: model.clone(), blocks, plan: ShardPlan { params, n }, rank })
    }

    /// How each parameter is split.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The model-axis size.
    pub fn ranks(&self) -> usize {
        self.plan.n
    }

    /// This rank's fresh parameters: exactly its part of
    /// [`VisionTransformer::init_params`]`(seed, ..)`, made one whole tensor at a time (peak
    /// memory: this rank's share plus the largest whole parameter).
    pub fn init_params(&self, seed: u64, dtype: DType, device: Device) -> Result<ParamStore> {
        self.init_params_where(seed, dtype, device, &|_| true)
    }

    /// The parameters of [`init_params`](Self::init_params) whose names `keep` accepts, without
    /// making the others (a share under full sharding over the data axis).
    pub fn init_params_where(
        &self,
        seed: u64,
        dtype: DType,
        device: Device,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<ParamStore> {
        struct Sharding<'a> {
            init: Init,
            plan: &'a ShardPlan,
            rank: usize,
            store: ParamStore,
            keep: &'a dyn Fn(&str) -> bool,
        }
        impl ParamSink for Sharding<'_> {
            fn add(&mut self, name: &str, dims: &[usize], fill: crate::layers::Fill) -> Result<()> {
                if !(self.keep)(name) {
                    return Ok(());
                }
                let whole = self.init.tensor(name, dims, fill)?;
                let part = self.plan.spec(name)?.shard(&whole, self.rank, self.plan.n)?;
                Ok(self.store.insert(name, part)?)
            }
        }
        let mut sink = Sharding {
            init: Init { seed, dtype, device: Device::Cpu },
            plan: &self.plan,
            rank: self.rank,
            store: ParamStore::new(),
            keep,
        };
        self.model.declare_params(&mut sink)?;
        Ok(sink.store.to_device(device)?)
    }

    /// This rank's part of the whole model's parameters `full` (e.g. from a checkpoint).
    pub fn shard_params(&self, full: &ParamStore) -> Result<ParamStore> {
        self.plan.shard_store(full, self.rank)
    }

    /// The whole model's parameters (or any store laid out like them: gradients, optimizer
    /// moments) from every model rank's part, on every rank of `comm` (the model axis;
    /// a collective).
    pub fn gather_params(&self, local: &ParamStore, comm: &dyn vit_collective::Communicator) -> Result<ParamStore> {
        let n = self.plan.n;
        let mut out = ParamStore::new();
        for (name, _, spec) in &self.plan.params {
            let mine = local.get(name)?;
            let whole = match spec {
                ShardSpec::Replicated => mine.clone(),
                ShardSpec::Split { .. } => {
                    let all = comm.all_gather(mine)?; // [n·d0, ..]: the parts along dim 0
                    let d0 = mine.dims().first().copied().unwrap_or(1);
                    let parts =
                        (0..n).map(|m| ops::slice(&all, 0, m * d0, d0)).collect::<std::result::Result<Vec<_>, _>>()?;
                    spec.unshard(&parts)?
                }
            };
            out.insert(name.clone(), whole)?;
        }
        Ok(out)
    }

    /// `images [batch, C, H, W]` -> logits `[batch, classes]` (the same on every model rank)
    /// and what backward needs. `batch · tokens` must be divisible by the model-axis size.
    /// Every rank of `axis` calls it together, with the same images.
    pub fn forward(&self, p: &ParamStore, images: &Tensor, axis: ModelAxis<'_>) -> Result<(Tensor, TpForwardSaved)> {
        self.check_axis(axis)?;
        let stages = TpStages { tp: self, axis };
        let (mut inputs, mut saved) = (Vec::new(), Vec::new());
        let mut x = images.clone();
        for s in 0..self.blocks.len() + 1 {
            let (y, sv) = stages.stage_forward(s, p, &x)?;
            inputs.push(std::mem::replace(&mut x, y));
            saved.push(sv);
        }
        let (batch, tokens) = stages.shape_of(&x);
        let encoded = (batch, tokens, x.dims()[1]);
        let (logits, tail) = stages.stage_forward(self.blocks.len() + 1, p, &x)?;
        saved.push(tail);
        Ok((logits, TpForwardSaved { inputs, saved, encoded }))
    }

    /// Logits `[batch, classes]` without keeping activations (evaluation); a collective.
    pub fn predict(&self, p: &ParamStore, images: &Tensor, axis: ModelAxis<'_>) -> Result<Tensor> {
        self.check_axis(axis)?;
        let stages = TpStages { tp: self, axis };
        let mut x = images.clone();
        for s in 0..self.blocks.len() + 2 {
            x = stages.stage_forward(s, p, &x)?.0;
        }
        Ok(x)
    }

    /// Accumulates this rank's parameter gradients into `g` (laid out like its parameters)
    /// for the loss `⟨dout, output⟩`: its part of each split parameter's gradient and the
    /// whole gradient of each replicated one (the same on every model rank). A collective.
    pub fn backward(
        &self,
        p: &ParamStore,
        s: &TpForwardSaved,
        dout: &Tensor,
        g: &mut ParamStore,
        axis: ModelAxis<'_>,
    ) -> Result<()> {
        self.check_axis(axis)?;
        let stages = TpStages { tp: self, axis };
        let Some(StageSaved::Tail(tail)) = s.saved.last() else {
            unreachable!("a forward pass ends with the tail stage")
        };
        let mut dy = stages.tail_backward(p, tail, dout, g, s.encoded)?;
        for i in (0..s.inputs.len()).rev() {
            dy = stages.stage_backward(i, p, &s.inputs[i], &s.saved[i], &dy, g)?;
        }
        Ok(())
    }

    /// This rank's rows `[r, D]` of `x [batch, tokens, D]`.
    pub(crate) fn my_rows(&self, x: &Tensor, batch: usize, tokens: usize, d: usize) -> Result<Tensor> {
        let (rows, n) = (batch * tokens, self.plan.n);
        if rows % n != 0 {
            return Err(ModelError::Param {
                name: "batch".into(),
                msg: format!(
                    "batch {batch} × tokens {tokens} = {rows} rows cannot be split evenly over {n} model ranks"
                ),
            });
        }
        Ok(ops::slice(&x.reshape([rows, d])?, 0, self.rank * rows / n, rows / n)?)
    }

    fn check_axis(&self, axis: ModelAxis<'_>) -> Result<()> {
        let (n, r) = (axis.comm.world_size(), axis.comm.rank());
        if n != self.plan.n || r != self.rank {
            return Err(ModelError::Param {
                name: "model axis".into(),
                msg: format!(
                    "the model was split for rank {} of {} ranks, but the communicator is rank {r} of {n}",
                    self.rank, self.plan.n
                ),
            });
        }
        Ok(())
    }
}
