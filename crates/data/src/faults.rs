//! Injected faults for the fault tests (issue 16 item 5) and for drills: the environment
//! variable `VITRS_INJECT_FAULT` holds comma-separated `kind=value` pairs, e.g.
//! `VITRS_INJECT_FAULT=loader_panic_at_step=7`. Unset (the normal case), nothing happens; the
//! variable is read once per process.
//!
//! Kinds: `loader_panic_at_step=N` (a loader worker panics while making batch N),
//! `train_panic_at_step=N` (the training loop panics in step N; read by `vit train`),
//! `train_stall_at_step=N` with `stall_seconds=K` (the training loop sleeps K seconds in step
//! N: a rank far behind the others), `train_nan_grad_at_step=N` (a NaN in the first gradient
//! of step N: the non-finite paths of `vit train`), and `fault_rank=R` (under data parallelism,
//! only rank R panics or stalls).

use std::sync::OnceLock;

fn parsed() -> &'static [(String, u64)] {
    static FAULTS: OnceLock<Vec<(String, u64)>> = OnceLock::new();
    FAULTS.get_or_init(|| {
        std::env::var("VITRS_INJECT_FAULT")
            .map(|v| {
                v.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, n)| n.trim().parse().ok().map(|n| (k.trim().to_string(), n)))
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The value of injected fault `kind`, if `VITRS_INJECT_FAULT` names it.
pub fn injected(kind: &str) -> Option<u64> {
    parsed().iter().find(|(k, _)| k == kind).map(|&(_, n)| n)
}

/// Panics when `VITRS_INJECT_FAULT` asks for a loader panic while making batch `step`.
pub(crate) fn maybe_panic_at_step(step: u64) {
    if injected("loader_panic_at_step") == Some(step) {
        panic!("injected fault: loader_panic_at_step={step}");
    }
}
