//! `vit train`: one recipe end to end — data, model, optimizer, schedule, evaluation,
//! checkpoints, resume (design §6). Deterministic: the same config and seed give the same
//! losses, and a run resumed from a checkpoint continues exactly as a straight run would.

pub mod bad_examples;
pub mod config;
pub mod data;
pub mod data_check;
pub mod device_steps;
pub mod evals;
pub mod expert_parallel;
pub mod full_shard;
pub mod grad_norm;
pub mod mixup;
pub mod model_parallel;
pub mod moe_eval;
pub mod moe_log;
mod panics;
pub mod plot;
pub mod routed;
pub mod run_clock;
pub mod run_dir;
pub mod tta;
pub mod zero;

use config::{DecayKind, LossKind, OptimizerName, TrainConfig};
use run_clock::RunClock;
use run_dir::RunDir;
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};
use vit_data::Loader;
use vit_model::{
    checkpoint, layers::patch_dropout::PatchDrop, layers::resample_posemb, Checkpoint, ModelConfig, ParamStore,
    VisionTransformer,
};
use vit_optim::{
    AdamWConfig, Algorithm, Decay, FactoredAdamConfig, OptimizerChain, OptimizerConfig, Schedule, SgdConfig,
};
use vit_tensor::{ops, DType, Device, Tensor};

/// Why training stopped early or could not start. Messages are one line and name the thing.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("the loss became {loss} at step {step}; training stopped (the last good checkpoint is kept)")]
    NonFiniteLoss { step: u64, loss: f32 },
    /// Stopped by SIGINT/SIGTERM or `--stop-at` after saving a checkpoint; `vit` exits with
    /// [`EXIT_INTERRUPTED`].
    #[error("{reason} at step {step}: checkpoint saved, continue with --resume {dir}")]
    Interrupted { step: u64, dir: String, reason: StopReason },
    #[error(transparent)]
    Model(#[from] vit_model::ModelError),
    #[error(transparent)]
    Optim(#[from] vit_optim::OptimError),
    #[error(transparent)]
    Data(#[from] vit_data::DataError),
    #[error(transparent)]
    Tensor(#[from] vit_tensor::Error),
    /// A panic inside the run (a bug), caught and reported with where it happened.
    #[error("internal error (please report it): {0}")]
    Panic(String),
    /// An error after at least one completed step, and what became of that step's state
    /// (saved, not finite, or not saved because the update was in flight).
    #[error("{source}; {kept}")]
    Stopped { source: Box<TrainError>, kept: String },
    /// A collective among data-parallel ranks failed (a rank left, a mismatch).
    #[error(transparent)]
    Collective(#[from] vit_collective::Error),
    /// The failure of data-parallel rank `rank` (other than 0), which ended the run.
    #[error("rank {rank}: {source}")]
    Rank { rank: usize, source: Box<TrainError> },
}

/// The exit code of `vit train` when a signal (SIGINT, SIGTERM, SIGHUP) or `--stop-at` stopped
/// it after saving a checkpoint: the run can continue with `--resume`. (1 is any error, 0 a
/// finished run; a second signal exits at once with 128 + 2 = 130.)
pub const EXIT_INTERRUPTED: u8 = 3;

/// Why a run stopped, as `summary.json`'s `stop_reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every step ran.
    Completed,
    /// SIGINT (Ctrl-C), SIGTERM (Slurm, Kubernetes, cloud preemption) or SIGHUP.
    Signal,
    /// `--stop-at`.
    StopAt,
    /// An error after at least one completed step (the error is on stderr; the state of the
    /// last completed step is saved when it is finite).
    Error,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Completed => "completed",
            StopReason::Signal => "interrupted by a signal",
            StopReason::StopAt => "stopped by --stop-at",
            StopReason::Error => "stopped by an error",
        })
    }
}

/// What `summary.json` holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Why the run ended here.
    pub stop_reason: StopReason,
    /// Steps completed (the total when completed).
    pub steps: u64,
    /// The last step's training loss.
    pub train_loss: f64,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// The newest result of every `[[evals]]` metric: `name → metric → value`.
    pub eval: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    /// Training images per second (evaluation and checkpoint time excluded).
    pub images_per_second: f64,
    pub wall_seconds: f64,
    /// The CPU the run ran on and its kernels' instruction set
    /// (`AMD EPYC (family 25, model 1), AVX2+FMA kernels`): speeds depend on it.
    pub cpu: String,
    /// The fraction of all cores' time that the hypervisor took during the run (Linux's steal
    /// time, [`run_clock`]); `null` where it cannot be read. Above a few percent the run's
    /// speed is not the CPU's.
    pub cpu_steal: Option<f64>,
    /// Whether this process wrote the run (false on data-parallel ranks other than 0, which
    /// should not report it again).
    #[serde(skip)]
    pub lead: bool,
}

/// Options of one invocation that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in the run directory.
    pub resume: bool,
    /// Save a checkpoint and stop after this step, as if interrupted (tests, preemption drills).
    pub stop_at: Option<u64>,
    /// Show a progress bar (on a terminal) instead of a line per log step.
    pub progress_bar: bool,
    /// Print no line per log step (a caller that reports runs itself, such as `vit sweep`).
    pub quiet: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler of SIGINT, SIGTERM and SIGHUP once (ctrlc's `termination` feature):
/// the first signal lets the current step finish, then the loop saves a checkpoint and stops;
/// a second one exits at once (130), for a user who does not want to wait.
fn watch_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    });
}

/// Total optimizer steps of `cfg` for a training set of `n` images.
pub fn total_steps(cfg: &TrainConfig, n: usize) -> u64 {
    match (cfg.train.steps, cfg.train.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * n as f64) / cfg.train.batch_size as f64).ceil().max(1.0) as u64,
        (None, None) => unreachable!("validated: steps or epochs"),
    }
}

fn optimizer_config<'a>(
    cfg: &TrainConfig,
    total: u64,
    names: impl Iterator<Item = &'a str>,
) -> Result<OptimizerConfig, TrainError> {
    let s = &cfg.schedule;
    let decay = match s.decay {
        DecayKind::Rsqrt => Decay::Rsqrt { timescale: s.timescale },
        DecayKind::Cosine => Decay::Cosine,
        DecayKind::Linear => Decay::Linear,
        DecayKind::Constant => Decay::Constant,
    };
    if s.warmup_steps >= total || s.cooldown_steps > total - s.warmup_steps {
        return Err(TrainError::Config(format!(
            "schedule.warmup_steps = {} and schedule.cooldown_steps = {}: expected them to fit in the {total} training steps",
            s.warmup_steps, s.cooldown_steps
        )));
    }
    let o = &cfg.optimizer;
    let algorithm = match o.name {
        OptimizerName::FactoredAdam => {
            Algorithm::FactoredAdam(FactoredAdamConfig { momentum: o.momentum.or(Some(0.9)), ..Default::default() })
        }
        OptimizerName::AdamW => Algorithm::AdamW(AdamWConfig::default()),
        OptimizerName::Sgd => Algorithm::Sgd(SgdConfig { momentum: o.momentum.or(Some(0.9)), ..Default::default() }),
    };
    let mut oc = OptimizerConfig::new(algorithm, o.lr);
    oc.weight_decay = o.weight_decay;
    oc.grad_clip_norm = o.clip_norm;
    oc.schedule = Schedule::new(decay, s.warmup_steps, s.cooldown_steps, total)?;
    oc.groups = o.param_groups()?;
    let names: Vec<&str> = names.collect();
    // A rule of the config's that matches no parameter is a typo or a rule for another model:
    // say so rather than train without it. The config's rules come first in each list, so an
    // index below their count is one of them (Scaling ViT's rules behind may go unused).
    for (list, i) in oc.groups.compile()?.unmatched_rules(&names) {
        let ours = if list == "wd_mults" { &o.wd_mults } else { &o.lr_mults };
        if let Some(r) = ours.get(i) {
            return Err(TrainError::Config(format!(
                "optimizer.{list}[{i}]: pattern {:?} matches no parameter of this model; expected a regular \
                 expression over whole dotted names such as {:?}",
                r.pattern,
                names.iter().rev().take(3).collect::<Vec<_>>()
            )));
        }
    }
    if !o.train_only.is_empty() {
        // Freeze, by exact name, every parameter that no `train_only` pattern matches in full.
        let keep = regex::Regex::new(&format!("^(?:{})$", o.train_only.join("|")))
            .map_err(|e| TrainError::Config(format!("optimizer.train_only: {}", e.to_string().replace('\n', " "))))?;
        for name in names.into_iter().filter(|n| !keep.is_match(n)) {
            oc.groups = oc.groups.freeze(regex::escape(name));
        }
    }
    Ok(oc)
}

