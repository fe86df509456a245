//! The data-parallel gradient all-reduce over NCCL, overlapped with backward (issue 12 item 3,
//! GPU part): [`NcclOverlappedAllReduce`] reduces the buckets of a [`BucketPlan`] over the flat
//! gradient buffer in place, each one as soon as backward has produced it, on the device's
//! communication stream ([`vit_tensor::cuda::kernel::comm_stream`]) while the compute stream
//! goes on with the rest of backward. No host thread, and no host wait between the agreement in
//! [`start`] (before backward) and [`finish`].
//!
//! The streams are ordered with events, never by the host (the compute stream's allocations
//! carry no events, see `vit_tensor::cuda`):
//! - a bucket is launched when its last parameter is marked ready: an event recorded on the
//!   compute stream at that point (after the kernels that wrote the bucket were queued), the
//!   communication stream waits for it, then `ncclAllReduce` of the bucket's range, in place;
//! - [`finish`] launches the buckets not launched yet (in plan order), makes the compute stream
//!   wait for an event recorded on the communication stream after the last one (so the
//!   optimizer, queued later, reads the reduced gradients), and waits on the host for that
//!   event, polling NCCL's asynchronous errors against the communicator's timeout, once per
//!   step, as [`NcclCommunicator::all_reduce_ranges_in_place`] does per call;
//! - the buffer is given a storage of its own at [`start`] and must keep it (no clone of it
//!   written, which would copy it) until [`finish`]; every launch and `finish` check its device
//!   address, so a moved buffer is an error, never a silently unreduced gradient. Backward
//!   writes only parameters not yet marked, so no bucket in flight is written.
//!
//! Ranks agree before the first bucket: [`start`] exchanges the call signature (op, buffer
//! shape, dtype, device) and the plan's fingerprint over NCCL on the communication stream, so
//! ranks with different buffers or bucket plans fail with the same clear [`Error::Mismatch`]
//! instead of calling NCCL with different counts (a hang). Every rank launches the buckets in
//! the order backward completes them, which is the same on every rank (the same model runs the
//! same backward), so the NCCL calls match. `Mean` is a sum scaled by `1/n` on the compute
//! stream after the wait, as everywhere in this backend.
//!
//! Dropped without a successful [`finish`] (an error during backward) while buckets are in
//! flight, it aborts the communicator (no NCCL kernel is left waiting for peers that will not
//! launch the rest) and makes the compute stream wait for the communication stream, so the
//! buffer is not freed under NCCL; later calls on the communicator are [`Error::Poisoned`].
//!
//! [`start`]: NcclOverlappedAllReduce::start
//! [`finish`]: NcclOverlappedAllReduce::finish

use crate::{
    buckets::{BucketCountdown, BucketPlan},
    call::Op,
    nccl::{float_type, nccl_op},
    Communicator, Error, NcclCommunicator, ReduceOp, Result,
};
use cudarc::{driver::CudaStream, nccl::sys};
use std::sync::Arc;
use vit_tensor::{cuda::kernel, DType, Device, Tensor};

const OP: &str = "all_reduce";

/// One step's bucketed in-place all-reduce of a flat CUDA gradient buffer over NCCL, on the
/// communication stream, overlapped with backward (see the module docs). Made by
/// [`NcclOverlappedAllReduce::start`] before backward; [`NcclOverlappedAllReduce::ready`] as
/// backward finishes each parameter; [`NcclOverlappedAllReduce::finish`] after it. No other
/// collective of the same communicator may run between `start` and `finish`.
pub struct NcclOverlappedAllReduce<'a> {
    comm: &'a NcclCommunicator,
    plan: &'a BucketPlan,
    op: ReduceOp,
    countdown: BucketCountdown<'a>,
    launched: Vec<bool>,
    /// Device address of the buffer's first element, fixed at `start`.
    base: u64,
    dtype: DType,
    nccl_type: sys::ncclDataType_t,
    /// The device's communication stream.
    stream: Arc<CudaStream>,
    /// The first error met by `ready` (reported again by `finish`).
    failed: Option<Error>,
    /// `finish` saw every bucket complete: nothing is in flight.
    completed: bool,
}

