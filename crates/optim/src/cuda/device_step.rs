//! A fused optimizer step with no host round trip (issue 14 item 6): the gradients' global norm,
//! the clip factor, the loss and the non-finite check stay on the device in a [`StepStatus`],
//! which the host reads only when it needs the numbers (log steps, checkpoints, the end).
//!
//! Per step ([`step_in_place_dev`]):
//!
//! 1. `sum_squares_dev`: `Σ g²` per 4096-element block (as `sum_squares`), and the first tensor
//!    holding a non-finite value is noted while no earlier step was bad;
//! 2. `step_status_finalize`: folds the partials exactly as `sum_squares_finalize` does (the same
//!    bits), then in f64, as the host path does, `norm = sqrt(Σ)` and
//!    `clip_scale = min(1, max_norm / norm)` (1 when clipping is off or `norm ≤ max_norm`),
//!    moves the micro-batch losses summed so far ([`StepStatus::add_loss`]) to `loss`, and marks
//!    a step whose norm or loss is not finite as the first bad one (sticky);
//! 3. the `*_dev` step kernels read `clip_scale` from the status and return at once once a step
//!    was bad, so the parameters, moments and factored statistics keep the values from before
//!    that step — and every later step is skipped too, until the host reads the status and
//!    stops the run; they also write the new parameters rounded to the compute dtype
//!    ([`CopyOut`]) so the next forward needs no cast.
//!
//! The arithmetic is the host-scalar path's (`super::step_in_place` after `super::sum_of_squares`
//! and the host's clip factor), so the two give the same bits; [`device_step_ok`] checks that on
//! the device before first use ([`DEVICE_STEP_KERNEL`] in `vit devices`,
//! `VITRS_FAST_KERNELS_OFF=device_step` turns it off) and callers fall back to the host path
//! when it fails. [`StepStatusValues`] also holds the CPU reference of the status updates
//! (`add_loss`, `note_bad_tensor`, `finalize`), which the CPU tests and the check use.

use super::{tables, ParamStep, Scalars, SecondMoment, StepKind, StepScalars, OPTIM_SOURCE};
use bytemuck::{Pod, Zeroable};
use vit_tensor::cuda::kernel::{self, Arg, DeviceBuffer, Launch};
use vit_tensor::{DType, Device, Error, Result, Tensor};

/// The self-check name of the device-side step (`vit devices`, `VITRS_FAST_KERNELS_OFF`).
pub const DEVICE_STEP_KERNEL: &str = "device_step";

/// Where a device-side step writes a parameter's compute copy: a tensor of the parameter's
/// shape on its device (bf16, f16 or f32; overwritten, so it must not share storage with any
/// tensor that must keep its values), or `None` for no copy.
pub type CopyOut<'a> = Option<&'a Tensor>;

/// The values of a [`StepStatus`]: `struct StepStatus` of `kernels/optim.cu` (80 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct StepStatusValues {
    /// The sum of the micro-batch loss sums added since the last finalized step.
    pub loss_acc: f64,
    /// The last finalized step's loss sum (the sum of per-example losses over its micro-batches).
    pub loss: f64,
    /// The last finalized step's `Σ g²` over the trainable gradients (before clipping).
    pub sum_sq: f64,
    /// `sqrt(sum_sq)`: the global gradient norm.
    pub norm: f64,
    /// The first bad step's loss sum.
    pub bad_loss: f64,
    /// The first bad step's gradient norm.
    pub bad_norm: f64,
    /// Steps finalized: the optimizer count `t` of the last one plus 1 (0 before the first).
    pub steps: i64,
    /// The first step `t` (optimizer count before it) whose norm or loss was not finite; -1 for none.
    pub first_bad: i64,
    /// The last finalized step's clip factor (1 without clipping).
    pub clip_scale: f32,
    /// 1 once a step was bad: every later step kernel leaves everything untouched.
    pub skip: i32,
    /// The first bad step's first tensor (in the step's order) holding a non-finite gradient
    /// value; `i32::MAX` when none was found (a finite gradient with a non-finite loss).
    pub bad_tensor: i32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<StepStatusValues>() == 80);

