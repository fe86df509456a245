//! Collective matmul over a throttled link (issue 13 items 3 and 5), as ratios measured in one
//! run: `LocalGroup` ranks whose transfers go through [`Throttled`] (a modelled slow link: the
//! in-process transport itself is far faster than any interconnect), on shapes like a reduced
//! ViT-22B in-projection (all-gather-matmul) and out-projection (matmul-reduce-scatter).
//!
//! The link's bandwidth is set so that one chunk's transfer takes as long as one chunk's matmul
//! (measured first): the ring's per-step balance, where overlap matters most. For each world
//! size and op it times compute alone (the ring's `n` chunk matmuls; Plain's one matmul),
//! communication alone (the ring's `n − 1` transfers through the link), then Plain and Ring,
//! and prints `Ring / max(compute, comm)` (1.0 = every transfer hidden; target ≤ 1.15), the
//! share of the communication time that Ring hides (`(compute + comm − ring) / comm`) and
//! `Plain / (compute + comm)` (1.0 expected: nothing overlaps).
//!
//! Each rank runs its matmuls in a rayon pool of its own with `cores / n` threads (at least
//! one), so that ranks do not steal each other's GEMM threads. `cargo bench -p vit-collective
//! --bench collective_matmul_cpu`

use std::{
    hint::black_box,
    time::{Duration, Instant},
};
use vit_collective::{
    all_gather_matmul, matmul_reduce_scatter, Communicator, LinkModel, LocalCommunicator, LocalGroup, MatmulComm,
    Throttled,
};
use vit_tensor::{ops, DType, Device, Tensor};

/// True when criterion runs the bench binary as a test (`cargo test --benches`): keep it short.
fn quick() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// The two ops of the bench.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// `x [r, K]` gathered, times `w [N/n, K]ᵀ`: the in-projection's forward.
    AllGather,
    /// `x [n·r, N/n]` times `w [K, N/n]ᵀ`, reduce-scattered: the out-projection's forward.
    ReduceScatter,
}

/// Sizes: `rows` per rank, `width` (ViT's K), `hidden` (the in-projection's N before sharding).
#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    width: usize,
    hidden: usize,
}

