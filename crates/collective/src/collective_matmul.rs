//! Collective matmul (issue 13, ViT-22B's asynchronous parallel linear operations, design §5):
//! a tensor-parallel matmul fused with the collective around it, as a ring in which the
//! transfer of the next chunk overlaps the matmul of the chunk in hand.
//!
//! - [`all_gather_matmul`]: `y = all_gather(x) · op(w)` for activations sharded by rows
//!   (tokens) and weights sharded by output columns (the in-projection's forward, or a data
//!   gradient of the out-projection).
//! - [`matmul_reduce_scatter`]: `reduce_scatter(x · op(w))` for weights sharded on the
//!   contracting dimension (the out-projection's forward, or a data gradient of the
//!   in-projection).
//!
//! With [`MatmulComm::Ring`] each of the `n` steps runs one chunk's matmul on the calling thread
//! while a communication thread ([`std::thread::scope`]) does one
//! [`send_recv`](Communicator::send_recv) to rank + 1 and from rank − 1; only the first transfer
//! (all-gather) or the first matmul (reduce-scatter) is exposed. [`MatmulComm::Plain`] runs the
//! collective and one matmul, one after the other.
//!
//! Devices: the code works on any float dtype and device that the [`Communicator`] and
//! `vit_tensor::ops` accept. Over an [`crate::NcclCommunicator`] with the operands on its GPU,
//! the ring runs on the device's streams instead (`collective_matmul_nccl`: NCCL send/receive
//! on the communication stream, the matmuls on the compute stream, ordered by events), once a
//! self-check on the communicator has passed; otherwise the host-thread ring above runs, its
//! transfers going through the communicator's ordinary calls.

use crate::{Communicator, Error, ReduceOp, Result};
use std::{fmt, str::FromStr, sync::mpsc};
use vit_tensor::{ops, DType, Tensor};

/// How the tensor-parallel matmuls move data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulComm {
    /// The collective and the matmul as a ring of `n` steps, each step's transfer overlapping
    /// a chunk's matmul (see the module docs). The default.
    #[default]
    Ring,
    /// The collective, then one matmul (or one matmul, then the collective): no overlap.
    Plain,
}

impl fmt::Display for MatmulComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MatmulComm::Ring => "ring",
            MatmulComm::Plain => "plain",
        })
    }
}

impl FromStr for MatmulComm {
    type Err = Error;

    /// `"ring"` or `"plain"` (as [`Display`](fmt::Display) writes them).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ring" => Ok(MatmulComm::Ring),
            "plain" => Ok(MatmulComm::Plain),
            _ => Err(Error::Value { op: "MatmulComm", msg: format!("expected \"ring\" or \"plain\", got {s:?}") }),
        }
    }
}

/// All-gather, then matmul. `x: [r, K]` is this rank's row chunk; `w` is `[N, K]` when
/// `transpose_w` (`y = x·wᵀ`, a linear layer's forward) or `[K, N]` otherwise (`y = x·w`, a
/// data gradient). Returns `(y, gathered)`: `y = gather(x)·op(w)` as `[n·r, N]` and
/// `gathered = gather(x)` as `[n·r, K]` (what the layer keeps for its weight gradient), rows in
/// rank order.
///
/// Every rank passes `x` of the same shape and dtype (and `w` of the same dtype). With
/// [`MatmulComm::Ring`] the chunks' products are computed one by one as the chunks travel around
/// the ring (the same bits run to run; they may differ from [`MatmulComm::Plain`]'s one large
/// matmul in the last bits, as a GEMM kernel may block rows differently). `n = 1` is one
/// matmul.
///
/// Errors, before any transfer (so on every rank when every rank passes the same shapes):
/// `x` or `w` not 2-D, `K` of `x` and `w` different ([`Error::Shape`] naming both shapes),
/// different or non-float dtypes or devices ([`Error::Tensor`]). Ranks that pass different
/// shapes get [`Error::Mismatch`] (or [`Error::Disconnected`] from a rank that stopped).
pub fn all_gather_matmul(
    comm: &dyn Communicator,
    x: &Tensor,
    w: &Tensor,
    transpose_w: bool,
    mode: MatmulComm,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "all_gather_matmul";
    check_operands(OP, x, w, transpose_w)?;
    let n = comm.world_size();
    if n == 1 {
        return Ok((ops::matmul_t(x, w, false, transpose_w)?, x.clone()));
    }
    match mode {
        MatmulComm::Plain => {
            let gathered = comm.all_gather(x)?;
            Ok((ops::matmul_t(&gathered, w, false, transpose_w)?, gathered))
        }
        MatmulComm::Ring => match on_streams(comm, x)? {
            Some(nccl) => crate::collective_matmul_nccl::all_gather_matmul(nccl, x, w, transpose_w),
            None => ring_all_gather_matmul(comm, x, w, transpose_w),
        },
    }
}