/// The first step whose gradient norm or loss was not finite, as a [`StepStatus`] kept it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BadStep {
    /// The optimizer count before that step (0 for the first step).
    pub step: u64,
    /// Its loss sum (over the micro-batches' examples).
    pub loss_sum: f64,
    /// Its global gradient norm.
    pub norm: f64,
    /// The position (in the step's parameter order) of the first gradient with a non-finite value.
    pub tensor: Option<usize>,
}

impl Default for StepStatusValues {
    fn default() -> Self {
        Self::initial()
    }
}

impl StepStatusValues {
    /// A fresh status: nothing finalized, no bad step, clip factor 1.
    pub const fn initial() -> Self {
        StepStatusValues {
            loss_acc: 0.0,
            loss: 0.0,
            sum_sq: 0.0,
            norm: 0.0,
            bad_loss: 0.0,
            bad_norm: 0.0,
            steps: 0,
            first_bad: -1,
            clip_scale: 1.0,
            skip: 0,
            bad_tensor: i32::MAX,
            pad: 0,
        }
    }

    /// CPU reference of `loss_accumulate`: adds one micro-batch's loss sum (f32) in f64.
    pub fn add_loss(&mut self, loss_sum: f32) {
        self.loss_acc += loss_sum as f64;
    }

    /// CPU reference of `sum_squares_dev`'s record: tensor `index` (in the step's order) has the
    /// sum of squares `sum_sq`; a non-finite one is noted (the lowest index) while no earlier step
    /// was bad.
    pub fn note_bad_tensor(&mut self, index: usize, sum_sq: f64) {
        if !sum_sq.is_finite() && self.first_bad < 0 {
            self.bad_tensor = self.bad_tensor.min(index as i32);
        }
    }

    /// CPU reference of `step_status_finalize` for step `t` with the gradients' `Σ g²` and the
    /// clipping threshold (`None`: no clipping).
    pub fn finalize(&mut self, sum_sq: f64, max_norm: Option<f64>, t: u64) {
        let norm = sum_sq.sqrt();
        let loss = self.loss_acc;
        self.loss = loss;
        self.loss_acc = 0.0;
        self.sum_sq = sum_sq;
        self.norm = norm;
        self.steps = t as i64 + 1;
        if (!norm.is_finite() || !loss.is_finite()) && self.first_bad < 0 {
            self.first_bad = t as i64;
            self.bad_loss = loss;
            self.bad_norm = norm;
        }
        self.skip = i32::from(self.first_bad >= 0);
        self.clip_scale = match max_norm {
            Some(c) if norm > c => (c / norm) as f32,
            _ => 1.0,
        };
    }

    /// The first bad step, if any.
    pub fn first_bad(&self) -> Option<BadStep> {
        (self.first_bad >= 0).then(|| BadStep {
            step: self.first_bad as u64,
            loss_sum: self.bad_loss,
            norm: self.bad_norm,
            tensor: (self.bad_tensor != i32::MAX && self.bad_tensor >= 0).then_some(self.bad_tensor as usize),
        })
    }

    /// Whether the last finalized step was clipped by `max_norm`.
    pub fn clipped(&self, max_norm: Option<f64>) -> bool {
        max_norm.is_some_and(|c| self.norm > c)
    }
}

/// The device-side status of a run's steps (one small buffer on a CUDA device, kept for the
/// whole run): see the module docs. Reading it ([`StepStatus::read`]) is the only host round
/// trip of a step, and is needed only when the host uses the numbers.
#[derive(Debug)]
pub struct StepStatus {
    buf: DeviceBuffer,
}

impl StepStatus {
    /// A fresh status on CUDA `device` ([`StepStatusValues::initial`]).
    pub fn new(device: Device) -> Result<Self> {
        Ok(StepStatus { buf: DeviceBuffer::upload(device, &[StepStatusValues::initial()])? })
    }

