//! How the CPU backend multiplies f32 matrices: exactly in f32 (the default), or with the
//! inputs rounded to bf16 and the products summed in f32, like PyTorch's
//! `torch.set_float32_matmul_precision("medium")`.
//!
//! bf16 inputs let CPUs with AMX (Intel Xeon 4th generation and later) run every GEMM on the
//! matrix tiles ([`super::amx`]), several times faster than AVX-512 f32; elsewhere the rounding is
//! emulated, so a run gives the same products (up to the order of the f32 sums) on any CPU.
//! The setting is process-wide, like PyTorch's, and read by every GEMM of the CPU backend
//! (linear layers, attention products, patch embedding); under bf16 only the products of at
//! least [`BF16_MIN_DIM`](super::matmul::BF16_MIN_DIM) in every dimension round their inputs.
//! Tensors stay f32.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// The inputs' precision of the CPU backend's f32 GEMMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 inputs, f32 sums.
    #[default]
    F32,
    /// Inputs rounded to bf16 (to nearest, ties to even), products summed in f32.
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide [`MatmulPrecision`] of the CPU backend's GEMMs.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The process-wide [`MatmulPrecision`] (f32 unless [`set_matmul_precision`] changed it).
#[inline]
pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => MatmulPrecision::F32,
        _ => MatmulPrecision::Bf16,
    }
}

impl fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        })
    }
}

impl FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            other => Err(format!("matmul precision {other:?}: expected \"f32\" or \"bf16\"")),
        }
    }
}
