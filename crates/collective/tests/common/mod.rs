//! Helpers shared by the test files: seeded inputs per rank and single-threaded references.
#![allow(dead_code)] // each test file uses a different subset

use vit_collective::{LocalCommunicator, LocalGroup, ReduceOp};
use vit_tensor::{DType, Device, Tensor};

/// Rank `rank`'s input: N(0, 1) samples seeded with `seed + rank`.
pub fn input(shape: &[usize], seed: u64, rank: usize, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed + rank as u64, dtype, Device::Cpu).expect("randn")
}

/// Every rank's input, in rank order.
pub fn inputs(n: usize, shape: &[usize], seed: u64, dtype: DType) -> Vec<Tensor> {
    (0..n).map(|r| input(shape, seed, r, dtype)).collect()
}

/// The elements as f32.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().expect("to_f32_vec")
}

/// Bit patterns, for bitwise comparisons (NaN-safe).
pub fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|x| x.to_bits()).collect()
}

/// Reference reduction of `xs` (rank order, f32), rounded to `dtype`.
pub fn reference_reduce(xs: &[Tensor], op: ReduceOp) -> Vec<f32> {
    let vals: Vec<Vec<f32>> = xs.iter().map(values).collect();
    let mut acc = vals[0].clone();
    for v in &vals[1..] {
        for (a, &b) in acc.iter_mut().zip(v) {
            match op {
                ReduceOp::Sum | ReduceOp::Mean => *a += b,
                ReduceOp::Max => *a = a.max(b),
            }
        }
    }
    if op == ReduceOp::Mean {
        acc.iter_mut().for_each(|a| *a /= xs.len() as f32);
    }
    let shape = xs[0].dims().to_vec();
    values(&Tensor::from_f32(acc, shape, xs[0].dtype(), Device::Cpu).expect("from_f32"))
}

/// Rows `start..start + len` of dim 0 as f32 values.
pub fn rows(t: &Tensor, start: usize, len: usize) -> Vec<f32> {
    values(&t.narrow(start, len).expect("narrow"))
}

/// Runs `f(rank's communicator, rank's input)` on one thread per rank with `std::thread::scope`
/// and returns the results in rank order.
pub fn on_ranks<R: Send>(xs: &[Tensor], f: impl Fn(&LocalCommunicator, &Tensor) -> R + Sync) -> Vec<R> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            LocalGroup::new(xs.len()).into_iter().zip(xs).map(|(comm, x)| s.spawn(move || f(&comm, x))).collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}
pub mod suite;
