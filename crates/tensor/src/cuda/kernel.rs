//! Custom CUDA kernels for crates above vit-tensor: compile a caller-owned source through the
//! NVRTC cache, look up a function, and launch it on a device's stream with typed arguments.
//!
//! ```no_run
//! use vit_tensor::cuda::kernel::{Arg, KernelSource, Launch};
//! use vit_tensor::{DType, Device, Tensor};
//! static SCALE: KernelSource = KernelSource::new(
//!     "scale.cu",
//!     r#"#include "common.cuh"
//! extern "C" __global__ void scale(const float* x, float* y, float s, long long n) {
//!     const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
//!     if (i < n) y[i] = x[i] * s;
//! }"#,
//! );
//! let x = Tensor::full(1.5, [1000], DType::F32, Device::Cuda(0))?;
//! let y = Tensor::zeros([1000], DType::F32, Device::Cuda(0))?; // ours alone
//! let k = SCALE.load("scale", Device::Cuda(0))?;
//! // SAFETY: the arguments match the kernel's parameters, it stays within n elements of x
//! // and y, and y is referenced by nothing else.
//! unsafe { k.launch(Launch::linear(4, 256), &[Arg::tensor(&x), Arg::tensor_mut(&y), Arg::f32(2.0), Arg::i64(1000)])? };
//! assert_eq!(y.to_vec::<f32>()?[999], 3.0);
//! # Ok::<(), vit_tensor::Error>(())
//! ```
//!
//! - [`KernelSource`]: a `&'static str` of CUDA C++ and a file name. `#include "common.cuh"` (any
//!   file of [`nvrtc::KERNEL_FILES`]) is expanded from vit-tensor's embedded `kernels/`. It is
//!   compiled once per device for the device's architecture, cached in memory and on disk by
//!   name, source hash, arch and NVRTC version (`cuda::nvrtc`). [`KernelSource::ci_failures`]
//!   is the CI compile check (sm_90a and sm_80, no errors, no spills), usable without a GPU.
//! - [`Kernel::launch`] runs on the stream every op of that device uses, so it is ordered with
//!   them. Arguments ([`Arg`]) are device pointers to tensors and [`DeviceBuffer`]s, scalars,
//!   `bytemuck::Pod` structs passed by value, and `Pod` slices uploaded for the launch
//!   (descriptor tables). Where the driver can tell (CUDA 12.4 or later), the number and sizes of
//!   the arguments are checked against the kernel's parameters before launching.
//! - Helpers for launch code: [`device_ptr`] of a tensor (for descriptor tables), [`empty`]
//!   tensors for outputs a kernel writes completely, [`copy`] on the device.
//!
//! Every error is a [`crate::Error`]: [`Error::Kernel`] names the kernel (`file:function`),
//! [`Error::Compile`] the source file.

use super::nvrtc;
use super::{backend, cuda_err, view, wrap, CudaBackend};
use crate::{DType, Device, Error, Result, Shape, Tensor};
use bytemuck::Pod;
use cudarc::driver::{sys, CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// A CUDA C++ source owned by a crate above vit-tensor, e.g.
/// `KernelSource::new("optim.cu", include_str!("../../../kernels/optim.cu"))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    name: &'static str,
    code: &'static str,
}

impl KernelSource {
    /// `name` is the file name used in messages and cache keys; `code` the source text.
    pub const fn new(name: &'static str, code: &'static str) -> Self {
        KernelSource { name, code }
    }

    /// The file name given to [`KernelSource::new`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The source as written (includes not expanded).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The source NVRTC compiles: `#include`s of vit-tensor's headers expanded.
    pub fn expanded(&self) -> String {
        nvrtc::expand_includes(self.code)
    }

    /// Compiles the source for `arch` (`sm_90a`, `sm_80`, ...) with ptxas's report, without
    /// a GPU and without the cache: see [`nvrtc::compile_check`].
    pub fn compile_check(&self, arch: &str) -> Result<nvrtc::Compiled> {
        nvrtc::compile_check(self.name, self.code, arch)
    }