/// Parameters to start from: fresh, or `init_from`'s weights adapted to this model (position
/// embedding resampled to the new grid, a classifier of another size re-initialised).
fn initial_params(cfg: &TrainConfig, model: &VisionTransformer, device: Device) -> Result<ParamStore, TrainError> {
    let mut params = model.init_params(cfg.train.seed, DType::F32, device)?;
    let Some(path) = &cfg.train.init_from else { return Ok(params) };
    let src = checkpoint::load_checkpoint(path, device)?;
    let (old_grid, new_grid) = (src.config.grid(), model.config.grid());
    let cls = model.config.pool == vit_model::Pool::Tok;
    let mut reinitialised = Vec::new();
    for name in params.names().map(str::to_string).collect::<Vec<_>>() {
        let Ok(t) = src.params.get(&name) else {
            reinitialised.push(name);
            continue;
        };
        let want = params.get(&name)?.dims().to_vec();
        let t = if name == "pos_embed" && old_grid != new_grid {
            resample_posemb(t, old_grid, new_grid, cls)?
        } else {
            t.clone()
        };
        if t.dims() == want.as_slice() {
            params.set(&name, t)?;
        } else {
            reinitialised.push(name);
        }
    }
    if !reinitialised.is_empty() {
        println!("init_from {path}: kept fresh initialisation for {}", reinitialised.join(", "));
    }
    Ok(params)
}

/// Targets `[B, K]`: one-hot labels with label smoothing, mixed with a teacher's softmax.
fn targets(
    labels: &[i32],
    classes: usize,
    smoothing: f32,
    teacher: Option<(&Tensor, f32)>,
) -> Result<Tensor, TrainError> {
    // one_hot names any label outside 0..classes (a test split with more classes than the model).
    let onehot = ops::one_hot(&Tensor::from_vec(labels.to_vec(), [labels.len()], Device::Cpu)?, classes, DType::F32)?;
    let t = if smoothing > 0.0 {
        let uniform = Tensor::full(smoothing / classes as f32, onehot.shape().clone(), DType::F32, Device::Cpu)?;
        ops::add(&ops::scale(&onehot, 1.0 - smoothing)?, &uniform)?
    } else {
        onehot
    };
    with_teacher(t, teacher)
}

/// Targets `t` `[B, K]` (CPU) mixed with a teacher's softmax of `logits` `[B, K]` by weight `w`.
fn with_teacher(t: Tensor, teacher: Option<(&Tensor, f32)>) -> Result<Tensor, TrainError> {
    let Some((logits, w)) = teacher else { return Ok(t) };
    // KL(teacher ‖ student) has the gradient of cross-entropy against the teacher's
    // probabilities; cross-entropy is linear in the targets, so the two losses mix there.
    let p = ops::softmax_fwd(&logits.cast(DType::F32)?.to_device(Device::Cpu)?)?;
    Ok(ops::add(&ops::scale(&t, 1.0 - w)?, &ops::scale(&p, w)?)?)
}

/// Forward and backward of one micro-batch: `x` `[micro, C, H, W]` in the compute dtype and
/// targets `t` `[micro, classes]` f32 on the model's device. Adds the gradients of the batch's
/// mean loss (each example weighted `1 / batch`, `batch` the whole optimizer batch) into
/// `grads`, and returns the sum of the micro-batch's per-example losses. With `patch`, each
/// image keeps `patch.keep` of its patch tokens (PatchDropout).
#[allow(clippy::too_many_arguments)]
pub fn micro_batch_grads(
    model: &VisionTransformer,
    params: &ParamStore,
    x: &Tensor,
    t: &Tensor,
    loss: LossKind,
    batch: usize,
    patch: Option<PatchDrop>,
    grads: &mut ParamStore,
) -> Result<f64, TrainError> {
    micro_batch_grads_to(model, params, x, t, loss, batch, None, patch, grads, &mut |_, _| {}, None, None)
}

/// [`micro_batch_grads`] with V-MoE training: MoE routers add noise from `moe`'s seed
/// ([`moe_log::noise_seed`]), the auxiliary losses join the loss with the micro-batch's share
/// of the batch, and the layers' statistics go into `moe`'s log. Without `moe`, MoE layers
/// route without noise (a dense model is the same either way). `ready` is called as backward
/// completes gradients ([`VisionTransformer::backward_notify`]). With `ep`, the MoE layers'
/// experts are sharded over its ranks (`params` holds this rank's,
/// [`expert_parallel::ExpertParallel`]) and every rank of it must call this at once.
#[allow(clippy::too_many_arguments)]
pub fn micro_batch_grads_moe(
    model: &VisionTransformer,
    params: &ParamStore,
    x: &Tensor,
    t: &Tensor,
    loss: LossKind,
    batch: usize,
    moe: Option<(u64, &mut moe_log::MoeLog)>,
    grads: &mut ParamStore,
    ready: &mut dyn FnMut(&ParamStore, &[String]),
    ep: Option<&dyn vit_collective::Communicator>,
) -> Result<f64, TrainError> {
    micro_batch_grads_to(model, params, x, t, loss, batch, moe, None, grads, ready, ep, None)
}

/// [`micro_batch_grads`] of a dense model whose loss stays on the device: the micro-batch's loss
/// sum is added into `device`'s step status ([`device_steps::DeviceSteps`]) instead of being read
/// back (no host round trip). With `patch`, each image keeps `patch.keep` patch tokens.
#[allow(clippy::too_many_arguments)]
pub fn micro_batch_grads_device(
    model: &VisionTransformer,
    params: &ParamStore,
    x: &Tensor,
    t: &Tensor,
    loss: LossKind,
    batch: usize,
    patch: Option<PatchDrop>,
    grads: &mut ParamStore,
    device: &mut device_steps::DeviceSteps,
) -> Result<(), TrainError> {
    micro_batch_grads_to(model, params, x, t, loss, batch, None, patch, grads, &mut |_, _| {}, None, Some(device))?;
    Ok(())
}

/// [`micro_batch_grads_moe`] that, with `device`, adds the micro-batch's loss sum into the
/// device-side step status instead of reading it (returns 0 then; a dense model only: its
/// auxiliary loss is 0). With `patch`, each image keeps `patch.keep` patch tokens
/// (PatchDropout; without `moe`, in a pass whose router-noise seed is 0).
#[allow(clippy::too_many_arguments)]
fn micro_batch_grads_to(
    model: &VisionTransformer,
    params: &ParamStore,
    x: &Tensor,
    t: &Tensor,
    loss: LossKind,
    batch: usize,
    moe: Option<(u64, &mut moe_log::MoeLog)>,
    patch: Option<PatchDrop>,
    grads: &mut ParamStore,
    ready: &mut dyn FnMut(&ParamStore, &[String]),
    ep: Option<&dyn vit_collective::Communicator>,
    device: Option<&mut device_steps::DeviceSteps>,
) -> Result<f64, TrainError> {
    let share = x.dims()[0] as f64 / batch as f64;
    let (logits, saved) = match moe {
        Some((seed, log)) => {
            let (logits, saved) = model.forward_train_with(params, x, seed, patch, ep)?;
            log.add(&saved, share);
            (logits, saved)
        }
        None if patch.is_some() => model.forward_train_with(params, x, 0, patch, None)?,
        None => model.forward(params, x)?,
    };
    let (losses, dlogits) = loss_and_grad(&logits, t, loss, batch)?;
    // The auxiliary loss (0 for a dense model) counts with this micro-batch's share of the batch.
    let sum = match device {
        Some(d) => {
            d.add_losses(&losses)?;
            0.0
        }
        None => ops::sum_all(&losses)?.to_scalar()? as f64 + saved.aux_loss() as f64 * x.dims()[0] as f64,
    };
    model.backward_notify_ep(params, &saved, &dlogits, share as f32, grads, ready, ep)?;
    Ok(sum)
}

