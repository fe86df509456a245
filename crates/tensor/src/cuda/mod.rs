//! CUDA backend: one context and stream per device, the NVRTC kernel cache, cuBLAS(Lt) GEMM,
//! and device storage. Everything goes through cudarc's dynamic loading, so the crate builds
//! and runs without CUDA installed; [`available`] asks before anything touches the driver.

mod launch;

pub(crate) mod attention;
pub(crate) mod blas;
pub(crate) mod elementwise;
pub mod flash_attention;
mod host_reads;
pub(crate) mod im2col;
pub(crate) mod index;
pub mod kernel;
pub(crate) mod layout;
pub(crate) mod linear;
pub(crate) mod lt;
pub(crate) mod moe_dispatch;
pub(crate) mod norm;
pub mod nvrtc;
pub(crate) mod patch;
pub(crate) mod reduce;
pub(crate) mod routing;
pub mod self_check;
pub(crate) mod softmax;
mod storage;
pub(crate) mod v32;

pub use blas::{cached_gemm_plans, matmul_into};
pub(crate) use host_reads::count_host_read;
pub use host_reads::host_reads;
pub(crate) use storage::CudaStorage;

use crate::{DType, Device, Error, Result, Shape, Tensor};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, LaunchConfig};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

/// True when the CUDA driver library loads and reports at least one device. Never panics
/// (cudarc panics on first use of a missing library, so this checks for it first).
pub fn available() -> bool {
    device_count() > 0
}

/// Number of CUDA devices, 0 when the driver is missing or fails to initialise.
pub fn device_count() -> usize {
    // SAFETY: is_culib_present only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// True when the NVRTC library can be loaded (needed to compile kernels).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

pub(crate) fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// One device: its context, the stream every op runs on, loaded kernel modules and BLAS handles.
pub(crate) struct CudaBackend {
    pub(crate) ordinal: usize,
    pub(crate) stream: Arc<CudaStream>,
    /// The communication stream ([`kernel::comm_stream`]), made on first use.
    ///
    /// Stream discipline: everything of this device (ops, copies, allocations and frees of the
    /// stream-ordered pool) runs on `stream`, and cudarc's per-allocation event tracking is off
    /// (see [`backend`]), so nothing orders other streams with it automatically. Work on the
    /// communication stream (NCCL's gradient all-reduce, overlapped with backward) follows these
    /// rules, which its users uphold:
    /// - before it reads memory that `stream` wrote, it waits for an event recorded on `stream`
    ///   after the write ([`kernel::comm_waits_for_compute`]);
    /// - memory it reads or writes stays allocated (no tensor dropped, so no stream-ordered
    ///   free on `stream` may hand it out again) and unwritten by `stream` until `stream` has
    ///   waited for an event recorded on it after that work ([`kernel::compute_waits_for_comm`]);
    ///   in particular, `stream` waits for it before anything (the optimizer) reads its results;
    /// - it allocates nothing from tensors: its own scratch memory is allocated and freed on it.
    comm: OnceLock<Arc<CudaStream>>,
    /// `sm_90a` on Hopper, `sm_XY` otherwise (design §4).
    pub(crate) arch: String,
    /// Loaded modules by (address, length) of their static source text.
    modules: Mutex<HashMap<(usize, usize), Arc<CudaModule>>>,
    blas: OnceLock<blas::Handles>,
    /// Results of the fast kernels' first-use checks on this device.
    self_checks: self_check::SelfChecks,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{}, {})", self.ordinal, self.arch)
    }
}

