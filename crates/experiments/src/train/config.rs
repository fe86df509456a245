//! The training config (TOML): model, data, optimizer, schedule and loop settings, with
//! `--set section.key=value` overrides. Unknown keys are errors that name the key; the
//! choices (`schedule.decay`, `optimizer.name`, `train.precision`, `train.loss`,
//! `train.device`) are enums, so a misspelt value is a parse error that names the key, the
//! value and the choices.

use crate::train::TrainError;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt, path::Path};
use vit_model::layers::patch_dropout::{self, PatchDrop};
use vit_model::ModelConfig;
use vit_optim::{OptimError, ParamGroups};
use vit_tensor::{DType, Device};

/// A whole training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A preset (`preset = "S/16"`) and any `ModelConfig` field as an override.
    pub model: ModelSection,
    pub data: DataSection,
    pub optimizer: OptimizerSection,
    pub schedule: ScheduleSection,
    pub train: LoopSection,
    /// `[[evals]]`: evaluations during training (`train::evals`); `train.eval_every` adds the
    /// test split's classification when no entry evaluates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evals: Vec<crate::train::evals::EvalEntry>,
}

/// `[model]`: `preset` plus field overrides (`width = 64`, `pool = "gap"`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelSection {
    #[serde(default = "custom")]
    pub preset: String,
    #[serde(flatten)]
    pub fields: BTreeMap<String, toml::Value>,
}

fn custom() -> String {
    "custom".into()
}

/// `[data]`: where the images are and how they are augmented.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// `idx` (MNIST-style files), `cifar10` / `cifar100` (binary batches) or `folder` (one
    /// subfolder per class).
    pub format: String,
    /// The dataset's directory (relative paths are relative to the working directory), or
    /// `bundled:fashion-mnist-small`: the Fashion-MNIST subset of the repository's `data/`
    /// embedded in the binary (IDX, splits `train` and `t10k`; see `vit_data::bundled`), which
    /// works from any folder.
    pub path: String,
    /// Training split: the IDX prefix (`train`), CIFAR file glob or folder name.
    #[serde(default = "default_train")]
    pub train: String,
    /// Test split: the IDX prefix (`t10k`), CIFAR file or folder name.
    #[serde(default = "default_test")]
    pub test: String,
    /// Use only the first N training examples.
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[serde(default)]
    pub test_limit: Option<usize>,
    /// Training-time preprocessing, applied in order to each decoded image (`vit_data::Transform`
    /// tables: `{ op = "random_crop", size = 28, padding = 2 }`, `{ op = "flip_lr" }`, ...).
    #[serde(default)]
    pub augment: Vec<vit_data::Transform>,
    /// Evaluation preprocessing (deterministic ops: `resize_small`, `central_crop`, ...).
    #[serde(default)]
    pub eval_augment: Vec<vit_data::Transform>,
    /// A training example that cannot be read, decoded or augmented: `fail` (default; the run
    /// stops with an error naming the file, after saving the last completed step) or `skip`
    /// (replaced by the next good example, listed in the run's `bad_examples.txt`). The test
    /// split must be clean in both modes (`vit data check --split test`).
    #[serde(default)]
    pub on_bad_example: vit_data::OnBadExample,
    /// With `skip`: the largest fraction of the training set that may be bad before the run
    /// stops (default 0.001).
    #[serde(default = "default_max_bad_fraction")]
    pub max_bad_fraction: f64,
    /// Mixup of the whole global batch's images and targets (`mixup = { p = 0.2 }`, big_vision's
    /// `config.mixup`); absent = none. See `train::mixup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixup: Option<crate::train::mixup::MixupConfig>,
}

fn default_max_bad_fraction() -> f64 {
    0.001
}

fn default_train() -> String {
    "train".into()
}
fn default_test() -> String {
    "t10k".into()
}

/// `[optimizer]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    /// `factored-adam`, `adamw` or `sgd`.
    pub name: OptimizerName,
    /// Base learning rate.
    pub lr: f64,
    /// Decoupled weight decay in big_vision's absolute units (`0.03 · lr` for Scaling ViT's body).
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (none if absent).
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Momentum of SGD / first moment of factored Adam.
    #[serde(default)]
    pub momentum: Option<f64>,
    /// Train only parameters matching these regexes (everything else frozen): e.g. `["head\\..*"]`
    /// for a linear probe.
    #[serde(default)]
    pub train_only: Vec<String>,
    /// Weight-decay multiplier rules, tried before Scaling ViT's (`head.weight` 100, other
    /// kernels 1, norms, biases and embeddings 0; reference §3): the first rule whose pattern
    /// matches a whole parameter name wins, as big_vision's `config.wd_mults`. E.g.
    /// `[{ pattern = 'head\.weight', mult = 1.0 }]` decays the classifier like the body: Scaling
    /// ViT's ×100 on the head is tuned for few-shot transfer after pre-training, and on
    /// Fashion-MNIST ×1 ended higher (docs/reproduce.md, "Session 18").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wd_mults: Vec<MultRule>,
    /// Learning-rate multiplier rules (big_vision's `config.lr_mults`; unmatched parameters: 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_mults: Vec<MultRule>,
}

/// One rule of `optimizer.wd_mults` or `optimizer.lr_mults`: parameters whose whole dotted name
/// matches the regular expression `pattern` get `mult` times the base weight decay or learning
/// rate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MultRule {
    /// A regular expression (the `regex` crate's syntax) matched against the whole name.
    pub pattern: String,
    /// The multiplier: ≥ 0 for weight decay, > 0 for the learning rate (freeze with
    /// `optimizer.train_only` instead).
    pub mult: f64,
}