    /// The CI check for every arch of [`nvrtc::CI_ARCHS`]: compile errors and register spills,
    /// one line each; empty when clean. See [`nvrtc::ci_failures`].
    pub fn ci_failures(&self) -> Vec<String> {
        nvrtc::ci_failures(self.name, self.code)
    }

    /// The `extern "C"` function `function` of this source on `device` (a CUDA device),
    /// compiling the source for it on first use.
    pub fn load(&self, function: &str, device: Device) -> Result<Kernel> {
        let label = format!("{}:{function}", self.name);
        let backend = cuda_backend(device).map_err(|msg| Error::Kernel { kernel: label.clone(), msg })?;
        let module = backend.module(self.name, self.code)?;
        let func = module.load_function(function).map_err(|e| Error::Kernel {
            kernel: label.clone(),
            msg: format!("no such function in the module: {e:?}"),
        })?;
        let params = param_sizes(&func);
        Ok(Kernel { label, func, backend, params })
    }
}

/// A kernel function loaded on one device, ready to launch on its stream.
pub struct Kernel {
    /// `file:function`, for messages.
    label: String,
    func: CudaFunction,
    backend: Arc<CudaBackend>,
    /// The sizes of the kernel's parameters in bytes, when the driver reports them.
    params: Option<Vec<usize>>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernel({} on cuda:{})", self.label, self.backend.ordinal)
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks in x, y, z (each at least 1).
    pub grid: [u32; 3],
    /// Threads per block in x, y, z (each at least 1).
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
}

impl Launch {
    /// `blocks` blocks of `threads` threads in x, no dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        Launch { grid: [blocks, 1, 1], block: [threads, 1, 1], shared_mem_bytes: 0 }
    }

    /// The same launch with `bytes` of dynamic shared memory per block.
    pub fn with_shared_mem(self, bytes: u32) -> Self {
        Launch { shared_mem_bytes: bytes, ..self }
    }
}

/// One argument of [`Kernel::launch`]. Tensors, buffers and uploaded slices are passed as a
/// device pointer (8 bytes: `const T*` / `T*` in the kernel), scalars and [`Arg::pod`] structs
/// by value.
#[derive(Debug)]
pub struct Arg<'a>(ArgKind<'a>);

