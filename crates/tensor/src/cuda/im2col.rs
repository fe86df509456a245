//! CUDA launches of `kernels/im2col.cu`: convolution windows to rows and back.

use super::launch::{cfg_1d, i64_of, launch, name};
use super::{backend_of, output, view, wrap};
use crate::{ops::ConvWindow, Result, Shape, Tensor};
use cudarc::driver::PushKernelArg;

pub(crate) fn im2col(x: &Tensor, win: ConvWindow) -> Result<Tensor> {
    let d = x.dims();
    let (h, w, c) = (d[1], d[2], d[3]);
    let positions = win.out_side(h).unwrap_or(0) * win.out_side(w).unwrap_or(0);
    run("im2col", x, Shape::new([d[0], positions, win.kernel * win.kernel * c]), [h, w, c], win)
}

pub(crate) fn col2im(cols: &Tensor, h: usize, w: usize, c: usize, win: ConvWindow) -> Result<Tensor> {
    run("col2im", cols, Shape::new([cols.dims()[0], h, w, c]), [h, w, c], win)
}

/// Launches `op` (one thread per element of `shape`, the output) on `input`, for images of
/// `[batch, h, w, c]` (batch the leading dim of both) and the window `win`.
fn run(op: &'static str, input: &Tensor, shape: Shape, [h, w, c]: [usize; 3], win: ConvWindow) -> Result<Tensor> {
    let backend = backend_of(input, op)?;
    let mut out = output(&backend, &shape, input.dtype())?;
    let total = shape.numel();
    if total > 0 {
        let func = backend.function("im2col.cu", &name(op, input.dtype()))?;
        let iv = view(input, op)?;
        let (oh, ow) = (win.out_side(h).unwrap_or(0), win.out_side(w).unwrap_or(0));
        let [b, h, w, c, k, s, pad, oh, ow] =
            [input.dims()[0], h, w, c, win.kernel, win.stride, win.pad, oh, ow].map(i64_of);
        launch!(backend, func, cfg_1d(total), &iv, &mut out, &b, &h, &w, &c, &k, &s, &pad, &oh, &ow);
    }
    Ok(wrap(&backend, out, shape, input.dtype()))
}
