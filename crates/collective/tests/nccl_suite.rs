//! The semantic suite on the NCCL backend (issue 12 item 1): one rank per visible GPU, as
//! threads of this process (`NcclGroup::run`), on device tensors, compared with the host
//! reference of `common` (rank-order f32 folds). With one GPU every result is exact; across
//! several, NCCL's reduction order differs from the reference's, so sums and means are compared
//! within a tolerance fitting the dtype (maxima and data movement stay exact).
//!
//! The tests that need a GPU are ignored elsewhere (`scripts/gpu-check.sh` runs them); the
//! constructor's errors are checked on every machine, for whichever case holds there.

mod common;

use common::{bits, input, reference_reduce, values};
use std::ops::Range;
use vit_collective::{
    nccl_available, BucketPlan, Communicator, Error, LocalGroup, NcclCommunicator, NcclGroup, NcclOverlappedAllReduce,
    ReduceOp,
};
use vit_tensor::{DType, Device, Tensor};

/// One rank per visible GPU.
fn gpus() -> Vec<usize> {
    (0..vit_tensor::cuda::device_count()).collect()
}

/// Runs `f` on every rank of an NCCL group over all visible GPUs; a failed check panics on its
/// rank (re-raised here).
fn on_gpus(f: impl Fn(&NcclCommunicator) + Sync) {
    NcclGroup::run(&gpus(), |c| f(&c)).expect("an NCCL group over the visible GPUs");
}

/// `t` on this rank's device.
fn here(c: &NcclCommunicator, t: &Tensor) -> Tensor {
    t.to_device(Device::Cuda(c.device())).expect("to_device")
}

/// Every rank's seeded input of `shape`, as this rank computes them (on the host).
fn all_inputs(n: usize, shape: &[usize], seed: u64, dtype: DType) -> Vec<Tensor> {
    (0..n).map(|r| input(shape, seed, r, dtype)).collect()
}

/// Relative tolerance of an `n`-rank sum in `dtype` against the f32 rank-order fold: 0 for one
/// rank (exact), else a few roundings of the dtype per rank.
fn tolerance(n: usize, dtype: DType) -> f32 {
    if n == 1 {
        return 0.0;
    }
    let eps = match dtype {
        DType::BF16 => 2f32.powi(-8),
        DType::F16 => 2f32.powi(-11),
        _ => 2f32.powi(-23),
    };
    4.0 * eps * n as f32
}

/// `got` equals `want` within `tol` relative to each element's scale `scale[i]` (the sum of the
/// ranks' magnitudes), bitwise when `tol` is 0.
fn assert_close(what: &str, got: &[f32], want: &[f32], scale: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let ok = if tol == 0.0 { g.to_bits() == w.to_bits() } else { (g - w).abs() <= tol * (s + 1e-6) };
        assert!(ok, "{what}: element {i}: got {g}, want {w} (tolerance {tol} × {s})");
    }
}

/// The sum of the ranks' magnitudes per element (the scale of a sum's rounding error).
fn magnitudes(xs: &[Tensor]) -> Vec<f32> {
    let mut acc = vec![0f32; xs[0].numel()];
    for x in xs {
        acc.iter_mut().zip(values(x)).for_each(|(a, v)| *a += v.abs());
    }
    acc
}

#[test]
fn without_nccl_the_constructors_say_why_and_with_it_they_check_their_devices() {
    let count = vit_tensor::cuda::device_count();
    if !nccl_available() {
        // No GPU or no libnccl here: every constructor is a clear error, never a panic.
        let e = NcclGroup::run(&[0], |_| ()).unwrap_err();
        assert!(matches!(&e, Error::Backend { op: "NcclGroup::run", .. }), "{e:?}");
        assert!(e.to_string().contains("NCCL is not available"), "{e}");
        let errs = LocalGroup::run(2, |host| NcclCommunicator::from_communicator(&host, host.rank()).unwrap_err());
        for (rank, e) in errs.iter().enumerate() {
            let msg = e.to_string();
            assert!(msg.contains(&format!("rank {rank}")) && msg.contains("NCCL is not available"), "{msg}");
        }
        assert!(vit_collective::nccl_version().is_none());
        return;
    }
    assert!(count > 0, "nccl_available() implies a CUDA device");
    let e = NcclGroup::run(&[], |_| ()).unwrap_err().to_string();
    assert!(e.contains("expected at least one CUDA device"), "{e}");
    let e = NcclGroup::run(&[count], |_| ()).unwrap_err().to_string();
    assert!(e.contains(&format!("expected CUDA devices in 0..{count}")) && e.contains(&format!("cuda:{count}")), "{e}");
    let e = NcclGroup::run(&[0, 0], |_| ()).unwrap_err().to_string();
    assert!(e.contains("cuda:0 appears twice"), "{e}");
    // A device that does not exist on one rank fails every rank of from_communicator.
    let errs = LocalGroup::run(2, |host| {
        let d = if host.rank() == 1 { count + 5 } else { 0 };
        NcclCommunicator::from_communicator(&host, d).unwrap_err().to_string()
    });
    assert!(errs[1].contains(&format!("cuda:{} does not exist", count + 5)), "{}", errs[1]);
    assert!(errs[0].contains("rank(s) [1] cannot use NCCL"), "{}", errs[0]);
    assert!(vit_collective::nccl_version().is_some());
}

