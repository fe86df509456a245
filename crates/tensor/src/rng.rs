//! A value-stable, counter-based random number generator: Philox4x32-10 (Salmon, Moraes, Dror
//! and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the Random123 library).
//!
//! Every value drawn in vitrs that can change a result (parameter initialisation through
//! [`crate::Tensor::randn`] / [`crate::Tensor::rand_uniform`], few-shot sampling) comes from
//! this module, whose streams are defined here exactly and pinned by known-answer tests. They
//! never change with a dependency's version (rand's `StdRng` does not promise that), and a
//! CUDA kernel can produce the same stream, element by element, from the same definitions.
//!
//! # Definitions
//!
//! - **Block function.** [`philox4x32_10`] maps a 128-bit counter (four `u32` words) and a
//!   64-bit key (two `u32` words) to four `u32` words, with Random123's constants and 10
//!   rounds (checked against Random123's `kat_vectors`).
//! - **Seed → key.** A `u64` seed `s` is the key `[s mod 2³², s >> 32]` ([`seed_key`]).
//! - **Stream.** Word `i` (from 0) of the stream of seed `s` is word `i mod 4` of
//!   `philox4x32_10(c, seed_key(s))` with counter `c = i / 4` written as a 128-bit
//!   little-endian number: `c[0]` holds its lowest 32 bits. Word `i` is therefore computable
//!   on its own (a GPU thread per block of four).
//! - **u64.** [`Philox::next_u64`] takes two consecutive words `lo, hi` as `lo | hi << 32`.
//! - **Uniform f32 in `[0, 1)`.** One word `w`: `(w >> 8) · 2⁻²⁴` (the top 24 bits, exact in
//!   f32) ([`uniform_f32`]).
//! - **Normal (Box–Muller).** Normal `2k` and `2k + 1` come from stream words `2k` (`a`) and
//!   `2k + 1` (`b`), in f64: `u₁ = (a + 1) · 2⁻³² ∈ (0, 1]`, `u₂ = b · 2⁻³² ∈ [0, 1)`,
//!   `r = √(−2 ln u₁)`, `θ = 2π u₂`; `z₂ₖ = r cos θ`, `z₂ₖ₊₁ = r sin θ` ([`box_muller`]). A
//!   sample `mean + std · z` is computed in f64 and rounded once to f32. (f64 `ln`, `cos`,
//!   `sin` are not correctly rounded on every platform, but an error of an f64 ulp changes
//!   the f32 result only when it straddles an f32 rounding boundary: about once in 2²⁹.)
//! - **Bounded integer in `0..n`.** Lemire's multiply-shift with rejection ("Fast random
//!   integer generation in an interval", 2019) on [`Philox::next_u64`]: unbiased
//!   ([`Philox::below`]).
//! - **Shuffle.** Fisher–Yates from the back: for `i = len − 1` down to 1, swap element `i`
//!   with element `below(i + 1)` ([`Philox::shuffle`]).

/// Philox's multipliers and Weyl key increments (Random123 `PHILOX_M4x32_0/1`, `PHILOX_W32_0/1`).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The Philox4x32 block function with 10 rounds: four random words for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mulhilo = |a: u32, b: u32| {
        let p = u64::from(a) * u64::from(b);
        ((p >> 32) as u32, p as u32)
    };
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The Philox key of a `u64` seed: `[seed mod 2³², seed >> 32]`.
pub fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The 128-bit counter `c` as four little-endian `u32` words.
fn counter_words(c: u128) -> [u32; 4] {
    [c as u32, (c >> 32) as u32, (c >> 64) as u32, (c >> 96) as u32]
}

/// Block `c` of the stream of `seed`: stream words `4c .. 4c + 4`.
pub fn block(seed: u64, c: u128) -> [u32; 4] {
    philox4x32_10(counter_words(c), seed_key(seed))
}

