//! The sharding planner behind `vit plan` (issue 13 item 6): memory, FLOPs, communication and a
//! predicted step time per device for a model on a `data × model` mesh, from shapes alone
//! (nothing is allocated; ViT-22B plans in microseconds). Every formula and assumption is in
//! `docs/sharding.md`; this module is the calculator, `vit plan` prints it.
//!
//! Sharding model (reference §5, ViT-22B):
//! - the `model` axis splits the blocks' matrices: the qkv projection and fc1 (and the parallel
//!   block's fused in-projection and MLP bias) are column-sharded (their output features, hence
//!   the heads, are split), the attention output projection and fc2 (the parallel block's fused
//!   out-projection) are row-sharded (their input features are split); everything else (norms,
//!   QK-norm scales, output biases, embeddings, MAP head, classifier, MoE experts) is replicated
//!   over `model`. Activations are split over `model` too: tokens between the matmuls, features
//!   (heads, MLP hidden units) inside them;
//! - the `data` axis splits the batch, and with [`ParamSharding::Optimizer`] (ZeRO-1) the
//!   optimizer state, with [`ParamSharding::Full`] (ViT-22B) parameters, gradients and
//!   optimizer state.

use serde::Serialize;
use vit_model::{BlockKind, ModelConfig, ModelError, ShardSpec, TensorParallelViT, VisionTransformer};
use vit_optim::{optimizer_state_bytes_split, OptimError, OptimizerConfig};
use vit_tensor::{DType, Device};

/// Errors of the planner: each names the value and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A setting that does not fit the model or the mesh.
    #[error("{what} = {value}: {expected}")]
    Invalid {
        /// The setting (e.g. `--mesh`).
        what: String,
        /// The value given.
        value: String,
        /// What was expected instead.
        expected: String,
    },
    /// The model config is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer config is invalid.
    #[error(transparent)]
    Optim(#[from] OptimError),
}

fn invalid(what: &str, value: impl ToString, expected: impl Into<String>) -> PlanError {
    PlanError::Invalid { what: what.into(), value: value.to_string(), expected: expected.into() }
}

/// A 2-D device mesh: `data` replicas (the batch is split over them) × `model` shards (the
/// blocks' matrices and activations are split over them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mesh {
    /// Size of the data axis.
    pub data: usize,
    /// Size of the model (tensor-parallel) axis.
    pub model: usize,
}

impl Mesh {
    /// Parses `data=256,model=4` (either order; a missing axis has size 1) with
    /// [`vit_collective::MeshShape::parse`], the syntax of the trainer's mesh.
    pub fn parse(s: &str) -> Result<Mesh, PlanError> {
        use vit_collective::{Axis, MeshShape};
        let shape = MeshShape::parse(s).map_err(|e| invalid("--mesh", s, e.to_string()))?;
        if shape.size(Axis::Expert) > 1 {
            return Err(invalid("--mesh", s, "the axes `data` and `model` (the planner has no expert axis)"));
        }
        Ok(Mesh { data: shape.size(Axis::Data), model: shape.size(Axis::Model) })
    }

    /// Devices in the mesh, `data · model`.
    pub fn devices(&self) -> usize {
        self.data * self.model
    }
}

/// What the data axis shards besides the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ParamSharding {
    /// Every data replica holds all (model-sharded) parameters, gradients and optimizer state;
    /// gradients are all-reduced.
    #[default]
    None,
    /// ZeRO-1 (`train.sharding = "optimizer"`): optimizer state split over data; gradients
    /// reduce-scattered, updated parameters all-gathered.
    Optimizer,
    /// ViT-22B / ZeRO-3: parameters, gradients and optimizer state split over data; each
    /// block's parameters all-gathered when needed (forward and backward), gradients
    /// reduce-scattered.
    Full,
}

