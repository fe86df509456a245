//! CUDA launches of `kernels/im2col.cu`: convolution windows to rows and back.

use super::launch::{cfg_1d, i64_of, launch, name};
use super::{backend_of, output, view, wrap};
use crate::{ops::ConvWindow, Result, Shape, Tensor};
use cudarc::driver::PushKernelArg;

/// `(k, s, pad, oh, ow)` as kernel arguments, for images of `h × w`.
fn window_args(win: ConvWindow, h: usize, w: usize) -> [i64; 5] {
    let (oh, ow) = (win.out_side(h).unwrap_or(0), win.out_side(w).unwrap_or(0));
    [win.kernel, win.stride, win.pad, oh, ow].map(i64_of)
}

pub(crate) fn im2col(x: &Tensor, win: ConvWindow) -> Result<Tensor> {
    const OP: &str = "im2col";
    let backend = backend_of(x, OP)?;
    let d = x.dims();
    let (b, h, w, c) = (d[0], d[1], d[2], d[3]);
    let [k, s, pad, oh, ow] = window_args(win, h, w);
    let shape = Shape::new([b, (oh * ow) as usize, win.kernel * win.kernel * c]);
    let mut out = output(&backend, &shape, x.dtype())?;
    let total = shape.numel();
    if total > 0 {
        let func = backend.function("im2col.cu", &name(OP, x.dtype()))?;
        let xv = view(x, OP)?;
        let (b_, h_, w_, c_) = (i64_of(b), i64_of(h), i64_of(w), i64_of(c));
        launch!(backend, func, cfg_1d(total), &xv, &mut out, &b_, &h_, &w_, &c_, &k, &s, &pad, &oh, &ow);
    }
    Ok(wrap(&backend, out, shape, x.dtype()))
}

pub(crate) fn col2im(cols: &Tensor, h: usize, w: usize, c: usize, win: ConvWindow) -> Result<Tensor> {
    const OP: &str = "col2im";
    let backend = backend_of(cols, OP)?;
    let b = cols.dims()[0];
    let [k, s, pad, oh, ow] = window_args(win, h, w);
    let shape = Shape::new([b, h, w, c]);
    let mut out = output(&backend, &shape, cols.dtype())?;
    let total = shape.numel();
    if total > 0 {
        let func = backend.function("im2col.cu", &name(OP, cols.dtype()))?;
        let cv = view(cols, OP)?;
        let (b_, h_, w_, c_) = (i64_of(b), i64_of(h), i64_of(w), i64_of(c));
        launch!(backend, func, cfg_1d(total), &cv, &mut out, &b_, &h_, &w_, &c_, &k, &s, &pad, &oh, &ow);
    }
    Ok(wrap(&backend, out, shape, cols.dtype()))
}
