//! Fused optimizer steps on CUDA (`kernels/optim.cu`): the device path of [`crate::OptimizerChain`],
//! launched through vit-tensor's custom-kernel API (`vit_tensor::cuda::kernel`).
//!
//! Each step function updates a whole list of parameters with one launch of one kernel
//! (multi-tensor: a table of per-parameter descriptors, see the kernel file's header), so a
//! model's hundreds of small biases and norms cost no more launches than one big matrix:
//!
//! - [`adamw_step`], [`sgd_step`], [`factored_adam_step`]: `θ ← θ − schedule·(lr·d + wd·θ)` with
//!   the direction `d` of the optimizer, the gradient clipped by `clip_scale`, the momentum read
//!   in its dtype and stored rounded to it (the direction uses the unrounded value). Factored
//!   Adam first runs three small kernels for the row and column statistics.
//! - [`sum_of_squares`]: `Σ g²` over many tensors for global-norm clipping, with one host read.
//! - [`copy`]: a plain device-to-device copy, the bandwidth reference of the optimizer bench.
//!
//! The math is exactly the CPU reference's (`vit_optim::OptimizerChain`, reference §3): the
//! kernels do the same f32 operations in the same order without FMA contraction, so the caller
//! passes the f32 coefficients it would use on the host ([`AdamWCoefficients`],
//! [`FactoredAdamCoefficients`]) and gets the same bits (the factored means can differ in the
//! last bit, rarely: both sum in f64, in different orders).
//!
//! Tensors are immutable: every function returns new tensors and leaves its inputs untouched.
//! The outputs of one call share a few flat allocations (one per role — parameters, momentum,
//! second moments — and dtype; each output is a view into it), so a step costs a handful of
//! allocations whatever the number of parameters; a flat buffer is freed when the last of its
//! views is dropped.
//!
//! The descriptor tables are `#[repr(C)]` `bytemuck::Pod` structs mirroring the kernel's
//! (`tables`), and the scalars of a launch ([`StepScalars`] and the coefficient structs) are
//! passed by value as the kernel's structs of the same names.

mod device_step;
mod tables;

pub use device_step::{
    device_step_ok, register_self_checks, step_in_place_dev, BadStep, CopyOut, StepStatus, StepStatusValues,
    DEVICE_STEP_KERNEL,
};

use bytemuck::{Pod, Zeroable};
use vit_tensor::cuda::kernel::{self, Arg, DeviceBuffer, KernelSource, Launch};
use vit_tensor::{DType, Device, Error, Result, Tensor};

/// The second moment of one parameter, as its optimizer keeps it.
#[derive(Debug, Clone, Copy)]
pub enum SecondMoment<'a> {
    /// None (SGD).
    None,
    /// A full f32 second moment of the parameter's shape (AdamW; unfactored factored Adam).
    Full(&'a Tensor),
    /// Factored Adam's row and column statistics (f32): `v_row` has the parameter's shape
    /// without axis `d0` (the largest), `v_col` without axis `d1` (the second largest), as
    /// `vit_optim::factored_dims` chooses them.
    Factored { v_row: &'a Tensor, v_col: &'a Tensor, d0: usize, d1: usize },
}

/// One parameter of a fused step: its tensors (all on one CUDA device; any float dtype for
/// the parameter, the gradient and the momentum) and its scalars.
#[derive(Debug, Clone, Copy)]
pub struct ParamStep<'a> {
    pub param: &'a Tensor,
    /// The gradient before clipping, of the parameter's shape.
    pub grad: &'a Tensor,
    /// The momentum (first moment), of the parameter's shape; `None` for none.
    pub m: Option<&'a Tensor>,
    pub second: SecondMoment<'a>,
    /// Learning rate times the parameter's multiplier (`lr` of `θ − schedule·(lr·d + wd·θ)`).
    pub lr: f32,
    /// Weight decay times the parameter's multiplier.
    pub wd: f32,
}

/// The new tensors of one parameter, in the dtypes and shapes of the old ones.
#[derive(Debug, Clone)]
pub struct ParamUpdate {
    pub param: Tensor,
    pub m: Option<Tensor>,
    /// The new second moment: empty (none), `[v]`, or `[v_row, v_col]`.
    pub v: Vec<Tensor>,
}