/// The NCCL communicator to run a ring on the device's streams with, when `comm` is one, `x` is
/// on its GPU and the rings passed their self-check there
/// ([`crate::collective_matmul_nccl::ring_allowed`]); `None` runs the host-thread ring.
fn on_streams<'a>(comm: &'a dyn Communicator, x: &Tensor) -> Result<Option<&'a crate::NcclCommunicator>> {
    match comm.nccl() {
        Some(nccl) if x.device() == vit_tensor::Device::Cuda(nccl.device()) => {
            Ok(crate::collective_matmul_nccl::ring_allowed(nccl)?.then_some(nccl))
        }
        _ => Ok(None),
    }
}

/// Matmul, then reduce-scatter. `x: [n·r, K]` (this rank's share of the contracting dimension,
/// all rows); `w` is `[N, K]` when `transpose_w` or `[K, N]` otherwise. Returns rows
/// `r·rank..r·(rank+1)` of `Σ_ranks x·op(w)`: `[r, N]`.
///
/// Every rank passes the same row count and `N` (`K` may differ between ranks). The sum is in
/// a fixed order for a given world size, so results are bitwise reproducible run to run; the
/// order differs between the modes ([`MatmulComm::Plain`] sums in f32 in rank order and rounds
/// once, [`MatmulComm::Ring`] adds one partial product per step in `x`'s dtype: for bf16 that
/// is one rounding per step, as NCCL's bf16 reduce-scatter does). `n = 1` is one matmul.
///
/// Errors, before any transfer: `x` or `w` not 2-D, `K` different, dim 0 of `x` not divisible
/// by the world size ([`Error::Shape`] naming the shapes), different or non-float dtypes or
/// devices ([`Error::Tensor`]). Ranks that disagree on the row count or `N` get
/// [`Error::Mismatch`] (or [`Error::Disconnected`] from a rank that stopped).
pub fn matmul_reduce_scatter(
    comm: &dyn Communicator,
    x: &Tensor,
    w: &Tensor,
    transpose_w: bool,
    mode: MatmulComm,
) -> Result<Tensor> {
    const OP: &str = "matmul_reduce_scatter";
    check_operands(OP, x, w, transpose_w)?;
    let n = comm.world_size();
    let rows = x.dims()[0];
    if !rows.is_multiple_of(n) {
        return Err(Error::Shape {
            op: OP,
            msg: format!("dim 0 of x {} is not divisible by world size {n}", x.shape()),
        });
    }
    if n == 1 {
        return Ok(ops::matmul_t(x, w, false, transpose_w)?);
    }
    match mode {
        MatmulComm::Plain => comm.reduce_scatter(&ops::matmul_t(x, w, false, transpose_w)?, ReduceOp::Sum),
        MatmulComm::Ring => match on_streams(comm, x)? {
            Some(nccl) => crate::collective_matmul_nccl::matmul_reduce_scatter(nccl, x, w, transpose_w, rows / n),
            None => ring_matmul_reduce_scatter(comm, x, w, transpose_w, rows / n),
        },
    }
}

/// Checks what can be checked on this rank alone: 2-D operands, equal `K`, one float dtype,
/// one device.
fn check_operands(op: &'static str, x: &Tensor, w: &Tensor, transpose_w: bool) -> Result<()> {
    let w_layout = if transpose_w { "[N, K] (transpose_w = true)" } else { "[K, N] (transpose_w = false)" };
    if x.rank() != 2 {
        return Err(Error::Shape { op, msg: format!("expected x as [rows, K], got {}", x.shape()) });
    }
    if w.rank() != 2 {
        return Err(Error::Shape { op, msg: format!("expected w as {w_layout}, got {}", w.shape()) });
    }
    let k_w = if transpose_w { w.dims()[1] } else { w.dims()[0] };
    if x.dims()[1] != k_w {
        return Err(Error::Shape {
            op,
            msg: format!("x {} and w {} (as {w_layout}) contract {} with {k_w}", x.shape(), w.shape(), x.dims()[1]),
        });
    }
    if !x.dtype().is_float() {
        return Err(vit_tensor::Error::DType { op, expected: "f32, bf16 or f16".into(), got: x.dtype() }.into());
    }
    if w.dtype() != x.dtype() {
        return Err(vit_tensor::Error::DType {
            op,
            expected: format!("{} for w (x's dtype)", x.dtype()),
            got: w.dtype(),
        }
        .into());
    }
    if w.device() != x.device() {
        return Err(vit_tensor::Error::Device { op, expected: x.device(), got: w.device() }.into());
    }
    Ok(())
}