/// Everything a plan depends on. [`PlanSettings::new`] fills the defaults of `vit plan`.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    /// The model (validated by [`plan`]).
    pub model: ModelConfig,
    /// Devices; must equal `mesh.data · mesh.model`.
    pub devices: usize,
    /// The mesh.
    pub mesh: Mesh,
    /// Global batch, images per step; must be divisible by `mesh.data`.
    pub batch: usize,
    /// The optimizer whose state is counted ([`vit_optim::optimizer_state_bytes_split`] on the
    /// sharded shapes: factored Adam factors a split matrix over its whole shape).
    pub optimizer: OptimizerConfig,
    /// Activation checkpointing: keep only each block's input, recompute the block in backward.
    pub remat: bool,
    /// Activation dtype: `F32` or `BF16` (bf16 adds a bf16 copy of the f32 master weights).
    pub precision: DType,
    /// What the data axis shards.
    pub sharding: ParamSharding,
    /// Memory of one device, bytes (default 80 GiB).
    pub device_memory: u64,
    /// Peak dense FLOP/s of one device (default H100 SXM bf16, 989.4e12, reference §7).
    pub device_peak: f64,
    /// Fraction of the peak the compute reaches (the MFU assumption, default 0.5).
    pub compute_efficiency: f64,
    /// Bytes/s per device per direction on the data axis (default 50e9: InfiniBand NDR 400 Gb/s).
    pub data_bandwidth: f64,
    /// Bytes/s per device per direction on the model axis (default 450e9: NVLink 4).
    pub model_bandwidth: f64,
    /// Seconds per ring step of a collective (default 10 µs on data, 5 µs on model).
    pub data_latency: f64,
    /// Seconds per ring step of a collective on the model axis.
    pub model_latency: f64,
}

impl PlanSettings {
    /// `model` on `mesh` with global `batch` and the defaults of `vit plan`: f32 activations,
    /// no remat, no data-axis sharding, 80 GiB H100 SXM (989.4 TFLOP/s bf16, 50% efficiency),
    /// NVLink 4 (450 GB/s) on `model` and InfiniBand NDR (50 GB/s) on `data`.
    pub fn new(model: ModelConfig, mesh: Mesh, batch: usize, optimizer: OptimizerConfig) -> Self {
        PlanSettings {
            model,
            devices: mesh.devices(),
            mesh,
            batch,
            optimizer,
            remat: false,
            precision: DType::F32,
            sharding: ParamSharding::None,
            device_memory: 80 << 30,
            device_peak: 989.4e12,
            compute_efficiency: 0.5,
            data_bandwidth: 50e9,
            model_bandwidth: 450e9,
            data_latency: 10e-6,
            model_latency: 5e-6,
        }
    }
}

/// How one parameter is split over the model axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// The same on every model shard.
    Replicated,
    /// Output features split: dim 0 of a `[out, in]` weight, or a bias of the split outputs.
    Column,
    /// Input (contracting) features split: dim 1 of a `[out, in]` weight.
    Row,
}

/// A parameter's shape on one device of the model axis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardedParam {
    /// The parameter's name (timm's, as in the checkpoint).
    pub name: String,
    /// Its whole shape.
    pub full: Vec<usize>,
    /// Its shape on one model shard.
    pub local: Vec<usize>,
    /// How it is split.
    pub split: Split,
}

/// Every parameter of `cfg` with its shape on one of `model` shards, in store order: the
/// split the tensor-parallel model itself uses ([`TensorParallelViT`]'s plan). Errors when the
/// heads or the MLP width are not divisible by `model`, or for a V-MoE model on a model axis
/// (the trainer refuses both too).
pub fn shard_params(cfg: &ModelConfig, model: usize) -> Result<Vec<ShardedParam>, PlanError> {
    cfg.validate()?;
    if model == 0 {
        return Err(invalid("model axis", 0, "a positive size"));
    }
    if !cfg.heads.is_multiple_of(model) {
        return Err(invalid(
            "--mesh model",
            model,
            format!("must divide the {} heads (the model axis splits the heads)", cfg.heads),
        ));
    }
    if !cfg.mlp_dim.is_multiple_of(model) {
        return Err(invalid("--mesh model", model, format!("must divide mlp_dim = {}", cfg.mlp_dim)));
    }
    let vit = VisionTransformer::new(cfg, DType::F32, Device::Cpu)?;
    if model == 1 {
        let shapes = vit.param_shapes()?;
        return Ok(shapes
            .into_iter()
            .map(|(name, full)| ShardedParam { local: full.clone(), name, full, split: Split::Replicated })
            .collect());
    }
    let tp = TensorParallelViT::new(&vit, model, 0)?;
    Ok(tp
        .plan()
        .params
        .iter()
        .map(|(name, full, spec)| ShardedParam {
            name: name.clone(),
            full: full.clone(),
            local: spec.local_dims(full, model),
            split: match spec {
                ShardSpec::Replicated => Split::Replicated,
                ShardSpec::Split { dim: 0, .. } => Split::Column,
                ShardSpec::Split { .. } => Split::Row,
            },
        })
        .collect())
}

