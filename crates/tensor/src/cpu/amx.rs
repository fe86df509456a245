//! bf16 GEMM on Intel's AMX tiles (Sapphire Rapids and later), for
//! [`MatmulPrecision::Bf16`](super::MatmulPrecision): `c = a·b` with `a` and `b` rounded to bf16
//! (round to nearest even) and the products summed in f32.
//!
//! One `tdpbf16ps` multiplies a `[16, 32]` bf16 tile of `a` by a `[32, 16]` tile of `b` into a
//! `[16, 16]` f32 tile: 8,192 multiply-adds, where an AVX-512 FMA does 16. The operands are
//! packed, rounded to bf16 and zero-padded, into the layouts the tile loads read with a 64-byte
//! stride, as `u32` pairs of bf16 (k = 2p in the low half, 2p + 1 in the high):
//!
//! - `a` `[m, k]` → `[m/16][k/32][16 rows][16 pairs]`;
//! - `b` `[k, n]` → `[n/16][k/32][16 pairs][16 columns]` (the "VNNI" layout: the two values of
//!   a k-pair side by side, as `tdpbf16ps` reads them).
//!
//! `b` is packed once per product; each 32-row block of `a` just before its products, into a
//! buffer that stays in cache. Packing converts 32 values per `vcvtne2ps2bf16` and needs a
//! 16 × 16 transpose in registers where an operand's memory runs the other way (`a` with k down
//! its columns, `b` with k along its rows); a weight gradient `dyᵀ·x` has both operands with k
//! down the columns, so it is computed as `(xᵀ·dy)ᵀ` when that puts the transpose on the
//! smaller one. A task computes `[32, 32]` blocks of `c` in four accumulator tiles
//! (`tmm0`-`tmm3`), loading two tiles of `a` (`tmm4`, `tmm5`) and two of `b` (`tmm6`, `tmm7`)
//! per 32 values of k. Every element of `c` is summed by one task in one order, so the result
//! has the same bits for any thread count. The instructions are written with `asm!` (Rust's AMX
//! intrinsics are not stable). [`gemm_bf16_emulated`] rounds the operands the same way and
//! multiplies them with `gemm`'s f32 kernels: the path on CPUs without AMX, equal to the tiles
//! up to the order of the f32 sums. Both are tested against an f64 reference on rounded inputs.

use super::matmul::MatRef;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of a tile (and of an `a` tile and a `c` tile).
const TILE_ROWS: usize = 16;
/// bf16 values in a 64-byte tile row: the k extent of one `tdpbf16ps`.
const TILE_K: usize = 32;
/// f32 columns of a `c` tile.
const TILE_COLS: usize = 16;
/// bf16 values in one packed tile.
const TILE_ELEMS: usize = TILE_ROWS * TILE_K;
/// Rows and columns of the `c` block one pass of the kernel computes (2 × 2 tiles).
const BLOCK: usize = 32;

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits, the way AMX CPUs convert
/// (`vcvtne2ps2bf16`): a denormal becomes a zero of its sign (the tiles read bf16 denormals
/// as zeros anyway), and NaN stays a (quiet) NaN.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((bits >> 16) | 0x40) as u16
    } else if bits & 0x7f80_0000 == 0 {
        ((bits >> 16) & 0x8000) as u16
    } else {
        rounded
    }
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The name that turns the tile path off in `VITRS_FAST_KERNELS_OFF` (or `VITRS_FAST_KERNELS=off`
/// for every fast path): bf16 GEMMs then take the emulated path.
pub const SELF_CHECK_NAME: &str = "amx_gemm";

/// Whether this process runs bf16 GEMMs on the tiles: the CPU has AMX-TILE and AMX-BF16, Linux
/// granted the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+),
/// the switches of [`crate::cuda::self_check::fast_kernel_off`] leave it on, and a product
/// computed on the tiles matched the emulated path on first use. Asked once.
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if crate::cuda::self_check::fast_kernel_off(SELF_CHECK_NAME) || !probe() {
            return false;
        }
        let error = self_check();
        let ok = error.is_finite() && error <= 1e-5;
        if !ok {
            eprintln!("warning: AMX bf16 GEMM self-check failed (relative error {error:e}); using the emulated path");
        }
        ok
    })
}