/// Medians over `samples` (after one warm-up round) of the time each of `fs` takes on this
/// rank, every rank starting each call together (a barrier on the un-throttled communicator
/// first). The calls are interleaved (one of each per round), so that a change in the load of
/// the machine during the run touches every measurement alike.
fn timed(comm: &LocalCommunicator, samples: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let mut t = vec![Vec::new(); fs.len()];
    for round in 0..=samples {
        for (f, t) in fs.iter_mut().zip(&mut t) {
            comm.barrier().unwrap();
            let start = Instant::now();
            f();
            if round > 0 {
                t.push(start.elapsed());
            }
        }
    }
    t.into_iter()
        .map(|mut t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect()
}

/// Times in seconds (slowest rank) of: the ring's chunk matmuls alone, Plain's one matmul
/// alone, the ring's transfers alone, Plain, Ring.
struct Times {
    compute_ring: f64,
    compute_plain: f64,
    comm: f64,
    plain: f64,
    ring: f64,
}

/// This rank's operands for `op`: `(x, w, chunk)` where `chunk` is one transfer's tensor.
fn operands(op: Op, s: Shape, n: usize, rank: usize) -> (Tensor, Tensor, Tensor) {
    let randn = |dims: Vec<usize>, seed: u64| Tensor::randn(dims, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap();
    let seed = 10 * rank as u64;
    match op {
        Op::AllGather => {
            let x = randn(vec![s.rows, s.width], seed);
            (x.clone(), randn(vec![s.hidden / n, s.width], seed + 1), x)
        }
        Op::ReduceScatter => (
            randn(vec![n * s.rows, s.hidden / n], seed),
            randn(vec![s.width, s.hidden / n], seed + 1),
            randn(vec![s.rows, s.width], seed + 2),
        ),
    }
}

/// One matmul of a chunk, as the ring does at each step.
fn chunk_matmul(op: Op, x: &Tensor, w: &Tensor, s: Shape) -> Tensor {
    let a = match op {
        Op::AllGather => x.clone(),
        Op::ReduceScatter => x.narrow(0, s.rows).unwrap(),
    };
    ops::matmul_t(&a, w, false, true).unwrap()
}

/// Seconds of one chunk's matmul with every rank computing at once (the slowest rank).
fn chunk_seconds(op: Op, s: Shape, n: usize, threads: usize, samples: usize) -> f64 {
    let t = LocalGroup::run(n, |comm| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (x, w, _) = operands(op, s, n, comm.rank());
        pool.install(|| timed(&comm, samples, &mut [&mut || drop(black_box(chunk_matmul(op, &x, &w, s)))])[0])
    });
    t.into_iter().max().unwrap().as_secs_f64()
}

fn measure(op: Op, s: Shape, n: usize, threads: usize, link: LinkModel, samples: usize) -> Times {
    let per_rank = LocalGroup::run(n, |comm| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let rank = comm.rank();
        let (x, w, chunk) = operands(op, s, n, rank);
        let link_comm = Throttled::new(comm, link).unwrap();
        let inner = link_comm.inner();
        pool.install(|| {
            // Plain's one matmul takes every rank's rows (all-gather-matmul) or all rows.
            let plain_x = match op {
                Op::AllGather => ops::concat(&vec![&x; n], 0).unwrap(),
                Op::ReduceScatter => x.clone(),
            };
            let run = |mode| match op {
                Op::AllGather => drop(black_box(all_gather_matmul(&link_comm, &x, &w, true, mode).unwrap())),
                Op::ReduceScatter => drop(black_box(matmul_reduce_scatter(&link_comm, &x, &w, true, mode).unwrap())),
            };
            let mut compute_ring = || {
                for _ in 0..n {
                    black_box(chunk_matmul(op, &x, &w, s));
                }
            };
            let mut compute_plain = || drop(black_box(ops::matmul_t(&plain_x, &w, false, true).unwrap()));
            let mut comm_alone = || {
                let mut cur = chunk.clone();
                for _ in 1..n {
                    cur = link_comm.send_recv(&cur, (rank + 1) % n, (rank + n - 1) % n).unwrap();
                }
                black_box(cur);
            };
            let mut plain = || run(MatmulComm::Plain);
            let mut ring = || run(MatmulComm::Ring);
            timed(inner, samples, &mut [&mut compute_ring, &mut compute_plain, &mut comm_alone, &mut plain, &mut ring])
        })
    });
    let slowest = |i: usize| per_rank.iter().map(|t| t[i]).max().unwrap().as_secs_f64();
    Times { compute_ring: slowest(0), compute_plain: slowest(1), comm: slowest(2), plain: slowest(3), ring: slowest(4) }
}

fn main() {
    let quick = quick();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let s =
        if quick { Shape { rows: 64, width: 32, hidden: 96 } } else { Shape { rows: 2048, width: 512, hidden: 1536 } };
    let samples = if quick { 1 } else { 7 };
    let latency = Duration::from_micros(50);
    println!(
        "collective_matmul_cpu: {cores} cores, f32, LocalGroup ranks over Throttled (latency {latency:?}), \
         rows {} per rank, width {}, hidden {} / n",
        s.rows, s.width, s.hidden
    );
    for n in [2, 4] {
        let threads = (cores / n).max(1);
        for op in [Op::AllGather, Op::ReduceScatter] {
            // One transfer per step as long as one matmul per step.
            let t_chunk = chunk_seconds(op, s, n, threads, samples);
            let chunk_bytes = s.rows * s.width * 4;
            let bw = chunk_bytes as f64 / (t_chunk - latency.as_secs_f64()).max(1e-4);
            let link = LinkModel { bandwidth_bytes_per_s: bw, latency };
            let t = measure(op, s, n, threads, link, samples);
            let name = match op {
                Op::AllGather => "all_gather_matmul    ",
                Op::ReduceScatter => "matmul_reduce_scatter",
            };
            println!(
                "  {name} world {n} ({threads} GEMM thread(s)/rank, link {:.0} MB/s): compute {:.3} s (plain {:.3} s), \
                 comm {:.3} s | ring {:.3} s = {:.2}x max(compute, comm), {:.0}% of comm hidden | plain {:.3} s = {:.2}x \
                 (compute + comm)",
                bw / 1e6,
                t.compute_ring,
                t.compute_plain,
                t.comm,
                t.ring,
                t.ring / t.compute_ring.max(t.comm),
                100.0 * ((t.compute_ring + t.comm - t.ring) / t.comm).clamp(0.0, 1.0),
                t.plain,
                t.plain / (t.compute_plain + t.comm),
            );
        }
    }
}
