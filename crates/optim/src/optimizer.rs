//! The optimizer interface and the one chain every optimizer of vitrs runs through
//! (reference §3, big_vision `optax.make`):
//!
//! ```text
//! g      ← g · min(1, clip / ‖g‖)                 global norm over the trainable gradients
//! d      ← direction(g, state)                     factored Adam | AdamW | SGD-momentum
//! out    ← lr · lr_mult(θ) · d + wd · wd_mult(θ) · θ
//! θ      ← θ − schedule(t) · out                   t = steps taken before this one
//! ```
//!
//! `wd` is the absolute coefficient of big_vision's `config.wd`, multiplied by the schedule
//! but not by the learning rate (Loshchilov & Hutter's decoupled decay with η_t = schedule).
//! Scaling ViT's "weight decay 0.03 (body), 3.0 (head)" are in units of the base learning
//! rate: `weight_decay = 0.03 · lr` with multiplier 100 on `head.weight`
//! ([`OptimizerConfig::scaling_vit`]). PyTorch's AdamW `weight_decay = λ` corresponds to
//! `weight_decay = λ · lr` here.
//!
//! The directions, with `t` the count before the step and `β2(t) = min(cap, 1 − (t+1)^−decay)`:
//!
//! - factored Adam (big_vision `scale_by_adafactor`): `G2 = g² + eps`; a factored parameter
//!   keeps `v_row`, `v_col` ([`factored_update`]), the others a full
//!   `v ← β2·v + (1−β2)·G2` and `u = g / sqrt(v)`; then `m_new = μ·m + (1−μ)·u` with `m` read
//!   from its dtype (bf16 by default), `d = m_new` unrounded, and `m` stored rounded to its
//!   dtype. No bias correction.
//! - AdamW (optax `scale_by_adam`): with `k = t + 1`, `m ← β1·m + (1−β1)·g`,
//!   `v ← β2·v + (1−β2)·g²`, `d = (m / (1−β1^k)) / (sqrt(v / (1−β2^k)) + eps)`; `m` is stored
//!   in its dtype (f32 by default, bf16 optional) after `d` is computed from the unrounded
//!   value, `v` in f32.
//! - SGD with momentum (optax `trace`, big_vision `momentum_hp`): `m_new = g + μ·m`,
//!   `d = m_new` unrounded, stored in the accumulator dtype (bf16 by default). No dampening,
//!   no Nesterov. Without momentum, `d = g`.
//!
//! Products such as `μ·m` are taken in f32 after reading `m`, as reference §3 writes them.
//! (JAX, multiplying a bf16 array by a Python float, would round `μ·m` to bf16 first; the
//! stored momentum already carries that much error, so this changes nothing that matters.)
//!
//! Where the math runs: parameters on the host are updated by the host math above, in f32
//! (means and norms accumulate in f64): the reference. Parameters on a CUDA device are updated
//! there by fused kernels (`crate::cuda`, `kernels/optim.cu`): all of a device's
//! parameters in one launch per step (plus three small launches for factored Adam's statistics),
//! with the gradients' sum of squares reduced on the device and read back once. The kernels do
//! the same f32 operations in the same order as the host math, so a device step equals the host
//! step bit for bit (factored means, summed in f64 in another order, can differ in the last
//! bit, rarely). Gradients of device parameters are moved to the parameter's device if needed;
//! state always lives on its parameter's device.
//!
//! Layout: parameters and state are [`ParamStore`]s, i.e. flat buffers (one per dtype and
//! device) of which each tensor is a view. The update is written into those buffers in place —
//! on the host per tensor, on a device by one launch whose per-tensor table points into them —
//! and a buffer still shared with a tensor handed out earlier (a clone of the store, a view
//! from `get`) is copied first, so such a tensor keeps its values.

use crate::cuda::{
    self as fused, AdamWCoefficients, CopyOut, FactoredAdamCoefficients, ParamStep, SecondMoment, StepKind,
    StepScalars, StepStatus, StepStatusValues,
};
use crate::{
    adafactor_beta2, clip::sum_of_squares, factored_dims, factored_update, factored_update_sharded, CompiledGroups,
    FactoredDims, OptimError, ParamGroups, ParamSettings, ParamShard, Schedule, SumOverShards,
};
use std::collections::HashMap;
use vit_tensor::{DType, Device, ParamDiff, ParamStore, Shape, Tensor};

/// Name of the step counter in [`Optimizer::state`]: a `u32` tensor `[lo, hi]` holding the
/// 64-bit count of steps taken.
pub const STATE_COUNT: &str = "count";
/// Prefix of the first moment (momentum) of a parameter: `m.blocks.0.attn.qkv.weight`.
pub const STATE_M: &str = "m.";
/// Prefix of an unfactored second moment.
pub const STATE_V: &str = "v.";
/// Prefix of a factored second moment's row statistics (the parameter's shape without `d0`).
pub const STATE_V_ROW: &str = "v_row.";
/// Prefix of a factored second moment's column statistics (the shape without `d1`).
pub const STATE_V_COL: &str = "v_col.";

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// The step just taken: the count before it (0 for the first).
    pub step: u64,
    /// Global norm of the trainable gradients before clipping.
    pub grad_norm: f64,
    /// True if the gradients were scaled down by clipping.
    pub clipped: bool,
    /// `schedule(step)`.
    pub schedule: f64,
    /// The base learning rate times the schedule (before per-parameter multipliers).
    pub lr: f64,
}

/// An optimizer over the named parameters of a [`ParamStore`]: what a trainer drives.
///
/// `grads` holds one gradient per trainable parameter, under the parameter's name and with
/// its shape (`params.zeros_like(..)` filled by the model's backward); frozen parameters may
/// have one or not. On any error nothing is changed.
pub trait Optimizer {
    /// One update of `params` from `grads`; returns what it did.
    fn step(&mut self, params: &mut ParamStore, grads: &ParamStore) -> Result<StepInfo, OptimError>;

    /// Steps taken so far (the `t` of the next step).
    fn count(&self) -> u64;

    /// All state as named tensors, the step counter included ([`STATE_COUNT`]): what a
    /// checkpoint stores. The tensors share storage with the optimizer's (tensors are never
    /// changed in place, so this is a snapshot).
    fn state(&self) -> Result<ParamStore, OptimError>;

    /// Replaces all state with `state` (as [`Optimizer::state`] returned it, in any order):
    /// names, shapes and dtypes must equal this optimizer's, else
    /// [`OptimError::StateMismatch`] lists every difference and nothing changes. Tensors
    /// are moved to the device of their parameter. Continuing then is bit-for-bit the same as
    /// never having stopped.
    fn load_state(&mut self, state: &ParamStore) -> Result<(), OptimError>;

    /// Bytes of state held (the counter included).
    fn state_bytes(&self) -> u64;
}

/// Factored Adam: big_vision's `scale_by_adafactor` (reference §3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactoredAdamConfig {
    /// Exponent of the β2 schedule `1 − (t+1)^−decay_rate`. Default 0.8.
    pub decay_rate: f64,
    /// Upper bound of β2. Default 0.999.
    pub beta2_cap: f64,
    /// Added to g² before averaging. Default 1e-30.
    pub eps: f64,
    /// Factor only when rank ≥ 2 and the second-largest dim is at least this. Default 32.
    pub min_dim_size_to_factor: usize,
    /// Momentum μ of `m = μ·m + (1−μ)·u`; `None` for none (no `m` state). Default 0.9.
    pub momentum: Option<f64>,
    /// Storage dtype of `m`. Default bf16.
    pub momentum_dtype: DType,
}

impl Default for FactoredAdamConfig {
    fn default() -> Self {
        FactoredAdamConfig {
            decay_rate: 0.8,
            beta2_cap: 0.999,
            eps: 1e-30,
            min_dim_size_to_factor: 32,
            momentum: Some(0.9),
            momentum_dtype: DType::BF16,
        }
    }
}

/// AdamW with bias correction (optax `scale_by_adam`) and decoupled weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Default 0.9.
    pub beta1: f64,
    /// Default 0.999.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`. Default 1e-8.
    pub eps: f64,
    /// Storage dtype of `m` (f32, or bf16 to save 2 B/param). `v` is always f32. Default f32.
    pub m_dtype: DType,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, m_dtype: DType::F32 }
    }
}

/// SGD with heavy-ball momentum `m = g + μ·m` (optax `trace`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// μ; `None` for plain SGD (no state). Default 0.9.
    pub momentum: Option<f64>,
    /// Storage dtype of the accumulator. Default bf16 (big_vision `momentum_hp`).
    pub accumulator_dtype: DType,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { momentum: Some(0.9), accumulator_dtype: DType::BF16 }
    }
}

/// Which update direction the chain uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    FactoredAdam(FactoredAdamConfig),
    AdamW(AdamWConfig),
    Sgd(SgdConfig),
}

/// Everything that defines an optimizer; see the module docs for the formulas.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    pub algorithm: Algorithm,
    /// Base learning rate (big_vision `config.lr`).
    pub lr: f64,
    /// Absolute decoupled weight decay (big_vision `config.wd`), times each parameter's
    /// `wd_mult` and the schedule, not times the learning rate.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; `None` for no clipping.
    pub grad_clip_norm: Option<f64>,
    /// Multiplier of the whole update at step t.
    pub schedule: Schedule,
    /// Per-parameter multipliers and freezing.
    pub groups: ParamGroups,
}

impl OptimizerConfig {
    /// A config for `algorithm` with `lr`, no weight decay, no clipping, a constant schedule
    /// and the Scaling-ViT parameter groups (which matter once `weight_decay` is set).
    pub fn new(algorithm: Algorithm, lr: f64) -> Self {
        OptimizerConfig {
            algorithm,
            lr,
            weight_decay: 0.0,
            grad_clip_norm: None,
            schedule: Schedule::constant(),
            groups: ParamGroups::scaling_vit(),
        }
    }

