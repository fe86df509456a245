//! Pinned reference values of the Philox stream and of everything drawn from it
//! (`Tensor::randn`, `Tensor::rand_uniform`, shuffles): initialisations and few-shot samples
//! must never change with a build. The expected normals and uniforms were recomputed
//! independently (Python, from the words below and the definitions in `vit_tensor::rng`).

use vit_tensor::{rng::Philox, DType, Device, Tensor};

/// The first stream words of seed 42: `philox4x32_10([0, 0, 0, 0], [42, 0])`, then counter 1.
const WORDS_42: [u32; 8] =
    [0x9ceaf053, 0x77f5493b, 0x12bf50ad, 0x5742b3d7, 0xfcdb2127, 0x53ba6cfd, 0x838f5a6e, 0x744e06fb];

#[test]
fn the_stream_of_seed_42_is_pinned() {
    let mut r = Philox::new(42);
    let words: Vec<u32> = (0..8).map(|_| r.next_u32()).collect();
    assert_eq!(words, WORDS_42);
}

#[test]
fn randn_is_pinned() {
    let z = Tensor::randn([6], 0.0, 1.0, 42, DType::F32, Device::Cpu).unwrap().to_f32_vec().unwrap();
    let bits: Vec<u32> = z.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, [0xbf785e5c, 0x3e46ace8, 0xbf9e28d2, 0x3ff6433b, 0xbd95e030, 0x3e0e7a0f]);
    // ≈ [-0.9701898, 0.19401896, -1.2356207, 1.9239267, -0.07318151, 0.13913749]
    assert!((z[0] + 0.970_189_8).abs() < 1e-6);
    // mean + std · z, rounded once.
    let scaled = Tensor::randn([6], 1.0, 0.5, 42, DType::F32, Device::Cpu).unwrap().to_f32_vec().unwrap();
    assert_eq!(scaled[3], (1.0 + 0.5 * f64::from(z[3])) as f32);
}

#[test]
fn rand_uniform_is_pinned() {
    let u = Tensor::rand_uniform([6], -1.0, 1.0, 42, DType::F32, Device::Cpu).unwrap().to_f32_vec().unwrap();
    assert_eq!(u, [0.22591972, -0.06282699, -0.8535366, -0.318277, 0.9754373, -0.34587336]);
    // low + (high − low) · (w >> 8) · 2⁻²⁴ of the first word.
    assert_eq!(u[0], -1.0 + 2.0 * ((WORDS_42[0] >> 8) as f32 / (1u32 << 24) as f32));
}

#[test]
fn bounded_integers_and_shuffles_are_pinned() {
    let mut r = Philox::new(42);
    let below: Vec<u64> = (0..8).map(|_| r.below(1000)).collect();
    assert_eq!(below, [468, 340, 327, 454, 658, 773, 670, 379]);
    // Lemire: the high half of (lo | hi << 32) · n.
    let word = u128::from(WORDS_42[0]) | (u128::from(WORDS_42[1]) << 32);
    assert_eq!(below[0], ((word * 1000) >> 64) as u64);
    let mut v: Vec<u32> = (0..10).collect();
    Philox::new(42).shuffle(&mut v);
    assert_eq!(v, [0, 9, 1, 7, 5, 6, 8, 2, 3, 4]);
}