    /// The device it lives on.
    pub fn device(&self) -> Device {
        self.buf.device()
    }

    /// Adds one micro-batch's loss sum, a one-element f32 tensor on the status's device (e.g.
    /// `ops::sum_all` of the per-example losses), to the step in progress, in f64 on the device
    /// (the host path's `Σ (x as f64)` in the same order: the same bits). One tiny launch, no read.
    pub fn add_loss(&mut self, loss_sum: &Tensor) -> Result<()> {
        const OP: &str = "StepStatus::add_loss";
        if loss_sum.device() != self.device() {
            return Err(Error::Device { op: OP, expected: self.device(), got: loss_sum.device() });
        }
        if loss_sum.dtype() != DType::F32 || loss_sum.numel() != 1 {
            return Err(Error::Value {
                op: OP,
                msg: format!(
                    "a loss sum of dtype {} and shape {}: expected one f32 element",
                    loss_sum.dtype(),
                    loss_sum.shape()
                ),
            });
        }
        let k = OPTIM_SOURCE.load("loss_accumulate", self.device())?;
        // SAFETY: loss_accumulate(const float* x, StepStatus* st) reads x[0] of the live tensor
        // and updates the status buffer (80 bytes) this call borrows mutably.
        unsafe { k.launch(Launch::linear(1, 32), &[Arg::tensor(loss_sum), Arg::buffer_mut(&mut self.buf)]) }
    }

    /// The status, read to the host (one device-to-host copy, which waits for the stream).
    pub fn read(&self) -> Result<StepStatusValues> {
        Ok(self.buf.to_vec::<StepStatusValues>()?[0])
    }

    fn buffer(&self) -> &DeviceBuffer {
        &self.buf
    }
}

