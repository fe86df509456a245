//! CUDA launches of `kernels/index.cu`: row gather and scatter-add.

use super::elementwise::cast;
use super::launch::{cfg_1d, i64_of, launch, name};
use super::{backend_of, output, output_zeroed, view, wrap};
use crate::{DType, Result, Shape, Tensor};
use cudarc::driver::PushKernelArg;

pub(crate) fn gather_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let backend = backend_of(src, OP)?;
    let (m, d) = (idx.numel(), src.dims()[1]);
    let shape = Shape::new([m, d]);
    let mut out = output(&backend, &shape, src.dtype())?;
    if m * d > 0 {
        let func = backend.function("index.cu", &name(OP, src.dtype()))?;
        let (sv, iv) = (view(src, OP)?, view(idx, OP)?);
        let (m_, d_) = (i64_of(m), i64_of(d));
        launch!(backend, func, cfg_1d(m * d), &sv, &iv, &mut out, &m_, &d_);
    }
    Ok(wrap(&backend, out, shape, src.dtype()))
}

pub(crate) fn scatter_add_rows(src: &Tensor, idx: &Tensor, n: usize) -> Result<Tensor> {
    const OP: &str = "scatter_add_rows";
    let backend = backend_of(src, OP)?;
    let (m, d) = (src.dims()[0], src.dims()[1]);
    let shape = Shape::new([n, d]);
    // f32 accumulator [n, d]; for f32 sources it is the output itself.
    let mut acc = output_zeroed(&backend, &shape, DType::F32)?;
    if m * d > 0 {
        let func = backend.function("index.cu", &name(OP, src.dtype()))?;
        let (sv, iv) = (view(src, OP)?, view(idx, OP)?);
        let (m_, d_) = (i64_of(m), i64_of(d));
        launch!(backend, func, cfg_1d(m * d), &sv, &iv, &mut acc, &m_, &d_);
    }
    let acc = wrap(&backend, acc, shape, DType::F32);
    if src.dtype() == DType::F32 {
        Ok(acc)
    } else {
        cast(&acc, src.dtype())
    }
}