#[derive(Debug)]
enum ArgKind<'a> {
    /// The address of the tensor's first element (read, or written under `tensor_mut`'s contract).
    Tensor(&'a Tensor),
    /// The address of byte `offset` of the buffer.
    Buffer { buffer: &'a DeviceBuffer, offset: usize },
    /// Bytes passed by value.
    Value(Vec<u8>),
    /// Bytes uploaded to a fresh device buffer for this launch; its address is passed.
    Upload(Vec<u8>),
}

impl<'a> Arg<'a> {
    /// A tensor the kernel only reads (`const T*` to its first element; a view's offset
    /// included). It must be on the kernel's device.
    pub fn tensor(tensor: &'a Tensor) -> Self {
        Arg(ArgKind::Tensor(tensor))
    }

    /// A tensor the kernel writes in place (`T*` to its first element).
    ///
    /// # Safety
    /// Tensors are immutable values that share storage (clones, `reshape` and `narrow` views):
    /// the caller guarantees that nothing else references the elements the kernel writes (e.g.
    /// a tensor it has just created with [`empty`] or `Tensor::zeros` and not shared yet).
    pub unsafe fn tensor_mut(tensor: &'a Tensor) -> Self {
        Arg(ArgKind::Tensor(tensor))
    }

    /// A buffer the kernel reads (a pointer to its first byte).
    pub fn buffer(buffer: &'a DeviceBuffer) -> Self {
        Arg(ArgKind::Buffer { buffer, offset: 0 })
    }

    /// A pointer to byte `offset` of a buffer (at most its length): one uploaded table can hold
    /// several arrays.
    pub fn buffer_at(buffer: &'a DeviceBuffer, offset: usize) -> Self {
        Arg(ArgKind::Buffer { buffer, offset })
    }

    /// A buffer the kernel writes (scratch, results to read back).
    pub fn buffer_mut(buffer: &'a mut DeviceBuffer) -> Self {
        Arg(ArgKind::Buffer { buffer, offset: 0 })
    }

    /// A `float`.
    pub fn f32(v: f32) -> Self {
        Self::pod(&v)
    }

    /// An `int`.
    pub fn i32(v: i32) -> Self {
        Self::pod(&v)
    }

    /// An `unsigned int`.
    pub fn u32(v: u32) -> Self {
        Self::pod(&v)
    }

    /// A `long long` (sizes, by the kernels' convention).
    pub fn i64(v: i64) -> Self {
        Self::pod(&v)
    }

    /// An `unsigned long long`.
    pub fn u64(v: u64) -> Self {
        Self::pod(&v)
    }

    /// A struct passed by value: `T` must be `#[repr(C)]` with the layout of the kernel's
    /// parameter type (assert the size on both sides).
    pub fn pod<T: Pod>(v: &T) -> Self {
        Arg(ArgKind::Value(bytemuck::bytes_of(v).to_vec()))
    }

    /// A table uploaded to the device for this launch, passed as a pointer to its first element
    /// (`const T*`); freed in stream order after the launch. `T` must be `#[repr(C)]` with the
    /// layout of the kernel's element type.
    pub fn slice<T: Pod>(v: &[T]) -> Self {
        Arg(ArgKind::Upload(bytemuck::cast_slice(v).to_vec()))
    }

    /// Bytes this argument occupies in the kernel's parameter list.
    fn size(&self) -> usize {
        match &self.0 {
            ArgKind::Value(bytes) => bytes.len(),
            _ => 8,
        }
    }
}

impl Kernel {
    /// The device the kernel runs on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.backend.ordinal)
    }

    /// `file:function`.
    pub fn name(&self) -> &str {
        &self.label
    }

    /// The byte sizes of the kernel's parameters as the driver reports them (CUDA 12.4 or
    /// later; `None` before, and for a kernel without parameters), which [`Kernel::launch`]
    /// checks its arguments against.
    pub fn param_sizes(&self) -> Option<&[usize]> {
        self.params.as_deref()
    }

    /// Queues the kernel on its device's stream with `args` (in the order of the kernel's
    /// parameters). Returns when the launch is queued, not when it has run; reading a result
    /// back (`Tensor::to_vec`, [`DeviceBuffer::to_vec`]) waits for it.
    ///
    /// Checked here: the launch shape, every tensor and buffer is on the kernel's device, buffer
    /// offsets, and (CUDA 12.4 or later) the number and byte sizes of the arguments.
    ///
    /// # Safety
    /// - Each argument has the type of the kernel's parameter (pointer arguments point to the
    ///   element type the kernel expects; `Pod` layouts match the kernel's structs).
    /// - Every access the kernel makes stays within the tensors and buffers passed, or the
    ///   memory that pointers in uploaded tables point to; those must stay alive until the
    ///   kernel has run (dropping them after `launch` returns is fine: frees are stream-ordered).
    /// - The kernel writes only tensors passed with [`Arg::tensor_mut`] (whose contract then
    ///   holds), buffers, and memory the caller owns exclusively in the same sense.
    pub unsafe fn launch(&self, cfg: Launch, args: &[Arg<'_>]) -> Result<()> {
        let err = |msg: String| Error::Kernel { kernel: self.label.clone(), msg };
        if cfg.grid.contains(&0) || cfg.block.contains(&0) {
            return Err(err(format!(
                "grid {:?} and block {:?} must be at least 1 in every dimension",
                cfg.grid, cfg.block
            )));
        }
        if let Some(params) = &self.params {
            if params.len() != args.len() {
                return Err(err(format!("takes {} parameters, got {} arguments", params.len(), args.len())));
            }
            for (i, (&want, a)) in params.iter().zip(args).enumerate() {
                if a.size() != want {
                    return Err(err(format!(
                        "argument {i} is {} bytes, the kernel's parameter is {want} bytes",
                        a.size()
                    )));
                }
            }
        }
        let stream = &self.backend.stream;
        let on_device = |i: usize, d: Device| {
            if d == self.device() {
                Ok(())
            } else {
                Err(err(format!("argument {i} is on {d}, expected {} (the kernel's device)", self.device())))
            }
        };
        // Every parameter's bytes, in 8-byte words (the driver copies each parameter's size
        // from the address it is given); uploads live until the launch is queued.
        let mut words: Vec<Vec<u64>> = Vec::with_capacity(args.len());
        let mut uploads: Vec<CudaSlice<u8>> = Vec::new();
        for (i, a) in args.iter().enumerate() {
            let ptr = match &a.0 {
                ArgKind::Tensor(tensor) => {
                    on_device(i, tensor.device())?;
                    let v = view(tensor, "kernel launch")?;
                    let p = v.device_ptr(stream).0;
                    p
                }
                ArgKind::Buffer { buffer, offset } => {
                    on_device(i, buffer.device())?;
                    if *offset > buffer.len {
                        return Err(err(format!(
                            "argument {i}: offset {offset} beyond the buffer's {} bytes",
                            buffer.len
                        )));
                    }
                    buffer.device_ptr() + *offset as u64
                }
                ArgKind::Value(bytes) => {
                    let mut w = vec![0u64; bytes.len().div_ceil(8).max(1)];
                    bytemuck::cast_slice_mut::<u64, u8>(&mut w)[..bytes.len()].copy_from_slice(bytes);
                    words.push(w);
                    continue;
                }
                ArgKind::Upload(bytes) => {
                    let s = if bytes.is_empty() {
                        self.backend.alloc(1)?
                    } else {
                        stream.clone_htod(bytes).map_err(|e| err(format!("uploading argument {i}: {e:?}")))?
                    };
                    let p = s.device_ptr(stream).0;
                    uploads.push(s);
                    p
                }
            };
            words.push(vec![ptr]);
        }
        let mut builder = stream.launch_builder(&self.func);
        for w in &words {
            // The address of the first word: the driver reads the parameter's size from there.
            builder.arg(&w[0]);
        }
        let launch = LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shared_mem_bytes,
        };
        // SAFETY: the caller's contract (see above); the parameter bytes outlive the call.
        unsafe { builder.launch(launch) }.map_err(|e| err(format!("launch failed: {e:?}")))?;
        drop(uploads);
        Ok(())
    }
}

