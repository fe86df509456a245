//! Pinned reference values of the augmentation and loader RNG (SplitMix64, `augment::Rng`):
//! a run's data stream, and so a resumed run, must never change with a build.

use vit_data::augment::{mix64, Rng};

#[test]
fn mix64_is_splitmix64() {
    // The first output of Vigna's splitmix64.c seeded with 0: mix64(0 + golden gamma).
    assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
}

#[test]
fn streams_are_pinned() {
    let mut r = Rng::new(7);
    let words: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    assert_eq!(words, [0x717d_c091_ca0d_84f3, 0xaa41_caf5_7d04_246c, 0x22ed_76d6_77c9_dd1f, 0xfbe6_b44d_549a_9421]);
    let mut r = Rng::for_example(1, 2, 3);
    let words: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    assert_eq!(words, [0xfc99_dc2f_d8f6_619d, 0x2c59_c466_d3e5_9900, 0x5e78_572d_d7b2_cf35, 0x1fb7_8b6d_caee_5c62]);
}

#[test]
fn derived_draws_are_pinned() {
    let mut r = Rng::new(7);
    let uniforms: Vec<f64> = (0..3).map(|_| r.uniform()).collect();
    // (word >> 11) · 2⁻⁵³ of the words pinned above.
    assert_eq!(uniforms, [0.4433250766688186, 0.6650664185845163, 0.1364359162906007]);
    assert_eq!(uniforms[0], (0x717d_c091_ca0d_84f3u64 >> 11) as f64 / (1u64 << 53) as f64);
    let below: Vec<usize> = (0..5).map(|_| r.below(10)).collect();
    assert_eq!(below, [9, 1, 6, 4, 4]);
    let mut v: Vec<u32> = (0..10).collect();
    Rng::new(7).shuffle(&mut v);
    assert_eq!(v, [2, 0, 9, 8, 3, 7, 6, 1, 5, 4]);
}
