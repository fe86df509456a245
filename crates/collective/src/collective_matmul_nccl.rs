//! The GPU form of the collective matmul rings (issue 13 item 3): over an
//! [`NcclCommunicator`], each ring step's transfer is an NCCL send/receive pair queued on the
//! device's communication stream ([`kernel::comm_stream`]) while the step's matmul runs on the
//! compute stream, ordered by events: the communication stream waits for the compute stream's
//! work so far before it sends a chunk (the chunk and the receive buffer exist), and the compute
//! stream waits for the communication stream before it reads what arrived. The host queues the
//! whole ring without waiting and waits once at the end (NCCL's asynchronous errors, the
//! timeout).
//!
//! The algorithms and the chunk order are those of the host rings in
//! [`crate::collective_matmul`] (the CPU's communication thread becomes a CUDA stream). Memory:
//! every buffer a transfer touches is kept until the compute stream has waited for that
//! transfer, so freeing it afterwards (stream-ordered, on the compute stream) is safe.
//!
//! Never run on a GPU so far (it needs two or more: NCCL refuses two ranks on one device), so it
//! is used only after a self-check on the communicator ([`ring_allowed`]): the first ring call
//! runs a small problem both ways, the ring and the collective-then-matmul form, and every rank
//! must agree that they match; otherwise (or with `VITRS_FAST_KERNELS_OFF=nccl_ring_matmul`) the
//! host-thread ring runs instead, whose transfers go through the communicator's ordinary calls.

use crate::{call::Op, nccl::NcclCommunicator, Communicator, Error, ReduceOp, Result};
use vit_tensor::{cuda::kernel, ops, DType, Device, Tensor};

/// The self-check's name, for `VITRS_FAST_KERNELS_OFF`.
pub const SELF_CHECK_NAME: &str = "nccl_ring_matmul";

/// Whether the stream-overlapped rings may be used on `comm`: its self-check's verdict, run on
/// the first call (every rank of `comm` reaches this point in the same collective call, so the
/// check's collectives line up). A refusal is printed once per communicator.
pub(crate) fn ring_allowed(comm: &NcclCommunicator) -> Result<bool> {
    if let Some(verdict) = comm.ring_matmul_refused.get() {
        return Ok(verdict.is_none());
    }
    let verdict = self_check(comm)?;
    if let Some(why) = &verdict {
        if comm.rank() == 0 {
            eprintln!("warning: the stream-overlapped collective matmul is not used on this communicator: {why}");
        }
    }
    let _ = comm.ring_matmul_refused.set(verdict.clone());
    Ok(verdict.is_none())
}

impl NcclCommunicator {
    /// Whether [`crate::all_gather_matmul`] and [`crate::matmul_reduce_scatter`] run their
    /// rings on this device's streams (the self-check's verdict; the check runs on the first
    /// call, a collective call that every rank of the communicator must make).
    pub fn ring_matmul_allowed(&self) -> Result<bool> {
        ring_allowed(self)
    }
}

/// Runs both rings on small random operands against the collective-then-matmul form (f32,
/// within 1e-4 of `1 + |value|`: the chunked products may round differently); the ranks'
/// verdicts are combined with a max all-reduce. `None` when the rings may be used.
fn self_check(comm: &NcclCommunicator) -> Result<Option<String>> {
    if vit_tensor::cuda::self_check::fast_kernel_off(SELF_CHECK_NAME) {
        return Ok(Some(format!("turned off by VITRS_FAST_KERNELS=off or VITRS_FAST_KERNELS_OFF={SELF_CHECK_NAME}")));
    }
    let (n, dev) = (comm.world_size(), Device::Cuda(comm.device()));
    let seed = 0x7a11 + comm.rank() as u64;
    let (rows, k, out) = (37, 96, 80);
    let x = Tensor::randn([rows, k], 0.0, 1.0, seed, DType::F32, dev)?;
    let w = Tensor::randn([out, k], 0.0, 1.0, seed + 100, DType::F32, dev)?;
    let (y, gathered) = all_gather_matmul(comm, &x, &w, true)?;
    let plain_gathered = comm.all_gather(&x)?;
    let plain_y = ops::matmul_t(&plain_gathered, &w, false, true)?;
    let xs = Tensor::randn([n * rows, k], 0.0, 1.0, seed + 200, DType::F32, dev)?;
    let rs = matmul_reduce_scatter(comm, &xs, &w, true, rows)?;
    let plain_rs = comm.reduce_scatter(&ops::matmul_t(&xs, &w, false, true)?, ReduceOp::Sum)?;
    let mut wrong = 0usize;
    for (got, want) in [(&y, &plain_y), (&gathered, &plain_gathered), (&rs, &plain_rs)] {
        let (g, w) = (got.to_f32_vec()?, want.to_f32_vec()?);
        wrong += if g.len() != w.len() {
            w.len().max(1)
        } else {
            // A NaN compares false, so it counts as wrong.
            let close = |g: f32, w: f32| (g - w).abs() <= 1e-4 * (1.0 + w.abs());
            g.iter().zip(&w).filter(|&(&g, &w)| !close(g, w)).count()
        };
    }
    let flag = Tensor::from_vec(vec![wrong as f32], [1], dev)?;
    let worst = comm.all_reduce(&flag, ReduceOp::Max)?.to_f32_vec()?[0];
    Ok((worst > 0.0).then(|| {
        format!("the stream-overlapped rings differed from the plain collectives in up to {worst} elements on a rank")
    }))
}