impl OptimizerSection {
    /// Scaling ViT's parameter groups with this section's `wd_mults` and `lr_mults` rules in
    /// front, in their order; every pattern and multiplier checked.
    pub fn param_groups(&self) -> Result<ParamGroups, TrainError> {
        let mut groups = ParamGroups::scaling_vit();
        // The builders put a rule first, so add them last to first to keep the user's order.
        for r in self.wd_mults.iter().rev() {
            groups = groups.with_wd_mult(r.pattern.clone(), r.mult);
        }
        for r in self.lr_mults.iter().rev() {
            groups = groups.with_lr_mult(r.pattern.clone(), r.mult);
        }
        // The user's rules come first, so a rule's index in the compiled list is its index here.
        groups.compile().map_err(|e| match e {
            OptimError::Rule { list, index, pattern, msg } => {
                TrainError::Config(format!("optimizer.{list}[{index}]: pattern {pattern:?}, {msg}"))
            }
            e => TrainError::Config(format!("optimizer: {}", one_line(&e.to_string()))),
        })?;
        Ok(groups)
    }

    /// A warning when `weight_decay` looks like PyTorch's AdamW λ rather than vitrs's absolute
    /// per-step decay: at or above the learning rate, every weight shrinks by that fraction per
    /// step at the schedule's peak (0.01 gives a half-life of ~70 steps, and training stalls
    /// near chance). Scaling ViT's body decay is 0.03·lr, far below. `None` when it looks fine.
    pub fn weight_decay_warning(&self) -> Option<String> {
        let (wd, lr) = (self.weight_decay, self.lr);
        (wd > 0.0 && wd >= lr).then(|| {
            let half_life = (0.5f64).ln() / (1.0 - wd.min(0.999_999)).ln();
            format!(
                "optimizer.weight_decay = {wd} is not below optimizer.lr = {lr}: vitrs's weight decay is absolute \
                 (big_vision's config.wd), so every decayed weight shrinks by {:.3}% per step at the schedule's peak \
                 (half-life {half_life:.0} steps); PyTorch's AdamW weight_decay λ is λ·lr here (e.g. {:.1e})",
                100.0 * wd,
                wd * lr
            )
        })
    }
}

/// `[schedule]` (reference §3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// `rsqrt`, `cosine`, `linear` or `constant`.
    pub decay: DecayKind,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub cooldown_steps: u64,
    /// rsqrt's timescale in steps.
    #[serde(default = "default_timescale")]
    pub timescale: u64,
}

fn default_timescale() -> u64 {
    10_000
}

