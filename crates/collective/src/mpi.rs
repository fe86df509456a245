//! The MPI backend (cargo feature `mpi`): one rank per process, on one machine or many, through
//! the `mpi` crate over the system's MPI (Open MPI or MPICH). Launch with `mpirun -np N` or
//! `srun`; rank and world size come from MPI.
//!
//! Same behaviour as [`crate::LocalGroup`], bit for bit:
//! - every collective first exchanges the ranks' call signatures (op, reduce op, root, shape,
//!   dtype) with one small all-gather and checks them with the same function as the in-process
//!   group, so a disagreement is the same [`Error::Mismatch`](crate::Error) on every rank;
//! - reductions never use MPI's own (whose order is the library's): `reduce_scatter` is an
//!   all-to-all of the chunks, after which each rank folds the chunk it owns in f32 in rank
//!   order (rank 0 first) and casts back; `all_reduce` is that reduce-scatter over the flat
//!   tensor (padded to a multiple of the world size) followed by an all-gather. Each element is
//!   thus reduced exactly as the in-process group reduces it, and every rank gets the same bits;
//! - data movement (`all_gather`, `all_to_all`, `broadcast`, `send`/`recv`) moves the raw
//!   element bytes.
//!
//! Tensors on a GPU go through host memory (NCCL is the GPU backend). Results come back on the
//! input's device; a received tensor is on the host. Each communicator serialises its calls
//! with a lock, so it can be shared between threads; with `MPI_THREAD_MULTIPLE` the groups made
//! by [`Communicator::split`] have their own locks and run concurrently, otherwise
//! (`MPI_THREAD_SERIALIZED`) one lock covers every communicator of the process.

use crate::{
    call::{validate_signatures, Op, Signature},
    host,
    wire::{dtype_code, dtype_of, op_from_words, op_words},
    Communicator, Error, ReduceOp, Result,
};
use mpi::{
    environment::Universe,
    point_to_point::MatchedReceiveVec,
    topology::{Color, SimpleCommunicator},
    traits::{Communicator as _, CommunicatorCollectives, Destination, Root, Source},
    Threading,
};
use std::{
    mem::ManuallyDrop,
    sync::{Arc, Mutex, MutexGuard},
};
use vit_tensor::{DType, Device, Shape, Tensor};

/// Most tensor dimensions a signature carries.
const MAX_RANK: usize = 8;
/// Words of an encoded signature: op, reduce op, root, has tensor, dtype, rank, dims.
const SIG_WORDS: usize = 6 + MAX_RANK;

/// One rank's handle on a group of MPI processes: the world ([`MpiCommunicator::init`]) or a
/// group split from it ([`Communicator::split`]).
pub struct MpiCommunicator {
    rank: usize,
    size: usize,
    /// Serialises this communicator's MPI calls. With `MPI_THREAD_MULTIPLE` each communicator
    /// has its own (MPI allows concurrent calls on different communicators, so a data-axis
    /// all-reduce on one thread and a model-axis ring on another can both wait at once);
    /// otherwise one lock is shared by every communicator of the process.
    lock: Arc<Mutex<()>>,
    /// The handles, used only under `lock`; freed in `drop`.
    mpi: ManuallyDrop<Mpi>,
    /// The MPI environment, finalised when the last communicator of the process is dropped.
    process: Arc<Process>,
    /// How long a rank waits for the others to join a collective or for a message
    /// ([`MpiCommunicator::set_timeout`]); `None` waits forever.
    timeout: Option<std::time::Duration>,
}

/// This communicator's MPI handles: its group, and a duplicate of it for
/// [`MpiCommunicator::all_fail_within`] (its own matching, so it can never be confused with a
/// collective another rank is in).
struct Mpi {
    world: SimpleCommunicator,
    errors: SimpleCommunicator,
    /// Buffers of the signature exchange (this rank's, every rank's), which a non-blocking
    /// exchange needs for as long as it may run: `'static`, made once per communicator, and
    /// left to MPI when an exchange is abandoned after a timeout (the communicator is then
    /// unusable: `stranded`).
    signatures: Mutex<(&'static mut [u64], &'static mut [u64])>,
    /// Set when an exchange timed out and was abandoned; every later call fails.
    stranded: std::sync::atomic::AtomicBool,
}

