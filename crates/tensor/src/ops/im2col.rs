//! Convolution as a matmul: the overlapping k×k windows of channels-last images as rows
//! (im2col) and back (col2im, its adjoint and so its backward). A convolution is im2col followed
//! by `linear` with the kernel `[out, k, k, in]` viewed as `[out, k·k·in]`.

use super::same_float_dtype;
use crate::{cpu, cuda, Device, Error, Result, Tensor};

/// A square `kernel × kernel` window moved by `stride` pixels over images padded with `pad`
/// zeros on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvWindow {
    /// Window side k in pixels.
    pub kernel: usize,
    /// Step between windows in pixels.
    pub stride: usize,
    /// Zero rows and columns added on each side.
    pub pad: usize,
}

impl ConvWindow {
    /// Output positions along an input side: `(side + 2·pad − kernel) / stride + 1`, or `None`
    /// when the window is larger than the padded side or `kernel`/`stride` is 0.
    pub fn out_side(&self, side: usize) -> Option<usize> {
        if self.kernel == 0 || self.stride == 0 {
            return None;
        }
        (side + 2 * self.pad).checked_sub(self.kernel).map(|room| room / self.stride + 1)
    }

    /// Checks the window against an input of `height × width`; returns the output sides.
    fn check(&self, op: &'static str, height: usize, width: usize) -> Result<(usize, usize)> {
        let sides = self.out_side(height).zip(self.out_side(width));
        match sides {
            // A padding of a whole window or more would give windows that see only zeros.
            Some(s) if self.pad < self.kernel && height > 0 && width > 0 => Ok(s),
            _ => Err(Error::shape(
                op,
                format!(
                    "window {self:?} does not fit {height}x{width} images: expected kernel and stride >= 1, \
                     pad < kernel and kernel <= side + 2·pad"
                ),
            )),
        }
    }
}

/// `x [batch, height, width, channels] -> [batch, out_h·out_w, kernel·kernel·channels]`: one row
/// per output position (row-major over the output grid), features ordered `(ky, kx, c)`; pixels
/// of the padding are zeros. With `kernel = stride = p` and `pad = 0` on one channel this is
/// [`super::patchify`].
pub fn im2col(x: &Tensor, win: ConvWindow) -> Result<Tensor> {
    const OP: &str = "im2col";
    same_float_dtype(OP, &[x])?;
    let d = x.dims();
    if d.len() != 4 {
        return Err(Error::shape(OP, format!("expected images [batch, height, width, channels], got {}", x.shape())));
    }
    let (b, h, w, c) = (d[0], d[1], d[2], d[3]);
    let (oh, ow) = win.check(OP, h, w)?;
    let out = [b, oh * ow, win.kernel * win.kernel * c];
    match x.device() {
        Device::Cpu => Ok(Tensor::cpu_like(cpu::im2col(&x.cpu_f32(OP)?, [b, h, w, c], win), out, x.dtype())),
        Device::Cuda(_) => cuda::im2col::im2col(x, win),
    }
}

/// The adjoint of [`im2col`], hence its backward: `cols [batch, out_h·out_w, k·k·channels] ->
/// [batch, height, width, channels]`, each pixel the sum of every window element that read it
/// (in the fixed order of their output positions; f32 accumulation).
pub fn col2im(cols: &Tensor, height: usize, width: usize, channels: usize, win: ConvWindow) -> Result<Tensor> {
    const OP: &str = "col2im";
    same_float_dtype(OP, &[cols])?;
    let (oh, ow) = win.check(OP, height, width)?;
    let d = cols.dims();
    let feat = win.kernel * win.kernel * channels;
    if d.len() != 3 || d[1] != oh * ow || d[2] != feat || channels == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "expected columns [batch, {}, {feat}] for {height}x{width}x{channels} images and window {win:?}, got {}",
                oh * ow,
                cols.shape()
            ),
        ));
    }
    let b = d[0];
    match cols.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::col2im(&cols.cpu_f32(OP)?, [b, height, width, channels], win),
            [b, height, width, channels],
            cols.dtype(),
        )),
        Device::Cuda(_) => cuda::im2col::col2im(cols, height, width, channels, win),
    }
}
