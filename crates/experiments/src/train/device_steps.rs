//! The CUDA training step without host round trips (issue 14 item 6).
//!
//! On one CUDA device (one rank, no model or expert axis, no full sharding, a dense model, the
//! replicated optimizer) whose device passed the `device_step` self-check
//! ([`vit_optim::cuda::device_step_ok`]; `VITRS_FAST_KERNELS_OFF=device_step` turns it off), a
//! step reads nothing back to the host: each micro-batch's loss sum is added into a device-side
//! [`StepStatus`], the optimizer computes the gradients' norm, the clip factor and the non-finite
//! check there ([`OptimizerChain::step_on_device`]) and writes the next forward's bf16/f16
//! compute copy of the parameters. The trainer reads the status only when it needs the numbers:
//! at `log_every` steps, evaluations, checkpoints, a stop and the end.
//!
//! Non-finite losses and gradients (documented behaviour): a step whose loss or gradient norm is
//! not finite updates nothing, and neither does any later step; the next read finds it and stops
//! the run with the error the host path gives at once ([`TrainError::NonFiniteLoss`] or
//! [`vit_optim::OptimError::NonFinite`]) naming the step where it first happened. The parameters
//! and optimizer moments are then those from before that step; the optimizer's step counter has
//! moved on, so they are not saved (the newest checkpoint, written at a read that found no bad
//! step, is clean).

use super::TrainError;
use vit_optim::cuda::{StepStatus, StepStatusValues};
use vit_optim::{DeviceStep, OptimizerChain, StepInfo};
use vit_tensor::{ops, DType, Device, ParamStore, Tensor};

/// The device-side state of a run's steps: the status and the compute copy the optimizer writes.
pub struct DeviceSteps {
    status: StepStatus,
    /// The low-precision compute copy, written by each step; `None` for f32 compute (the copy is
    /// the parameters themselves) and before the first step.
    compute: Option<ParamStore>,
    dtype: DType,
    /// The optimizer batch: the loss is the loss sum over it divided by it.
    batch: usize,
}

impl DeviceSteps {
    /// Device steps for a run on `device` with compute dtype `dtype` and optimizer batch
    /// `batch`, when `eligible` (the run's layout allows them), the optimizer runs on the device
    /// and the device passed the self-check; `None` otherwise (the host-sync step is used).
    pub fn new(
        eligible: bool,
        opt: &OptimizerChain,
        device: Device,
        dtype: DType,
        batch: usize,
    ) -> Result<Option<Self>, TrainError> {
        if !eligible || !opt.runs_on_device(device) || !vit_optim::cuda::device_step_ok(device) {
            return Ok(None);
        }
        Ok(Some(DeviceSteps { status: StepStatus::new(device)?, compute: None, dtype, batch }))
    }

    /// The compute copy of `params` for this step's forward: the copy the last step wrote (a
    /// store sharing its buffers; drop it before [`DeviceSteps::step`]), a fresh cast the first
    /// time, and the parameters themselves for f32.
    pub fn compute_params(&mut self, params: &ParamStore) -> Result<ParamStore, TrainError> {
        if self.dtype == DType::F32 {
            return Ok(params.cast(DType::F32)?);
        }
        if self.compute.is_none() {
            self.compute = Some(params.cast(self.dtype)?);
        }
        Ok(self.compute.clone().expect("set above"))
    }

    /// Adds one micro-batch's per-example losses `[micro]` to the step's loss on the device.
    pub fn add_losses(&mut self, losses: &Tensor) -> Result<(), TrainError> {
        let sum = ops::sum_all(losses)?;
        // bf16/f16 → f32 is exact: the host path's `to_scalar` gives the same value.
        let sum = if sum.dtype() == DType::F32 { sum } else { sum.cast(DType::F32)? };
        Ok(self.status.add_loss(&sum)?)
    }

    /// The optimizer step, on the device (writes the compute copy for the next step).
    pub fn step(
        &mut self,
        opt: &mut OptimizerChain,
        params: &mut ParamStore,
        grads: &ParamStore,
    ) -> Result<DeviceStep, TrainError> {
        Ok(opt.step_on_device(params, grads, &mut self.status, self.compute.as_mut())?)
    }

    /// Reads the status (the one host round trip): the last step's mean loss and what it did,
    /// or the error of the first bad step since the run started.
    pub fn read(&self, opt: &OptimizerChain) -> Result<(f64, StepInfo), TrainError> {
        let v = self.status.read()?;
        match first_bad_error(opt, &v, self.batch) {
            Some(e) => Err(e),
            None => Ok((v.loss / self.batch as f64, opt.step_info(&v))),
        }
    }
}