/// `‖tiles − emulated‖ / ‖emulated‖` on a `[40, 48] · [48, 37]` product (edge blocks, a padded
/// k) of fixed values, with the tiles on this thread.
fn self_check() -> f64 {
    let (m, k, n) = (40, 48, 37);
    let value = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 4.0;
    let (a, b): (Vec<f32>, Vec<f32>) = ((0..m * k).map(value).collect(), (0..k * n).map(|i| value(i + 5)).collect());
    let (am, bm) = (MatRef::rows(&a, m, k, k), MatRef::rows(&b, k, n, n));
    let (mut tiles, mut emulated) = (vec![0f32; m * n], vec![0f32; m * n]);
    // SAFETY: `probe` granted the tile state; the views are dense and inside their vectors.
    unsafe {
        gemm_tiles(am, bm, tiles.as_mut_ptr(), n, false, 1, false);
        gemm_bf16_emulated(am, bm, emulated.as_mut_ptr(), emulated.len(), n, false, 1);
    }
    let diff: f64 = tiles.iter().zip(&emulated).map(|(t, e)| ((t - e) as f64).powi(2)).sum();
    let norm: f64 = emulated.iter().map(|e| (*e as f64).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn probe() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    // (CPUID reports zeros for a leaf or feature the CPU lacks.)
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let has_amx = (leaf7.edx >> 22) & 1 == 1 && (leaf7.edx >> 24) & 1 == 1;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only asks the kernel for permission to use the tile
    // state; it fails (without side effects) where the kernel or CPU does not offer it.
    has_amx && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn probe() -> bool {
    false
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A matrix seen along its contraction axis `k` and its other axis `o` (`a`'s rows, `b`'s
/// columns): element `(kk, oo)` is `data[kk·k_stride + oo·o_stride]`.
#[derive(Clone, Copy)]
struct Axes<'a> {
    data: &'a [f32],
    k_len: usize,
    o_len: usize,
    k_stride: usize,
    o_stride: usize,
}

/// Where a packed tile's 16 × 16 bf16 pairs go: `a`'s tiles are `[16 rows (o)][16 pairs]`,
/// `b`'s `[16 pairs][16 columns (o)]`.
#[derive(Clone, Copy, PartialEq)]
enum Orientation {
    OtherMajor,
    PairMajor,
}

/// Two f32 (k = 2p and 2p + 1) as one bf16 pair, the lower k in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// Packs the `o` block `o0..o0+16` of `v` into `kp/32` tiles of 16 × 16 bf16 pairs (`out`,
/// 256 u32 per tile) in `orient`, zero beyond `v`'s extent.
fn pack_block(v: Axes, o0: usize, kp: usize, orient: Orientation, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_packing() {
        // SAFETY: simd_packing() found AVX-512F, BW and BF16 (every AMX CPU has them).
        return unsafe { simd::pack_block(v, o0, kp, orient, out) };
    }
    pack_block_body(v, o0, kp, orient, out)
}

/// Whether the CPU has what [`simd::pack_block`] is compiled for (AVX-512F, BW and BF16).
fn simd_packing() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`pack_block`] one value at a time: where the CPU has no AMX (tests), and at edges.
fn pack_block_body(v: Axes, o0: usize, kp: usize, orient: Orientation, out: &mut [u32]) {
    for (kt, tile) in out.chunks_exact_mut(TILE_ROWS * TILE_COLS).enumerate().take(kp / TILE_K) {
        pack_tile(v, o0, kt * TILE_K, orient, tile);
    }
}

/// One tile (k `k0..k0+32`, o `o0..o0+16`) of [`pack_block`], zero outside `v`.
fn pack_tile(v: Axes, o0: usize, k0: usize, orient: Orientation, tile: &mut [u32]) {
    let at = |kk: usize, oo: usize| {
        if kk < v.k_len && oo < v.o_len {
            v.data[kk * v.k_stride + oo * v.o_stride]
        } else {
            0.0
        }
    };
    for (x, dst) in tile.chunks_exact_mut(TILE_COLS).enumerate() {
        for (y, d) in dst.iter_mut().enumerate() {
            // Pair-major tiles are [pair x][o y]; other-major [o x][pair y].
            let (p, o) = if orient == Orientation::PairMajor { (x, y) } else { (y, x) };
            *d = pair(at(k0 + 2 * p, o0 + o), at(k0 + 2 * p + 1, o0 + o));
        }
    }
}

/// [`pack_block`] with AVX-512: 32 values converted per `vcvtne2ps2bf16`, pairs interleaved by
/// one permute, and 16 × 16 transposes in registers.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Axes, Orientation, TILE_K};
    use std::arch::x86_64::*;

    /// `(k, k + 1)` pairs of a tile row from 32 values contiguous in k.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_along_k(src: *const f32) -> __m512i {
        // SAFETY: the caller's 32 values are readable.
        let (lo, hi) = unsafe { (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16))) };
        // Element t of the 32 is bf16 t: pair p = (2p, 2p + 1), the lower k in the low half.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// Pairs of two rows `lo` (k = 2p) and `hi` (2p + 1), 16 values each, contiguous in o.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_across_o(lo: *const f32, hi: *const f32) -> __m512i {
        // u16 i of the result takes u16 `INTERLEAVE[i]` of [lo's 16 bf16, hi's 16 bf16].
        const INTERLEAVE: [i16; 32] = {
            let mut idx = [0i16; 32];
            let mut i = 0;
            while i < 16 {
                idx[2 * i] = i as i16;
                idx[2 * i + 1] = 16 + i as i16;
                i += 1;
            }
            idx
        };
        // SAFETY: the caller's 2 × 16 values are readable.
        let (l, h) = unsafe { (_mm512_loadu_ps(lo), _mm512_loadu_ps(hi)) };
        let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h, l));
        // SAFETY: INTERLEAVE holds 64 readable bytes.
        _mm512_permutexvar_epi16(unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) }, both)
    }

    /// Transposes 16 rows of 16 u32 in place.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Row 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
        for j in 0..4 {
            let s0 = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
            let s1 = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
            let s2 = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
            let s3 = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
            r[j] = _mm512_shuffle_i32x4::<0x88>(s0, s2);
            r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(s0, s2);
            r[4 + j] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
            r[12 + j] = _mm512_shuffle_i32x4::<0xdd>(s1, s3);
        }
    }

    /// # Safety
    /// The CPU has AVX-512F, BW and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_block(v: Axes, o0: usize, kp: usize, orient: Orientation, out: &mut [u32]) {
        const T: usize = 16;
        let o_full = o0 + T <= v.o_len;
        let k_full_tiles = if o_full { v.k_len / TILE_K } else { 0 };
        let fast = v.k_stride == 1 || v.o_stride == 1;
        let ptr = v.data.as_ptr();
        for (kt, tile) in out.chunks_exact_mut(T * T).enumerate().take(kp / TILE_K) {
            let k0 = kt * TILE_K;
            if !fast || kt >= k_full_tiles {
                // Edges and other strides: the scalar path, for this tile only.
                super::pack_tile(v, o0, k0, orient, tile);
                continue;
            }
            let mut rows = [_mm512_setzero_si512(); T];
            // SAFETY: the tile is full: rows o0..o0+16 and k0..k0+32 lie inside `v.data`.
            let natural = unsafe {
                if v.k_stride == 1 {
                    for (o, row) in rows.iter_mut().enumerate() {
                        *row = pairs_along_k(ptr.add((o0 + o) * v.o_stride + k0));
                    }
                    Orientation::OtherMajor
                } else {
                    for (p, row) in rows.iter_mut().enumerate() {
                        let lo = ptr.add((k0 + 2 * p) * v.k_stride + o0);
                        *row = pairs_across_o(lo, lo.add(v.k_stride));
                    }
                    Orientation::PairMajor
                }
            };
            if natural != orient {
                transpose16(&mut rows);
            }
            for (x, row) in rows.iter().enumerate() {
                // SAFETY: `tile` holds 16 rows of 16 u32.
                unsafe { _mm512_storeu_si512(tile.as_mut_ptr().add(x * T).cast(), *row) };
            }
        }
    }
}