/// Bytes on one device, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryBytes {
    /// f32 master parameters (and their bf16 compute copy with bf16 precision), each tensor
    /// padded to 64 bytes as in `ParamStore`; with full sharding, also one block's gathered
    /// parameters in the compute dtype.
    pub parameters: u64,
    /// f32 gradients; with full sharding, the shard plus one block's unreduced gradients.
    pub gradients: u64,
    /// Optimizer state.
    pub optimizer: u64,
    /// Activations kept for backward ([`Plan::activations_no_remat`] or `_remat`).
    pub activations: u64,
    /// Backward's transient working set, an estimate: one block's activation gradients (as
    /// large as its kept activations) plus the gradients flowing between blocks.
    pub workspace: u64,
    /// The sum.
    pub total: u64,
}

/// Bytes sent per device per step on each axis (what a ring collective moves per device).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CommBytes {
    /// Data axis: gradient all-reduce, or reduce-scatter + all-gather with sharding.
    pub data: f64,
    /// Model axis: the blocks' activation all-gathers and reduce-scatters.
    pub model: f64,
    /// Collectives on the data axis per step.
    pub data_collectives: u64,
    /// Collectives on the model axis per step.
    pub model_collectives: u64,
}

/// A plan: what one device holds, computes and sends per step, and the predicted step time.
/// `vit plan --json` prints it as one object with these fields.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Devices.
    pub devices: usize,
    /// The mesh.
    pub mesh: Mesh,
    /// Global batch, images per step.
    pub batch: usize,
    /// Images per data replica, `batch / data`.
    pub batch_per_replica: usize,
    /// Tokens per image.
    pub tokens: usize,
    /// Tokens of each image a device keeps between blocks, `tokens / model` (may be fractional).
    pub tokens_per_device: f64,
    /// Activation checkpointing.
    pub remat: bool,
    /// `"f32"` or `"bf16"`.
    pub precision: String,
    /// What the data axis shards.
    pub sharding: ParamSharding,
    /// Parameters of the whole model.
    pub params_total: u64,
    /// Parameters one device holds (model-sharded; divided by data with full sharding).
    pub params_per_device: u64,
    /// Kept activations per device without remat, bytes.
    pub activations_no_remat: u64,
    /// Kept activations per device with remat, bytes.
    pub activations_remat: u64,
    /// Memory per device with the chosen remat setting.
    pub memory: MemoryBytes,
    /// Total memory per device with the other remat setting.
    pub memory_total_other_remat: u64,
    /// Device memory, bytes.
    pub device_memory: u64,
    /// Whether `memory.total ≤ device_memory`.
    pub fits: bool,
    /// `memory.total − device_memory` when it does not fit (else 0).
    pub over_by: u64,
    /// Model FLOPs per device per step: `batch · 3 · forward_flops_per_image / devices`.
    pub model_flops: f64,
    /// FLOPs executed per device per step: model FLOPs plus the recomputed forward with remat.
    pub executed_flops: f64,
    /// Bytes on each axis.
    pub comm: CommBytes,
    /// Seconds of compute: `executed_flops / (device_peak · compute_efficiency)`.
    pub compute_time: f64,
    /// Seconds on the data axis: bytes / bandwidth + ring steps × latency.
    pub data_time: f64,
    /// Seconds on the model axis: bytes / bandwidth + ring steps × latency.
    pub model_time: f64,
    /// Step seconds when communication overlaps compute: max(compute, data, model).
    pub step_time_overlap: f64,
    /// Step seconds without overlap: compute + data + model.
    pub step_time_no_overlap: f64,
    /// `model_flops / (step_time_overlap · device_peak)`.
    pub mfu_overlap: f64,
    /// `model_flops / (step_time_no_overlap · device_peak)`.
    pub mfu_no_overlap: f64,
    /// The assumptions: peak FLOP/s, compute efficiency, bandwidths (bytes/s), latencies (s).
    pub device_peak: f64,
    /// Fraction of the peak compute reaches.
    pub compute_efficiency: f64,
    /// Data-axis bytes/s.
    pub data_bandwidth: f64,
    /// Model-axis bytes/s.
    pub model_bandwidth: f64,
    /// Data-axis seconds per ring step.
    pub data_latency: f64,
    /// Model-axis seconds per ring step.
    pub model_latency: f64,
}

