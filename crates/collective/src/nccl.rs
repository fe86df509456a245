//! The NCCL backend: [`NcclCommunicator`] is one rank of an NCCL communicator, bound to one CUDA
//! device of `vit-tensor`'s backend and working on that device's stream, so its collectives are
//! ordered with every tensor op of the device without events. NCCL is opened at run time
//! (cudarc's dynamic loading of `libnccl.so`); [`nccl_available`] says whether it can be.
//!
//! Same rules as the other backends ([`crate::Communicator`]), on device memory:
//! - every collective first all-gathers the ranks' call signatures (op, reduce op, root, shape,
//!   dtype, device) over NCCL and checks them with the function every backend uses, so a
//!   disagreement is the same [`Error::Mismatch`] on every rank instead of a hang or garbage;
//!   a tensor that is not on the rank's own device (a CPU tensor, another GPU's) is an
//!   [`Error::Value`] on every rank, naming the ranks and devices;
//! - reductions are NCCL's (f32, bf16 and f16 natively: a bf16 sum is reduced in bf16 steps,
//!   so across several GPUs it is close to, not bitwise equal to, the host backends' f32 fold;
//!   with one GPU it is exact); `Mean` is a sum scaled on the device by `1/n`;
//! - data movement (`all_gather`, `all_to_all`, `broadcast`, `send`/`recv`) moves the raw bytes
//!   of any dtype; `all_to_all` is one NCCL group of `n` sends and `n` receives;
//! - `send`/`recv` carry a small header (dtype and dims) before the payload, since NCCL needs
//!   the receiver to know the byte count. A send completes when it is received (NCCL has no
//!   buffering), so a ring uses [`Communicator::send_recv`], which posts both in one group.
//!
//! Every call waits for its own completion before returning (the event recorded after it on
//! the stream), polling `ncclCommGetAsyncError` meanwhile (the one exception is
//! [`crate::NcclOverlappedAllReduce`], which queues the gradient buckets on the device's
//! communication stream during backward and waits once, in its `finish`): an NCCL error or the timeout
//! ([`NcclCommunicator::set_timeout`]) aborts the communicator (`ncclCommAbort`, which also
//! releases any kernel stuck waiting on a peer) and returns an error naming this rank; every
//! later call is an [`Error::Poisoned`].

use crate::{
    call::{validate_signatures, Op, Signature},
    communicator::{check_ranges, check_split_args},
    wire::{dtype_code, dtype_of, op_from_words, op_words},
    Communicator, Error, ReduceOp, Result,
};
use cudarc::{
    driver::{CudaEvent, CudaStream, DevicePtr},
    nccl::sys,
};
use std::{
    ops::Range,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};
use vit_tensor::{
    cuda::kernel::{self, DeviceBuffer},
    DType, Device, Shape, Tensor,
};

/// The NCCL functions this backend calls: [`nccl_available`] checks that the library has them
/// all before anything calls one (cudarc panics on a missing symbol). `ncclCommSplit` and
/// `ncclCommGetAsyncError` need NCCL 2.18 or later.
const REQUIRED: [&str; 18] = [
    "ncclCommUserRank",
    "ncclCommCount",
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclCommInitRank",
    "ncclCommAbort",
    "ncclCommGetAsyncError",
    "ncclCommSplit",
    "ncclAllReduce",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclBroadcast",
    "ncclSend",
    "ncclRecv",
    "ncclGroupStart",
    "ncclGroupEnd",
];

/// True when NCCL can be used here: a CUDA device is visible and `libnccl.so` (2.18 or later)
/// loads with every function this backend needs. Never panics.
pub fn nccl_available() -> bool {
    nccl_missing().is_none()
}

/// Why NCCL cannot be used in this process (`None` when it can); checked once.
fn nccl_missing() -> Option<&'static str> {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    MISSING
        .get_or_init(|| {
            if !vit_tensor::cuda::available() {
                return Some("no CUDA device is visible (the CUDA driver is missing or reports no device)".into());
            }
            // SAFETY: only tries to dlopen the library.
            if !unsafe { sys::is_culib_present() } {
                return Some(
                    "libnccl.so could not be loaded (install NCCL 2.18 or later and put it on LD_LIBRARY_PATH; \
                     scripts/cuda-env.sh does on the GPU host)"
                        .into(),
                );
            }
            // SAFETY: the library is present (checked above), so culib() loads it; `get` only
            // looks a symbol up.
            let lib = unsafe { sys::culib() };
            for name in REQUIRED {
                // SAFETY: the symbol is only looked up, never called through this type.
                if unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err() {
                    return Some(format!("libnccl.so has no {name} (NCCL 2.18 or later is needed)"));
                }
            }
            None
        })
        .as_deref()
}

/// The error of a backend that cannot start: NCCL missing, and why.
fn unavailable(op: &'static str) -> Option<Error> {
    nccl_missing().map(|why| Error::Backend { op, msg: format!("NCCL is not available: {why}") })
}

/// The NCCL version as `major.minor.patch`, when [`nccl_available`].
pub fn nccl_version() -> Option<String> {
    if !nccl_available() {
        return None;
    }
    let mut v = 0;
    // SAFETY: ncclGetVersion writes one int; the symbol exists (nccl_available).
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    (r == sys::ncclResult_t::ncclSuccess).then(|| {
        // 2.18.3 is 21803 (since 2.9: major·10000 + minor·100 + patch).
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    })
}