/// Scalars shared by every parameter of a step: `struct StepScalars` of `kernels/optim.cu`,
/// passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct StepScalars {
    /// The schedule's factor at this step.
    pub schedule: f32,
    /// Every gradient is multiplied by this first (`min(1, max_norm / ‖g‖)`; 1 for none).
    pub clip_scale: f32,
}

/// AdamW's f32 coefficients: `m = c1·g + b1·m`, `v = c2·(g·g) + b2·v`,
/// `d = (m / bc1) / (sqrt(v / bc2) + eps)`; with `k = t + 1`: `b1 = β1`, `c1 = 1 − β1`,
/// `b2 = β2`, `c2 = 1 − β2`, `bc1 = 1 − β1^k`, `bc2 = 1 − β2^k`, each rounded to f32 from f64.
/// `struct AdamWCoefficients` of `kernels/optim.cu`, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct AdamWCoefficients {
    pub b1: f32,
    pub c1: f32,
    pub b2: f32,
    pub c2: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
}

/// Factored Adam's f32 coefficients (big_vision `scale_by_adafactor`): `G2 = g·g + eps`;
/// statistics `v = beta2·v + one_minus_beta2·mean(G2)`; momentum
/// `m = one_minus_mu·u + mu·m` for parameters given one. `struct FactoredAdamCoefficients` of
/// `kernels/optim.cu`, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct FactoredAdamCoefficients {
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub mu: f32,
    pub one_minus_mu: f32,
}

const _: () = assert!(std::mem::size_of::<StepScalars>() == 8);
const _: () = assert!(std::mem::size_of::<AdamWCoefficients>() == 28);
const _: () = assert!(std::mem::size_of::<FactoredAdamCoefficients>() == 20);

/// SGD's coefficient: `struct SgdCoefficients` of `kernels/optim.cu` (`m = g + mu·m`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
struct SgdCoefficients {
    mu: f32,
}
const _: () = assert!(std::mem::size_of::<SgdCoefficients>() == 4);

/// `kernels/optim.cu`, compiled through vit-tensor's NVRTC cache (its `#include "common.cuh"`
/// resolved against vit-tensor's headers).
pub static OPTIM_SOURCE: KernelSource = KernelSource::new("optim.cu", include_str!("../../../../kernels/optim.cu"));