/// The whole model's parameters, gathered (a collective) when this rank holds a part of them
/// (full sharding over the data axis, a model axis, experts over the data axis); `None` when
/// `params` are whole already, and on the data ranks other than 0 under full sharding (the
/// whole model is gathered to data rank 0 alone).
fn whole_params(
    params: &ParamStore,
    opt: &zero::Updater,
    mp: &Option<model_parallel::ModelParallel>,
    ep: &Option<expert_parallel::ExpertParallel>,
    dp: &dyn vit_collective::Communicator,
) -> Result<Option<ParamStore>, TrainError> {
    let gathered = match opt {
        // To data rank 0 only; the other data ranks are done (their model groups too).
        zero::Updater::Full(share) => match share.gather_params_to_root(params, dp)? {
            Some(whole) => Some(whole),
            None => return Ok(None),
        },
        _ => None,
    };
    let local = gathered.as_ref().unwrap_or(params);
    Ok(match (mp, ep) {
        (Some(m), _) => Some(m.gather_params(local)?),
        (None, Some(e)) => Some(e.gather(dp, local)?),
        (None, None) => gathered,
    })
}

/// Per-example losses `[micro]` of `logits` against targets `t`, and the gradient of the
/// batch's mean loss with respect to the logits (each example weighted `1 / batch`).
fn loss_and_grad(logits: &Tensor, t: &Tensor, loss: LossKind, batch: usize) -> Result<(Tensor, Tensor), TrainError> {
    let dloss = Tensor::full(1.0 / batch as f32, [logits.dims()[0]], DType::F32, logits.device())?;
    Ok(if loss == LossKind::Sigmoid {
        (ops::sigmoid_cross_entropy_fwd(logits, t)?, ops::sigmoid_cross_entropy_bwd(logits, t, &dloss)?)
    } else {
        ops::softmax_cross_entropy_fwd_bwd(logits, t, &dloss)?
    })
}

/// [`micro_batch_grads`] of a model split over a model axis: this rank's part of the gradients
/// (every rank of the axis runs it on the same micro-batch); returns the sum of the losses.
fn micro_batch_grads_tp(
    mp: &model_parallel::ModelParallel,
    params: &ParamStore,
    x: &Tensor,
    t: &Tensor,
    loss: LossKind,
    batch: usize,
    grads: &mut ParamStore,
) -> Result<f64, TrainError> {
    let (logits, saved) = mp.tp.forward(params, x, mp.axis())?;
    let (losses, dlogits) = loss_and_grad(&logits, t, loss, batch)?;
    mp.tp.backward(params, &saved, &dlogits, grads, mp.axis())?;
    Ok(ops::sum_all(&losses)?.to_scalar()? as f64)
}

/// `(accuracy, mean loss)` over one pass of `loader`; the loss is sigmoid cross-entropy when
/// `sigmoid`, else softmax cross-entropy; with test-time augmentation `tta` (empty: none), of
/// the mean logits over each image's views ([`tta`]).
pub fn evaluate(
    model: &VisionTransformer,
    params: &ParamStore,
    loader: &Loader,
    device: Device,
    sigmoid: bool,
    tta: &[tta::TtaOp],
) -> Result<(f64, f64), TrainError> {
    let r = moe_eval::evaluate_routed(model, params, loader, device, sigmoid, tta)?;
    Ok((r.accuracy, r.loss))
}

fn param_dtype(params: &ParamStore) -> DType {
    params.iter().next().map_or(DType::F32, |(_, t)| t.dtype())
}

/// The compute copy of the parameters: themselves in f32 (sharing the buffers), a bf16 cast
/// otherwise (one cast per flat buffer).
fn compute_params(params: &ParamStore, dtype: DType) -> Result<ParamStore, TrainError> {
    Ok(params.cast(dtype)?)
}

/// Runs (or resumes) the recipe `cfg` in `run`; returns the summary also written to `summary.json`.
/// With `train.world = N > 1`, N data-parallel ranks run as threads over a `LocalGroup`; rank 0
/// writes the run directory and prints, and the first real failure of any rank is the error.
pub fn train(cfg: &TrainConfig, run: &RunDir, opts: &RunOptions) -> Result<Summary, TrainError> {
    let world = cfg.train.world;
    // Under `mpirun -np N` (a build with the `mpi` feature), each process is one rank.
    #[cfg(feature = "mpi")]
    {
        let mut comm = vit_collective::MpiCommunicator::init()?;
        if cfg.train.collective_timeout > 0.0 {
            comm.set_timeout(Some(std::time::Duration::from_secs_f64(cfg.train.collective_timeout)));
        }
        let n = vit_collective::Communicator::world_size(&comm);
        if n > 1 {
            if world > 1 {
                return Err(TrainError::Config(format!(
                    "train.world = {world} under mpirun with {n} processes: expected one of the two \
                     (threads with --world, or processes with mpirun)"
                )));
            }
            let rank = vit_collective::Communicator::rank(&comm);
            let dir = if rank == 0 { run.clone() } else { run.reader() };
            let result = match (cfg.train.device.0, cfg.train.comm) {
                // GPU ranks: NCCL between the processes' GPUs (the id broadcast over MPI), each
                // process on the GPU of its local rank; host tensors stay on MPI.
                (Device::Cuda(base), c) if c != config::Comm::Local => {
                    let d = base + local_rank(rank);
                    nccl_over(&comm, d, cfg)
                        .and_then(|(rcfg, nccl)| train_rank(&rcfg, &dir, opts, &routed::Routed::new(&comm, nccl)))
                }
                _ => train_rank(cfg, &dir, opts, &comm),
            };
            // A rank that failed alone would leave the others waiting in a collective forever
            // (and itself in MPI_Finalize): unless every rank failed at once, end the job.
            if let Err(e) = &result {
                let agreed_stop = matches!(e, TrainError::Interrupted { .. });
                if !agreed_stop && !comm.all_fail_within(std::time::Duration::from_secs(10)) {
                    eprintln!("error: rank {rank}: {e}");
                    eprintln!("rank {rank} failed alone: ending every rank of the job (MPI_Abort)");
                    comm.abort(1);
                }
            }
            return result;
        }
    }
    let nccl = uses_nccl(cfg, world);
    if world <= 1 && !nccl {
        return train_rank(cfg, run, opts, &vit_collective::SingleProcess::new());
    }
    if let (true, Device::Cuda(base)) = (nccl, cfg.train.device.0) {
        let count = vit_tensor::cuda::device_count();
        if base + world > count {
            return Err(TrainError::Config(format!(
                "train.world = {world} on cuda:{base}: expected {world} GPU(s) (cuda:{base}..cuda:{}), but {count} \
                 CUDA device(s) are visible",
                base + world - 1
            )));
        }
    }
    let timeout =
        (cfg.train.collective_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(cfg.train.collective_timeout));
    // CPU ranks split this process's rayon threads between them: two ranks of one thread each
    // keep both cores busy through each other's serial stretches, where two ranks on one shared
    // pool wait on each other's jobs (docs/perf.md, "Data parallelism in one process").
    let rank_pools = match cfg.train.device.0 {
        Device::Cpu => crate::thread_pools::split(world.max(1), rayon::current_num_threads())
            .inspect_err(|e| eprintln!("warning: {e}; the ranks share one pool"))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let results = vit_collective::LocalGroup::run_with_timeout(world.max(1), timeout, |comm| {
        let rank = vit_collective::Communicator::rank(&comm);
        let dir = if rank == 0 { run.clone() } else { run.reader() };
        let work = || match cfg.train.device.0 {
            // Rank r on cuda:(base + r), gradients over NCCL; host tensors over the threads.
            Device::Cuda(base) if nccl => nccl_over(&comm, base + rank, cfg)
                .and_then(|(rcfg, nccl)| train_rank(&rcfg, &dir, opts, &routed::Routed::new(&comm, nccl))),
            _ => train_rank(cfg, &dir, opts, &comm),
        };
        match rank_pools.get(rank) {
            Some(pool) => pool.install(work),
            None => work(),
        }
    });
    // A rank that failed makes the others see it leave the group: report the failure itself.
    fn is_departure(e: &TrainError) -> bool {
        match e {
            TrainError::Collective(vit_collective::Error::Disconnected { .. }) => true,
            TrainError::Stopped { source, .. } => is_departure(source),
            _ => false,
        }
    }
    let mut first_err = None;
    let mut lead = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(s) if rank == 0 => lead = Some(s),
            Ok(_) => {}
            Err(e) if first_err.as_ref().is_none_or(|(_, f)| is_departure(f) && !is_departure(&e)) => {
                first_err = Some((rank, e))
            }
            Err(_) => {}
        }
    }
    match (first_err, lead) {
        (Some((0, e)), _) => Err(e),
        (Some((rank, e)), _) => Err(TrainError::Rank { rank, source: Box::new(e) }),
        (None, Some(s)) => Ok(s),
        (None, None) => Err(TrainError::Io("rank 0 returned no summary".into())),
    }
}