/// The MPI environment of this process.
struct Process {
    _universe: Universe,
    /// MPI gave `MPI_THREAD_MULTIPLE`.
    multiple: bool,
}

// SAFETY: MPI handles are process-wide values, not tied to a thread. MPI was initialised with
// at least MPI_THREAD_SERIALIZED and every use of a communicator's handles goes through its
// `lock`, which is process-wide unless MPI gave MPI_THREAD_MULTIPLE; the universe is only
// dropped (MPI_Finalize) once, after every communicator has freed its handles.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}
unsafe impl Send for Process {}
unsafe impl Sync for Process {}

/// A communicator's handles while its lock is held.
struct Locked<'a> {
    _guard: MutexGuard<'a, ()>,
    mpi: &'a Mpi,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Mpi;
    fn deref(&self) -> &Mpi {
        self.mpi
    }
}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: dropped once, here; nothing uses the handles after this.
        unsafe { ManuallyDrop::drop(&mut self.mpi) };
    }
}

fn backend_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Backend { op, msg: msg.into() }
}

impl MpiCommunicator {
    /// Initialises MPI for this process (once: a second call is an error) and joins the world.
    /// Asks for `MPI_THREAD_MULTIPLE` and needs at least `MPI_THREAD_SERIALIZED`.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| backend_err("mpi", "MPI is already initialised in this process"))?;
        if threading < Threading::Serialized {
            return Err(backend_err(
                "mpi",
                format!("the MPI library offers thread support {threading:?}, expected at least Serialized"),
            ));
        }
        let world = universe.world();
        let process = Arc::new(Process { _universe: universe, multiple: threading >= Threading::Multiple });
        Ok(Self::over(world, Arc::new(Mutex::new(())), process, None))
    }

    fn over(
        world: SimpleCommunicator,
        lock: Arc<Mutex<()>>,
        process: Arc<Process>,
        timeout: Option<std::time::Duration>,
    ) -> Self {
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let errors = world.duplicate();
        // Leaked once per communicator (a few hundred bytes): see `Mpi::signatures`.
        let mine: &'static mut [u64] = Box::leak(vec![0u64; SIG_WORDS].into_boxed_slice());
        let all: &'static mut [u64] = Box::leak(vec![0u64; SIG_WORDS * size].into_boxed_slice());
        let mpi = Mpi {
            world,
            errors,
            signatures: Mutex::new((mine, all)),
            stranded: std::sync::atomic::AtomicBool::new(false),
        };
        MpiCommunicator { rank, size, lock, mpi: ManuallyDrop::new(mpi), process, timeout }
    }

    /// Gives up on a collective that some rank has not joined after `timeout` (a rank that is
    /// stuck or far behind), and on a receive that got nothing for that long, with
    /// [`Error::Timeout`] instead of waiting forever; `None` (the default) waits forever.
    /// The abandoned exchange cannot be cancelled, so the communicator is unusable after it:
    /// the caller should end the job ([`abort`](Self::abort)). Groups split from this one
    /// inherit the timeout.
    pub fn set_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.timeout = timeout;
    }

    /// After an error on this rank: true if every rank reaches this call within `grace` (they
    /// all failed together, e.g. a loss that was not finite everywhere, and can end normally);
    /// false if some rank is elsewhere (it waits in a collective for this one), and then the
    /// caller should [`abort`](Self::abort).
    pub fn all_fail_within(&self, grace: std::time::Duration) -> bool {
        let mpi = self.lock();
        let mut request = mpi.errors.immediate_barrier();
        let deadline = std::time::Instant::now() + grace;
        loop {
            match request.test() {
                Ok(_) => return true,
                Err(pending) if std::time::Instant::now() < deadline => {
                    request = pending;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(pending) => {
                    // Never completed: the job is about to be aborted, so the request is left.
                    std::mem::forget(pending);
                    return false;
                }
            }
        }
    }

    /// Ends every process of the job (`MPI_Abort` with exit code `code`): what a rank that failed
    /// alone does, so that no other rank waits forever for it in a collective. Does not take the
    /// communicator's lock (another thread of this rank may hold it, blocked in a collective).
    pub fn abort(&self, code: i32) -> ! {
        // SAFETY: MPI_Abort on MPI_COMM_WORLD is valid from any thread once MPI is initialised,
        // which `init` did; it does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
        }
        std::process::exit(code)
    }

    fn lock(&self) -> Locked<'_> {
        Locked { _guard: self.lock.lock().unwrap_or_else(|e| e.into_inner()), mpi: &self.mpi }
    }

    fn check_peer(&self, op: &'static str, what: &'static str, peer: usize) -> Result<()> {
        if peer >= self.size {
            return Err(Error::Rank { op, what, got: peer, world_size: self.size });
        }
        Ok(())
    }

    /// Exchanges this rank's call signature with every rank's and checks them together, so
    /// all ranks reach the same verdict.
    ///
    /// This is where a rank waits for the others to join, so it is where the timeout applies:
    /// the exchange runs non-blocking and is polled until it completes or the timeout passes.
    fn agree(&self, mpi: &Mpi, op: Op, x: Option<&Tensor>) -> Result<()> {
        self.check_usable(mpi, op.name())?;
        let mine = Signature { op, tensor: x.map(|t| (t.shape().clone(), t.dtype())) };
        let words = encode(&mine);
        let mut bufs = mpi.signatures.lock().unwrap_or_else(|e| e.into_inner());
        let all: Vec<u64> = match self.timeout {
            None => {
                let mut all = vec![0u64; SIG_WORDS * self.size];
                mpi.world.all_gather_into(&words[..], &mut all[..]);
                all
            }
            Some(timeout) => {
                let (send, recv) = &mut *bufs;
                send.copy_from_slice(&words);
                // SAFETY of the 'static borrows: the buffers are leaked, so they outlive any
                // request; a new exchange starts only after the previous one completed (or
                // never, once one was abandoned: `stranded`).
                let send: &'static [u64] = unsafe { &*(&**send as *const [u64]) };
                let recv: &'static mut [u64] = unsafe { &mut *(&mut **recv as *mut [u64]) };
                let request = mpi.world.immediate_all_gather_into(mpi::request::StaticScope, send, recv);
                let recv = self.poll(mpi, request, timeout, op.name(), Vec::new())?;
                recv.to_vec()
            }
        };
        drop(bufs);
        let sigs = all.chunks(SIG_WORDS).map(|w| decode(op.name(), w)).collect::<Result<Vec<_>>>()?;
        validate_signatures(op, &sigs)
    }

    /// Waits for `request` until `timeout`; on timeout abandons it (see `Mpi::signatures`).
    fn poll<R: ?Sized>(
        &self,
        mpi: &Mpi,
        mut request: mpi::request::Request<'static, R, mpi::request::StaticScope>,
        timeout: std::time::Duration,
        op: &'static str,
        peers: Vec<usize>,
    ) -> Result<&'static R> {
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            match request.test_with_data() {
                Ok((_, data)) => return Ok(data),
                Err(pending) if std::time::Instant::now() < deadline => {
                    request = pending;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(1));
                }
                Err(pending) => {
                    std::mem::forget(pending);
                    mpi.stranded.store(true, std::sync::atomic::Ordering::SeqCst);
                    return Err(Error::Timeout { op, secs: timeout.as_secs_f64(), peers });
                }
            }
        }
    }

    /// The next message from `from`; with a timeout, probed for without blocking until it
    /// arrives or the timeout passes.
    fn receive(&self, mpi: &Mpi, from: usize, op: &'static str) -> Result<Vec<u8>> {
        let source = mpi.world.process_at_rank(from as i32);
        let Some(timeout) = self.timeout else {
            return Ok(source.receive_vec::<u8>().0);
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            if let Some(probed) = source.immediate_matched_probe() {
                return Ok(probed.matched_receive_vec::<u8>().0);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout { op, secs: timeout.as_secs_f64(), peers: vec![from] });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(1));
        }
    }

    fn check_usable(&self, mpi: &Mpi, op: &'static str) -> Result<()> {
        if mpi.stranded.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Poisoned {
                op,
                reason: "an earlier call timed out waiting for another rank; end the job (MPI_Abort)".into(),
            });
        }
        Ok(())
    }

    /// Rank order fold of the chunk this rank owns: `x`'s bytes split into `size` chunks of
    /// `rows` rows (`row_shape` each), exchanged all-to-all, reduced in f32 and cast back (bf16
    /// and f16; f32 tensors take the typed paths of the collectives, without byte copies).
    fn reduce_my_chunk(
        &self,
        mpi: &Mpi,
        bytes: &[u8],
        chunk_shape: &Shape,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Tensor> {
        let mut recv = vec![0u8; bytes.len()];
        mpi.world.all_to_all_into(bytes, &mut recv[..]);
        let len = bytes.len() / self.size.max(1);
        let parts = recv
            .chunks(len.max(1))
            .take(self.size)
            .map(|c| Ok(Tensor::from_bytes(c, chunk_shape.clone(), dtype, Device::Cpu)?.to_f32_vec()?));
        let sum = if len == 0 { Vec::new() } else { host::reduce(parts, op, self.size)? };
        Ok(Tensor::from_f32(sum, chunk_shape.clone(), dtype, Device::Cpu)?)
    }
}

