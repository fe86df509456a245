//! CUDA launches of `kernels/flash_attention.cu`: tensor-core flash attention, forward and
//! deterministic backward, bf16 and f16, head dims that are multiples of 8 up to 128, any token
//! counts; q, k, v, o and the gradients addressed through strides (`FlashLayout`), so the
//! kernels read a packed qkv projection and write merged-head outputs directly.
//!
//! The ops use these kernels only after their first-use self-check passed on the device
//! (`CudaBackend::fast_kernel_ok`): a small problem per head-dim variant against the
//! reference kernels of `kernels/attention.cu`. Otherwise, and for shapes or layouts the kernels
//! do not take, the callers fall back to the reference kernels.

use super::launch::{i64_of, launch, name, MAX_BLOCKS};
use super::{attention, backend_of, output, view, wrap, CudaBackend};
use crate::{DType, Device, Error, Result, Shape, Tensor};
use cudarc::driver::{
    sys::CUfunction_attribute_enum, CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

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
    (d.is_multiple_of(8) && (8..=MAX_HEAD_DIM).contains(&d)).then(|| (d.div_ceil(16) * 16).max(64))
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

/// A tile configuration of the flash kernels (`kernels/flash_attention.cu`, "Variants"): which
/// entry points a launch uses. Every variant computes the same result up to summation order;
/// they differ in speed. The ops pick one per direction, padded head dim and token count from
/// [`default_variant`] (or `VITRS_FLASH_VARIANT=<name>`, see [`forced_variant`]), and use a
/// variant other than [`FlashVariant::M64`] only after its own self-check passed on the device
/// (`flash_attention_{fwd,bwd}_{bf16,f16}_<name>`), falling back to `M64` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlashVariant {
    /// The original kernels, every head dim: 4 warps of 16 query rows (64 queries per block),
    /// 64-key blocks; backward dq 16 queries per warp, dk/dv 16 keys per warp.
    M64,
    /// 32 rows per warp (two m16 tiles sharing every K and V fragment a warp loads, half the
    /// `ldmatrix` traffic per MMA): forward 128 queries per block (padded head dims 64 and 80),
    /// backward (64 only) dq 128 queries per block over 32-key steps, dk/dv 128 keys per block
    /// over 32-query steps.
    M128,
    /// Forward only (padded head dims 64, 80, 96): 16 rows per warp and 128-key blocks, half
    /// the barriers and softmax rescales per key of `M64`.
    N128,
    /// `M128`'s tiles at padded head dim 64, forward and backward, with one `MUFU.EX2` per
    /// softmax exponential on sm_90 and later (`ex2.approx.ftz` instead of `exp2f`'s denormal
    /// fix-up; the same code as `M128` on sm_80). An H200 profile put the `M128` forward at
    /// about 12 issued instructions per MMA (docs/kernels.md); not a default until measured.
    M128E,
}

impl FlashVariant {
    /// Every variant, the default first.
    pub const ALL: [FlashVariant; 4] = [FlashVariant::M64, FlashVariant::M128, FlashVariant::N128, FlashVariant::M128E];