/// An error unless `got` (received from rank `from`) has the shape and dtype this rank expects.
fn check_received(op: &'static str, from: usize, got: &Tensor, dims: &[usize], dtype: DType) -> Result<()> {
    if got.dims() != dims || got.dtype() != dtype {
        return Err(Error::Mismatch {
            op,
            msg: format!(
                "expected the same shapes on every rank: rank {from} sent {} {}, this rank expected {dims:?} {dtype}",
                got.shape(),
                got.dtype()
            ),
        });
    }
    Ok(())
}

/// Joins the communication thread, re-raising its panic.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The ring all-gather-matmul. The communication thread passes the chunks on around the ring
/// as fast as they arrive (a chunk does not wait for its matmul), then copies them into the
/// gathered `x`; the calling thread multiplies each chunk as it comes (at step `s` the chunk of
/// rank `rank − s`) and hands the product back to the communication thread, which copies it
/// into `y` once its transfers are done. So the copies that assemble the outputs overlap the
/// matmuls, except the last product's.
fn ring_all_gather_matmul(comm: &dyn Communicator, x: &Tensor, w: &Tensor, tw: bool) -> Result<(Tensor, Tensor)> {
    const OP: &str = "all_gather_matmul";
    let (n, rank) = (comm.world_size(), comm.rank());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let (r, k) = (x.dims()[0], x.dims()[1]);
    let n_out = if tw { w.dims()[0] } else { w.dims()[1] };
    std::thread::scope(|s| -> Result<(Tensor, Tensor)> {
        let (chunks_tx, chunks) = mpsc::channel::<Tensor>();
        let (products_tx, products) = mpsc::channel::<(usize, Tensor)>();
        let comm_thread = s.spawn(move || -> Result<(Tensor, Tensor)> {
            // The transfers back to back first; then the copies.
            let mut received = Vec::with_capacity(n - 1);
            let mut cur = x.clone();
            for _ in 1..n {
                let got = comm.send_recv(&cur, next, prev)?;
                check_received(OP, prev, &got, x.dims(), x.dtype())?;
                if chunks_tx.send(got.clone()).is_err() {
                    // The calling thread failed; it reports its own error.
                    return Err(Error::Backend { op: OP, msg: "the calling thread stopped".into() });
                }
                received.push(got.clone());
                cur = got;
            }
            drop(chunks_tx);
            let mut gathered = Tensor::zeros([n * r, k], x.dtype(), x.device())?;
            for (step, chunk) in std::iter::once(x).chain(&received).enumerate() {
                gathered.write_at((rank + n - step) % n * r * k, chunk)?;
            }
            drop(received);
            let mut y = Tensor::zeros([n * r, n_out], x.dtype(), x.device())?;
            for (src, p) in products {
                y.write_at(src * r * n_out, &p)?;
            }
            Ok((y, gathered))
        });
        let mut cur = x.clone();
        for step in 0..n {
            if step > 0 {
                match chunks.recv() {
                    Ok(t) => cur = t,
                    Err(_) => break, // the communication thread failed: its error follows
                }
            }
            let p = ops::matmul_t(&cur, w, false, tw)?;
            if products_tx.send(((rank + n - step) % n, p)).is_err() {
                break;
            }
        }
        drop(products_tx); // the communication thread ends after the last product
        join(comm_thread)
    })
}

/// The ring matmul-reduce-scatter. Step `s` computes the partial product for output chunk
/// `(rank − s − 1) mod n` on the calling thread; the communication thread passes the partial
/// sum of the previous step to rank + 1, receives rank − 1's (the partial sum of the same chunk
/// as this step's product), adds the product to it and passes the sum on at the next step.
/// After `n` steps the partial sum in hand is this rank's own chunk, reduced over every rank.
/// The calling thread only multiplies, one product after another.
fn ring_matmul_reduce_scatter(comm: &dyn Communicator, x: &Tensor, w: &Tensor, tw: bool, r: usize) -> Result<Tensor> {
    const OP: &str = "matmul_reduce_scatter";
    let (n, rank) = (comm.world_size(), comm.rank());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    std::thread::scope(|s| -> Result<Tensor> {
        let (products_tx, products) = mpsc::channel::<Tensor>();
        let comm_thread = s.spawn(move || -> Result<Tensor> {
            let stopped = || Error::Backend { op: OP, msg: "the calling thread stopped".into() };
            let mut acc = products.recv().map_err(|_| stopped())?;
            for _ in 1..n {
                let got = comm.send_recv(&acc, next, prev)?;
                let p = products.recv().map_err(|_| stopped())?;
                check_received(OP, prev, &got, p.dims(), p.dtype())?;
                acc = ops::add(&got, &p)?;
            }
            Ok(acc)
        });
        for step in 0..n {
            let chunk = (rank + 2 * n - step - 1) % n;
            let p = ops::matmul_t(&x.narrow(chunk * r, r)?, w, false, tw)?;
            if products_tx.send(p).is_err() {
                break; // the communication thread failed: its error follows
            }
        }
        drop(products_tx);
        join(comm_thread)
    })
}