/// Whether the ranks of a run of `world` in-process ranks (or MPI processes) talk over NCCL:
/// `train.comm = "nccl"`, or `"auto"` with several ranks on a GPU.
fn uses_nccl(cfg: &TrainConfig, world: usize) -> bool {
    match (cfg.train.comm, cfg.train.device.0) {
        (_, Device::Cpu) | (config::Comm::Local, _) => false,
        (config::Comm::Nccl, Device::Cuda(_)) => true,
        (config::Comm::Auto, Device::Cuda(_)) => world > 1,
    }
}

/// This rank's NCCL communicator on cuda:`device`, made over the host backend `host` (every
/// rank calls it), with the collective timeout; and the config of this rank (its device).
fn nccl_over(
    host: &dyn vit_collective::Communicator,
    device: usize,
    cfg: &TrainConfig,
) -> Result<(TrainConfig, vit_collective::NcclCommunicator), TrainError> {
    let mut nccl = vit_collective::NcclCommunicator::from_communicator(host, device)?;
    if cfg.train.collective_timeout > 0.0 {
        nccl.set_timeout(Some(std::time::Duration::from_secs_f64(cfg.train.collective_timeout)));
    }
    let mut rcfg = cfg.clone();
    rcfg.train.device = config::TrainDevice(Device::Cuda(device));
    Ok((rcfg, nccl))
}

/// This process's rank among those of its machine under mpirun or srun (Open MPI, MPICH and
/// Slurm name it in the environment), or its world rank when none does.
#[cfg(feature = "mpi")]
fn local_rank(rank: usize) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(rank)
}

