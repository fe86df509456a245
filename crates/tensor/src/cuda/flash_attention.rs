//! CUDA launches of `kernels/flash_attention.cu`: tensor-core flash attention, forward and
//! deterministic backward, bf16 and f16, head dims that are multiples of 8 up to 128, any token
//! counts; q, k, v, o and the gradients addressed through strides ([`FlashLayout`]), so the
//! kernels read a packed qkv projection and write merged-head outputs directly.
//!
//! The ops use these kernels only after their first-use self-check passed on the device
//! ([`super::CudaBackend::fast_kernel_ok`]): a small problem per head-dim variant against the
//! reference kernels of `kernels/attention.cu`. Otherwise, and for shapes or layouts the kernels
//! do not take, the callers fall back to the reference kernels.

use super::launch::{i64_of, launch, name, MAX_BLOCKS};
use super::{attention, backend_of, output, view, wrap, CudaBackend};
use crate::{DType, Device, Error, Result, Shape, Tensor};
use cudarc::driver::{
    sys::CUfunction_attribute_enum, CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// Queries per block (forward, dq) and keys per block (forward, dk/dv), as in the kernels.
const BLOCK: usize = 64;
/// Threads per block of the flash kernels (4 warps).
const THREADS: u32 = 128;
/// 16-bit elements of padding per shared-memory row.
const PAD: usize = 8;
/// Largest head dim the kernels take.
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// The static shared-memory limit; beyond it a kernel must opt in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// Tensor slots of [`FlashLayout::s`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    DO = 4,
    DQ = 5,
    DK = 6,
    DV = 7,
}

/// Where the kernels find each tensor, in elements: element `(b, h, row, c)` of slot `t` is at
/// `s[t][0] + b·s[t][1] + h·s[t][2] + row·s[t][3] + c` of that tensor's buffer. Must match
/// `struct FlashLayout` in `kernels/flash_attention.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FlashLayout {
    heads: i64,
    n: i64,
    m: i64,
    d: i64,
    s: [[i64; 4]; 8],
}

// SAFETY: plain #[repr(C)] integers, the same layout as the kernels' struct.
unsafe impl DeviceRepr for FlashLayout {}

impl FlashLayout {
    /// `heads` heads of width `d`, `n` queries and `m` keys; every slot unset (zeros).
    pub(crate) fn new(heads: usize, n: usize, m: usize, d: usize) -> Self {
        FlashLayout { heads: i64_of(heads), n: i64_of(n), m: i64_of(m), d: i64_of(d), s: [[0; 4]; 8] }
    }

    /// Slot `t` at element `offset` with strides `(batch, head, row)`.
    pub(crate) fn with(mut self, t: Slot, offset: usize, strides: [usize; 3]) -> Self {
        self.s[t as usize] = [i64_of(offset), i64_of(strides[0]), i64_of(strides[1]), i64_of(strides[2])];
        self
    }

    /// Slot `t` as a contiguous `[batch, heads, rows, d]` tensor starting at `offset`.
    pub(crate) fn contiguous(self, t: Slot, offset: usize, rows: usize) -> Self {
        let (h, d) = (self.heads as usize, self.d as usize);
        self.with(t, offset, [h * rows * d, rows * d, d])
    }

    /// Whether every offset and stride keeps 16-byte rows aligned (multiples of 8 elements).
    fn aligned(&self) -> bool {
        self.s.iter().flatten().all(|&x| x % 8 == 0)
    }
}

/// The contraction the kernels pad head dim `d` to (a multiple of 16, at least 64), or `None`
/// when `d` is not a multiple of 8 in `8..=128`.
pub(crate) fn padded_head_dim(d: usize) -> Option<usize> {
    (d % 8 == 0 && (8..=MAX_HEAD_DIM).contains(&d)).then(|| (d.div_ceil(16) * 16).max(64))
}

/// Whether the flash kernels take this problem: bf16 or f16, a supported head dim, at least one
/// query and key, `batch·heads` within the grid's y limit and 16-byte-aligned rows.
pub(crate) fn eligible(dtype: DType, bh: usize, n: usize, m: usize, d: usize, layout: &FlashLayout) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && padded_head_dim(d).is_some()
        && n > 0
        && m > 0
        && bh <= 65_535
        && layout.aligned()
}

