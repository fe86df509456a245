//! Counting ViT-22B's parameters allocates nothing: a counting global allocator watches
//! this thread while the preset is built and counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vit_model::{ModelConfig, ParamBreakdown, ParamCounts};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn counting_22b_does_not_allocate() {
    let before = ALLOCS.with(Cell::get);
    let cfg = ModelConfig::preset("ViT-22B/14").unwrap();
    let counts = ParamCounts::of(&cfg).unwrap();
    let breakdown = ParamBreakdown::of(&cfg).unwrap();
    let after = ALLOCS.with(Cell::get);
    assert_eq!(after - before, 0);
    assert_eq!(counts, breakdown.counts);
    assert!(counts.total > 21_000_000_000);
}
