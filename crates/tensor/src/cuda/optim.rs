//! Fused optimizer steps on CUDA (`kernels/optim.cu`): the device path of `vit-optim`.
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

use super::{backend_of, cuda_err, view, wrap, CudaBackend};
use crate::{DType, Device, Error, Result, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

const FILE: &str = "optim.cu";

/// Launches `func` on `blocks` blocks of [`plan::THREADS`] threads with the arguments
/// (references to device buffers and scalars), mapping a driver error.
macro_rules! launch {
    ($backend:expr, $func:expr, $blocks:expr, $threads:expr, $($arg:expr),+ $(,)?) => {{
        let cfg = LaunchConfig { grid_dim: ($blocks, 1, 1), block_dim: ($threads, 1, 1), shared_mem_bytes: 0 };
        let mut builder = $backend.stream.launch_builder(&$func);
        $( builder.arg($arg); )+
        // SAFETY: the arguments match the kernel's signature in kernels/optim.cu; the descriptor
        // tables hold pointers into live buffers (inputs borrowed for this call, outputs and
        // scratch owned by it, all freed in stream order after the launch) with the sizes the
        // tables state, and every index the kernels form stays within those sizes.
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
    }};
}

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

/// Scalars shared by every parameter of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// The schedule's factor at this step.
    pub schedule: f32,
    /// Every gradient is multiplied by this first (`min(1, max_norm / ‖g‖)`; 1 for none).
    pub clip_scale: f32,
}

/// AdamW's f32 coefficients: `m = c1·g + b1·m`, `v = c2·(g·g) + b2·v`,
/// `d = (m / bc1) / (sqrt(v / bc2) + eps)`; with `k = t + 1`: `b1 = β1`, `c1 = 1 − β1`,
/// `b2 = β2`, `c2 = 1 − β2`, `bc1 = 1 − β1^k`, `bc2 = 1 − β2^k`, each rounded to f32 from f64.
#[derive(Debug, Clone, Copy, PartialEq)]
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
/// `m = one_minus_mu·u + mu·m` for parameters given one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactoredAdamCoefficients {
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub mu: f32,
    pub one_minus_mu: f32,
}

