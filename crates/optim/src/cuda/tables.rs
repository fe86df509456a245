//! The launch plans of the fused optimizer kernels, pure host code (no CUDA calls): the
//! descriptor tables — `#[repr(C)]` structs deriving `bytemuck::Pod` that mirror the structs of
//! `kernels/optim.cu` field for field, sizes asserted on both sides — block counts, factored
//! geometry and scratch sizes.

use bytemuck::{Pod, Zeroable};
use vit_tensor::DType;

/// Threads per block of every kernel except `sum_squares_finalize` (`OPT_THREADS`).
pub const THREADS: u32 = 256;
/// Threads of the one block of `sum_squares_finalize`.
pub const FINALIZE_THREADS: u32 = 1024;
/// Elements per block of the step and sum-of-squares kernels (`STEP_ELEMS`).
pub const STEP_ELEMS: u64 = 4096;
/// Rows of a `factored_stats` tile (`TILE_ROWS`).
pub const TILE_ROWS: u64 = 256;
/// Columns of a `factored_stats` tile (`TILE_COLS`).
pub const TILE_COLS: u64 = 128;
/// Output tensors and scratch areas start at multiples of this many elements (256 bytes
/// for f32), so their pointers allow vector accesses.
pub const ALIGN_ELEMS: u64 = 64;

/// Descriptor flag: every pointer of the tensor allows 4-element vector accesses.
pub const F_VEC: i32 = 1;
/// Descriptor flag: momentum present.
pub const F_HAS_M: i32 = 2;
/// Descriptor flag: factored second moment (rf, cf) instead of v.
pub const F_FACTORED: i32 = 4;
/// Descriptor flag: factored, d0 is the lower of the two reduced axes.
pub const F_D0_IS_A: i32 = 8;

/// Where a `*_dev` step kernel also writes the new parameter, rounded to dtype code `dt`
/// (`out` 0 for none): `struct CopyDesc` of `kernels/optim.cu` (16 bytes), one per descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct CopyDesc {
    pub out: u64,
    pub dt: i32,
    pub pad: i32,
}
const _: () = assert!(std::mem::size_of::<CopyDesc>() == 16);

/// The kernels' runtime dtype code: 0 f32, 1 bf16, 2 f16.
pub fn dtype_code(d: DType) -> i32 {
    match d {
        DType::BF16 => 1,
        DType::F16 => 2,
        _ => 0,
    }
}

/// `n` rounded up to a multiple of [`ALIGN_ELEMS`].
pub fn align_elems(n: u64) -> u64 {
    n.div_ceil(ALIGN_ELEMS) * ALIGN_ELEMS
}

/// True when every non-null pointer allows 4-element vector accesses: `(pointer, element size)`.
pub fn aligned(ptrs: &[(u64, u64)]) -> bool {
    ptrs.iter().all(|&(p, size)| p % (4 * size) == 0)
}

/// A factored tensor viewed as `[P, A, Q, B, R]`: `a = min(d0, d1)` of size A,
/// `b = max(d0, d1)` of size B (see kernels/optim.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub p: u64,
    pub a: u64,
    pub q: u64,
    pub b: u64,
    pub r: u64,
    /// d0 (the largest axis, the one v_row averages over) is the lower axis `a`.
    pub d0_is_a: bool,
}

