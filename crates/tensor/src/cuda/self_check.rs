//! Self-check of the fast kernels before first use on a device (issue 14 item 7).
//!
//! A fast kernel (tensor-core attention, fused epilogues, ...) is used on a device only after it
//! has computed one small problem there and matched the reference path (cuBLASLt or the plain
//! reference kernel). The check runs once per (device, kernel), on first use; a mismatch or an
//! error prints one warning to stderr and the op falls back to the reference path for the rest of
//! the process, so unrun code never gives a user wrong numbers. `vit devices` lists the results.
//!
//! `VITRS_FAST_KERNELS=off` skips every fast kernel (the reference paths only);
//! `VITRS_FAST_KERNELS_OFF=name,name` skips the named ones (for A/B timings of one kernel).

use super::CudaBackend;
use crate::Result;
use std::collections::BTreeMap;

/// The state of one fast kernel on one device.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelStatus {
    /// Its check is running (a nested call takes the reference path).
    Checking,
    /// It matched the reference; the relative error of its check problem.
    Passed { rel_err: f64 },
    /// It failed its check (error or mismatch, in words) and is not used.
    Failed(String),
    /// Turned off by `VITRS_FAST_KERNELS=off` or named in `VITRS_FAST_KERNELS_OFF`.
    Disabled,
}

impl std::fmt::Display for KernelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelStatus::Checking => write!(f, "checking"),
            KernelStatus::Passed { rel_err } => write!(f, "passed (relative error {rel_err:.1e})"),
            KernelStatus::Failed(why) => write!(f, "FAILED, reference path used: {why}"),
            KernelStatus::Disabled => write!(f, "off (VITRS_FAST_KERNELS or VITRS_FAST_KERNELS_OFF)"),
        }
    }
}

/// Per-device record of the fast kernels' checks.
#[derive(Default)]
pub(crate) struct SelfChecks {
    status: std::sync::Mutex<BTreeMap<&'static str, KernelStatus>>,
}

/// Whether `kernel` is turned off: every fast kernel by `VITRS_FAST_KERNELS=off` (or `0`), or
/// this one by name in the comma-separated `VITRS_FAST_KERNELS_OFF`. Public for fast paths whose
/// check is not one device's (the collective ones in vit-collective), so that both switches
/// work on them too.
pub fn fast_kernel_off(kernel: &str) -> bool {
    std::env::var("VITRS_FAST_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0")
        || std::env::var("VITRS_FAST_KERNELS_OFF").is_ok_and(|v| named_in(&v, kernel))
}

/// Whether `kernel` is one of the comma-separated names of `list` (spaces around names ignored).
fn named_in(list: &str, kernel: &str) -> bool {
    list.split(',').any(|n| n.trim() == kernel)
}

impl CudaBackend {
    /// Whether the fast kernel `kernel` may be used on this device. On the first call, runs
    /// `check`, which computes a small problem with the fast kernel and with the reference path
    /// and returns their relative error `‖fast − ref‖ / ‖ref‖`; the kernel passes when that is
    /// finite and at most `tolerance`. The check runs outside the lock and may call ops that
    /// themselves ask for `kernel`: those get `false` (the reference path) while it runs.
    pub(crate) fn fast_kernel_ok(
        &self,
        kernel: &'static str,
        tolerance: f64,
        check: impl FnOnce() -> Result<f64>,
    ) -> bool {
        {
            let mut map = self.self_checks.status.lock().expect("self-check map poisoned");
            match map.get(kernel) {
                Some(KernelStatus::Passed { .. }) => return true,
                Some(_) => return false,
                None if fast_kernel_off(kernel) => {
                    map.insert(kernel, KernelStatus::Disabled);
                    return false;
                }
                None => {
                    map.insert(kernel, KernelStatus::Checking);
                }
            }
        }
        let status = match check().and_then(|e| self.synchronize().map(|()| e)) {
            Ok(e) if e.is_finite() && e <= tolerance => KernelStatus::Passed { rel_err: e },
            Ok(e) => KernelStatus::Failed(format!(
                "relative error {e:.3e} against the reference, expected <= {tolerance:.1e}"
            )),
            Err(e) => KernelStatus::Failed(format!("error: {e}")),
        };
        if let KernelStatus::Failed(why) = &status {
            eprintln!("warning: vitrs fast kernel {kernel} on cuda:{} {why}; using the reference path", self.ordinal);
        }
        let ok = matches!(status, KernelStatus::Passed { .. });
        self.self_checks.status.lock().expect("self-check map poisoned").insert(kernel, status);
        ok
    }
}