/// The training loop of one data-parallel rank of `comm` (the whole run when it is a world of one).
fn train_rank(
    cfg: &TrainConfig,
    run: &RunDir,
    opts: &RunOptions,
    comm: &dyn vit_collective::Communicator,
) -> Result<Summary, TrainError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    // Data-parallel groups: all ranks, or world / train.mesh.model of them on a mesh.
    let groups = world / cfg.train.mesh.model.max(1);
    if world % cfg.train.mesh.model.max(1) != 0 || !cfg.train.batch_size.is_multiple_of(groups * cfg.train.grad_accum) {
        return Err(TrainError::Config(format!(
            "{world} ranks with train.mesh.model = {}: expected the mesh size to divide the ranks and the \
             data-parallel groups times train.grad_accum ({}) to divide train.batch_size ({})",
            cfg.train.mesh.model, cfg.train.grad_accum, cfg.train.batch_size
        )));
    }
    let started = RunClock::start();
    watch_signals();
    // Process-wide, as PyTorch's setting: every rank of this process has the same config.
    vit_tensor::cpu::set_matmul_precision(cfg.train.matmul_precision.setting());
    let device: Device = cfg.train.device.0;
    let dtype = cfg.train.precision.dtype();
    let mcfg: ModelConfig = cfg.model_config()?;
    let model = VisionTransformer::new(&mcfg, dtype, device)?;
    // model.moe.expert_parallel: E/world experts of each MoE layer on this rank (refused on a mesh).
    let ep = expert_parallel::ExpertParallel::new(cfg, &model, comm)?;
    // On a data × model mesh: this rank's part of the model, and the data axis to reduce over.
    let mp = model_parallel::ModelParallel::new(comm, &model, cfg.train.mesh.model, cfg.train.mesh.matmul.mode())?;
    let dp: &dyn vit_collective::Communicator = mp.as_ref().map_or(comm, |m| m.data());
    let full = cfg.train.sharding == config::Sharding::Full;
    if full && mcfg.moe.is_some() {
        return Err(TrainError::Config(
            "train.sharding = \"full\" with a V-MoE model: expected a dense model (MoE layers are not run stage by stage yet)"
                .into(),
        ));
    }

    let (drank, dworld) = (dp.rank(), dp.world_size());
    // Over NCCL the gradients are all-reduced on the device, in place (also for one rank, so
    // that `train.comm = "nccl"` runs the whole path on one GPU).
    let via_nccl = uses_nccl(cfg, world);
    let data = data::load(&cfg.data)?;
    let probe = data.eval_loader(&data.train, 1)?.batch(0)?;
    let want = [mcfg.channels, mcfg.image_size, mcfg.image_size];
    if probe.images.dims()[1..] != want {
        return Err(TrainError::Config(format!(
            "the model expects images [{}, {}, {}] but {} gives {:?} after preprocessing (set data.augment or the model's image_size/channels)",
            want[0],
            want[1],
            want[2],
            cfg.data.path,
            &probe.images.dims()[1..]
        )));
    }
    if data.train.num_classes() > mcfg.classes {
        return Err(TrainError::Config(format!(
            "{} has {} classes but model.classes = {}",
            cfg.data.path,
            data.train.num_classes(),
            mcfg.classes
        )));
    }
    let total = total_steps(cfg, data.train.len());

    let (mut params, start) = if opts.resume {
        let (step, path) = run.checkpoints()?.pop().ok_or_else(|| {
            TrainError::Io(format!("--resume {}: no step-N.safetensors checkpoint there", run.path.display()))
        })?;
        let ckpt = checkpoint::load_checkpoint(&path, device)?;
        ckpt.check_against_model(&model)?;
        run.truncate_metrics(step)?;
        let params = match &mp {
            Some(m) => m.tp.shard_params(&ckpt.params)?,
            None => ckpt.params.clone(),
        };
        (params, Some((step, ckpt)))
    } else {
        run.write("config.toml", &cfg.resolved()?.to_toml()?)?;
        if run.writes() {
            let _ = std::fs::remove_file(run.file("metrics.jsonl"));
        }
        let params = match (&mp, &cfg.train.init_from) {
            // Fully sharded, each rank makes its own share only (below).
            (_, None) if full => ParamStore::new(),
            // This rank's part alone, one whole tensor at a time.
            (Some(m), None) => m.tp.init_params(cfg.train.seed, DType::F32, device)?,
            (Some(m), Some(_)) => m.tp.shard_params(&initial_params(cfg, &model, device)?)?,
            (None, _) => initial_params(cfg, &model, device)?,
        };
        (params, None)
    };
    if let Some(e) = &ep {
        params = e.shard(&params)?;
    }
    let skip_bad = cfg.data.on_bad_example == vit_data::OnBadExample::Skip;
    let mut bad_log =
        bad_examples::BadLog::open(run, data.train.len(), cfg.data.max_bad_fraction, start.as_ref().map(|(s, _)| *s))?;
    if !data.bad_at_start.is_empty() && lead {
        eprintln!(
            "warning: {} training file(s) are not readable images; they are skipped and listed in {}",
            data.bad_at_start.len(),
            run.file("bad_examples.txt").display()
        );
        bad_log.record(0, &data.bad_at_start)?;
    }
    if let (true, Some(w)) = (lead, cfg.optimizer.weight_decay_warning()) {
        eprintln!("warning: {w}");
    }
    let names: Vec<String> = model.param_shapes()?.into_iter().map(|(n, _)| n).collect();
    let opt_cfg = optimizer_config(cfg, total, names.iter().map(String::as_str))?;
    if let Some(e) = &ep {
        e.check_optimizer(&opt_cfg, &params)?;
    }
    let sharded = dworld > 1 && cfg.train.sharding == config::Sharding::Optimizer;
    let mut opt = if full {
        // From here on `params` holds this rank's own parameters only.
        let stages = vit_model::StagedModel::stages(&model)?;
        let shapes = match &mp {
            Some(m) => {
                m.tp.plan().params.iter().map(|(n, d, spec)| (n.clone(), spec.local_dims(d, m.tp.ranks()))).collect()
            }
            None => model.param_shapes()?,
        };
        let whole = std::mem::take(&mut params);
        let seed = cfg.train.seed;
        let mut make_mine = |owns: &dyn Fn(&str) -> bool| -> Result<ParamStore, TrainError> {
            if !whole.is_empty() {
                // Resumed or fine-tuned: picked from the whole (model-local) parameters.
                let mut mine = ParamStore::new();
                for (name, t) in whole.iter().filter(|(n, _)| owns(n)) {
                    mine.insert(name, t.clone())?;
                }
                return Ok(mine);
            }
            Ok(match &mp {
                Some(m) => m.tp.init_params_where(seed, DType::F32, device, owns)?,
                None => model.init_params_where(seed, DType::F32, device, owns)?,
            })
        };
        let shards = mp.as_ref().map(|m| m.shards()).unwrap_or_default();
        let (share, mine) =
            full_shard::FullShard::new(opt_cfg, shapes, stages, drank, dworld, &shards, &mut make_mine)?;
        params = mine;
        zero::Updater::Full(Box::new(share))
    } else if sharded {
        let shards = mp.as_ref().map(|m| m.shards()).unwrap_or_default();
        zero::Updater::Sharded(zero::ShardedOptimizer::with_shards(opt_cfg, &params, drank, dworld, &shards)?)
    } else {
        zero::Updater::Replicated(match &mp {
            Some(m) => m.optimizer(opt_cfg, &params)?,
            None => OptimizerChain::new(opt_cfg, &params)?,
        })
    };
    if world > 1 && lead {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let layout = match &mp {
            Some(m) => format!("mesh {} ({}-way tensor parallel)", m.describe(), m.tp.ranks()),
            None => match &ep {
                Some(e) => format!("data parallel, {} experts per rank (expert parallel)", e.local_experts()),
                None => "data parallel".into(),
            },
        };
        println!(
            "{layout}: {world} ranks, sharding {}: parameters {:.1} MiB and optimizer state {:.1} MiB on rank 0",
            if full {
                "full (ZeRO-3)"
            } else if sharded {
                "optimizer (ZeRO-1)"
            } else {
                "none"
            },
            mib(params.numel() as u64 * 4),
            mib(opt.state_bytes())
        );
    }
    let first_step = match &start {
        Some((step, ckpt)) => {
            let state = ckpt
                .optimizer
                .as_ref()
                .ok_or_else(|| TrainError::Io("checkpoint has no optimizer state to resume".into()))?;
            match (&mp, &ep) {
                (Some(m), _) => opt.load_state(&m.shard_state(state)?)?,
                (None, Some(e)) => opt.load_state(&e.shard(state)?)?,
                (None, None) => opt.load_state(state)?,
            }
            *step
        }
        None => 0,
    };
    let teacher = match &cfg.train.teacher {
        Some(path) => {
            let t = checkpoint::load_checkpoint(path, device)?;
            let tm = VisionTransformer::new(&t.config, DType::F32, device)?;
            Some((tm, t.params))
        }
        None => None,
    };

    // Checkpoints hold the whole (unsharded) state: a sharded optimizer's is gathered to rank 0
    // first, by every rank.
    let save = |params: &ParamStore, opt: &zero::Updater, step: u64| -> Result<(), TrainError> {
        let state = opt.state(dp)?;
        let params = match whole_params(params, opt, &mp, &ep, dp)? {
            Some(whole) => whole,
            None if opt.is_full() => return Ok(()), // gathered to data rank 0
            None => params.clone(),
        };
        // The optimizer state split over a model axis is gathered whole (its data rank 0's).
        let state = match &mp {
            Some(m) => state.map(|s| m.gather_state(&s)).transpose()?,
            None => match &ep {
                Some(e) => state.map(|s| e.gather(dp, &s)).transpose()?,
                None => state,
            },
        };
        if !run.writes() {
            return Ok(());
        }
        let mut ckpt = Checkpoint::new(mcfg.clone(), params);
        ckpt.optimizer = state;
        ckpt.step = step;
        ckpt.metadata.insert("seed".into(), cfg.train.seed.to_string());
        checkpoint::save_checkpoint(run.file(&format!("step-{step}.safetensors")), &ckpt)?;
        run.prune_checkpoints()
    };

    let bar = (opts.progress_bar && lead).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("valid template"),
        );
        b.set_position(first_step);
        b
    });
    // Each rank's loader makes rows rank·B/N.. of every global batch, in micro-batches of
    // B/(N·accum).
    let (batch, micro) = (cfg.train.batch_size, cfg.train.batch_size / (dworld * cfg.train.grad_accum));
    let mut evaluator = evals::Evaluator::new(cfg, &data, batch, device)?;
    // One CUDA device, a dense model, the replicated optimizer: steps without host reads
    // (device_steps), the status read only when its numbers are needed.
    let mut dev_steps = match &opt {
        zero::Updater::Replicated(o) => {
            let eligible = world == 1 && !full && mp.is_none() && ep.is_none() && mcfg.moe.is_none();
            device_steps::DeviceSteps::new(eligible, o, device, dtype, batch)?
        }
        _ => None,
    };
    // Sharded, each rank reduce-scatters its gradients in the update instead.
    // With a model axis, all is reduced after backward (the stages' gradients are per rank).
    // With experts sharded, only the replicated parameters' gradients are reduced, after it.
    let buckets = if sharded || full || mp.is_some() || ep.is_some() {
        None
    } else {
        gradient_buckets(&params, dworld > 1 || via_nccl, cfg.train.bucket_mb)?
    };
    // Over NCCL the buckets are reduced during backward on a second stream once that path has
    // passed its check here (every rank gets the same verdict); after backward otherwise.
    let overlap_on_device = match (&buckets, dp.nccl()) {
        (Some(_), Some(nccl)) if via_nccl && cfg.train.overlap_comm => {
            match vit_collective::NcclOverlappedAllReduce::self_check(nccl)? {
                None => true,
                Some(why) => {
                    if lead {
                        eprintln!(
                            "warning: the overlapped NCCL gradient all-reduce is not used ({why}); the buckets are \
                             all-reduced after backward"
                        );
                    }
                    false
                }
            }
        }
        _ => false,
    };
    if via_nccl && lead {
        let when = if overlap_on_device { "overlapped with backward on a second stream" } else { "after backward" };
        let buckets = buckets.as_ref().map_or(1, |p| p.buckets().len());
        println!(
            "communication: NCCL {} between {world} GPU rank(s); gradients all-reduced on the device, in place, \
             in {buckets} bucket(s), {when}",
            vit_collective::nccl_version().unwrap_or_default()
        );
    }
    let shard = vit_data::loader::Shard { index: drank, count: dworld };
    let first_row = shard.rows(batch).start;
    let mut stream = data.train_loader(batch, cfg.train.seed, shard)?.iter_from(first_step);
    let (mut train_time, mut trained) = (0f64, 0u64);
    let mut last_loss = f64::NAN;
    let (mut test_acc, mut test_loss) = (f64::NAN, f64::NAN);
    // What an error must know to keep the work done (issue 16 item 2): the steps whose state is
    // in `params`/`opt`, the newest checkpoint written, and whether an update was in flight.
    let (mut completed, mut last_saved, mut torn) = (first_step, start.as_ref().map(|(s, _)| *s), false);
    let _quiet = panics::QuietPanics::install();
    // The gradient store of the previous step, zeroed in place for the next one (a new store
    // each step faulted in fresh pages from the kernel: 3% of an S/16 CPU step).
    let mut spare_grads: Option<ParamStore> = None;
    for step in first_step..total {
        let stop = if INTERRUPTED.load(Ordering::SeqCst) {
            Some(StopReason::Signal)
        } else {
            (opts.stop_at == Some(step)).then_some(StopReason::StopAt)
        };
        // Every rank stops at the same step: the most urgent reason any rank saw.
        let stop = if world > 1 { agree_on_stop(comm, stop)? } else { stop };
        if let Some(reason) = stop {
            check_device_steps(&dev_steps, &opt)?;
            save(&params, &opt, step)?;
            if let Some(b) = &bar {
                b.abandon();
            }
            let rate = trained as f64 / train_time.max(1e-9);
            write_summary(run, reason, step, last_loss, (test_acc, test_loss), evaluator.latest(), rate, started)?;
            return Err(TrainError::Interrupted { step, dir: run.path.display().to_string(), reason });
        }
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), TrainError> {
            let t0 = Instant::now();
            let b =
                stream.next().ok_or_else(|| TrainError::Io(format!("the training stream ended at step {step}")))??;
            if dworld == 1 {
                bad_log.record(step + 1, &b.bad)?;
            }
            use vit_data::faults::injected;
            let faulty = injected("fault_rank").is_none_or(|r| r == rank as u64);
            if faulty && injected("train_panic_at_step") == Some(step) {
                panic!("injected fault: train_panic_at_step={step}");
            }
            if faulty && injected("train_stall_at_step") == Some(step) {
                std::thread::sleep(std::time::Duration::from_secs(injected("stall_seconds").unwrap_or(1)));
            }
            let my_labels = b.labels.to_vec::<i32>()?;
            // data.mixup: the whole global batch is mixed before micro-batches and ranks split it.
            let mixed = match &cfg.data.mixup {
                Some(m) => {
                    let t = targets(&my_labels, mcfg.classes, cfg.train.label_smoothing, None)?;
                    Some(mixup::mix_global_batch(m, &b.images, &t, cfg.train.seed, step, dp)?)
                }
                None => None,
            };
            let images = mixed.as_ref().map_or(&b.images, |(x, _)| x);
            // One micro-batch's images (compute dtype, on the device) and targets.
            let micro_inputs = |j: usize, labels: &[i32]| -> Result<(Tensor, Tensor), TrainError> {
                let x = images.narrow(j * micro, labels.len())?.to_device(device)?.cast(dtype)?;
                let t_logits = match &teacher {
                    Some((tm, tp)) => Some(tm.predict(tp, &x.cast(DType::F32)?)?),
                    None => None,
                };
                let teach = t_logits.as_ref().map(|l| (l, cfg.train.distill_weight));
                let t = match &mixed {
                    Some((_, mt)) => with_teacher(mt.narrow(j * micro, labels.len())?, teach)?,
                    None => targets(labels, mcfg.classes, cfg.train.label_smoothing, teach)?,
                }
                .to_device(device)?;
                Ok((x, t))
            };
            let mut loss_sum = 0f64;
            let mut moe = moe_log::MoeLog::default();
            let (cp, mut grads) = if full {
                (ParamStore::new(), ParamStore::new()) // gathered per stage; reduce-scattered into the share
            } else {
                let grads = match spare_grads.take() {
                    Some(mut g) => {
                        g.fill_zero()?;
                        g
                    }
                    None => params.zeros_like(DType::F32)?,
                };
                let cp = match dev_steps.as_mut() {
                    Some(d) => d.compute_params(&params)?,
                    None => compute_params(&params, dtype)?,
                };
                (cp, grads)
            };
            if let zero::Updater::Full(share) = &mut opt {
                let tp_stages;
                let staged: &dyn vit_model::StagedModel = match &mp {
                    Some(m) => {
                        tp_stages = vit_model::TpStages { tp: &m.tp, axis: m.axis() };
                        &tp_stages
                    }
                    None => &model,
                };
                for (j, labels) in my_labels.chunks(micro).enumerate() {
                    let (x, t) = micro_inputs(j, labels)?;
                    let mut loss_grad = |logits: &Tensor| -> Result<(f64, Tensor), TrainError> {
                        let (losses, dlogits) = loss_and_grad(logits, &t, cfg.train.loss, batch)?;
                        Ok((ops::sum_all(&losses)?.to_scalar()? as f64, dlogits))
                    };
                    loss_sum += share.micro_batch(staged, &params, &x, dp, dtype, device, &mut loss_grad)?;
                }
            } else {
                // The micro-batches; with several ranks, the last one's backward hands its finished
                // gradient buckets to a communication thread (or all is reduced after it).
                let micro_batches = my_labels.chunks(micro).count();
                std::thread::scope(|scope| -> Result<(), TrainError> {
                    // (Over NCCL a second stream, not a thread, overlaps the buckets' reduction.)
                    let overlapped = buckets.as_ref().filter(|_| cfg.train.overlap_comm);
                    let mut overlap = overlapped.filter(|_| !via_nccl).map(|plan| {
                        vit_collective::OverlappedAllReduce::start(scope, dp, plan, vit_collective::ReduceOp::Sum)
                    });
                    let mut on_device = match (buckets.as_ref().filter(|_| overlap_on_device), dp.nccl()) {
                        (Some(plan), Some(nccl)) => Some(vit_collective::NcclOverlappedAllReduce::start(
                            nccl,
                            plan,
                            vit_collective::ReduceOp::Sum,
                            grads.buffer_mut(0),
                        )?),
                        _ => None,
                    };
                    for (j, labels) in my_labels.chunks(micro).enumerate() {
                        let (x, t) = micro_inputs(j, labels)?;
                        let seed = moe_log::noise_seed(cfg.train.seed, step, first_row + j * micro);
                        let moe = Some((seed, &mut moe));
                        let mut ready = |g: &ParamStore, names: &[String]| {
                            if let (Some(o), true) = (overlap.as_mut(), j + 1 == micro_batches) {
                                for n in names {
                                    if let Some(i) = g.position(n) {
                                        o.ready(g.buffer(0), i);
                                    }
                                }
                            }
                            if let (Some(o), true) = (on_device.as_mut(), j + 1 == micro_batches) {
                                for i in names.iter().filter_map(|n| g.position(n)) {
                                    // An error is kept and returned by `finish`.
                                    let _ = o.ready(g.buffer(0), i);
                                }
                            }
                        };
                        loss_sum += match &mp {
                            Some(m) => micro_batch_grads_tp(m, &cp, &x, &t, cfg.train.loss, batch, &mut grads)?,
                            None => micro_batch_grads_to(
                                &model,
                                &cp,
                                &x,
                                &t,
                                cfg.train.loss,
                                batch,
                                moe,
                                cfg.train.patch_drop(mcfg.num_patches(), step, total, first_row + j * micro),
                                &mut grads,
                                &mut ready,
                                ep.as_ref().map(|_| dp),
                                dev_steps.as_mut(),
                            )?,
                        };
                    }
                    // The global batch's gradient: the sum of every rank's part.
                    if let Some(o) = on_device {
                        o.finish(grads.buffer_mut(0))?;
                        return Ok(());
                    }
                    match (overlap, &ep) {
                        (Some(o), _) => o.finish(grads.buffer_mut(0))?,
                        // The experts' gradients are complete on their rank: the rest only.
                        (None, Some(e)) => e.reduce_replicated(dp, &mut grads)?,
                        // NCCL: each device buffer in place, bucket by bucket (the plan's
                        // buckets of the one f32 buffer; whole buffers otherwise).
                        (None, None) if via_nccl && !sharded => {
                            for i in 0..grads.buffers().len() {
                                #[allow(clippy::single_range_in_vec_init)] // one range: the whole buffer
                                let whole = [0..grads.buffer(i).numel()];
                                let ranges = match (&buckets, i) {
                                    (Some(plan), 0) => plan.buckets(),
                                    _ => &whole[..],
                                };
                                dp.all_reduce_in_place(grads.buffer_mut(i), ranges, vit_collective::ReduceOp::Sum)?;
                            }
                        }
                        (None, None) if dworld > 1 && !sharded => {
                            for i in 0..grads.buffers().len() {
                                let summed = dp.all_reduce(grads.buffer(i), vit_collective::ReduceOp::Sum)?;
                                *grads.buffer_mut(i) = summed;
                            }
                        }
                        (None, None) => {}
                    }
                    Ok(())
                })?;
            }
            if faulty && injected("train_nan_grad_at_step") == Some(step) && !grads.is_empty() {
                let mut v = grads.at(0).to_f32_vec()?;
                if let Some(x) = v.first_mut() {
                    *x = f32::NAN;
                }
                grads.write_f32_at(0, &v)?;
            }
            if dworld > 1 {
                // With the loss, how many bad examples the ranks' loaders met; their list only
                // when there were some, so that every rank counts (and rank 0 lists) them all.
                let l = Tensor::from_vec(vec![loss_sum as f32, b.bad.len() as f32], [2], Device::Cpu)?;
                let sums = dp.all_reduce(&l, vit_collective::ReduceOp::Sum)?.to_f32_vec()?;
                loss_sum = sums[0] as f64;
                // The MoE statistics of the whole global batch.
                moe.all_reduce(dp)?;
                if sums[1] > 0.0 {
                    bad_log.record(step + 1, &bad_examples::gather(dp, &b.bad)?)?;
                }
            }
            let loss = loss_sum / batch as f64;
            // (Device steps keep the loss on the device and check it at the next read.)
            if !loss.is_finite() && dev_steps.is_none() {
                return Err(TrainError::NonFiniteLoss { step: step + 1, loss: loss as f32 });
            }
            // The f32 compute copy shares the parameters' buffers: drop it so the step updates
            // them in place instead of copying them first.
            drop(cp);
            // A failure inside the update may leave parameters half written: no save then.
            torn = true;
            let info = match (&mp, &ep, &mut opt, dev_steps.as_mut()) {
                (None, None, zero::Updater::Replicated(o), Some(d)) => {
                    d.step(o, &mut params, &grads)?;
                    None
                }
                (Some(m), _, zero::Updater::Replicated(o), _) => Some(m.step(o, &mut params, &grads)?),
                (Some(m), _, zero::Updater::Full(share), _) => Some(m.step_full(share, &mut params, comm)?),
                (Some(m), _, zero::Updater::Sharded(share), _) => {
                    Some(m.step_zero1(share, &mut params, &grads, comm)?)
                }
                (None, Some(e), zero::Updater::Replicated(o), _) => Some(e.step(dp, o, &mut params, &grads)?),
                _ => Some(opt.step(dp, &mut params, &grads)?),
            };
            if !full {
                spare_grads = Some(grads);
            }
            torn = false;
            completed = step + 1;
            train_time += t0.elapsed().as_secs_f64();
            trained += batch as u64;
            let done = step + 1;
            let is_last = done == total;
            let eval_now = evaluator.due(done, is_last);
            let save_now = is_last || (cfg.train.checkpoint_every > 0 && done % cfg.train.checkpoint_every == 0);
            // Device steps: the status is read (a host round trip, which also finds a bad step)
            // only when the numbers are logged, evaluated or saved.
            let (loss, info) = match (info, &dev_steps, &opt) {
                (Some(info), _, _) => (loss, info),
                (None, Some(d), zero::Updater::Replicated(o)) => {
                    if eval_now || save_now || done % cfg.train.log_every.max(1) == 0 {
                        d.read(o)?
                    } else {
                        let lr = o.lr_at(step);
                        let unread =
                            vit_optim::StepInfo { step, grad_norm: f64::NAN, clipped: false, schedule: f64::NAN, lr };
                        (f64::NAN, unread)
                    }
                }
                (None, ..) => unreachable!("device steps run with the replicated optimizer only"),
            };
            if !loss.is_nan() {
                last_loss = loss;
            }
            let mut line = serde_json::json!({
                "step": done,
                "epoch": done as f64 * batch as f64 / data.train.len() as f64,
                "loss": loss,
                "lr": info.lr,
                "grad_norm": info.grad_norm,
                "images_per_second": trained as f64 / train_time.max(1e-9),
            });
            if skip_bad {
                line["bad_examples"] = bad_log.count().into();
            }
            moe.write_into(&mut line);
            if eval_now {
                // Rank 0 evaluates the whole model (gathered by every rank of its model axis).
                let whole = whole_params(&params, &opt, &mp, &ep, dp)?;
                if lead {
                    let cp = compute_params(whole.as_ref().unwrap_or(&params), dtype)?;
                    if let Some(t) = evaluator.run(&model, &cp, done, is_last, &mut line)? {
                        (test_acc, test_loss) = t;
                    }
                }
            }
            if eval_now || done % cfg.train.log_every.max(1) == 0 {
                run.log_metrics(&line)?;
                let msg = format!(
                    "loss {loss:.4}{}",
                    if eval_now { format!(" test acc {test_acc:.4}") } else { String::new() }
                );
                match &bar {
                    Some(b) => b.set_message(msg),
                    None if !lead || opts.quiet => {}
                    None => println!(
                        "step {done}/{total} {msg} lr {:.2e} {:.1} img/s",
                        info.lr,
                        trained as f64 / train_time.max(1e-9)
                    ),
                }
            }
            if let Some(b) = &bar {
                b.set_position(done);
            }
            if save_now {
                save(&params, &opt, done)?;
                last_saved = Some(done);
            }
            Ok(())
        }));
        let error = match attempt {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(payload) => TrainError::Panic(panics::message(payload.as_ref())),
        };
        if let Some(b) = &bar {
            b.abandon();
        }
        if let Some(found) = deferred_non_finite(&error, &dev_steps, &opt, last_saved) {
            return Err(found);
        }
        let rate = trained as f64 / train_time.max(1e-9);
        let keep = KeepState { completed, first_step, saved: last_saved, torn };
        return Err(keep_state_after_error(error, keep, &params, run, |step| {
            if opt.is_sharded() || mp.is_some() || ep.is_some() {
                // Gathering needs every rank, and the others may be anywhere after one's error.
                return Err(TrainError::Io("the state is sharded over the ranks (train.sharding = \"optimizer\", train.mesh.model or model.moe.expert_parallel) and is not gathered after an error".into()));
            }
            // Device steps: not after a bad step the status kept (nothing was updated since).
            check_device_steps(&dev_steps, &opt)?;
            save(&params, &opt, step)?;
            let evals = evaluator.latest();
            write_summary(run, StopReason::Error, step, last_loss, (test_acc, test_loss), evals, rate, started)?;
            Ok(())
        }));
    }
    if let Some(b) = &bar {
        b.finish();
    }
    if first_step == total {
        let whole = whole_params(&params, &opt, &mp, &ep, dp)?;
        if lead {
            let mut line = serde_json::json!({});
            let cp = compute_params(whole.as_ref().unwrap_or(&params), dtype)?;
            if let Some(t) = evaluator.run(&model, &cp, total, true, &mut line)? {
                (test_acc, test_loss) = t;
            }
        }
    }
    if run.writes() {
        plot::plot_curves(&run.read_metrics()?, &run.file("curves.svg"))?;
    }
    let rate = trained as f64 / train_time.max(1e-9);
    let evals = evaluator.latest();
    write_summary(run, StopReason::Completed, total, last_loss, (test_acc, test_loss), evals, rate, started)
}

