//! The Vision Transformer assembled from a [`ModelConfig`]: embedding → blocks → final norm →
//! pooling → optional pre-logits (Dense + tanh) → classifier. Every ViT, Scaling-ViT and
//! ViT-22B variant of the zoo is this one model with different settings.

use crate::layers::patch_dropout::{self, KeptTokens, PatchDrop};
use crate::layers::MoeStats;
use crate::{
    layers::{
        block::block_noise_seed, Block, BlockSaved, EmbedSaved, Embedding, Fill, Init, Initializer, Linear, Norm,
        NormSaved, ParamSink, PoolSaved, Pooling, ShapeList,
    },
    ModelConfig, ParamStore, Pool, Result,
};
use vit_collective::Communicator;
use vit_tensor::{ops, DType, Device, Tensor};

/// What each MoE block's routing measured in one forward pass: `(block index, stats)`, by
/// ascending block.
pub type MoeBlockStats = Vec<(usize, MoeStats)>;

/// A Vision Transformer: the layer descriptions of one config. Parameters live in a
/// [`ParamStore`] made by [`VisionTransformer::init_params`] (or loaded from a checkpoint).
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    /// The (validated) configuration.
    pub config: ModelConfig,
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    norm: Norm,
    pool: Pooling,
    pre_logits: Option<Linear>,
    head: Option<Linear>,
    /// Initial bias of the classifier: big_vision uses −10 for JFT and −6.9 for 1000-class
    /// sigmoid heads; 0 here unless set.
    pub head_bias_init: f32,
}

/// Everything [`VisionTransformer::backward`] needs from a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardSaved {
    /// What the patch embedding saved (the flattened patches `[B, N, C·p·p]`).
    embed: EmbedSaved,
    /// The tokens PatchDropout kept (`None`: every token).
    kept: Option<KeptTokens>,
    /// Input of each block, `[B, N, D]` (kept with or without activation checkpointing).
    block_inputs: Vec<Tensor>,
    /// Saved activations of each block; `None` under activation checkpointing (recomputed).
    block_saved: Vec<Option<BlockSaved>>,
    /// The final norm, pooling and heads.
    tail: TailSaved,
    /// The router-noise seed of the pass (`None`: routed without noise), for recomputation.
    noise_seed: Option<u64>,
    /// `(block index, what its MoE measured)` for each MoE block, ascending.
    moe: Vec<(usize, MoeStats)>,
}

/// What the part after the blocks (final norm, pooling, pre-logits, classifier) keeps for
/// backward.
#[derive(Debug, Clone)]
pub struct TailSaved {
    /// Output of the last block, `[B, N, D]` (the final norm's input).
    encoded: Tensor,
    norm: NormSaved,
    pool: PoolSaved,
    /// Pooled tokens, `[B, D]`.
    pooled: Tensor,
    /// Pre-logits before tanh, `[B, F]` (with pre-logits only).
    pre_act: Option<Tensor>,
    /// The classifier's input, `[B, F]` (`F = D` without pre-logits).
    pub(crate) features: Tensor,
}

impl ForwardSaved {
    /// The pre-logit features `[batch, F]` (the input of the classifier): what few-shot linear
    /// evaluation and linear probes use.
    pub fn features(&self) -> &Tensor {
        &self.tail.features
    }

    /// `(block index, statistics)` of every MoE layer of the pass: auxiliary losses, dropped
    /// assignments, load per expert. Empty for a dense model.
    pub fn moe_stats(&self) -> &[(usize, MoeStats)] {
        &self.moe
    }

    /// The auxiliary loss of the pass: the weighted importance and load losses, averaged over
    /// the routing groups and summed over the MoE layers (reference §4); 0 for a dense model.
    /// [`VisionTransformer::backward`] differentiates it along with the output.
    pub fn aux_loss(&self) -> f32 {
        self.moe.iter().map(|(_, s)| s.aux_loss).sum()
    }
}