/// The step of [`super::step_in_place`] with the global norm, clip factor and non-finite check
/// on the device: `Σ g²` of `params`' gradients into `status`, the status finalized for step `t`
/// with clipping at `max_norm` (`None`: none), then the in-place step with the clip factor read
/// from the status — skipped (nothing written) when this step or an earlier one was bad — and
/// the new parameters also written rounded into `copies` (one entry per parameter). No host
/// read; the small descriptor tables are uploaded as in the host path.
///
/// # Safety
/// As for [`super::step_in_place`]; the tensors of `copies` are written too, so none may share
/// storage with a tensor that must keep its values, nor overlap another output.
pub unsafe fn step_in_place_dev(
    params: &[ParamStep<'_>],
    kind: StepKind,
    schedule: f32,
    max_norm: Option<f64>,
    t: u64,
    status: &mut StepStatus,
    copies: &[CopyOut<'_>],
) -> Result<()> {
    const OP: &str = "step_in_place_dev";
    let device = status.device();
    if copies.len() != params.len() {
        return Err(Error::Value {
            op: OP,
            msg: format!("{} compute copies for {} parameters: expected one entry each", copies.len(), params.len()),
        });
    }
    let mut copy_descs = Vec::with_capacity(copies.len());
    for (i, (c, p)) in copies.iter().zip(params).enumerate() {
        copy_descs.push(match c {
            None => tables::CopyDesc { out: 0, dt: 0, pad: 0 },
            Some(c) => {
                if c.device() != device {
                    return Err(Error::Device { op: OP, expected: device, got: c.device() });
                }
                if !c.dtype().is_float() || c.dims() != p.param.dims() {
                    return Err(Error::Value {
                        op: OP,
                        msg: format!(
                            "parameter {i}: a compute copy {} {:?}: expected a float tensor of shape {:?}",
                            c.dtype(),
                            c.dims(),
                            p.param.dims()
                        ),
                    });
                }
                tables::CopyDesc { out: kernel::device_ptr(c)?, dt: tables::dtype_code(c.dtype()), pad: 0 }
            }
        });
    }
    // Σ g² into partials (noting the first non-finite tensor), then the status.
    let grads: Vec<&Tensor> = params.iter().map(|p| p.grad).collect();
    let descs = super::sq_descs(OP, &grads, device)?;
    let table = tables::sq_table(&descs);
    let blocks = table.blocks[0];
    // SAFETY: sum_squares_dev writes partial[0..blocks] before step_status_finalize reads them.
    let mut partial = unsafe { DeviceBuffer::uninit(device, (blocks as usize).max(1) * 8)? };
    if blocks > 0 {
        let dev_table = DeviceBuffer::upload(device, &table.bytes)?;
        let k = OPTIM_SOURCE.load("sum_squares_dev", device)?;
        // SAFETY: sum_squares_dev(SqDesc table, starts, count, double* partial, StepStatus* st):
        // the descriptors point into the live gradients with their element counts; block b
        // writes partial[b] only and may atomicMin st->bad_tensor.
        unsafe {
            k.launch(
                Launch::linear(blocks, tables::THREADS),
                &[
                    Arg::buffer(&dev_table),
                    Arg::buffer_at(&dev_table, table.starts[0]),
                    Arg::i32(descs.len() as i32),
                    Arg::buffer_mut(&mut partial),
                    Arg::buffer_mut(&mut status.buf),
                ],
            )?
        };
    }
    let k = OPTIM_SOURCE.load("step_status_finalize", device)?;
    // SAFETY: step_status_finalize(const double* partial, long long blocks, StepStatus* st,
    // double max_norm, int clip_on, long long t) reads `blocks` partials and writes the status.
    unsafe {
        k.launch(
            Launch::linear(1, tables::FINALIZE_THREADS),
            &[
                Arg::buffer(&partial),
                Arg::i64(blocks as i64),
                Arg::buffer_mut(&mut status.buf),
                Arg::pod(&max_norm.unwrap_or(0.0)),
                Arg::i32(i32::from(max_norm.is_some())),
                Arg::i64(t as i64),
            ],
        )?
    };
    let scalars = Scalars::Device { schedule, status: status.buffer(), copies: &copy_descs };
    // SAFETY: the caller's contract (copies included).
    unsafe { super::step_in_place_with(params, kind, scalars) }
}

/// Whether the device-side step may be used on `device`: on first use, runs a small problem
/// (AdamW, SGD with momentum and factored Adam, each clipped and not, f32 and bf16 tensors, a
/// bf16 compute copy) through [`step_in_place_dev`] and through the host-scalar path
/// ([`super::sum_of_squares`], the host's clip factor, [`super::step_in_place`]) and requires
/// equal bits everywhere (and the compute copy equal to the parameter's bf16 cast); then a NaN
/// gradient must leave everything untouched and be reported with its step. Prints one warning
/// and returns `false` on any difference or error; `false` on the CPU.
pub fn device_step_ok(device: Device) -> bool {
    kernel::fast_kernel_ok(device, DEVICE_STEP_KERNEL, 0.0, || check(device))
}

/// Registers [`device_step_ok`] with `vit_tensor::cuda::self_check::check_all` (what
/// `vit devices` runs).
pub fn register_self_checks() {
    vit_tensor::cuda::self_check::register_check(|ordinal| device_step_ok(Device::Cuda(ordinal)));
}

/// A deterministic pseudo-random vector (uniform in [-1, 1), or in [0.01, 1) when `positive`).
fn values(n: usize, seed: u64, positive: bool) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            if positive {
                0.01 + 0.99 * u
            } else {
                2.0 * u - 1.0
            }
        })
        .collect()
}

/// One parameter's tensors of the check problem.
struct CheckParam {
    param: Tensor,
    grad: Tensor,
    m: Option<Tensor>,
    v: Vec<Tensor>,
    factored: Option<(usize, usize)>,
}

