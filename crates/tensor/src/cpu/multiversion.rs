//! Runtime dispatch of a loop to the widest vector instructions this CPU has.
//!
//! The elementwise kernels are plain Rust loops over `f32` slices written so that LLVM can
//! vectorise them (no branches that stay branches, no calls into libm). Compiled for the
//! baseline x86-64 target they use 4-wide SSE2; [`multiversion!`] compiles the same body three
//! times (AVX-512, AVX2+FMA, baseline) and picks one at run time by CPU feature detection, the
//! way the `gemm` crate picks its microkernel.
//!
//! The three copies give the same bits: Rust never contracts `a * b + c` into a fused
//! multiply-add on its own, so each element sees the same IEEE operations in the same order
//! whatever the vector width (tested in `cpu::vector_math`).

/// Defines `fn $name(args)` whose `$body` runs compiled for AVX-512F, AVX2+FMA or the baseline,
/// whichever this CPU supports ([`SimdLevel::detect`](crate::cpu::SimdLevel::detect): one cached
/// load per call).
///
/// The body is an `#[inline(always)]` inner function, so everything it calls that is also
/// `#[inline(always)]` is compiled inside the `#[target_feature]` copies.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::cpu::SimdLevel::detect() {
                    // SAFETY: `detect` returns `Avx512` only where the CPU has AVX-512F, AVX2
                    // and FMA, the features `avx512` was compiled for.
                    $crate::cpu::SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for AVX2 and FMA.
                    $crate::cpu::SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::cpu::SimdLevel::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;