/// One AdamW step over `params` (each needs `m` and a [`SecondMoment::Full`]); see
/// [`AdamWCoefficients`] for the direction. One launch of `adamw_step`.
pub fn adamw_step(params: &[ParamStep<'_>], c: AdamWCoefficients, s: StepScalars) -> Result<Vec<ParamUpdate>> {
    fused_step(Kind::AdamW, params, s, [c.b1, c.c1, c.b2, c.c2, c.bc1, c.bc2, c.eps])
}

/// One SGD step over `params` (no second moment): `d = m = g + mu·m` for parameters with a
/// momentum, `d = g` for the others. One launch of `sgd_step`.
pub fn sgd_step(params: &[ParamStep<'_>], mu: f32, s: StepScalars) -> Result<Vec<ParamUpdate>> {
    fused_step(Kind::Sgd, params, s, [mu, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
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
    fused_step(Kind::Factored, params, s, [c.beta2, c.one_minus_beta2, c.eps, c.mu, c.one_minus_mu, 0.0, 0.0])
}

/// `Σ x²` over every element of every tensor (float dtypes, one CUDA device), squares and sums
/// in f64 in a fixed order (deterministic; equal to a sequential f64 sum to ~1e-15 relative).
/// Two launches and one 8-byte read back (which waits for the stream). 0 for no elements.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    const OP: &str = "sum_of_squares";
    let Some(first) = tensors.first() else { return Ok(0.0) };
    let device = first.device();
    let backend = backend_of(first, OP)?;
    let mut entries = Vec::with_capacity(tensors.len());
    for t in tensors {
        same_device(OP, t, device)?;
        float(OP, t)?;
        // The caller's borrows keep the tensors alive for the whole call.
        let ptr = ptr_of(&backend, &view(t, OP)?);
        let size = t.dtype().size_in_bytes() as u64;
        let flags = if plan::aligned(&[(ptr, size)]) { plan::F_VEC } else { 0 };
        entries.push(plan::SqEntry { x: ptr, n: t.numel() as u64, dt: plan::dtype_code(t.dtype()), flags });
    }
    let table = plan::sq_table(&entries);
    if table.blocks[0] == 0 {
        return Ok(0.0);
    }
    let blocks = table.blocks[0];
    let dev_table = upload(&backend, &table.bytes)?;
    let mut partial = alloc(&backend, blocks as usize * 8)?;
    let mut out = alloc(&backend, 8)?;
    let (descs, starts) = (dev_table.slice(..table.starts[0]), dev_table.slice(table.starts[0]..));
    let count = entries.len() as i32;
    let func = backend.function(FILE, "sum_squares")?;
    launch!(backend, func, blocks, plan::THREADS, &descs, &starts, &count, &mut partial);
    let func = backend.function(FILE, "sum_squares_finalize")?;
    let nblocks = blocks as i64;
    launch!(backend, func, 1, 1024, &partial, &nblocks, &mut out);
    let bytes = backend.stream.clone_dtoh(&out).map_err(cuda_err)?;
    Ok(f64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")))
}

/// A copy of `x` in a fresh buffer on its device (`cuMemcpyDtoDAsync`): the device-to-device
/// bandwidth reference the optimizer bench compares the fused steps with.
pub fn copy(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "copy";
    let backend = backend_of(x, OP)?;
    let bytes = x.numel() * x.dtype().size_in_bytes();
    let mut out = alloc(&backend, bytes)?;
    if bytes > 0 {
        let src = view(x, OP)?;
        backend.stream.memcpy_dtod(&src, &mut out.slice_mut(..bytes)).map_err(cuda_err)?;
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
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

fn same_device(op: &'static str, t: &Tensor, device: Device) -> Result<()> {
    if t.device() != device || !matches!(device, Device::Cuda(_)) {
        return Err(Error::Device { op, expected: device, got: t.device() });
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
                Err(Error::shape(op, format!("parameter {i}: {what} of shape {}: expected {want:?}", t.shape())))
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
        let missing = |what: &str| Err(Error::value(op, format!("parameter {i}: {what}")));
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
                    return Err(Error::value(
                        op,
                        format!("parameter {i}: factored axes d0 = {d0}, d1 = {d1} for shape {:?}", dims),
                    ));
                }
                if p.param.numel() as u64 >= 1 << 32 {
                    return Err(Error::value(
                        op,
                        format!("parameter {i}: a factored parameter needs fewer than 2^32 elements, got {:?}", dims),
                    ));
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

/// An uninitialised device buffer of `bytes` (at least 1) bytes, for outputs the kernels
/// write completely.
fn alloc(backend: &Arc<CudaBackend>, bytes: usize) -> Result<CudaSlice<u8>> {
    // SAFETY: every byte a tensor view of this buffer covers is written by a kernel before it
    // is read; padding between views is never read.
    unsafe { backend.stream.alloc::<u8>(bytes.max(1)) }.map_err(cuda_err)
}

fn upload(backend: &Arc<CudaBackend>, bytes: &[u8]) -> Result<CudaSlice<u8>> {
    backend.stream.clone_htod(bytes).map_err(cuda_err)
}

fn ptr_of(backend: &Arc<CudaBackend>, v: &CudaView<'_, u8>) -> u64 {
    v.device_ptr(&backend.stream).0
}

fn slice_ptr(backend: &Arc<CudaBackend>, s: &CudaSlice<u8>) -> u64 {
    s.device_ptr(&backend.stream).0
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
        let at = plan::align_elems(self.groups[i].2);
        self.groups[i].2 = at + numel as u64;
        (i, at)
    }
}

fn fused_step(kind: Kind, params: &[ParamStep<'_>], s: StepScalars, c: [f32; 7]) -> Result<Vec<ParamUpdate>> {
    let op = kind.op();
    let Some(first) = params.first() else { return Ok(Vec::new()) };
    let device = first.param.device();
    let backend = backend_of(first.param, op)?;
    validate(kind, params, device)?;

    // Output slots: 0 parameters, 1 momentum, 2 second moments (f32).
    let mut arenas = Arenas::default();
    let mut slots = Vec::with_capacity(params.len());
    for p in params {
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
    let buffers: Vec<CudaSlice<u8>> = arenas
        .groups
        .iter()
        .map(|&(_, d, n)| alloc(&backend, n as usize * d.size_in_bytes()))
        .collect::<Result<_>>()?;
    let bases: Vec<u64> = buffers.iter().map(|b| slice_ptr(&backend, b)).collect();
    let out_ptr = |(a, at): Slot| bases[a] + at * arenas.groups[a].1.size_in_bytes() as u64;

    // Input pointers: valid for the whole call, since the caller's borrows keep the tensors
    // (and their storage) alive; a later drop frees them in stream order, after the kernels.
    let ptr = |t: &Tensor| -> Result<u64> { Ok(ptr_of(&backend, &view(t, op)?)) };

    // Factored parameters: geometry, scratch, statistics tables.
    let mut factored = Vec::new();
    let (mut part_len, mut factor_len) = (0u64, 0u64);
    for (i, p) in params.iter().enumerate() {
        if let SecondMoment::Factored { d0, d1, .. } = p.second {
            let geom = plan::Geometry::new(p.param.dims(), d0, d1);
            let part = (plan::align_elems(part_len), plan::align_elems(part_len) + geom.part_a_len());
            part_len = part.1 + geom.part_b_len();
            let rf = plan::align_elems(factor_len);
            let cf = plan::align_elems(rf + geom.vr_len());
            factor_len = cf + geom.vc_len();
            factored.push((i, geom, part, (rf, cf)));
        }
    }
    let parts = if factored.is_empty() { None } else { Some(alloc(&backend, part_len as usize * 8)?) };
    let factors = if factored.is_empty() { None } else { Some(alloc(&backend, factor_len as usize * 4)?) };
    let part_base = parts.as_ref().map_or(0, |b| slice_ptr(&backend, b));
    let factor_base = factors.as_ref().map_or(0, |b| slice_ptr(&backend, b));
    let mut rf_cf = vec![(0u64, 0u64); params.len()];
    let mut fentries = Vec::with_capacity(factored.len());
    for &(i, geom, (pa, pb), (rf, cf)) in &factored {
        let p = &params[i];
        let SecondMoment::Factored { v_row, v_col, .. } = p.second else { unreachable!("factored slot") };
        let g = ptr(p.grad)?;
        let (vr_in, vc_in) = (ptr(v_row)?, ptr(v_col)?);
        let vs = &slots[i].2;
        rf_cf[i] = (factor_base + rf * 4, factor_base + cf * 4);
        let gsize = p.grad.dtype().size_in_bytes() as u64;
        fentries.push(plan::FactoredEntry {
            g,
            vr_in,
            vc_in,
            vr_out: out_ptr(vs[0]),
            vc_out: out_ptr(vs[1]),
            rf: rf_cf[i].0,
            cf: rf_cf[i].1,
            part_a: part_base + pa * 8,
            part_b: part_base + pb * 8,
            geom,
            g_dt: plan::dtype_code(p.grad.dtype()),
            flags: if plan::aligned(&[(g, gsize)]) { plan::F_VEC } else { 0 },
        });
    }

    // The step table.
    let mut entries = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        let (ps, ms, vs) = &slots[i];
        let (pp, gp) = (ptr(p.param)?, ptr(p.grad)?);
        let mp = p.m.map(ptr).transpose()?.unwrap_or(0);
        let (vp, geom) = match p.second {
            SecondMoment::Full(v) => (ptr(v)?, None),
            SecondMoment::Factored { d0, d1, .. } => (0, Some(plan::Geometry::new(p.param.dims(), d0, d1))),
            SecondMoment::None => (0, None),
        };
        let (p_out, m_out) = (out_ptr(*ps), ms.map_or(0, out_ptr));
        let v_out = if vp != 0 { out_ptr(vs[0]) } else { 0 };
        let (psz, gsz) = (p.param.dtype().size_in_bytes() as u64, p.grad.dtype().size_in_bytes() as u64);
        let msz = p.m.map_or(4, |m| m.dtype().size_in_bytes() as u64);
        let vec = plan::aligned(&[(pp, psz), (gp, gsz), (mp, msz), (vp, 4), (p_out, psz), (m_out, msz), (v_out, 4)]);
        let mut flags = if vec { plan::F_VEC } else { 0 };
        if p.m.is_some() {
            flags |= plan::F_HAS_M;
        }
        if let Some(g) = geom {
            flags |= plan::F_FACTORED;
            if g.d0_is_a {
                flags |= plan::F_D0_IS_A;
            }
        }
        entries.push(plan::StepEntry {
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
            geom,
            lr: p.lr,
            wd: p.wd,
            p_dt: plan::dtype_code(p.param.dtype()),
            g_dt: plan::dtype_code(p.grad.dtype()),
            m_dt: p.m.map_or(0, |m| plan::dtype_code(m.dtype())),
            flags,
        });
    }

    // Launches: the factored statistics, then the step.
    if !fentries.is_empty() {
        let t = plan::factored_table(&fentries);
        let dev = upload(&backend, &t.bytes)?;
        let descs = dev.slice(..t.starts[0]);
        let count = fentries.len() as i32;
        let names = ["factored_stats", "factored_finalize", "factored_rowmean"];
        for (k, name) in names.iter().enumerate() {
            if t.blocks[k] == 0 {
                continue;
            }
            let func = backend.function(FILE, name)?;
            let end = if k + 1 < t.starts.len() { t.starts[k + 1] } else { t.bytes.len() };
            let starts = dev.slice(t.starts[k]..end);
            match k {
                0 => launch!(backend, func, t.blocks[k], plan::THREADS, &descs, &starts, &count, &s.clip_scale, &c[2]),
                1 => launch!(backend, func, t.blocks[k], plan::THREADS, &descs, &starts, &count, &c[0], &c[1]),
                _ => launch!(backend, func, t.blocks[k], plan::THREADS, &descs, &starts, &count),
            }
        }
    }
    let t = plan::step_table(&entries);
    if t.blocks[0] > 0 {
        let dev = upload(&backend, &t.bytes)?;
        let (descs, starts) = (dev.slice(..t.starts[0]), dev.slice(t.starts[0]..));
        let count = entries.len() as i32;
        let func = backend.function(FILE, op)?;
        let (sch, clip) = (s.schedule, s.clip_scale);
        match kind {
            Kind::AdamW => launch!(
                backend,
                func,
                t.blocks[0],
                plan::THREADS,
                &descs,
                &starts,
                &count,
                &sch,
                &clip,
                &c[0],
                &c[1],
                &c[2],
                &c[3],
                &c[4],
                &c[5],
                &c[6]
            ),
            Kind::Sgd => {
                launch!(backend, func, t.blocks[0], plan::THREADS, &descs, &starts, &count, &sch, &clip, &c[0])
            }
            Kind::Factored => launch!(
                backend,
                func,
                t.blocks[0],
                plan::THREADS,
                &descs,
                &starts,
                &count,
                &sch,
                &clip,
                &c[0],
                &c[1],
                &c[2],
                &c[3],
                &c[4]
            ),
        }
    }

    // Wrap the flat buffers and cut the outputs out of them.
    let flats: Vec<Tensor> =
        buffers.into_iter().zip(&arenas.groups).map(|(b, &(_, d, n))| wrap(&backend, b, [n as usize], d)).collect();
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

/// The launch plans: descriptor tables (mirroring the structs of kernels/optim.cu byte for
/// byte), block counts and scratch sizes. Pure: no CUDA calls.
mod plan {
    use crate::DType;

    pub const THREADS: u32 = 256;
    /// Elements per block of the step and sum-of-squares kernels.
    pub const STEP_ELEMS: u64 = 4096;
    pub const TILE_ROWS: u64 = 256;
    pub const TILE_COLS: u64 = 128;
    pub const STEP_DESC_BYTES: usize = 136;
    pub const FACTORED_DESC_BYTES: usize = 152;
    pub const SQ_DESC_BYTES: usize = 24;
    /// Output tensors and scratch areas start at multiples of this many elements (256 bytes
    /// for f32), so their pointers allow vector accesses.
    pub const ALIGN_ELEMS: u64 = 64;

    pub const F_VEC: i32 = 1;
    pub const F_HAS_M: i32 = 2;
    pub const F_FACTORED: i32 = 4;
    pub const F_D0_IS_A: i32 = 8;

    pub fn dtype_code(d: DType) -> i32 {
        match d {
            DType::BF16 => 1,
            DType::F16 => 2,
            _ => 0,
        }
    }

    pub fn align_elems(n: u64) -> u64 {
        n.div_ceil(ALIGN_ELEMS) * ALIGN_ELEMS
    }

    /// True when every non-null pointer allows 4-element vector accesses: `(pointer, element size)`.
    pub fn aligned(ptrs: &[(u64, u64)]) -> bool {
        ptrs.iter().all(|&(p, size)| p % (4 * size) == 0)
    }

    /// A factored tensor viewed as `[P, A, Q, B, R]`: `a = min(d0, d1)` of size A,
    /// `b = max(d0, d1)` of size B (see kernels/optim.cu).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Geometry {
        pub p: u64,
        pub a: u64,
        pub q: u64,
        pub b: u64,
        pub r: u64,
        /// d0 (the largest axis, the one v_row averages over) is the lower axis `a`.
        pub d0_is_a: bool,
    }

    impl Geometry {
        pub fn new(dims: &[usize], d0: usize, d1: usize) -> Self {
            let (lo, hi) = (d0.min(d1), d0.max(d1));
            let prod = |r: std::ops::Range<usize>| dims[r].iter().product::<usize>() as u64;
            Geometry {
                p: prod(0..lo),
                a: dims[lo] as u64,
                q: prod(lo + 1..hi),
                b: dims[hi] as u64,
                r: prod(hi + 1..dims.len()),
                d0_is_a: d0 == lo,
            }
        }
        /// Columns of each `[A, C]` matrix.
        pub fn c(&self) -> u64 {
            self.b * self.r
        }
        /// Entries of S_a (the sums over a), laid out `[P, Q, B, R]`.
        pub fn na(&self) -> u64 {
            self.p * self.q * self.c()
        }
        /// Entries of S_b (the sums over b), laid out `[P, A, Q, R]`.
        pub fn nb(&self) -> u64 {
            self.p * self.a * self.q * self.r
        }
        pub fn vr_len(&self) -> u64 {
            if self.d0_is_a {
                self.na()
            } else {
                self.nb()
            }
        }
        pub fn vc_len(&self) -> u64 {
            if self.d0_is_a {
                self.nb()
            } else {
                self.na()
            }
        }
        pub fn tiles_a(&self) -> u64 {
            self.a.div_ceil(TILE_ROWS)
        }
        pub fn tiles_c(&self) -> u64 {
            self.c().div_ceil(TILE_COLS)
        }
        /// Tiles of the partial sums over b: the column tiles when R == 1, else one (the
        /// line blocks sum over b directly).
        pub fn tiles_b(&self) -> u64 {
            if self.r == 1 {
                self.tiles_c()
            } else {
                1
            }
        }
        pub fn part_a_len(&self) -> u64 {
            self.tiles_a() * self.na()
        }
        pub fn part_b_len(&self) -> u64 {
            self.tiles_b() * self.nb()
        }
        pub fn tile_blocks(&self) -> u64 {
            self.p * self.q * self.tiles_a() * self.tiles_c()
        }
        pub fn stats_blocks(&self) -> u64 {
            self.tile_blocks() + if self.r > 1 { self.nb().div_ceil(THREADS as u64) } else { 0 }
        }
        pub fn vr_blocks(&self) -> u64 {
            self.vr_len().div_ceil(THREADS as u64)
        }
        pub fn finalize_blocks(&self) -> u64 {
            self.vr_blocks() + self.vc_len().div_ceil(THREADS as u64)
        }
        /// Slices (p, q, r) of v_row: the blocks of `factored_rowmean`.
        pub fn slices(&self) -> u64 {
            self.p * self.q * self.r
        }
    }

    /// One tensor of a step launch (`StepDesc`).
    #[derive(Debug, Clone, Copy)]
    pub struct StepEntry {
        pub p: u64,
        pub g: u64,
        pub m: u64,
        pub v: u64,
        pub p_out: u64,
        pub m_out: u64,
        pub v_out: u64,
        pub rf: u64,
        pub cf: u64,
        pub n: u64,
        pub geom: Option<Geometry>,
        pub lr: f32,
        pub wd: f32,
        pub p_dt: i32,
        pub g_dt: i32,
        pub m_dt: i32,
        pub flags: i32,
    }

    /// One tensor of the factored statistics launches (`FactoredDesc`).
    #[derive(Debug, Clone, Copy)]
    pub struct FactoredEntry {
        pub g: u64,
        pub vr_in: u64,
        pub vc_in: u64,
        pub vr_out: u64,
        pub vc_out: u64,
        pub rf: u64,
        pub cf: u64,
        pub part_a: u64,
        pub part_b: u64,
        pub geom: Geometry,
        pub g_dt: i32,
        pub flags: i32,
    }

    /// One tensor of the sum of squares (`SqDesc`).
    #[derive(Debug, Clone, Copy)]
    pub struct SqEntry {
        pub x: u64,
        pub n: u64,
        pub dt: i32,
        pub flags: i32,
    }

    /// Descriptors, then for each launch the block starts (`count + 1` i64 each, 8-byte aligned).
    #[derive(Debug, Clone)]
    pub struct Table {
        pub bytes: Vec<u8>,
        /// Byte offset of each launch's starts array (the descriptors begin at 0).
        pub starts: Vec<usize>,
        /// Total blocks of each launch.
        pub blocks: Vec<u32>,
    }

    struct Writer(Vec<u8>);

    impl Writer {
        fn u64(&mut self, v: u64) {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        fn f32(&mut self, v: f32) {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        fn i32(&mut self, v: i32) {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Appends the prefix sums of `blocks` (per tensor) and records the launch.
    fn push_starts(w: &mut Writer, table: &mut Table, blocks: impl Iterator<Item = u64>) {
        table.starts.push(w.0.len());
        let mut total = 0u64;
        w.u64(0);
        for b in blocks {
            total += b;
            w.u64(total);
        }
        // Grids are u32; a launch beyond that would need 2^31 blocks of 4096 elements.
        table.blocks.push(u32::try_from(total).expect("grid of fewer than 2^32 blocks"));
    }

    pub fn step_table(entries: &[StepEntry]) -> Table {
        let mut w = Writer(Vec::with_capacity(entries.len() * (STEP_DESC_BYTES + 8) + 8));
        for e in entries {
            for ptr in [e.p, e.g, e.m, e.v, e.p_out, e.m_out, e.v_out, e.rf, e.cf] {
                w.u64(ptr);
            }
            w.u64(e.n);
            let g = e.geom.unwrap_or(Geometry { p: 1, a: 1, q: 1, b: 1, r: 1, d0_is_a: false });
            for x in [g.a, g.q, g.c(), g.r] {
                w.u64(x);
            }
            w.f32(e.lr);
            w.f32(e.wd);
            for x in [e.p_dt, e.g_dt, e.m_dt, e.flags] {
                w.i32(x);
            }
        }
        debug_assert_eq!(w.0.len(), entries.len() * STEP_DESC_BYTES);
        let mut t = Table { bytes: Vec::new(), starts: Vec::new(), blocks: Vec::new() };
        push_starts(&mut w, &mut t, entries.iter().map(|e| e.n.div_ceil(STEP_ELEMS)));
        t.bytes = w.0;
        t
    }

    /// Launches: `factored_stats`, `factored_finalize`, `factored_rowmean`.
    pub fn factored_table(entries: &[FactoredEntry]) -> Table {
        let mut w = Writer(Vec::with_capacity(entries.len() * (FACTORED_DESC_BYTES + 24) + 24));
        for e in entries {
            for ptr in [e.g, e.vr_in, e.vc_in, e.vr_out, e.vc_out, e.rf, e.cf, e.part_a, e.part_b] {
                w.u64(ptr);
            }
            let g = e.geom;
            for x in [g.p, g.a, g.q, g.b, g.r, g.tiles_a(), g.tiles_c(), g.tile_blocks(), g.vr_blocks()] {
                w.u64(x);
            }
            let flags = e.flags | if g.d0_is_a { F_D0_IS_A } else { 0 };
            w.i32(e.g_dt);
            w.i32(flags);
        }
        debug_assert_eq!(w.0.len(), entries.len() * FACTORED_DESC_BYTES);
        let mut t = Table { bytes: Vec::new(), starts: Vec::new(), blocks: Vec::new() };
        push_starts(&mut w, &mut t, entries.iter().map(|e| e.geom.stats_blocks()));
        push_starts(&mut w, &mut t, entries.iter().map(|e| e.geom.finalize_blocks()));
        push_starts(&mut w, &mut t, entries.iter().map(|e| e.geom.slices()));
        t.bytes = w.0;
        t
    }

    pub fn sq_table(entries: &[SqEntry]) -> Table {
        let mut w = Writer(Vec::with_capacity(entries.len() * (SQ_DESC_BYTES + 8) + 8));
        for e in entries {
            w.u64(e.x);
            w.u64(e.n);
            w.i32(e.dt);
            w.i32(e.flags);
        }
        debug_assert_eq!(w.0.len(), entries.len() * SQ_DESC_BYTES);
        let mut t = Table { bytes: Vec::new(), starts: Vec::new(), blocks: Vec::new() };
        push_starts(&mut w, &mut t, entries.iter().map(|e| e.n.div_ceil(STEP_ELEMS)));
        t.bytes = w.0;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::plan::*;
    use super::{adamw_step, sum_of_squares, AdamWCoefficients, ParamStep, SecondMoment, StepScalars};
    use crate::{DType, Device, Error, Tensor};

    #[test]
    fn host_tensors_are_refused_without_touching_cuda() {
        let t = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
        assert!(matches!(sum_of_squares(&[&t]), Err(Error::Device { op: "sum_of_squares", .. })));
        let p = ParamStep { param: &t, grad: &t, m: Some(&t), second: SecondMoment::Full(&t), lr: 0.1, wd: 0.0 };
        let c = AdamWCoefficients { b1: 0.9, c1: 0.1, b2: 0.999, c2: 0.001, bc1: 0.1, bc2: 0.001, eps: 1e-8 };
        let s = StepScalars { schedule: 1.0, clip_scale: 1.0 };
        assert!(matches!(adamw_step(&[p], c, s), Err(Error::Device { op: "adamw_step", .. })));
        assert!(adamw_step(&[], c, s).unwrap().is_empty());
        assert_eq!(sum_of_squares(&[]).unwrap(), 0.0);
    }

    #[test]
    fn geometry_matches_the_axis_rules() {
        // [out, in] = [3072, 768], d0 = 0: a = 0 (A 3072), b = 1 (B 768); v_row = [768] = S_a.
        let g = Geometry::new(&[3072, 768], 0, 1);
        assert_eq!((g.p, g.a, g.q, g.b, g.r, g.d0_is_a), (1, 3072, 1, 768, 1, true));
        assert_eq!((g.vr_len(), g.vc_len(), g.slices()), (768, 3072, 1));
        assert_eq!((g.tiles_a(), g.tiles_c(), g.tile_blocks()), (12, 6, 72));
        // pos_embed [1, 197, 768]: d0 = 2, d1 = 1 -> a = 1, b = 2, P = 1.
        let g = Geometry::new(&[1, 197, 768], 2, 1);
        assert_eq!((g.p, g.a, g.q, g.b, g.r, g.d0_is_a), (1, 197, 1, 768, 1, false));
        assert_eq!((g.vr_len(), g.vc_len()), (197, 768));
        // [768, 3, 32, 32], d0 = 0, d1 = 3: Q = 3·32 between the axes, R = 1.
        let g = Geometry::new(&[768, 3, 32, 32], 0, 3);
        assert_eq!((g.p, g.a, g.q, g.b, g.r), (1, 768, 96, 32, 1));
        assert_eq!((g.vr_len(), g.vc_len(), g.slices()), (96 * 32, 768 * 96, 96));
        // [3, 40, 33, 5], d0 = 1, d1 = 2: P 3, Q 1, R 5; the line blocks sum over b.
        let g = Geometry::new(&[3, 40, 33, 5], 1, 2);
        assert_eq!((g.p, g.a, g.q, g.b, g.r, g.d0_is_a), (3, 40, 1, 33, 5, true));
        assert_eq!((g.na(), g.nb(), g.tiles_b()), (3 * 33 * 5, 3 * 40 * 5, 1));
        assert_eq!(g.stats_blocks(), g.tile_blocks() + (600u64).div_ceil(256));
    }

    #[test]
    fn tables_have_the_kernel_layout() {
        let e = StepEntry {
            p: 256,
            g: 512,
            m: 0,
            v: 0,
            p_out: 1024,
            m_out: 0,
            v_out: 0,
            rf: 0,
            cf: 0,
            n: 4097,
            geom: None,
            lr: 0.5,
            wd: 0.25,
            p_dt: 0,
            g_dt: 1,
            m_dt: 0,
            flags: F_VEC,
        };
        let t = step_table(&[e, StepEntry { n: 0, ..e }, StepEntry { n: 10, ..e }]);
        assert_eq!(t.starts, [3 * STEP_DESC_BYTES]);
        assert_eq!(t.blocks, [3]);
        let starts: Vec<u64> =
            t.bytes[t.starts[0]..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(starts, [0, 2, 2, 3]);
        assert_eq!(&t.bytes[112..116], &0.5f32.to_le_bytes());
        assert_eq!(&t.bytes[124..128], &1i32.to_le_bytes());
        assert!(aligned(&[(256, 4), (512, 2), (0, 2)]) && !aligned(&[(8, 4)]));
    }
}