/// Activation elements (and f32 statistic elements) one block keeps for backward, per token of
/// one image, over the whole model axis (divide by `model` for one device). D = width, M =
/// mlp_dim, H = heads. Follows the `*Saved` structs of `vit_model::layers` (docs/sharding.md):
///
/// | block | kept, compute dtype | kept, f32 |
/// |---|---|---|
/// | sequential | n1 D, qkv 3D, o D, x1 D, n2 D, h_pre M, h M: 7D + 2M | norm stats 4, lse H |
/// | sequential + QK-norm | n1, q_raw, k_raw, q, k, v, o, merged, x1, n2: 10D + 2M | 4 + lse H + QK stats 4H |
/// | parallel | h D, u M, qkv 3D, o D, cat D+M: 6D + 2M | 2 + H |
/// | parallel + QK-norm | h, u, q_raw, k_raw, q, k, v, o, cat: 8D + 2M | 2 + H + 4H |
pub fn block_kept_per_token(cfg: &ModelConfig) -> (u64, u64) {
    let (d, m, h) = (cfg.width as u64, cfg.mlp_dim as u64, cfg.heads as u64);
    let qk = if cfg.qk_norm { 4 * h } else { 0 };
    match (cfg.block, cfg.qk_norm) {
        (BlockKind::Sequential, false) => (7 * d + 2 * m, 4 + h),
        (BlockKind::Sequential, true) => (10 * d + 2 * m, 4 + h + qk),
        (BlockKind::Parallel, false) => (6 * d + 2 * m, 2 + h),
        (BlockKind::Parallel, true) => (8 * d + 2 * m, 2 + h + qk),
    }
}

