//! Thread pools for work that runs side by side in one process: the data-parallel ranks of
//! `vit train --world N` on the CPU, and the points of `vit sweep --jobs N`.
//!
//! Every op forks onto rayon. On one shared pool, two ranks (or sweep points) queue their jobs
//! behind each other and each one's serial stretches (row loops, the optimizer's bookkeeping,
//! waits for the all-reduce) leave threads idle; with a pool of its own, each keeps its share of
//! the cores busy. Results do not depend on the pools: every op gives the same bits for any
//! thread count.

/// `parts` rayon pools, each with an equal share (at least one) of `threads` threads. The error
/// names the pools that could not be built; callers then run everything on the current pool
/// (the same bits, only slower).
pub(crate) fn split(parts: usize, threads: usize) -> Result<Vec<rayon::ThreadPool>, String> {
    let each = (threads / parts.max(1)).max(1);
    (0..parts)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(each).build())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot build {parts} pools of {each} threads ({e})"))
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn parts_share_the_threads_out_and_get_at_least_one() {
        let shares = |parts, threads| -> Vec<usize> {
            split(parts, threads).unwrap().iter().map(rayon::ThreadPool::current_num_threads).collect()
        };
        assert_eq!(shares(2, 4), [2, 2]);
        assert_eq!(shares(3, 4), [1, 1, 1], "4 / 3 rounds down");
        assert_eq!(shares(4, 2), [1, 1, 1, 1], "more parts than threads: one each");
        assert_eq!(shares(1, 3), [3]);
        // Inside a pool, its ops see its share.
        assert_eq!(split(2, 6).unwrap()[1].install(rayon::current_num_threads), 3);
    }
}