/// A uniform f32 in `[0, 1)` from the top 24 bits of `w`: `(w >> 8) · 2⁻²⁴`.
pub fn uniform_f32(w: u32) -> f32 {
    (w >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Two standard normals from two words by Box–Muller (see the module docs), in f64.
pub fn box_muller(a: u32, b: u32) -> (f64, f64) {
    const TWO_POW_M32: f64 = 1.0 / 4_294_967_296.0;
    let u1 = (f64::from(a) + 1.0) * TWO_POW_M32;
    let u2 = f64::from(b) * TWO_POW_M32;
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
    (r * c, r * s)
}

/// Fills `out` with normals `start .. start + out.len()` of the stream of `seed`, each
/// `mean + std · z` (f64, rounded once to f32): any `start`, so [`crate::Tensor::randn`] can
/// fill blocks of its elements in parallel and get the values of one sequential fill.
pub fn fill_normal(seed: u64, start: u64, mean: f64, std: f64, out: &mut [f32]) {
    let mut pair: Option<(u128, (f64, f64))> = None;
    for (i, o) in (u128::from(start)..).zip(out.iter_mut()) {
        let k = i / 2;
        let (z0, z1) = match pair {
            Some((p, z)) if p == k => z,
            _ => {
                // Pair k is words 2k, 2k + 1: block k / 2, words 0-1 or 2-3.
                let words = block(seed, k / 2);
                let w = (k % 2) as usize * 2;
                let z = box_muller(words[w], words[w + 1]);
                pair = Some((k, z));
                z
            }
        };
        *o = (mean + std * if i % 2 == 0 { z0 } else { z1 }) as f32;
    }
}

/// Fills `out` with uniforms `start .. start + out.len()` of the stream of `seed` on
/// `[low, high)`: word `i` gives `low + (high − low) · uniform_f32(wᵢ)` in f32, and a value
/// that rounds up to `high` becomes the largest f32 below `high`.
pub fn fill_uniform(seed: u64, start: u64, low: f32, high: f32, out: &mut [f32]) {
    let below_high = next_down(high);
    let mut words = block(seed, u128::from(start) / 4);
    for (i, o) in (u128::from(start)..).zip(out.iter_mut()) {
        if i % 4 == 0 {
            words = block(seed, i / 4);
        }
        let v = low + (high - low) * uniform_f32(words[(i % 4) as usize]);
        *o = if v < high { v } else { below_high };
    }
}

/// The largest f32 below a finite `x`.
fn next_down(x: f32) -> f32 {
    if x == 0.0 {
        -f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// The stream of one seed, read word by word (see the module docs for every derivation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Philox {
    key: [u32; 2],
    /// Index of the next stream word.
    next: u128,
    /// The block holding word `next - 1` (valid when `next % 4 != 0`).
    words: [u32; 4],
}

impl Philox {
    /// The stream of `seed`, at word 0.
    pub fn new(seed: u64) -> Self {
        Philox { key: seed_key(seed), next: 0, words: [0; 4] }
    }

    /// The next stream word.
    pub fn next_u32(&mut self) -> u32 {
        let i = (self.next % 4) as usize;
        if i == 0 {
            self.words = philox4x32_10(counter_words(self.next / 4), self.key);
        }
        self.next += 1;
        self.words[i]
    }

    /// The next two words `lo, hi` as `lo | hi << 32`.
    pub fn next_u64(&mut self) -> u64 {
        let lo = u64::from(self.next_u32());
        lo | u64::from(self.next_u32()) << 32
    }

    /// A uniform f32 in `[0, 1)` from the next word ([`uniform_f32`]).
    pub fn uniform_f32(&mut self) -> f32 {
        uniform_f32(self.next_u32())
    }

    /// A uniform integer in `0..n`, unbiased (Lemire's method with rejection on 64-bit draws);
    /// 0 when `n` is 0 or 1, drawing nothing.
    pub fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            // 2⁶⁴ mod n: products whose low half falls below it would over-represent some values.
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// Shuffles `v` in place: Fisher–Yates from the back, `swap(i, below(i + 1))`.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's `kat_vectors` for philox4x32 with 10 rounds.
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn stream_words_are_blocks_in_counter_order() {
        let mut rng = Philox::new(0x0123_4567_89ab_cdef);
        let words: Vec<u32> = (0..12).map(|_| rng.next_u32()).collect();
        for c in 0..3u32 {
            let want = philox4x32_10([c, 0, 0, 0], [0x89ab_cdef, 0x0123_4567]);
            assert_eq!(&words[4 * c as usize..4 * c as usize + 4], &want);
        }
        // A carry into the counter's second word.
        assert_eq!(block(7, 1 << 32), philox4x32_10([0, 1, 0, 0], [7, 0]));
    }

    #[test]
    fn fills_agree_with_the_sequential_stream_at_any_start() {
        let n = 37;
        let mut whole = vec![0.0f32; n];
        fill_normal(3, 0, 0.5, 2.0, &mut whole);
        let mut rng = Philox::new(3);
        for k in 0..n.div_ceil(2) {
            let (z0, z1) = box_muller(rng.next_u32(), rng.next_u32());
            assert_eq!(whole[2 * k], (0.5 + 2.0 * z0) as f32);
            if 2 * k + 1 < n {
                assert_eq!(whole[2 * k + 1], (0.5 + 2.0 * z1) as f32);
            }
        }
        for start in [1usize, 2, 3, 4, 5, 6, 10] {
            let mut part = vec![0.0f32; n - start];
            fill_normal(3, start as u64, 0.5, 2.0, &mut part);
            assert_eq!(part, whole[start..]);
        }
        let mut uni = vec![0.0f32; n];
        fill_uniform(9, 0, -1.0, 3.0, &mut uni);
        for start in [1usize, 3, 4, 5] {
            let mut part = vec![0.0f32; n - start];
            fill_uniform(9, start as u64, -1.0, 3.0, &mut part);
            assert_eq!(part, uni[start..]);
        }
    }

    #[test]
    fn uniform_is_in_range_and_uses_the_top_24_bits() {
        assert_eq!(uniform_f32(0), 0.0);
        assert_eq!(uniform_f32(0xff), 0.0);
        assert_eq!(uniform_f32(0x100), 1.0 / (1u32 << 24) as f32);
        assert_eq!(uniform_f32(u32::MAX), 1.0 - 1.0 / (1u32 << 24) as f32);
        // A range whose top rounds up to `high` in f32 stays below it.
        let mut out = vec![0.0f32; 4096];
        fill_uniform(1, 0, 1.0e8, 1.0e8 + 16.0, &mut out);
        assert!(out.iter().all(|&v| (1.0e8..1.0e8 + 16.0).contains(&v)), "{out:?}");
    }

    #[test]
    fn box_muller_extremes_are_finite() {
        let (z0, z1) = box_muller(u32::MAX, 0);
        assert_eq!((z0, z1), (0.0, 0.0)); // u₁ = 1: r = 0
        let (z0, z1) = box_muller(0, 0);
        let r = (-2.0 * (1.0f64 / 4_294_967_296.0).ln()).sqrt();
        assert_eq!((z0, z1), (r, 0.0));
    }

    #[test]
    fn normals_have_the_right_moments() {
        let mut z = vec![0.0f32; 200_000];
        fill_normal(11, 0, 0.0, 1.0, &mut z);
        let n = z.len() as f64;
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn below_is_in_range_and_uniform() {
        let mut rng = Philox::new(5);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[rng.below(6) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
        // n = 2⁶³ + 1 rejects almost half of the draws and still stays in range.
        let big = (1u64 << 63) + 1;
        assert!((0..100).all(|_| rng.below(big) < big));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..100).collect();
        Philox::new(8).shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}