/// Kept activation bytes for `images` images on one of `model` shards, `(no remat, remat)`.
/// Outside the blocks: the patches `[B, N, C·p²]`, each block's input and the last block's
/// output `[B, T, D]`, the final norm's statistics, and the head's small tensors (pooled,
/// features, logits; the MAP head's tokens `[B, T, D]`).
pub fn activation_bytes(cfg: &ModelConfig, images: usize, model: usize, dtype: DType) -> (u64, u64) {
    let s = dtype.size_in_bytes() as u64;
    let (b, t, d, l) = (images as u64, cfg.tokens() as u64, cfg.width as u64, cfg.depth as u64);
    let m = model as u64;
    let div = |x: u64| x.div_ceil(m);
    let patches = (cfg.image_size / cfg.patch.max(1)) as u64;
    let embed = b * patches * patches * (cfg.channels * cfg.patch * cfg.patch) as u64 * s;
    let stream = div(b * t * d * s); // one [B, T, D] tensor, token-sharded
    let (kept, stats) = block_kept_per_token(cfg);
    // Split over a model axis, a block keeps the all-gathered inputs of its column-parallel
    // matmuls whole ([R, D] each, for their weight gradients: qkv and fc1, or the fused
    // in-projection) and 1/m of everything else (TpSequentialSaved, TpParallelSaved).
    let gathered = match (model > 1, cfg.block) {
        (false, _) => 0,
        (true, BlockKind::Sequential) => 2 * d,
        (true, BlockKind::Parallel) => d,
    };
    let block = div(b * t * ((kept - gathered) * s + stats * 4)) + b * t * gathered * s;
    // The last block's output all-gathered for the replicated tail (whole on every model rank)
    // and the final norm's statistics; pooled [B, D], pre-logits and features [B, P] each,
    // logits [B, K].
    let last = if model > 1 { b * t * d * s - stream } else { 0 };
    let prelogits = cfg.prelogits.map_or(0, |p| 2 * p as u64);
    let head = last + b * t * 2 * 4 + b * (d + prelogits + cfg.classes as u64) * s;
    // The MAP head (replicated, on all tokens): its input tokens, keys and values [B, T, D]
    // each, probe, q, o, merged, a, n [B, 1, D] and the MLP's two [B, 1, M].
    let map = match cfg.pool {
        vit_model::Pool::Map => b * (3 * t * d + 6 * d + 2 * cfg.mlp_dim as u64) * s,
        _ => 0,
    };
    let outside = embed + (l + 1) * stream + head + map;
    (outside + l * block, outside + block)
}