impl Geometry {
    pub fn new(dims: &[usize], d0: usize, d1: usize) -> Self {
        let (lo, hi) = (d0.min(d1), d0.max(d1));
        let prod = |r: std::ops::Range<usize>| dims[r].iter().product::<usize>() as u64;
        Geometry {
            p: prod(0..lo),
            a: dims[lo] as u64,
            q: prod(lo + 1..hi),
            b: dims[hi] as u64,
            r: prod(hi + 1..dims.len()),
            d0_is_a: d0 == lo,
        }
    }
    /// `(A, Q, C, R)` of a [`StepDesc`].
    pub fn step_fields(&self) -> (u64, u64, u64, u64) {
        (self.a, self.q, self.c(), self.r)
    }
    /// Columns of each `[A, C]` matrix.
    pub fn c(&self) -> u64 {
        self.b * self.r
    }
    /// Entries of S_a (the sums over a), laid out `[P, Q, B, R]`.
    pub fn na(&self) -> u64 {
        self.p * self.q * self.c()
    }
    /// Entries of S_b (the sums over b), laid out `[P, A, Q, R]`.
    pub fn nb(&self) -> u64 {
        self.p * self.a * self.q * self.r
    }
    pub fn vr_len(&self) -> u64 {
        if self.d0_is_a {
            self.na()
        } else {
            self.nb()
        }
    }
    pub fn vc_len(&self) -> u64 {
        if self.d0_is_a {
            self.nb()
        } else {
            self.na()
        }
    }
    pub fn tiles_a(&self) -> u64 {
        self.a.div_ceil(TILE_ROWS)
    }
    pub fn tiles_c(&self) -> u64 {
        self.c().div_ceil(TILE_COLS)
    }
    /// Tiles of the partial sums over b: the column tiles when R == 1, else one (the
    /// line blocks sum over b directly).
    pub fn tiles_b(&self) -> u64 {
        if self.r == 1 {
            self.tiles_c()
        } else {
            1
        }
    }
    pub fn part_a_len(&self) -> u64 {
        self.tiles_a() * self.na()
    }
    pub fn part_b_len(&self) -> u64 {
        self.tiles_b() * self.nb()
    }
    pub fn tile_blocks(&self) -> u64 {
        self.p * self.q * self.tiles_a() * self.tiles_c()
    }
    pub fn stats_blocks(&self) -> u64 {
        self.tile_blocks() + if self.r > 1 { self.nb().div_ceil(THREADS as u64) } else { 0 }
    }
    pub fn vr_blocks(&self) -> u64 {
        self.vr_len().div_ceil(THREADS as u64)
    }
    pub fn finalize_blocks(&self) -> u64 {
        self.vr_blocks() + self.vc_len().div_ceil(THREADS as u64)
    }
    /// Slices (p, q, r) of v_row: the blocks of `factored_rowmean`.
    pub fn slices(&self) -> u64 {
        self.p * self.q * self.r
    }
}

/// One tensor of a step launch: `struct StepDesc` of `kernels/optim.cu` (136 bytes). Pointers
/// are device addresses (0 for none); `long long` fields are `u64` here (same bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct StepDesc {
    /// Parameter.
    pub p: u64,
    /// Gradient.
    pub g: u64,
    /// Momentum (0 without).
    pub m: u64,
    /// Full f32 second moment (AdamW; unfactored factored Adam), else 0.
    pub v: u64,
    /// New parameter.
    pub p_out: u64,
    /// New momentum.
    pub m_out: u64,
    /// New full second moment.
    pub v_out: u64,
    /// Factored: row factors, v_row's layout.
    pub rf: u64,
    /// Factored: column factors, v_col's layout.
    pub cf: u64,
    /// Elements.
    pub n: u64,
    /// Factored geometry `A, Q, C, R` (see [`Geometry`]); 1 otherwise.
    pub a: u64,
    pub q: u64,
    pub c: u64,
    pub r: u64,
    /// `lr · lr_mult`.
    pub lr: f32,
    /// `wd · wd_mult`.
    pub wd: f32,
    /// dtype codes ([`dtype_code`]) of the parameter, gradient and momentum.
    pub p_dt: i32,
    pub g_dt: i32,
    pub m_dt: i32,
    /// `F_*` flags.
    pub flags: i32,
}
const _: () = assert!(std::mem::size_of::<StepDesc>() == 136);

/// One factored tensor of the statistics launches: `struct FactoredDesc` (152 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct FactoredDesc {
    /// Gradient.
    pub g: u64,
    /// v_row and v_col before the step.
    pub vr_in: u64,
    pub vc_in: u64,
    /// v_row and v_col after the step.
    pub vr_out: u64,
    pub vc_out: u64,
    /// Row factors (v_row's layout) and column factors (v_col's layout), f32.
    pub rf: u64,
    pub cf: u64,
    /// f64 partial sums over a `[tiles_a, P·Q·C]` and over b `[tiles_b, P·A·Q·R]`.
    pub part_a: u64,
    pub part_b: u64,
    /// The geometry `[P, A, Q, B, R]`.
    pub p: u64,
    pub a: u64,
    pub q: u64,
    pub b: u64,
    pub r: u64,
    /// Row and column tiles of one `[A, C]` matrix.
    pub tiles_a: u64,
    pub tiles_c: u64,
    /// `P·Q·tiles_a·tiles_c`; in `factored_stats` the S_b line blocks follow (R > 1).
    pub tile_blocks: u64,
    /// `factored_finalize`'s v_row blocks (then v_col's).
    pub vr_blocks: u64,
    /// Gradient dtype code.
    pub g_dt: i32,
    /// `F_*` flags ([`F_D0_IS_A`] set from the geometry).
    pub flags: i32,
}
const _: () = assert!(std::mem::size_of::<FactoredDesc>() == 152);

