//! Choice between the 32-bit vector kernels (`<op>_v32_*` in `kernels/elementwise.cu` and
//! `kernels/layout.cu`: 32-bit index math, 16-byte accesses) and the plain 64-bit ones.
//!
//! A kernel over `n` elements takes the `_v32` variant when `n < 2^31` and the variants have
//! passed their self-check on the device (`elementwise_layout_v32`: a few ops on odd sizes,
//! views at misaligned offsets and every float dtype, run both ways, must agree bit for bit,
//! since each element is computed by the same f32 expression); the 64-bit kernels otherwise.

use super::{self_check, CudaBackend};
use crate::{
    ops::{self, Gelu},
    DType, Device, Result, Tensor,
};
use std::{cell::Cell, sync::Arc};

/// Tensors below this many elements may take the `_v32` kernels.
pub(super) const V32_LIMIT: usize = 1 << 31;
/// The self-check's name of the `_v32` kernels (listed by `vit devices`).
pub(crate) const V32_KERNELS: &str = "elementwise_layout_v32";

thread_local! {
    /// Set while the self-check runs its two sides on this thread: forces one variant.
    static FORCE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// `op_v32` when every index of a kernel over `n` elements fits 32 bits and the variants
/// passed their check on `backend`, else `op`.
pub(super) fn kernel_name(backend: &Arc<CudaBackend>, op: &str, n: usize) -> String {
    let fast = n < V32_LIMIT
        && match FORCE.with(Cell::get) {
            Some(forced) => forced,
            None => v32_ok(backend),
        };
    if fast {
        format!("{op}_v32")
    } else {
        op.to_string()
    }
}

/// Whether the `_v32` kernels may be used on `backend` (their check runs on first use).
pub(crate) fn v32_ok(backend: &Arc<CudaBackend>) -> bool {
    backend.fast_kernel_ok(V32_KERNELS, 0.0, || check(backend))
}

/// Runs `f` with the `_v32` kernels forced on or off on this thread.
fn forced<T>(on: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    FORCE.with(|c| c.set(Some(on)));
    let out = f();
    FORCE.with(|c| c.set(None));
    out
}

/// The ops that use the `_v32` kernels on odd and aligned sizes, misaligned views and each
/// float dtype: their results as f32 vectors.
fn probe(dev: Device) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::new();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        // [5, 3, 40]: rows of 40 (vector friendly); a view 3 elements in (misaligned) of 597.
        let x = Tensor::randn([5, 3, 40], 0.0, 1.0, 11, dt, dev)?;
        let y = Tensor::randn([5, 3, 40], 0.0, 1.0, 12, dt, dev)?;
        let flat = Tensor::randn([600], 0.0, 1.0, 13, dt, dev)?;
        let (u, v) = (flat.narrow(3, 597)?, flat.narrow(0, 597)?);
        let bias = Tensor::randn([40], 0.0, 1.0, 14, dt, dev)?;
        let other = if dt == DType::F32 { DType::BF16 } else { DType::F32 };
        for t in [
            ops::add(&x, &y)?,
            ops::add(&u, &v)?,
            ops::scale(&u, 0.37)?,
            ops::bias_add(&x, &bias)?,
            ops::gelu_fwd(&x, Gelu::Tanh)?,
            ops::gelu_bwd(&u, &v, Gelu::Erf)?,
            x.cast(other)?,
            u.cast(other)?,
            ops::permute(&x, &[1, 0, 2])?,
            ops::permute(&x, &[2, 1, 0])?,
            ops::slice(&x, 2, 8, 16)?,
            ops::slice(&x, 2, 3, 5)?,
            ops::slice(&x, 1, 1, 2)?,
            ops::concat(&[&x, &y], 1)?,
            ops::concat(&[&x, &y], 2)?,
        ] {
            out.push(t.to_f32_vec()?);
        }
    }
    Ok(out)
}

/// The largest relative difference between the two variants over [`probe`] (0 when they agree).
fn check(backend: &Arc<CudaBackend>) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let fast = forced(true, || probe(dev))?;
    let reference = forced(false, || probe(dev))?;
    Ok(fast.iter().zip(&reference).map(|(f, r)| self_check::relative_error(f, r)).fold(0.0, |m, e| {
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    }))
}