/// `[train]`: the loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoopSection {
    /// Images per optimizer step.
    pub batch_size: usize,
    /// Optimizer steps; or give `epochs` instead.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Passes over the training set (converted to steps).
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Micro-batches per step (gradients accumulate; the batch must divide).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Data-parallel ranks (default 1). `N > 1` runs N ranks as threads of this process over
    /// `vit_collective::LocalGroup` (CPU), or over NCCL on N GPUs (`train.device = cuda`: rank r
    /// on cuda:r; see `train.comm`): each computes the gradients of its `batch_size / N`
    /// examples of every global batch, and their sum is all-reduced before the update.
    #[serde(default = "one")]
    pub world: usize,
    /// Data parallel: size in MiB of the gradient buckets that are all-reduced on a
    /// communication thread as soon as backward has produced them, overlapping the rest of
    /// backward (default 25, PyTorch DDP's); 0 = one all-reduce after backward, not overlapped.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Data parallel: reduce each gradient bucket while backward goes on (default true): on a
    /// communication thread on the host backends, on a second CUDA stream over NCCL
    /// (`vit_collective::NcclOverlappedAllReduce`). `false` reduces the same buckets after
    /// backward (the A/B reference and the fallback; the same bits).
    #[serde(default = "yes")]
    pub overlap_comm: bool,
    /// Data parallel: what ranks shard. `none` (default): every rank holds and updates all
    /// parameters and optimizer state; `optimizer` (ZeRO-1): each rank keeps the optimizer state
    /// of about 1/N of the parameters and updates those alone (gradients reduce-scattered,
    /// parameters all-gathered); `full` (ZeRO-3): each rank keeps about 1/N of every stage's
    /// parameters, gradients and optimizer state, and gathers a stage's parameters when it runs
    /// (dense models; on a mesh, over the data axis).
    #[serde(default)]
    pub sharding: Sharding,
    /// The device mesh (`[train.mesh]`): with `model = K > 1` the world's ranks form a
    /// `data × model` mesh of `world / K` data-parallel groups of K ranks that split every
    /// block matrix between them (ViT-22B's tensor parallelism).
    #[serde(default)]
    pub mesh: MeshSection,
    /// Seconds a rank waits in one collective (or for a message) for the others before the
    /// run ends with an error (default 1800, as `torch.distributed`; rank 0 evaluates and
    /// writes checkpoints alone while the others wait, so it must exceed those); 0 waits
    /// forever. Over threads the error names the ranks waited for; under mpirun the waiting
    /// ranks end the job (`MPI_Abort`), and a rank that dies ends it too (mpirun's own
    /// behaviour).
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout: f64,
    /// How ranks talk (`auto`, `nccl` or `local`). `auto` (default): NCCL between GPU ranks
    /// (`train.world = N > 1` with `train.device = cuda`: rank r on cuda:r; or mpirun with
    /// `--device cuda`: each process on the GPU of its local rank), the host backend otherwise
    /// (`LocalGroup` threads, MPI processes). `nccl`: NCCL always on a GPU, even for one rank
    /// (the whole data-parallel path through NCCL on one GPU, e.g. to check it end to end).
    /// `local`: the host backend only (refused for several GPU ranks). Host tensors (losses,
    /// stop flags, statistics) always go over the host backend; with NCCL the gradients stay on
    /// the device and are all-reduced in place, bucket by bucket (`train.bucket_mb`), on a
    /// second stream while backward goes on (`train.overlap_comm`).
    #[serde(default)]
    pub comm: Comm,
    /// Evaluate on the test split every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_every: u64,
    /// Write a metrics line every N steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Save a checkpoint every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Seed of the initialisation and of the data order and augmentation.
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: TrainDevice,
    /// `f32`, or `bf16` (bf16 activations and gradients, f32 master weights).
    #[serde(default)]
    pub precision: Precision,
    /// The CPU's GEMMs: `f32`, or `bf16` (inputs rounded to bf16, f32 sums, on the AMX tiles
    /// where the CPU has them; products with a dimension under 32 stay f32), as PyTorch's
    /// `set_float32_matmul_precision("medium")`. Tensors stay in `train.precision`. CPU only.
    #[serde(default)]
    pub matmul_precision: MatmulPrecisionChoice,
    /// Activation checkpointing per block (overrides the model's `remat`).
    #[serde(default)]
    pub remat: Option<bool>,
    /// Label smoothing of the one-hot targets.
    #[serde(default)]
    pub label_smoothing: f32,
    /// `softmax` cross-entropy, or `sigmoid` cross-entropy summed over classes (big_vision's
    /// choice for JFT-style heads).
    #[serde(default)]
    pub loss: LossKind,
    /// Start from this checkpoint's weights (fine-tuning); the position embedding is resampled
    /// if the resolution differs, and a head of another size is re-initialised.
    #[serde(default)]
    pub init_from: Option<String>,
    /// Distill from this teacher checkpoint: KL between the teacher's and the student's
    /// softmax on the same augmented images, mixed with the label loss by `distill_weight`.
    #[serde(default)]
    pub teacher: Option<String>,
    /// Weight of the distillation loss (1 = distillation only).
    #[serde(default = "one_f32")]
    pub distill_weight: f32,
    /// PatchDropout (Liu et al. 2022; timm's `patch_drop_rate`): the fraction of each image's
    /// patch tokens dropped in a training step, after the position embedding (0 = none). The
    /// blocks run on the rest, so a step costs less; evaluation sees every token.
    #[serde(default)]
    pub patch_dropout: f64,
    /// The fraction of the run's steps that drop patches (default 1, the whole run); the steps
    /// after train on every token, as evaluation sees them (FLIP's unmasked tuning).
    #[serde(default = "one_f64")]
    pub patch_dropout_until: f64,
    /// Further PatchDropout stages after `patch_dropout_until`, in order: each drops `rate` of
    /// the patches until `until` (a fraction of the run's steps, increasing); the steps after
    /// the last stage keep every token. `[{ rate = 0.5, until = 0.93 }]` steps a run down from
    /// `patch_dropout` to half the patches before its every-token tail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patch_dropout_stages: Vec<PatchDropoutStage>,
}

/// One stage of `train.patch_dropout_stages`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PatchDropoutStage {
    /// The fraction of each image's patch tokens dropped, in [0, 1).
    pub rate: f64,
    /// Where the stage ends, as a fraction of the run's steps.
    pub until: f64,
}

impl LoopSection {
    /// What PatchDropout drops at `step` of `total` steps for a pass whose first image is row
    /// `first_image` of the global batch, for a model of `patches` patch tokens (`None`: it
    /// keeps every token). The rate is that of the step's stage ([`Self::patch_dropout_rate`]);
    /// the draws come from the seed and the step, so a resumed run draws as a straight one.
    pub fn patch_drop(&self, patches: usize, step: u64, total: u64, first_image: usize) -> Option<PatchDrop> {
        let rate = self.patch_dropout_rate(step, total);
        (rate > 0.0).then(|| PatchDrop {
            keep: patch_dropout::tokens_kept(patches, rate),
            seed: vit_model::layers::moe::mix_seed(self.seed ^ 0x7061_7463_685f_6472, step),
            first_image: first_image as u64,
        })
    }

    /// The fraction of the patches dropped at `step` of `total` steps (0: every token): the
    /// segments of [`Self::patch_dropout_segments`].
    pub fn patch_dropout_rate(&self, step: u64, total: u64) -> f64 {
        let mut start = 0;
        for (steps, rate) in self.patch_dropout_segments(total) {
            if step < start + steps {
                return rate;
            }
            start += steps;
        }
        0.0
    }

    /// The run's PatchDropout stages as (steps, rate) in order, from step 0: `patch_dropout`
    /// for the first `⌈patch_dropout_until · total⌉` steps, then each of
    /// `patch_dropout_stages` up to `⌈until · total⌉`; steps after the last keep every token.
    /// Empty without PatchDropout.
    pub fn patch_dropout_segments(&self, total: u64) -> Vec<(u64, f64)> {
        if self.patch_dropout <= 0.0 {
            return Vec::new();
        }
        // ⌈until · total⌉ of the exact product: 0.55 · 100 is 55.000000000000007 in f64, whose
        // ceiling would add a step.
        let end = |until: f64| {
            let x = until * total as f64;
            let near = x.round();
            let steps = if (x - near).abs() <= 1e-9 * near.max(1.0) { near } else { x.ceil() };
            (steps as u64).min(total)
        };
        let mut segments = vec![(end(self.patch_dropout_until), self.patch_dropout)];
        let mut start = segments[0].0;
        for stage in &self.patch_dropout_stages {
            let stop = end(stage.until).max(start);
            segments.push((stop - start, stage.rate));
            start = stop;
        }
        segments
    }
}

