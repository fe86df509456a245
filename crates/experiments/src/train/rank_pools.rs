//! Thread pools for the data-parallel ranks of one process (`vit train --world N` on the CPU).
//!
//! Every rank's ops fork onto rayon. On one shared pool, two ranks queue their jobs behind each
//! other and each rank's serial stretches (row loops, the optimizer's bookkeeping, waits for the
//! all-reduce) leave threads idle; with a pool of its own per rank, each rank keeps its share of
//! the cores busy. Results do not depend on the pools: every op gives the same bits for any
//! thread count.

/// One rayon pool per rank, each with an equal share (at least one) of the current pool's
/// threads. Empty when a pool cannot be built: the ranks then share the current pool (the same
/// bits, only slower), after a warning.
pub(crate) fn split(world: usize) -> Vec<rayon::ThreadPool> {
    let per_rank = (rayon::current_num_threads() / world.max(1)).max(1);
    (0..world)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(per_rank).build())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            eprintln!("warning: cannot build {world} pools of {per_rank} threads ({e}); the ranks share one");
            Vec::new()
        })
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn ranks_share_the_threads_out_and_get_at_least_one() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        pool.install(|| {
            let pools = split(2);
            assert_eq!(pools.len(), 2);
            assert!(pools.iter().all(|p| p.current_num_threads() == 2));
            let pools = split(3);
            assert_eq!(pools.len(), 3);
            assert!(pools.iter().all(|p| p.current_num_threads() == 1), "4 / 3 rounds down");
            let pools = split(8);
            assert!(pools.iter().all(|p| p.current_num_threads() == 1), "more ranks than threads: one each");
            // Inside a rank's pool, its ops see its share.
            assert_eq!(split(2)[1].install(rayon::current_num_threads), 2);
        });
    }
}