impl std::fmt::Debug for NcclOverlappedAllReduce<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclOverlappedAllReduce")
            .field("rank", &self.comm.rank())
            .field("buckets", &self.plan.buckets().len())
            .field("launched", &self.launched.iter().filter(|&&l| l).count())
            .finish()
    }
}

impl<'a> NcclOverlappedAllReduce<'a> {
    /// Starts one step's reduction with `op` of `buffer` (the flat gradient buffer, 1-D of
    /// `plan.len()` elements of a float dtype, on `comm`'s device) over `comm`, in the buckets
    /// of `plan`. Every rank calls it, with the same plan, before backward: it agrees with the
    /// other ranks (a small NCCL all-gather on the communication stream, waited for on the host;
    /// the compute stream is not waited for) and gives `buffer` a storage of its own if it
    /// shares one (copy-on-write), which it must keep until [`NcclOverlappedAllReduce::finish`].
    ///
    /// Errors, the same on every rank: a buffer on another device or the host, ranks whose
    /// buffers (shape, dtype) or plans differ ([`Error::Mismatch`]), a non-float dtype; then,
    /// per rank: a buffer whose shape is not `[plan.len()]`; NCCL or CUDA failing.
    pub fn start(comm: &'a NcclCommunicator, plan: &'a BucketPlan, op: ReduceOp, buffer: &mut Tensor) -> Result<Self> {
        let device = Device::Cuda(comm.device());
        let stream = kernel::comm_stream(device)?;
        let fingerprint = [plan.buckets().len() as u64, plan.fingerprint()];
        {
            let mut raw = comm.lock(OP)?;
            let plans = comm.agree_on(&mut raw, Op::AllReduce(op), Some(buffer), fingerprint, &stream)?;
            if plans.iter().any(|p| *p != fingerprint) {
                let each: Vec<String> = plans
                    .iter()
                    .enumerate()
                    .map(|(r, p)| format!("rank {r}: {} bucket(s), fingerprint {:#018x}", p[0], p[1]))
                    .collect();
                return Err(Error::Mismatch {
                    op: OP,
                    msg: format!(
                        "expected the same gradient bucket plan on every rank (the same buckets over the same \
                         buffer), got {}",
                        each.join(", ")
                    ),
                });
            }
        }
        if buffer.dims() != [plan.len()] {
            return Err(Error::Shape {
                op: OP,
                msg: format!("a buffer of shape {}: expected the bucket plan's [{}]", buffer.shape(), plan.len()),
            });
        }
        let nccl_type = float_type(buffer.dtype()).ok_or(Error::DType { op: OP, got: buffer.dtype() })?;
        buffer.make_unique()?;
        let base = kernel::device_ptr(buffer)?;
        Ok(NcclOverlappedAllReduce {
            comm,
            plan,
            op,
            countdown: BucketCountdown::new(plan),
            launched: vec![false; plan.buckets().len()],
            base,
            dtype: buffer.dtype(),
            nccl_type,
            stream,
            failed: None,
            completed: false,
        })
    }

    /// Parameter `param` (an index into the ranges given to [`BucketPlan::new`]) has its final
    /// gradient in `buffer` (the buffer given to `start`), as far as the compute stream's queued
    /// work goes: if that completes its bucket, the bucket's all-reduce is queued on the
    /// communication stream behind an event of the compute stream. Returns at once.
    ///
    /// Errors (also reported by `finish`, after which `ready` does nothing): `param` outside the
    /// plan or marked twice, a buffer that is not the one given to `start` (moved or copied),
    /// NCCL refusing the call. After an error the other ranks may wait for this rank's buckets:
    /// end the step (`finish` returns the error; dropping aborts the communicator).
    pub fn ready(&mut self, buffer: &Tensor, param: usize) -> Result<()> {
        if self.failed.is_some() {
            return Ok(());
        }
        let done = self.countdown.ready(param).and_then(|b| match b {
            Some(b) => self.launch(buffer, b),
            None => Ok(()),
        });
        done.map_err(|e| {
            let again = Error::Value { op: "NcclOverlappedAllReduce::ready", msg: e.to_string() };
            self.failed = Some(e);
            again
        })
    }

