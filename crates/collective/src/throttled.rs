//! [`Throttled`]: a test double of a slow interconnect (issue 13 item 5). It wraps any
//! [`Communicator`] and sleeps for the time a link of a given bandwidth and latency
//! ([`LinkModel`]) would take before handing each transfer to the wrapped communicator, so that
//! overlap schemes (collective matmul, bucketed all-reduce) can be measured on one machine,
//! where the in-process transport is far faster than any real link. Sleeping costs no CPU: the
//! modelled link runs "beside" the computation, as a NIC or NVLink would. It is a model for
//! benches and tests, not a transport.

use crate::{Communicator, Error, ReduceOp, Result};
use std::time::Duration;
use vit_tensor::Tensor;

/// A link's cost model: a transfer of `b` bytes takes `latency + b / bandwidth_bytes_per_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Bytes per second each direction of the link carries (full duplex); `f64::INFINITY` for a
    /// link that only has latency.
    pub bandwidth_bytes_per_s: f64,
    /// Time of a transfer of zero bytes.
    pub latency: Duration,
}

impl LinkModel {
    /// The time of one transfer of `bytes` bytes: `latency + bytes / bandwidth`.
    pub fn transfer(&self, bytes: usize) -> Duration {
        self.latency + Duration::from_secs_f64(bytes as f64 / self.bandwidth_bytes_per_s)
    }

    /// The time of a ring collective of `steps` steps, each moving `chunk_bytes` bytes per
    /// rank: `steps × (latency + chunk_bytes / bandwidth)`.
    pub fn ring(&self, steps: usize, chunk_bytes: usize) -> Duration {
        self.transfer(chunk_bytes) * steps as u32
    }
}

/// A [`Communicator`] whose transfers take at least the time of a modelled link (see the module
/// docs):
///
/// - [`send`](Communicator::send) and [`send_recv`](Communicator::send_recv) sleep for
///   [`LinkModel::transfer`] of the bytes sent, then delegate: the receiver sees the message
///   one link time after the send began. The sender pays, once per message, so
///   [`recv`](Communicator::recv) delegates without sleeping (a `send_recv` in a ring of
///   equal chunks thus takes one link time, both directions at once);
/// - collectives sleep for a ring algorithm's cost, then delegate: with `n` ranks and `b` the
///   bytes of this rank's input, all-gather `(n−1)` steps of `b`, reduce-scatter and all-to-all
///   `(n−1)` steps of `b/n`, all-reduce `2(n−1)` steps of `b/n` (a reduce-scatter and an
///   all-gather), broadcast `(n−1)` latencies plus `b / bandwidth` (a pipelined chain), barrier
///   `(n−1)` latencies. A world of one costs nothing.
///
/// Results and errors are the wrapped communicator's.
#[derive(Debug)]
pub struct Throttled<C: Communicator> {
    inner: C,
    link: LinkModel,
}

impl<C: Communicator> Throttled<C> {
    /// Wraps `inner` behind `link`. An error ([`Error::Value`]) unless the bandwidth is > 0
    /// (infinity allowed) and not NaN.
    pub fn new(inner: C, link: LinkModel) -> Result<Self> {
        let bw = link.bandwidth_bytes_per_s;
        if bw.is_nan() || bw <= 0.0 {
            return Err(Error::Value {
                op: "Throttled::new",
                msg: format!("expected a bandwidth > 0 bytes/s, got {bw}"),
            });
        }
        Ok(Throttled { inner, link })
    }

    /// The link model.
    pub fn link(&self) -> LinkModel {
        self.link
    }

    /// The wrapped communicator.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The wrapped communicator, unwrapped.
    pub fn into_inner(self) -> C {
        self.inner
    }

    fn world(&self) -> usize {
        self.inner.world_size()
    }

    /// Sleeps for a ring collective of `steps` steps of `chunk_bytes` (nothing in a world of one).
    fn ring(&self, steps: usize, chunk_bytes: usize) {
        if self.world() > 1 {
            std::thread::sleep(self.link.ring(steps, chunk_bytes));
        }
    }
}

/// Bytes of `x`'s elements.
fn bytes(x: &Tensor) -> usize {
    x.numel() * x.dtype().size_in_bytes()
}