/// `b [k, n]` as bf16 tiles `[np/16][kp/32][16 pairs][16 columns]` (u32 pairs), zero beyond
/// `k` and `n`; the 16-column blocks split over rayon when `parallel` and `b` is large.
fn pack_b(b: MatRef, np: usize, kp: usize, parallel: bool) -> Vec<u32> {
    let v = Axes { data: b.data, k_len: b.rows, o_len: b.cols, k_stride: b.row_stride, o_stride: b.col_stride };
    let block = TILE_COLS * kp / 2;
    let mut out = vec![0u32; np * kp / 2];
    let fill = |(ob, tiles): (usize, &mut [u32])| pack_block(v, ob * TILE_COLS, kp, Orientation::PairMajor, tiles);
    if parallel && v.o_len * v.k_len >= super::PAR_MIN_ELEMS {
        out.par_chunks_mut(block).enumerate().for_each(fill);
    } else {
        out.chunks_mut(block).enumerate().for_each(fill);
    }
    out
}

/// A `*mut f32` that tasks writing disjoint blocks of `c` share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of `c`'s elements (its own blocks).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `c = a·b` (or `c += a·b` with `accumulate`) with bf16-rounded `a` and `b` and f32 sums, on
/// the AMX tiles; `c` row-major with rows `c_row_stride` apart. `threads` > 1 splits the
/// blocks of `c` over rayon.
///
/// # Safety
/// [`amx_available`] returned true; `c` points to an `[m, n]` view with rows `c_row_stride`
/// apart, writable, and initialised when `accumulate`; `a` and `b` lie inside their slices
/// (checked by the caller).
pub(crate) unsafe fn gemm_bf16_amx(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_row_stride: usize,
    accumulate: bool,
    threads: usize,
) {
    // An `a` stored transposed (its k down the columns, as `dyᵀ` in a weight gradient) costs a
    // 16 × 16 transpose per packed tile, where `b` stored that way packs without one. When `b`
    // is the smaller of the two (or needs no transpose either way), compute `cᵀ = bᵀ aᵀ`.
    let a_transposed = a.row_stride == 1 && a.col_stride != 1;
    if a_transposed && (b.row_stride == 1 || b.cols < a.rows) {
        // SAFETY: as this function's contract, with `c` written transposed.
        return unsafe { gemm_tiles(b.t(), a.t(), c, c_row_stride, accumulate, threads, true) };
    }
    // SAFETY: as this function's contract.
    unsafe { gemm_tiles(a, b, c, c_row_stride, accumulate, threads, false) }
}