/// The backend of device `ordinal`, created on first use.
pub(crate) fn backend(ordinal: usize) -> Result<Arc<CudaBackend>> {
    static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let mut map = BACKENDS.get_or_init(Default::default).lock().expect("backend map poisoned");
    if let Some(b) = map.get(&ordinal) {
        return Ok(b.clone());
    }
    let count = device_count();
    if ordinal >= count {
        return Err(Error::Cuda(format!("device cuda:{ordinal} requested, {count} CUDA device(s) available")));
    }
    let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
    let (major, minor) = ctx.compute_capability().map_err(cuda_err)?;
    let arch = if major == 9 && minor == 0 { "sm_90a".to_string() } else { format!("sm_{major}{minor}") };
    // Stream discipline (issue 14 item 2): every op, copy and free of this device is ordered on
    // one stream, so cudarc's per-allocation read/write events (two cuEventCreate per buffer)
    // buy nothing; turn them off before the first allocation. Code that adds a stream (a copy
    // stream, NCCL) orders it against this one with explicit events.
    // SAFETY: no CudaSlice of this context exists yet; all work is on `stream` below.
    unsafe { ctx.disable_event_tracking() };
    keep_freed_memory(&ctx)?;
    // A non-blocking stream of our own rather than the legacy default stream: it does not
    // serialise with other libraries' work and it can be captured into a CUDA graph.
    let stream = ctx.new_stream().map_err(cuda_err)?;
    let b = Arc::new(CudaBackend {
        ordinal,
        stream,
        comm: OnceLock::new(),
        arch,
        modules: Mutex::new(HashMap::new()),
        blas: OnceLock::new(),
        self_checks: Default::default(),
    });
    map.insert(ordinal, b.clone());
    Ok(b)
}

impl CudaBackend {
    /// The kernel `name` from `kernels/<file>`, compiled for this device on first use.
    pub(crate) fn function(&self, file: &'static str, name: &str) -> Result<CudaFunction> {
        let raw = nvrtc::KERNEL_FILES
            .iter()
            .find(|(n, _)| *n == file)
            .ok_or_else(|| Error::Cuda(format!("no kernel file {file} in kernels/")))?
            .1;
        let module = self.module(file, raw)?;
        module.load_function(name).map_err(|e| Error::Cuda(format!("kernel {name} not found in {file}: {e:?}")))
    }

    /// The module of the CUDA source `code` (named `file` in messages and cache keys; its
    /// `#include`s of our headers expanded), compiled for this device on first use. Loaded
    /// modules are keyed by the address of the static source, so a lookup costs no hashing.
    pub(crate) fn module(&self, file: &'static str, code: &'static str) -> Result<Arc<CudaModule>> {
        let key = (code.as_ptr() as usize, code.len());
        let mut modules = self.modules.lock().expect("module map poisoned");
        if let Some(m) = modules.get(&key) {
            return Ok(m.clone());
        }
        let image = nvrtc::compile_cached(file, &nvrtc::expand_includes(code), &self.arch)?;
        let m = self.stream.context().load_module(cudarc::nvrtc::Ptx::from_binary(image)).map_err(cuda_err)?;
        modules.insert(key, m.clone());
        Ok(m)
    }

    /// A zeroed device buffer of `bytes` bytes (for accumulators and `Tensor::zeros`).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(cuda_err)
    }

    /// A device buffer of `bytes` bytes with unspecified contents, from the stream-ordered pool
    /// and without a memset: for outputs that the kernel writing them covers completely.
    pub(crate) fn alloc_uninit(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: u8 has no invalid bit patterns; callers write every byte they later read.
        let mut buf = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(cuda_err)?;
        if poison_outputs() {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
            // SAFETY: ptr addresses the buffer's bytes.max(1) bytes on this stream.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes.max(1), self.stream.cu_stream()) }
                .map_err(cuda_err)?;
        }
        Ok(buf)
    }

    pub(crate) fn blas(&self) -> Result<&blas::Handles> {
        if let Some(h) = self.blas.get() {
            return Ok(h);
        }
        let h = blas::Handles::new(self.stream.clone())?;
        Ok(self.blas.get_or_init(|| h))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }
}

/// Makes the device's stream-ordered memory pool keep freed memory for reuse instead of
/// returning it to the driver at every synchronisation (its default release threshold is 0), so
/// a training step's activations are served from the pool after the first step, without
/// cudaMalloc/cudaFree calls. Without async allocation support (old drivers) cudarc allocates
/// synchronously and there is no pool to configure.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on this context's device; the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().map_err(cuda_err)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(cuda_err)
    }
}

/// Device memory held by vitrs on one device, in bytes, from its stream-ordered pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in live allocations now.
    pub used: u64,
    /// The most bytes in live allocations since the device was first used or since
    /// [`reset_peak_memory`].
    pub used_peak: u64,
    /// Bytes the pool holds from the driver now (live allocations and freed memory kept).
    pub reserved: u64,
}