    /// The Scaling-ViT recipe (reference §3): factored Adam with the defaults, lr 8e-4,
    /// weight decay 0.03·lr (3.0·lr on the head through its multiplier 100), clipping at 1.0.
    pub fn scaling_vit(schedule: Schedule) -> Self {
        let lr = 8e-4;
        OptimizerConfig {
            algorithm: Algorithm::FactoredAdam(FactoredAdamConfig::default()),
            lr,
            weight_decay: 0.03 * lr,
            grad_clip_norm: Some(1.0),
            schedule,
            groups: ParamGroups::scaling_vit(),
        }
    }

    /// Checks every setting; errors name the setting, the value and the valid range.
    pub fn validate(&self) -> Result<(), OptimError> {
        fn check(ok: bool, setting: &'static str, value: f64, expected: &'static str) -> Result<(), OptimError> {
            if ok {
                Ok(())
            } else {
                Err(OptimError::Setting { setting, value: value.to_string(), expected })
            }
        }
        let unit = |x: f64| (0.0..1.0).contains(&x);
        let float = |setting: &'static str, d: DType| {
            if d.is_float() {
                Ok(())
            } else {
                Err(OptimError::Setting { setting, value: d.to_string(), expected: "a float dtype (f32, bf16, f16)" })
            }
        };
        check(self.lr.is_finite() && self.lr >= 0.0, "lr", self.lr, "a finite value >= 0")?;
        let wd = self.weight_decay;
        check(wd.is_finite() && wd >= 0.0, "weight_decay", wd, "a finite value >= 0")?;
        if let Some(c) = self.grad_clip_norm {
            check(c.is_finite() && c > 0.0, "grad_clip_norm", c, "a finite value > 0 (or no clipping)")?;
        }
        match &self.algorithm {
            Algorithm::FactoredAdam(c) => {
                let d = c.decay_rate;
                check(d.is_finite() && d > 0.0, "factored_adam.decay_rate", d, "a finite value > 0")?;
                check(unit(c.beta2_cap), "factored_adam.beta2_cap", c.beta2_cap, "a value in [0, 1)")?;
                check(c.eps.is_finite() && c.eps > 0.0, "factored_adam.eps", c.eps, "a finite value > 0")?;
                if let Some(m) = c.momentum {
                    check(unit(m), "factored_adam.momentum", m, "a value in [0, 1) (or no momentum)")?;
                }
                float("factored_adam.momentum_dtype", c.momentum_dtype)?;
            }
            Algorithm::AdamW(c) => {
                check(unit(c.beta1), "adamw.beta1", c.beta1, "a value in [0, 1)")?;
                check(unit(c.beta2), "adamw.beta2", c.beta2, "a value in [0, 1)")?;
                check(c.eps.is_finite() && c.eps > 0.0, "adamw.eps", c.eps, "a finite value > 0")?;
                float("adamw.m_dtype", c.m_dtype)?;
            }
            Algorithm::Sgd(c) => {
                if let Some(m) = c.momentum {
                    check(unit(m), "sgd.momentum", m, "a value in [0, 1) (or no momentum)")?;
                }
                float("sgd.accumulator_dtype", c.accumulator_dtype)?;
            }
        }
        Ok(())
    }
}

/// How a parameter's second moment is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Second {
    None,
    Full,
    Factored(FactoredDims),
}

/// One state tensor of a parameter: (name prefix, shape, dtype).
pub(crate) type StateTensor = (&'static str, Vec<usize>, DType);

/// New values of state tensors computed on the host: (position in the state store, values).
type HostStateUpdate = Vec<(usize, Vec<f32>)>;
/// One host slot's new values: its index, its parameters, and its state entries.
type HostSlotUpdate = (usize, Vec<f32>, HostStateUpdate);

/// The state tensors of one parameter of shape `dims`, in store order. `full` is the whole
/// parameter's shape when `dims` is one rank's part of it (tensor parallelism): factored Adam
/// picks its axes from the whole shape, and the statistics have the part's shape without them.
pub(crate) fn state_layout(
    algorithm: &Algorithm,
    dims: &[usize],
    full: &[usize],
    frozen: bool,
) -> (Second, Vec<StateTensor>) {
    if frozen {
        return (Second::None, Vec::new());
    }
    let (m, second) = match algorithm {
        Algorithm::FactoredAdam(c) => (
            c.momentum.map(|_| c.momentum_dtype),
            match factored_dims(full, c.min_dim_size_to_factor) {
                Some(fd) => Second::Factored(fd),
                None => Second::Full,
            },
        ),
        Algorithm::AdamW(c) => (Some(c.m_dtype), Second::Full),
        Algorithm::Sgd(c) => (c.momentum.map(|_| c.accumulator_dtype), Second::None),
    };
    let mut out = Vec::new();
    if let Some(dt) = m {
        out.push((STATE_M, dims.to_vec(), dt));
    }
    match second {
        Second::None => {}
        Second::Full => out.push((STATE_V, dims.to_vec(), DType::F32)),
        Second::Factored(fd) => {
            out.push((STATE_V_ROW, fd.row_shape(dims), DType::F32));
            out.push((STATE_V_COL, fd.col_shape(dims), DType::F32));
        }
    }
    (second, out)
}

/// One parameter as the optimizer knows it.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    dims: Vec<usize>,
    dtype: DType,
    device: Device,
    settings: ParamSettings,
    second: Second,
    /// How the parameter is cut from a whole one split over a tensor-parallel group, if it is.
    shard: Option<ParamShard>,
    /// Positions in the state store of `m` (if any) and of the second moment (`v`, or
    /// `v_row` then `v_col`).
    m: Option<usize>,
    v: Vec<usize>,
}

/// The optimizer: the chain of the module docs over one [`Algorithm`].
///
/// ```
/// use vit_tensor::ParamStore;
/// use vit_optim::{Algorithm, Optimizer, OptimizerChain, OptimizerConfig, SgdConfig};
/// use vit_tensor::{DType, Device, Tensor};
///
/// let mut params = ParamStore::new();
/// params.insert("head.weight", Tensor::full(1.0, [2, 3], DType::F32, Device::Cpu)?)?;
/// let mut grads = params.zeros_like(DType::F32)?;
/// grads.set("head.weight", Tensor::full(0.5, [2, 3], DType::F32, Device::Cpu)?)?;
/// let cfg = OptimizerConfig::new(Algorithm::Sgd(SgdConfig { momentum: None, ..Default::default() }), 0.1);
/// let mut opt = OptimizerChain::new(cfg, &params)?;
/// let info = opt.step(&mut params, &grads)?;
/// assert_eq!(info.step, 0);
/// assert_eq!(params.get("head.weight")?.to_f32_vec()?[0], 0.95);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct OptimizerChain {
    config: OptimizerConfig,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    /// Per-parameter state in slot order, without the counter.
    state: ParamStore,
    count: u64,
}

impl OptimizerChain {
    /// An optimizer for the parameters in `params` (names, shapes, dtypes and devices are
    /// fixed from here on) with zero state on each parameter's device.
    pub fn new(config: OptimizerConfig, params: &ParamStore) -> Result<Self, OptimError> {
        Self::with_shards(config, params, &HashMap::new())
    }

    /// [`OptimizerChain::new`] for one rank of a tensor-parallel group: `shards` names the
    /// parameters of `params` that are this rank's part of a whole one cut along one axis
    /// ([`ParamShard`]; the others are whole, e.g. replicated). Factored Adam then factors a
    /// cut parameter over the whole shape's axes, keeps its statistics cut or replicated
    /// accordingly ([`factored_update_sharded`]) and needs
    /// [`OptimizerChain::step_tensor_parallel`] to sum them over the group; every other update
    /// is elementwise and runs on the part as is.
    pub fn with_shards(
        config: OptimizerConfig,
        params: &ParamStore,
        shards: &HashMap<String, ParamShard>,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        for (name, shard) in shards {
            let t = params.get(name).map_err(|_| OptimError::Param {
                name: name.clone(),
                msg: "has a shard layout but is not among the parameters".into(),
            })?;
            shard.check().map_err(|e| OptimError::Param { name: name.clone(), msg: e.to_string() })?;
            if t.dims() != shard.local_dims().as_slice() {
                return Err(OptimError::Param {
                    name: name.clone(),
                    msg: format!(
                        "shape {:?}: expected {:?}, the whole {:?} cut along axis {} over {} ranks",
                        t.dims(),
                        shard.local_dims(),
                        shard.full_dims,
                        shard.axis,
                        shard.ranks
                    ),
                });
            }
        }
        let groups: CompiledGroups = config.groups.compile()?;
        let mut slots = Vec::with_capacity(params.len());
        let mut index = HashMap::new();
        let mut specs = Vec::new();
        for (name, t) in params.iter() {
            if !t.dtype().is_float() {
                return Err(OptimError::Param {
                    name: name.to_string(),
                    msg: format!("dtype {}: expected a float dtype (f32, bf16, f16)", t.dtype()),
                });
            }
            let settings = groups.settings(name);
            let shard = shards.get(name).cloned();
            let full = shard.as_ref().map_or(t.dims(), |s| s.full_dims.as_slice());
            let (second, layout) = state_layout(&config.algorithm, t.dims(), full, settings.frozen);
            if shard.is_some() && matches!(second, Second::Factored(_)) && t.device() != Device::Cpu {
                return Err(OptimError::Param {
                    name: name.to_string(),
                    msg: format!(
                        "on {}: the factored update of a parameter split over ranks runs on the CPU only",
                        t.device()
                    ),
                });
            }
            let mut slot = Slot {
                name: name.to_string(),
                dims: t.dims().to_vec(),
                dtype: t.dtype(),
                device: t.device(),
                settings,
                second,
                shard,
                m: None,
                v: Vec::new(),
            };
            for (prefix, shape, dtype) in layout {
                let at = specs.len();
                specs.push((format!("{prefix}{name}"), Shape::new(shape), dtype, t.device()));
                if prefix == STATE_M {
                    slot.m = Some(at);
                } else {
                    slot.v.push(at);
                }
            }
            index.insert(slot.name.clone(), slots.len());
            slots.push(slot);
        }
        // One zeroed allocation per state buffer (inserting one by one would copy a device
        // buffer per tensor).
        let state = ParamStore::zeros(specs)?;
        Ok(OptimizerChain { config, slots, index, state, count: 0 })
    }