/// [`gemm_bf16_amx`] for one assignment of the operands: `c = a·b`, or with `c_transposed`,
/// `cᵀ = a·b` (element `(i, j)` of the product goes to `c[j·c_row_stride + i]`).
///
/// # Safety
/// As [`gemm_bf16_amx`], for the view of `c` that the product fills.
unsafe fn gemm_tiles(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_row_stride: usize,
    accumulate: bool,
    threads: usize,
    c_transposed: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (mp, np, kp) = (round_up(m, BLOCK), round_up(n, BLOCK), round_up(k, TILE_K));
    // `b` is packed once and read by every task; each 32-row block of `a` is packed just before
    // its products, into a buffer that stays in cache, so `a` is read from memory once.
    let pb = pack_b(b, np, kp, threads > 1);
    let av = Axes { data: a.data, k_len: k, o_len: m, k_stride: a.col_stride, o_stride: a.row_stride };
    let (row_blocks, col_blocks) = (mp / BLOCK, np / BLOCK);
    let half = TILE_ROWS * kp / 2;
    let out = OutPtr(c);
    let task = |rows: std::ops::Range<usize>| {
        let mut pa = vec![0u32; 2 * half];
        // SAFETY: the caller checked AMX is usable; the packed tiles cover the blocks, every
        // block lies in `c`'s view, and tasks own disjoint row blocks.
        unsafe {
            tiles::configure();
            for ib in rows {
                let (top, bottom) = pa.split_at_mut(half);
                pack_block(av, ib * BLOCK, kp, Orientation::OtherMajor, top);
                pack_block(av, ib * BLOCK + TILE_ROWS, kp, Orientation::OtherMajor, bottom);
                for jb in 0..col_blocks {
                    let b_tiles = pb.as_ptr().add(jb * BLOCK * kp / 2).cast::<u16>();
                    let at =
                        tiles::Out { c: out.get(), row_stride: c_row_stride, transposed: c_transposed, accumulate };
                    tiles::block(pa.as_ptr().cast(), b_tiles, kp, at, ib * BLOCK, jb * BLOCK, m, n);
                }
            }
            tiles::release();
        }
    };
    if threads <= 1 || row_blocks == 1 {
        task(0..row_blocks);
    } else {
        // A few row blocks per task: the tile configuration and the buffer are set up rarely.
        let per_task = row_blocks.div_ceil(threads * 4);
        (0..row_blocks.div_ceil(per_task))
            .into_par_iter()
            .for_each(|t| task(t * per_task..((t + 1) * per_task).min(row_blocks)));
    }
}

