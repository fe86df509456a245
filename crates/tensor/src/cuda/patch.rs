//! CUDA launches of `kernels/patch.cu`: images to patches and back.

use super::launch::{cfg_1d, i64_of, launch, name};
use super::{backend_of, output, view, wrap};
use crate::{Result, Shape, Tensor};
use cudarc::driver::PushKernelArg;

pub(crate) fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    const OP: &str = "patchify";
    let backend = backend_of(images, OP)?;
    let d = images.dims();
    let (b, c, h, w) = (d[0], d[1], d[2], d[3]);
    let shape = Shape::new([b, (h / p) * (w / p), c * p * p]);
    let mut out = output(&backend, &shape, images.dtype())?;
    let total = images.numel();
    if total > 0 {
        let func = backend.function("patch.cu", &name(OP, images.dtype()))?;
        let iv = view(images, OP)?;
        let (b_, c_, h_, w_, p_) = (i64_of(b), i64_of(c), i64_of(h), i64_of(w), i64_of(p));
        launch!(backend, func, cfg_1d(total), &iv, &mut out, &b_, &c_, &h_, &w_, &p_);
    }
    Ok(wrap(&backend, out, shape, images.dtype()))
}

pub(crate) fn unpatchify(patches: &Tensor, channels: usize, height: usize, width: usize, p: usize) -> Result<Tensor> {
    const OP: &str = "unpatchify";
    let backend = backend_of(patches, OP)?;
    let b = patches.dims()[0];
    let shape = Shape::new([b, channels, height, width]);
    let mut out = output(&backend, &shape, patches.dtype())?;
    let total = shape.numel();
    if total > 0 {
        let func = backend.function("patch.cu", &name(OP, patches.dtype()))?;
        let pv = view(patches, OP)?;
        let (b_, c_, h_, w_, p_) = (i64_of(b), i64_of(channels), i64_of(height), i64_of(width), i64_of(p));
        launch!(backend, func, cfg_1d(total), &pv, &mut out, &b_, &c_, &h_, &w_, &p_);
    }
    Ok(wrap(&backend, out, shape, patches.dtype()))
}