/// Maps a signature disagreement found under the stand-in op `Op::AllGather` to `op`.
fn as_op(op: &'static str) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::Mismatch { msg, .. } => Error::Mismatch { op, msg },
        e => e,
    }
}

/// The ring all-gather-matmul on the streams: `(gather(x)·op(w), gather(x))`, rows in rank
/// order (see [`crate::all_gather_matmul`]; operands already checked by the caller).
pub(crate) fn all_gather_matmul(comm: &NcclCommunicator, x: &Tensor, w: &Tensor, tw: bool) -> Result<(Tensor, Tensor)> {
    const OP: &str = "all_gather_matmul";
    let (n, rank, dev) = (comm.world_size(), comm.rank(), x.device());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let bytes = x.numel() * x.dtype().size_in_bytes();
    let comm_stream = kernel::comm_stream(dev)?.cu_stream() as cudarc::nccl::sys::cudaStream_t;
    let mut raw = comm.lock(OP)?;
    // Every rank's chunk has this shape and dtype (a disagreement is an error on every rank).
    comm.agree(&mut raw, Op::AllGather, Some(x)).map_err(as_op(OP))?;
    // chunks[s] is rank (rank − s) mod n's chunk, products[s] its product.
    let mut chunks = vec![x.clone()];
    let mut products = Vec::with_capacity(n);
    let mut last = None;
    for step in 0..n {
        let incoming = if step + 1 < n {
            // SAFETY: the receive below writes every byte before the compute stream reads it
            // (after compute_waits_for_comm).
            let recv = unsafe { kernel::empty(x.dims().to_vec(), x.dtype(), dev)? };
            kernel::comm_waits_for_compute(dev)?;
            let (src, dst) = (NcclCommunicator::ptr(&chunks[step])?, NcclCommunicator::ptr(&recv)?);
            // SAFETY: both buffers are on this device and stay in `chunks` until the end, after
            // the compute stream has waited for this transfer; `recv` is touched by nothing else
            // before that wait.
            unsafe { comm.exchange_on(&mut raw, OP, &[(src, bytes, next)], &[(dst, bytes, prev)], comm_stream)? };
            Some(recv)
        } else {
            None
        };
        products.push(ops::matmul_t(&chunks[step], w, false, tw)?);
        if let Some(recv) = incoming {
            last = Some(kernel::compute_waits_for_comm(dev)?);
            chunks.push(recv);
        }
    }
    // Rank order: rank r's chunk is chunks[(rank − r) mod n].
    let order: Vec<usize> = (0..n).map(|r| (rank + n - r) % n).collect();
    let gathered = ops::concat(&order.iter().map(|&s| &chunks[s]).collect::<Vec<_>>(), 0)?;
    let y = ops::concat(&order.iter().map(|&s| &products[s]).collect::<Vec<_>>(), 0)?;
    if let Some(event) = last {
        comm.wait_for(&mut raw, OP, &event)?;
    }
    Ok((y, gathered))
}

/// The ring matmul-reduce-scatter on the streams: rows `r·rank..r·(rank+1)` of
/// `Σ_ranks x·op(w)` (see [`crate::matmul_reduce_scatter`]; operands checked, `x` has `n·r`
/// rows). Step `s` multiplies chunk `(rank − s − 1) mod n` while the partial sum of the previous
/// step travels to rank + 1, then adds the partial sum that arrived from rank − 1.
pub(crate) fn matmul_reduce_scatter(
    comm: &NcclCommunicator,
    x: &Tensor,
    w: &Tensor,
    tw: bool,
    r: usize,
) -> Result<Tensor> {
    const OP: &str = "matmul_reduce_scatter";
    let (n, rank, dev) = (comm.world_size(), comm.rank(), x.device());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let comm_stream = kernel::comm_stream(dev)?.cu_stream() as cudarc::nccl::sys::cudaStream_t;
    let chunk = |step: usize| (rank + 2 * n - step - 1) % n;
    let mut acc = ops::matmul_t(&x.narrow(chunk(0) * r, r)?, w, false, tw)?;
    let bytes = acc.numel() * acc.dtype().size_in_bytes();
    let mut raw = comm.lock(OP)?;
    // Every rank's partial sums have this shape and dtype.
    comm.agree(&mut raw, Op::AllGather, Some(&acc)).map_err(as_op(OP))?;
    let mut last = None;
    for step in 1..n {
        // SAFETY: the receive writes every byte before the compute stream reads it.
        let recv = unsafe { kernel::empty(acc.dims().to_vec(), acc.dtype(), dev)? };
        kernel::comm_waits_for_compute(dev)?;
        let (src, dst) = (NcclCommunicator::ptr(&acc)?, NcclCommunicator::ptr(&recv)?);
        // SAFETY: `acc` and `recv` stay alive until after compute_waits_for_comm below; `recv`
        // is touched by nothing else before it.
        unsafe { comm.exchange_on(&mut raw, OP, &[(src, bytes, next)], &[(dst, bytes, prev)], comm_stream)? };
        let p = ops::matmul_t(&x.narrow(chunk(step) * r, r)?, w, false, tw)?;
        last = Some(kernel::compute_waits_for_comm(dev)?);
        acc = ops::add(&recv, &p)?;
    }
    if let Some(event) = last {
        comm.wait_for(&mut raw, OP, &event)?;
    }
    Ok(acc)
}