impl VisionTransformer {
    /// Describes the model of `cfg` (validated); `dtype` and `device` are those of its activations
    /// (the fixed sincos2d table is built there).
    pub fn new(cfg: &ModelConfig, dtype: DType, device: Device) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.width;
        let features = cfg.prelogits.unwrap_or(d);
        Ok(VisionTransformer {
            config: cfg.clone(),
            embed: Embedding::new(cfg, dtype, device)?,
            blocks: (0..cfg.depth).map(|i| Block::new(i, cfg)).collect(),
            norm: Norm::new("norm", d, cfg.norm_bias),
            pool: Pooling::new(cfg),
            pre_logits: cfg.prelogits.map(|pl| Linear::new("pre_logits.fc", d, pl, true)),
            head: (cfg.classes > 0).then(|| Linear::new("head", features, cfg.classes, true)),
            head_bias_init: 0.0,
        })
    }

    /// Fresh parameters (big_vision's initialisers, seeded per name; head kernel zero), in one
    /// flat buffer: built on the host, then moved to `device` in one transfer.
    pub fn init_params(&self, seed: u64, dtype: DType, device: Device) -> Result<ParamStore> {
        let mut sink = Initializer { init: Init { seed, dtype, device: Device::Cpu }, store: ParamStore::new() };
        self.declare_params(&mut sink)?;
        Ok(sink.store.to_device(device)?)
    }

    /// The parameters of [`init_params`](Self::init_params) whose names `keep` accepts, the
    /// same values (each tensor has its own seeded stream), without making the others: a rank
    /// that holds a share of the model (full sharding) creates its share alone.
    pub fn init_params_where(
        &self,
        seed: u64,
        dtype: DType,
        device: Device,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<ParamStore> {
        struct Kept<'a> {
            inner: Initializer,
            keep: &'a dyn Fn(&str) -> bool,
        }
        impl ParamSink for Kept<'_> {
            fn add(&mut self, name: &str, dims: &[usize], fill: Fill) -> Result<()> {
                if (self.keep)(name) {
                    self.inner.add(name, dims, fill)?;
                }
                Ok(())
            }
        }
        let inner = Initializer { init: Init { seed, dtype, device: Device::Cpu }, store: ParamStore::new() };
        let mut sink = Kept { inner, keep };
        self.declare_params(&mut sink)?;
        Ok(sink.inner.store.to_device(device)?)
    }

    /// Every parameter's name and shape, in store order, without allocating a tensor.
    pub fn param_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let mut sink = ShapeList::default();
        self.declare_params(&mut sink)?;
        Ok(sink.0)
    }

    pub(crate) fn declare_params(&self, sink: &mut dyn ParamSink) -> Result<()> {
        self.embed.init(sink)?;
        for b in &self.blocks {
            b.init(sink)?;
        }
        self.norm.init(sink)?;
        self.pool.init(sink)?;
        if let Some(pl) = &self.pre_logits {
            pl.init_default(sink)?;
        }
        if let Some(h) = &self.head {
            h.init(sink, Fill::Zeros, Fill::Constant(self.head_bias_init))?;
        }
        Ok(())
    }

    /// `images [batch, C, H, W]` (values in [-1, 1]) → logits `[batch, classes]` (the features
    /// `[batch, F]` when `classes = 0`), and what backward needs. With `config.remat` only each
    /// block's input is kept and backward runs the block again (activation checkpointing).
    /// MoE layers route without noise (deterministic, as at inference); training uses
    /// [`VisionTransformer::forward_train`].
    pub fn forward(&self, p: &ParamStore, images: &Tensor) -> Result<(Tensor, ForwardSaved)> {
        self.forward_routed(p, images, None, None, None)
    }

    /// [`VisionTransformer::forward`] in training: MoE routers add their noise, drawn from
    /// `noise_seed` (each layer its own stream, so the same seed gives the same bits). A dense
    /// model gives the same as `forward`.
    pub fn forward_train(&self, p: &ParamStore, images: &Tensor, noise_seed: u64) -> Result<(Tensor, ForwardSaved)> {
        self.forward_routed(p, images, Some(noise_seed), None, None)
    }

    /// [`VisionTransformer::forward_train`] (with expert parallelism over `ep` when given, as
    /// [`VisionTransformer::forward_train_ep`]) and PatchDropout: with `patch = Some(drop)`, each
    /// image keeps `drop.keep` of its patch tokens (and the class token), and the blocks run on
    /// `[B, keep (+1), D]` ([`crate::layers::patch_dropout`]). Backward gives the dropped
    /// tokens a zero gradient. Errors when `keep` is 0 or more than the patches.
    pub fn forward_train_with(
        &self,
        p: &ParamStore,
        images: &Tensor,
        noise_seed: u64,
        patch: Option<PatchDrop>,
        ep: Option<&dyn Communicator>,
    ) -> Result<(Tensor, ForwardSaved)> {
        self.forward_routed(p, images, Some(noise_seed), patch, ep)
    }

    /// [`VisionTransformer::forward_train`] with expert parallelism: every MoE layer's experts
    /// are sharded over `comm`'s ranks, `p` holds this rank's shard
    /// ([`VisionTransformer::shard_experts`]: its experts, every other parameter whole) and
    /// `images` this rank's images (the same count on every rank). Every rank must call it
    /// (each MoE layer runs two all-to-alls); [`VisionTransformer::backward_notify_ep`] is its
    /// backward.
    pub fn forward_train_ep(
        &self,
        p: &ParamStore,
        images: &Tensor,
        noise_seed: u64,
        comm: &dyn Communicator,
    ) -> Result<(Tensor, ForwardSaved)> {
        self.forward_routed(p, images, Some(noise_seed), None, Some(comm))
    }

    fn forward_routed(
        &self,
        p: &ParamStore,
        images: &Tensor,
        noise_seed: Option<u64>,
        patch: Option<PatchDrop>,
        ep: Option<&dyn Communicator>,
    ) -> Result<(Tensor, ForwardSaved)> {
        let patch_rows = match &patch {
            Some(drop) => {
                let b = images.dims().first().copied().unwrap_or(0);
                Some(patch_dropout::kept_patch_rows(b, self.config.num_patches(), drop, images.device())?)
            }
            None => None,
        };
        let (mut x, embed) = self.embed.forward_kept(p, images, patch_rows.as_ref())?;
        let mut kept = None;
        if let Some(drop) = &patch {
            let prefix = usize::from(self.config.pool == Pool::Tok);
            let (dropped, k) = patch_dropout::drop_tokens(&x, prefix, drop)?;
            x = dropped;
            kept = Some(k);
        }
        let mut block_inputs = Vec::with_capacity(self.blocks.len());
        let mut block_saved = Vec::with_capacity(self.blocks.len());
        let mut moe = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let (y, s) = b.forward_ep(p, &x, noise_seed.map(|sd| block_noise_seed(sd, i)), ep)?;
            if let Some(stats) = s.moe_stats() {
                moe.push((i, stats.clone()));
            }
            block_inputs.push(x);
            block_saved.push((!self.config.remat).then_some(s));
            x = y;
        }
        let (out, tail) = self.tail_forward(p, x)?;
        Ok((out, ForwardSaved { embed, kept, block_inputs, block_saved, tail, noise_seed, moe }))
    }

    /// The final norm, pooling, pre-logits and classifier on the encoded tokens `x [B, N, D]`.
    pub(crate) fn tail_forward(&self, p: &ParamStore, x: Tensor) -> Result<(Tensor, TailSaved)> {
        let (normed, norm) = self.norm.forward(p, &x)?;
        let (pooled, pool) = self.pool.forward(p, &normed)?;
        let (pre_act, features) = match &self.pre_logits {
            Some(pl) => {
                let z = pl.forward(p, &pooled)?;
                let f = ops::tanh_fwd(&z)?;
                (Some(z), f)
            }
            None => (None, pooled.clone()),
        };
        let out = match &self.head {
            Some(h) => h.forward(p, &features)?,
            None => features.clone(),
        };
        Ok((out, TailSaved { encoded: x, norm, pool, pooled, pre_act, features }))
    }

    /// Backward of [`tail_forward`](Self::tail_forward): accumulates its parameters'
    /// gradients, returns the gradient of the encoded tokens `[B, N, D]`.
    pub(crate) fn tail_backward(
        &self,
        p: &ParamStore,
        s: &TailSaved,
        dout: &Tensor,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        let dfeat = match &self.head {
            Some(h) => h.backward(p, &s.features, dout, g)?,
            None => dout.clone(),
        };
        let dpooled = match (&self.pre_logits, &s.pre_act) {
            (Some(pl), Some(z)) => pl.backward(p, &s.pooled, &ops::tanh_bwd(z, &dfeat)?, g)?,
            _ => dfeat,
        };
        let dnormed = self.pool.backward(p, &s.pool, &dpooled, g)?;
        self.norm.backward(p, &s.encoded, &s.norm, &dnormed, g)
    }

    /// Logits without keeping activations for backward (evaluation, prediction).
    pub fn predict(&self, p: &ParamStore, images: &Tensor) -> Result<Tensor> {
        Ok(self.features_and_logits(p, images)?.1)
    }

    /// `(features [batch, F], logits)` without keeping activations for backward.
    pub fn features_and_logits(&self, p: &ParamStore, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let (features, logits, _) = self.predict_routed(p, images)?;
        Ok((features, logits))
    }

    /// `(features [batch, F], logits [batch, classes], MoE statistics)` without keeping
    /// activations for backward: what each MoE block's routing measured (block index, stats;
    /// empty for a dense model), for inference-time capacity sweeps (`vit eval --sweep`).
    pub fn predict_routed(&self, p: &ParamStore, images: &Tensor) -> Result<(Tensor, Tensor, MoeBlockStats)> {
        let (mut x, _) = self.embed.forward(p, images)?;
        let mut moe = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let (y, s) = b.forward(p, &x)?;
            if let Some(stats) = s.moe_stats() {
                moe.push((i, stats.clone()));
            }
            x = y;
        }
        let (pooled, _) = self.pool.forward(p, &self.norm.forward(p, &x)?.0)?;
        let features = match &self.pre_logits {
            Some(pl) => ops::tanh_fwd(&pl.forward(p, &pooled)?)?,
            None => pooled,
        };
        let logits = match &self.head {
            Some(h) => h.forward(p, &features)?,
            None => features.clone(),
        };
        Ok((features, logits, moe))
    }

    /// Accumulates every parameter's gradient into `g` (a store like the parameters, e.g.
    /// `p.zeros_like(F32)`) given `dout`, the gradient of the forward's output; returns the
    /// gradient of the images. The loss differentiated is `⟨dout, output⟩ + aux_loss` (the
    /// MoE auxiliary losses with weight 1; [`VisionTransformer::backward_scaled`] for another).
    pub fn backward(&self, p: &ParamStore, s: &ForwardSaved, dout: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        self.backward_scaled(p, s, dout, 1.0, g)
    }

    /// [`VisionTransformer::backward`] of `⟨dout, output⟩ + aux_scale · aux_loss`: a trainer
    /// whose loss is the batch mean gives each micro-batch's auxiliary loss the micro-batch's
    /// share of the batch.
    pub fn backward_scaled(
        &self,
        p: &ParamStore,
        s: &ForwardSaved,
        dout: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
    ) -> Result<Tensor> {
        self.backward_notify(p, s, dout, aux_scale, g, &mut |_, _| {})
    }

    /// [`backward_scaled`](Self::backward_scaled) that calls `ready(g, names)` each time the
    /// gradients of `names` are complete in `g` (nothing later in backward adds to them): the
    /// final norm, pooling and heads first, then each block from the last, then the embedding.
    /// A data-parallel trainer starts reducing those gradients there, while backward goes on.
    pub fn backward_notify(
        &self,
        p: &ParamStore,
        s: &ForwardSaved,
        dout: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
        ready: &mut dyn FnMut(&ParamStore, &[String]),
    ) -> Result<Tensor> {
        self.backward_notify_ep(p, s, dout, aux_scale, g, ready, None)
    }

    /// [`backward_notify`](Self::backward_notify) of a forward pass with expert parallelism
    /// ([`forward_train_ep`](Self::forward_train_ep), `ep` its communicator; `None` for a
    /// plain forward). The gradients of this rank's experts are complete (the whole batch's);
    /// every other gradient, the routers' included, is this rank's part, to be summed over the
    /// ranks as in data parallelism. With `ep`, the auxiliary losses of this rank's images count
    /// `aux_scale` times (its share of the whole batch, so that the routers' summed gradient is
    /// the batch's).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_notify_ep(
        &self,
        p: &ParamStore,
        s: &ForwardSaved,
        dout: &Tensor,
        aux_scale: f32,
        g: &mut ParamStore,
        ready: &mut dyn FnMut(&ParamStore, &[String]),
        ep: Option<&dyn Communicator>,
    ) -> Result<Tensor> {
        let mut stages = self.stage_names()?.into_iter().rev();
        let mut notify = |g: &ParamStore| {
            if let Some(names) = stages.next() {
                ready(g, &names)
            }
        };
        let mut dx = self.tail_backward(p, &s.tail, dout, g)?;
        notify(g);
        for (i, b) in self.blocks.iter().enumerate().rev() {
            let x = &s.block_inputs[i];
            dx = match &s.block_saved[i] {
                Some(saved) => b.backward_ep(p, x, saved, &dx, aux_scale, g, ep)?,
                None => {
                    let (_, saved) = b.forward_ep(p, x, s.noise_seed.map(|sd| block_noise_seed(sd, i)), ep)?;
                    b.backward_ep(p, x, &saved, &dx, aux_scale, g, ep)?
                }
            };
            notify(g);
        }
        if let Some(k) = &s.kept {
            dx = patch_dropout::restore(&dx, k)?;
        }
        let dimages = self.embed.backward(p, &s.embed, &dx, g)?;
        notify(g);
        Ok(dimages)
    }

    /// The parameter names of each stage of backward, in forward order: the embedding, each
    /// block, and the rest (final norm, pooling, pre-logits, head).
    pub(crate) fn stage_names(&self) -> Result<Vec<Vec<String>>> {
        let mut sink = ShapeList::default();
        let mut starts = vec![0];
        self.embed.init(&mut sink)?;
        for b in &self.blocks {
            starts.push(sink.0.len());
            b.init(&mut sink)?;
        }
        starts.push(sink.0.len());
        let all: Vec<String> = self.param_shapes()?.into_iter().map(|(n, _)| n).collect();
        starts.push(all.len());
        Ok(starts.windows(2).map(|w| all[w[0]..w[1]].to_vec()).collect())
    }
}