    /// The variant's name (`m64`, `m128`, `n128`, `m128e`), as `VITRS_FLASH_VARIANT` takes it.
    pub fn name(self) -> &'static str {
        match self {
            FlashVariant::M64 => "m64",
            FlashVariant::M128 => "m128",
            FlashVariant::N128 => "n128",
            FlashVariant::M128E => "m128e",
        }
    }

    /// The variant called `name` (see [`FlashVariant::name`]).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
            Error::Cuda(format!("flash attention variant '{name}' unknown: expected one of {}", names.join(", ")))
        })
    }

    /// Whether the variant has kernels for the forward (`backward = false`) or backward at
    /// padded head dim `dp` (see `padded_head_dim`).
    pub fn supports(self, backward: bool, dp: usize) -> bool {
        match (self, backward) {
            (FlashVariant::M64, _) => (64..=MAX_HEAD_DIM).contains(&dp) && dp.is_multiple_of(16),
            (FlashVariant::M128, false) => dp == 64 || dp == 80,
            (FlashVariant::M128, true) => dp == 64,
            (FlashVariant::N128, false) => dp == 64 || dp == 80 || dp == 96,
            (FlashVariant::N128, true) => false,
            (FlashVariant::M128E, _) => dp == 64,
        }
    }

    /// The suffix of the variant's kernel names.
    fn suffix(self) -> &'static str {
        match self {
            FlashVariant::M64 => "",
            FlashVariant::M128 => "_m128",
            FlashVariant::N128 => "_n128",
            FlashVariant::M128E => "_m128e",
        }
    }

    /// Forward tiles: (queries per block, keys per block, Q fragments in registers), as the
    /// kernel's template arguments.
    fn fwd_tiles(self, dp: usize) -> (usize, usize, bool) {
        match self {
            FlashVariant::M64 => (64, 64, true),
            FlashVariant::M128 | FlashVariant::M128E => (128, 64, dp == 64),
            FlashVariant::N128 => (64, 128, true),
        }
    }

    /// dq tiles: (queries per block, keys per step).
    fn dq_tiles(self, dp: usize) -> (usize, usize) {
        match self {
            FlashVariant::M128 | FlashVariant::M128E => (128, 32),
            _ => (64, if dp <= 96 { 64 } else { 32 }),
        }
    }

    /// dk/dv tiles: (keys per block, queries per step).
    fn dkdv_tiles(self, dp: usize) -> (usize, usize) {
        match self {
            FlashVariant::M128 | FlashVariant::M128E => (128, 32),
            _ => (64, if dp <= 64 { 64 } else { 32 }),
        }
    }
}

impl std::fmt::Display for FlashVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The default variant per direction (`backward`), padded head dim and up to a token count:
/// the first row that matches wins, [`FlashVariant::M64`] where none does. Set from the
/// `attention_cuda` bench's variant table (docs/kernels.md); until measured, today's kernels.
// Measured on an H100 (docs/perf.md, 2026-11-26, `bench-attention_cuda`): at d = 64, M128
// runs the forward at 1.19× (N = 197) and 1.16× (N = 256) M64's TFLOP/s and the backward at
// 1.14× and 1.02×; a B/16 training step went from 76.3 to 73.6 ms with it. N128 was slower
// (0.89×). Other head dims keep M64 until measured.
const DEFAULTS: &[(bool, usize, usize, FlashVariant)] =
    &[(false, 64, usize::MAX, FlashVariant::M128), (true, 64, usize::MAX, FlashVariant::M128)];

/// The variant the ops use by default for `n` queries at padded head dim `dp`.
pub fn default_variant(backward: bool, dp: usize, n: usize) -> FlashVariant {
    DEFAULTS
        .iter()
        .find(|&&(b, d, max_n, v)| b == backward && d == dp && n <= max_n && v.supports(backward, dp))
        .map_or(FlashVariant::M64, |e| e.3)
}

/// The variant forced by `VITRS_FLASH_VARIANT=<name>` (for experiments; a direction or head dim
/// the variant lacks keeps its default), `None` when unset; an unknown name is an error.
pub fn forced_variant() -> Result<Option<FlashVariant>> {
    static FORCED: std::sync::OnceLock<std::result::Result<Option<FlashVariant>, String>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("VITRS_FLASH_VARIANT") {
        Ok(v) if !v.is_empty() => FlashVariant::parse(&v).map(Some).map_err(|e| format!("VITRS_FLASH_VARIANT: {e}")),
        _ => Ok(None),
    });
    forced.clone().map_err(Error::Cuda)
}

/// The variant a launch takes on `backend`: the forced or default one when it passed its
/// self-check there, else `M64` (whose own check the caller has already passed).
fn chosen_variant(
    backend: &Arc<CudaBackend>,
    backward: bool,
    dtype: DType,
    d: usize,
    n: usize,
) -> Result<FlashVariant> {
    let Some(dp) = padded_head_dim(d) else { return Ok(FlashVariant::M64) };
    let want = match forced_variant()? {
        Some(v) if v.supports(backward, dp) => v,
        _ => default_variant(backward, dp, n),
    };
    if want == FlashVariant::M64 || variant_ok(backend, want, backward, dtype) {
        Ok(want)
    } else {
        Ok(FlashVariant::M64)
    }
}