fn smem_fwd(dp: usize) -> usize {
    2 * BLOCK * (dp + PAD) * 2
}
fn smem_dq(dp: usize) -> usize {
    let bk = if dp <= 96 { 64 } else { 32 };
    (2 * BLOCK + 4 * bk) * (dp + PAD) * 2
}
fn smem_dkdv(dp: usize) -> usize {
    let bq = if dp <= 64 { 64 } else { 32 };
    (2 * BLOCK + 4 * bq) * (dp + PAD) * 2 + 4 * bq * 4
}

/// The kernel `op` for `dtype` and padded head dim `dp`, allowed `smem` bytes of dynamic shared memory.
fn function(backend: &CudaBackend, op: &str, dtype: DType, dp: usize, smem: usize) -> Result<CudaFunction> {
    let f = backend.function("flash_attention.cu", &format!("{}_d{dp}", name(op, dtype)))?;
    if smem > DEFAULT_SMEM {
        // cuFuncSetAttribute acts on the calling thread's current context.
        backend.stream.context().bind_to_thread().map_err(super::cuda_err)?;
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| Error::Cuda(format!("flash attention needs {smem} bytes of shared memory: {e:?}")))?;
    }
    Ok(f)
}

fn cfg(blocks: usize, bh: usize, smem: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, bh as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 }
}

/// Forward over `bh = batch·heads` slabs: writes `o` (through `layout`'s O slot) and `lse`
/// (`[bh, n]` f32). The caller has checked [`eligible`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_fwd(
    backend: &CudaBackend,
    dtype: DType,
    bh: usize,
    q: &CudaView<'_, u8>,
    k: &CudaView<'_, u8>,
    v: &CudaView<'_, u8>,
    o: &mut CudaSlice<u8>,
    lse: &mut CudaSlice<u8>,
    layout: &FlashLayout,
    scale: f32,
) -> Result<()> {
    let (n, d) = (layout.n as usize, layout.d as usize);
    let dp = padded_head_dim(d).ok_or_else(|| Error::Cuda(format!("flash attention: head dim {d} unsupported")))?;
    let smem = smem_fwd(dp);
    let func = function(backend, "flash_fwd", dtype, dp, smem)?;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    launch!(backend, func, cfg(n.div_ceil(BLOCK), bh, smem), q, k, v, o, lse, layout, &scale_log2);
    Ok(())
}

/// Backward over `bh` slabs: `delta = rowsum(dO∘O)` into `delta` (`[bh, n]` f32 scratch), dq
/// through the DQ slot into `dq`, dk and dv through the DK and DV slots into `dkv` (one buffer:
/// separate tensors at two offsets, or a packed dqkv buffer, which may then also be `dq`'s: the
/// launches are ordered on the stream).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_bwd(
    backend: &CudaBackend,
    dtype: DType,
    bh: usize,
    t: [&CudaView<'_, u8>; 6],
    delta: &mut CudaSlice<u8>,
    dq: &mut CudaSlice<u8>,
    dkv: Option<&mut CudaSlice<u8>>,
    layout: &FlashLayout,
    scale: f32,
) -> Result<()> {
    let [q, k, v, o, d_o, lse] = t;
    let (n, m, d) = (layout.n as usize, layout.m as usize, layout.d as usize);
    let dp = padded_head_dim(d).ok_or_else(|| Error::Cuda(format!("flash attention: head dim {d} unsupported")))?;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let bh_ = i64_of(bh);
    let rows = bh * n;
    let delta_cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(4).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = backend.function("flash_attention.cu", &name("flash_bwd_delta", dtype))?;
    launch!(backend, f, delta_cfg, o, d_o, &mut *delta, layout, &bh_);
    let smem = smem_dq(dp);
    let f = function(backend, "flash_bwd_dq", dtype, dp, smem)?;
    launch!(
        backend,
        f,
        cfg(n.div_ceil(BLOCK), bh, smem),
        q,
        k,
        v,
        d_o,
        lse,
        &*delta,
        &mut *dq,
        layout,
        &scale,
        &scale_log2
    );
    let smem = smem_dkdv(dp);
    let f = function(backend, "flash_bwd_dkdv", dtype, dp, smem)?;
    let grid = cfg(m.div_ceil(BLOCK), bh, smem);
    match dkv {
        Some(dkv) => launch!(backend, f, grid, q, k, v, d_o, lse, &*delta, dkv, layout, &scale, &scale_log2),
        None => launch!(backend, f, grid, q, k, v, d_o, lse, &*delta, dq, layout, &scale, &scale_log2),
    }
    Ok(())
}

