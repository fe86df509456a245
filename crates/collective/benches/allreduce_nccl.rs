//! NCCL all-reduce bandwidth (issue 12 item 7), as ratios measured in one run: the in-place
//! all-reduce of a device buffer (`NcclCommunicator::all_reduce_ranges_in_place`, what the
//! trainer runs on its gradients; each call includes the signature exchange and the wait for
//! completion) over 1–256 MiB of f32 and bf16, against a device-to-device copy of the same
//! bytes on the same GPU. One rank per visible GPU, as threads of this process.
//!
//! Bus bandwidth as NCCL defines it: algbw × 2(n−1)/n, algbw = bytes / time. With one GPU the
//! factor is 0 (nothing crosses a link): the table reports algbw then, and says so. Without a
//! GPU or NCCL it prints why and exits 0.
//!
//! ```text
//! cargo bench -p vit-collective --bench allreduce_nccl
//! ```

use std::time::Instant;
use vit_collective::{nccl_available, nccl_version, Communicator, NcclCommunicator, NcclGroup, ReduceOp};
use vit_tensor::{cuda::kernel, DType, Device, Tensor};

/// Median seconds of `samples` runs of `f` after two warm-ups, the slowest rank's (a max
/// all-reduce of the medians, so every rank reports the same). `f` returns once its work on the
/// device has completed.
fn median_secs(comm: &NcclCommunicator, samples: usize, mut f: impl FnMut()) -> f64 {
    f();
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
    let mine = Tensor::from_vec(vec![t[t.len() / 2] as f32], [1], Device::Cuda(comm.device())).unwrap();
    comm.all_reduce(&mine, ReduceOp::Max).unwrap().to_f32_vec().unwrap()[0] as f64
}

fn main() {
    if !nccl_available() {
        let why = NcclGroup::run(&[0], |_| ()).err().map_or_else(String::new, |e| e.to_string());
        println!("allreduce_nccl: skipped, no GPU with NCCL here ({why})");
        return;
    }
    let gpus: Vec<usize> = (0..vit_tensor::cuda::device_count()).collect();
    let n = gpus.len();
    let factor = 2.0 * (n as f64 - 1.0) / n as f64;
    let rows = NcclGroup::run(&gpus, |comm| {
        let dev = Device::Cuda(comm.device());
        let mut rows = Vec::new();
        for dtype in [DType::F32, DType::BF16] {
            for mib in [1usize, 4, 16, 64, 256] {
                let bytes = mib << 20;
                let elems = bytes / dtype.size_in_bytes();
                let samples = if mib >= 64 { 10 } else { 30 };
                let mut buf = Tensor::randn([elems], 0.0, 1.0, comm.rank() as u64, dtype, dev).unwrap();
                #[allow(clippy::single_range_in_vec_init)] // one range: the whole buffer
                let all = [0..elems];
                let reduce = median_secs(&comm, samples, || {
                    comm.all_reduce_ranges_in_place(&mut buf, &all, ReduceOp::Sum).unwrap();
                });
                let copy = median_secs(&comm, samples, || {
                    let c = kernel::copy(&buf).unwrap();
                    vit_tensor::cuda::synchronize(comm.device()).unwrap();
                    drop(c);
                });
                rows.push((dtype, mib, reduce, copy));
            }
        }
        rows
    })
    .expect("an NCCL group over the visible GPUs");
    let gb = |bytes: usize, secs: f64| bytes as f64 / secs / 1e9;
    println!(
        "allreduce_nccl: NCCL {} on {n} GPU(s) ({}), in-place all-reduce (sum) vs a device-to-device copy",
        nccl_version().unwrap_or_default(),
        if n == 1 { "world 1: bus bandwidth is 0 by definition, so the table shows algbw" } else { "bus bandwidth" }
    );
    let label = if n == 1 { "algbw GB/s" } else { "busbw GB/s" };
    println!("| dtype | MiB | all-reduce ms | {label} | d2d copy ms | copy GB/s | {label} / copy |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (dtype, mib, reduce, copy) in &rows[0] {
        let bytes = mib << 20;
        let bw = gb(bytes, *reduce) * if n == 1 { 1.0 } else { factor };
        let copy_bw = gb(bytes, *copy);
        println!(
            "| {dtype} | {mib} | {:.3} | {bw:.1} | {:.3} | {copy_bw:.1} | {:.2} |",
            reduce * 1e3,
            copy * 1e3,
            bw / copy_bw
        );
    }
}