fn smem_fwd(v: FlashVariant, dp: usize) -> usize {
    let (bm, bn, qr) = v.fwd_tiles(dp);
    let q_rows = if qr && bm <= bn { 0 } else { bm }; // Q shares V's tile when it fits
    (2 * bn + q_rows) * (dp + PAD) * 2
}
fn smem_dq(v: FlashVariant, dp: usize) -> usize {
    let (bm, bk) = v.dq_tiles(dp);
    (2 * bm + 4 * bk) * (dp + PAD) * 2
}
fn smem_dkdv(v: FlashVariant, dp: usize) -> usize {
    let (bkeys, bq) = v.dkdv_tiles(dp);
    (2 * bkeys + 4 * bq) * (dp + PAD) * 2 + 4 * bq * 4
}

/// The kernel `op` of `variant` for `dtype` and padded head dim `dp`, allowed `smem` bytes of
/// dynamic shared memory.
fn function(
    backend: &CudaBackend,
    op: &str,
    variant: FlashVariant,
    dtype: DType,
    dp: usize,
    smem: usize,
) -> Result<CudaFunction> {
    let f = backend.function("flash_attention.cu", &format!("{}_d{dp}{}", name(op, dtype), variant.suffix()))?;
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

/// The padded head dim of `d` when `variant` has kernels for it in this direction.
fn variant_head_dim(variant: FlashVariant, backward: bool, d: usize) -> Result<usize> {
    match padded_head_dim(d) {
        Some(dp) if variant.supports(backward, dp) => Ok(dp),
        _ => Err(Error::Cuda(format!(
            "flash attention variant {variant} has no {} kernel for head dim {d}",
            if backward { "backward" } else { "forward" }
        ))),
    }
}

/// Forward over `bh = batch·heads` slabs with the kernels of `variant`: writes `o` (through
/// `layout`'s O slot) and `lse` (`[bh, n]` f32). The caller has checked [`eligible`].
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
    variant: FlashVariant,
) -> Result<()> {
    let (n, d) = (layout.n as usize, layout.d as usize);
    let dp = variant_head_dim(variant, false, d)?;
    let smem = smem_fwd(variant, dp);
    let func = function(backend, "flash_fwd", variant, dtype, dp, smem)?;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let rows = variant.fwd_tiles(dp).0;
    launch!(backend, func, cfg(n.div_ceil(rows), bh, smem), q, k, v, o, lse, layout, &scale_log2);
    Ok(())
}