/// Each fast kernel's first-use check, run on its device's backend; returns whether it passed.
/// A module with a fast kernel adds its entry here, so `vit devices` can check them all.
type CheckEntry = fn(&std::sync::Arc<CudaBackend>) -> bool;
const ALL_CHECKS: &[CheckEntry] = &[
    super::flash_attention::check_fwd_bf16,
    super::flash_attention::check_fwd_f16,
    super::flash_attention::check_bwd_bf16,
    super::flash_attention::check_bwd_f16,
    super::flash_attention::check_variants,
    super::norm::fast_ok,
    super::softmax::fused_xent_ok,
    super::v32::v32_ok,
    super::linear::check_bias,
    super::linear::check_residual,
    super::linear::check_gelu_aux_bias,
    super::linear::check_dgelu_bgrad,
    super::linear::check_wgrad_accumulate,
    super::linear::check_bgradb,
    super::routing::kernels_ok,
    super::elementwise::colsum_ok,
];

/// Checks of fast kernels in crates built on `vit_tensor::cuda::kernel` (e.g. vit-optim's
/// device-side step), which [`ALL_CHECKS`] cannot name: added by [`register_check`].
static REGISTERED: std::sync::Mutex<Vec<RegisteredCheck>> = std::sync::Mutex::new(Vec::new());

/// A registered check: runs one kernel's check on device `ordinal`, returns whether it passed.
type RegisteredCheck = fn(usize) -> bool;

/// Adds `check` (given a device ordinal; runs its kernel's check through
/// `kernel::fast_kernel_ok` and returns whether it passed) to those [`check_all`] runs. A
/// function registered twice runs once.
pub fn register_check(check: RegisteredCheck) {
    let mut list = REGISTERED.lock().expect("self-check registry poisoned");
    if !list.iter().any(|&c| std::ptr::fn_addr_eq(c, check)) {
        list.push(check);
    }
}

/// Runs the check of every fast kernel on device `ordinal` (those not yet run; registered
/// ones included) and returns the results, by kernel name.
pub fn check_all(ordinal: usize) -> Result<Vec<(&'static str, KernelStatus)>> {
    let b = super::backend(ordinal)?;
    for check in ALL_CHECKS {
        check(&b);
    }
    let registered = REGISTERED.lock().expect("self-check registry poisoned").clone();
    for check in registered {
        check(ordinal);
    }
    fast_kernel_report(ordinal)
}

/// The fast kernels checked so far on device `ordinal`, with their results (empty until an op
/// that has a fast kernel ran there; [`check_all`] runs them all).
pub fn fast_kernel_report(ordinal: usize) -> Result<Vec<(&'static str, KernelStatus)>> {
    let b = super::backend(ordinal)?;
    let map = b.self_checks.status.lock().expect("self-check map poisoned");
    Ok(map.iter().map(|(k, s)| (*k, s.clone())).collect())
}

/// `‖got − want‖ / ‖want‖` over f32 values (infinite when the lengths differ or `want` is 0
/// while `got` is not; NaN anywhere gives NaN, which fails a check).
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        num += d * d;
        den += w as f64 * w as f64;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::{named_in, relative_error};

    #[test]
    fn kernels_are_turned_off_by_exact_name() {
        assert!(named_in("act_bwd_bias_grad", "act_bwd_bias_grad"));
        assert!(named_in("gemm_bias, act_bwd_bias_grad", "act_bwd_bias_grad"));
        assert!(!named_in("gemm_bias,gemm_residual", "gemm"));
        assert!(!named_in("", "gemm_bias"));
    }

    #[test]
    fn relative_error_is_the_norm_ratio_and_nan_fails() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        let e = relative_error(&[3.0, 4.0], &[0.0, 5.0]);
        assert!((e - (10.0f64).sqrt() / 5.0).abs() < 1e-12, "{e}");
        assert!(relative_error(&[f32::NAN], &[1.0]).is_nan());
        assert_eq!(relative_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(relative_error(&[1.0], &[0.0]), f64::INFINITY);
    }
}