/// The self-check key of the forward or backward kernels for `dtype`.
fn check_key(backward: bool, dtype: DType) -> &'static str {
    match (backward, dtype) {
        (false, DType::BF16) => "flash_attention_fwd_bf16",
        (false, _) => "flash_attention_fwd_f16",
        (true, DType::BF16) => "flash_attention_bwd_bf16",
        (true, _) => "flash_attention_bwd_f16",
    }
}

/// Relative-error tolerance of the self-check: P and dS are rounded to the operand type.
fn check_tolerance(backward: bool, dtype: DType) -> f64 {
    let base = if dtype == DType::BF16 { 1e-2 } else { 2e-3 };
    if backward {
        2.0 * base
    } else {
        base
    }
}

/// Head dims of the self-check problems: one per padded variant (64, 80, 96, 112, 128).
const CHECK_HEAD_DIMS: [usize; 5] = [64, 80, 88, 112, 128];

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.to_f32_vec()
}

/// Runs the forward self-check problems: flash against `kernels/attention.cu`, worst relative error.
fn check_fwd(backend: &Arc<CudaBackend>, dtype: DType) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for (i, &d) in CHECK_HEAD_DIMS.iter().enumerate() {
        let shape = [1, 2, 97, d];
        let seed = 9_000 + 10 * i as u64;
        let q = Tensor::randn(shape, 0.0, 1.0, seed, dtype, dev)?;
        let k = Tensor::randn(shape, 0.0, 1.0, seed + 1, dtype, dev)?;
        let v = Tensor::randn(shape, 0.0, 1.0, seed + 2, dtype, dev)?;
        let scale = (d as f32).powf(-0.5);
        let (o_ref, lse_ref) = attention::attention_fwd(&q, &k, &v, scale)?;
        let (o, lse) = fwd_contiguous(&q, &k, &v, scale)?;
        let e = super::self_check::relative_error(&f32s(&o)?, &f32s(&o_ref)?)
            .max(super::self_check::relative_error(&f32s(&lse)?, &f32s(&lse_ref)?));
        worst = worst.max(e);
    }
    Ok(worst)
}

/// Runs the backward self-check problems: flash against `kernels/attention.cu`, worst relative error.
fn check_bwd(backend: &Arc<CudaBackend>, dtype: DType) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for (i, &d) in CHECK_HEAD_DIMS.iter().enumerate() {
        let shape = [1, 2, 97, d];
        let seed = 9_500 + 10 * i as u64;
        let q = Tensor::randn(shape, 0.0, 1.0, seed, dtype, dev)?;
        let k = Tensor::randn(shape, 0.0, 1.0, seed + 1, dtype, dev)?;
        let v = Tensor::randn(shape, 0.0, 1.0, seed + 2, dtype, dev)?;
        let d_o = Tensor::randn(shape, 0.0, 1.0, seed + 3, dtype, dev)?;
        let scale = (d as f32).powf(-0.5);
        let (o, lse) = attention::attention_fwd(&q, &k, &v, scale)?;
        let want = attention::attention_bwd(&q, &k, &v, &o, &lse, &d_o, scale)?;
        let got = bwd_contiguous(&q, &k, &v, &o, &lse, &d_o, scale)?;
        for (g, w) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
            worst = worst.max(super::self_check::relative_error(&f32s(g)?, &f32s(w)?));
        }
    }
    Ok(worst)
}

/// Whether the flash kernels of this direction and dtype passed their self-check on `backend`
/// (running it on first use).
pub(crate) fn kernels_ok(backend: &Arc<CudaBackend>, backward: bool, dtype: DType) -> bool {
    backend.fast_kernel_ok(check_key(backward, dtype), check_tolerance(backward, dtype), || {
        if backward {
            check_bwd(backend, dtype)
        } else {
            check_fwd(backend, dtype)
        }
    })
}

/// `vit devices` entries (`self_check::ALL_CHECKS`).
pub(crate) fn check_fwd_bf16(b: &Arc<CudaBackend>) -> bool {
    kernels_ok(b, false, DType::BF16)
}
pub(crate) fn check_fwd_f16(b: &Arc<CudaBackend>) -> bool {
    kernels_ok(b, false, DType::F16)
}
pub(crate) fn check_bwd_bf16(b: &Arc<CudaBackend>) -> bool {
    kernels_ok(b, true, DType::BF16)
}
pub(crate) fn check_bwd_f16(b: &Arc<CudaBackend>) -> bool {
    kernels_ok(b, true, DType::F16)
}

