//! Images to non-overlapping patches and back (the ViT patch embedding is patchify + matmul).

use super::same_float_dtype;
use crate::{cpu, cuda, Device, Error, Result, Tensor};

/// `images [batch, channels, height, width] -> [batch, (height/p)·(width/p), channels·p·p]`.
/// Patches are row-major over the grid; features are ordered `(c, py, px)`, which matches a
/// convolution kernel `[width, channels, p, p]` flattened.
pub fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    same_float_dtype("patchify", &[images])?;
    let d = images.dims();
    if d.len() != 4 {
        return Err(Error::shape(
            "patchify",
            format!("expected images [batch, channels, height, width], got {}", images.shape()),
        ));
    }
    if p == 0 || !d[2].is_multiple_of(p) || !d[3].is_multiple_of(p) {
        return Err(Error::shape("patchify", format!("patch size {p} must divide height {} and width {}", d[2], d[3])));
    }
    let (b, c, h, w) = (d[0], d[1], d[2], d[3]);
    let out = [b, (h / p) * (w / p), c * p * p];
    match images.device() {
        Device::Cpu => {
            Ok(Tensor::cpu_like(cpu::patchify(&images.cpu_f32("patchify")?, b, c, h, w, p), out, images.dtype()))
        }
        Device::Cuda(_) => cuda::patch::patchify(images, p),
    }
}

/// The inverse of [`patchify`] (and its backward): `[batch, N, channels·p·p] -> [batch, channels, height, width]`.
pub fn unpatchify(patches: &Tensor, channels: usize, height: usize, width: usize, p: usize) -> Result<Tensor> {
    same_float_dtype("unpatchify", &[patches])?;
    let d = patches.dims();
    let tokens = height.checked_div(p).unwrap_or(0) * width.checked_div(p).unwrap_or(0);
    let ok = p > 0
        && height.is_multiple_of(p)
        && width.is_multiple_of(p)
        && d.len() == 3
        && d[1] == tokens
        && d[2] == channels * p * p;
    if !ok {
        return Err(Error::shape(
            "unpatchify",
            format!(
                "expected patches [batch, {tokens}, {}] for {channels}x{height}x{width} images with patch {p} dividing both sides, got {}",
                channels * p * p,
                patches.shape()
            ),
        ));
    }
    let b = d[0];
    match patches.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::unpatchify(&patches.cpu_f32("unpatchify")?, b, channels, height, width, p),
            [b, channels, height, width],
            patches.dtype(),
        )),
        Device::Cuda(_) => cuda::patch::unpatchify(patches, channels, height, width, p),
    }
}