/// Backward over `bh` slabs with the kernels of `variant`: `delta = rowsum(dO∘O)` into `delta` (`[bh, n]` f32 scratch), dq
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
    variant: FlashVariant,
) -> Result<()> {
    let [q, k, v, o, d_o, lse] = t;
    let (n, m, d) = (layout.n as usize, layout.m as usize, layout.d as usize);
    let dp = variant_head_dim(variant, true, d)?;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let bh_ = i64_of(bh);
    let rows = bh * n;
    let delta_cfg = LaunchConfig {
        // Eight threads per row, so 16 rows per 128-thread block.
        grid_dim: (rows.div_ceil(THREADS as usize / 8).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = backend.function("flash_attention.cu", &name("flash_bwd_delta", dtype))?;
    launch!(backend, f, delta_cfg, o, d_o, &mut *delta, layout, &bh_);
    let smem = smem_dq(variant, dp);
    let f = function(backend, "flash_bwd_dq", variant, dtype, dp, smem)?;
    launch!(
        backend,
        f,
        cfg(n.div_ceil(variant.dq_tiles(dp).0), bh, smem),
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
    let smem = smem_dkdv(variant, dp);
    let f = function(backend, "flash_bwd_dkdv", variant, dtype, dp, smem)?;
    let grid = cfg(m.div_ceil(variant.dkdv_tiles(dp).0), bh, smem);
    match dkv {
        Some(dkv) => launch!(backend, f, grid, q, k, v, d_o, lse, &*delta, dkv, layout, &scale, &scale_log2),
        None => launch!(backend, f, grid, q, k, v, d_o, lse, &*delta, dq, layout, &scale, &scale_log2),
    }
    Ok(())
}

/// Every kernel name the launchers can ask `kernels/flash_attention.cu` for (each variant,
/// direction, dtype and padded head dim it supports), so a compile check can prove the kernel
/// file and [`FlashVariant`]'s tables agree.
pub fn entry_points() -> Vec<String> {
    let mut names = Vec::new();
    for dt in [DType::BF16, DType::F16] {
        names.push(name("flash_bwd_delta", dt));
        for v in FlashVariant::ALL {
            for dp in (64..=MAX_HEAD_DIM).step_by(16) {
                if v.supports(false, dp) {
                    names.push(format!("{}_d{dp}{}", name("flash_fwd", dt), v.suffix()));
                }
                if v.supports(true, dp) {
                    for op in ["flash_bwd_dq", "flash_bwd_dkdv"] {
                        names.push(format!("{}_d{dp}{}", name(op, dt), v.suffix()));
                    }
                }
            }
        }
    }
    names
}

/// The self-check key of `variant`'s forward or backward kernels for `dtype`
/// (`flash_attention_{fwd,bwd}_{bf16,f16}[_<variant>]`; `M64`'s keys have no suffix).
fn check_key(variant: FlashVariant, backward: bool, dtype: DType) -> &'static str {
    const KEYS: [[[&str; 2]; 2]; 4] = [
        [
            ["flash_attention_fwd_bf16", "flash_attention_fwd_f16"],
            ["flash_attention_bwd_bf16", "flash_attention_bwd_f16"],
        ],
        [
            ["flash_attention_fwd_bf16_m128", "flash_attention_fwd_f16_m128"],
            ["flash_attention_bwd_bf16_m128", "flash_attention_bwd_f16_m128"],
        ],
        [
            ["flash_attention_fwd_bf16_n128", "flash_attention_fwd_f16_n128"],
            ["flash_attention_bwd_bf16_n128", "flash_attention_bwd_f16_n128"],
        ],
        [
            ["flash_attention_fwd_bf16_m128e", "flash_attention_fwd_f16_m128e"],
            ["flash_attention_bwd_bf16_m128e", "flash_attention_bwd_f16_m128e"],
        ],
    ];
    let v = FlashVariant::ALL.iter().position(|&x| x == variant).unwrap_or(0);
    KEYS[v][usize::from(backward)][usize::from(dtype != DType::BF16)]
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

/// The self-check problems of `variant` in one direction: `(tokens, head dim)`, one per padded
/// head dim it has kernels for. `M64` keeps its 97 tokens (one 64-block and a tail); the other
/// variants take 197, so that blocks of 128 still see a second block and a tail.
fn check_problems(variant: FlashVariant, backward: bool) -> Vec<(usize, usize)> {
    let tokens = if variant == FlashVariant::M64 { 97 } else { 197 };
    CHECK_HEAD_DIMS
        .iter()
        .filter(|&&d| padded_head_dim(d).is_some_and(|dp| variant.supports(backward, dp)))
        .map(|&d| (tokens, d))
        .collect()
}

/// Runs the forward self-check problems of `variant`: flash against `kernels/attention.cu`,
/// worst relative error.
fn check_fwd(backend: &Arc<CudaBackend>, dtype: DType, variant: FlashVariant) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for (i, (n, d)) in check_problems(variant, false).into_iter().enumerate() {
        let shape = [1, 2, n, d];
        let seed = 9_000 + 10 * i as u64;
        let q = Tensor::randn(shape, 0.0, 1.0, seed, dtype, dev)?;
        let k = Tensor::randn(shape, 0.0, 1.0, seed + 1, dtype, dev)?;
        let v = Tensor::randn(shape, 0.0, 1.0, seed + 2, dtype, dev)?;
        let scale = (d as f32).powf(-0.5);
        let (o_ref, lse_ref) = attention::attention_fwd(&q, &k, &v, scale)?;
        let (o, lse) = fwd_contiguous(&q, &k, &v, scale, variant)?;
        let e = super::self_check::relative_error(&f32s(&o)?, &f32s(&o_ref)?)
            .max(super::self_check::relative_error(&f32s(&lse)?, &f32s(&lse_ref)?));
        worst = worst.max(e);
    }
    Ok(worst)
}

/// Runs the backward self-check problems of `variant`: flash against `kernels/attention.cu`,
/// worst relative error.
fn check_bwd(backend: &Arc<CudaBackend>, dtype: DType, variant: FlashVariant) -> Result<f64> {
    let dev = Device::Cuda(backend.ordinal);
    let mut worst = 0.0f64;
    for (i, (n, d)) in check_problems(variant, true).into_iter().enumerate() {
        let shape = [1, 2, n, d];
        let seed = 9_500 + 10 * i as u64;
        let q = Tensor::randn(shape, 0.0, 1.0, seed, dtype, dev)?;
        let k = Tensor::randn(shape, 0.0, 1.0, seed + 1, dtype, dev)?;
        let v = Tensor::randn(shape, 0.0, 1.0, seed + 2, dtype, dev)?;
        let d_o = Tensor::randn(shape, 0.0, 1.0, seed + 3, dtype, dev)?;
        let scale = (d as f32).powf(-0.5);
        let (o, lse) = attention::attention_fwd(&q, &k, &v, scale)?;
        let want = attention::attention_bwd(&q, &k, &v, &o, &lse, &d_o, scale)?;
        let got = bwd_contiguous(&q, &k, &v, &o, &lse, &d_o, scale, variant)?;
        for (g, w) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
            worst = worst.max(super::self_check::relative_error(&f32s(g)?, &f32s(w)?));
        }
    }
    Ok(worst)
}

/// Whether `variant`'s kernels of this direction and dtype passed their self-check on
/// `backend` (running it on first use). A variant without kernels in this direction fails.
fn variant_ok(backend: &Arc<CudaBackend>, variant: FlashVariant, backward: bool, dtype: DType) -> bool {
    if check_problems(variant, backward).is_empty() {
        return false;
    }
    backend.fast_kernel_ok(check_key(variant, backward, dtype), check_tolerance(backward, dtype), || {
        if backward {
            check_bwd(backend, dtype, variant)
        } else {
            check_fwd(backend, dtype, variant)
        }
    })
}

/// Whether the default flash kernels ([`FlashVariant::M64`]) of this direction and dtype passed
/// their self-check on `backend` (running it on first use): the gate of every flash path.
pub(crate) fn kernels_ok(backend: &Arc<CudaBackend>, backward: bool, dtype: DType) -> bool {
    variant_ok(backend, FlashVariant::M64, backward, dtype)
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
/// The `vit devices` entry of the other variants: every (variant, direction, dtype) that has
/// kernels, each its own self-check key; whether all passed.
pub(crate) fn check_variants(b: &Arc<CudaBackend>) -> bool {
    let mut all = true;
    for v in FlashVariant::ALL.into_iter().filter(|&v| v != FlashVariant::M64) {
        for backward in [false, true] {
            if check_problems(v, backward).is_empty() {
                continue;
            }
            for dt in [DType::BF16, DType::F16] {
                all &= variant_ok(b, v, backward, dt);
            }
        }
    }
    all
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
    let variant = chosen_variant(&backend, false, q.dtype(), d, n)?;
    fwd_contiguous(q, k, v, scale, variant).map(Some)
}

fn fwd_contiguous(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, variant: FlashVariant) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_fwd";
    let backend = backend_of(q, OP)?;
    let (b, h, n, _, _) = dims(q, k);
    let lse_shape = Shape::new(vec![b, h, n]);
    let mut o = output(&backend, q.shape(), q.dtype())?;
    let mut lse = output(&backend, &lse_shape, DType::F32)?;
    let layout = contiguous_layout(q, k);
    let (qv, kv, vv) = (view(q, OP)?, view(k, OP)?, view(v, OP)?);
    launch_fwd(&backend, q.dtype(), b * h, &qv, &kv, &vv, &mut o, &mut lse, &layout, scale, variant)?;
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
    let variant = chosen_variant(&backend, true, q.dtype(), d, n)?;
    bwd_contiguous(q, k, v, o, lse, d_o, scale, variant).map(Some)
}

#[allow(clippy::too_many_arguments)]
fn bwd_contiguous(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
    variant: FlashVariant,
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
        variant,
    )?;
    let dkv = wrap(&backend, dkv, kv_shape, dt);
    Ok((wrap(&backend, dq, q.shape().clone(), dt), dkv.narrow(0, b)?, dkv.narrow(b, b)?))
}