fn one() -> usize {
    1
}
/// `[train.mesh]`: how the ranks are laid out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// Ranks of the `model` axis (default 1: data parallel only); it must divide the world
    /// size, the model's heads and its MLP width.
    #[serde(default = "one")]
    pub model: usize,
    /// How the tensor-parallel matmuls move activations: `ring` (default; collective matmul,
    /// transfers overlapped with the matmuls) or `plain` (the collective, then the matmul).
    #[serde(default)]
    pub matmul: MatmulKind,
}

impl Default for MeshSection {
    fn default() -> Self {
        MeshSection { model: 1, matmul: MatmulKind::Ring }
    }
}

/// `train.mesh.matmul`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatmulKind {
    /// Collective matmul: all-gather-matmul and matmul-reduce-scatter as rings.
    #[default]
    Ring,
    /// The plain collective before (or after) one matmul.
    Plain,
}

impl MatmulKind {
    /// The collective-matmul mode.
    pub fn mode(self) -> vit_collective::MatmulComm {
        match self {
            MatmulKind::Ring => vit_collective::MatmulComm::Ring,
            MatmulKind::Plain => vit_collective::MatmulComm::Plain,
        }
    }
}

/// `train.sharding`: what data-parallel ranks split among themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Nothing: every rank holds everything.
    #[default]
    None,
    /// The optimizer state (ZeRO-1).
    Optimizer,
    /// Parameters, gradients and optimizer state (ZeRO-3; ViT-22B's parameters over the data
    /// axis): each stage's parameters are gathered when it runs and dropped after.
    Full,
}

/// `train.comm`: the communication backend between ranks (see `TrainSection::comm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comm {
    /// NCCL between GPU ranks, the host backend otherwise.
    #[default]
    Auto,
    /// NCCL, also for a single GPU rank (a GPU device is required).
    Nccl,
    /// The host backend (`LocalGroup` threads, MPI processes) only.
    Local,
}

fn default_collective_timeout() -> f64 {
    1800.0
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn yes() -> bool {
    true
}
fn one_f64() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn default_log_every() -> u64 {
    10
}

/// `schedule.decay`: the learning-rate decay after warmup (`vit_optim::Decay`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DecayKind {
    /// `rsqrt`: `1/sqrt(1 + step/timescale)` (Scaling ViT), with `schedule.timescale`.
    #[serde(rename = "rsqrt")]
    Rsqrt,
    /// `cosine`: half a cosine to 0.
    #[serde(rename = "cosine")]
    Cosine,
    /// `linear`: a straight line to 0.
    #[serde(rename = "linear")]
    Linear,
    /// `constant`: the base rate throughout.
    #[serde(rename = "constant")]
    Constant,
}

/// `optimizer.name`: the update rule.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OptimizerName {
    /// `factored-adam`: big_vision's `scale_by_adafactor` with bf16 momentum.
    #[serde(rename = "factored-adam")]
    FactoredAdam,
    /// `adamw`: Adam with decoupled weight decay.
    #[serde(rename = "adamw")]
    AdamW,
    /// `sgd`: SGD with momentum (`optimizer.momentum`, default 0.9).
    #[serde(rename = "sgd")]
    Sgd,
}

/// `train.matmul_precision`: the inputs' precision of the CPU backend's GEMMs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum MatmulPrecisionChoice {
    /// Exact f32 products.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// bf16 inputs, f32 sums (`vit_tensor::cpu::MatmulPrecision::Bf16`).
    #[serde(rename = "bf16")]
    Bf16,
}

impl MatmulPrecisionChoice {
    /// The CPU backend's setting.
    pub fn setting(self) -> vit_tensor::cpu::MatmulPrecision {
        match self {
            MatmulPrecisionChoice::F32 => vit_tensor::cpu::MatmulPrecision::F32,
            MatmulPrecisionChoice::Bf16 => vit_tensor::cpu::MatmulPrecision::Bf16,
        }
    }
}

/// `train.precision`: the dtype of activations and gradients.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Precision {
    /// `f32` throughout.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// `bf16` activations and gradients, f32 master weights.
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    /// The compute dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// `train.loss`: the classification loss.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum LossKind {
    /// `softmax` cross-entropy.
    #[default]
    #[serde(rename = "softmax")]
    Softmax,
    /// `sigmoid` cross-entropy summed over classes.
    #[serde(rename = "sigmoid")]
    Sigmoid,
}

/// `train.device`: `cpu`, `cuda` (device 0) or `cuda:N`, checked when the config is read and
/// written back as `cpu` or `cuda:N`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct TrainDevice(pub Device);

impl Default for TrainDevice {
    /// `cpu`.
    fn default() -> Self {
        TrainDevice(Device::Cpu)
    }
}

impl TryFrom<String> for TrainDevice {
    type Error = vit_tensor::Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map(TrainDevice)
    }
}

impl From<TrainDevice> for String {
    fn from(d: TrainDevice) -> String {
        d.0.to_string()
    }
}

impl fmt::Display for TrainDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The built-in default: a small ViT on the bundled Fashion-MNIST subset (configs/quickstart.toml).
pub const QUICKSTART: &str = include_str!("../../../../configs/quickstart.toml");