    /// The config it was built with.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The learning-rate multiplier, weight-decay multiplier and frozen flag the group rules
    /// gave parameter `name`; `None` if it is not a parameter of this optimizer.
    pub fn settings(&self, name: &str) -> Option<ParamSettings> {
        self.index.get(name).map(|&i| self.slots[i].settings)
    }

    /// The axes parameter `name`'s second moment is factored over, if it is (axes of the
    /// whole parameter when it is split: [`OptimizerChain::with_shards`]).
    pub fn factored(&self, name: &str) -> Option<FactoredDims> {
        match self.slots[*self.index.get(name)?].second {
            Second::Factored(fd) => Some(fd),
            _ => None,
        }
    }

    /// How parameter `name` is cut from a whole one split over ranks, if it is.
    pub fn shard(&self, name: &str) -> Option<&ParamShard> {
        self.slots[*self.index.get(name)?].shard.as_ref()
    }

    /// Whether the step of parameter slot `i` sums statistics over its ranks (a collective).
    fn needs_sum_over_shards(&self, i: usize) -> bool {
        let slot = &self.slots[i];
        slot.shard.is_some() && matches!(slot.second, Second::Factored(_))
    }

    /// `lr · schedule(step)`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.config.lr * self.config.schedule.factor(step)
    }

    /// Checks `params` and `grads` against the slots; returns the gradients of the trainable
    /// slots (as given), in slot order, with `None` for frozen ones.
    fn check_inputs(&self, params: &ParamStore, grads: &ParamStore) -> Result<Vec<Option<Tensor>>, OptimError> {
        let err = |name: &str, msg: String| OptimError::Param { name: name.to_string(), msg };
        for name in params.names() {
            if !self.index.contains_key(name) {
                return Err(err(
                    name,
                    format!(
                        "not known to this optimizer (built for {} parameters; build a new one for a changed model)",
                        self.slots.len()
                    ),
                ));
            }
        }
        for name in grads.names() {
            if !self.index.contains_key(name) {
                return Err(err(name, "has a gradient but is not a parameter of this optimizer".into()));
            }
        }
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let p = params
                .get(&slot.name)
                .map_err(|_| err(&slot.name, "missing from the parameters given to step".into()))?;
            if p.dims() != slot.dims.as_slice() || p.dtype() != slot.dtype {
                return Err(err(
                    &slot.name,
                    format!("{} {:?}: expected {} {:?}", p.dtype(), p.dims(), slot.dtype, slot.dims),
                ));
            }
            if slot.settings.frozen {
                out.push(None);
                continue;
            }
            let g = grads.get(&slot.name).map_err(|_| {
                err(
                    &slot.name,
                    "no gradient given (every trainable parameter needs one; freeze it to leave it out)".into(),
                )
            })?;
            if g.dims() != slot.dims.as_slice() {
                return Err(err(&slot.name, format!("gradient of shape {:?}: expected {:?}", g.dims(), slot.dims)));
            }
            if !g.dtype().is_float() {
                return Err(err(&slot.name, format!("gradient of dtype {}: expected a float dtype", g.dtype())));
            }
            out.push(Some(g.clone()));
        }
        Ok(out)
    }

    /// The update direction `d` of one trainable slot and its new state tensors
    /// (`(position, values)`, in the state's dtypes). A factored slot split over ranks sums its
    /// statistics through `sum_over_shards` (an error without one).
    fn direction(
        &self,
        slot: &Slot,
        g: &[f32],
        t: u64,
        sum_over_shards: Option<&mut SumOverShards>,
    ) -> Result<(Vec<f32>, HostStateUpdate), OptimError> {
        let read = |i: usize| self.state.at(i).to_f32_vec();
        let write = |i: usize, data: Vec<f32>| -> Result<(usize, Vec<f32>), OptimError> { Ok((i, data)) };
        let mut new_state = Vec::new();
        let d = match &self.config.algorithm {
            Algorithm::FactoredAdam(c) => {
                let k = factored_coefficients(c, t);
                let u = match slot.second {
                    Second::Factored(fd) => {
                        let (mut vr, mut vc) = (read(slot.v[0])?, read(slot.v[1])?);
                        let u = match (&slot.shard, sum_over_shards) {
                            (None, _) => factored_update(&slot.dims, fd, g, &mut vr, &mut vc, k.beta2, k.eps),
                            (Some(shard), Some(sum)) => {
                                let mut named = |x: &mut [f64]| {
                                    sum(x).map_err(|e| OptimError::Collective {
                                        name: slot.name.clone(),
                                        msg: e.to_string(),
                                    })
                                };
                                factored_update_sharded(shard, fd, g, &mut vr, &mut vc, k.beta2, k.eps, &mut named)
                                    .map_err(|e| OptimError::Param { name: slot.name.clone(), msg: e.to_string() })?
                            }
                            (Some(_), None) => {
                                return Err(OptimError::Param {
                                    name: slot.name.clone(),
                                    msg: "is split over ranks and factored: its step needs the sum over those ranks \
                                          (OptimizerChain::step_tensor_parallel)"
                                        .into(),
                                })
                            }
                        };
                        new_state.push(write(slot.v[0], vr)?);
                        new_state.push(write(slot.v[1], vc)?);
                        u
                    }
                    _ => {
                        let mut v = read(slot.v[0])?;
                        let mut u = Vec::with_capacity(g.len());
                        for (vi, &gi) in v.iter_mut().zip(g) {
                            *vi = k.beta2 * *vi + k.one_minus_beta2 * (gi * gi + k.eps);
                            u.push(gi * (1.0 / vi.sqrt()));
                        }
                        new_state.push(write(slot.v[0], v)?);
                        u
                    }
                };
                match slot.m {
                    Some(mi) => {
                        let (cm, cu) = (k.mu, k.one_minus_mu);
                        let m: Vec<f32> = read(mi)?.iter().zip(&u).map(|(&m, &u)| cu * u + cm * m).collect();
                        new_state.push(write(mi, m.clone())?);
                        m
                    }
                    None => u,
                }
            }
            Algorithm::AdamW(c) => {
                let (Some(mi), Some(&vi)) = (slot.m, slot.v.first()) else {
                    return Err(OptimError::State {
                        name: slot.name.clone(),
                        msg: "AdamW state without m or v".into(),
                    });
                };
                let k = adamw_coefficients(c, t);
                let (mut m, mut v) = (read(mi)?, read(vi)?);
                let mut d = Vec::with_capacity(g.len());
                for ((mj, vj), &gj) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                    *mj = k.c1 * gj + k.b1 * *mj;
                    *vj = k.c2 * (gj * gj) + k.b2 * *vj;
                    d.push((*mj / k.bc1) / ((*vj / k.bc2).sqrt() + k.eps));
                }
                new_state.push(write(mi, m)?);
                new_state.push(write(vi, v)?);
                d
            }
            Algorithm::Sgd(c) => match slot.m {
                Some(mi) => {
                    let mu = sgd_momentum(c);
                    let m: Vec<f32> = read(mi)?.iter().zip(g).map(|(&m, &g)| g + mu * m).collect();
                    new_state.push(write(mi, m.clone())?);
                    m
                }
                None => g.to_vec(),
            },
        };
        Ok((d, new_state))
    }
}

impl OptimizerChain {
    /// The fused step of the trainable slots `list`, all on CUDA device `ordinal`, with their
    /// gradients `grads` (by slot, on that device), written in place: one launch over the flat
    /// buffers of the parameters and the state (after factored Adam's statistics launches).
    fn device_step(
        &mut self,
        ordinal: usize,
        list: &[usize],
        params: &mut ParamStore,
        grads: &[Option<Tensor>],
        t: u64,
        scalars: DeviceScalars<'_>,
    ) -> Result<(), OptimError> {
        // The kernel writes through the buffers' device pointers: first give every buffer on
        // this device a storage of its own (copy-on-write of one still shared with tensors
        // handed out before, which keep their values).
        let device = Device::Cuda(ordinal);
        let (scalars, mut compute) = match scalars {
            DeviceScalars::Host(s) => (DeviceScalars::Host(s), None),
            DeviceScalars::Status { schedule, max_norm, status, compute } => {
                (DeviceScalars::Status { schedule, max_norm, status, compute: None }, compute)
            }
        };
        for store in [Some(&mut *params), Some(&mut self.state), compute.as_deref_mut()].into_iter().flatten() {
            for b in 0..store.buffers().len() {
                if store.buffer(b).device() == device {
                    store.buffer_mut(b).make_unique()?;
                }
            }
        }
        let (params, state) = (&*params, &self.state);
        let mut steps = Vec::with_capacity(list.len());
        for &i in list {
            let slot = &self.slots[i];
            let second = match slot.second {
                Second::None => SecondMoment::None,
                Second::Full => SecondMoment::Full(state.at(slot.v[0])),
                Second::Factored(fd) => SecondMoment::Factored {
                    v_row: state.at(slot.v[0]),
                    v_col: state.at(slot.v[1]),
                    d0: fd.d0,
                    d1: fd.d1,
                },
            };
            let grad = grads[i].as_ref().ok_or_else(|| OptimError::Param {
                name: slot.name.clone(),
                msg: "no gradient on the parameter's device".into(),
            })?;
            steps.push(ParamStep {
                param: params.get(&slot.name)?,
                grad,
                m: slot.m.map(|m| state.at(m)),
                second,
                lr: (self.config.lr * slot.settings.lr_mult) as f32,
                wd: (self.config.weight_decay * slot.settings.wd_mult) as f32,
            });
        }
        let kind = match &self.config.algorithm {
            Algorithm::AdamW(c) => StepKind::AdamW(adamw_coefficients(c, t)),
            Algorithm::Sgd(c) => StepKind::Sgd(sgd_momentum(c)),
            Algorithm::FactoredAdam(c) => StepKind::FactoredAdam(factored_coefficients(c, t)),
        };
        // SAFETY: the buffers behind these views were made unique above, so the only other
        // tensors sharing them are the stores' own views (which must see the new values); the
        // entries of a store never overlap, and the compute copies are a store of their own.
        match scalars {
            DeviceScalars::Host(s) => unsafe { fused::step_in_place(&steps, kind, s)? },
            DeviceScalars::Status { schedule, max_norm, status, .. } => {
                let compute = compute.as_deref();
                let copies: Vec<CopyOut<'_>> = list
                    .iter()
                    .map(|&i| compute.map(|c| c.get(&self.slots[i].name)).transpose())
                    .collect::<Result<_, _>>()?;
                unsafe { fused::step_in_place_dev(&steps, kind, schedule, max_norm, t, status, &copies)? }
            }
        }
        Ok(())
    }
}