/// The flash forward with the kernels of `variant`, whatever the default choice and the
/// self-checks say (for benches and tests that compare variants): `(o [B, H, N, d], lse
/// [B, H, N] f32)` of contiguous bf16 or f16 CUDA tensors `q [B, H, N, d]`, `k, v [B, H, M, d]`.
/// Errors name the shape, dtype, head dim or alignment the kernels do not take.
pub fn fwd_variant(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, variant: FlashVariant) -> Result<(Tensor, Tensor)> {
    const OP: &str = "flash_attention::fwd_variant";
    check_variant_inputs(OP, &[q, k, v], &[q, k, v], variant, false)?;
    fwd_contiguous(q, k, v, scale, variant)
}

/// The flash backward with the kernels of `variant` (see [`fwd_variant`]): `(dq, dk, dv)` of
/// `q [B, H, N, d]`, `k, v [B, H, M, d]`, the forward's `o [B, H, N, d]` and `lse [B, H, N]`
/// (f32), and `d_o [B, H, N, d]`.
#[allow(clippy::too_many_arguments)]
pub fn bwd_variant(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
    variant: FlashVariant,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "flash_attention::bwd_variant";
    check_variant_inputs(OP, &[q, k, v, o, d_o], &[q, k, v, o, d_o], variant, true)?;
    if o.dims() != q.dims() || d_o.dims() != q.dims() {
        return Err(Error::shape(
            OP,
            format!("expected o and d_o {}, got {} and {}", q.shape(), o.shape(), d_o.shape()),
        ));
    }
    check_lse(OP, lse, &q.dims()[..3])?;
    bwd_contiguous(q, k, v, o, lse, d_o, scale, variant)
}