/// [`gemm_bf16_amx`]'s arithmetic without tiles: `a` and `b` rounded to bf16, then an f32
/// GEMM through `gemm_f32` (`gemm`'s kernels). The products of two bf16 values are exact in
/// f32, so this differs from the tile path only in the order of the sums.
///
/// # Safety
/// As `gemm_raw`: `c` points to `c_len` writable f32s, initialised when `accumulate`, and the
/// views were checked to lie inside their slices.
pub(crate) unsafe fn gemm_bf16_emulated(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_len: usize,
    c_row_stride: usize,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut ra = vec![0f32; m * k];
    let mut rb = vec![0f32; k * n];
    let round = |x: f32| from_bf16(to_bf16(x));
    ra.par_chunks_mut(k.max(1)).enumerate().for_each(|(i, row)| {
        row.iter_mut().enumerate().for_each(|(j, v)| *v = round(a.data[i * a.row_stride + j * a.col_stride]))
    });
    rb.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        row.iter_mut().enumerate().for_each(|(j, v)| *v = round(b.data[i * b.row_stride + j * b.col_stride]))
    });
    // SAFETY: the rounded copies are dense `[m, k]` and `[k, n]`; `c` as the caller promised.
    unsafe {
        super::matmul::gemm_raw_f32(
            MatRef::rows(&ra, m, k, k),
            MatRef::rows(&rb, k, n, n),
            c,
            c_len,
            c_row_stride,
            accumulate,
            threads,
        )
    }
}