/// `(batch, heads, queries, keys, head_dim)` of contiguous `q [B, H, N, d]`, `k [B, H, M, d]`.
fn dims(q: &Tensor, k: &Tensor) -> (usize, usize, usize, usize, usize) {
    let (qd, kd) = (q.dims(), k.dims());
    (qd[0], qd[1], qd[2], kd[2], qd[3])
}

fn contiguous_layout(q: &Tensor, k: &Tensor) -> FlashLayout {
    let (_, h, n, m, d) = dims(q, k);
    let l = FlashLayout::new(h, n, m, d);
    let l = l.contiguous(Slot::Q, 0, n).contiguous(Slot::K, 0, m).contiguous(Slot::V, 0, m);
    let l = l.contiguous(Slot::O, 0, n).contiguous(Slot::DO, 0, n).contiguous(Slot::DQ, 0, n);
    // dk and dv share one buffer [2, B, H, M, d].
    let half = q.dims()[0] * h * m * d;
    l.contiguous(Slot::DK, 0, m).contiguous(Slot::DV, half, m)
}

/// Element offsets of the inputs into their buffers must keep rows 16-byte aligned as well.
fn offsets_aligned(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.cuda_storage("flash_attention").is_ok_and(|(_, bytes)| bytes % 16 == 0))
}

/// The flash forward on contiguous `[B, H, N, d]` tensors, when eligible and self-checked; `None`
/// sends the caller to the reference kernel.
pub(crate) fn try_fwd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<(Tensor, Tensor)>> {
    let (b, h, n, m, d) = dims(q, k);
    if !eligible(q.dtype(), b * h, n, m, d, &contiguous_layout(q, k)) || !offsets_aligned(&[q, k, v]) {
        return Ok(None);
    }
    let backend = backend_of(q, "attention_fwd")?;
    if !kernels_ok(&backend, false, q.dtype()) {
        return Ok(None);
    }
    fwd_contiguous(q, k, v, scale).map(Some)
}

fn fwd_contiguous(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_fwd";
    let backend = backend_of(q, OP)?;
    let (b, h, n, _, _) = dims(q, k);
    let lse_shape = Shape::new(vec![b, h, n]);
    let mut o = output(&backend, q.shape(), q.dtype())?;
    let mut lse = output(&backend, &lse_shape, DType::F32)?;
    let layout = contiguous_layout(q, k);
    let (qv, kv, vv) = (view(q, OP)?, view(k, OP)?, view(v, OP)?);
    launch_fwd(&backend, q.dtype(), b * h, &qv, &kv, &vv, &mut o, &mut lse, &layout, scale)?;
    Ok((wrap(&backend, o, q.shape().clone(), q.dtype()), wrap(&backend, lse, lse_shape, DType::F32)))
}

/// The flash backward on contiguous tensors, when eligible and self-checked; `None` sends the
/// caller to the reference kernels.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn try_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (b, h, n, m, d) = dims(q, k);
    if !eligible(q.dtype(), b * h, n, m, d, &contiguous_layout(q, k)) || !offsets_aligned(&[q, k, v, o, d_o]) {
        return Ok(None);
    }
    let backend = backend_of(q, "attention_bwd")?;
    if !kernels_ok(&backend, true, q.dtype()) {
        return Ok(None);
    }
    bwd_contiguous(q, k, v, o, lse, d_o, scale).map(Some)
}

fn bwd_contiguous(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_bwd";
    let backend = backend_of(q, OP)?;
    let (b, h, n, m, d) = dims(q, k);
    let dt = q.dtype();
    let mut dq = output(&backend, q.shape(), dt)?;
    let kv_shape = Shape::new(vec![2 * b, h, m, d]);
    let mut dkv = output(&backend, &kv_shape, dt)?;
    let mut delta = backend.alloc(b * h * n * 4)?;
    let layout = contiguous_layout(q, k);
    let (qv, kv, vv) = (view(q, OP)?, view(k, OP)?, view(v, OP)?);
    let (ov, dov, lv) = (view(o, OP)?, view(d_o, OP)?, view(lse, OP)?);
    launch_bwd(
        &backend,
        dt,
        b * h,
        [&qv, &kv, &vv, &ov, &dov, &lv],
        &mut delta,
        &mut dq,
        Some(&mut dkv),
        &layout,
        scale,
    )?;
    let dkv = wrap(&backend, dkv, kv_shape, dt);
    Ok((wrap(&backend, dq, q.shape().clone(), dt), dkv.narrow(0, b)?, dkv.narrow(b, b)?))
}