/// f32 elements, borrowed from a CPU tensor, or copied (a GPU tensor, through host memory).
fn f32_elements(x: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    Ok(match x.as_slice::<f32>() {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(x.to_f32_vec()?),
    })
}

/// Folds `parts` (`size` chunks of `m` elements, rank 0's first) into the first, in rank order,
/// with the in-process group's fold (`host::fold_into`). Returns the first chunk, reduced.
fn fold_in_rank_order(parts: &mut [f32], m: usize, size: usize, op: ReduceOp) -> &[f32] {
    let (acc, rest) = parts.split_at_mut(m);
    for part in rest.chunks(m.max(1)).take(size.saturating_sub(1)) {
        host::fold_into(acc, part, op);
    }
    host::finish(acc, op, size);
    acc
}

/// A signature as `SIG_WORDS` words (a tensor of rank > MAX_RANK is marked with rank
/// u64::MAX, which every rank then reports).
fn encode(s: &Signature) -> [u64; SIG_WORDS] {
    let mut w = [0u64; SIG_WORDS];
    w[..3].copy_from_slice(&op_words(s.op));
    if let Some((shape, dtype)) = &s.tensor {
        w[3] = 1;
        w[4] = dtype_code(*dtype);
        let dims = shape.dims();
        if dims.len() > MAX_RANK {
            w[5] = u64::MAX;
        } else {
            w[5] = dims.len() as u64;
            for (i, &d) in dims.iter().enumerate() {
                w[6 + i] = d as u64;
            }
        }
    }
    w
}