/// One AdamW step over `params` (each needs `m` and a [`SecondMoment::Full`]); see
/// [`AdamWCoefficients`] for the direction. One launch of `adamw_step`.
pub fn adamw_step(params: &[ParamStep<'_>], c: AdamWCoefficients, s: StepScalars) -> Result<Vec<ParamUpdate>> {
    fused_step(Kind::AdamW, params, Scalars::Host(s), Arg::pod(&c), None, Outputs::New)
}

/// One SGD step over `params` (no second moment): `d = m = g + mu·m` for parameters with a
/// momentum, `d = g` for the others. One launch of `sgd_step`.
pub fn sgd_step(params: &[ParamStep<'_>], mu: f32, s: StepScalars) -> Result<Vec<ParamUpdate>> {
    fused_step(Kind::Sgd, params, Scalars::Host(s), Arg::pod(&SgdCoefficients { mu }), None, Outputs::New)
}

/// One factored-Adam step over `params` (each with a full or factored second moment, and a
/// momentum or not). With any factored parameter, `factored_stats`, `factored_finalize` and
/// `factored_rowmean` run first (one launch each, over all factored parameters), then one
/// launch of `factored_adam_step`. A factored parameter must have fewer than 2³² elements.
pub fn factored_adam_step(
    params: &[ParamStep<'_>],
    c: FactoredAdamCoefficients,
    s: StepScalars,
) -> Result<Vec<ParamUpdate>> {
    fused_step(Kind::Factored, params, Scalars::Host(s), Arg::pod(&c), Some(c), Outputs::New)
}

/// Which optimizer an in-place step runs, with its coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepKind {
    AdamW(AdamWCoefficients),
    /// SGD's momentum `mu`.
    Sgd(f32),
    FactoredAdam(FactoredAdamCoefficients),
}

/// The step of [`adamw_step`], [`sgd_step`] or [`factored_adam_step`] written in place: every
/// parameter, momentum and second moment of `params` is overwritten by its new value, so when
/// the tensors are views into flat buffers (a `ParamStore`'s), the step is one launch over those
/// buffers (after factored Adam's three statistics launches) with no new allocation but the
/// small descriptor tables. The kernels allow it: each element is read, then written, by the
/// same thread.
///
/// # Safety
/// The parameters, momenta and second moments are written although they are borrowed shared:
/// the caller guarantees that no tensor which must keep its values shares their storage — e.g.
/// views of `ParamStore` buffers made unique with `Tensor::make_unique`, whose only other views
/// belong to the store itself. No two entries may overlap.
pub unsafe fn step_in_place(params: &[ParamStep<'_>], kind: StepKind, s: StepScalars) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { step_in_place_with(params, kind, Scalars::Host(s)) }
}

/// [`step_in_place`] with the scalars on the host or on the device.
///
/// # Safety
/// As for [`step_in_place`]; the compute copies of [`Scalars::Device`] also are written.
unsafe fn step_in_place_with(params: &[ParamStep<'_>], kind: StepKind, s: Scalars<'_>) -> Result<()> {
    let done = match kind {
        StepKind::AdamW(c) => fused_step(Kind::AdamW, params, s, Arg::pod(&c), None, Outputs::InPlace),
        StepKind::Sgd(mu) => {
            fused_step(Kind::Sgd, params, s, Arg::pod(&SgdCoefficients { mu }), None, Outputs::InPlace)
        }
        StepKind::FactoredAdam(c) => fused_step(Kind::Factored, params, s, Arg::pod(&c), Some(c), Outputs::InPlace),
    }?;
    debug_assert!(done.is_empty(), "an in-place step returns no new tensors");
    Ok(())
}

/// Where a step's clip factor comes from: the host (a by-value scalar), or the device-side
/// [`StepStatus`] (`*_dev` kernels, which also skip the step when the status says so, and write
/// the compute copies `copies`, one entry per parameter, in the order of the step's list).
#[derive(Clone, Copy)]
enum Scalars<'a> {
    Host(StepScalars),
    Device { schedule: f32, status: &'a DeviceBuffer, copies: &'a [tables::CopyDesc] },
}

/// Where a fused step writes: new flat tensors (returned), or over its inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outputs {
    New,
    InPlace,
}

/// `Σ x²` over every element of every tensor (float dtypes, one CUDA device), squares and sums
/// in f64 in a fixed order (deterministic; equal to a sequential f64 sum to ~1e-15 relative).
/// Two launches and one 8-byte read back (which waits for the stream). 0 for no elements.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    const OP: &str = "sum_of_squares";
    let Some(first) = tensors.first() else { return Ok(0.0) };
    let device = first.device();
    let descs = sq_descs(OP, tensors, device)?;
    let table = tables::sq_table(&descs);
    let blocks = table.blocks[0];
    if blocks == 0 {
        return Ok(0.0);
    }
    let dev_table = DeviceBuffer::upload(device, &table.bytes)?;
    // SAFETY: sum_squares writes partial[0..blocks], sum_squares_finalize writes out[0].
    let mut partial = unsafe { DeviceBuffer::uninit(device, blocks as usize * 8)? };
    let mut out = unsafe { DeviceBuffer::uninit(device, 8)? };
    let count = descs.len() as i32;
    let k = OPTIM_SOURCE.load("sum_squares", device)?;
    // SAFETY: the arguments are sum_squares's parameters (SqDesc table, starts, count, double*
    // partial of `blocks` entries); the descriptors point into the caller's live tensors with
    // their element counts, and block b writes partial[b] only.
    unsafe {
        k.launch(
            Launch::linear(blocks, tables::THREADS),
            &[
                Arg::buffer(&dev_table),
                Arg::buffer_at(&dev_table, table.starts[0]),
                Arg::i32(count),
                Arg::buffer_mut(&mut partial),
            ],
        )?
    };
    let k = OPTIM_SOURCE.load("sum_squares_finalize", device)?;
    // SAFETY: sum_squares_finalize(const double* partial, long long blocks, double* out) reads
    // `blocks` partials and writes out[0].
    unsafe {
        k.launch(
            Launch::linear(1, tables::FINALIZE_THREADS),
            &[Arg::buffer(&partial), Arg::i64(blocks as i64), Arg::buffer_mut(&mut out)],
        )?
    };
    Ok(out.to_vec::<f64>()?[0])
}

/// A copy of `x` in a fresh buffer on its device (`cuMemcpyDtoDAsync`): the device-to-device
/// bandwidth reference the optimizer bench compares the fused steps with.
pub fn copy(x: &Tensor) -> Result<Tensor> {
    kernel::copy(x)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AdamW,
    Sgd,
    Factored,
}

impl Kind {
    fn op(self) -> &'static str {
        match self {
            Kind::AdamW => "adamw_step",
            Kind::Sgd => "sgd_step",
            Kind::Factored => "factored_adam_step",
        }
    }
}