/// The layout of self-attention on a packed projection `[B, N, channels]` with q, k, v at
/// channels `offset`, `offset + width`, `offset + 2·width`; o and dO `[B, N, width]`; dq, dk, dv
/// into a packed `[B, N, 3·width]` buffer.
fn packed_layout(n: usize, channels: usize, offset: usize, width: usize, heads: usize) -> FlashLayout {
    let dh = width / heads;
    let (src, out, grad) = ([n * channels, dh, channels], [n * width, dh, width], [n * 3 * width, dh, 3 * width]);
    FlashLayout::new(heads, n, n, dh)
        .with(Slot::Q, offset, src)
        .with(Slot::K, offset + width, src)
        .with(Slot::V, offset + 2 * width, src)
        .with(Slot::O, 0, out)
        .with(Slot::DO, 0, out)
        .with(Slot::DQ, 0, grad)
        .with(Slot::DK, width, grad)
        .with(Slot::DV, 2 * width, grad)
}

/// Whether the flash kernels take self-attention on the packed projection `qkv [B, N, channels]`
/// (q, k, v at channels `offset`, `offset + width`, `offset + 2·width`, `heads` heads) by shape,
/// dtype and alignment; whether they passed their self-check on the device is separate.
pub fn supports_packed(qkv: &Tensor, offset: usize, width: usize, heads: usize) -> bool {
    let d = qkv.dims();
    if d.len() != 3 || heads == 0 || width % heads != 0 || offset + 3 * width > d[2] {
        return false;
    }
    let layout = packed_layout(d[1], d[2], offset, width, heads);
    eligible(qkv.dtype(), d[0] * heads, d[1], d[1], width / heads, &layout)
        && (!matches!(qkv.device(), Device::Cuda(_)) || offsets_aligned(&[qkv]))
}

/// The flash forward on a packed projection `qkv [B, N, channels]` (see `ops::attention_fwd_packed`),
/// when eligible and self-checked: `(o [B, N, width], lse [B, heads, N])`; `None` sends the caller
/// to the reference path.
pub(crate) fn try_fwd_packed(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    scale: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    const OP: &str = "attention_fwd_packed";
    let (b, n, c) = (qkv.dims()[0], qkv.dims()[1], qkv.dims()[2]);
    let layout = packed_layout(n, c, offset, width, heads);
    if !eligible(qkv.dtype(), b * heads, n, n, width / heads, &layout) || !offsets_aligned(&[qkv]) {
        return Ok(None);
    }
    let backend = backend_of(qkv, OP)?;
    if !kernels_ok(&backend, false, qkv.dtype()) {
        return Ok(None);
    }
    let (o_shape, lse_shape) = (Shape::new(vec![b, n, width]), Shape::new(vec![b, heads, n]));
    let mut o = output(&backend, &o_shape, qkv.dtype())?;
    let mut lse = output(&backend, &lse_shape, DType::F32)?;
    let x = view(qkv, OP)?;
    launch_fwd(&backend, qkv.dtype(), b * heads, &x, &x, &x, &mut o, &mut lse, &layout, scale)?;
    Ok(Some((wrap(&backend, o, o_shape, qkv.dtype()), wrap(&backend, lse, lse_shape, DType::F32))))
}

/// The flash backward of [`try_fwd_packed`]: `dqkv [B, N, 3·width]` written in place by the
/// kernels, when eligible and self-checked; `None` sends the caller to the reference path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn try_bwd_packed(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    const OP: &str = "attention_bwd_packed";
    let (b, n, c) = (qkv.dims()[0], qkv.dims()[1], qkv.dims()[2]);
    let layout = packed_layout(n, c, offset, width, heads);
    if !eligible(qkv.dtype(), b * heads, n, n, width / heads, &layout) || !offsets_aligned(&[qkv, o, d_o]) {
        return Ok(None);
    }
    let backend = backend_of(qkv, OP)?;
    if !kernels_ok(&backend, true, qkv.dtype()) {
        return Ok(None);
    }
    let shape = Shape::new(vec![b, n, 3 * width]);
    let mut dqkv = output(&backend, &shape, qkv.dtype())?;
    let mut delta = backend.alloc(b * heads * n * 4)?;
    let (x, ov, dov, lv) = (view(qkv, OP)?, view(o, OP)?, view(d_o, OP)?, view(lse, OP)?);
    launch_bwd(
        &backend,
        qkv.dtype(),
        b * heads,
        [&x, &x, &x, &ov, &dov, &lv],
        &mut delta,
        &mut dqkv,
        None,
        &layout,
        scale,
    )?;
    Ok(Some(wrap(&backend, dqkv, shape, qkv.dtype())))
}