/// Where a device step takes its clip factor from.
enum DeviceScalars<'a> {
    /// Computed on the host (after reading the gradients' sum of squares).
    Host(StepScalars),
    /// Computed on the device into `status` ([`fused::step_in_place_dev`]), with the compute
    /// copies written into `compute` (a store with the parameters' names and shapes).
    Status { schedule: f32, max_norm: Option<f64>, status: &'a mut StepStatus, compute: Option<&'a mut ParamStore> },
}

/// What [`OptimizerChain::step_on_device`] did; the gradient norm, the clip decision and the
/// non-finite check stay on the device in its [`StepStatus`] (read them with
/// [`OptimizerChain::step_info`] and [`OptimizerChain::non_finite`] when needed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceStep {
    /// The step just queued: the count before it (0 for the first).
    pub step: u64,
    /// `schedule(step)`.
    pub schedule: f64,
    /// The base learning rate times the schedule.
    pub lr: f64,
}

impl OptimizerChain {
    /// Whether [`OptimizerChain::step_on_device`] can run this optimizer on CUDA `device`: every
    /// trainable parameter lives there and none is split over ranks.
    pub fn runs_on_device(&self, device: Device) -> bool {
        matches!(device, Device::Cuda(_))
            && self.slots.iter().filter(|s| !s.settings.frozen).all(|s| s.device == device && s.shard.is_none())
            && self.slots.iter().any(|s| !s.settings.frozen)
    }

    /// [`Optimizer::step`] with no host read (issue 14 item 6): the gradients' norm, the clip
    /// factor and the non-finite check are computed on the device into `status` (with the loss
    /// summed there by [`StepStatus::add_loss`]), and the fused step reads them there. A step
    /// whose norm or loss is not finite — or any step after one — changes nothing (parameters,
    /// moments, statistics); unlike [`Optimizer::step`], it returns `Ok` then, and the caller
    /// finds it when it reads the status ([`OptimizerChain::non_finite`]). The step counter
    /// advances either way. With `compute`, a store of the parameters' names and shapes on the
    /// device (e.g. their bf16 cast), the new parameters are also written into it, rounded to its
    /// dtype: the next forward's compute copy without a cast.
    ///
    /// Needs [`OptimizerChain::runs_on_device`] for `status`'s device (an error otherwise) and
    /// gives the bits of [`Optimizer::step`] when no step was bad. Callers should first ask
    /// [`crate::cuda::device_step_ok`] (the self-check) and use [`Optimizer::step`] when it
    /// says no.
    pub fn step_on_device(
        &mut self,
        params: &mut ParamStore,
        grads: &ParamStore,
        status: &mut StepStatus,
        compute: Option<&mut ParamStore>,
    ) -> Result<DeviceStep, OptimError> {
        let device = status.device();
        let Device::Cuda(ordinal) = device else {
            return Err(OptimError::Param { name: "(all)".into(), msg: "a device step needs a CUDA status".into() });
        };
        if !self.runs_on_device(device) {
            return Err(OptimError::Param {
                name: "(all)".into(),
                msg: format!(
                    "a device step needs every trainable parameter on {device} and none split over ranks; use step"
                ),
            });
        }
        let gs = self.check_inputs(params, grads)?;
        if let Some(c) = compute.as_deref() {
            for slot in self.slots.iter().filter(|s| !s.settings.frozen) {
                let t = c.get(&slot.name).map_err(|_| OptimError::Param {
                    name: slot.name.clone(),
                    msg: "missing from the compute copy given to step_on_device".into(),
                })?;
                if t.dims() != slot.dims.as_slice() || t.device() != device {
                    return Err(OptimError::Param {
                        name: slot.name.clone(),
                        msg: format!(
                            "compute copy {:?} on {}: expected {:?} on {device}",
                            t.dims(),
                            t.device(),
                            slot.dims
                        ),
                    });
                }
            }
        }
        let t = self.count;
        let mut list = Vec::new();
        let mut on_device: Vec<Option<Tensor>> = vec![None; self.slots.len()];
        for (i, g) in gs.iter().enumerate() {
            if let Some(g) = g {
                on_device[i] = Some(g.to_device(device)?);
                list.push(i);
            }
        }
        let schedule = self.config.schedule.factor(t);
        let scalars =
            DeviceScalars::Status { schedule: schedule as f32, max_norm: self.config.grad_clip_norm, status, compute };
        self.device_step(ordinal, &list, params, &on_device, t, scalars)?;
        self.count += 1;
        Ok(DeviceStep { step: t, schedule, lr: self.config.lr * schedule })
    }

    /// What the last step finalized in a status did, as [`Optimizer::step`] reports it (the
    /// values of a [`StepStatus::read`]).
    pub fn step_info(&self, status: &StepStatusValues) -> StepInfo {
        let step = status.steps.max(1) as u64 - 1;
        let schedule = self.config.schedule.factor(step);
        StepInfo {
            step,
            grad_norm: status.norm,
            clipped: status.clipped(self.config.grad_clip_norm),
            schedule,
            lr: self.config.lr * schedule,
        }
    }

    /// The error [`Optimizer::step`] would have returned at the first step whose gradient norm
    /// was not finite, as `status` kept it ([`OptimError::NonFinite`] naming that step and the
    /// first parameter whose gradient held a non-finite value); `None` when no step was bad or
    /// only the loss was (the trainer reports that one). The parameters and state are those from
    /// before that step.
    pub fn non_finite(&self, status: &StepStatusValues) -> Option<OptimError> {
        let bad = status.first_bad()?;
        if bad.norm.is_finite() {
            return None;
        }
        let trainable: Vec<&Slot> = self.slots.iter().filter(|s| !s.settings.frozen).collect();
        let name = match bad.tensor.and_then(|i| trainable.get(i)) {
            Some(slot) => slot.name.clone(),
            None => "(the gradients' sum of squares overflowed)".into(),
        };
        Some(OptimError::NonFinite { name, norm: bad.norm, step: bad.step })
    }
}

/// Factored Adam's f32 coefficients at step `t`, shared by the host math and the kernels:
/// `β2(t)` rounded to f32, `1 − β2` in f32, eps, and the momentum `μ`, `1 − μ` (from f64).
fn factored_coefficients(c: &FactoredAdamConfig, t: u64) -> FactoredAdamCoefficients {
    let beta2 = adafactor_beta2(t, c.decay_rate, c.beta2_cap) as f32;
    let mu = c.momentum.unwrap_or(0.0);
    FactoredAdamCoefficients {
        beta2,
        one_minus_beta2: 1.0 - beta2,
        eps: c.eps as f32,
        mu: mu as f32,
        one_minus_mu: (1.0 - mu) as f32,
    }
}

/// AdamW's f32 coefficients at step `t` (bias corrections for `k = t + 1`), each from f64.
fn adamw_coefficients(c: &AdamWConfig, t: u64) -> AdamWCoefficients {
    let k = (t + 1) as f64;
    AdamWCoefficients {
        b1: c.beta1 as f32,
        c1: (1.0 - c.beta1) as f32,
        b2: c.beta2 as f32,
        c2: (1.0 - c.beta2) as f32,
        bc1: (1.0 - c.beta1.powf(k)) as f32,
        bc2: (1.0 - c.beta2.powf(k)) as f32,
        eps: c.eps as f32,
    }
}

/// SGD's momentum `μ` (0 without; then there is no state and it is unused).
fn sgd_momentum(c: &SgdConfig) -> f32 {
    c.momentum.unwrap_or(0.0) as f32
}

/// The first gradient (in order) holding a non-finite value, or failing that the one with
/// the largest norm (the sum of squares overflowed).
fn culprit(slots: &[Slot], grads: &[Option<Tensor>]) -> String {
    let mut worst = (f64::NEG_INFINITY, String::new());
    for (slot, g) in slots.iter().zip(grads) {
        let Some(Ok(values)) = g.as_ref().map(Tensor::to_f32_vec) else { continue };
        if values.iter().any(|x| !x.is_finite()) {
            return slot.name.clone();
        }
        let sq: f64 = values.iter().map(|&x| (x as f64) * (x as f64)).sum();
        if sq > worst.0 {
            worst = (sq, slot.name.clone());
        }
    }
    worst.1
}

fn count_tensor(count: u64) -> Result<Tensor, OptimError> {
    Ok(Tensor::from_vec(vec![count as u32, (count >> 32) as u32], [2], Device::Cpu)?)
}