impl<C: Communicator> Communicator for Throttled<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = self.world();
        self.ring(2 * (n - 1), bytes(x) / n);
        self.inner.all_reduce(x, op)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.ring(self.world() - 1, bytes(x));
        self.inner.all_gather(x)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = self.world();
        self.ring(n - 1, bytes(x) / n);
        self.inner.reduce_scatter(x, op)
    }

    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.world();
        self.ring(n - 1, bytes(x) / n);
        self.inner.all_to_all(x)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let n = self.world();
        if n > 1 {
            std::thread::sleep(self.link.ring(n - 1, 0) + self.link.transfer(bytes(x)) - self.link.latency);
        }
        self.inner.broadcast(x, root)
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        std::thread::sleep(self.link.transfer(bytes(x)));
        self.inner.send(x, to)
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        self.inner.recv(from)
    }

    fn send_recv(&self, x: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        std::thread::sleep(self.link.transfer(bytes(x)));
        self.inner.send_recv(x, to, from)
    }

    fn barrier(&self) -> Result<()> {
        self.ring(self.world() - 1, 0);
        self.inner.barrier()
    }

    /// The sub-group behind the same link model (a split costs what a barrier does).
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        self.ring(self.world() - 1, 0);
        Ok(Box::new(Throttled { inner: self.inner.split(color, key)?, link: self.link }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalGroup;
    use std::time::Instant;
    use vit_tensor::{DType, Device};

    const LINK: LinkModel = LinkModel { bandwidth_bytes_per_s: 100e6, latency: Duration::from_millis(2) };

    #[test]
    fn send_recv_takes_at_least_the_modelled_time() {
        // 1 MB of f32 at 100 MB/s: 10 ms + 2 ms latency.
        let elems = 250_000;
        let want = LINK.transfer(elems * 4);
        assert_eq!(want, Duration::from_millis(12));
        let out = LocalGroup::run(2, |comm| -> Result<(Duration, Vec<f32>, Vec<f32>)> {
            let comm = Throttled::new(comm, LINK)?;
            let x = Tensor::randn([elems], 0.0, 1.0, 7 + comm.rank() as u64, DType::F32, Device::Cpu)?;
            let (to, from) = (1 - comm.rank(), 1 - comm.rank());
            let start = Instant::now();
            let got = comm.send_recv(&x, to, from)?;
            Ok((start.elapsed(), got.to_f32_vec()?, x.to_f32_vec()?))
        });
        let out: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
        for (rank, (took, got, _)) in out.iter().enumerate() {
            assert!(*took >= want, "rank {rank}: send_recv of 1 MB took {took:?}, the link needs {want:?}");
            // The data is the peer's, unchanged.
            assert_eq!(got, &out[1 - rank].2, "rank {rank}");
        }
    }

    #[test]
    fn collectives_take_a_ring_time_and_delegate() {
        let out = LocalGroup::run(4, |comm| -> Result<(Duration, Vec<f32>)> {
            let comm = Throttled::new(comm, LINK)?;
            let x = Tensor::full(comm.rank() as f32, [1000], DType::F32, Device::Cpu)?;
            let start = Instant::now();
            let y = comm.all_reduce(&x, ReduceOp::Sum)?;
            Ok((start.elapsed(), y.to_f32_vec()?))
        });
        // 6 steps of 2 ms + 1000 bytes at 100 MB/s.
        let want = LINK.ring(6, 1000);
        for r in out {
            let (took, y) = r.unwrap();
            assert!(took >= want, "all_reduce took {took:?}, the ring needs {want:?}");
            assert_eq!(y, vec![6.0; 1000]);
        }
    }

    #[test]
    fn a_bad_bandwidth_is_an_error() {
        for bw in [0.0, -1.0, f64::NAN] {
            let link = LinkModel { bandwidth_bytes_per_s: bw, latency: Duration::ZERO };
            let e = Throttled::new(crate::SingleProcess::new(), link).unwrap_err().to_string();
            assert!(e.contains("expected a bandwidth > 0 bytes/s"), "{e}");
        }
        let link = LinkModel { bandwidth_bytes_per_s: f64::INFINITY, latency: Duration::ZERO };
        assert!(Throttled::new(crate::SingleProcess::new(), link).is_ok());
    }
}
