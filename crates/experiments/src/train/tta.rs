//! Test-time augmentation (TTA) for classification evaluations: each image is classified by
//! the mean of the logits of several views of it, as in the CIFAR-10 speed runs (Jordan 2024,
//! airbench: mirror images and one-pixel translations). The views are formed from the batch
//! after the evaluation preprocessing, so they see the same pixel values as the model.
//!
//! `tta = ["flip_lr"]` evaluates 2 views (the image and its mirror image); `tta = ["flip_lr",
//! "shift"]` evaluates 6 (each of those, and each shifted one pixel down-right and up-left). A
//! classification `[[evals]]` entry takes the list as `tta`, `vit eval` as `--tta flip_lr,shift`.

use super::TrainError;
use serde::{Deserialize, Serialize};
use vit_tensor::{DType, Device, Tensor};

/// One test-time augmentation; each multiplies the views evaluated.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum TtaOp {
    /// `flip_lr`: every view and its mirror image (left–right), 2× the views.
    #[serde(rename = "flip_lr")]
    FlipLr,
    /// `shift`: every view, and the same shifted by one pixel down-right and by one up-left
    /// (the edge row and column repeated into the gap), 3× the views.
    #[serde(rename = "shift")]
    Shift,
}

impl std::fmt::Display for TtaOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TtaOp::FlipLr => "flip_lr",
            TtaOp::Shift => "shift",
        })
    }
}

impl std::str::FromStr for TtaOp {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s.trim() {
            "flip_lr" => Ok(TtaOp::FlipLr),
            "shift" => Ok(TtaOp::Shift),
            other => Err(TrainError::Config(format!(
                "tta op {other:?}: expected flip_lr (mirror images) or shift (one-pixel shifts)"
            ))),
        }
    }
}

/// Parses `vit eval --tta flip_lr,shift` (checked with [`check`]).
pub fn parse_list(spec: &str) -> Result<Vec<TtaOp>, TrainError> {
    let ops = spec.split(',').map(str::parse).collect::<Result<Vec<TtaOp>, _>>()?;
    check(&ops).map_err(|e| TrainError::Config(format!("--tta {spec}: expected {e}")))?;
    Ok(ops)
}

/// Each op at most once (a repeated op would only repeat views); the error says what was
/// expected and which op repeats.
pub fn check(ops: &[TtaOp]) -> Result<(), String> {
    match ops.iter().enumerate().find(|(i, op)| ops[..*i].contains(op)) {
        Some((_, op)) => Err(format!("each op at most once ({op} is listed twice)")),
        None => Ok(()),
    }
}

/// The ops' names as the config writes them: `["flip_lr", "shift"]`.
pub fn names(ops: &[TtaOp]) -> Vec<String> {
    ops.iter().map(ToString::to_string).collect()
}

/// The number of views `ops` evaluate (1 without TTA).
pub fn view_count(ops: &[TtaOp]) -> usize {
    ops.iter().map(|op| if *op == TtaOp::FlipLr { 2 } else { 3 }).product()
}

/// The views of `images` `[batch, channels, height, width]` (f32, on the host): the images
/// themselves first, then those of each op in `ops`' order, all on the host.
pub fn views(images: &Tensor, ops: &[TtaOp]) -> Result<Vec<Tensor>, TrainError> {
    if ops.is_empty() {
        return Ok(vec![images.clone()]);
    }
    let dims = images.dims().to_vec();
    let [_, _, h, w] = dims[..] else {
        return Err(TrainError::Config(format!(
            "tta: images of shape {dims:?}: expected [batch, channels, height, width]"
        )));
    };
    let mut out = vec![images.to_f32_vec()?];
    for op in ops {
        let next: Vec<Vec<f32>> = match op {
            TtaOp::FlipLr => out.iter().map(|v| flip_lr(v, w)).collect(),
            TtaOp::Shift => out.iter().flat_map(|v| [shift(v, h, w, 1), shift(v, h, w, -1)]).collect(),
        };
        out.extend(next);
    }
    out.into_iter()
        .map(|v| Tensor::from_f32(v, dims.clone(), DType::F32, Device::Cpu).map_err(TrainError::from))
        .collect()
}

/// Mirrors each row (of width `w`) of `x` left–right.
fn flip_lr(x: &[f32], w: usize) -> Vec<f32> {
    x.chunks_exact(w).flat_map(|row| row.iter().rev().copied()).collect()
}

/// Shifts each `h × w` plane of `x` by `d` pixels down and `d` right (`d < 0`: up and left),
/// repeating the edge pixels into the gap.
fn shift(x: &[f32], h: usize, w: usize, d: isize) -> Vec<f32> {
    let src = |i: usize, n: usize| (i as isize - d).clamp(0, n as isize - 1) as usize;
    let mut out = Vec::with_capacity(x.len());
    for plane in x.chunks_exact(h * w) {
        for y in 0..h {
            let row = &plane[src(y, h) * w..][..w];
            out.extend((0..w).map(|xx| row[src(xx, w)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_the_images_their_mirrors_and_their_shifts() {
        // One 2-channel 2×3 image: plane 0 is 0..6, plane 1 is 10..16.
        let x: Vec<f32> = (0..6).chain(10..16).map(|v| v as f32).collect();
        let img = Tensor::from_f32(x.clone(), [1, 2, 2, 3], DType::F32, Device::Cpu).unwrap();
        let v = views(&img, &[TtaOp::FlipLr]).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].to_f32_vec().unwrap(), x);
        assert_eq!(v[1].to_f32_vec().unwrap(), [2., 1., 0., 5., 4., 3., 12., 11., 10., 15., 14., 13.]);
        let v = views(&img, &[TtaOp::Shift]).unwrap();
        assert_eq!(v.len(), 3);
        // Down-right: row 0 repeats, column 0 repeats.
        assert_eq!(v[1].to_f32_vec().unwrap(), [0., 0., 1., 0., 0., 1., 10., 10., 11., 10., 10., 11.]);
        // Up-left: the last row and column repeat.
        assert_eq!(v[2].to_f32_vec().unwrap(), [4., 5., 5., 4., 5., 5., 14., 15., 15., 14., 15., 15.]);
        let both = views(&img, &[TtaOp::FlipLr, TtaOp::Shift]).unwrap();
        assert_eq!((both.len(), view_count(&[TtaOp::FlipLr, TtaOp::Shift])), (6, 6));
        // The order: image, mirror, image shifted ±1, mirror shifted ±1.
        assert_eq!(both[4].to_f32_vec().unwrap(), [2., 2., 1., 2., 2., 1., 12., 12., 11., 12., 12., 11.]);
        assert_eq!(views(&img, &[]).unwrap().len(), 1);
    }

    #[test]
    fn bad_lists_are_one_line_errors_naming_the_op() {
        assert_eq!(parse_list("flip_lr, shift").unwrap(), [TtaOp::FlipLr, TtaOp::Shift]);
        let e = parse_list("flip_lr,flip_ud").unwrap_err().to_string();
        assert!(e.contains("\"flip_ud\": expected flip_lr"), "{e}");
        let e = parse_list("shift,shift").unwrap_err().to_string();
        assert!(e.contains("--tta shift,shift: expected each op at most once (shift is listed twice)"), "{e}");
    }
}