/// The checks of [`fwd_variant`] and [`bwd_variant`]: rank-4 tensors of one dtype sharing
/// `[B, H, ·, d]`, k and v of one shape, a layout the kernels take and a head dim `variant`
/// has kernels for in this direction.
fn check_variant_inputs(
    op: &'static str,
    ts: &[&Tensor],
    aligned: &[&Tensor],
    variant: FlashVariant,
    backward: bool,
) -> Result<()> {
    check_reference(op, ts)?;
    let (q, k, v) = (ts[0], ts[1], ts[2]);
    if k.dims() != v.dims() {
        return Err(Error::shape(op, format!("expected k and v of one shape, got {} and {}", k.shape(), v.shape())));
    }
    let (b, h, n, m, d) = dims(q, k);
    if !eligible(q.dtype(), b * h, n, m, d, &contiguous_layout(q, k)) {
        return Err(Error::shape(
            op,
            format!(
                "expected bf16 or f16, head dim a multiple of 8 up to {MAX_HEAD_DIM}, N, M ≥ 1 and B·H ≤ 65535, got {:?} {}",
                q.dtype(),
                q.shape()
            ),
        ));
    }
    let _ = backend_of(q, op)?;
    if !offsets_aligned(aligned) {
        return Err(Error::shape(op, "expected 16-byte aligned tensor offsets on the GPU".to_string()));
    }
    variant_head_dim(variant, backward, d).map(|_| ())
}

/// `lse` must be f32 `[B, H, N]` (`dims`).
fn check_lse(op: &'static str, lse: &Tensor, dims: &[usize]) -> Result<()> {
    if lse.dims() != dims || lse.dtype() != DType::F32 {
        return Err(Error::shape(op, format!("expected f32 lse {dims:?}, got {:?} {}", lse.dtype(), lse.shape())));
    }
    Ok(())
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
    if d.len() != 3 || heads == 0 || !width.is_multiple_of(heads) || offset + 3 * width > d[2] {
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
    let variant = chosen_variant(&backend, false, qkv.dtype(), width / heads, n)?;
    fwd_packed(qkv, offset, width, heads, scale, variant).map(Some)
}

fn fwd_packed(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    scale: f32,
    variant: FlashVariant,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_fwd_packed";
    let (b, n, c) = (qkv.dims()[0], qkv.dims()[1], qkv.dims()[2]);
    let layout = packed_layout(n, c, offset, width, heads);
    let backend = backend_of(qkv, OP)?;
    let (o_shape, lse_shape) = (Shape::new(vec![b, n, width]), Shape::new(vec![b, heads, n]));
    let mut o = output(&backend, &o_shape, qkv.dtype())?;
    let mut lse = output(&backend, &lse_shape, DType::F32)?;
    let x = view(qkv, OP)?;
    launch_fwd(&backend, qkv.dtype(), b * heads, &x, &x, &x, &mut o, &mut lse, &layout, scale, variant)?;
    Ok((wrap(&backend, o, o_shape, qkv.dtype()), wrap(&backend, lse, lse_shape, DType::F32)))
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
    let variant = chosen_variant(&backend, true, qkv.dtype(), width / heads, n)?;
    bwd_packed(qkv, offset, width, heads, [o, lse, d_o], scale, variant).map(Some)
}

/// `[o, lse, d_o]`: the forward's outputs and the output gradient.
fn bwd_packed(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    [o, lse, d_o]: [&Tensor; 3],
    scale: f32,
    variant: FlashVariant,
) -> Result<Tensor> {
    const OP: &str = "attention_bwd_packed";
    let (b, n, c) = (qkv.dims()[0], qkv.dims()[1], qkv.dims()[2]);
    let layout = packed_layout(n, c, offset, width, heads);
    let backend = backend_of(qkv, OP)?;
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
        variant,
    )?;
    Ok(wrap(&backend, dqkv, shape, qkv.dtype()))
}