/// The byte sizes of `func`'s parameters, or `None` when the driver cannot say (before CUDA
/// 12.4, an unexpected error, or no parameters).
fn param_sizes(func: &CudaFunction) -> Option<Vec<usize>> {
    let mut version = 0;
    // SAFETY: an out-parameter.
    if unsafe { sys::cuDriverGetVersion(&mut version) } != sys::CUresult::CUDA_SUCCESS || version < 12040 {
        return None;
    }
    let mut sizes = Vec::new();
    loop {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: a live function handle and out-parameters.
        match unsafe { sys::cuFuncGetParamInfo(func.cu_function(), sizes.len(), &mut offset, &mut size) } {
            sys::CUresult::CUDA_SUCCESS => sizes.push(size),
            // Past the last parameter. No parameter at all reads as "unknown": a kernel without
            // parameters needs no check, and a driver that fails the first query (a function
            // not loaded yet, say) must not make every launch an error.
            sys::CUresult::CUDA_ERROR_INVALID_VALUE => return (!sizes.is_empty()).then_some(sizes),
            _ => return None,
        }
        if sizes.len() > 4096 {
            return None;
        }
    }
}

/// The backend of a CUDA `device`, or a message saying it is not one.
fn cuda_backend(device: Device) -> std::result::Result<Arc<CudaBackend>, String> {
    match device {
        Device::Cuda(i) => backend(i).map_err(|e| e.to_string()),
        Device::Cpu => Err("expected a CUDA device, got cpu".into()),
    }
}

