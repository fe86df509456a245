//! `vit-tensor`: tensors for vitrs, with a CPU backend (plain f32 references, `gemm` + rayon)
//! and a CUDA backend (our NVRTC-compiled kernels from `kernels/`, cuBLAS(Lt) GEMM).
//!
//! ```
//! use vit_tensor::{ops, DType, Device, Tensor};
//! let x = Tensor::randn([2, 3, 8], 0.0, 1.0, 7, DType::F32, Device::Cpu)?; // [batch, tokens, width]
//! let w = Tensor::randn([8, 4], 0.0, 0.1, 8, DType::F32, Device::Cpu)?;    // [width, out]
//! let y = ops::matmul(&x, &w)?;                                              // [batch, tokens, out]
//! assert_eq!(y.dims(), &[2, 3, 4]);
//! # Ok::<(), vit_tensor::Error>(())
//! ```

pub mod cpu;
pub mod cuda;
mod dtype;
mod element;
mod error;
mod op_kinds;
pub mod ops;
mod param_store;
pub mod rng;
mod shape;
mod storage;
mod tensor;
pub mod testing;

pub use dtype::{DType, Device};
pub use element::Element;
pub use error::{Error, Result};
pub use param_store::{ParamDiff, ParamStore, Placement};
pub use shape::Shape;
pub use tensor::Tensor;