/// The sum-of-squares kernels' descriptors of `tensors` (float, all on CUDA `device`); the
/// caller's borrows keep the tensors alive while the kernels read them.
fn sq_descs(op: &'static str, tensors: &[&Tensor], device: Device) -> Result<Vec<tables::SqDesc>> {
    let mut descs = Vec::with_capacity(tensors.len());
    for t in tensors {
        same_device(op, t, device)?;
        float(op, t)?;
        let x = kernel::device_ptr(t)?;
        let size = t.dtype().size_in_bytes() as u64;
        let flags = if tables::aligned(&[(x, size)]) { tables::F_VEC } else { 0 };
        descs.push(tables::SqDesc { x, n: t.numel() as u64, dt: tables::dtype_code(t.dtype()), flags });
    }
    Ok(descs)
}

/// Checks that `t` is on `device`, the CUDA device of the call's first tensor (a host first
/// tensor is reported as expected on `cuda:0`).
fn same_device(op: &'static str, t: &Tensor, device: Device) -> Result<()> {
    let expected = if matches!(device, Device::Cuda(_)) { device } else { Device::Cuda(0) };
    if t.device() != expected {
        return Err(Error::Device { op, expected, got: t.device() });
    }
    Ok(())
}

fn float(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::DType { op, expected: "a float dtype (f32, bf16, f16)".into(), got: t.dtype() })
    }
}

fn f32_only(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() == DType::F32 {
        Ok(())
    } else {
        Err(Error::DType { op, expected: "f32 (second moments)".into(), got: t.dtype() })
    }
}

fn dims_without(dims: &[usize], axis: usize) -> Vec<usize> {
    dims.iter().enumerate().filter(|&(a, _)| a != axis).map(|(_, &d)| d).collect()
}

/// Checks every tensor of a step: devices, dtypes, shapes, and the state the optimizer needs.
fn validate(kind: Kind, params: &[ParamStep<'_>], device: Device) -> Result<()> {
    let op = kind.op();
    for (i, p) in params.iter().enumerate() {
        let dims = p.param.dims();
        let shaped = |what: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() == want {
                Ok(())
            } else {
                Err(Error::Shape {
                    op,
                    msg: format!("parameter {i}: {what} of shape {}: expected {want:?}", t.shape()),
                })
            }
        };
        same_device(op, p.param, device)?;
        same_device(op, p.grad, device)?;
        float(op, p.param)?;
        float(op, p.grad)?;
        shaped("gradient", p.grad, dims)?;
        if let Some(m) = p.m {
            same_device(op, m, device)?;
            float(op, m)?;
            shaped("momentum", m, dims)?;
        }
        let missing = |what: &str| Err(Error::Value { op, msg: format!("parameter {i}: {what}") });
        match (kind, p.second, p.m.is_some()) {
            (Kind::AdamW, _, false) => return missing("AdamW needs a momentum"),
            (Kind::AdamW, SecondMoment::Full(_), true) => {}
            (Kind::AdamW, _, true) => return missing("AdamW needs a full second moment"),
            (Kind::Sgd, SecondMoment::None, _) => {}
            (Kind::Sgd, _, _) => return missing("SGD keeps no second moment"),
            (Kind::Factored, SecondMoment::None, _) => return missing("factored Adam needs a second moment"),
            (Kind::Factored, _, _) => {}
        }
        match p.second {
            SecondMoment::None => {}
            SecondMoment::Full(v) => {
                same_device(op, v, device)?;
                f32_only(op, v)?;
                shaped("second moment", v, dims)?;
            }
            SecondMoment::Factored { v_row, v_col, d0, d1 } => {
                if d0 == d1 || d0 >= dims.len() || d1 >= dims.len() {
                    return Err(Error::Value {
                        op,
                        msg: format!("parameter {i}: factored axes d0 = {d0}, d1 = {d1} for shape {:?}", dims),
                    });
                }
                if p.param.numel() as u64 >= 1 << 32 {
                    return Err(Error::Value {
                        op,
                        msg: format!(
                            "parameter {i}: a factored parameter needs fewer than 2^32 elements, got {:?}",
                            dims
                        ),
                    });
                }
                for (what, t, axis) in [("v_row", v_row, d0), ("v_col", v_col, d1)] {
                    same_device(op, t, device)?;
                    f32_only(op, t)?;
                    shaped(what, t, &dims_without(dims, axis))?;
                }
            }
        }
    }
    Ok(())
}