fn backend_for(op: &'static str, device: Device) -> Result<Arc<CudaBackend>> {
    match device {
        Device::Cuda(i) => backend(i),
        Device::Cpu => Err(Error::value(op, "expected a CUDA device, got cpu")),
    }
}

/// Whether the fast kernel `kernel` of a crate built on this API may be used on CUDA `device`:
/// the self-check of `vit_tensor::cuda::self_check` (issue 14 item 7). On the first call per
/// device, runs `check` (a small problem computed with the fast path and the reference path;
/// returns their relative error) and records the result; `false` for a failed or erroring check
/// (after one warning), for a kernel turned off by `VITRS_FAST_KERNELS=off` or
/// `VITRS_FAST_KERNELS_OFF=<kernel>`, while its check runs, and on the CPU.
pub fn fast_kernel_ok(
    device: Device,
    kernel: &'static str,
    tolerance: f64,
    check: impl FnOnce() -> Result<f64>,
) -> bool {
    match device {
        Device::Cuda(i) => backend(i).is_ok_and(|b| b.fast_kernel_ok(kernel, tolerance, check)),
        Device::Cpu => false,
    }
}

/// Bytes on one CUDA device that are not a tensor: scratch space, uploaded tables, results to
/// read back. Freed (in stream order) when dropped.
pub struct DeviceBuffer {
    buf: CudaSlice<u8>,
    /// Bytes asked for (the allocation has at least 1).
    len: usize,
    backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on cuda:{})", self.len, self.backend.ordinal)
    }
}

impl DeviceBuffer {
    /// `bytes` zero bytes on `device`.
    pub fn zeros(device: Device, bytes: usize) -> Result<Self> {
        let backend = backend_for("DeviceBuffer::zeros", device)?;
        Ok(DeviceBuffer { buf: backend.alloc(bytes)?, len: bytes, backend })
    }

    /// `bytes` uninitialised bytes on `device` (no memset).
    ///
    /// # Safety
    /// The caller writes every byte it later reads (by a kernel) before reading it.
    pub unsafe fn uninit(device: Device, bytes: usize) -> Result<Self> {
        let backend = backend_for("DeviceBuffer::uninit", device)?;
        // SAFETY: the caller's contract.
        let buf = unsafe { backend.stream.alloc::<u8>(bytes.max(1)) }.map_err(cuda_err)?;
        Ok(DeviceBuffer { buf, len: bytes, backend })
    }

    /// A copy of `data` on `device` (a descriptor table, say).
    pub fn upload<T: Pod>(device: Device, data: &[T]) -> Result<Self> {
        let backend = backend_for("DeviceBuffer::upload", device)?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buf =
            if bytes.is_empty() { backend.alloc(1)? } else { backend.stream.clone_htod(bytes).map_err(cuda_err)? };
        Ok(DeviceBuffer { buf, len: bytes.len(), backend })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device the bytes live on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.backend.ordinal)
    }

    /// The device address of the first byte (for descriptor tables).
    pub fn device_ptr(&self) -> u64 {
        self.buf.device_ptr(&self.backend.stream).0
    }

    /// The contents as `T`s (waits for the stream). The length must be a multiple of `T`'s size.
    pub fn to_vec<T: Pod>(&self) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        if size == 0 || !self.len.is_multiple_of(size) {
            return Err(Error::value(
                "DeviceBuffer::to_vec",
                format!("{} bytes are not a whole number of {size}-byte elements", self.len),
            ));
        }
        if self.len == 0 {
            return Ok(Vec::new());
        }
        super::count_host_read();
        let bytes = self.backend.stream.clone_dtoh(&self.buf.slice(..self.len)).map_err(cuda_err)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// The device address of `t`'s first element (a view's offset included), for descriptor
