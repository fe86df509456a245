//! MPI all-reduce bandwidth (issue 12 item 7), as ratios measured in one run: the MPI backend's
//! all-reduce (`MpiCommunicator`: a reduce-scatter by all-to-all, folded in f32 in rank order so
//! every backend gives the same bits, then an all-gather) against the MPI library's own
//! `MPI_Allreduce` (whose summation order is the library's) and a memcpy of the same bytes.
//! Bus bandwidth as NCCL defines it: 2(n−1)/n · bytes / time. Run it under mpirun:
//!
//! ```text
//! cargo bench -p vit-collective --features mpi --bench allreduce_mpi --no-run
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/release/deps/allreduce_mpi-<hash>
//! ```
//! Rank 0 prints one line per size. Started alone (or by `cargo bench`) it is a world of one
//! and says so.

use mpi::traits::CommunicatorCollectives;
use std::{hint::black_box, time::Instant};
use vit_collective::{Communicator, MpiCommunicator, ReduceOp};
use vit_tensor::{DType, Device, Tensor};

/// Median seconds of `samples` runs of `f` after one warm-up, the slowest rank's (an all-reduce
/// of the times with max, so every rank reports the same).
fn median_secs(comm: &MpiCommunicator, samples: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..samples)
        .map(|_| {
            comm.barrier().unwrap();
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    let mine = Tensor::from_vec(vec![t[t.len() / 2] as f32], [1], Device::Cpu).unwrap();
    comm.all_reduce(&mine, ReduceOp::Max).unwrap().to_f32_vec().unwrap()[0] as f64
}

fn main() {
    let comm = MpiCommunicator::init().expect("MPI");
    let (n, rank) = (comm.world_size(), comm.rank());
    if n == 1 {
        println!("allreduce_mpi: a world of one; run it under `mpirun -np 2` (see the file's docs)");
        return;
    }
    let world = mpi::topology::SimpleCommunicator::world();
    let samples = 7;
    for mib in [1usize, 16, 64] {
        let elems = mib << 18;
        let x = Tensor::randn([elems], 0.0, 1.0, rank as u64, DType::F32, Device::Cpu).unwrap();
        let ours = median_secs(&comm, samples, || {
            black_box(comm.all_reduce(&x, ReduceOp::Sum).unwrap());
        });
        let send = x.to_f32_vec().unwrap();
        let mut recv = vec![0f32; elems];
        let native = median_secs(&comm, samples, || {
            world.all_reduce_into(&send[..], &mut recv[..], mpi::collective::SystemOperation::sum());
            black_box(&recv);
        });
        let mut dst = vec![0f32; elems];
        let copy = median_secs(&comm, samples, || {
            dst.copy_from_slice(black_box(&send));
            black_box(&dst);
        });
        let bytes = (elems * 4) as f64;
        let bus = |t: f64| 2.0 * (n - 1) as f64 / n as f64 * bytes / t / 1e9;
        if rank == 0 {
            println!(
                "allreduce_mpi n={n} {mib} MiB: ours {:.2} GB/s bus ({:.1} ms), MPI_Allreduce {:.2} GB/s ({:.1} ms), \
                 memcpy {:.2} GB/s; ours/MPI {:.2}, ours/memcpy {:.3}",
                bus(ours),
                ours * 1e3,
                bus(native),
                native * 1e3,
                bytes / copy / 1e9,
                native / ours,
                bus(ours) / (bytes / copy / 1e9)
            );
        }
    }
}