#[test]
#[ignore = "needs a CUDA device"]
fn all_reduce_sum_mean_max_on_f32_bf16_f16_and_uneven_sizes() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                for shape in [&[3usize, 5, 7][..], &[1], &[13], &[1_000_003], &[2, 0]] {
                    let what = format!("rank {r}: all_reduce {op} {dtype} {shape:?}");
                    let xs = all_inputs(n, shape, 100, dtype);
                    let y = c.all_reduce(&here(c, &xs[r]), op).expect(&what);
                    assert_eq!((y.dims(), y.dtype(), y.device()), (shape, dtype, Device::Cuda(c.device())), "{what}");
                    let tol = if op == ReduceOp::Max { 0.0 } else { tolerance(n, dtype) };
                    let scale = magnitudes(&xs)
                        .iter()
                        .map(|m| m / if op == ReduceOp::Mean { n as f32 } else { 1.0 })
                        .collect::<Vec<_>>();
                    assert_close(&what, &values(&y), &reference_reduce(&xs, op), &scale, tol);
                }
            }
        }
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn reduce_scatter_gives_each_rank_its_rows_of_the_reduction() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        for dtype in [DType::F32, DType::BF16] {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                let (m, w) = (3, 37); // 37 columns: chunks that are not a multiple of 16 bytes
                let what = format!("rank {r}: reduce_scatter {op} {dtype}");
                let xs = all_inputs(n, &[n * m, w], 200, dtype);
                let y = c.reduce_scatter(&here(c, &xs[r]), op).expect(&what);
                assert_eq!(y.dims(), [m, w], "{what}");
                let full = reference_reduce(&xs, op);
                let scale = magnitudes(&xs);
                let rows = r * m * w..(r + 1) * m * w;
                let tol = if op == ReduceOp::Max { 0.0 } else { tolerance(n, dtype) };
                assert_close(&what, &values(&y), &full[rows.clone()], &scale[rows], tol);
            }
        }
        let e = c.reduce_scatter(&here(c, &input(&[n + 1, 2], 202, r, DType::F32)), ReduceOp::Sum);
        match (n, e) {
            (1, Ok(_)) | (_, Err(Error::Shape { .. })) => {}
            (_, other) => panic!("expected a Shape error, got {other:?}"),
        }
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn all_gather_all_to_all_and_broadcast_move_bytes_exactly() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let xs = all_inputs(n, &[5, 3], 300, dtype);
            let y = c.all_gather(&here(c, &xs[r])).expect("all_gather");
            assert_eq!(y.dims(), [5 * n, 3]);
            let want: Vec<u32> = xs.iter().flat_map(bits).collect();
            assert_eq!(bits(&y), want, "rank {r}: all_gather {dtype}");
        }
        let me = Tensor::from_vec(vec![r as i32 * 10, r as i32 * 10 + 1], [1, 2], Device::Cuda(c.device())).unwrap();
        let y = c.all_gather(&me).expect("all_gather i32").to_vec::<i32>().unwrap();
        assert_eq!(y, (0..n as i32).flat_map(|q| [q * 10, q * 10 + 1]).collect::<Vec<_>>());
        // all_to_all: chunk j of rank i lands at position i on rank j (odd-sized bf16 chunks).
        let xs = all_inputs(n, &[3 * n, 7], 400, DType::BF16);
        let y = c.all_to_all(&here(c, &xs[r])).expect("all_to_all");
        let want: Vec<u32> = xs.iter().flat_map(|x| bits(&x.narrow(3 * r, 3).unwrap())).collect();
        assert_eq!((y.dims(), bits(&y)), (&[3 * n, 7][..], want), "rank {r}: all_to_all");
        for root in 0..n {
            let xs = all_inputs(n, &[1001], 500, DType::F16);
            let y = c.broadcast(&here(c, &xs[r]), root).expect("broadcast");
            assert_eq!(bits(&y), bits(&xs[root]), "rank {r}: broadcast from {root}");
        }
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn send_recv_ring_paired_messages_and_barrier() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        // A ring (with one GPU: to itself), shape and dtype carried by the header.
        let xs = all_inputs(n, &[3, 2, 5], 600, DType::BF16);
        let y = c.send_recv(&here(c, &xs[r]), (r + 1) % n, (r + n - 1) % n).expect("send_recv");
        assert_eq!((y.dims(), y.dtype()), (&[3, 2, 5][..], DType::BF16));
        assert_eq!(bits(&y), bits(&xs[(r + n - 1) % n]), "rank {r}: ring");
        if n > 1 && r < 2 {
            let a = all_inputs(2, &[4], 700, DType::F32);
            let b = Tensor::from_vec(vec![7u32, 8, 9], [3], Device::Cuda(c.device())).unwrap();
            if r == 0 {
                c.send(&here(c, &a[0]), 1).expect("send");
                c.send(&b, 1).expect("send");
                assert_eq!(bits(&c.recv(1).expect("recv")), bits(&a[1]));
            } else {
                assert_eq!(bits(&c.recv(0).expect("recv")), bits(&a[0]));
                assert_eq!(c.recv(0).expect("recv").to_vec::<u32>().unwrap(), vec![7, 8, 9]);
                c.send(&here(c, &a[1]), 0).expect("send");
            }
        }
        // Sending to or receiving from oneself alone would wait forever: refused.
        let x = here(c, &xs[r]);
        assert!(matches!(c.send(&x, r), Err(Error::Deadlock { op: "send", .. })));
        assert!(matches!(c.recv(r), Err(Error::Deadlock { op: "recv", .. })));
        assert!(matches!(c.send(&x, n), Err(Error::Rank { op: "send", got, .. }) if got == n));
        c.barrier().expect("barrier");
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn host_tensors_and_disagreements_are_errors_on_every_rank_and_the_group_stays_usable() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        // A CPU tensor (on rank 0 only): every rank gets the error naming rank 0 and cpu.
        let x = input(&[4], 800, r, DType::F32);
        let x = if r == 0 { x } else { here(c, &x) };
        let e = c.all_reduce(&x, ReduceOp::Sum).unwrap_err();
        assert!(matches!(&e, Error::Value { op: "all_reduce", msg } if msg.contains("rank 0: cpu")), "rank {r}: {e}");
        if r == 0 {
            let e = c.send_recv(&x, 0, 0).unwrap_err().to_string();
            assert!(e.contains("expected a tensor on cuda:") && e.contains("got cpu"), "{e}");
        }
        // Integer reductions are a DType error everywhere.
        let ints = Tensor::from_vec(vec![1i32, 2], [2], Device::Cuda(c.device())).unwrap();
        assert!(matches!(c.all_reduce(&ints, ReduceOp::Sum), Err(Error::DType { op: "all_reduce", .. })));
        if n > 1 {
            let x = here(c, &input(&[2, 1 + usize::from(r == 0)], 801, r, DType::F32));
            assert!(matches!(c.all_reduce(&x, ReduceOp::Sum), Err(Error::Mismatch { op: "all_reduce", .. })));
            let x = here(c, &input(&[n, 2], 802, r, DType::F32));
            let got = if r == 0 { c.all_gather(&x).map(|_| ()) } else { c.all_reduce(&x, ReduceOp::Sum).map(|_| ()) };
            assert!(matches!(got, Err(Error::Mismatch { .. })), "rank {r}: {got:?}");
        }
        c.barrier().expect("usable after the errors");
        let y = c.all_reduce(&here(c, &input(&[3], 803, r, DType::F32)), ReduceOp::Max).expect("usable");
        assert_eq!(values(&y), reference_reduce(&all_inputs(n, &[3], 803, DType::F32), ReduceOp::Max));
    });
}