/// tables. `t` must be a CUDA tensor. The address is valid while `t` (or another reference to
/// its storage) is alive; a kernel that writes through it needs the guarantee of
/// [`Arg::tensor_mut`].
pub fn device_ptr(t: &Tensor) -> Result<u64> {
    let (s, _) = t.cuda_storage("device_ptr")?;
    let v = view(t, "device_ptr")?;
    let p = v.device_ptr(&s.backend.stream).0;
    Ok(p)
}

/// The stream every op, copy and kernel of CUDA `device` runs on (created with the device's
/// backend on first use), for crates that enqueue work of their own libraries on it (NCCL in
/// `vit-collective`): work queued on it is ordered with every tensor op of the device.
pub fn stream(device: Device) -> Result<Arc<cudarc::driver::CudaStream>> {
    Ok(backend_for("stream", device)?.stream.clone())
}

/// The communication stream of CUDA `device`: a second non-blocking stream of the device's
/// context, made once on first use (by forking the compute stream, [`stream`]), for NCCL work
/// that overlaps the compute stream's (the data-parallel gradient all-reduce during backward).
///
/// Nothing orders it with the compute stream by itself (event tracking is off): its users make
/// it wait for the compute stream before reading what that wrote ([`comm_waits_for_compute`]),
/// keep the memory it uses alive and unwritten until the compute stream has waited for it
/// ([`compute_waits_for_comm`]), and allocate its own scratch memory on it (the rules are
/// documented at `CudaBackend::comm` in `vit_tensor::cuda`).
pub fn comm_stream(device: Device) -> Result<Arc<cudarc::driver::CudaStream>> {
    let backend = backend_for("comm_stream", device)?;
    if let Some(s) = backend.comm.get() {
        return Ok(s.clone());
    }
    let made = backend.stream.fork().map_err(cuda_err)?;
    // Two threads racing here both fork; one stream is kept, the other dropped unused.
    Ok(backend.comm.get_or_init(|| made).clone())
}

/// Makes the communication stream of CUDA `device` ([`comm_stream`]) wait, on the device (the
/// host does not block), for everything queued on its compute stream so far: an event recorded
/// on the compute stream, waited for by the communication stream. Work queued on the
/// communication stream afterwards sees every earlier write of the compute stream.
pub fn comm_waits_for_compute(device: Device) -> Result<()> {
    let backend = backend_for("comm_waits_for_compute", device)?;
    comm_stream(device)?.join(&backend.stream).map_err(cuda_err)
}

/// Makes the compute stream of CUDA `device` wait, on the device (the host does not block), for
/// everything queued on its communication stream so far ([`comm_stream`]): every op queued on
/// the compute stream afterwards sees the communication stream's results, and may then write or
/// free the memory it used. Returns the event recorded on the communication stream, which the
/// caller may poll from the host (`CudaEvent::try_is_complete`).
pub fn compute_waits_for_comm(device: Device) -> Result<cudarc::driver::CudaEvent> {
    let backend = backend_for("compute_waits_for_comm", device)?;
    let event = comm_stream(device)?.record_event(None).map_err(cuda_err)?;
    backend.stream.wait(&event).map_err(cuda_err)?;
    Ok(event)
}