/// The AMX instructions, one `asm!` each. The tile registers are invisible to the compiler,
/// so they keep their contents between the statements of one task.
#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{BLOCK, TILE_COLS, TILE_ELEMS, TILE_ROWS};
    use std::arch::asm;

    /// The 64-byte tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little endian)
            c[48 + t] = TILE_ROWS as u8; // rows
            t += 1;
        }
        Config(c)
    };

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// AMX is available and permitted ([`super::amx_available`]).
    pub(super) unsafe fn configure() {
        // SAFETY: CONFIG is a valid palette-1 configuration, 64-byte aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) }
    }

    /// Returns the tiles to their initial state (so a context switch does not save them).
    ///
    /// # Safety
    /// As [`configure`].
    pub(super) unsafe fn release() {
        // SAFETY: tilerelease only clears the tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }

    macro_rules! tile_load {
        ($tmm:literal, $ptr:expr, $stride:expr) => {
            asm!(concat!("tileloadd ", $tmm, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride, options(nostack, readonly))
        };
    }
    macro_rules! tile_store {
        ($tmm:literal, $ptr:expr, $stride:expr) => {
            asm!(concat!("tilestored [{p} + {s}*1], ", $tmm), p = in(reg) $ptr, s = in(reg) $stride, options(nostack))
        };
    }

    /// Where a block's results go: `c` with rows `row_stride` apart, written transposed or
    /// not, added to what is there or not.
    #[derive(Clone, Copy)]
    pub(super) struct Out {
        pub c: *mut f32,
        pub row_stride: usize,
        pub transposed: bool,
        pub accumulate: bool,
    }

    /// Block `[i0..i0+32, j0..j0+32]` of the product (clipped to `[m, n]`) = (or +=) the
    /// packed row block of `a` times the packed column block of `b`, over `kp` (a multiple of
    /// 32) values of k, into `out` (element `(i, j)` at `c[i, j]`, or `c[j, i]` when transposed).
    ///
    /// # Safety
    /// [`configure`] ran on this thread; `a` points to 2 × `kp/32` packed tiles of rows
    /// `i0..i0+32`, `b` to 2 × `kp/32` packed tiles of columns `j0..j0+32`; the clipped block
    /// of `out.c` is writable (and initialised when accumulating).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        a: *const u16,
        b: *const u16,
        kp: usize,
        out: Out,
        i0: usize,
        j0: usize,
        m: usize,
        n: usize,
    ) {
        let Out { c, row_stride: c_row_stride, transposed, accumulate } = out;
        let k_tiles = kp / super::TILE_K;
        // Tile `t` of the second row (column) block starts `k_tiles` tiles after the first.
        let second = k_tiles * TILE_ELEMS;
        // Whole untransposed blocks go straight between the tiles and `c`.
        let full = !transposed && i0 + BLOCK <= m && j0 + BLOCK <= n;
        let c_stride = c_row_stride * 4;
        let row_bytes = 64usize;
        // SAFETY: as the function's contract; every pointer below stays inside the packed
        // tiles or the block of `c`.
        unsafe {
            // (Only read on the `full` paths, where the block lies inside `c`.)
            let c00 = c.wrapping_add(i0 * c_row_stride + j0);
            let (c01, c10) = (c00.wrapping_add(TILE_COLS), c00.wrapping_add(TILE_ROWS * c_row_stride));
            let c11 = c10.wrapping_add(TILE_COLS);
            if full && accumulate {
                tile_load!("tmm0", c00, c_stride);
                tile_load!("tmm1", c01, c_stride);
                tile_load!("tmm2", c10, c_stride);
                tile_load!("tmm3", c11, c_stride);
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            for t in 0..k_tiles {
                let (at, bt) = (a.add(t * TILE_ELEMS), b.add(t * TILE_ELEMS));
                tile_load!("tmm4", at, row_bytes);
                tile_load!("tmm5", at.add(second), row_bytes);
                tile_load!("tmm6", bt, row_bytes);
                tile_load!("tmm7", bt.add(second), row_bytes);
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem)
                );
            }
            if full {
                tile_store!("tmm0", c00, c_stride);
                tile_store!("tmm1", c01, c_stride);
                tile_store!("tmm2", c10, c_stride);
                tile_store!("tmm3", c11, c_stride);
                return;
            }
            // An edge or transposed block: through scratch, then only the part inside `[m, n]`.
            let mut scratch = [[0f32; TILE_ROWS * TILE_COLS]; 4];
            tile_store!("tmm0", scratch[0].as_mut_ptr(), row_bytes);
            tile_store!("tmm1", scratch[1].as_mut_ptr(), row_bytes);
            tile_store!("tmm2", scratch[2].as_mut_ptr(), row_bytes);
            tile_store!("tmm3", scratch[3].as_mut_ptr(), row_bytes);
            for (q, tile) in scratch.iter().enumerate() {
                let (ti, tj) = (i0 + (q / 2) * TILE_ROWS, j0 + (q % 2) * TILE_COLS);
                for r in 0..TILE_ROWS.min(m.saturating_sub(ti)) {
                    for col in 0..TILE_COLS.min(n.saturating_sub(tj)) {
                        let (i, j) = (ti + r, tj + col);
                        let dst = if transposed { c.add(j * c_row_stride + i) } else { c.add(i * c_row_stride + j) };
                        let v = tile[r * TILE_COLS + col];
                        if accumulate {
                            *dst += v;
                        } else {
                            dst.write(v);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod tiles {
    #[derive(Clone, Copy)]
    pub(super) struct Out {
        pub c: *mut f32,
        pub row_stride: usize,
        pub transposed: bool,
        pub accumulate: bool,
    }
    pub(super) unsafe fn configure() {
        unreachable!("AMX exists only on x86-64")
    }
    pub(super) unsafe fn release() {}
    pub(super) unsafe fn block(_: *const u16, _: *const u16, _: usize, _: Out, _: usize, _: usize, _: usize, _: usize) {
        unreachable!("AMX exists only on x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normal-ish values from a seeded splitmix64 (sum of uniforms), never all zeros.
    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
        let mut uniform = move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..len).map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0).collect()
    }

    /// `c (+)= round(a)·round(b)` in f64 over bf16-rounded inputs, and the bound `Σ|a||b|` per
    /// element that scales the f32 summation error.
    fn reference(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, accumulate: bool) -> Vec<f64> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut scale = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let (mut s, mut mag) = (0.0f64, 0.0f64);
                for p in 0..a.cols {
                    let prod =
                        r(a.data[i * a.row_stride + p * a.col_stride]) * r(b.data[p * b.row_stride + j * b.col_stride]);
                    s += prod;
                    mag += prod.abs();
                }
                let o = &mut c[i * ldc + j];
                *o = if accumulate { (*o as f64 + s) as f32 } else { s as f32 };
                scale[i * b.cols + j] = mag + if accumulate { o.abs() as f64 } else { 0.0 };
            }
        }
        scale
    }

    /// Values that exercise the rounding: ties, denormals, infinities, NaNs, the largest.
    fn specials() -> Vec<f32> {
        let mut xs = vec![0.0, -0.0, 1.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-40, -1e-40, f32::INFINITY];
        xs.extend([f32::NEG_INFINITY, f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffc0_1234)]);
        // Exact ties: the low 16 bits 0x8000, with an even and an odd bf16 below.
        xs.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), f32::from_bits(0xbf81_8000)]);
        xs
    }

    #[test]
    fn rounding_is_to_nearest_even_with_denormals_flushed() {
        let mut xs = random(4096, 1);
        xs.extend(specials());
        for x in xs {
            let got = to_bf16(x);
            if x.is_nan() {
                assert!(from_bf16(got).is_nan(), "{x:e} ({:#010x}) must stay NaN", x.to_bits());
            } else if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
                assert_eq!(got, if x < 0.0 { 0x8000 } else { 0 }, "denormal {x:e} flushes to a signed zero");
            } else {
                assert_eq!(got, half::bf16::from_f32(x).to_bits(), "{x:e} ({:#010x})", x.to_bits());
            }
        }
    }

    /// The AVX-512 packing (conversion by `vcvtne2ps2bf16`, interleave, transposes) gives the
    /// scalar packing's bits, specials included, for both layouts and orientations.
    #[test]
    fn simd_packing_matches_the_scalar_packing() {
        if !simd_packing() {
            eprintln!("no AVX-512 BF16 on this CPU: the AVX-512 packing runs only there");
            return;
        }
        let mut data = random(96 * 100, 3);
        for (i, x) in specials().into_iter().enumerate() {
            data[i * 37] = x;
        }
        // [96, 100] row-major: k along rows or columns, o the other; a 16-block that is full and
        // one that runs past the edge (o 80..96 full, 96.. beyond for o_len 100).
        for (k_len, o_len, k_stride, o_stride) in
            [(100, 96, 1, 100), (96, 100, 100, 1), (64, 48, 1, 100), (64, 48, 100, 1)]
        {
            let v = Axes { data: &data, k_len, o_len, k_stride, o_stride };
            let kp = round_up(k_len, TILE_K);
            for orient in [Orientation::OtherMajor, Orientation::PairMajor] {
                for o0 in (0..o_len).step_by(16) {
                    let (mut fast, mut slow) = (vec![0u32; 8 * kp], vec![7u32; 8 * kp]);
                    // SAFETY: simd_packing() found AVX-512F, BW and BF16.
                    unsafe { simd::pack_block(v, o0, kp, orient, &mut fast) };
                    pack_block_body(v, o0, kp, orient, &mut slow);
                    assert!(
                        fast == slow,
                        "k{k_len} o{o_len} strides ({k_stride}, {o_stride}) o0 {o0}: packings differ"
                    );
                }
            }
        }
    }

    /// Both bf16 paths (the tiles where this CPU has them, and the emulation) against the f64
    /// reference, for edge-sized shapes, transposed and strided views, strided `c`, with and
    /// without accumulation, on one and on several threads.
    #[test]
    fn bf16_gemm_matches_the_rounded_reference() {
        let paths: &[(&str, bool)] =
            if amx_available() { &[("amx", true), ("emulated", false)] } else { &[("emulated", false)] };
        eprintln!("AMX on this CPU: {}", amx_available());
        let mut seed = 10;
        for (m, n, k) in [(1, 1, 1), (37, 29, 45), (64, 192, 64), (50, 50, 16), (100, 33, 70), (16, 16, 300)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for accumulate in [false, true] {
                    seed += 1;
                    let (a_data, b_data) = (random(m * k, seed), random(k * n, seed + 1000));
                    let a = MatRef::dense(&a_data, m, k, ta);
                    let b = MatRef::dense(&b_data, k, n, tb);
                    let ldc = n + 3;
                    let c0 = random(m * ldc, seed + 2000);
                    let mut want = c0.clone();
                    let scale = reference(a, b, &mut want, ldc, accumulate);
                    for &(name, tiles) in paths {
                        for threads in [1, 3] {
                            let mut got = c0.clone();
                            // SAFETY: the views lie inside their vectors; `got` holds m rows of ldc.
                            unsafe {
                                if tiles {
                                    gemm_bf16_amx(a, b, got.as_mut_ptr(), ldc, accumulate, threads)
                                } else {
                                    gemm_bf16_emulated(a, b, got.as_mut_ptr(), got.len(), ldc, accumulate, threads)
                                }
                            }
                            for i in 0..m {
                                for j in 0..ldc {
                                    let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                                    if j >= n {
                                        assert_eq!(
                                            g.to_bits(),
                                            c0[i * ldc + j].to_bits(),
                                            "{name}: wrote outside the view"
                                        );
                                        continue;
                                    }
                                    let tol = 1e-6 * (scale[i * n + j] as f32 + 1.0);
                                    assert!(
                                        (g - w).abs() <= tol,
                                        "{name} m{m} n{n} k{k} ta{ta} tb{tb} acc{accumulate} threads{threads}: \
                                         c[{i},{j}] = {g}, expected {w} (tolerance {tol})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_first_use_self_check_passes_where_the_tiles_run() {
        if !probe() {
            eprintln!("no AMX on this CPU: nothing to check");
            return;
        }
        let error = self_check();
        assert!(error.is_finite() && error <= 1e-6, "tiles against the emulated path: relative error {error:e}");
        assert!(amx_available() || crate::cuda::self_check::fast_kernel_off(SELF_CHECK_NAME));
    }

    /// Every element of `c` is summed by one task in one order: the same bits for any number
    /// of threads.
    #[test]
    fn bf16_gemm_gives_the_same_bits_for_any_thread_count() {
        if !amx_available() {
            eprintln!("no AMX on this CPU: the emulated path's thread invariance is gemm's");
        }
        let (m, n, k) = (200, 96, 130);
        let (a_data, b_data) = (random(m * k, 5), random(k * n, 6));
        let (a, b) = (MatRef::dense(&a_data, m, k, false), MatRef::dense(&b_data, k, n, true));
        let run = |threads: usize| {
            let mut c = vec![0f32; m * n];
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            // SAFETY: dense views inside their vectors; `c` holds m·n values.
            pool.install(|| unsafe {
                if amx_available() {
                    gemm_bf16_amx(a, b, c.as_mut_ptr(), n, false, threads)
                } else {
                    gemm_bf16_emulated(a, b, c.as_mut_ptr(), c.len(), n, false, threads)
                }
            });
            c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let one = run(1);
        for threads in [2, 5] {
            assert!(one == run(threads), "{threads} threads changed the bits");
        }
    }
}