    /// Queues bucket `b`'s all-reduce on the communication stream (once).
    fn launch(&mut self, buffer: &Tensor, b: usize) -> Result<()> {
        if self.launched[b] {
            return Ok(());
        }
        self.check_buffer(buffer)?;
        let range = self.plan.buckets()[b].clone();
        if range.is_empty() {
            self.launched[b] = true;
            return Ok(());
        }
        let mut raw = self.comm.lock(OP)?;
        // The bucket's writes are queued on the compute stream before this point.
        kernel::comm_waits_for_compute(Device::Cuda(self.comm.device()))?;
        let p = self.base + (range.start * self.dtype.size_in_bytes()) as u64;
        // SAFETY: the range lies within the buffer (its shape and address are checked against
        // the plan's and start's), whose storage is this buffer's alone (made unique at start)
        // and stays allocated and unwritten by the compute stream until `finish` (or Drop) has
        // made the compute stream wait for this stream; the communication stream waits for the
        // compute stream's writes (the event above).
        let r = unsafe {
            sys::ncclAllReduce(
                p as *const std::ffi::c_void,
                p as *mut std::ffi::c_void,
                range.len(),
                self.nccl_type,
                nccl_op(self.op),
                raw.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        // Marked before the check: a failed enqueue may still have queued work, which Drop orders.
        self.launched[b] = true;
        self.comm.check(&mut raw, OP, "ncclAllReduce (gradient bucket)", r)
    }

    /// `buffer` is the one given to `start`: same shape, dtype and device address.
    fn check_buffer(&self, buffer: &Tensor) -> Result<()> {
        let at = kernel::device_ptr(buffer)?;
        if buffer.dims() != [self.plan.len()] || buffer.dtype() != self.dtype || at != self.base {
            return Err(Error::Value {
                op: OP,
                msg: format!(
                    "expected the gradient buffer given to start ([{}] {} at {:#x}), got [{}] {} at {:#x}: \
                     the buffer was replaced or copied (a clone of it written) during backward",
                    self.plan.len(),
                    self.dtype,
                    self.base,
                    buffer.dims().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                    buffer.dtype(),
                    at
                ),
            });
        }
        Ok(())
    }

    /// Launches the buckets not launched yet (in plan order), makes the compute stream wait for
    /// every bucket, and waits on the host for them (NCCL's asynchronous errors and the
    /// communicator's timeout checked meanwhile; an error or timeout aborts the communicator).
    /// `buffer` (the one given to `start`) then holds the reduction of every rank's buffer.
    pub fn finish(mut self, buffer: &mut Tensor) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        for b in 0..self.launched.len() {
            self.launch(buffer, b)?;
        }
        let event = kernel::compute_waits_for_comm(Device::Cuda(self.comm.device()))?;
        {
            let mut raw = self.comm.lock(OP)?;
            self.comm.wait_for(&mut raw, OP, &event)?;
        }
        self.completed = true;
        if self.op == ReduceOp::Mean && self.comm.world_size() > 1 {
            for range in self.plan.buckets().iter().filter(|r| !r.is_empty()) {
                let part = self.comm.finish_mean(buffer.narrow(range.start, range.len())?, self.op)?;
                buffer.write_at(range.start, &part)?;
            }
        }
        Ok(())
    }
}

/// The name that turns the overlapped path off in `VITRS_FAST_KERNELS_OFF` (comma-separated, as
/// for the fast kernels): [`NcclOverlappedAllReduce::self_check`] then fails without running.
pub const SELF_CHECK_NAME: &str = "nccl_overlap";

impl NcclOverlappedAllReduce<'_> {
    /// The check before first use (the overlapped path has not run on every GPU it may meet):
    /// every rank of `comm` calls it. Each rank poisons a buffer with NaN, writes its random
    /// parameters into it on the compute stream behind a queue of matmuls (last first, each
    /// marked ready after its write), reduces it overlapped, and compares with the plain
    /// in-place all-reduce of the same buckets ([`NcclCommunicator::all_reduce_ranges_in_place`]):
    /// bit for bit at one rank, within 1e-5 of `1 + |value|` across ranks (NCCL may pick another
    /// algorithm for one call than for a group). The ranks' verdicts are combined (a max
    /// all-reduce), so every rank gets the same answer: `None` when the overlapped path may be
    /// used, `Some(why)` when not (also when `VITRS_FAST_KERNELS_OFF` names
    /// [`SELF_CHECK_NAME`], without running). Errors: NCCL or CUDA failing.
    pub fn self_check(comm: &NcclCommunicator) -> Result<Option<String>> {
        if vit_tensor::cuda::self_check::fast_kernel_off(SELF_CHECK_NAME) {
            return Ok(Some(format!(
                "turned off by VITRS_FAST_KERNELS=off or VITRS_FAST_KERNELS_OFF={SELF_CHECK_NAME}"
            )));
        }
        let (n, dev) = (comm.world_size(), Device::Cuda(comm.device()));
        let (params, at) = BucketPlan::contiguous_ranges(&[1, 4099, 65_536, 3, 100_000, 30_001]);
        let plan = BucketPlan::new(&params, at, 50_000)?;
        let x = Tensor::randn([at], 0.0, 1.0, 0x5e1f + comm.rank() as u64, DType::F32, dev)?;
        let mut want = x.clone();
        comm.all_reduce_ranges_in_place(&mut want, plan.buckets(), ReduceOp::Sum)?;
        let work = Tensor::randn([512, 512], 0.0, 1.0, 0x5e20, DType::F32, dev)?;
        let mut buf = Tensor::full(f32::NAN, [at], DType::F32, dev)?;
        let mut red = NcclOverlappedAllReduce::start(comm, &plan, ReduceOp::Sum, &mut buf)?;
        for i in (0..params.len()).rev() {
            for _ in 0..4 {
                drop(vit_tensor::ops::matmul(&work, &work)?);
            }
            buf.write_at(params[i].start, &x.narrow(params[i].start, params[i].len())?)?;
            red.ready(&buf, i)?;
        }
        red.finish(&mut buf)?;
        let tol = if n == 1 { 0.0 } else { 1e-5 };
        let (got, want) = (buf.to_f32_vec()?, want.to_f32_vec()?);
        let wrong = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| !((*g - *w).abs() <= tol * (1.0 + w.abs()) || g.to_bits() == w.to_bits()))
            .count();
        let flag = Tensor::from_vec(vec![wrong as f32], [1], dev)?;
        let worst = comm.all_reduce(&flag, ReduceOp::Max)?.to_f32_vec()?[0];
        Ok((worst > 0.0).then(|| {
            format!(
                "the overlapped all-reduce differed from the plain one in up to {worst} of {at} elements on a rank \
                 (a stream-ordering fault)"
            )
        }))
    }
}

impl Drop for NcclOverlappedAllReduce<'_> {
    fn drop(&mut self) {
        if self.completed || !self.launched.contains(&true) {
            return;
        }
        // Abandoned with buckets possibly in flight (see the module docs).
        self.comm.abort_now(format!(
            "rank {} (cuda:{}): a bucketed gradient all-reduce was abandoned before finish (an error during \
             backward): communicator aborted",
            self.comm.rank(),
            self.comm.device()
        ));
        let _ = kernel::compute_waits_for_comm(Device::Cuda(self.comm.device()));
    }
}