fn decode(op: &'static str, w: &[u64]) -> Result<Signature> {
    let bad = || backend_err(op, format!("a malformed call signature from another rank: {w:?}"));
    let call = op_from_words(w).ok_or_else(bad)?;
    let tensor = if w[3] == 1 {
        let dtype = dtype_of(w[4]).ok_or_else(bad)?;
        if w[5] == u64::MAX {
            return Err(Error::Shape {
                op,
                msg: format!("the MPI backend carries tensors of rank <= {MAX_RANK}; a rank passed more"),
            });
        }
        let rank = (w[5] as usize).min(MAX_RANK);
        Some((Shape::new(w[6..6 + rank].iter().map(|&d| d as usize).collect::<Vec<_>>()), dtype))
    } else {
        None
    };
    Ok(Signature { op: call, tensor })
}

/// The little-endian f32s of `bytes`.
/// A point-to-point message: dtype code, rank, dims (u64 little-endian each), then the bytes.
fn pack(x: &Tensor) -> Result<Vec<u8>> {
    let mut msg = Vec::with_capacity(16 + 8 * x.rank() + x.numel() * x.dtype().size_in_bytes());
    msg.extend(dtype_code(x.dtype()).to_le_bytes());
    msg.extend((x.rank() as u64).to_le_bytes());
    for &d in x.dims() {
        msg.extend((d as u64).to_le_bytes());
    }
    msg.extend(x.to_bytes()?);
    Ok(msg)
}