/// A tensor of `shape` and `dtype` on CUDA `device` whose elements are not initialised (no
/// memset): for outputs a kernel writes completely.
///
/// # Safety
/// Every element is written (by a kernel) before anything reads it.
pub unsafe fn empty(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
    let backend = backend_for("empty", device)?;
    let shape = shape.into();
    let bytes = shape.numel() * dtype.size_in_bytes();
    // The caller's contract makes the uninitialised bytes safe (poisoned under VITRS_CUDA_POISON).
    let buf = backend.alloc_uninit(bytes)?;
    Ok(wrap(&backend, buf, shape, dtype))
}

/// A copy of the CUDA tensor `x` in fresh storage on its device (`cuMemcpyDtoDAsync`), e.g.
/// the bandwidth reference of a bench.
pub fn copy(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "copy";
    let backend = super::backend_of(x, OP)?;
    let bytes = x.numel() * x.dtype().size_in_bytes();
    // SAFETY: the copy below writes every byte the tensor covers.
    let mut out = unsafe { backend.stream.alloc::<u8>(bytes.max(1)) }.map_err(cuda_err)?;
    if bytes > 0 {
        let src = view(x, OP)?;
        backend.stream.memcpy_dtod(&src, &mut out.slice_mut(..bytes)).map_err(cuda_err)?;
    }
    Ok(wrap(&backend, out, x.shape().clone(), x.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_devices_and_tensors_are_refused_with_clear_errors() {
        let src = KernelSource::new("k.cu", "extern \"C\" __global__ void k() {}");
        let e = src.load("k", Device::Cpu).unwrap_err();
        assert!(matches!(&e, Error::Kernel { kernel, msg } if kernel == "k.cu:k" && msg.contains("cpu")), "{e}");
        assert!(matches!(DeviceBuffer::zeros(Device::Cpu, 8), Err(Error::Value { op: "DeviceBuffer::zeros", .. })));
        assert!(matches!(DeviceBuffer::upload(Device::Cpu, &[1u32]), Err(Error::Value { .. })));
        // SAFETY: nothing is allocated for a host device.
        assert!(matches!(unsafe { empty([4], DType::F32, Device::Cpu) }, Err(Error::Value { op: "empty", .. })));
        let t = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
        assert!(matches!(device_ptr(&t), Err(Error::Device { op: "device_ptr", .. })));
        assert!(matches!(copy(&t), Err(Error::Device { op: "copy", .. })));
        let e = comm_stream(Device::Cpu).unwrap_err();
        assert!(matches!(&e, Error::Value { op: "comm_stream", .. }) && e.to_string().contains("got cpu"), "{e}");
        assert!(matches!(comm_waits_for_compute(Device::Cpu), Err(Error::Value { op: "comm_waits_for_compute", .. })));
        assert!(matches!(compute_waits_for_comm(Device::Cpu), Err(Error::Value { op: "compute_waits_for_comm", .. })));
    }

    #[test]
    fn arguments_have_their_c_sizes() {
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        struct Three {
            a: f32,
            b: f32,
            c: f32,
        }
        let t = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
        let sizes: Vec<usize> = [
            Arg::f32(1.0),
            Arg::i32(1),
            Arg::u32(1),
            Arg::i64(1),
            Arg::u64(1),
            Arg::pod(&Three { a: 1.0, b: 2.0, c: 3.0 }),
            Arg::slice(&[1u8, 2, 3]),
            Arg::tensor(&t),
        ]
        .iter()
        .map(Arg::size)
        .collect();
        assert_eq!(sizes, [4, 4, 4, 8, 8, 12, 8, 8]);
        let Arg(ArgKind::Value(bytes)) = Arg::pod(&Three { a: 1.0, b: 2.0, c: 3.0 }) else { panic!("by value") };
        assert_eq!(bytes[4..8], 2.0f32.to_le_bytes());
    }

    #[test]
    fn launch_shapes() {
        let l = Launch::linear(7, 256).with_shared_mem(1024);
        assert_eq!(l, Launch { grid: [7, 1, 1], block: [256, 1, 1], shared_mem_bytes: 1024 });
    }
}