impl FactoredDesc {
    /// The descriptor of a factored gradient with pointers `[g, vr_in, vc_in, vr_out, vc_out,
    /// rf, cf, part_a, part_b]`, geometry `geom`, gradient dtype code and flags.
    pub fn new(ptrs: [u64; 9], geom: Geometry, g_dt: i32, flags: i32) -> Self {
        let [g, vr_in, vc_in, vr_out, vc_out, rf, cf, part_a, part_b] = ptrs;
        FactoredDesc {
            g,
            vr_in,
            vc_in,
            vr_out,
            vc_out,
            rf,
            cf,
            part_a,
            part_b,
            p: geom.p,
            a: geom.a,
            q: geom.q,
            b: geom.b,
            r: geom.r,
            tiles_a: geom.tiles_a(),
            tiles_c: geom.tiles_c(),
            tile_blocks: geom.tile_blocks(),
            vr_blocks: geom.vr_blocks(),
            g_dt,
            flags: flags | if geom.d0_is_a { F_D0_IS_A } else { 0 },
        }
    }

    /// The geometry back from the descriptor.
    pub fn geometry(&self) -> Geometry {
        Geometry { p: self.p, a: self.a, q: self.q, b: self.b, r: self.r, d0_is_a: self.flags & F_D0_IS_A != 0 }
    }
}

/// One tensor of the sum of squares: `struct SqDesc` (24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct SqDesc {
    /// The tensor.
    pub x: u64,
    /// Elements.
    pub n: u64,
    /// dtype code.
    pub dt: i32,
    /// `F_*` flags (only [`F_VEC`]).
    pub flags: i32,
}
const _: () = assert!(std::mem::size_of::<SqDesc>() == 24);

/// Descriptors, then for each launch its block starts (`count + 1` u64 each, the prefix sums
/// of the blocks per tensor; 8-byte aligned since every descriptor size is a multiple of 8):
/// one upload serves every launch of a step.
#[derive(Debug, Clone)]
pub struct Table {
    pub bytes: Vec<u8>,
    /// Byte offset of each launch's starts array (the descriptors begin at 0).
    pub starts: Vec<usize>,
    /// Total blocks of each launch.
    pub blocks: Vec<u32>,
}

impl Table {
    /// A table of `descs`, with one starts array per element of `blocks_per_launch` (the
    /// blocks of each descriptor for that launch).
    fn new<D: Pod>(descs: &[D], blocks_per_launch: &[&dyn Fn(&D) -> u64]) -> Table {
        let mut bytes =
            Vec::with_capacity(std::mem::size_of_val(descs) + blocks_per_launch.len() * 8 * (descs.len() + 1));
        bytes.extend_from_slice(bytemuck::cast_slice(descs));
        let (mut starts, mut blocks) = (Vec::new(), Vec::new());
        for per in blocks_per_launch {
            starts.push(bytes.len());
            let mut prefix = Vec::with_capacity(descs.len() + 1);
            let mut total = 0u64;
            prefix.push(0u64);
            for d in descs {
                total += per(d);
                prefix.push(total);
            }
            bytes.extend_from_slice(bytemuck::cast_slice(&prefix));
            // Grids are u32; a launch beyond that would need 2^31 blocks of 4096 elements.
            blocks.push(u32::try_from(total).expect("grid of fewer than 2^32 blocks"));
        }
        Table { bytes, starts, blocks }
    }

    /// The byte range of launch `k`'s starts array.
    pub fn starts_range(&self, k: usize) -> std::ops::Range<usize> {
        let end = self.starts.get(k + 1).copied().unwrap_or(self.bytes.len());
        self.starts[k]..end
    }
}

/// The step launch's table: one block per [`STEP_ELEMS`] elements of each tensor.
pub fn step_table(descs: &[StepDesc]) -> Table {
    Table::new(descs, &[&|d: &StepDesc| d.n.div_ceil(STEP_ELEMS)])
}