/// The error of the first step that `v` kept as bad, as the host path reports it: a non-finite
/// loss first (the host checks the loss before the step), then a non-finite gradient norm.
pub fn first_bad_error(opt: &OptimizerChain, v: &StepStatusValues, batch: usize) -> Option<TrainError> {
    let bad = v.first_bad()?;
    let loss = bad.loss_sum / batch as f64;
    if !loss.is_finite() {
        return Some(TrainError::NonFiniteLoss { step: bad.step + 1, loss: loss as f32 });
    }
    Some(match opt.non_finite(v) {
        Some(e) => e.into(),
        None => TrainError::NonFiniteLoss { step: bad.step + 1, loss: loss as f32 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_optim::{AdamWConfig, Algorithm, OptimizerConfig};

    fn opt() -> OptimizerChain {
        let mut p = ParamStore::new();
        p.insert("a.weight", Tensor::zeros([2, 3], DType::F32, Device::Cpu).unwrap()).unwrap();
        p.insert("b.bias", Tensor::zeros([3], DType::F32, Device::Cpu).unwrap()).unwrap();
        let mut cfg = OptimizerConfig::new(Algorithm::AdamW(AdamWConfig::default()), 0.1);
        cfg.grad_clip_norm = Some(1.0);
        OptimizerChain::new(cfg, &p).unwrap()
    }

    /// The status the kernels would hold after `steps` (loss sum, Σg², per-tensor Σg²), run on
    /// the CPU reference of the status updates.
    fn run(steps: &[(f32, f64, [f64; 2])]) -> StepStatusValues {
        let mut v = StepStatusValues::initial();
        for (t, &(loss, sq, per)) in steps.iter().enumerate() {
            v.add_loss(loss);
            for (i, s) in per.into_iter().enumerate() {
                v.note_bad_tensor(i, s);
            }
            v.finalize(sq, Some(1.0), t as u64);
        }
        v
    }

    #[test]
    fn clean_steps_report_nothing() {
        let v = run(&[(4.0, 0.25, [0.2, 0.05]), (2.0, 9.0, [8.0, 1.0])]);
        assert!(first_bad_error(&opt(), &v, 4).is_none());
        let info = opt().step_info(&v);
        assert_eq!((info.step, info.grad_norm, info.clipped), (1, 3.0, true));
        assert_eq!(v.loss / 4.0, 0.5);
    }

    #[test]
    fn a_bad_gradient_is_reported_at_its_step_with_its_parameter() {
        // Step 1 (the second) has a NaN in b.bias; step 2 is clean again but changes nothing.
        let v = run(&[(4.0, 0.25, [0.2, 0.05]), (2.0, f64::NAN, [1.0, f64::NAN]), (1.0, 1.0, [0.5, 0.5])]);
        match first_bad_error(&opt(), &v, 4) {
            Some(TrainError::Optim(vit_optim::OptimError::NonFinite { name, step, norm })) => {
                assert_eq!((name.as_str(), step), ("b.bias", 1));
                assert!(norm.is_nan());
            }
            other => panic!("expected NonFinite at step 1, got {other:?}"),
        }
        assert_eq!(v.skip, 1);
    }

    #[test]
    fn a_bad_loss_is_reported_first_with_the_trainers_step_number() {
        // A non-finite loss with finite gradients at the first step; then a bad gradient too.
        let v = run(&[(f32::INFINITY, 0.25, [0.2, 0.05]), (2.0, f64::NAN, [f64::NAN, 1.0])]);
        match first_bad_error(&opt(), &v, 4) {
            Some(TrainError::NonFiniteLoss { step, loss }) => assert_eq!((step, loss), (1, f32::INFINITY)),
            other => panic!("expected NonFiniteLoss at step 1, got {other:?}"),
        }
        // Both at once: the loss wins, as on the host (checked before the step).
        let v = run(&[(f32::NAN, f64::INFINITY, [f64::INFINITY, 1.0])]);
        assert!(matches!(first_bad_error(&opt(), &v, 2), Some(TrainError::NonFiniteLoss { step: 1, .. })));
    }

    #[test]
    fn cpu_runs_never_use_device_steps() {
        let o = opt();
        assert!(DeviceSteps::new(true, &o, Device::Cpu, DType::F32, 4).unwrap().is_none());
    }
}