fn unpack(op: &'static str, msg: &[u8]) -> Result<Tensor> {
    let bad = || backend_err(op, format!("a malformed message of {} bytes", msg.len()));
    let word = |i: usize| -> Result<u64> {
        let b = msg.get(8 * i..8 * i + 8).ok_or_else(bad)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let dtype = dtype_of(word(0)?).ok_or_else(bad)?;
    let rank = word(1)? as usize;
    if rank > MAX_RANK.max(64) {
        return Err(bad());
    }
    let dims = (0..rank).map(|i| word(2 + i).map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::from_bytes(&msg[8 * (2 + rank)..], dims, dtype, Device::Cpu)?)
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mpi = self.lock();
        self.agree(&mpi, Op::AllReduce(op), Some(x))?;
        if x.numel() == 0 {
            return Ok(x.clone()); // MPI refuses zero-length exchanges; nothing to reduce
        }
        let (n, numel, es) = (self.size, x.numel(), x.dtype().size_in_bytes());
        // Reduce-scatter of the flat tensor padded to n equal chunks, then all-gather.
        let m = numel.div_ceil(n);
        if x.dtype() == DType::F32 {
            // f32 (gradients): MPI reads and writes typed buffers, the fold runs in place on
            // the received chunks; no byte copies.
            let src = f32_elements(x)?;
            let padded;
            let send: &[f32] = if m * n == numel {
                &src
            } else {
                padded = [&src[..], &vec![0.0; m * n - numel]].concat();
                &padded
            };
            let mut recv = vec![0f32; m * n];
            mpi.world.all_to_all_into(send, &mut recv[..]);
            let mine = fold_in_rank_order(&mut recv, m, n, op);
            let mut all = vec![0f32; m * n];
            mpi.world.all_gather_into(mine, &mut all[..]);
            all.truncate(numel);
            return Ok(Tensor::from_vec(all, x.shape().clone(), Device::Cpu)?.to_device(x.device())?);
        }
        let mut bytes = x.to_bytes()?;
        bytes.resize(m * n * es, 0);
        let mine = self.reduce_my_chunk(&mpi, &bytes, &Shape::new([m]), x.dtype(), op)?.to_bytes()?;
        let mut all = vec![0u8; m * n * es];
        mpi.world.all_gather_into(&mine[..], &mut all[..]);
        all.truncate(numel * es);
        Ok(Tensor::from_bytes(&all, x.shape().clone(), x.dtype(), x.device())?)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let mpi = self.lock();
        self.agree(&mpi, Op::AllGather, Some(x))?;
        let rows = x.dims()[0] * self.size;
        if x.numel() == 0 {
            return Ok(Tensor::zeros(host::with_dim0(x.dims(), rows), x.dtype(), x.device())?);
        }
        if x.dtype() == DType::F32 {
            let src = f32_elements(x)?;
            let mut all = vec![0f32; src.len() * self.size];
            mpi.world.all_gather_into(&src[..], &mut all[..]);
            return Ok(Tensor::from_vec(all, host::with_dim0(x.dims(), rows), Device::Cpu)?.to_device(x.device())?);
        }
        let bytes = x.to_bytes()?;
        let mut all = vec![0u8; bytes.len() * self.size];
        mpi.world.all_gather_into(&bytes[..], &mut all[..]);
        Ok(Tensor::from_bytes(&all, host::with_dim0(x.dims(), rows), x.dtype(), x.device())?)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mpi = self.lock();
        self.agree(&mpi, Op::ReduceScatter(op), Some(x))?;
        let chunk = Shape::new(host::with_dim0(x.dims(), x.dims()[0] / self.size));
        if x.numel() == 0 {
            return Ok(Tensor::zeros(chunk, x.dtype(), x.device())?);
        }
        if x.dtype() == DType::F32 {
            let src = f32_elements(x)?;
            let m = src.len() / self.size;
            let mut recv = vec![0f32; src.len()];
            mpi.world.all_to_all_into(&src[..], &mut recv[..]);
            fold_in_rank_order(&mut recv, m, self.size, op);
            recv.truncate(m);
            return Ok(Tensor::from_vec(recv, chunk, Device::Cpu)?.to_device(x.device())?);
        }
        Ok(self.reduce_my_chunk(&mpi, &x.to_bytes()?, &chunk, x.dtype(), op)?.to_device(x.device())?)
    }

    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        let mpi = self.lock();
        self.agree(&mpi, Op::AllToAll, Some(x))?;
        if x.numel() == 0 {
            return Ok(x.clone());
        }
        let bytes = x.to_bytes()?;
        let mut recv = vec![0u8; bytes.len()];
        mpi.world.all_to_all_into(&bytes[..], &mut recv[..]);
        Ok(Tensor::from_bytes(&recv, x.shape().clone(), x.dtype(), x.device())?)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let mpi = self.lock();
        self.agree(&mpi, Op::Broadcast { root }, Some(x))?;
        if x.numel() == 0 {
            return Ok(x.clone());
        }
        let mut bytes = x.to_bytes()?;
        mpi.world.process_at_rank(root as i32).broadcast_into(&mut bytes[..]);
        Ok(Tensor::from_bytes(&bytes, x.shape().clone(), x.dtype(), x.device())?)
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        self.check_peer("send", "destination rank", to)?;
        let mpi = self.lock();
        self.check_usable(&mpi, "send")?;
        let Some(timeout) = self.timeout else {
            mpi.world.process_at_rank(to as i32).send(&pack(x)?[..]);
            return Ok(());
        };
        // Non-blocking, polled until the timeout; the buffer is lent to MPI as in `send_recv`.
        let raw: *mut [u8] = Box::into_raw(pack(x)?.into_boxed_slice());
        // SAFETY: `raw` stays allocated until the send has completed, or forever.
        let out: &'static [u8] = unsafe { &*raw };
        let pending = mpi.world.process_at_rank(to as i32).immediate_send(mpi::request::StaticScope, out);
        self.poll(&mpi, pending, timeout, "send", vec![to])?;
        // SAFETY: the send completed; nothing refers to the buffer any more.
        drop(unsafe { Box::from_raw(raw) });
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        self.check_peer("recv", "source rank", from)?;
        let mpi = self.lock();
        self.check_usable(&mpi, "recv")?;
        let msg = self.receive(&mpi, from, "recv")?;
        unpack("recv", &msg)
    }

    fn send_recv(&self, x: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        self.check_peer("send_recv", "destination rank", to)?;
        self.check_peer("send_recv", "source rank", from)?;
        let mpi = self.lock();
        self.check_usable(&mpi, "send_recv")?;
        // Post the send without blocking, then receive: a ring of these cannot deadlock. The
        // send buffer is owned here and lent to MPI as `'static`, so that a receive that times
        // out can leave the send pending (the peer may never take it) without freeing it.
        let raw: *mut [u8] = Box::into_raw(pack(x)?.into_boxed_slice());
        // SAFETY: `raw` stays allocated until the send has completed (below), or forever.
        let out: &'static [u8] = unsafe { &*raw };
        let pending = mpi.world.process_at_rank(to as i32).immediate_send(mpi::request::StaticScope, out);
        let msg = match self.receive(&mpi, from, "send_recv") {
            Ok(msg) => {
                pending.wait();
                msg
            }
            Err(e) => {
                match pending.test() {
                    // SAFETY: the send completed; nothing refers to the buffer any more.
                    Ok(_) => drop(unsafe { Box::from_raw(raw) }),
                    Err(still) => std::mem::forget(still), // the buffer stays lent to MPI
                }
                mpi.stranded.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        };
        // SAFETY: the send completed (`wait`); nothing refers to the buffer any more.
        drop(unsafe { Box::from_raw(raw) });
        unpack("send_recv", &msg)
    }

    fn barrier(&self) -> Result<()> {
        let mpi = self.lock();
        self.agree(&mpi, Op::Barrier, None)?;
        mpi.world.barrier();
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let (color, key) = crate::communicator::check_split_args(color, key)?;
        let mpi = self.lock();
        self.agree(&mpi, Op::Split, None)?;
        let group = mpi
            .world
            .split_by_color_with_key(Color::with_value(color), key)
            .ok_or_else(|| backend_err("split", format!("MPI_Comm_split gave no group for color {color}")))?;
        let lock = if self.process.multiple { Arc::new(Mutex::new(())) } else { Arc::clone(&self.lock) };
        // Still under this communicator's lock: `over` duplicates the new group (an MPI call).
        let split = Self::over(group, lock, Arc::clone(&self.process), self.timeout);
        drop(mpi);
        Ok(Box::new(split))
    }
}
