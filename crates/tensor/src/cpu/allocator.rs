//! The process's heap policy for CPU training.
//!
//! A training step allocates and frees the same few hundred activation buffers (up to a few
//! MiB each) every step. glibc's default hands buffers above its mmap threshold back to the
//! kernel on free, so the next step's first write to each page faults and the kernel zeroes it
//! again: a fifth of a small ViT's CPU step on a 2-core machine (docs/perf.md). Keeping freed
//! memory in the heap removes that cost; the price is a resident set that stays at its peak.

/// Keeps freed memory in the process heap (glibc: mmap threshold 32 MiB, no trimming) so that
/// repeated same-size activation buffers reuse already-mapped pages. Process-wide and meant for
/// a program's `main`; a no-op on allocators other than glibc's. Returns whether it took effect.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 32 MiB is glibc's largest mmap threshold on 64-bit targets; buffers above it (rare
        // on CPU) still come from and return to the kernel directly.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes allocator tunables; it is thread-safe in glibc.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
