//! Helpers shared by the GPU tests that compare a CUDA result with the CPU reference.
#![allow(dead_code)] // each test file uses its own subset

use vit_tensor::{DType, Device, Tensor};

pub const GPU: Device = Device::Cuda(0);
pub const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

pub fn require_gpu() {
    assert!(vit_tensor::cuda::available(), "these tests need a CUDA device and its driver");
}

pub fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// `(rtol, atol as a fraction of the largest reference magnitude)` for results stored in `dtype`
/// (computed in f32 on both sides; the difference is f32 summation order, then one rounding).
pub fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-4, 1e-5),
        DType::BF16 => (2e-2, 1e-2),
        DType::F16 => (2e-3, 1e-3),
        DType::I32 | DType::U32 => (0.0, 0.0),
    }
}

/// Compares a CUDA result with the CPU reference: same shape and dtype, every element within
/// `atol + rtol·|cpu|` with the tolerance of `dtype` (the inputs' dtype), equal infinities and
/// NaNs count as equal.
pub fn check(what: &str, cuda: &Tensor, cpu: &Tensor, dtype: DType) {
    assert_eq!(cuda.device(), GPU, "{what}: result not on the GPU");
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    assert_eq!(cuda.dtype(), cpu.dtype(), "{what}: dtypes differ");
    let (g, c) = (cuda.to_f32_vec().unwrap(), cpu.to_f32_vec().unwrap());
    let (rtol, afrac) = tolerance(dtype);
    let scale = c.iter().filter(|v| v.is_finite()).fold(1e-3f32, |m, v| m.max(v.abs()));
    let atol = afrac * scale + 1e-6;
    for (i, (x, y)) in g.iter().zip(&c).enumerate() {
        let ok = x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= atol + rtol * y.abs();
        assert!(ok, "{what} ({dtype}): element {i} of {}: cuda {x}, cpu {y} (rtol {rtol}, atol {atol})", g.len());
    }
}