impl CheckParam {
    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.param];
        out.extend(self.m.as_ref());
        out.extend(self.v.iter());
        out
    }

    fn step(&self, lr: f32, wd: f32) -> ParamStep<'_> {
        let second = match (self.v.as_slice(), self.factored) {
            ([], _) => SecondMoment::None,
            ([v], _) => SecondMoment::Full(v),
            ([v_row, v_col], Some((d0, d1))) => SecondMoment::Factored { v_row, v_col, d0, d1 },
            _ => unreachable!("check problem layout"),
        };
        ParamStep { param: &self.param, grad: &self.grad, m: self.m.as_ref(), second, lr, wd }
    }
}

/// The check problem for `kind` (same values for every call with the same seed), on `device`;
/// `nan` puts a NaN into the second parameter's gradient.
fn problem(kind: StepKind, device: Device, seed: u64, nan: bool) -> Result<Vec<CheckParam>> {
    let dev = |v: Vec<f32>, dims: &[usize], dtype: DType| -> Result<Tensor> {
        Tensor::from_f32(v, dims.to_vec(), dtype, Device::Cpu)?.to_device(device)
    };
    let m_dtype = if matches!(kind, StepKind::AdamW(_)) { DType::F32 } else { DType::BF16 };
    let shapes: [&[usize]; 3] = [&[37], &[24, 40], &[6, 5, 8]];
    let mut out = Vec::new();
    for (i, dims) in shapes.iter().enumerate() {
        let n: usize = dims.iter().product();
        let s = seed + 10 * i as u64;
        let mut g = values(n, s + 1, false);
        if nan && i == 1 {
            g[7] = f32::NAN;
        }
        let factored = matches!(kind, StepKind::FactoredAdam(_)) && dims.len() >= 2;
        let (factored, v) = match kind {
            StepKind::Sgd(_) => (None, Vec::new()),
            _ if factored => {
                // d0 the largest axis, d1 the second largest (vit_optim::factored_dims).
                let mut axes: Vec<usize> = (0..dims.len()).collect();
                axes.sort_by_key(|&a| std::cmp::Reverse(dims[a]));
                let (d0, d1) = (axes[0], axes[1]);
                let without = |a: usize| -> Vec<usize> {
                    dims.iter().enumerate().filter(|&(j, _)| j != a).map(|(_, &d)| d).collect()
                };
                let (r, c) = (without(d0), without(d1));
                let vr = dev(values(r.iter().product(), s + 3, true), &r, DType::F32)?;
                let vc = dev(values(c.iter().product(), s + 4, true), &c, DType::F32)?;
                (Some((d0, d1)), vec![vr, vc])
            }
            _ => (None, vec![dev(values(n, s + 3, true), dims, DType::F32)?]),
        };
        // The f32 bias-like parameter has no momentum under SGD (both kinds run).
        let m = (!(matches!(kind, StepKind::Sgd(_)) && i == 0))
            .then(|| dev(values(n, s + 2, false), dims, m_dtype))
            .transpose()?;
        let p_dtype = if i == 2 { DType::BF16 } else { DType::F32 };
        out.push(CheckParam {
            param: dev(values(n, s, false), dims, p_dtype)?,
            grad: dev(g, dims, if i == 2 { DType::BF16 } else { DType::F32 })?,
            m,
            v,
            factored,
        });
    }
    Ok(out)
}

fn bits(t: &Tensor) -> Result<Vec<u8>> {
    t.to_bytes()
}