/// NCCL's own words for `r`, with the communicator's last error when there is one.
fn describe(r: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: both return static or communicator-owned C strings (never null in practice,
    // checked anyway); the symbols exist (nccl_available).
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let what = text(unsafe { sys::ncclGetErrorString(r) });
    let last = if comm.is_null() { String::new() } else { text(unsafe { sys::ncclGetLastError(comm) }) };
    if last.is_empty() {
        format!("{r:?} ({what})")
    } else {
        format!("{r:?} ({what}: {last})")
    }
}

/// A unique id of a new communicator (`ncclGetUniqueId`, made by one rank and shared with all).
fn unique_id(op: &'static str) -> Result<sys::ncclUniqueId> {
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: writes the 128-byte id; the symbol exists (callers checked nccl_available).
    let r = unsafe { sys::ncclGetUniqueId(&mut id) };
    if r != sys::ncclResult_t::ncclSuccess {
        return Err(Error::Backend {
            op,
            msg: format!("ncclGetUniqueId failed: {}", describe(r, std::ptr::null_mut())),
        });
    }
    Ok(id)
}

/// The NCCL type of a float dtype, for reductions.
pub(crate) fn float_type(d: DType) -> Option<sys::ncclDataType_t> {
    match d {
        DType::F32 => Some(sys::ncclDataType_t::ncclFloat32),
        DType::BF16 => Some(sys::ncclDataType_t::ncclBfloat16),
        DType::F16 => Some(sys::ncclDataType_t::ncclFloat16),
        DType::I32 | DType::U32 => None,
    }
}

/// Builds in-process NCCL groups: one rank per local GPU, one thread per rank.
#[derive(Debug, Clone, Copy)]
pub struct NcclGroup;

impl NcclGroup {
    /// Runs `f` on one scoped thread per device of `devices` (CUDA ordinals, distinct), rank `r`
    /// on `devices[r]`, and returns the results in rank order. The communicators are made
    /// together (unique id + `ncclCommInitRank` on every thread) before any `f` starts. A panic
    /// in any rank is re-raised here after every thread has ended.
    ///
    /// Errors (before any `f` runs): NCCL unavailable ([`nccl_available`]), no devices, a device
    /// that does not exist or appears twice, or NCCL failing to make the communicators.
    pub fn run<R: Send>(devices: &[usize], f: impl Fn(NcclCommunicator) -> R + Sync) -> Result<Vec<R>> {
        Self::run_with_timeout(devices, None, f)
    }

    /// [`NcclGroup::run`] whose communicators give up on a call after `timeout`
    /// ([`NcclCommunicator::set_timeout`]).
    pub fn run_with_timeout<R: Send>(
        devices: &[usize],
        timeout: Option<Duration>,
        f: impl Fn(NcclCommunicator) -> R + Sync,
    ) -> Result<Vec<R>> {
        const OP: &str = "NcclGroup::run";
        if let Some(e) = unavailable(OP) {
            return Err(e);
        }
        if devices.is_empty() {
            return Err(Error::Value { op: OP, msg: "expected at least one CUDA device, got none".into() });
        }
        let count = vit_tensor::cuda::device_count();
        for (i, &d) in devices.iter().enumerate() {
            if d >= count {
                return Err(Error::Value {
                    op: OP,
                    msg: format!("expected CUDA devices in 0..{count} (the visible ones), got cuda:{d}"),
                });
            }
            if devices[..i].contains(&d) {
                return Err(Error::Value {
                    op: OP,
                    msg: format!("cuda:{d} appears twice in {devices:?}: NCCL needs one rank per GPU"),
                });
            }
        }
        // Every device's backend (context and stream) exists before the threads start.
        for &d in devices {
            kernel::stream(Device::Cuda(d))?;
        }
        let id = unique_id(OP)?;
        let n = devices.len();
        let f = &f;
        let joined: Vec<std::thread::Result<Result<R>>> = std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, &d)| {
                    s.spawn(move || {
                        let mut comm = NcclCommunicator::init_rank(d, rank, n, id)?;
                        comm.set_timeout(timeout);
                        Ok(f(comm))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut out = Vec::with_capacity(n);
        for r in joined {
            match r {
                Ok(v) => out.push(v?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(out)
    }
}

/// The communicator handle and its state, used under [`NcclCommunicator`]'s lock.
pub(crate) struct Raw {
    pub(crate) comm: sys::ncclComm_t,
    /// Why the communicator was aborted, once it was: every later call fails with it.
    aborted: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every use goes
// through the `Mutex<Raw>` of its `NcclCommunicator`.
unsafe impl Send for Raw {}

/// One rank of an NCCL communicator, bound to CUDA device `device()` and working on its stream
/// (see the module docs). Made by [`NcclGroup::run`] (one process, one thread per GPU),
/// [`NcclCommunicator::from_communicator`] (ranks that already share another communicator, e.g.
/// MPI processes: rank 0 makes the NCCL id and broadcasts it), or [`Communicator::split`].
///
/// Every tensor passed must be on this rank's device; results are new tensors there. Calls are
/// serialised by a lock, so the communicator can be shared between threads.
pub struct NcclCommunicator {
    rank: usize,
    size: usize,
    device: usize,
    stream: Arc<CudaStream>,
    raw: Mutex<Raw>,
    /// How long one call may wait for the others ([`NcclCommunicator::set_timeout`]).
    timeout: Option<Duration>,
    /// The verdict of the stream-overlapped collective matmul's self-check on this
    /// communicator (`crate::collective_matmul_nccl`): `Some(why)` when it may not be used.
    pub(crate) ring_matmul_refused: OnceLock<Option<String>>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.size)
            .field("device", &self.device)
            .finish()
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        let raw = self.raw.get_mut().unwrap_or_else(|e| e.into_inner());
        if raw.aborted.is_none() && !raw.comm.is_null() {
            // Every call waited for its own completion, so nothing of this communicator is in
            // flight: abort frees it without the collective handshake of ncclCommFinalize
            // (which would wait for ranks that may have ended).
            // SAFETY: the handle is valid and used by nothing else after this.
            unsafe { sys::ncclCommAbort(raw.comm) };
        }
    }
}

/// Most dims a call signature or a message header carries.
const MAX_RANK: usize = 8;
/// Words of a signature: op, reduce op, root, has tensor, dtype, device, rank, dims.
const SIG_WORDS: usize = 7 + MAX_RANK;
/// Words a caller of `agree_on` adds to the signature (a bucket plan's fingerprint).
pub(crate) const EXTRA_WORDS: usize = 2;
/// Words of a point-to-point header: dtype, rank, dims.
const HEAD_WORDS: usize = 2 + MAX_RANK;

impl NcclCommunicator {
    /// Rank `rank` of `size` on CUDA device `device`, joining the communicator of `id` (blocks
    /// until every rank has joined).
    fn init_rank(device: usize, rank: usize, size: usize, id: sys::ncclUniqueId) -> Result<Self> {
        const OP: &str = "ncclCommInitRank";
        let stream = kernel::stream(Device::Cuda(device))?;
        // ncclCommInitRank works on the calling thread's current device.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Backend { op: OP, msg: format!("cuda:{device}: {e:?}") })?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: writes one handle; the id came from ncclGetUniqueId; the symbol exists.
        let r = unsafe { sys::ncclCommInitRank(&mut comm, size as i32, id, rank as i32) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(Error::Backend {
                op: OP,
                msg: format!("rank {rank} of {size} on cuda:{device}: {}", describe(r, std::ptr::null_mut())),
            });
        }
        Ok(NcclCommunicator {
            rank,
            size,
            device,
            stream,
            raw: Mutex::new(Raw { comm, aborted: None }),
            timeout: None,
            ring_matmul_refused: OnceLock::new(),
        })
    }

    /// This rank's communicator over CUDA device `device`, for ranks that already share `host`
    /// (any backend that moves CPU tensors: MPI processes, `LocalGroup` threads): every rank of
    /// `host` calls it. The ranks first agree that each can use NCCL (so one that cannot makes
    /// every rank fail with an error naming it, instead of leaving the others waiting); then
    /// rank 0 makes the NCCL unique id and broadcasts it over `host`, and every rank joins
    /// with `ncclCommInitRank`. Ranks and world size are `host`'s.
    pub fn from_communicator(host: &dyn Communicator, device: usize) -> Result<Self> {
        const OP: &str = "NcclCommunicator::from_communicator";
        let problem: Option<String> = match unavailable(OP) {
            Some(e) => Some(e.to_string()),
            None if device >= vit_tensor::cuda::device_count() => Some(format!(
                "cuda:{device} does not exist ({} CUDA device(s) visible)",
                vit_tensor::cuda::device_count()
            )),
            None => kernel::stream(Device::Cuda(device)).err().map(|e| e.to_string()),
        };
        let flags = Tensor::from_vec(vec![u32::from(problem.is_some())], [1], Device::Cpu)?;
        let flags = host.all_gather(&flags)?.to_vec::<u32>()?;
        if let Some(why) = problem {
            return Err(Error::Backend { op: OP, msg: format!("rank {}: {why}", host.rank()) });
        }
        let failed: Vec<usize> = flags.iter().enumerate().filter(|(_, &f)| f != 0).map(|(r, _)| r).collect();
        if !failed.is_empty() {
            return Err(Error::Backend {
                op: OP,
                msg: format!("rank(s) {failed:?} cannot use NCCL (see their errors)"),
            });
        }
        // The id as 32 little-endian u32 words, behind an ok flag (rank 0's ncclGetUniqueId may fail).
        let mut words = vec![0u32; 33];
        let mut made = Ok(());
        if host.rank() == 0 {
            match unique_id(OP) {
                Ok(id) => {
                    words[0] = 1;
                    let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
                    for (w, b) in words[1..].iter_mut().zip(bytes.chunks_exact(4)) {
                        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                Err(e) => made = Err(e),
            }
        }
        let words = host.broadcast(&Tensor::from_vec(words, [33], Device::Cpu)?, 0)?.to_vec::<u32>()?;
        made?;
        if words[0] != 1 {
            return Err(Error::Backend { op: OP, msg: "rank 0 could not make the NCCL unique id".into() });
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (i, w) in words[1..].iter().enumerate() {
            for (j, b) in w.to_le_bytes().into_iter().enumerate() {
                id.internal[4 * i + j] = b as std::ffi::c_char;
            }
        }
        Self::init_rank(device, host.rank(), host.world_size(), id)
    }

    /// [`NcclCommunicator::from_communicator`] over the MPI world or group `mpi`: one rank per
    /// process, on one machine or many (`mpirun`, `srun`); `device` is usually the local rank.
    /// The communicator inherits nothing else from `mpi` (set its timeout separately).
    #[cfg(feature = "mpi")]
    pub fn from_mpi(mpi: &crate::MpiCommunicator, device: usize) -> Result<Self> {
        Self::from_communicator(mpi, device)
    }

    /// Gives up on a call that has not completed after `timeout` (a rank that is stuck, dead or
    /// far behind): the communicator is aborted and the call returns [`Error::Timeout`]; `None`
    /// (the default) waits forever, still watching for NCCL's asynchronous errors. Groups split
    /// from this one inherit it.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The CUDA device (ordinal) this rank works on.
    pub fn device(&self) -> usize {
        self.device
    }

    pub(crate) fn lock(&self, op: &'static str) -> Result<MutexGuard<'_, Raw>> {
        let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = &raw.aborted {
            return Err(Error::Poisoned { op, reason: reason.clone() });
        }
        // NCCL's enqueue uses the calling thread's current context.
        self.stream.context().bind_to_thread().map_err(|e| self.cuda_err(op, e))?;
        Ok(raw)
    }

    pub(crate) fn cuda_err(&self, op: &'static str, e: impl std::fmt::Debug) -> Error {
        Error::Backend { op, msg: format!("rank {} (cuda:{}): CUDA error {e:?}", self.rank, self.device) }
    }

    /// Aborts the communicator after `why` unless it was already (taking the lock itself, even
    /// from a thread that panicked with it): for work abandoned in flight, so that no NCCL
    /// kernel is left waiting for peers.
    pub(crate) fn abort_now(&self, why: String) {
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        self.abort(&mut raw, why);
    }

    /// Aborts the communicator after `why`; every later call is [`Error::Poisoned`].
    fn abort(&self, raw: &mut Raw, why: String) {
        if raw.aborted.is_none() {
            // SAFETY: a valid handle, aborted once; the lock is held.
            unsafe { sys::ncclCommAbort(raw.comm) };
            raw.aborted = Some(why);
        }
    }

    /// Checks the result of an NCCL call; an error aborts the communicator.
    pub(crate) fn check(&self, raw: &mut Raw, op: &'static str, call: &str, r: sys::ncclResult_t) -> Result<()> {
        if r == sys::ncclResult_t::ncclSuccess || r == sys::ncclResult_t::ncclInProgress {
            return Ok(());
        }
        let msg = format!("rank {} (cuda:{}): {call} failed: {}", self.rank, self.device, describe(r, raw.comm));
        self.abort(raw, msg.clone());
        Err(Error::Backend { op, msg })
    }

    /// Waits until everything queued on the stream so far has run, polling NCCL's asynchronous
    /// error state; aborts the communicator on an error or after the timeout.
    fn wait(&self, raw: &mut Raw, op: &'static str) -> Result<()> {
        let event = self.stream.record_event(None).map_err(|e| self.cuda_err(op, e))?;
        self.wait_for(raw, op, &event)
    }

    /// Waits until `event` has completed (work recorded on any stream of this device), polling
    /// NCCL's asynchronous error state; aborts the communicator on an error or after the timeout.
    pub(crate) fn wait_for(&self, raw: &mut Raw, op: &'static str, event: &CudaEvent) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(5);
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.cuda_err(op, e)),
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a valid handle; writes one result.
            let r = unsafe { sys::ncclCommGetAsyncError(raw.comm, &mut state) };
            self.check(raw, op, "ncclCommGetAsyncError", r)?;
            self.check(raw, op, "an asynchronous NCCL operation", state)?;
            if let Some(timeout) = self.timeout.filter(|&t| start.elapsed() >= t) {
                let why = format!(
                    "rank {} (cuda:{}) waited {} s in {op} for the other ranks (the collective timeout): \
                     communicator aborted",
                    self.rank,
                    self.device,
                    timeout.as_secs_f64()
                );
                self.abort(raw, why);
                return Err(Error::Timeout { op, secs: timeout.as_secs_f64(), peers: Vec::new() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Where `x` is relative to this rank's device: 0 here, 1 + ordinal on another GPU, and
    /// `u64::MAX` on the host (a signature word).
    fn place(&self, x: &Tensor) -> u64 {
        match x.device() {
            Device::Cuda(d) if d == self.device => 0,
            Device::Cuda(d) => 1 + d as u64,
            Device::Cpu => u64::MAX,
        }
    }

    /// Exchanges every rank's call signature (one small all-gather, waited for) and checks
    /// them together, so every rank reaches the same verdict. This is where a rank waits for
    /// the others to join, and also the barrier.
    pub(crate) fn agree(&self, raw: &mut Raw, op: Op, x: Option<&Tensor>) -> Result<()> {
        self.agree_on(raw, op, x, [0; EXTRA_WORDS], &self.stream).map(|_| ())
    }

    /// [`NcclCommunicator::agree`] on `stream` (this device's compute stream or its
    /// communication stream; the small buffers are allocated, used and freed on it, and the
    /// host waits for that stream only), carrying `extra` words of the caller's beside the
    /// signature: every rank's, in rank order, for the caller to compare (a bucket plan's
    /// fingerprint). Plain collectives send zeros there.
    pub(crate) fn agree_on(
        &self,
        raw: &mut Raw,
        op: Op,
        x: Option<&Tensor>,
        extra: [u64; EXTRA_WORDS],
        stream: &Arc<CudaStream>,
    ) -> Result<Vec<[u64; EXTRA_WORDS]>> {
        let name = op.name();
        const WORDS: usize = SIG_WORDS + EXTRA_WORDS;
        let mut words = [0u64; WORDS];
        words[..SIG_WORDS].copy_from_slice(&encode(op, x.map(|t| (t.shape(), t.dtype(), self.place(t)))));
        words[SIG_WORDS..].copy_from_slice(&extra);
        let send = stream.clone_htod(&words[..]).map_err(|e| self.cuda_err(name, e))?;
        // SAFETY: the all-gather below writes every element before it is read.
        let recv = unsafe { stream.alloc::<u64>(WORDS * self.size) }.map_err(|e| self.cuda_err(name, e))?;
        // SAFETY: both buffers live on this device, in `stream`'s order, until the wait below has
        // seen the call end; the counts are their sizes.
        let r = unsafe {
            sys::ncclAllGather(
                send.device_ptr(stream).0 as *const std::ffi::c_void,
                recv.device_ptr(stream).0 as *mut std::ffi::c_void,
                8 * WORDS,
                sys::ncclDataType_t::ncclUint8,
                raw.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        self.check(raw, name, "ncclAllGather (call signatures)", r)?;
        let done = stream.record_event(None).map_err(|e| self.cuda_err(name, e))?;
        self.wait_for(raw, name, &done)?;
        let all = stream.clone_dtoh(&recv).map_err(|e| self.cuda_err(name, e))?;
        let mut sigs = Vec::with_capacity(self.size);
        let mut misplaced = Vec::new();
        let mut extras = Vec::with_capacity(self.size);
        for (r, w) in all.chunks(WORDS).enumerate() {
            let (sig, place) = decode(name, &w[..SIG_WORDS])?;
            extras.push(w[SIG_WORDS..].try_into().expect("EXTRA_WORDS words"));
            if place != 0 {
                let got = if place == u64::MAX { "cpu".to_string() } else { format!("cuda:{}", place - 1) };
                misplaced.push(format!("rank {r}: {got}"));
            }
            sigs.push(sig);
        }
        if !misplaced.is_empty() {
            return Err(Error::Value {
                op: name,
                msg: format!(
                    "expected each rank's tensor on its own CUDA device (NCCL moves device memory), got {} \
                     (this is rank {} on cuda:{})",
                    misplaced.join(", "),
                    self.rank,
                    self.device
                ),
            });
        }
        validate_signatures(op, &sigs)?;
        Ok(extras)
    }

    /// A tensor of `shape` and `dtype` on this device that the NCCL call about to be queued
    /// writes completely.
    fn output(&self, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        // SAFETY: every caller queues an NCCL call that writes every element before any read.
        Ok(unsafe { kernel::empty(shape, dtype, Device::Cuda(self.device))? })
    }

    pub(crate) fn ptr(t: &Tensor) -> Result<u64> {
        Ok(kernel::device_ptr(t)?)
    }

    fn cu_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Scales `t` by `1/n` on the device for `Mean` (NCCL reduced a sum).
    pub(crate) fn finish_mean(&self, t: Tensor, op: ReduceOp) -> Result<Tensor> {
        if op == ReduceOp::Mean && self.size > 1 {
            Ok(vit_tensor::ops::scale(&t, 1.0 / self.size as f32)?)
        } else {
            Ok(t)
        }
    }

    /// All-reduces elements `ranges` of the 1-D CUDA tensor `buffer` in place with `op` (one
    /// `ncclAllReduce` per range, in one NCCL group), the other elements untouched: the
    /// data-parallel gradient all-reduce over buckets of the flat gradient buffer, without a
    /// copy. If another tensor shares `buffer`'s storage, `buffer` gets its own first
    /// (copy-on-write), so no other tensor sees the write.
    pub fn all_reduce_ranges_in_place(&self, buffer: &mut Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        check_ranges(OP, buffer, ranges)?;
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::AllReduce(op), Some(buffer))?;
        let Some(ty) = float_type(buffer.dtype()) else {
            return Err(Error::DType { op: OP, got: buffer.dtype() }); // validate_signatures said so already
        };
        buffer.make_unique()?;
        let base = Self::ptr(buffer)?;
        let es = buffer.dtype().size_in_bytes() as u64;
        // SAFETY: group calls are queued and launched at ncclGroupEnd; each range lies within
        // the buffer (checked), which this rank owns exclusively (make_unique) and which lives
        // until the wait below.
        unsafe {
            let r = sys::ncclGroupStart();
            self.check(&mut raw, OP, "ncclGroupStart", r)?;
            for range in ranges.iter().filter(|r| !r.is_empty()) {
                let p = base + range.start as u64 * es;
                let r = sys::ncclAllReduce(
                    p as *const std::ffi::c_void,
                    p as *mut std::ffi::c_void,
                    range.len(),
                    ty,
                    nccl_op(op),
                    raw.comm,
                    self.cu_stream(),
                );
                if r != sys::ncclResult_t::ncclSuccess {
                    sys::ncclGroupEnd();
                    return self.check(&mut raw, OP, "ncclAllReduce", r);
                }
            }
            let r = sys::ncclGroupEnd();
            self.check(&mut raw, OP, "ncclGroupEnd", r)?;
        }
        self.wait(&mut raw, OP)?;
        drop(raw);
        if op == ReduceOp::Mean && self.size > 1 {
            for range in ranges.iter().filter(|r| !r.is_empty()) {
                let part = self.finish_mean(buffer.narrow(range.start, range.len())?, op)?;
                buffer.write_at(range.start, &part)?;
            }
        }
        Ok(())
    }

    /// Posts `sends` (data, peer) and `receives` (buffer, peer) as one NCCL group of raw
    /// bytes, and waits for all of them.
    fn exchange(
        &self,
        raw: &mut Raw,
        op: &'static str,
        sends: &[(u64, usize, usize)],
        recvs: &[(u64, usize, usize)],
    ) -> Result<()> {
        // SAFETY: the buffers live until the wait below.
        unsafe { self.exchange_on(raw, op, sends, recvs, self.cu_stream())? };
        self.wait(raw, op)
    }

    /// Queues `sends` (device address, bytes, peer) and `recvs` as one NCCL group of raw bytes
    /// on `stream` (this device's compute or communication stream), without waiting.
    ///
    /// # Safety
    /// The addresses are of buffers on this device, `bytes` long, that stay alive (and, for a
    /// receive, unread and unwritten by anything else) until the queued work has run on
    /// `stream`; `stream` is a stream of this device.
    pub(crate) unsafe fn exchange_on(
        &self,
        raw: &mut Raw,
        op: &'static str,
        sends: &[(u64, usize, usize)],
        recvs: &[(u64, usize, usize)],
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        // SAFETY: see the function's contract.
        unsafe {
            let r = sys::ncclGroupStart();
            self.check(raw, op, "ncclGroupStart", r)?;
            for &(p, bytes, peer) in sends.iter().filter(|s| s.1 > 0) {
                let r = sys::ncclSend(
                    p as *const std::ffi::c_void,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    peer as i32,
                    raw.comm,
                    stream,
                );
                if r != sys::ncclResult_t::ncclSuccess {
                    sys::ncclGroupEnd();
                    return self.check(raw, op, "ncclSend", r);
                }
            }
            for &(p, bytes, peer) in recvs.iter().filter(|s| s.1 > 0) {
                let r = sys::ncclRecv(
                    p as *mut std::ffi::c_void,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    peer as i32,
                    raw.comm,
                    stream,
                );
                if r != sys::ncclResult_t::ncclSuccess {
                    sys::ncclGroupEnd();
                    return self.check(raw, op, "ncclRecv", r);
                }
            }
            let r = sys::ncclGroupEnd();
            self.check(raw, op, "ncclGroupEnd", r)
        }
    }

    fn check_peer(&self, op: &'static str, what: &'static str, peer: usize) -> Result<()> {
        if peer >= self.size {
            return Err(Error::Rank { op, what, got: peer, world_size: self.size });
        }
        Ok(())
    }

    /// The header of a point-to-point message carrying `x`, on this device.
    fn header(&self, op: &'static str, x: &Tensor) -> Result<DeviceBuffer> {
        if self.place(x) != 0 {
            return Err(Error::Value {
                op,
                msg: format!("expected a tensor on cuda:{} (this rank's device), got {}", self.device, x.device()),
            });
        }
        if x.rank() > MAX_RANK {
            return Err(Error::Shape {
                op,
                msg: format!("the NCCL backend sends tensors of rank <= {MAX_RANK}, got shape {}", x.shape()),
            });
        }
        let mut w = [0u64; HEAD_WORDS];
        w[0] = dtype_code(x.dtype());
        w[1] = x.rank() as u64;
        for (i, &d) in x.dims().iter().enumerate() {
            w[2 + i] = d as u64;
        }
        Ok(DeviceBuffer::upload(Device::Cuda(self.device), &w)?)
    }

    /// A received header as an empty tensor of its shape and dtype.
    fn receiving(&self, op: &'static str, head: &DeviceBuffer) -> Result<Tensor> {
        let w = head.to_vec::<u64>()?;
        let bad = || Error::Backend { op, msg: format!("a malformed message header from another rank: {w:?}") };
        let dtype = dtype_of(w[0]).ok_or_else(bad)?;
        let rank = w[1] as usize;
        if rank > MAX_RANK {
            return Err(bad());
        }
        let dims: Vec<usize> = w[2..2 + rank].iter().map(|&d| d as usize).collect();
        self.output(dims, dtype)
    }
}

/// `ncclMax` for `Max`, `ncclSum` otherwise (`Mean` is a sum scaled afterwards).
pub(crate) fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Sum | ReduceOp::Mean => sys::ncclRedOp_t::ncclSum,
    }
}

/// A call as `SIG_WORDS` words: op, reduce op, root, has tensor, dtype, place, rank, dims (a
/// tensor of rank > MAX_RANK has rank u64::MAX, which every rank then reports).
fn encode(op: Op, x: Option<(&Shape, DType, u64)>) -> [u64; SIG_WORDS] {
    let mut w = [0u64; SIG_WORDS];
    w[..3].copy_from_slice(&op_words(op));
    if let Some((shape, dtype, place)) = x {
        w[3] = 1;
        w[4] = dtype_code(dtype);
        w[5] = place;
        let dims = shape.dims();
        if dims.len() > MAX_RANK {
            w[6] = u64::MAX;
        } else {
            w[6] = dims.len() as u64;
            for (i, &d) in dims.iter().enumerate() {
                w[7 + i] = d as u64;
            }
        }
    }
    w
}

/// A signature and the tensor's place (0: on its rank's device) from [`encode`]'s words.
fn decode(op: &'static str, w: &[u64]) -> Result<(Signature, u64)> {
    let bad = || Error::Backend { op, msg: format!("a malformed call signature from another rank: {w:?}") };
    let call = op_from_words(w).ok_or_else(bad)?;
    if w[3] != 1 {
        return Ok((Signature { op: call, tensor: None }, 0));
    }
    let dtype = dtype_of(w[4]).ok_or_else(bad)?;
    if w[6] == u64::MAX {
        return Err(Error::Shape {
            op,
            msg: format!("the NCCL backend carries tensors of rank <= {MAX_RANK}; a rank passed more"),
        });
    }
    let rank = (w[6] as usize).min(MAX_RANK);
    let shape = Shape::new(w[7..7 + rank].iter().map(|&d| d as usize).collect::<Vec<_>>());
    Ok((Signature { op: call, tensor: Some((shape, dtype)) }, w[5]))
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        const OP: &str = "all_reduce";
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::AllReduce(op), Some(x))?;
        let ty = float_type(x.dtype()).ok_or(Error::DType { op: OP, got: x.dtype() })?;
        let out = self.output(x.shape().clone(), x.dtype())?;
        if x.numel() > 0 {
            // SAFETY: input and output are on this device, of `numel` elements of `ty`, and
            // live until the wait; the output is new and ours alone.
            let r = unsafe {
                sys::ncclAllReduce(
                    Self::ptr(x)? as *const std::ffi::c_void,
                    Self::ptr(&out)? as *mut std::ffi::c_void,
                    x.numel(),
                    ty,
                    nccl_op(op),
                    raw.comm,
                    self.cu_stream(),
                )
            };
            self.check(&mut raw, OP, "ncclAllReduce", r)?;
            self.wait(&mut raw, OP)?;
        }
        drop(raw);
        self.finish_mean(out, op)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::AllGather, Some(x))?;
        let out = self.output(crate::host::with_dim0(x.dims(), x.dims()[0] * self.size), x.dtype())?;
        let bytes = x.numel() * x.dtype().size_in_bytes();
        if bytes > 0 {
            // SAFETY: the output holds `size` times the input's bytes, both on this device and
            // alive until the wait; the output is ours alone.
            let r = unsafe {
                sys::ncclAllGather(
                    Self::ptr(x)? as *const std::ffi::c_void,
                    Self::ptr(&out)? as *mut std::ffi::c_void,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    raw.comm,
                    self.cu_stream(),
                )
            };
            self.check(&mut raw, OP, "ncclAllGather", r)?;
            self.wait(&mut raw, OP)?;
        }
        Ok(out)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        const OP: &str = "reduce_scatter";
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::ReduceScatter(op), Some(x))?;
        let ty = float_type(x.dtype()).ok_or(Error::DType { op: OP, got: x.dtype() })?;
        let out = self.output(crate::host::with_dim0(x.dims(), x.dims()[0] / self.size), x.dtype())?;
        if out.numel() > 0 {
            // SAFETY: the input holds `size` chunks of the output's elements, both on this
            // device and alive until the wait; the output is ours alone.
            let r = unsafe {
                sys::ncclReduceScatter(
                    Self::ptr(x)? as *const std::ffi::c_void,
                    Self::ptr(&out)? as *mut std::ffi::c_void,
                    out.numel(),
                    ty,
                    nccl_op(op),
                    raw.comm,
                    self.cu_stream(),
                )
            };
            self.check(&mut raw, OP, "ncclReduceScatter", r)?;
            self.wait(&mut raw, OP)?;
        }
        drop(raw);
        self.finish_mean(out, op)
    }

    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_to_all";
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::AllToAll, Some(x))?;
        let out = self.output(x.shape().clone(), x.dtype())?;
        let chunk = x.numel() / self.size * x.dtype().size_in_bytes();
        if chunk > 0 {
            let (src, dst) = (Self::ptr(x)?, Self::ptr(&out)?);
            let sends: Vec<_> = (0..self.size).map(|j| (src + (j * chunk) as u64, chunk, j)).collect();
            let recvs: Vec<_> = (0..self.size).map(|j| (dst + (j * chunk) as u64, chunk, j)).collect();
            self.exchange(&mut raw, OP, &sends, &recvs)?;
        }
        Ok(out)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::Broadcast { root }, Some(x))?;
        let out = self.output(x.shape().clone(), x.dtype())?;
        let bytes = x.numel() * x.dtype().size_in_bytes();
        if bytes > 0 {
            // SAFETY: input and output have `bytes` bytes on this device and live until the
            // wait; the output is ours alone.
            let r = unsafe {
                sys::ncclBroadcast(
                    Self::ptr(x)? as *const std::ffi::c_void,
                    Self::ptr(&out)? as *mut std::ffi::c_void,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    raw.comm,
                    self.cu_stream(),
                )
            };
            self.check(&mut raw, OP, "ncclBroadcast", r)?;
            self.wait(&mut raw, OP)?;
        }
        Ok(out)
    }

    /// Sends a header and then the payload; returns once `to` has received both (NCCL does not
    /// buffer). Sending to this rank itself needs [`Communicator::send_recv`].
    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        const OP: &str = "send";
        self.check_peer(OP, "destination rank", to)?;
        if to == self.rank {
            return Err(Error::Deadlock {
                op: OP,
                msg: format!(
                    "rank {to} sends to itself: an NCCL send waits for its receive, so use send_recv (one group)"
                ),
            });
        }
        let head = self.header(OP, x)?;
        let mut raw = self.lock(OP)?;
        self.exchange(&mut raw, OP, &[(head.device_ptr(), head.len(), to)], &[])?;
        let bytes = x.numel() * x.dtype().size_in_bytes();
        self.exchange(&mut raw, OP, &[(Self::ptr(x)?, bytes, to)], &[])
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        const OP: &str = "recv";
        self.check_peer(OP, "source rank", from)?;
        if from == self.rank {
            return Err(Error::Deadlock {
                op: OP,
                msg: format!("rank {from} receives from itself: use send_recv (one group) with the NCCL backend"),
            });
        }
        let dev = Device::Cuda(self.device);
        // SAFETY: the receive below writes every byte before it is read.
        let head = unsafe { DeviceBuffer::uninit(dev, 8 * HEAD_WORDS)? };
        let mut raw = self.lock(OP)?;
        self.exchange(&mut raw, OP, &[], &[(head.device_ptr(), head.len(), from)])?;
        let out = self.receiving(OP, &head)?;
        let bytes = out.numel() * out.dtype().size_in_bytes();
        self.exchange(&mut raw, OP, &[], &[(Self::ptr(&out)?, bytes, from)])?;
        Ok(out)
    }

    fn send_recv(&self, x: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        const OP: &str = "send_recv";
        self.check_peer(OP, "destination rank", to)?;
        self.check_peer(OP, "source rank", from)?;
        let head_out = self.header(OP, x)?;
        // SAFETY: the receive below writes every byte before it is read.
        let head_in = unsafe { DeviceBuffer::uninit(Device::Cuda(self.device), 8 * HEAD_WORDS)? };
        let mut raw = self.lock(OP)?;
        self.exchange(
            &mut raw,
            OP,
            &[(head_out.device_ptr(), head_out.len(), to)],
            &[(head_in.device_ptr(), head_in.len(), from)],
        )?;
        let out = self.receiving(OP, &head_in)?;
        let (sent, got) = (x.numel() * x.dtype().size_in_bytes(), out.numel() * out.dtype().size_in_bytes());
        self.exchange(&mut raw, OP, &[(Self::ptr(x)?, sent, to)], &[(Self::ptr(&out)?, got, from)])?;
        Ok(out)
    }

    /// The signature exchange (an all-gather every rank joins, waited for on the stream) is
    /// the barrier.
    fn barrier(&self) -> Result<()> {
        let mut raw = self.lock("barrier")?;
        self.agree(&mut raw, Op::Barrier, None)
    }

    /// `ncclCommSplit` (NCCL 2.18): the new communicator works on the same device and stream
    /// and inherits the timeout.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        const OP: &str = "split";
        let (color, key) = check_split_args(color, key)?;
        let mut raw = self.lock(OP)?;
        self.agree(&mut raw, Op::Split, None)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: a valid handle; writes one new handle; a null config inherits this one's.
        let r = unsafe { sys::ncclCommSplit(raw.comm, color, key, &mut comm, std::ptr::null_mut()) };
        self.check(&mut raw, OP, "ncclCommSplit", r)?;
        let (mut rank, mut size) = (0i32, 0i32);
        // SAFETY: the new handle is valid (the split succeeded); each writes one int.
        let r = unsafe { sys::ncclCommUserRank(comm, &mut rank) };
        let r2 = unsafe { sys::ncclCommCount(comm, &mut size) };
        for (call, r) in [("ncclCommUserRank", r), ("ncclCommCount", r2)] {
            if r != sys::ncclResult_t::ncclSuccess {
                // SAFETY: the new handle is valid and used by nothing else.
                unsafe { sys::ncclCommAbort(comm) };
                return Err(Error::Backend { op: OP, msg: format!("{call} on the split communicator failed: {r:?}") });
            }
        }
        Ok(Box::new(NcclCommunicator {
            rank: rank as usize,
            size: size as usize,
            device: self.device,
            stream: self.stream.clone(),
            raw: Mutex::new(Raw { comm, aborted: None }),
            timeout: self.timeout,
            ring_matmul_refused: OnceLock::new(),
        }))
    }

    fn all_reduce_in_place(&self, buffer: &mut Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<()> {
        self.all_reduce_ranges_in_place(buffer, ranges, op)
    }

    fn nccl(&self) -> Option<&NcclCommunicator> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_round_trip_with_their_place() {
        let shape = Shape::new([4, 3, 2]);
        for (op, place) in [
            (Op::AllReduce(ReduceOp::Mean), 0),
            (Op::ReduceScatter(ReduceOp::Max), u64::MAX),
            (Op::Broadcast { root: 3 }, 2),
            (Op::AllToAll, 0),
        ] {
            let w = encode(op, Some((&shape, DType::BF16, place)));
            let (sig, got_place) = decode("t", &w).unwrap();
            assert_eq!(sig, Signature { op, tensor: Some((shape.clone(), DType::BF16)) });
            assert_eq!(got_place, place);
        }
        let (sig, _) = decode("t", &encode(Op::Barrier, None)).unwrap();
        assert_eq!(sig, Signature { op: Op::Barrier, tensor: None });
        let e = decode("t", &[99; SIG_WORDS]).unwrap_err().to_string();
        assert!(e.contains("malformed call signature"), "{e}");
        let deep = Shape::new(vec![1; MAX_RANK + 1]);
        let e = decode("t", &encode(Op::AllGather, Some((&deep, DType::F32, 0)))).unwrap_err().to_string();
        assert!(e.contains("rank <= 8"), "{e}");
    }
}