fn default_pool(ordinal: usize) -> Result<cudarc::driver::sys::CUmemoryPool> {
    let b = backend(ordinal)?;
    let ctx = b.stream.context();
    if !ctx.has_async_alloc() {
        return Err(Error::Cuda(format!(
            "cuda:{ordinal} has no stream-ordered memory pool (driver without cuMemAllocAsync): no memory statistics"
        )));
    }
    let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver query on this device.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().map_err(cuda_err)?;
    Ok(pool)
}

/// The memory statistics of device `ordinal` (see [`MemoryStats`]).
pub fn memory_stats(ordinal: usize) -> Result<MemoryStats> {
    use cudarc::driver::sys::{cuMemPoolGetAttribute, CUmemPool_attribute as A};
    let pool = default_pool(ordinal)?;
    let get = |attr: A| -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: these attributes are u64 (cuuint64_t).
        unsafe { cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }.result().map_err(cuda_err)?;
        Ok(v)
    };
    Ok(MemoryStats {
        used: get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        used_peak: get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        reserved: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
    })
}

/// Starts a new peak for [`MemoryStats::used_peak`] at the current use.
pub fn reset_peak_memory(ordinal: usize) -> Result<()> {
    use cudarc::driver::sys::{cuMemPoolSetAttribute, CUmemPool_attribute as A};
    let pool = default_pool(ordinal)?;
    let mut zero = 0u64;
    // SAFETY: the high-water mark is reset by setting it to 0 (a u64).
    unsafe { cuMemPoolSetAttribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut zero as *mut u64).cast()) }
        .result()
        .map_err(cuda_err)
}

/// True when `VITRS_CUDA_POISON` is set (to anything but `0`): uninitialised outputs are filled
/// with 0xFF bytes (NaN in f32, bf16 and f16) so that an element a kernel forgets to write shows
/// up in tests. `scripts/gpu-check.sh` sets it for the GPU tests.
fn poison_outputs() -> bool {
    static POISON: OnceLock<bool> = OnceLock::new();
    *POISON.get_or_init(|| std::env::var("VITRS_CUDA_POISON").is_ok_and(|v| v != "0"))
}

/// Blocks until every op queued on device `ordinal` has finished (for benchmarks).
pub fn synchronize(ordinal: usize) -> Result<()> {
    backend(ordinal)?.synchronize()
}

/// The backend of a CUDA tensor.
pub(crate) fn backend_of(t: &Tensor, op: &'static str) -> Result<Arc<CudaBackend>> {
    Ok(t.cuda_storage(op)?.0.backend.clone())
}

/// A read-only byte view of a CUDA tensor's elements.
pub(crate) fn view<'a>(t: &'a Tensor, op: &'static str) -> Result<CudaView<'a, u8>> {
    let (s, offset) = t.cuda_storage(op)?;
    Ok(s.buf.slice(offset..offset + t.numel() * t.dtype().size_in_bytes()))
}

/// A fresh output buffer for a tensor of `shape` and `dtype` on `backend`, **not zeroed**: for
/// kernels that write every element (see [`CudaBackend::alloc_uninit`]).
pub(crate) fn output(backend: &Arc<CudaBackend>, shape: &Shape, dtype: DType) -> Result<CudaSlice<u8>> {
    backend.alloc_uninit(shape.numel() * dtype.size_in_bytes())
}

/// A fresh zeroed output buffer, for kernels that write only some elements or accumulate.
pub(crate) fn output_zeroed(backend: &Arc<CudaBackend>, shape: &Shape, dtype: DType) -> Result<CudaSlice<u8>> {
    backend.alloc(shape.numel() * dtype.size_in_bytes())
}

/// Wraps a device buffer written by a kernel as a tensor.
pub(crate) fn wrap(backend: &Arc<CudaBackend>, buf: CudaSlice<u8>, shape: impl Into<Shape>, dtype: DType) -> Tensor {
    Tensor::from_storage(
        crate::storage::Storage::Cuda(CudaStorage { buf, backend: backend.clone() }),
        shape.into(),
        dtype,
        Device::Cuda(backend.ordinal),
    )
}

/// A 1-D launch of `n` threads in blocks of 256.
pub(crate) fn grid_1d(n: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row, `rows` blocks (row-wise reductions), with `smem` bytes of shared memory.
pub(crate) fn grid_rows(rows: usize, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}