/// The check of [`device_step_ok`]: 0 when every bit agrees, else infinity.
fn check(device: Device) -> Result<f64> {
    let kinds = [
        StepKind::AdamW(super::AdamWCoefficients {
            b1: 0.9,
            c1: 0.1,
            b2: 0.999,
            c2: 0.001,
            bc1: 0.271,
            bc2: 0.002_997,
            eps: 1e-8,
        }),
        StepKind::Sgd(0.9),
        StepKind::FactoredAdam(super::FactoredAdamCoefficients {
            beta2: 0.8,
            one_minus_beta2: 0.2,
            eps: 1e-30,
            mu: 0.9,
            one_minus_mu: 0.1,
        }),
    ];
    let mut mismatches = 0usize;
    for (k, kind) in kinds.into_iter().enumerate() {
        for (c, max_norm) in [Some(0.5), None].into_iter().enumerate() {
            let seed = 1000 + 100 * k as u64 + 10 * c as u64;
            let (t, schedule, lr, wd) = (3u64, 0.75f32, 0.01f32, 0.001f32);
            // The host-scalar path.
            let reference = problem(kind, device, seed, false)?;
            let grads: Vec<&Tensor> = reference.iter().map(|p| &p.grad).collect();
            let norm = super::sum_of_squares(&grads)?.sqrt();
            let clip_scale = match max_norm {
                Some(c) if norm > c => (c / norm) as f32,
                _ => 1.0,
            };
            let steps: Vec<ParamStep<'_>> = reference.iter().map(|p| p.step(lr, wd)).collect();
            // SAFETY: every tensor of the problem is fresh and unshared.
            unsafe { super::step_in_place(&steps, kind, StepScalars { schedule, clip_scale })? };
            // The device path, with a bf16 compute copy of every parameter.
            let fast = problem(kind, device, seed, false)?;
            let copies: Vec<Tensor> = fast
                .iter()
                .map(|p| Tensor::zeros(p.param.shape().clone(), DType::BF16, device))
                .collect::<Result<_>>()?;
            let mut status = StepStatus::new(device)?;
            let loss = Tensor::from_f32(vec![2.5], [1], DType::F32, Device::Cpu)?.to_device(device)?;
            status.add_loss(&loss)?;
            let steps: Vec<ParamStep<'_>> = fast.iter().map(|p| p.step(lr, wd)).collect();
            let outs: Vec<CopyOut<'_>> = copies.iter().map(Some).collect();
            // SAFETY: as above; the copies are fresh too.
            unsafe { step_in_place_dev(&steps, kind, schedule, max_norm, t, &mut status, &outs)? };
            for (r, f) in reference.iter().zip(&fast) {
                for (a, b) in r.tensors().into_iter().zip(f.tensors()) {
                    mismatches += usize::from(bits(a)? != bits(b)?);
                }
            }
            for (f, copy) in fast.iter().zip(&copies) {
                mismatches += usize::from(bits(&f.param.cast(DType::BF16)?)? != bits(copy)?);
            }
            let s = status.read()?;
            let mut want = StepStatusValues::initial();
            want.add_loss(2.5);
            want.finalize(norm * norm, max_norm, t);
            mismatches +=
                usize::from(s.norm.to_bits() != norm.to_bits() || s.clip_scale.to_bits() != clip_scale.to_bits());
            mismatches += usize::from(s.loss != 2.5 || s.first_bad().is_some() || s.steps != want.steps);
        }
        // A NaN gradient: nothing is written, and the step is reported (tensor 1).
        let bad = problem(kind, device, 7, true)?;
        let before: Vec<Vec<u8>> = bad.iter().flat_map(|p| p.tensors()).map(bits).collect::<Result<_>>()?;
        let mut status = StepStatus::new(device)?;
        let steps: Vec<ParamStep<'_>> = bad.iter().map(|p| p.step(0.01, 0.0)).collect();
        let none = vec![None; steps.len()];
        // SAFETY: fresh, unshared tensors.
        unsafe { step_in_place_dev(&steps, kind, 1.0, Some(1.0), 5, &mut status, &none)? };
        let after: Vec<Vec<u8>> = bad.iter().flat_map(|p| p.tensors()).map(bits).collect::<Result<_>>()?;
        mismatches += usize::from(before != after);
        let s = status.read()?;
        let reported = s.first_bad().map(|b| (b.step, b.tensor));
        mismatches += usize::from(reported != Some((5, Some(1))) || s.skip != 1);
    }
    Ok(if mismatches == 0 { 0.0 } else { f64::INFINITY })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_mirrors_the_kernel_struct() {
        let code = OPTIM_SOURCE.code();
        for (name, size) in [("StepStatus", 80), ("CopyDesc", 16)] {
            assert!(code.contains(&format!("struct {name} {{")), "kernels/optim.cu declares no struct {name}");
            assert!(code.contains(&format!("static_assert(sizeof({name}) == {size}")), "{name} size");
        }
        // Field order: six doubles, two i64, f32, three i32.
        let mut v = StepStatusValues::initial();
        v.loss_acc = 1.0;
        v.bad_norm = 6.0;
        v.first_bad = 9;
        v.bad_tensor = 4;
        let words: [u64; 10] = bytemuck::cast(v);
        assert_eq!(f64::from_bits(words[0]), 1.0);
        assert_eq!(f64::from_bits(words[5]), 6.0);
        assert_eq!(words[7] as i64, 9);
        assert_eq!(words[8] as u32, 1.0f32.to_bits());
        assert_eq!(words[9] as u32, 4);
    }

    #[test]
    fn finalize_is_the_host_clip_and_keeps_the_first_bad_step() {
        let mut s = StepStatusValues::initial();
        s.add_loss(1.5);
        s.add_loss(0.25);
        // ‖g‖ = 5 clipped to 1: the host's (c / norm) as f32.
        s.finalize(25.0, Some(1.0), 0);
        assert_eq!((s.loss, s.loss_acc, s.norm, s.steps), (1.75, 0.0, 5.0, 1));
        assert_eq!(s.clip_scale, 0.2f32);
        assert!(s.clipped(Some(1.0)) && s.first_bad().is_none() && s.skip == 0);
        // Not clipped: factor exactly 1.
        s.finalize(0.25, Some(1.0), 1);
        assert_eq!((s.clip_scale, s.clipped(Some(1.0))), (1.0, false));
        s.finalize(1e6, None, 2);
        assert_eq!(s.clip_scale, 1.0);
        // A non-finite loss at step 3 (finite gradients): reported without a tensor.
        s.add_loss(f32::INFINITY);
        s.finalize(4.0, Some(1.0), 3);
        let bad = s.first_bad().expect("bad step");
        assert_eq!((bad.step, bad.loss_sum, bad.norm, bad.tensor), (3, f64::INFINITY, 2.0, None));
        assert_eq!(s.skip, 1);
        // Sticky: a later NaN norm changes neither the step nor the tensor.
        s.note_bad_tensor(0, f64::NAN);
        s.finalize(f64::NAN, Some(1.0), 4);
        assert_eq!(s.first_bad().map(|b| (b.step, b.tensor)), Some((3, None)));
        assert_eq!((s.skip, s.steps), (1, 5));
    }

    #[test]
    fn the_first_non_finite_tensor_is_named() {
        let mut s = StepStatusValues::initial();
        s.note_bad_tensor(4, 1.0);
        s.note_bad_tensor(3, f64::INFINITY);
        s.note_bad_tensor(1, f64::NAN);
        s.note_bad_tensor(2, f64::NAN);
        s.finalize(f64::NAN, None, 7);
        let b = s.first_bad().expect("bad");
        assert_eq!((b.step, b.tensor), (7, Some(1)));
        assert!(b.norm.is_nan());
    }

    #[test]
    fn host_tensors_and_bad_arguments_are_refused() {
        assert!(matches!(StepStatus::new(Device::Cpu), Err(Error::Value { .. })));
        assert!(!device_step_ok(Device::Cpu));
    }

    #[test]
    fn check_values_are_deterministic_and_in_range() {
        let a = values(100, 3, false);
        assert_eq!(a, values(100, 3, false));
        assert_ne!(a, values(100, 4, false));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        assert!(values(100, 3, true).iter().all(|x| (0.01..1.0).contains(x)));
        assert!(a.iter().any(|&x| x < 0.0) && a.iter().any(|&x| x > 0.0));
    }
}