/// The packed flash forward with the kernels of `variant`, whatever the default choice and the
/// self-checks say (see [`fwd_variant`]): `(o [B, N, width], lse [B, heads, N])` of self-attention
/// on the projection `qkv [B, N, channels]` (q, k, v at channels `offset`, `offset + width`,
/// `offset + 2·width`), as `ops::attention_fwd_packed` computes it.
pub fn fwd_packed_variant(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    scale: f32,
    variant: FlashVariant,
) -> Result<(Tensor, Tensor)> {
    check_packed_variant("flash_attention::fwd_packed_variant", qkv, offset, width, heads, variant, false)?;
    fwd_packed(qkv, offset, width, heads, scale, variant)
}

/// The packed flash backward with the kernels of `variant` (see [`fwd_packed_variant`]):
/// `dqkv [B, N, 3·width]` from the forward's `o [B, N, width]`, `lse [B, heads, N]` (f32) and
/// `d_o [B, N, width]`.
#[allow(clippy::too_many_arguments)]
pub fn bwd_packed_variant(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
    variant: FlashVariant,
) -> Result<Tensor> {
    const OP: &str = "flash_attention::bwd_packed_variant";
    check_packed_variant(OP, qkv, offset, width, heads, variant, true)?;
    let (b, n) = (qkv.dims()[0], qkv.dims()[1]);
    for (name, t) in [("o", o), ("d_o", d_o)] {
        if t.dims() != [b, n, width] || t.dtype() != qkv.dtype() {
            return Err(Error::shape(
                OP,
                format!("expected {name} {:?} [{b}, {n}, {width}], got {:?} {}", qkv.dtype(), t.dtype(), t.shape()),
            ));
        }
    }
    check_lse(OP, lse, &[b, heads, n])?;
    if !offsets_aligned(&[o, d_o]) {
        return Err(Error::shape(OP, "expected 16-byte aligned tensor offsets on the GPU".to_string()));
    }
    bwd_packed(qkv, offset, width, heads, [o, lse, d_o], scale, variant)
}