impl TrainConfig {
    /// Parses TOML text, applies `key=value` overrides (dotted keys: `train.steps=30`,
    /// `model.width=64`, or `evals=[{ kind = ... }, ...]` for the whole `[[evals]]` list;
    /// values are TOML, bare words are strings), and validates.
    pub fn from_toml(text: &str, sets: &[String]) -> Result<Self, TrainError> {
        let mut value: toml::Table =
            text.parse().map_err(|e: toml::de::Error| TrainError::Config(one_line(&e.to_string())))?;
        for s in sets {
            apply_override(&mut value, s)?;
        }
        let cfg: TrainConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(one_line(&e.to_string())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config file.
    pub fn from_file(path: &Path, sets: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, sets).map_err(|e| match e {
            TrainError::Config(m) => TrainError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The model config: the preset with the `[model]` fields applied, validated.
    pub fn model_config(&self) -> Result<ModelConfig, TrainError> {
        let mut m = ModelConfig::preset(&self.model.preset)?;
        for (k, v) in &self.model.fields {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            m.set_value(k, &text)?;
        }
        if let Some(r) = self.train.remat {
            m.remat = r;
        }
        m.validate()?;
        Ok(m)
    }

    /// The config with `[model]` expanded to every field: what a run directory keeps.
    pub fn resolved(&self) -> Result<Self, TrainError> {
        let m = self.model_config()?;
        let table: toml::Table = toml::from_str(&m.to_toml()?).map_err(|e| TrainError::Config(e.to_string()))?;
        let mut out = self.clone();
        out.model = ModelSection { preset: "custom".into(), fields: table.into_iter().collect() };
        Ok(out)
    }

    /// TOML text of this config.
    pub fn to_toml(&self) -> Result<String, TrainError> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config(e.to_string()))
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &str, value: String, expected: &str| {
            Err(TrainError::Config(format!("{key} = {value}: expected {expected}")))
        };
        let f = self.data.max_bad_fraction;
        if !(0.0..=1.0).contains(&f) {
            return bad("data.max_bad_fraction", f.to_string(), "a fraction in [0, 1]");
        }
        if let Some(m) = &self.data.mixup {
            m.validate()?;
        }
        self.optimizer.param_groups()?;
        let t = &self.train;
        if t.matmul_precision != MatmulPrecisionChoice::F32 && t.device.0 != vit_tensor::Device::Cpu {
            return bad(
                "train.matmul_precision",
                format!("\"{}\" on {}", t.matmul_precision.setting(), t.device.0),
                "\"f32\" off the CPU (GPU GEMMs follow train.precision)",
            );
        }
        if t.batch_size == 0 {
            return bad("train.batch_size", t.batch_size.to_string(), "a positive number of images");
        }
        if t.grad_accum == 0 || !t.batch_size.is_multiple_of(t.grad_accum) {
            return bad("train.grad_accum", t.grad_accum.to_string(), "a positive divisor of train.batch_size");
        }
        let model_ranks = t.mesh.model;
        // Under mpirun the world is the process count (train.world stays 1): checked at run time.
        if model_ranks == 0 || (t.world > 1 && !t.world.is_multiple_of(model_ranks)) {
            return bad(
                "train.mesh.model",
                model_ranks.to_string(),
                &format!("a divisor of train.world ({})", t.world),
            );
        }
        if t.world == 0 || !t.batch_size.is_multiple_of((t.world / model_ranks).max(1) * t.grad_accum) {
            return bad(
                "train.world",
                t.world.to_string(),
                &if model_ranks == 1 {
                    format!(
                        "a positive number of ranks whose product with train.grad_accum ({}) divides train.batch_size ({})",
                        t.grad_accum, t.batch_size
                    )
                } else {
                    format!(
                        "a positive number of ranks whose data-parallel groups (world / train.mesh.model = {}) \
                         times train.grad_accum ({}) divide train.batch_size ({})",
                        t.world / model_ranks.max(1),
                        t.grad_accum,
                        t.batch_size
                    )
                },
            );
        }
        if !(t.collective_timeout >= 0.0 && t.collective_timeout.is_finite()) {
            return bad("train.collective_timeout", t.collective_timeout.to_string(), "seconds ≥ 0 (0: wait forever)");
        }
        if !(t.bucket_mb >= 0.0 && t.bucket_mb.is_finite()) {
            return bad("train.bucket_mb", t.bucket_mb.to_string(), "a size in MiB ≥ 0 (0: no buckets)");
        }
        if t.world > 1 && t.device.0 != vit_tensor::Device::Cpu && t.comm == Comm::Local {
            return bad(
                "train.comm",
                "local".into(),
                "auto or nccl with train.world > 1 on a GPU (GPU ranks talk over NCCL)",
            );
        }
        if t.comm == Comm::Nccl && t.device.0 == vit_tensor::Device::Cpu {
            return bad("train.comm", "nccl".into(), "auto or local on the CPU (NCCL needs train.device = cuda)");
        }
        match (t.steps, t.epochs) {
            (Some(0), _) => return bad("train.steps", "0".into(), "at least 1"),
            (None, None) => return bad("train.steps", "(missing)".into(), "train.steps or train.epochs"),
            (Some(_), Some(_)) => {
                return bad("train.epochs", "(with train.steps)".into(), "only one of train.steps and train.epochs")
            }
            (None, Some(e)) if !(e > 0.0 && e.is_finite()) => {
                return bad("train.epochs", e.to_string(), "a positive number")
            }
            _ => {}
        }
        if t.loss == LossKind::Sigmoid && t.teacher.is_some() {
            return bad(
                "train.teacher",
                "(with train.loss = \"sigmoid\")".into(),
                "distillation with the softmax loss",
            );
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return bad("train.label_smoothing", t.label_smoothing.to_string(), "a value in [0, 1)");
        }
        if !(0.0..=1.0).contains(&t.distill_weight) {
            return bad("train.distill_weight", t.distill_weight.to_string(), "a value in [0, 1]");
        }
        if !(0.0..1.0).contains(&t.patch_dropout) {
            return bad("train.patch_dropout", t.patch_dropout.to_string(), "a fraction of the patches in [0, 1)");
        }
        if !(0.0..=1.0).contains(&t.patch_dropout_until) {
            return bad(
                "train.patch_dropout_until",
                t.patch_dropout_until.to_string(),
                "a fraction of the steps in [0, 1]",
            );
        }
        if !t.patch_dropout_stages.is_empty() && t.patch_dropout <= 0.0 {
            return bad(
                "train.patch_dropout_stages",
                format!("({} stages)", t.patch_dropout_stages.len()),
                "no stages without train.patch_dropout > 0 (the first stage's rate)",
            );
        }
        let mut until = t.patch_dropout_until;
        for (i, stage) in t.patch_dropout_stages.iter().enumerate() {
            if !(0.0..1.0).contains(&stage.rate) {
                return bad(
                    &format!("train.patch_dropout_stages[{i}].rate"),
                    stage.rate.to_string(),
                    "a fraction of the patches in [0, 1)",
                );
            }
            if until >= 1.0 {
                return bad(
                    &format!("train.patch_dropout_stages[{i}]"),
                    format!("{{ rate = {}, until = {} }}", stage.rate, stage.until),
                    "no stage after one that ends the run (until 1; train.patch_dropout_until defaults to 1)",
                );
            }
            if !(stage.until > until && stage.until <= 1.0) {
                return bad(
                    &format!("train.patch_dropout_stages[{i}].until"),
                    stage.until.to_string(),
                    &format!("a fraction of the steps in ({until}, 1], after the previous stage's end"),
                );
            }
            until = stage.until;
        }
        if t.patch_dropout > 0.0 && (t.mesh.model > 1 || t.sharding == Sharding::Full) {
            return bad(
                "train.patch_dropout",
                t.patch_dropout.to_string(),
                "0 with a model axis (train.mesh.model > 1) or train.sharding = \"full\" (their passes keep every token)",
            );
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return bad("optimizer.lr", o.lr.to_string(), "a positive learning rate");
        }
        if !["idx", "cifar10", "cifar100", "folder"].contains(&self.data.format.as_str()) {
            return bad(
                "data.format",
                format!("{:?}", self.data.format),
                "\"idx\", \"cifar10\", \"cifar100\" or \"folder\"",
            );
        }
        crate::train::evals::validate(self)?;
        self.model_config()?;
        Ok(())
    }
}

/// Sets `section.key = value` in a TOML table (the value parsed as TOML, else taken as a string).
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| TrainError::Config(format!("--set {assignment:?}: expected section.key=value")))?;
    let (key, raw) = (key.trim(), raw.trim());
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    // `evals` is the one top-level key that is not a section: `[[evals]]`, set as a whole list.
    let last = parts.pop().filter(|l| !l.is_empty() && (!parts.is_empty() || *l == "evals")).ok_or_else(|| {
        TrainError::Config(format!(
            "--set {assignment:?}: expected a dotted key such as train.steps or model.width (or evals=[...])"
        ))
    })?;
    let mut t = table;
    for p in parts {
        t = t
            .entry(p)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| TrainError::Config(format!("--set {assignment:?}: {p} is not a section")))?;
    }
    // Steps and epochs are two ways to say one thing: setting one replaces the other.
    match (key, last) {
        ("train.steps", _) => t.remove("epochs"),
        ("train.epochs", _) => t.remove("steps"),
        _ => None,
    };
    t.insert(last.to_string(), value);
    Ok(())
}

