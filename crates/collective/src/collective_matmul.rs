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
//! `vit_tensor::ops` accept. On CUDA today the matmuls run on the device while the transfers go
//! through host memory (as every collective of [`crate::LocalGroup`] does); the GPU form, with
//! the transfers on a separate CUDA stream as NCCL send/recv ordered by events, is future work.

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
/// [`MatmulComm::Ring`] the products of the chunks are computed one by one as the chunks travel
/// around the ring, so `y` has the same bits as with [`MatmulComm::Plain`] only when the matmul
/// kernel's results do not depend on the row count (on the CPU they do not). `n = 1` is one
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
        MatmulComm::Ring => ring_all_gather_matmul(comm, x, w, transpose_w),
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
    if rows % n != 0 {
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
        MatmulComm::Ring => ring_matmul_reduce_scatter(comm, x, w, transpose_w, rows / n),
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
/// as fast as they arrive (a chunk does not wait for its matmul); the calling thread multiplies
/// each chunk as it comes: at step `s` the chunk of rank `rank − s`.
fn ring_all_gather_matmul(comm: &dyn Communicator, x: &Tensor, w: &Tensor, tw: bool) -> Result<(Tensor, Tensor)> {
    const OP: &str = "all_gather_matmul";
    let (n, rank) = (comm.world_size(), comm.rank());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let mut ys: Vec<Option<Tensor>> = vec![None; n];
    let mut xs: Vec<Option<Tensor>> = vec![None; n];
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = mpsc::channel::<Tensor>();
        let comm_thread = s.spawn(move || -> Result<()> {
            let mut cur = x.clone();
            for _ in 1..n {
                let got = comm.send_recv(&cur, next, prev)?;
                check_received(OP, prev, &got, x.dims(), x.dtype())?;
                if tx.send(got.clone()).is_err() {
                    return Ok(()); // the calling thread failed; it reports its own error
                }
                cur = got;
            }
            Ok(())
        });
        let mut cur = x.clone();
        for step in 0..n {
            if step > 0 {
                match rx.recv() {
                    Ok(t) => cur = t,
                    Err(_) => break, // the communication thread failed: its error follows
                }
            }
            let src = (rank + n - step) % n;
            ys[src] = Some(ops::matmul_t(&cur, w, false, tw)?);
            xs[src] = Some(cur.clone());
        }
        join(comm_thread)
    })?;
    let ys: Vec<Tensor> = ys.into_iter().map(|t| t.expect("every step filled its chunk")).collect();
    let xs: Vec<Tensor> = xs.into_iter().map(|t| t.expect("every step filled its chunk")).collect();
    Ok((ops::concat(&ys.iter().collect::<Vec<_>>(), 0)?, ops::concat(&xs.iter().collect::<Vec<_>>(), 0)?))
}

/// The ring matmul-reduce-scatter. Step `s` computes the partial product for output chunk
/// `(rank − s − 1) mod n` while the communication thread passes the previous step's partial sum
/// to rank + 1 and receives rank − 1's, which is the partial sum of the same chunk; after
/// `n` steps the partial sum in hand is this rank's own chunk, reduced over every rank.
fn ring_matmul_reduce_scatter(comm: &dyn Communicator, x: &Tensor, w: &Tensor, tw: bool, r: usize) -> Result<Tensor> {
    const OP: &str = "matmul_reduce_scatter";
    let (n, rank) = (comm.world_size(), comm.rank());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let product = |step: usize| -> Result<Tensor> {
        let chunk = (rank + 2 * n - step - 1) % n;
        Ok(ops::matmul_t(&x.narrow(chunk * r, r)?, w, false, tw)?)
    };
    std::thread::scope(|s| -> Result<Tensor> {
        let (job_tx, jobs) = mpsc::channel::<Tensor>();
        let (done, results) = mpsc::channel::<Result<Tensor>>();
        let comm_thread = s.spawn(move || {
            for t in jobs {
                let got = comm.send_recv(&t, next, prev);
                let failed = got.is_err();
                if done.send(got).is_err() || failed {
                    return;
                }
            }
        });
        let mut acc = product(0)?;
        for step in 1..n {
            // A failed send means the thread stopped after an error, which `results` holds.
            let _ = job_tx.send(acc);
            let p = product(step)?;
            let got = match results.recv() {
                Ok(got) => got?,
                Err(_) => {
                    return Err(Error::Backend { op: OP, msg: "the communication thread ended early".into() });
                }
            };
            check_received(OP, prev, &got, p.dims(), p.dtype())?;
            acc = ops::add(&got, &p)?;
        }
        drop(job_tx); // the thread ends after the last job
        join(comm_thread);
        Ok(acc)
    })
}