/// The buckets of the gradient all-reduce (overlapped on the host, in place over NCCL), over
/// the gradients' one flat f32 buffer; `None` when nothing is `reduce`d (one rank off NCCL),
/// for `bucket_mb = 0`, or when the parameters are not one f32 buffer (then all is reduced
/// after backward).
fn gradient_buckets(
    params: &ParamStore,
    reduce: bool,
    bucket_mb: f64,
) -> Result<Option<vit_collective::BucketPlan>, TrainError> {
    // The f32 master parameters in one buffer have the gradients' layout (`zeros_like(F32)`).
    let one_f32_buffer = params.buffers().len() == 1 && params.buffer(0).dtype() == DType::F32;
    if !reduce || bucket_mb == 0.0 || !one_f32_buffer {
        return Ok(None);
    }
    let ranges = params
        .names()
        .map(|n| params.placement(n).map(|p| p.offset..p.offset + p.numel))
        .collect::<Result<Vec<_>, _>>()?;
    let elems = (bucket_mb * (1 << 20) as f64 / 4.0).ceil() as usize;
    Ok(Some(vit_collective::BucketPlan::new(&ranges, params.buffer(0).numel(), elems)?))
}

/// The stop reason every rank agrees on: the most urgent any rank saw (a signal over `--stop-at`
/// over none), by an all-reduce of its code.
fn agree_on_stop(
    comm: &dyn vit_collective::Communicator,
    mine: Option<StopReason>,
) -> Result<Option<StopReason>, TrainError> {
    let code = match mine {
        None | Some(StopReason::Completed | StopReason::Error) => 0.0,
        Some(StopReason::StopAt) => 1.0,
        Some(StopReason::Signal) => 2.0,
    };
    let t = Tensor::from_vec(vec![code as f32], [1], Device::Cpu)?;
    let agreed = comm.all_reduce(&t, vit_collective::ReduceOp::Max)?.to_f32_vec()?[0];
    Ok(match agreed as u32 {
        2 => Some(StopReason::Signal),
        1 => Some(StopReason::StopAt),
        _ => None,
    })
}