impl OptimizerChain {
    /// [`Optimizer::step`] of one shard of a model whose other parameters other ranks update
    /// (ZeRO-1): `global_sum_of_squares` turns this shard's sum of squared trainable gradients
    /// into the whole model's (an all-reduce), so that clipping and the reported norm are the
    /// whole model's.
    pub fn step_shard(
        &mut self,
        params: &mut ParamStore,
        grads: &ParamStore,
        global_sum_of_squares: &mut dyn FnMut(f64) -> Result<f64, OptimError>,
    ) -> Result<StepInfo, OptimError> {
        self.step_with(params, grads, global_sum_of_squares, None)
    }

    /// [`OptimizerChain::step_shard`] of one rank of a tensor-parallel group, built by
    /// [`OptimizerChain::with_shards`]: `sum_over_shards` sums the factored statistics of the
    /// split parameters over the group ([`SumOverShards`]; one call per split factored
    /// parameter, in parameter order, the same on every rank).
    pub fn step_tensor_parallel(
        &mut self,
        params: &mut ParamStore,
        grads: &ParamStore,
        global_sum_of_squares: &mut dyn FnMut(f64) -> Result<f64, OptimError>,
        sum_over_shards: &mut SumOverShards,
    ) -> Result<StepInfo, OptimError> {
        self.step_with(params, grads, global_sum_of_squares, Some(sum_over_shards))
    }

    fn step_with(
        &mut self,
        params: &mut ParamStore,
        grads: &ParamStore,
        global_sum_of_squares: &mut dyn FnMut(f64) -> Result<f64, OptimError>,
        mut sum_over_shards: Option<&mut SumOverShards>,
    ) -> Result<StepInfo, OptimError> {
        let gs = self.check_inputs(params, grads)?;
        let t = self.count;

        // Trainable slots on the host, and those on each CUDA device (updated there by the fused
        // kernels, with their gradients moved to that device if they are elsewhere).
        let mut host = Vec::new();
        let mut devices: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut on_device: Vec<Option<Tensor>> = vec![None; self.slots.len()];
        for (i, (slot, g)) in self.slots.iter().zip(&gs).enumerate() {
            let Some(g) = g else { continue };
            match slot.device {
                Device::Cpu => host.push(i),
                Device::Cuda(ordinal) => {
                    on_device[i] = Some(g.to_device(slot.device)?);
                    match devices.iter_mut().find(|(o, _)| *o == ordinal) {
                        Some((_, list)) => list.push(i),
                        None => devices.push((ordinal, vec![i])),
                    }
                }
            }
        }

        // Global norm over the trainable gradients only: the host's in f64 on the host, each
        // device's in one reduction there (also f64).
        let host_grads: Vec<Tensor> = host.iter().filter_map(|&i| gs[i].clone()).collect();
        let mut sq = sum_of_squares(&host_grads)?;
        for (_, list) in &devices {
            let g: Vec<&Tensor> = list.iter().filter_map(|&i| on_device[i].as_ref()).collect();
            sq += fused::sum_of_squares(&g)?;
        }
        let grad_norm = global_sum_of_squares(sq)?.sqrt();
        if !grad_norm.is_finite() {
            return Err(OptimError::NonFinite { name: culprit(&self.slots, &gs), norm: grad_norm, step: t });
        }
        let clip = match self.config.grad_clip_norm {
            Some(c) if grad_norm > c => Some((c / grad_norm) as f32),
            _ => None,
        };

        let schedule = self.config.schedule.factor(t);
        let s = schedule as f32;
        let (lr, wd) = (self.config.lr, self.config.weight_decay);

        // Compute everything first, so an error leaves params and state untouched; then write
        // the new values into the flat buffers in place.
        if let Algorithm::AdamW(c) = &self.config.algorithm {
            if devices.is_empty() && self.adamw_in_place(*c, params, &gs, &host, t, clip, s)? {
                self.count += 1;
                return Ok(StepInfo { step: t, grad_norm, clipped: clip.is_some(), schedule, lr: lr * schedule });
            }
        }
        // The slots are independent: one rayon task each (the bits do not depend on the order),
        // but those whose statistics are summed over ranks run one after another in slot order
        // (their sums are collectives, called alike on every rank).
        let update = |i: usize, sum: Option<&mut SumOverShards>| -> Result<Option<HostSlotUpdate>, OptimError> {
            let slot = &self.slots[i];
            let Some(g) = &gs[i] else { return Ok(None) };
            let mut g = g.to_f32_vec()?;
            if let Some(c) = clip {
                g.iter_mut().for_each(|x| *x *= c);
            }
            let (d, st) = self.direction(slot, &g, t, sum)?;
            let a = (lr * slot.settings.lr_mult) as f32;
            let b = (wd * slot.settings.wd_mult) as f32;
            let mut theta = params.get(&slot.name)?.to_f32_vec()?;
            for (th, &dj) in theta.iter_mut().zip(&d) {
                *th -= s * (a * dj + b * *th);
            }
            Ok(Some((i, theta, st)))
        };
        let (summed, independent): (Vec<usize>, Vec<usize>) =
            host.iter().partition(|&&i| self.needs_sum_over_shards(i));
        let mut updates: Vec<Option<HostSlotUpdate>> = {
            use rayon::prelude::*;
            independent.par_iter().map(|&i| update(i, None)).collect::<Result<_, OptimError>>()?
        };
        for &i in &summed {
            updates.push(update(i, sum_over_shards.as_deref_mut())?);
        }
        let mut host_params = Vec::new();
        let mut host_state = Vec::new();
        for (i, theta, st) in updates.into_iter().flatten() {
            host_params.push((i, theta));
            host_state.extend(st);
        }
        let scalars = StepScalars { schedule: s, clip_scale: clip.unwrap_or(1.0) };
        // Host values are written after every device step has launched, so an error in one
        // (a launch failure) leaves the host parameters untouched.
        for (ordinal, list) in &devices {
            self.device_step(*ordinal, list, params, &on_device, t, DeviceScalars::Host(scalars))?;
        }
        for (i, theta) in host_params {
            let at = params.position(&self.slots[i].name).expect("checked by check_inputs");
            params.write_f32_at(at, &theta)?;
        }
        for (i, values) in host_state {
            self.state.write_f32_at(i, &values)?;
        }
        self.count += 1;
        Ok(StepInfo { step: t, grad_norm, clipped: clip.is_some(), schedule, lr: lr * schedule })
    }
}

impl OptimizerChain {
    /// The AdamW step in place when every trainable slot is f32 on the CPU with f32 gradients
    /// and f32 moments (the CPU trainer's case): one pass over each tensor, the slots in
    /// parallel, no copies; the same arithmetic, so the same bits, as the general path
    /// (`direction` and the update in `step_with`; tested). Returns `false`, having changed
    /// nothing, when some slot is not of that kind.
    #[allow(clippy::too_many_arguments)]
    fn adamw_in_place(
        &mut self,
        c: AdamWConfig,
        params: &mut ParamStore,
        gs: &[Option<Tensor>],
        host: &[usize],
        t: u64,
        clip: Option<f32>,
        s: f32,
    ) -> Result<bool, OptimError> {
        let k = adamw_coefficients(&c, t);
        let (lr, wd) = (self.config.lr, self.config.weight_decay);
        let mut grads = Vec::with_capacity(host.len());
        let mut rates = Vec::with_capacity(host.len());
        let (mut param_at, mut state_at) = (Vec::with_capacity(host.len()), Vec::with_capacity(2 * host.len()));
        for &i in host {
            let slot = &self.slots[i];
            let Some(g) = &gs[i] else { continue };
            let (Some(m), Some(&v)) = (slot.m, slot.v.first()) else { return Ok(false) };
            let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device() == Device::Cpu;
            if !(f32_cpu(g) && f32_cpu(self.state.at(m)) && f32_cpu(self.state.at(v))) {
                return Ok(false);
            }
            let Some(at) = params.position(&slot.name) else { return Ok(false) };
            if !f32_cpu(params.at(at)) {
                return Ok(false);
            }
            grads.push(g.as_slice::<f32>()?);
            rates.push(((lr * slot.settings.lr_mult) as f32, (wd * slot.settings.wd_mult) as f32));
            param_at.push(at);
            state_at.extend([m, v]);
        }
        let thetas = params.f32_slices_mut(&param_at)?;
        let mut moments = self.state.f32_slices_mut(&state_at)?.into_iter();
        let work: Vec<_> = thetas
            .into_iter()
            .zip(grads)
            .zip(rates)
            .map(|((theta, g), ab)| (theta, moments.next().expect("m"), moments.next().expect("v"), g, ab))
            .collect();
        use rayon::prelude::*;
        work.into_par_iter().for_each(|(theta, m, v, g, (a, b))| {
            for (((th, mj), vj), &gj) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let gj = match clip {
                    Some(c) => gj * c,
                    None => gj,
                };
                *mj = k.c1 * gj + k.b1 * *mj;
                *vj = k.c2 * (gj * gj) + k.b2 * *vj;
                let dj = (*mj / k.bc1) / ((*vj / k.bc2).sqrt() + k.eps);
                *th -= s * (a * dj + b * *th);
            }
        });
        Ok(true)
    }
}

impl Optimizer for OptimizerChain {
    fn step(&mut self, params: &mut ParamStore, grads: &ParamStore) -> Result<StepInfo, OptimError> {
        self.step_with(params, grads, &mut Ok, None)
    }

    fn count(&self) -> u64 {
        self.count
    }