#[test]
#[ignore = "needs a CUDA device"]
#[allow(clippy::single_range_in_vec_init)] // lists of ranges, some of one
fn all_reduce_in_place_reduces_the_ranges_alone_and_copies_a_shared_buffer_first() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        let xs = all_inputs(n, &[1000], 900, DType::F32);
        let ranges: Vec<Range<usize>> = vec![700..1000, 0..3, 10..699];
        let mut buf = here(c, &xs[r]);
        let shared = buf.clone(); // must keep its values
        c.all_reduce_in_place(&mut buf, &ranges, ReduceOp::Sum).expect("in place");
        let (got, mine) = (values(&buf), values(&xs[r]));
        let want = reference_reduce(&xs, ReduceOp::Sum);
        let scale = magnitudes(&xs);
        for range in &ranges {
            let what = format!("rank {r}: range {range:?}");
            assert_close(
                &what,
                &got[range.clone()],
                &want[range.clone()],
                &scale[range.clone()],
                tolerance(n, DType::F32),
            );
        }
        for i in [3, 5, 9, 699] {
            assert_eq!(got[i].to_bits(), mine[i].to_bits(), "rank {r}: element {i} outside the ranges changed");
        }
        assert_eq!(bits(&shared), bits(&xs[r]), "rank {r}: a tensor sharing the buffer changed");
        // The same through the trait object the trainer holds, with bf16 and Mean.
        let xs = all_inputs(n, &[64], 901, DType::BF16);
        let mut buf = here(c, &xs[r]);
        let dynamic: &dyn Communicator = c;
        dynamic.all_reduce_in_place(&mut buf, &[0..64], ReduceOp::Mean).expect("in place, mean");
        let scale: Vec<f32> = magnitudes(&xs).iter().map(|m| m / n as f32).collect();
        assert_close(
            "bf16 mean",
            &values(&buf),
            &reference_reduce(&xs, ReduceOp::Mean),
            &scale,
            tolerance(n, DType::BF16),
        );
        let e = c.all_reduce_in_place(&mut buf, &[0..65], ReduceOp::Sum).unwrap_err().to_string();
        assert!(e.contains("ends past the buffer's 64 elements"), "{e}");
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn split_by_parity_gives_independent_groups_on_the_same_devices() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        let g = c.split(r % 2, n - r).expect("split");
        let mut members: Vec<usize> = (0..n).filter(|q| q % 2 == r % 2).collect();
        members.reverse();
        assert_eq!((g.world_size(), members[g.rank()]), (members.len(), r));
        let me = Tensor::from_vec(vec![r as i32], [1], Device::Cuda(c.device())).unwrap();
        let got = g.all_gather(&me).expect("all_gather in the group").to_vec::<i32>().unwrap();
        assert_eq!(got, members.iter().map(|&q| q as i32).collect::<Vec<_>>());
        c.barrier().expect("the parent still works");
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn from_communicator_over_a_local_group_makes_a_working_nccl_group() {
    let n = gpus().len();
    let results = LocalGroup::run(n, |host| -> Result<Vec<f32>, Error> {
        let nccl = NcclCommunicator::from_communicator(&host, host.rank())?;
        assert_eq!((nccl.rank(), nccl.world_size(), nccl.device()), (host.rank(), n, host.rank()));
        let x = input(&[17], 1000, host.rank(), DType::F32).to_device(Device::Cuda(nccl.device()))?;
        Ok(values(&nccl.all_reduce(&x, ReduceOp::Max)?))
    });
    let want = reference_reduce(&all_inputs(n, &[17], 1000, DType::F32), ReduceOp::Max);
    for r in results {
        assert_eq!(r.expect("rank"), want);
    }
}