/// The plan of `s`. Errors name the setting that does not fit (mesh, batch, model).
pub fn plan(s: &PlanSettings) -> Result<Plan, PlanError> {
    let cfg = &s.model;
    let Mesh { data, model } = s.mesh;
    if s.devices != s.mesh.devices() {
        return Err(invalid(
            "--devices",
            s.devices,
            format!("the mesh data={data},model={model} has {} devices", s.mesh.devices()),
        ));
    }
    if s.batch == 0 || !s.batch.is_multiple_of(data) {
        return Err(invalid("--batch", s.batch, format!("a positive multiple of the data axis ({data})")));
    }
    if s.precision != DType::F32 && s.precision != DType::BF16 {
        return Err(invalid("--precision", format!("{:?}", s.precision), "f32 or bf16"));
    }
    for (what, v) in [
        ("--device-peak", s.device_peak),
        ("--compute-efficiency", s.compute_efficiency),
        ("--link-bw data", s.data_bandwidth),
        ("--link-bw model", s.model_bandwidth),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(invalid(what, v, "a positive number"));
        }
    }
    let params = shard_params(cfg, model)?;
    let dsz = |n: u64| n.div_ceil(data as u64);
    let cs = s.precision.size_in_bytes() as u64;
    let local_numel: u64 = params.iter().map(|p| p.local.iter().product::<usize>() as u64).sum();
    let params_total: u64 = params.iter().map(|p| p.full.iter().product::<usize>() as u64).sum();
    // The largest block's local parameter count: the working set gathered under full sharding.
    let mut per_block = std::collections::BTreeMap::<usize, u64>::new();
    for p in &params {
        if let Some(i) = p.name.strip_prefix("blocks.").and_then(|r| r.split('.').next()?.parse().ok()) {
            *per_block.entry(i).or_default() += p.local.iter().product::<usize>() as u64;
        }
    }
    let block_numel = per_block.values().copied().max().unwrap_or(0);
    let opt_full = optimizer_state_bytes_split(
        params.iter().map(|p| (p.name.as_str(), p.local.as_slice(), p.full.as_slice())),
        &s.optimizer,
    )?;
    // `ParamStore`'s flat buffer: each tensor starts on a 64-byte boundary.
    let stored = |size: u64| -> u64 {
        let mut len = 0u64;
        for p in &params {
            len = len.next_multiple_of(64 / size) + p.local.iter().product::<usize>() as u64;
        }
        len * size
    };
    let (f32_bytes, copy_bytes) = (stored(4), if s.precision == DType::BF16 { stored(2) } else { 0 });

    let (parameters, gradients, optimizer, params_per_device) = match s.sharding {
        ParamSharding::None => (f32_bytes + copy_bytes, f32_bytes, opt_full, local_numel),
        ParamSharding::Optimizer => (f32_bytes + copy_bytes, f32_bytes, dsz(opt_full), local_numel),
        ParamSharding::Full => (
            dsz(f32_bytes + copy_bytes) + block_numel * cs,
            dsz(f32_bytes) + block_numel * 4,
            dsz(opt_full),
            dsz(local_numel),
        ),
    };

    let images = s.batch / data;
    let (act_no, act_re) = activation_bytes(cfg, images, model, s.precision);
    let (act_no_base, _) = activation_bytes(&ModelConfig { depth: 1, ..cfg.clone() }, images, model, s.precision);
    let (act_zero, _) = activation_bytes(&ModelConfig { depth: 0, ..cfg.clone() }, images, model, s.precision);
    // One block's kept activations (depth 1 minus depth 0, less the input it adds).
    let stream = (images as u64 * cfg.tokens() as u64 * cfg.width as u64 * cs).div_ceil(model as u64);
    let one_block = act_no_base - act_zero - stream;
    let workspace = one_block + 2 * stream;
    let mem = |act: u64| parameters + gradients + optimizer + act + workspace;
    let (activations, other) = if s.remat { (act_re, act_no) } else { (act_no, act_re) };
    let total = mem(activations);
    let memory = MemoryBytes { parameters, gradients, optimizer, activations, workspace, total };

    // FLOPs: the model's per image (reference §1), split evenly over every device.
    let fwd = s.batch as f64 * cfg.forward_flops_per_image() / s.devices as f64;
    let model_flops = 3.0 * fwd;
    let executed_flops = model_flops + if s.remat { fwd } else { 0.0 };

    // Communication: ring collectives, (n−1)/n of the whole tensor per device each.
    let ring = |n: usize| (n as f64 - 1.0) / n as f64;
    let grad_bytes = local_numel as f64 * 4.0;
    let stages = cfg.depth as u64 + 2; // gradient buckets: one per block, the embedding, the rest
    let (data_bytes, data_collectives, data_steps) = match s.sharding {
        // All-reduce = reduce-scatter + all-gather.
        ParamSharding::None => (2.0 * ring(data) * grad_bytes, stages, 2 * (data as u64 - 1) * stages),
        // Reduce-scatter of f32 gradients, all-gather of the updated f32 parameters.
        ParamSharding::Optimizer => (2.0 * ring(data) * grad_bytes, 2, 2 * (data as u64 - 1)),
        // All-gather of each block's parameters in forward and again in backward (compute
        // dtype; a third time with remat), reduce-scatter of its f32 gradients.
        ParamSharding::Full => {
            let gathers = 2.0 + f64::from(u8::from(s.remat));
            (
                ring(data) * (gathers * local_numel as f64 * cs as f64 + grad_bytes),
                (gathers as u64 + 1) * stages,
                (gathers as u64 + 1) * stages * (data as u64 - 1),
            )
        }
    };
    // Model axis: per block per pass, k all-gathers and k reduce-scatters of [B, T, D].
    let k = match cfg.block {
        BlockKind::Sequential => 2,
        BlockKind::Parallel => 1,
    };
    let passes = 2 + u64::from(s.remat);
    let model_collectives = if model > 1 { cfg.depth as u64 * passes * 2 * k } else { 0 };
    let act_full = images as f64 * cfg.tokens() as f64 * cfg.width as f64 * cs as f64;
    let model_bytes = model_collectives as f64 * ring(model) * act_full;
    let comm = CommBytes { data: data_bytes, model: model_bytes, data_collectives, model_collectives };
    let data_time = if data > 1 { data_bytes / s.data_bandwidth + data_steps as f64 * s.data_latency } else { 0.0 };
    let model_time =
        model_bytes / s.model_bandwidth + (model_collectives * (model as u64 - 1)) as f64 * s.model_latency;
    let compute_time = executed_flops / (s.device_peak * s.compute_efficiency);
    let step_time_overlap = compute_time.max(data_time).max(model_time);
    let step_time_no_overlap = compute_time + data_time + model_time;

    Ok(Plan {
        devices: s.devices,
        mesh: s.mesh,
        batch: s.batch,
        batch_per_replica: images,
        tokens: cfg.tokens(),
        tokens_per_device: cfg.tokens() as f64 / model as f64,
        remat: s.remat,
        precision: if s.precision == DType::BF16 { "bf16" } else { "f32" }.into(),
        sharding: s.sharding,
        params_total,
        params_per_device,
        activations_no_remat: act_no,
        activations_remat: act_re,
        memory,
        memory_total_other_remat: mem(other),
        device_memory: s.device_memory,
        fits: total <= s.device_memory,
        over_by: total.saturating_sub(s.device_memory),
        model_flops,
        executed_flops,
        comm,
        compute_time,
        data_time,
        model_time,
        step_time_overlap,
        step_time_no_overlap,
        mfu_overlap: model_flops / (step_time_overlap * s.device_peak),
        mfu_no_overlap: model_flops / (step_time_no_overlap * s.device_peak),
        device_peak: s.device_peak,
        compute_efficiency: s.compute_efficiency,
        data_bandwidth: s.data_bandwidth,
        model_bandwidth: s.model_bandwidth,
        data_latency: s.data_latency,
        model_latency: s.model_latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_parses_either_order_and_rejects_unknown_axes() {
        assert_eq!(Mesh::parse("data=256,model=4").unwrap(), Mesh { data: 256, model: 4 });
        assert_eq!(Mesh::parse("model=2, data=3").unwrap(), Mesh { data: 3, model: 2 });
        assert_eq!(Mesh::parse("data=8").unwrap(), Mesh { data: 8, model: 1 });
        let e = Mesh::parse("data=2,expert=4").unwrap_err().to_string();
        assert!(e.contains("no expert axis"), "{e}");
        let e = Mesh::parse("data=2,pipe=4").unwrap_err().to_string();
        assert!(e.contains("unknown axis \"pipe\""), "{e}");
        for bad in ["data=0", "data=x", "data", "data=2,data=2"] {
            assert!(Mesh::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn block_matrices_split_and_the_rest_is_replicated() {
        let mut cfg = ModelConfig::preset("B/16").unwrap();
        cfg.pool = vit_model::Pool::Map;
        let split = |cfg: &ModelConfig, name: &str| {
            shard_params(cfg, 2).unwrap().into_iter().find(|p| p.name == name).unwrap().split
        };
        assert_eq!(split(&cfg, "blocks.3.attn.qkv.weight"), Split::Column);
        assert_eq!(split(&cfg, "blocks.3.attn.proj.weight"), Split::Row);
        assert_eq!(split(&cfg, "blocks.3.attn.proj.bias"), Split::Replicated);
        assert_eq!(split(&cfg, "blocks.3.mlp.fc2.bias"), Split::Replicated);
        assert_eq!(split(&cfg, "attn_pool.mlp.fc1.weight"), Split::Replicated);
        assert_eq!(split(&cfg, "head.weight"), Split::Replicated);
        cfg.block = BlockKind::Parallel;
        cfg.qkv_bias = false;
        assert_eq!(split(&cfg, "blocks.0.mlp_bias"), Split::Column);
        assert_eq!(split(&cfg, "blocks.0.out_proj.weight"), Split::Row);
    }

    #[test]
    fn kept_activations_grow_with_depth_by_one_block() {
        let cfg = ModelConfig::preset("B/16").unwrap();
        let mut deeper = cfg.clone();
        deeper.depth += 1;
        let (a, r) = activation_bytes(&cfg, 8, 1, DType::F32);
        let (a2, r2) = activation_bytes(&deeper, 8, 1, DType::F32);
        let (kept, stats) = block_kept_per_token(&cfg);
        let t = 8 * cfg.tokens() as u64;
        // One more block: its kept set plus its input.
        assert_eq!(a2 - a, t * (kept * 4 + stats * 4) + t * 768 * 4);
        // With remat only the input.
        assert_eq!(r2 - r, t * 768 * 4);
    }
}