/// Where the training loop stood when an error stopped it.
struct KeepState {
    /// Steps whose state is in the parameters and the optimizer.
    completed: u64,
    /// The step this invocation started from (0, or the resumed checkpoint's).
    first_step: u64,
    /// The newest checkpoint's step, if any.
    saved: Option<u64>,
    /// An optimizer update was in flight: the parameters may be half written.
    torn: bool,
}

/// The error that ends a run, after keeping the state of the last completed step (issue 16
/// item 2): saved with `save` (a checkpoint and `summary.json`) unless no step completed in this
/// invocation, the update was in flight, the parameters are not finite, or that step's
/// checkpoint exists already; the message says which.
fn keep_state_after_error(
    error: TrainError,
    k: KeepState,
    params: &ParamStore,
    run: &RunDir,
    save: impl FnOnce(u64) -> Result<(), TrainError>,
) -> TrainError {
    if k.completed == k.first_step && !k.torn {
        return error;
    }
    let newest = match k.saved {
        Some(s) => format!("the newest checkpoint is step {s}"),
        None => "no checkpoint was written".into(),
    };
    let kept = if k.torn {
        format!("the update after step {} was in flight, so nothing was saved; {newest}", k.completed)
    } else if !params_finite(params) {
        format!("the parameters after step {} are not finite, so they were not saved; {newest}", k.completed)
    } else if k.saved == Some(k.completed) {
        format!("step {} was already saved: continue with --resume {}", k.completed, run.path.display())
    } else {
        match save(k.completed) {
            Ok(()) => {
                format!("the state after step {} is saved: continue with --resume {}", k.completed, run.path.display())
            }
            Err(e) => format!("saving the state after step {} failed too ({e}); {newest}", k.completed),
        }
    };
    TrainError::Stopped { source: Box::new(error), kept }
}