/// The reference CUDA attention forward (`kernels/attention.cu`, one warp per query row), for
/// benches and checks that compare it with the flash kernels: `(o, lse)` of contiguous
/// `q [B, H, N, d]`, `k, v [B, H, M, d]` (d ≤ 256), whatever the self-checks decided.
pub fn reference_fwd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<(Tensor, Tensor)> {
    check_reference("reference_fwd", &[q, k, v])?;
    attention::attention_fwd(q, k, v, scale)
}

/// The reference CUDA attention backward (`kernels/attention.cu`): `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn reference_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_reference("reference_bwd", &[q, k, v, o, d_o])?;
    if lse.dims() != &q.dims()[..3] || lse.dtype() != DType::F32 {
        return Err(Error::shape("reference_bwd", format!("expected f32 lse [B, H, N], got {}", lse.shape())));
    }
    attention::attention_bwd(q, k, v, o, lse, d_o, scale)
}

/// Rank-4 tensors of one float dtype with q's `[B, H, ·, d]`, as the reference kernels index them.
fn check_reference(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let q = ts[0].dims();
    let ok = ts.iter().all(|t| {
        let d = t.dims();
        d.len() == 4 && q.len() == 4 && d[0] == q[0] && d[1] == q[1] && d[3] == q[3] && t.dtype() == ts[0].dtype()
    });
    if !ok || !ts[0].dtype().is_float() {
        return Err(Error::shape(
            op,
            format!("expected [batch, heads, tokens, head_dim] float tensors, got q {}", ts[0].shape()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(dims: [usize; 3], dtype: DType) -> Tensor {
        Tensor::zeros(dims, dtype, Device::Cpu).unwrap()
    }

    #[test]
    fn packed_support_follows_dtype_head_dim_and_alignment() {
        let bf = packed([2, 197, 3 * 192], DType::BF16);
        assert!(supports_packed(&bf, 0, 192, 3));
        assert!(supports_packed(&packed([2, 197, 256 + 3 * 264], DType::F16), 256, 264, 3)); // d 88, MLP prefix
        assert!(!supports_packed(&packed([2, 197, 3 * 192], DType::F32), 0, 192, 3), "f32");
        assert!(!supports_packed(&packed([2, 197, 4 + 3 * 192], DType::BF16), 4, 192, 3), "unaligned offset");
        assert!(!supports_packed(&packed([2, 197, 3 * 768], DType::BF16), 0, 768, 3), "head dim 256");
        assert!(!supports_packed(&packed([2, 197, 3 * 108], DType::BF16), 0, 108, 3), "head dim 36");
        assert!(!supports_packed(&bf, 0, 192, 5), "width not a multiple of heads");
        assert!(!supports_packed(&bf, 8, 192, 3), "channels out of range");
    }

    #[test]
    fn padded_head_dims_are_the_kernel_variants() {
        let dims: Vec<_> = [8, 64, 80, 88, 104, 112, 128].iter().map(|&d| padded_head_dim(d)).collect();
        assert_eq!(dims, [Some(64), Some(64), Some(80), Some(96), Some(112), Some(112), Some(128)]);
        assert_eq!(padded_head_dim(136), None);
        assert_eq!(padded_head_dim(60), None);
    }

    #[test]
    fn the_layout_matches_the_kernel_struct() {
        // 4 sizes and 8 slots of 4 strides, all i64: the kernel reads it as `struct FlashLayout`.
        assert_eq!(std::mem::size_of::<FlashLayout>(), (4 + 8 * 4) * 8);
        let l = packed_layout(197, 2304, 0, 768, 12);
        assert_eq!(l.s[Slot::K as usize], [768, 197 * 2304, 64, 2304]);
        assert_eq!(l.s[Slot::DV as usize], [1536, 197 * 2304, 64, 2304]);
        assert_eq!(l.s[Slot::O as usize], [0, 197 * 768, 64, 768]);
    }
}