    fn state(&self) -> Result<ParamStore, OptimError> {
        let mut out = ParamStore::new();
        out.insert(STATE_COUNT, count_tensor(self.count)?)?;
        for (name, t) in self.state.iter() {
            out.insert(name, t.clone())?;
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &ParamStore) -> Result<(), OptimError> {
        let expected = self.state()?;
        let diff = ParamDiff::between(&expected, state);
        if !diff.is_empty() {
            return Err(OptimError::StateMismatch(diff));
        }
        let words = state.get(STATE_COUNT)?.to_vec::<u32>()?;
        let count = words[0] as u64 | (words[1] as u64) << 32;
        let names: Vec<String> = self.state.names().map(str::to_string).collect();
        for name in names {
            self.state.set(&name, state.get(&name)?.clone())?;
        }
        self.count = count;
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        8 + self.state.iter().map(|(_, t)| (t.numel() * t.dtype().size_in_bytes()) as u64).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Decay;
    use half::bf16;

    fn t(data: &[f32], dims: &[usize]) -> Tensor {
        Tensor::from_f32(data.to_vec(), dims.to_vec(), DType::F32, Device::Cpu).unwrap()
    }

    fn store(items: &[(&str, &[f32], &[usize])]) -> ParamStore {
        let mut s = ParamStore::new();
        for &(n, d, dims) in items {
            s.insert(n, t(d, dims)).unwrap();
        }
        s
    }

    fn values(s: &ParamStore, name: &str) -> Vec<f32> {
        s.get(name).unwrap().to_f32_vec().unwrap()
    }

    /// Every tensor's exact bits, for bit-for-bit comparisons.
    fn snapshot(s: &ParamStore) -> Vec<(String, DType, Vec<u32>)> {
        s.iter()
            .map(|(n, t)| {
                let bits = match t.dtype() {
                    DType::U32 => t.to_vec::<u32>().unwrap(),
                    _ => t.to_f32_vec().unwrap().iter().map(|x| x.to_bits()).collect(),
                };
                (n.to_string(), t.dtype(), bits)
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= tol * w.abs().max(1.0), "got {got:?}, want {want:?}");
        }
    }

    fn factored(momentum_dtype: DType, min_dim: usize) -> Algorithm {
        Algorithm::FactoredAdam(FactoredAdamConfig {
            min_dim_size_to_factor: min_dim,
            momentum_dtype,
            ..Default::default()
        })
    }

    fn sgd(momentum: Option<f64>) -> Algorithm {
        Algorithm::Sgd(SgdConfig { momentum, accumulator_dtype: DType::BF16 })
    }

    #[test]
    fn factored_adam_two_hand_computed_steps() {
        // w [2, 2] factored (min dim 2), b [3] not. lr 0.1, f32 momentum, no decay or clip.
        let mut p = store(&[("w", &[1.0, 2.0, 3.0, 4.0], &[2, 2]), ("b", &[1.0, 1.0, 1.0], &[3])]);
        let g = store(&[("w", &[1.0, 0.0, 0.0, 2.0], &[2, 2]), ("b", &[0.5, -2.0, 0.0], &[3])]);
        let mut opt = OptimizerChain::new(OptimizerConfig::new(factored(DType::F32, 2), 0.1), &p).unwrap();
        assert_eq!(opt.factored("w"), Some(FactoredDims { d0: 1, d1: 0 }));
        assert_eq!(opt.factored("b"), None);
        let names: Vec<String> = opt.state().unwrap().names().map(str::to_string).collect();
        assert_eq!(names, ["count", "m.w", "v_row.w", "v_col.w", "m.b", "v.b"]);

        // Step 0: β2 = 0, so u(w) = [√5, 0, 0, 2/√3.2] (see factored.rs), u(b) = sign(g);
        // m = 0.1·u; θ -= 0.1·m.
        let info = opt.step(&mut p, &g).unwrap();
        assert_eq!((info.step, info.schedule, info.clipped), (0, 1.0, false));
        assert!((info.grad_norm - (1.0f64 + 4.0 + 0.25 + 4.0).sqrt()).abs() < 1e-9);
        let (u0, u3) = (5f64.sqrt(), 2.0 / 3.2f64.sqrt());
        close(&values(&p, "w"), &[1.0 - 0.01 * u0, 2.0, 3.0, 4.0 - 0.01 * u3], 1e-6);
        close(&values(&p, "b"), &[0.99, 1.01, 1.0], 1e-6);
        let s = opt.state().unwrap();
        close(&values(&s, "v_row.w"), &[0.5, 2.0], 1e-7);
        close(&values(&s, "v_col.w"), &[0.5, 2.0], 1e-7);
        close(&values(&s, "v.b"), &[0.25, 4.0, 1e-30], 1e-7);
        close(&values(&s, "m.w"), &[0.1 * u0, 0.0, 0.0, 0.1 * u3], 1e-6);

        // Step 1, same gradient: the statistics stay (β2·x + (1−β2)·x), u is the same,
        // m = 0.9·0.1·u + 0.1·u = 0.19·u.
        let info = opt.step(&mut p, &g).unwrap();
        assert_eq!(info.step, 1);
        close(&values(&p, "w"), &[1.0 - 0.029 * u0, 2.0, 3.0, 4.0 - 0.029 * u3], 1e-6);
        close(&values(&p, "b"), &[0.971, 1.029, 1.0], 1e-6);
        assert_eq!(opt.count(), 2);
    }

    #[test]
    fn bf16_momentum_is_stored_rounded_and_used_unrounded() {
        // Unfactored [4], lr 1. Step 0: β2 = 0, u = sign(g) exactly, m_new = 0.1·sign(g):
        // θ moves by the f32 value 0.1 while m is stored as bf16(0.1) = 0.10009765625.
        let mut p = store(&[("x", &[0.0; 4], &[4])]);
        let g = store(&[("x", &[1.0, -1.0, 3.0, -0.25], &[4])]);
        let mut opt = OptimizerChain::new(OptimizerConfig::new(factored(DType::BF16, 32), 1.0), &p).unwrap();
        opt.step(&mut p, &g).unwrap();
        assert_eq!(values(&p, "x"), [-0.1f32, 0.1, -0.1, 0.1]);
        let m = opt.state().unwrap().get("m.x").unwrap().clone();
        assert_eq!(m.dtype(), DType::BF16);
        let stored = bf16::from_f32(0.1).to_f32();
        assert_eq!(stored as f64, 0.10009765625);
        assert_eq!(m.to_f32_vec().unwrap(), [stored, -stored, stored, -stored]);
        // Step 1: u ≈ sign(g) again; m_new = 0.9·bf16(0.1) + 0.1 = 0.190087890625 (0.19 if m
        // had been kept in f32).
        opt.step(&mut p, &g).unwrap();
        let x = values(&p, "x");
        for (i, s) in [1.0f64, -1.0, 1.0, -1.0].iter().enumerate() {
            let moved = (x[i] as f64 - (-0.1f32 * *s as f32) as f64) * -s;
            assert!((moved - 0.190087890625).abs() < 1e-6, "{x:?}");
        }
        let m = values(&opt.state().unwrap(), "m.x");
        assert_eq!(m[0], bf16::from_f64(0.190087890625).to_f32());
    }

    #[test]
    fn adamw_hand_computed_with_decoupled_weight_decay_and_schedule() {
        // k = 1: m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g² -> d = g / (|g| + 1e-8) ≈ sign(g).
        // Linear schedule over 4 steps: factor 1 at step 0, 0.75 at step 1.
        let mut p = store(&[("blocks.0.mlp.fc1.weight", &[1.0, -2.0], &[2, 1])]);
        let name = "blocks.0.mlp.fc1.weight";
        let mut cfg = OptimizerConfig::new(Algorithm::AdamW(AdamWConfig::default()), 0.01);
        cfg.weight_decay = 0.1; // wd_mult 1 on a kernel
        cfg.schedule = Schedule::new(Decay::Linear, 0, 0, 4).unwrap();
        let mut opt = OptimizerChain::new(cfg, &p).unwrap();
        let g1 = store(&[(name, &[0.5, 0.25], &[2, 1])]);
        opt.step(&mut p, &g1).unwrap();
        let th1 = [1.0 - (0.01 + 0.1 * 1.0), -2.0 - (0.01 + 0.1 * -2.0)];
        close(&values(&p, name), &th1, 1e-6);
        // k = 2 with g2 = [-1, 0.25].
        let g2 = store(&[(name, &[-1.0, 0.25], &[2, 1])]);
        let info = opt.step(&mut p, &g2).unwrap();
        assert_eq!(info.schedule, 0.75);
        assert!((info.lr - 0.0075).abs() < 1e-12);
        let want: Vec<f64> = (0..2)
            .map(|i| {
                let (a, b) = ([0.5, 0.25][i], [-1.0, 0.25][i]);
                let m = 0.9 * (0.1 * a) + 0.1 * b;
                let v = 0.999 * (0.001 * a * a) + 0.001 * b * b;
                let d = (m / (1.0 - 0.81)) / ((v / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
                th1[i] - 0.75 * (0.01 * d + 0.1 * th1[i])
            })
            .collect();
        close(&values(&p, name), &want, 1e-6);
        let s = opt.state().unwrap();
        assert_eq!(s.get(&format!("m.{name}")).unwrap().dtype(), DType::F32);
        assert_eq!(s.get(&format!("v.{name}")).unwrap().dims(), &[2, 1]);
    }

    #[test]
    fn sgd_momentum_with_bf16_accumulator_and_clipping() {
        // g1 = [0.3, 0.4] (norm 0.5), g2 = [3, 4] (norm 5, clipped to 1 -> [0.6, 0.8]).
        let mut p = store(&[("w", &[1.0, 1.0], &[2])]);
        let mut cfg = OptimizerConfig::new(sgd(Some(0.9)), 0.5);
        cfg.grad_clip_norm = Some(1.0);
        let mut opt = OptimizerChain::new(cfg, &p).unwrap();
        let info = opt.step(&mut p, &store(&[("w", &[0.3, 0.4], &[2])])).unwrap();
        assert!(!info.clipped && (info.grad_norm - 0.5).abs() < 1e-7);
        close(&values(&p, "w"), &[1.0 - 0.15, 1.0 - 0.2], 1e-7);
        let m1 = values(&opt.state().unwrap(), "m.w");
        assert_eq!(m1, [bf16::from_f32(0.3).to_f32(), bf16::from_f32(0.4).to_f32()]);
        let info = opt.step(&mut p, &store(&[("w", &[3.0, 4.0], &[2])])).unwrap();
        assert!(info.clipped && (info.grad_norm - 5.0).abs() < 1e-6);
        let want: Vec<f64> = (0..2).map(|i| [0.85, 0.8][i] - 0.5 * ([0.6, 0.8][i] + 0.9 * m1[i] as f64)).collect();
        close(&values(&p, "w"), &want, 1e-6);
        // Plain SGD keeps no state and moves by lr·g.
        let mut p = store(&[("w", &[1.0, 1.0], &[2])]);
        let mut opt = OptimizerChain::new(OptimizerConfig::new(sgd(None), 0.5), &p).unwrap();
        assert_eq!(opt.state().unwrap().len(), 1);
        assert_eq!(opt.state_bytes(), 8);
        opt.step(&mut p, &store(&[("w", &[0.25, -1.0], &[2])])).unwrap();
        assert_eq!(values(&p, "w"), [0.875, 1.5]);
    }

    #[test]
    fn weight_decay_multipliers_follow_the_default_rules() {
        // Zero gradients: factored Adam's direction is 0, so only decay moves θ:
        // θ2 = θ0·(1 − wd·mult)·(1 − 0.75·wd·mult) under a linear schedule over 4 steps.
        let cases: [(&str, &[usize], f64); 9] = [
            ("head.weight", &[3, 4], 100.0),
            ("head.bias", &[3], 0.0),
            ("blocks.0.attn.qkv.weight", &[12, 4], 1.0),
            ("blocks.0.norm1.weight", &[4], 0.0),
            ("blocks.0.attn.q_norm.weight", &[2], 0.0),
            ("blocks.0.mlp_bias", &[16], 0.0),
            ("pos_embed", &[1, 5, 4], 0.0),
            ("cls_token", &[1, 1, 4], 0.0),
            ("attn_pool.latent", &[1, 1, 4], 0.0),
        ];
        let mut p = ParamStore::new();
        for (i, (n, dims, _)) in cases.iter().enumerate() {
            p.insert(*n, Tensor::randn(dims.to_vec(), 0.0, 1.0, i as u64, DType::F32, Device::Cpu).unwrap()).unwrap();
        }
        let before = p.clone();
        let mut cfg = OptimizerConfig::new(Algorithm::FactoredAdam(Default::default()), 0.5);
        cfg.weight_decay = 1e-3;
        cfg.grad_clip_norm = Some(1.0);
        cfg.schedule = Schedule::new(Decay::Linear, 0, 0, 4).unwrap();
        let mut opt = OptimizerChain::new(cfg, &p).unwrap();
        let g = p.zeros_like(DType::F32).unwrap();
        opt.step(&mut p, &g).unwrap();
        opt.step(&mut p, &g).unwrap();
        for (n, _, mult) in cases {
            assert_eq!(opt.settings(n).unwrap().wd_mult, mult, "{n}");
            let k = (1.0 - 1e-3 * mult) * (1.0 - 0.75 * 1e-3 * mult);
            let want: Vec<f64> = values(&before, n).iter().map(|&x| x as f64 * k).collect();
            close(&values(&p, n), &want, 1e-6);
        }
    }

    #[test]
    fn lr_multipliers_scale_the_gradient_part_only() {
        let mut p = store(&[("a.weight", &[1.0, 1.0], &[2]), ("b.weight", &[1.0, 1.0], &[2])]);
        let mut cfg = OptimizerConfig::new(sgd(None), 0.5);
        cfg.groups = ParamGroups::none().with_lr_mult(r"a\..*", 0.5).with_wd_mult(".*", 1.0);
        cfg.weight_decay = 0.25;
        let mut opt = OptimizerChain::new(cfg, &p).unwrap();
        let g = store(&[("a.weight", &[1.0, -1.0], &[2]), ("b.weight", &[1.0, -1.0], &[2])]);
        opt.step(&mut p, &g).unwrap();
        // a: 1 − (0.25·(±1) + 0.25·1); b: 1 − (0.5·(±1) + 0.25·1).
        assert_eq!(values(&p, "a.weight"), [0.5, 1.0]);
        assert_eq!(values(&p, "b.weight"), [0.25, 1.25]);
    }

    #[test]
    fn frozen_parameters_are_untouched_stateless_and_outside_the_norm() {
        let mut p = store(&[("patch_embed.proj.weight", &[1.0, 2.0], &[2]), ("head.weight", &[1.0, 2.0], &[2])]);
        let mut cfg = OptimizerConfig::new(factored(DType::BF16, 32), 0.1);
        cfg.weight_decay = 0.1;
        cfg.grad_clip_norm = Some(1.0);
        cfg.groups = ParamGroups::scaling_vit().freeze(r"patch_embed\..*");
        let mut opt = OptimizerChain::new(cfg, &p).unwrap();
        assert!(opt.settings("patch_embed.proj.weight").unwrap().frozen);
        let names: Vec<String> = opt.state().unwrap().names().map(str::to_string).collect();
        assert_eq!(names, ["count", "m.head.weight", "v.head.weight"]);
        let g = store(&[("patch_embed.proj.weight", &[1e6, 1e6], &[2]), ("head.weight", &[0.3, 0.4], &[2])]);
        let info = opt.step(&mut p, &g).unwrap();
        assert!((info.grad_norm - 0.5).abs() < 1e-7, "{}", info.grad_norm);
        assert_eq!(values(&p, "patch_embed.proj.weight"), [1.0, 2.0]);
        assert_ne!(values(&p, "head.weight"), [1.0, 2.0]);
        // A frozen parameter's gradient may also be left out.
        let g = store(&[("head.weight", &[0.3, 0.4], &[2])]);
        opt.step(&mut p, &g).unwrap();
        assert_eq!(values(&p, "patch_embed.proj.weight"), [1.0, 2.0]);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_parameter_and_change_nothing() {
        let mut p = store(&[("w", &[1.0, 2.0], &[2]), ("b", &[1.0], &[1])]);
        let mut opt = OptimizerChain::new(OptimizerConfig::new(factored(DType::BF16, 32), 0.1), &p).unwrap();
        let before = opt.state().unwrap();
        let err =
            |opt: &mut OptimizerChain, p: &mut ParamStore, g: &ParamStore| opt.step(p, g).unwrap_err().to_string();

        let e = err(&mut opt, &mut p, &store(&[("w", &[1.0, 1.0], &[2])]));
        assert!(e.starts_with("parameter b: no gradient given"), "{e}");
        let e = err(&mut opt, &mut p, &store(&[("w", &[1.0, 1.0, 1.0], &[3]), ("b", &[1.0], &[1])]));
        assert_eq!(e, "parameter w: gradient of shape [3]: expected [2]");
        let e = err(&mut opt, &mut p, &store(&[("w", &[1.0, 1.0], &[2]), ("b", &[1.0], &[1]), ("c", &[1.0], &[1])]));
        assert_eq!(e, "parameter c: has a gradient but is not a parameter of this optimizer");
        let mut extra = p.clone();
        extra.insert("c", t(&[1.0], &[1])).unwrap();
        let g = store(&[("w", &[1.0, 1.0], &[2]), ("b", &[1.0], &[1])]);
        let e = err(&mut opt, &mut extra, &g);
        assert!(e.starts_with("parameter c: not known to this optimizer"), "{e}");
        let mut fewer = store(&[("w", &[1.0, 2.0], &[2])]);
        let e = err(&mut opt, &mut fewer, &g);
        assert_eq!(e, "parameter b: missing from the parameters given to step");

        let bad = store(&[("w", &[1.0, 1.0], &[2]), ("b", &[f32::NAN], &[1])]);
        let e = err(&mut opt, &mut p, &bad);
        assert!(e.starts_with("gradient of b is not finite (global norm NaN): step 0 refused"), "{e}");
        let inf = store(&[("w", &[f32::INFINITY, 1.0], &[2]), ("b", &[1.0], &[1])]);
        assert!(err(&mut opt, &mut p, &inf).starts_with("gradient of w is not finite"));

        assert_eq!(values(&p, "w"), [1.0, 2.0]);
        assert_eq!(opt.count(), 0);
        assert_eq!(snapshot(&opt.state().unwrap()), snapshot(&before));
    }

    #[test]
    fn mismatched_state_is_refused_naming_the_tensors() {
        let p = store(&[("w", &[1.0; 64 * 32], &[64, 32]), ("b", &[1.0; 4], &[4])]);
        let mut opt = OptimizerChain::new(OptimizerConfig::new(factored(DType::BF16, 32), 0.1), &p).unwrap();
        // An optimizer with f32 momentum and no factoring has other dtypes and shapes.
        let other = OptimizerChain::new(OptimizerConfig::new(factored(DType::F32, 100), 0.1), &p).unwrap();
        let e = opt.load_state(&other.state().unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("optimizer state does not match this optimizer: "), "{e}");
        assert!(e.contains("missing 2 [v_row.w, v_col.w]"), "{e}");
        assert!(e.contains("unexpected 1 [v.w]"), "{e}");
        assert!(e.contains("wrong dtype 2 [m.w: expected bf16, found f32, m.b: expected bf16, found f32]"), "{e}");
        let mut s = opt.state().unwrap();
        s.set("v.b", t(&[0.0; 4], &[4])).unwrap();
        let mut bad = ParamStore::new();
        for (n, t) in s.iter() {
            let t = if n == "v_col.w" { Tensor::zeros([32], DType::F32, Device::Cpu).unwrap() } else { t.clone() };
            bad.insert(n, t).unwrap();
        }
        let e = opt.load_state(&bad).unwrap_err().to_string();
        assert!(e.ends_with("misshaped 1 [v_col.w: expected [64], found [32]]"), "{e}");
        assert_eq!(opt.count(), 0);
    }

    #[test]
    fn bad_settings_are_named() {
        let p = store(&[("w", &[1.0], &[1])]);
        let check = |cfg: OptimizerConfig, want: &str| {
            let e = OptimizerChain::new(cfg, &p).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        };
        check(OptimizerConfig::new(sgd(None), -1.0), "lr = -1: expected a finite value >= 0");
        let mut c = OptimizerConfig::new(sgd(None), 1.0);
        c.grad_clip_norm = Some(0.0);
        check(c, "grad_clip_norm = 0: expected");
        let c = OptimizerConfig::new(
            Algorithm::FactoredAdam(FactoredAdamConfig { beta2_cap: 1.0, ..Default::default() }),
            1.0,
        );
        check(c, "factored_adam.beta2_cap = 1: expected a value in [0, 1)");
        let c = OptimizerConfig::new(Algorithm::AdamW(AdamWConfig { m_dtype: DType::I32, ..Default::default() }), 1.0);
        check(c, "adamw.m_dtype = i32: expected a float dtype");
        check(OptimizerConfig::new(sgd(Some(1.5)), 1.0), "sgd.momentum = 1.5");
        let mut c = OptimizerConfig::new(sgd(None), 1.0);
        c.groups = ParamGroups::none().freeze("(");
        check(c, "parameter group rule frozen[0] \"(\"");
        let mut ints = ParamStore::new();
        ints.insert("idx", Tensor::from_vec(vec![1i32], [1], Device::Cpu).unwrap()).unwrap();
        let e = OptimizerChain::new(OptimizerConfig::new(sgd(None), 1.0), &ints).unwrap_err().to_string();
        assert_eq!(e, "parameter idx: dtype i32: expected a float dtype (f32, bf16, f16)");
    }

    #[test]
    fn count_survives_beyond_32_bits() {
        let p = store(&[("w", &[1.0], &[1])]);
        let mut opt = OptimizerChain::new(OptimizerConfig::new(sgd(None), 1.0), &p).unwrap();
        let mut s = opt.state().unwrap();
        s.set(STATE_COUNT, count_tensor((7u64 << 32) + 5).unwrap()).unwrap();
        opt.load_state(&s).unwrap();
        assert_eq!(opt.count(), (7u64 << 32) + 5);
        assert_eq!(opt.state().unwrap().get(STATE_COUNT).unwrap().to_vec::<u32>().unwrap(), [5, 7]);
    }

    #[test]
    fn split_parameters_step_like_their_whole_with_factored_adam() {
        use crate::factored::tests::{on_ranks, take};
        // a [12, 8]: d0 = 0, cut along d0; b [8, 12]: d1 = 0, cut along d1; c [6] unfactored,
        // cut; r [8, 8] whole on every rank. f32 momentum, so the parts follow the whole
        // within f32 rounding.
        let shapes: [(&str, &[usize], Option<usize>); 4] =
            [("a", &[12, 8], Some(0)), ("b", &[8, 12], Some(0)), ("c", &[6], Some(0)), ("r", &[8, 8], None)];
        let randn = |dims: &[usize], seed| {
            Tensor::randn(dims.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap().to_f32_vec().unwrap()
        };
        let whole_params: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(k, s)| randn(s.1, k as u64)).collect();
        let grads: Vec<Vec<Vec<f32>>> = (0..3)
            .map(|step| shapes.iter().enumerate().map(|(k, s)| randn(s.1, 100 + 10 * step + k as u64)).collect())
            .collect();
        let mut cfg = OptimizerConfig::new(factored(DType::F32, 4), 0.1);
        cfg.weight_decay = 0.01;
        cfg.grad_clip_norm = Some(2.0);
        let build = |m: usize, n: usize| -> (ParamStore, HashMap<String, ParamShard>) {
            let (mut p, mut shards) = (ParamStore::new(), HashMap::new());
            for ((name, dims, cut), v) in shapes.iter().zip(&whole_params) {
                let (data, local) = match cut {
                    Some(axis) if n > 1 => {
                        let shard = ParamShard { full_dims: dims.to_vec(), axis: *axis, ranks: n };
                        let d = dims[*axis] / n;
                        let idx: Vec<usize> = (m * d..(m + 1) * d).collect();
                        let local = shard.local_dims();
                        shards.insert(name.to_string(), shard);
                        (take(v, dims, *axis, &idx), local)
                    }
                    _ => (v.clone(), dims.to_vec()),
                };
                p.insert(*name, t(&data, &local)).unwrap();
            }
            (p, shards)
        };
        let grad_store = |step: usize, m: usize, n: usize| {
            let mut g = ParamStore::new();
            for ((name, dims, cut), v) in shapes.iter().zip(&grads[step]) {
                let (data, local) = match cut {
                    Some(axis) if n > 1 => {
                        let d = dims[*axis] / n;
                        let idx: Vec<usize> = (m * d..(m + 1) * d).collect();
                        let mut local = dims.to_vec();
                        local[*axis] = d;
                        (take(v, dims, *axis, &idx), local)
                    }
                    _ => (v.clone(), dims.to_vec()),
                };
                g.insert(*name, t(&data, &local)).unwrap();
            }
            g
        };
        // The whole model on one rank.
        let (mut whole, _) = build(0, 1);
        let mut opt = OptimizerChain::new(cfg.clone(), &whole).unwrap();
        let mut whole_sq = Vec::new();
        for step in 0..3 {
            let g = grad_store(step, 0, 1);
            let info = opt.step(&mut whole, &g).unwrap();
            assert!(info.clipped, "step {step}: the test means to clip");
            whole_sq.push(info.grad_norm * info.grad_norm);
        }
        let whole_state = opt.state().unwrap();
        for n in [2usize, 3] {
            if shapes.iter().any(|(_, d, c)| c.is_some_and(|a| d[a] % n != 0)) {
                continue;
            }
            let parts = on_ranks(n, |m, sum| {
                let (mut p, shards) = build(m, n);
                let mut opt = OptimizerChain::with_shards(cfg.clone(), &p, &shards).unwrap();
                assert_eq!(opt.factored("a"), Some(FactoredDims { d0: 0, d1: 1 }));
                assert_eq!(opt.factored("b"), Some(FactoredDims { d0: 1, d1: 0 }));
                assert_eq!(opt.shard("a").map(|s| s.axis), Some(0));
                // Without the sum over ranks a split factored parameter cannot step.
                let e = opt.clone().step(&mut p.clone(), &grad_store(0, m, n)).unwrap_err().to_string();
                assert!(e.contains("parameter a") && e.contains("step_tensor_parallel"), "{e}");
                for (step, sq) in whole_sq.iter().enumerate() {
                    opt.step_tensor_parallel(&mut p, &grad_store(step, m, n), &mut |_| Ok(*sq), sum).unwrap();
                }
                (p, opt.state().unwrap())
            });
            for (m, (p, state)) in parts.iter().enumerate() {
                for ((name, dims, cut), _) in shapes.iter().zip(&whole_params) {
                    let want = values(&whole, name);
                    let want = match cut {
                        Some(axis) => {
                            let d = dims[*axis] / n;
                            take(&want, dims, *axis, &(m * d..(m + 1) * d).collect::<Vec<_>>())
                        }
                        None => want,
                    };
                    let got = values(p, name);
                    for (x, y) in got.iter().zip(&want) {
                        assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-2), "{name} on rank {m} of {n}: {x} vs {y}");
                    }
                }
                // a's rows are summed over the ranks: v_row whole on every rank; b's columns
                // are: v_col whole.
                for key in ["v_row.a", "v_col.b"] {
                    let (x, y) = (values(state, key), values(&whole_state, key));
                    assert_eq!(x.len(), y.len(), "{key}");
                    for (a, b) in x.iter().zip(&y) {
                        assert!((a - b).abs() <= 1e-6 * b.abs(), "{key} on rank {m} of {n}: {a} vs {b}");
                    }
                }
                assert_eq!(state.get("v_col.a").unwrap().dims(), [12 / n]);
                assert_eq!(state.get("v_row.b").unwrap().dims(), [8 / n]);
            }
        }
    }

    #[test]
    fn shard_layouts_that_do_not_fit_are_refused_naming_the_parameter() {
        let p = store(&[("w", &[0.0; 24], &[6, 4])]);
        let cfg = OptimizerConfig::new(factored(DType::F32, 2), 0.1);
        let try_with = |name: &str, shard: ParamShard| {
            let shards = HashMap::from([(name.to_string(), shard)]);
            OptimizerChain::with_shards(cfg.clone(), &p, &shards).unwrap_err().to_string()
        };
        let e = try_with("x", ParamShard { full_dims: vec![12, 4], axis: 0, ranks: 2 });
        assert!(e.contains("parameter x") && e.contains("not among the parameters"), "{e}");
        let e = try_with("w", ParamShard { full_dims: vec![12, 4], axis: 1, ranks: 2 });
        assert!(e.contains("parameter w") && e.contains("shape [6, 4]: expected [12, 2]"), "{e}");
        let e = try_with("w", ParamShard { full_dims: vec![12, 4], axis: 0, ranks: 5 });
        assert!(e.contains("parameter w") && e.contains("size 12") && e.contains("5 ranks"), "{e}");
        let shards = HashMap::from([("w".to_string(), ParamShard { full_dims: vec![12, 4], axis: 0, ranks: 2 })]);
        let opt = OptimizerChain::with_shards(cfg, &p, &shards).unwrap();
        // Factored over the whole [12, 4] (d0 = 0): v_row [4] whole, v_col [6] the part's rows.
        assert_eq!(opt.state().unwrap().get("v_row.w").unwrap().dims(), [4]);
        assert_eq!(opt.state().unwrap().get("v_col.w").unwrap().dims(), [6]);
    }
}