/// The tables of `factored_stats`, `factored_finalize` and `factored_rowmean`.
pub fn factored_table(descs: &[FactoredDesc]) -> Table {
    Table::new(
        descs,
        &[
            &|d: &FactoredDesc| d.geometry().stats_blocks(),
            &|d: &FactoredDesc| d.geometry().finalize_blocks(),
            &|d: &FactoredDesc| d.geometry().slices(),
        ],
    )
}

/// The sum-of-squares launch's table: one block per [`STEP_ELEMS`] elements of each tensor.
pub fn sq_table(descs: &[SqDesc]) -> Table {
    Table::new(descs, &[&|d: &SqDesc| d.n.div_ceil(STEP_ELEMS)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn geometry_matches_the_axis_rules() {
        // [out, in] = [3072, 768], d0 = 0: a = 0 (A 3072), b = 1 (B 768); v_row = [768] = S_a.
        let g = Geometry::new(&[3072, 768], 0, 1);
        assert_eq!((g.p, g.a, g.q, g.b, g.r, g.d0_is_a), (1, 3072, 1, 768, 1, true));
        assert_eq!((g.vr_len(), g.vc_len(), g.slices()), (768, 3072, 1));
        assert_eq!((g.tiles_a(), g.tiles_c(), g.tile_blocks()), (12, 6, 72));
        // pos_embed [1, 197, 768]: d0 = 2, d1 = 1 -> a = 1, b = 2, P = 1.
        let g = Geometry::new(&[1, 197, 768], 2, 1);
        assert_eq!((g.p, g.a, g.q, g.b, g.r, g.d0_is_a), (1, 197, 1, 768, 1, false));
        assert_eq!((g.vr_len(), g.vc_len()), (197, 768));
        // [768, 3, 32, 32], d0 = 0, d1 = 3: Q = 3·32 between the axes, R = 1.
        let g = Geometry::new(&[768, 3, 32, 32], 0, 3);
        assert_eq!((g.p, g.a, g.q, g.b, g.r), (1, 768, 96, 32, 1));
        assert_eq!((g.vr_len(), g.vc_len(), g.slices()), (96 * 32, 768 * 96, 96));
        // [3, 40, 33, 5], d0 = 1, d1 = 2: P 3, Q 1, R 5; the line blocks sum over b.
        let g = Geometry::new(&[3, 40, 33, 5], 1, 2);
        assert_eq!((g.p, g.a, g.q, g.b, g.r, g.d0_is_a), (3, 40, 1, 33, 5, true));
        assert_eq!((g.na(), g.nb(), g.tiles_b()), (3 * 33 * 5, 3 * 40 * 5, 1));
        assert_eq!(g.stats_blocks(), g.tile_blocks() + (600u64).div_ceil(256));
    }

    #[test]
    fn descriptors_have_the_kernel_layout() {
        // Field offsets as `kernels/optim.cu` lays out its structs (its static_asserts check
        // the sizes on the CUDA side).
        let step = [
            offset_of!(StepDesc, p),
            offset_of!(StepDesc, g),
            offset_of!(StepDesc, m),
            offset_of!(StepDesc, v),
            offset_of!(StepDesc, p_out),
            offset_of!(StepDesc, m_out),
            offset_of!(StepDesc, v_out),
            offset_of!(StepDesc, rf),
            offset_of!(StepDesc, cf),
            offset_of!(StepDesc, n),
            offset_of!(StepDesc, a),
            offset_of!(StepDesc, q),
            offset_of!(StepDesc, c),
            offset_of!(StepDesc, r),
            offset_of!(StepDesc, lr),
            offset_of!(StepDesc, wd),
            offset_of!(StepDesc, p_dt),
            offset_of!(StepDesc, g_dt),
            offset_of!(StepDesc, m_dt),
            offset_of!(StepDesc, flags),
        ];
        assert_eq!(step, [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 116, 120, 124, 128, 132]);
        let factored = [
            offset_of!(FactoredDesc, g),
            offset_of!(FactoredDesc, vr_in),
            offset_of!(FactoredDesc, vc_in),
            offset_of!(FactoredDesc, vr_out),
            offset_of!(FactoredDesc, vc_out),
            offset_of!(FactoredDesc, rf),
            offset_of!(FactoredDesc, cf),
            offset_of!(FactoredDesc, part_a),
            offset_of!(FactoredDesc, part_b),
            offset_of!(FactoredDesc, p),
            offset_of!(FactoredDesc, a),
            offset_of!(FactoredDesc, q),
            offset_of!(FactoredDesc, b),
            offset_of!(FactoredDesc, r),
            offset_of!(FactoredDesc, tiles_a),
            offset_of!(FactoredDesc, tiles_c),
            offset_of!(FactoredDesc, tile_blocks),
            offset_of!(FactoredDesc, vr_blocks),
            offset_of!(FactoredDesc, g_dt),
            offset_of!(FactoredDesc, flags),
        ];
        assert_eq!(factored, [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 148]);
        let sq = [offset_of!(SqDesc, x), offset_of!(SqDesc, n), offset_of!(SqDesc, dt), offset_of!(SqDesc, flags)];
        assert_eq!(sq, [0, 8, 16, 20]);
        assert_eq!(
            [std::mem::size_of::<StepDesc>(), std::mem::size_of::<FactoredDesc>(), std::mem::size_of::<SqDesc>()],
            [136, 152, 24]
        );
    }

    #[test]
    fn tables_have_the_kernel_layout() {
        let (a, q, c, r) = Geometry { p: 1, a: 1, q: 1, b: 1, r: 1, d0_is_a: false }.step_fields();
        let e = StepDesc {
            p: 256,
            g: 512,
            m: 0,
            v: 0,
            p_out: 1024,
            m_out: 0,
            v_out: 0,
            rf: 0,
            cf: 0,
            n: 4097,
            a,
            q,
            c,
            r,
            lr: 0.5,
            wd: 0.25,
            p_dt: 0,
            g_dt: 1,
            m_dt: 0,
            flags: F_VEC,
        };
        let t = step_table(&[e, StepDesc { n: 0, ..e }, StepDesc { n: 10, ..e }]);
        assert_eq!(t.starts, [3 * 136]);
        assert_eq!(t.blocks, [3]);
        let starts: Vec<u64> =
            t.bytes[t.starts_range(0)].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(starts, [0, 2, 2, 3]);
        // The bytes the kernel reads: pointers, n, the geometry, lr, wd, dtype codes, flags.
        let word = |at: usize| u64::from_le_bytes(t.bytes[at..at + 8].try_into().unwrap());
        assert_eq!([word(0), word(8), word(32), word(72), word(80), word(104)], [256, 512, 1024, 4097, 1, 1]);
        assert_eq!(&t.bytes[112..116], &0.5f32.to_le_bytes());
        assert_eq!(&t.bytes[116..120], &0.25f32.to_le_bytes());
        assert_eq!(&t.bytes[124..128], &1i32.to_le_bytes());
        assert_eq!(&t.bytes[132..136], &F_VEC.to_le_bytes());
        assert_eq!(word(136 + 72), 0, "the second descriptor's n");
        assert!(aligned(&[(256, 4), (512, 2), (0, 2)]) && !aligned(&[(8, 4)]));

        // Factored: the derived fields and the three launches' starts.
        let geom = Geometry::new(&[3072, 768], 0, 1);
        let f = FactoredDesc::new([1, 2, 3, 4, 5, 6, 7, 8, 9], geom, 1, F_VEC);
        assert_eq!(f.geometry(), geom);
        assert_eq!(f.flags, F_VEC | F_D0_IS_A);
        let t = factored_table(&[f, f]);
        assert_eq!(t.starts, [2 * 152, 2 * 152 + 24, 2 * 152 + 48]);
        assert_eq!(t.blocks, [2 * 72, 2 * geom.finalize_blocks() as u32, 2]);
        let word = |at: usize| u64::from_le_bytes(t.bytes[at..at + 8].try_into().unwrap());
        assert_eq!(
            [word(0), word(64), word(72), word(80), word(104), word(112), word(120), word(128)],
            [1, 9, 1, 3072, 1, 12, 6, 72]
        );
        assert_eq!(word(136), geom.vr_blocks());
        assert_eq!(&t.bytes[144..152], &[1, 0, 0, 0, (F_VEC | F_D0_IS_A) as u8, 0, 0, 0]);
        assert_eq!(t.starts_range(2), 2 * 152 + 48..t.bytes.len());

        let s = sq_table(&[SqDesc { x: 64, n: 8193, dt: 2, flags: 0 }]);
        assert_eq!((s.starts.clone(), s.blocks.clone()), (vec![24], vec![3]));
        assert_eq!(&s.bytes[16..20], &2i32.to_le_bytes());
    }
}