/// A parser's multi-line message as one line, for errors that must stay one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_dropout_stages_split_the_steps_in_order() {
        let mut cfg = TrainConfig::from_toml(QUICKSTART, &[]).unwrap();
        let t = &mut cfg.train;
        assert!(t.patch_dropout_segments(100).is_empty(), "no PatchDropout, no segments");
        assert_eq!(t.patch_dropout_rate(0, 100), 0.0);
        t.patch_dropout = 0.75;
        t.patch_dropout_until = 0.8;
        assert_eq!(t.patch_dropout_segments(100), [(80, 0.75)]);
        t.patch_dropout_stages = vec![PatchDropoutStage { rate: 0.5, until: 0.93 }];
        // ⌈0.93 · 101⌉ = 94: steps 0-80 (⌈80.8⌉ = 81) at 0.75, 81-93 at 0.5, 94-100 every token.
        assert_eq!(t.patch_dropout_segments(101), [(81, 0.75), (13, 0.5)]);
        let rates: Vec<f64> = [0, 80, 81, 93, 94, 100].iter().map(|&s| t.patch_dropout_rate(s, 101)).collect();
        assert_eq!(rates, [0.75, 0.75, 0.5, 0.5, 0.0, 0.0]);
        assert!(t.patch_drop(49, 81, 101, 0).is_some_and(|d| d.keep == 25), "half of 49 patches kept");
        assert!(t.patch_drop(49, 94, 101, 0).is_none());
        // A stage at rate 0 keeps every token for its steps.
        t.patch_dropout_stages.push(PatchDropoutStage { rate: 0.0, until: 0.95 });
        t.patch_dropout_stages.push(PatchDropoutStage { rate: 0.25, until: 1.0 });
        assert_eq!(t.patch_dropout_rate(94, 100), 0.0);
        assert_eq!(t.patch_dropout_rate(99, 100), 0.25);
        // The ceiling is of the exact product: 0.55 · 100 is 55.000000000000007 in f64.
        t.patch_dropout_until = 0.55;
        t.patch_dropout_stages.clear();
        assert_eq!(t.patch_dropout_segments(100), [(55, 0.75)]);
    }

    #[test]
    fn a_pytorch_sized_weight_decay_is_flagged_and_big_vision_sized_ones_are_not() {
        let opt = |lr: f64, weight_decay: f64| OptimizerSection {
            name: OptimizerName::AdamW,
            lr,
            weight_decay,
            clip_norm: None,
            momentum: None,
            train_only: Vec::new(),
            wd_mults: Vec::new(),
            lr_mults: Vec::new(),
        };
        // PyTorch's 0.01 and 0.05 at lr 3e-3: flagged, with the per-step shrink and the λ·lr value.
        let w = opt(3e-3, 0.01).weight_decay_warning().expect("0.01 at lr 3e-3 is flagged");
        assert!(
            w.contains("0.01") && w.contains("1.000%") && w.contains("half-life 69 steps") && w.contains("3.0e-5"),
            "{w}"
        );
        assert!(opt(1e-3, 0.05).weight_decay_warning().is_some());
        // big_vision-sized values (the recipes', Scaling ViT's 0.03·lr) and none at all: quiet.
        assert_eq!(opt(2e-3, 1e-4).weight_decay_warning(), None);
        assert_eq!(opt(8e-4, 0.03 * 8e-4).weight_decay_warning(), None);
        assert_eq!(opt(1e-3, 0.0).weight_decay_warning(), None);
    }

    fn quickstart(sets: &[&str]) -> Result<TrainConfig, TrainError> {
        TrainConfig::from_toml(QUICKSTART, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn bf16_matmuls_are_a_cpu_setting_and_refused_on_a_gpu() {
        let cfg = quickstart(&["train.matmul_precision=bf16"]).unwrap();
        assert_eq!(cfg.train.matmul_precision.setting(), vit_tensor::cpu::MatmulPrecision::Bf16);
        assert_eq!(quickstart(&[]).unwrap().train.matmul_precision, MatmulPrecisionChoice::F32);
        let e = quickstart(&["train.matmul_precision=bf16", "train.device=cuda:1"]).unwrap_err().to_string();
        for n in ["train.matmul_precision", "\"bf16\" on cuda:1", "GPU GEMMs follow train.precision"] {
            assert!(e.contains(n), "{n:?} not in: {e}");
        }
        assert_eq!(e.lines().count(), 1, "{e}");
        quickstart(&["train.matmul_precision=f32", "train.device=cuda:1"]).unwrap();
    }

    #[test]
    fn wd_and_lr_multiplier_rules_parse_round_trip_and_bad_ones_are_one_line_errors() {
        let cfg = quickstart(&[
            r#"optimizer.wd_mults=[{ pattern = 'head\.weight', mult = 1.0 }, { pattern = '.*fc1\.weight', mult = 2.0 }]"#,
            r#"optimizer.lr_mults=[{ pattern = 'pos_embed', mult = 0.5 }]"#,
        ])
        .unwrap();
        let o = &cfg.optimizer;
        assert_eq!((o.wd_mults.len(), o.wd_mults[1].pattern.as_str(), o.wd_mults[1].mult), (2, r".*fc1\.weight", 2.0));
        assert_eq!(o.lr_mults, vec![MultRule { pattern: "pos_embed".into(), mult: 0.5 }]);
        // The rules survive the run directory's config.toml, which `--resume` reads back.
        let again = TrainConfig::from_toml(&cfg.to_toml().unwrap(), &[]).unwrap();
        assert_eq!(again.optimizer, cfg.optimizer);
        // The user's rules come first, in order; Scaling ViT's stay behind them.
        let g = o.param_groups().unwrap().compile().unwrap();
        let wd = |n: &str| g.settings(n).wd_mult;
        assert_eq!((wd("head.weight"), wd("blocks.0.mlp.fc1.weight"), wd("blocks.0.mlp.fc2.weight")), (1.0, 2.0, 1.0));
        assert_eq!((wd("blocks.0.norm1.weight"), wd("head.bias")), (0.0, 0.0));
        assert_eq!((g.settings("pos_embed").lr_mult, g.settings("head.weight").lr_mult), (0.5, 1.0));
        // Without rules: Scaling ViT's head multiplier of 100, and nothing written to the TOML.
        let plain = quickstart(&[]).unwrap();
        assert_eq!(plain.optimizer.param_groups().unwrap().compile().unwrap().settings("head.weight").wd_mult, 100.0);
        assert!(!plain.to_toml().unwrap().contains("wd_mults"));

        for (set, want) in [
            (
                r#"optimizer.wd_mults=[{ pattern = 'head\.weight', mult = -1.0 }]"#,
                "optimizer.wd_mults[0]: pattern \"head\\\\.weight\", multiplier -1: expected a finite value >= 0",
            ),
            (
                r#"optimizer.lr_mults=[{ pattern = 'head', mult = 0.0 }]"#,
                "optimizer.lr_mults[0]: pattern \"head\", multiplier 0: expected a finite value > 0",
            ),
            (
                r#"optimizer.wd_mults=[{ pattern = 'head', mult = 1.0 }, { pattern = 'head\.(', mult = 1.0 }]"#,
                "optimizer.wd_mults[1]: pattern \"head\\\\.(\", not a valid regular expression",
            ),
            (r#"optimizer.wd_mults=[{ pattern = 'head', multiplier = 1.0 }]"#, "multiplier"),
        ] {
            let e = quickstart(&[set]).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{set}: {e}");
        }
    }

    #[test]
    fn evals_is_the_one_undotted_key_set_sets_and_it_replaces_the_whole_list() {
        let set = r#"evals=[{ kind = "classification", name = "test_tta", tta = ["flip_lr", "shift"], every = 0 }]"#;
        let cfg = quickstart(&[set]).unwrap();
        assert_eq!(cfg.evals.len(), 1);
        assert_eq!((cfg.evals[0].name.as_str(), cfg.evals[0].every, cfg.evals[0].tta.len()), ("test_tta", 0, 2));
        let e = quickstart(&["steps=3"]).unwrap_err().to_string();
        assert!(e.contains("\"steps=3\": expected a dotted key such as train.steps"), "{e}");
        let e = quickstart(&[r#"evals=[{ kind = "classification", name = "x", every = 1, tta = ["flip"] }]"#]);
        assert!(e.unwrap_err().to_string().contains("flip"));
    }

    #[test]
    fn every_spelling_of_the_choices_parses_to_its_variant_and_writes_back_the_same() {
        use vit_tensor::Device;
        type Is = fn(&TrainConfig) -> bool;
        let cases: [(&str, Is); 16] = [
            ("schedule.decay=rsqrt", |c| c.schedule.decay == DecayKind::Rsqrt),
            ("schedule.decay=cosine", |c| c.schedule.decay == DecayKind::Cosine),
            ("schedule.decay=linear", |c| c.schedule.decay == DecayKind::Linear),
            ("schedule.decay=constant", |c| c.schedule.decay == DecayKind::Constant),
            ("optimizer.name=factored-adam", |c| c.optimizer.name == OptimizerName::FactoredAdam),
            ("optimizer.name=adamw", |c| c.optimizer.name == OptimizerName::AdamW),
            ("optimizer.name=sgd", |c| c.optimizer.name == OptimizerName::Sgd),
            ("train.precision=f32", |c| c.train.precision.dtype() == DType::F32),
            ("train.precision=bf16", |c| c.train.precision.dtype() == DType::BF16),
            ("train.matmul_precision=f32", |c| c.train.matmul_precision == MatmulPrecisionChoice::F32),
            ("train.matmul_precision=bf16", |c| c.train.matmul_precision == MatmulPrecisionChoice::Bf16),
            ("train.loss=softmax", |c| c.train.loss == LossKind::Softmax),
            ("train.loss=sigmoid", |c| c.train.loss == LossKind::Sigmoid),
            ("train.device=cpu", |c| c.train.device.0 == Device::Cpu),
            ("train.device=cuda", |c| c.train.device.0 == Device::Cuda(0)),
            ("train.device=cuda:3", |c| c.train.device.0 == Device::Cuda(3)),
        ];
        for (set, is) in cases {
            let cfg = quickstart(&[set]).unwrap_or_else(|e| panic!("{set}: {e}"));
            assert!(is(&cfg), "{set}: parsed as {:?}", cfg);
            // The written config (a run directory's config.toml) uses the same spelling.
            let text = cfg.to_toml().unwrap();
            let (key, value) = set.split_once('=').unwrap();
            let value = if value == "cuda" { "cuda:0" } else { value };
            let line = format!("{} = \"{value}\"", key.split_once('.').unwrap().1);
            assert!(text.lines().any(|l| l == line), "{set}: no line {line:?} in\n{text}");
            assert_eq!(TrainConfig::from_toml(&text, &[]).unwrap(), cfg, "{set}: round trip");
        }
        // The defaults when a recipe leaves them out.
        let bare = QUICKSTART.lines().filter(|l| !l.starts_with("device")).collect::<Vec<_>>().join("\n");
        let cfg = TrainConfig::from_toml(&bare, &[]).unwrap();
        assert_eq!(
            (cfg.train.device.0, cfg.train.precision, cfg.train.loss),
            (Device::Cpu, Precision::F32, LossKind::Softmax)
        );
    }

    #[test]
    fn a_misspelt_choice_names_the_key_the_value_and_the_choices() {
        for (set, key, bad, choices) in [
            ("schedule.decay=cosin", "schedule.decay", "cosin", &["rsqrt", "cosine", "linear", "constant"][..]),
            ("optimizer.name=adam", "optimizer.name", "adam", &["factored-adam", "adamw", "sgd"][..]),
            ("train.precision=fp16", "train.precision", "fp16", &["f32", "bf16"][..]),
            ("train.matmul_precision=tf32", "train.matmul_precision", "tf32", &["f32", "bf16"][..]),
            ("train.loss=softmx", "train.loss", "softmx", &["softmax", "sigmoid"][..]),
            ("train.device=gpu", "train.device", "gpu", &["cpu", "cuda", "cuda:N"][..]),
            ("train.device=cuda:x", "train.device", "cuda:x", &["cpu", "cuda", "cuda:N"][..]),
        ] {
            let e = quickstart(&[set]).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{set}: the key is not named: {e}");
            assert!(e.contains(bad), "{set}: the value is not named: {e}");
            for c in choices {
                assert!(
                    e.contains(&format!("`{c}`")) || e.contains(&format!(" {c},")) || e.contains(&format!(" {c} ")),
                    "{set}: choice {c} missing: {e}"
                );
            }
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // In a file too, not only through --set.
        let text = QUICKSTART.replace("decay = \"cosine\"", "decay = \"cosinus\"");
        let e = TrainConfig::from_toml(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("`schedule.decay`") && e.contains("cosinus") && e.contains("`rsqrt`"), "{e}");
    }
}
