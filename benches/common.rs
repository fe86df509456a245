//! Shared by the benches: a same-run timer for the ratio lines each bench prints.

use std::time::{Duration, Instant};

/// Median wall time of `f` over `samples` runs of `iters` calls each, after one warm-up call.
pub fn median_time(samples: usize, iters: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters as u32
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

/// True when criterion runs the bench binary as a test (`cargo test --benches`): keep it short.
pub fn quick() -> bool {
    !std::env::args().any(|a| a == "--bench")
}