/// The checks of the packed variant entry points: a layout [`supports_packed`] takes, on a GPU,
/// and a head dim `variant` has kernels for in this direction.
fn check_packed_variant(
    op: &'static str,
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    variant: FlashVariant,
    backward: bool,
) -> Result<()> {
    let _ = backend_of(qkv, op)?;
    if !supports_packed(qkv, offset, width, heads) {
        return Err(Error::shape(
            op,
            format!(
                "expected bf16 or f16 qkv [B, N, channels ≥ offset + 3·width] with head dim width/heads a multiple of 8 \
                 up to {MAX_HEAD_DIM} and aligned rows, got {:?} {} (offset {offset}, width {width}, heads {heads})",
                qkv.dtype(),
                qkv.shape()
            ),
        ));
    }
    variant_head_dim(variant, backward, width / heads).map(|_| ())
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
    fn variants_parse_by_name_and_unknown_names_are_errors() {
        for v in FlashVariant::ALL {
            assert_eq!(FlashVariant::parse(v.name()).unwrap(), v);
            assert_eq!(v.to_string(), v.name());
        }
        let err = FlashVariant::parse("m256").unwrap_err().to_string();
        assert!(err.contains("m256") && err.contains("m64, m128, n128, m128e"), "{err}");
    }

    #[test]
    fn variant_support_tables_agree() {
        // M64 has every padded head dim in both directions; the others a subset.
        for dp in [64, 80, 96, 112, 128] {
            assert!(FlashVariant::M64.supports(false, dp) && FlashVariant::M64.supports(true, dp), "{dp}");
        }
        assert!(!FlashVariant::M64.supports(false, 72) && !FlashVariant::M64.supports(true, 144));
        assert!(FlashVariant::M128.supports(false, 80) && !FlashVariant::M128.supports(false, 96));
        assert!(FlashVariant::M128.supports(true, 64) && !FlashVariant::M128.supports(true, 80));
        assert!(FlashVariant::N128.supports(false, 96) && !FlashVariant::N128.supports(true, 64));
        assert!(FlashVariant::M128E.supports(false, 64) && FlashVariant::M128E.supports(true, 64));
        assert!(!FlashVariant::M128E.supports(false, 80) && !FlashVariant::M128E.supports(true, 80));
        // Each supported direction has self-check problems, each unsupported one none.
        for v in FlashVariant::ALL {
            for backward in [false, true] {
                let any = [64, 80, 96, 112, 128].iter().any(|&dp| v.supports(backward, dp));
                assert_eq!(!check_problems(v, backward).is_empty(), any, "{v} backward {backward}");
            }
        }
        // The default kernels' names are today's; the variants' carry their suffix.
        let names = entry_points();
        assert!(names.contains(&"flash_fwd_bf16_d64".to_string()));
        assert!(names.contains(&"flash_fwd_f16_d80_m128".to_string()));
        assert!(names.contains(&"flash_bwd_dkdv_bf16_d64_m128".to_string()));
        assert!(!names.iter().any(|n| n.contains("bwd_dq_bf16_d64_n128")));
        for op in ["fwd", "bwd_dq", "bwd_dkdv"] {
            assert!(names.contains(&format!("flash_{op}_bf16_d64_m128e")), "{op}");
        }
        assert!(!names.iter().any(|n| n.contains("d80_m128e")));
    }

    #[test]
    fn self_check_keys_are_distinct_and_name_the_variant() {
        let mut keys = std::collections::BTreeSet::new();
        for v in FlashVariant::ALL {
            for backward in [false, true] {
                for dt in [DType::BF16, DType::F16] {
                    let key = check_key(v, backward, dt);
                    assert!(key.contains(if backward { "_bwd_" } else { "_fwd_" }), "{key}");
                    assert!(key.contains(if dt == DType::BF16 { "bf16" } else { "f16" }), "{key}");
                    assert_eq!(key.ends_with(v.suffix()) && v != FlashVariant::M64, !v.suffix().is_empty(), "{key}");
                    keys.insert(key);
                }
            }
        }
        assert_eq!(keys.len(), 16);
        assert_eq!(check_key(FlashVariant::M64, false, DType::BF16), "flash_attention_fwd_bf16");
    }

    #[test]
    fn variants_fit_in_shared_memory_and_defaults_are_supported() {
        // 227 KiB is the opt-in limit of sm_90 (sm_80: 163 KiB); two blocks per SM must fit too.
        for v in FlashVariant::ALL {
            for dp in [64, 80, 96, 112, 128] {
                if v.supports(false, dp) {
                    assert!(2 * smem_fwd(v, dp) <= 163 * 1024, "{v} fwd {dp}: {}", smem_fwd(v, dp));
                }
                if v.supports(true, dp) {
                    assert!(2 * smem_dq(v, dp) <= 163 * 1024, "{v} dq {dp}: {}", smem_dq(v, dp));
                    assert!(2 * smem_dkdv(v, dp) <= 163 * 1024, "{v} dkdv {dp}: {}", smem_dkdv(v, dp));
                }
            }
        }
        // Today's sizes for the default kernels (Q shares V's tile in the forward).
        assert_eq!(smem_fwd(FlashVariant::M64, 64), 2 * 64 * 72 * 2);
        assert_eq!(smem_fwd(FlashVariant::M128, 64), (2 * 64 + 128) * 72 * 2);
        assert_eq!(smem_dkdv(FlashVariant::M64, 64), (2 * 64 + 4 * 64) * 72 * 2 + 4 * 64 * 4);
        for backward in [false, true] {
            for dp in [64, 80, 96, 112, 128] {
                for n in [1, 197, 256, 4096] {
                    assert!(default_variant(backward, dp, n).supports(backward, dp));
                }
            }
        }
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
