//! Rust element types that map onto [`DType`].

use crate::DType;
use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that a tensor can hold: `f32`, `bf16`, `f16`, `i32`, `u32` (sealed).
pub trait Element: sealed::Sealed + Copy + Send + Sync + bytemuck::Pod + std::fmt::Debug + 'static {
    const DTYPE: DType;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
element!(f32, F32);
element!(bf16, BF16);
element!(f16, F16);
element!(i32, I32);
element!(u32, U32);