/// With device steps, reads their status: the error of a bad step it kept, if any (so that no
/// checkpoint is written over parameters that later steps left untouched).
fn check_device_steps(dev: &Option<device_steps::DeviceSteps>, opt: &zero::Updater) -> Result<(), TrainError> {
    match (dev, opt) {
        (Some(d), zero::Updater::Replicated(o)) => d.read(o).map(|_| ()),
        _ => Ok(()),
    }
}

/// The run's error when device steps found a bad step at a read (`error` is that step's
/// non-finite loss or gradient): the state is not saved, since every update from that step on
/// was skipped while the step counter moved on (`device_steps` module docs).
fn deferred_non_finite(
    error: &TrainError,
    dev: &Option<device_steps::DeviceSteps>,
    opt: &zero::Updater,
    saved: Option<u64>,
) -> Option<TrainError> {
    let zero::Updater::Replicated(o) = opt else { return None };
    let d = dev.as_ref()?;
    let deferred =
        matches!(error, TrainError::NonFiniteLoss { .. } | TrainError::Optim(vit_optim::OptimError::NonFinite { .. }));
    if !deferred {
        return None;
    }
    // The status names the first bad step; report that one (the error in hand came from it).
    let source = match d.read(o) {
        Err(e) => e,
        Ok(_) => return None,
    };
    let newest = match saved {
        Some(s) => format!("the newest checkpoint is step {s}"),
        None => "no checkpoint was written".into(),
    };
    Some(TrainError::Stopped {
        source: Box::new(source),
        kept: format!(
            "no update was applied from that step on (the device skipped them), so nothing was saved; {newest}"
        ),
    })
}

/// True when every parameter is finite (read to the host, as a checkpoint would be).
fn params_finite(params: &ParamStore) -> bool {
    params.buffers().iter().all(|b| b.to_f32_vec().is_ok_and(|v| v.iter().all(|x| x.is_finite())))
}

/// Writes and returns the summary of a run that stopped after `steps` steps for `reason`;
/// `test` is the last evaluation's (accuracy, loss), `evals` every `[[evals]]` metric's newest
/// value, `rate` the training images per second.
#[allow(clippy::too_many_arguments)]
fn write_summary(
    run: &RunDir,
    reason: StopReason,
    steps: u64,
    train_loss: f64,
    test: (f64, f64),
    evals: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    rate: f64,
    started: RunClock,
) -> Result<Summary, TrainError> {
    let summary = Summary {
        stop_reason: reason,
        steps,
        train_loss,
        test_accuracy: test.0,
        test_loss: test.1,
        eval: evals.clone(),
        images_per_second: rate,
        wall_seconds: started.wall_seconds(),
        cpu: vit_tensor::cpu::CpuInfo::detect().to_string(),
        cpu_steal: started.steal_fraction(),
        lead: run.writes(),
    };
    run.write("summary.json", &serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Io(e.to_string()))?)?;
    Ok(summary)
}