/// Parameters of the overlap tests: contiguous element ranges covering a buffer of 1_200_007
/// (uneven sizes, no padding), and the plan cutting them into buckets of about 300k elements.
fn overlap_params() -> (Vec<Range<usize>>, usize) {
    BucketPlan::contiguous_ranges(&[1, 250_000, 333_333, 17, 200_000, 116_656, 300_000])
}

/// Queues about a millisecond of matmuls on the compute stream of `c`'s device (results
/// dropped): a write queued after it runs late, so an all-reduce that did not wait for the
/// compute stream would read the bucket before it.
fn busy(c: &NcclCommunicator) {
    let dev = Device::Cuda(c.device());
    let a = Tensor::randn([2048, 2048], 0.0, 1.0, 7, DType::F32, dev).unwrap();
    for _ in 0..4 {
        drop(vit_tensor::ops::matmul(&a, &a).unwrap());
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn overlapped_buckets_written_late_equal_the_plain_in_place_all_reduce() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        let (params, len) = overlap_params();
        let plan = BucketPlan::new(&params, len, 300_000).expect("plan");
        assert!(plan.buckets().len() >= 3, "{:?}", plan.buckets());
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            let what = format!("rank {r}: {op}");
            let xs = all_inputs(n, &[len], 1100, DType::F32);
            // The reference: the plain in-place all-reduce of the same buckets.
            let mut want = here(c, &xs[r]);
            c.all_reduce_ranges_in_place(&mut want, plan.buckets(), op).expect(&what);
            // Poisoned first: a bucket reduced before its write would carry NaN (or stale
            // values) into the result.
            let dev = Device::Cuda(c.device());
            let mut buf = Tensor::full(f32::NAN, [len], DType::F32, dev).unwrap();
            let mine = here(c, &xs[r]);
            let mut red = NcclOverlappedAllReduce::start(c, &plan, op, &mut buf).expect(&what);
            // As backward: the last parameters first, each written by the compute stream behind
            // a queue of matmuls just before it is marked.
            for i in (0..params.len()).rev() {
                busy(c);
                let p = &params[i];
                buf.write_at(p.start, &mine.narrow(p.start, p.len()).unwrap()).unwrap();
                red.ready(&buf, i).expect(&what);
            }
            red.finish(&mut buf).expect(&what);
            assert_eq!(bits(&buf), bits(&want), "{what}: overlapped vs plain in-place all-reduce");
            if n == 1 {
                assert_eq!(bits(&buf), bits(&xs[0]), "{what}: one rank's sum is its buffer");
            }
        }
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_overlapped_all_reduce_passes_its_self_check() {
    on_gpus(|c| {
        let verdict = NcclOverlappedAllReduce::self_check(c).expect("self-check ran");
        assert_eq!(verdict, None, "rank {}", c.rank());
        c.barrier().expect("usable after the check");
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn overlapped_all_reduce_errors_are_clear_and_an_abandoned_one_aborts_the_communicator() {
    on_gpus(|c| {
        let (n, r) = (c.world_size(), c.rank());
        let (params, len) = overlap_params();
        let plan = BucketPlan::new(&params, len, 300_000).expect("plan");
        let dev = Device::Cuda(c.device());
        let mut buf = here(c, &input(&[len], 1200, r, DType::F32));
        // A parameter outside the plan: an error now and from finish; nothing was launched,
        // so the communicator stays usable.
        let mut red = NcclOverlappedAllReduce::start(c, &plan, ReduceOp::Sum, &mut buf).unwrap();
        let e = red.ready(&buf, params.len()).unwrap_err().to_string();
        assert!(e.contains(&format!("parameter {} is not in the bucket plan", params.len())), "{e}");
        let e = red.finish(&mut buf).unwrap_err().to_string();
        assert!(e.contains("not in the bucket plan"), "{e}");
        c.barrier().expect("usable after an error before any launch");
        // A buffer that is not the one given to start.
        let other = Tensor::zeros([len], DType::F32, dev).unwrap();
        let mut red = NcclOverlappedAllReduce::start(c, &plan, ReduceOp::Sum, &mut buf).unwrap();
        let last = params.len() - 1;
        let e = red.ready(&other, last).unwrap_err().to_string();
        assert!(e.contains("the buffer was replaced or copied"), "{e}");
        drop(red);
        c.barrier().expect("usable: nothing was launched");
        // A buffer of the wrong length, a host buffer: errors on every rank at start.
        let mut short = Tensor::zeros([len - 1], DType::F32, dev).unwrap();
        let e = NcclOverlappedAllReduce::start(c, &plan, ReduceOp::Sum, &mut short).unwrap_err().to_string();
        assert!(e.contains(&format!("expected the bucket plan's [{len}]")), "{e}");
        let mut host = Tensor::zeros([len], DType::F32, Device::Cpu).unwrap();
        let e = NcclOverlappedAllReduce::start(c, &plan, ReduceOp::Sum, &mut host).unwrap_err();
        assert!(matches!(&e, Error::Value { msg, .. } if msg.contains("cpu")), "{e}");
        if n > 1 {
            // Ranks with different plans: the same Mismatch everywhere, no NCCL call made.
            let cut = if r == 0 { 100_000 } else { 300_000 };
            let mine = BucketPlan::new(&params, len, cut).unwrap();
            let e = NcclOverlappedAllReduce::start(c, &mine, ReduceOp::Sum, &mut buf).unwrap_err();
            assert!(
                matches!(&e, Error::Mismatch { msg, .. } if msg.contains("same gradient bucket plan")),
                "rank {r}: {e}"
            );
        }
        // Dropped with a bucket in flight (an error during backward): the communicator is
        // aborted, so later calls fail clearly instead of hanging.
        let mut red = NcclOverlappedAllReduce::start(c, &plan, ReduceOp::Sum, &mut buf).unwrap();
        for i in (0..params.len()).rev().take(2) {
            red.ready(&buf, i).unwrap();
        }
        drop(red);
        let e = c.barrier().unwrap_err();
        assert!(matches!(&e, Error::Poisoned { reason, .. } if reason.contains("abandoned")), "rank {r}: {e}");
    });
}