/// Flat output buffers: one per (role, dtype), each tensor at an element offset.
#[derive(Default)]
struct Arenas {
    /// (role, dtype, elements so far).
    groups: Vec<(u8, DType, u64)>,
}

/// Where one output lives: (arena index, element offset).
type Slot = (usize, u64);

impl Arenas {
    fn push(&mut self, role: u8, dtype: DType, numel: usize) -> Slot {
        let i = match self.groups.iter().position(|&(r, d, _)| r == role && d == dtype) {
            Some(i) => i,
            None => {
                self.groups.push((role, dtype, 0));
                self.groups.len() - 1
            }
        };
        let at = tables::align_elems(self.groups[i].2);
        self.groups[i].2 = at + numel as u64;
        (i, at)
    }
}

/// The fused step of `kind` with its coefficients `coefficients` (a by-value struct argument);
/// `factored` carries factored Adam's coefficients for the statistics launches.
fn fused_step(
    kind: Kind,
    params: &[ParamStep<'_>],
    s: Scalars<'_>,
    coefficients: Arg<'_>,
    factored: Option<FactoredAdamCoefficients>,
    outputs: Outputs,
) -> Result<Vec<ParamUpdate>> {
    let op = kind.op();
    let Some(first) = params.first() else { return Ok(Vec::new()) };
    let device = first.param.device();
    validate(kind, params, device)?;

    // Output slots: 0 parameters, 1 momentum, 2 second moments (f32).
    let mut arenas = Arenas::default();
    let mut slots = Vec::with_capacity(params.len());
    for p in params.iter().filter(|_| outputs == Outputs::New) {
        let ps = arenas.push(0, p.param.dtype(), p.param.numel());
        let ms = p.m.map(|m| arenas.push(1, m.dtype(), m.numel()));
        let vs: Vec<Slot> = match p.second {
            SecondMoment::None => Vec::new(),
            SecondMoment::Full(v) => vec![arenas.push(2, DType::F32, v.numel())],
            SecondMoment::Factored { v_row, v_col, .. } => {
                vec![arenas.push(2, DType::F32, v_row.numel()), arenas.push(2, DType::F32, v_col.numel())]
            }
        };
        slots.push((ps, ms, vs));
    }
    // SAFETY: every element a view of these flat tensors covers is written by the step kernel
    // before it is read; padding between views is never read.
    let flats: Vec<Tensor> = arenas
        .groups
        .iter()
        .map(|&(_, d, n)| unsafe { kernel::empty([n as usize], d, device) })
        .collect::<Result<_>>()?;
    let bases: Vec<u64> = flats.iter().map(kernel::device_ptr).collect::<Result<_>>()?;
    let out_ptr = |(a, at): Slot| bases[a] + at * arenas.groups[a].1.size_in_bytes() as u64;
    // Per parameter: where its new parameter, momentum and second moments (v, or v_row and
    // v_col) go: the flat outputs, or the inputs themselves.
    let mut outs: Vec<(u64, u64, [u64; 2])> = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        outs.push(match outputs {
            Outputs::New => {
                let (ps, ms, vs) = &slots[i];
                let v: Vec<u64> = vs.iter().map(|&v| out_ptr(v)).collect();
                (out_ptr(*ps), ms.map_or(0, out_ptr), [v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0)])
            }
            Outputs::InPlace => {
                let v = match p.second {
                    SecondMoment::None => [0, 0],
                    SecondMoment::Full(v) => [kernel::device_ptr(v)?, 0],
                    SecondMoment::Factored { v_row, v_col, .. } => {
                        [kernel::device_ptr(v_row)?, kernel::device_ptr(v_col)?]
                    }
                };
                (kernel::device_ptr(p.param)?, p.m.map(kernel::device_ptr).transpose()?.unwrap_or(0), v)
            }
        });
    }

    // Input pointers: valid for the whole call, since the caller's borrows keep the tensors
    // (and their storage) alive; a later drop frees them in stream order, after the kernels.
    let ptr = kernel::device_ptr;

    // Factored parameters: geometry, scratch, statistics tables.
    let mut factored_params = Vec::new();
    let (mut part_len, mut factor_len) = (0u64, 0u64);
    for (i, p) in params.iter().enumerate() {
        if let SecondMoment::Factored { d0, d1, .. } = p.second {
            let geom = tables::Geometry::new(p.param.dims(), d0, d1);
            let part = (tables::align_elems(part_len), tables::align_elems(part_len) + geom.part_a_len());
            part_len = part.1 + geom.part_b_len();
            let rf = tables::align_elems(factor_len);
            let cf = tables::align_elems(rf + geom.vr_len());
            factor_len = cf + geom.vc_len();
            factored_params.push((i, geom, part, (rf, cf)));
        }
    }
    // SAFETY: factored_stats writes every partial sum factored_finalize reads; factored_finalize
    // and factored_rowmean write every factor the step reads.
    let scratch = |bytes: u64| unsafe { DeviceBuffer::uninit(device, bytes as usize) };
    let parts = if factored_params.is_empty() { None } else { Some(scratch(part_len * 8)?) };
    let factors = if factored_params.is_empty() { None } else { Some(scratch(factor_len * 4)?) };
    let part_base = parts.as_ref().map_or(0, DeviceBuffer::device_ptr);
    let factor_base = factors.as_ref().map_or(0, DeviceBuffer::device_ptr);
    let mut rf_cf = vec![(0u64, 0u64); params.len()];
    let mut fdescs = Vec::with_capacity(factored_params.len());
    for &(i, geom, (pa, pb), (rf, cf)) in &factored_params {
        let p = &params[i];
        let SecondMoment::Factored { v_row, v_col, .. } = p.second else { unreachable!("factored slot") };
        let g = ptr(p.grad)?;
        let v_out = outs[i].2;
        rf_cf[i] = (factor_base + rf * 4, factor_base + cf * 4);
        let gsize = p.grad.dtype().size_in_bytes() as u64;
        let ptrs = [
            g,
            ptr(v_row)?,
            ptr(v_col)?,
            v_out[0],
            v_out[1],
            rf_cf[i].0,
            rf_cf[i].1,
            part_base + pa * 8,
            part_base + pb * 8,
        ];
        let flags = if tables::aligned(&[(g, gsize)]) { tables::F_VEC } else { 0 };
        fdescs.push(tables::FactoredDesc::new(ptrs, geom, tables::dtype_code(p.grad.dtype()), flags));
    }

    // The step table.
    let mut descs = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        let (pp, gp) = (ptr(p.param)?, ptr(p.grad)?);
        let mp = p.m.map(ptr).transpose()?.unwrap_or(0);
        let (vp, geom) = match p.second {
            SecondMoment::Full(v) => (ptr(v)?, None),
            SecondMoment::Factored { d0, d1, .. } => (0, Some(tables::Geometry::new(p.param.dims(), d0, d1))),
            SecondMoment::None => (0, None),
        };
        let (p_out, m_out) = (outs[i].0, outs[i].1);
        let v_out = if vp != 0 { outs[i].2[0] } else { 0 };
        let (psz, gsz) = (p.param.dtype().size_in_bytes() as u64, p.grad.dtype().size_in_bytes() as u64);
        let msz = p.m.map_or(4, |m| m.dtype().size_in_bytes() as u64);
        let vec = tables::aligned(&[(pp, psz), (gp, gsz), (mp, msz), (vp, 4), (p_out, psz), (m_out, msz), (v_out, 4)]);
        let mut flags = if vec { tables::F_VEC } else { 0 };
        if p.m.is_some() {
            flags |= tables::F_HAS_M;
        }
        if let Some(g) = geom {
            flags |= tables::F_FACTORED;
            if g.d0_is_a {
                flags |= tables::F_D0_IS_A;
            }
        }
        let (a, q, c, r) =
            geom.unwrap_or(tables::Geometry { p: 1, a: 1, q: 1, b: 1, r: 1, d0_is_a: false }).step_fields();
        descs.push(tables::StepDesc {
            p: pp,
            g: gp,
            m: mp,
            v: vp,
            p_out,
            m_out,
            v_out,
            rf: rf_cf[i].0,
            cf: rf_cf[i].1,
            n: p.param.numel() as u64,
            a,
            q,
            c,
            r,
            lr: p.lr,
            wd: p.wd,
            p_dt: tables::dtype_code(p.param.dtype()),
            g_dt: tables::dtype_code(p.grad.dtype()),
            m_dt: p.m.map_or(0, |m| tables::dtype_code(m.dtype())),
            flags,
        });
    }

    // Launches: the factored statistics, then the step. SAFETY (every launch below): the
    // arguments are the kernel's parameters in kernels/optim.cu (descriptor table, its starts,
    // count, then by-value scalars and coefficient structs); the descriptors hold pointers into
    // live memory — inputs borrowed for this call, the flat outputs and scratch owned by it (not
    // shared before the kernels have written them), all freed in stream order after the
    // launches — with the sizes the descriptors state, and every index the kernels form stays
    // within those sizes.
    if let Some(c) = factored.filter(|_| !fdescs.is_empty()) {
        let t = tables::factored_table(&fdescs);
        let dev = DeviceBuffer::upload(device, &t.bytes)?;
        let count = fdescs.len() as i32;
        let launches = match s {
            Scalars::Host(s) => [
                ("factored_stats", vec![Arg::f32(s.clip_scale), Arg::f32(c.eps)]),
                ("factored_finalize", vec![Arg::f32(c.beta2), Arg::f32(c.one_minus_beta2)]),
                ("factored_rowmean", vec![]),
            ],
            Scalars::Device { status, .. } => [
                ("factored_stats_dev", vec![Arg::buffer(status), Arg::f32(c.eps)]),
                ("factored_finalize_dev", vec![Arg::buffer(status), Arg::f32(c.beta2), Arg::f32(c.one_minus_beta2)]),
                ("factored_rowmean", vec![]),
            ],
        };
        for (k, (name, scalars)) in launches.into_iter().enumerate() {
            if t.blocks[k] == 0 {
                continue;
            }
            let kernel = OPTIM_SOURCE.load(name, device)?;
            let mut args = vec![Arg::buffer(&dev), Arg::buffer_at(&dev, t.starts_range(k).start), Arg::i32(count)];
            args.extend(scalars);
            unsafe { kernel.launch(Launch::linear(t.blocks[k], tables::THREADS), &args)? };
        }
    }
    let t = tables::step_table(&descs);
    if t.blocks[0] > 0 {
        let dev = DeviceBuffer::upload(device, &t.bytes)?;
        let count = descs.len() as i32;
        match s {
            Scalars::Host(s) => {
                let kernel = OPTIM_SOURCE.load(op, device)?;
                let args =
                    [Arg::buffer(&dev), Arg::buffer_at(&dev, t.starts[0]), Arg::i32(count), Arg::pod(&s), coefficients];
                unsafe { kernel.launch(Launch::linear(t.blocks[0], tables::THREADS), &args)? };
            }
            Scalars::Device { schedule, status, copies } => {
                if copies.len() != descs.len() {
                    return Err(Error::Value {
                        op,
                        msg: format!("{} compute-copy entries for {} parameters", copies.len(), descs.len()),
                    });
                }
                let copy_table = DeviceBuffer::upload(device, copies)?;
                let kernel = OPTIM_SOURCE.load(&format!("{op}_dev"), device)?;
                let args = [
                    Arg::buffer(&dev),
                    Arg::buffer_at(&dev, t.starts[0]),
                    Arg::i32(count),
                    Arg::buffer(&copy_table),
                    Arg::buffer(status),
                    Arg::f32(schedule),
                    coefficients,
                ];
                unsafe { kernel.launch(Launch::linear(t.blocks[0], tables::THREADS), &args)? };
            }
        }
    }

    if outputs == Outputs::InPlace {
        return Ok(Vec::new());
    }
    // Cut the outputs out of the flat buffers.
    let cut = |(a, at): Slot, like: &Tensor| -> Result<Tensor> {
        flats[a].narrow(at as usize, like.numel())?.reshape(like.shape().clone())
    };
    let mut out = Vec::with_capacity(params.len());
    for (p, (ps, ms, vs)) in params.iter().zip(slots) {
        let v = match p.second {
            SecondMoment::None => Vec::new(),
            SecondMoment::Full(v) => vec![cut(vs[0], v)?],
            SecondMoment::Factored { v_row, v_col, .. } => vec![cut(vs[0], v_row)?, cut(vs[1], v_col)?],
        };
        out.push(ParamUpdate { param: cut(ps, p.param)?, m: p.m.zip(ms).map(|(m, s)| cut(s, m)).transpose()?, v });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_tensor::{DType, Device, Error, Tensor};

    #[test]
    fn host_tensors_are_refused_without_touching_cuda() {
        let t = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
        let e = sum_of_squares(&[&t]).unwrap_err();
        assert!(
            matches!(e, Error::Device { op: "sum_of_squares", expected: Device::Cuda(0), got: Device::Cpu }),
            "{e}"
        );
        let p = ParamStep { param: &t, grad: &t, m: Some(&t), second: SecondMoment::Full(&t), lr: 0.1, wd: 0.0 };
        let c = AdamWCoefficients { b1: 0.9, c1: 0.1, b2: 0.999, c2: 0.001, bc1: 0.1, bc2: 0.001, eps: 1e-8 };
        let s = StepScalars { schedule: 1.0, clip_scale: 1.0 };
        assert!(matches!(adamw_step(&[p], c, s), Err(Error::Device { op: "adamw_step", .. })));
        assert!(matches!(sgd_step(&[p], 0.9, s), Err(Error::Device { op: "sgd_step", .. })));
        assert!(matches!(copy(&t), Err(Error::Device { op: "copy", .. })));
        assert!(adamw_step(&[], c, s).unwrap().is_empty());
        assert_eq!(sum_of_squares(&[]).unwrap(), 0.0);
    }

    #[test]
    fn scalars_and_coefficients_have_the_kernel_layout() {
        // Field order of the kernel's by-value structs: named floats, in this order.
        let c = AdamWCoefficients { b1: 1.0, c1: 2.0, b2: 3.0, c2: 4.0, bc1: 5.0, bc2: 6.0, eps: 7.0 };
        assert_eq!(bytemuck::cast::<_, [f32; 7]>(c), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        let f = FactoredAdamCoefficients { beta2: 1.0, one_minus_beta2: 2.0, eps: 3.0, mu: 4.0, one_minus_mu: 5.0 };
        assert_eq!(bytemuck::cast::<_, [f32; 5]>(f), [1.0, 2.0, 3.0, 4.0, 5.0]);
        let s = StepScalars { schedule: 0.5, clip_scale: 0.25 };
        assert_eq!(bytemuck::cast::<_, [f32; 2]>(s), [0.5, 0.25]);
        assert_eq!(bytemuck::cast::<_, f32>(SgdCoefficients { mu: 0.9 }), 0.9);
    }

    #[test]
    fn the_kernel_declares_the_structs_the_host_passes() {
        // The by-value structs and their sizes, as the kernel file declares and asserts them.
        let code = OPTIM_SOURCE.code();
        for (name, size) in [
            ("StepScalars", 8),
            ("AdamWCoefficients", 28),
            ("SgdCoefficients", 4),
            ("FactoredAdamCoefficients", 20),
            ("StepDesc", 136),
            ("FactoredDesc", 152),
            ("SqDesc", 24),
        ] {
            assert!(code.contains(&format!("struct {name} {{")), "kernels/optim.cu declares no struct {name}");
            let assert = format!("static_assert(sizeof({name}) == {size}");
            assert!(code.contains(&assert), "kernels/optim.cu lacks `{assert}`");
        }
    }
}
