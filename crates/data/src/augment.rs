//! Augmentation: [`Transform`]s composed into a [`Pipeline`], each random one drawing from a
//! seeded [`Rng`], so the same seed gives the same output bit for bit.
//!
//! The pipeline takes a dataset's `Image<u8>` (HWC, 0..=255), converts it to `Image<f32>` on
//! the same 0..=255 scale and applies the ops in order. Ops are named as in big_vision's
//! preprocessing strings, and the enum (de)serialises with serde as a table with an `op` key,
//! so a TOML config can hold a pipeline:
//!
//! ```toml
//! pp_train = [
//!   { op = "inception_crop", size = 224 },
//!   { op = "flip_lr" },
//!   { op = "value_range", min = -1, max = 1 },
//! ]
//! ```
//!
//! Geometric ops (crops, flips, resizes) leave the values alone; put `value_range` or
//! `normalize` last, as big_vision does.

use crate::{DataError, Image};
use serde::{Deserialize, Serialize};

/// The SplitMix64 finaliser: a bijective 64-bit mixer (Steele, Lea and Flood 2014).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small deterministic PRNG (SplitMix64). Its own code rather than the `rand` crate, so a
/// stream — and so a resumed run — never changes with a dependency's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: mix64(seed ^ 0x5851_f42d_4c95_7f2d) }
    }

    /// The generator of example `index` in `epoch` of a run seeded with `seed`: what the loader
    /// hands the pipeline, so an example's augmentation depends on nothing else (not the worker
    /// count, nor the batch, nor what was drawn before).
    pub fn for_example(seed: u64, epoch: u64, index: u64) -> Self {
        Rng::new(mix64(mix64(mix64(seed) ^ epoch.wrapping_mul(GOLDEN)) ^ index))
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (0 when `n` is 0), by Lemire's multiply-shift.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// True with probability `p`; always draws one value.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// An output size: `224` (square) or `[height, width]`, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Square(usize),
    Hw([usize; 2]),
}

impl Size {
    /// `(height, width)`.
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size::Square(s) => (s, s),
            Size::Hw([h, w]) => (h, w),
        }
    }
}

fn default_area_min() -> f64 {
    0.08
}
fn one() -> f64 {
    1.0
}
fn default_aspect_min() -> f64 {
    3.0 / 4.0
}
fn default_aspect_max() -> f64 {
    4.0 / 3.0
}
fn half() -> f64 {
    0.5
}
fn f255() -> f32 {
    255.0
}
fn two() -> usize {
    2
}
fn default_translate() -> f64 {
    100.0
}
fn default_cutout() -> f64 {
    40.0
}
fn default_erase_area_min() -> f64 {
    crate::erasing::AREA_MIN
}
fn default_erase_area_max() -> f64 {
    crate::erasing::AREA_MAX
}
fn default_erase_aspect_min() -> f64 {
    crate::erasing::ASPECT_MIN
}
fn default_erase_aspect_max() -> f64 {
    1.0 / crate::erasing::ASPECT_MIN
}
fn default_noise() -> [f32; 2] {
    [0.0, 255.0]
}

/// One preprocessing op. Serialised as a table tagged by `op` (snake_case variant name).
/// Values are whatever the previous op left (0..=255 straight from the dataset); sizes are in
/// pixels; "random" ops draw from the example's [`Rng`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Random-area, random-aspect crop (the Inception / big_vision `inception_crop`), then a
    /// bilinear resize to `size` if given. Up to 10 tries draw an area fraction uniform in
    /// `[area_min, area_max]` of the image and an aspect ratio (width / height) log-uniform in
    /// `[aspect_min, aspect_max]`, and keep the first crop that fits, at a uniform position;
    /// if none fits, the whole image. Defaults 8%–100% and 3/4–4/3 (big_vision's own default
    /// `area_min` is 5%).
    InceptionCrop {
        #[serde(default)]
        size: Option<Size>,
        #[serde(default = "default_area_min")]
        area_min: f64,
        #[serde(default = "one")]
        area_max: f64,
        #[serde(default = "default_aspect_min")]
        aspect_min: f64,
        #[serde(default = "default_aspect_max")]
        aspect_max: f64,
    },
    /// Pads `padding` pixels of 0 on every side, then crops `size` at a uniform random position
    /// (CIFAR: `size = 32, padding = 4`). The pad value is 0 in the current values, so put it
    /// before `value_range` for black padding.
    RandomCrop {
        size: Size,
        #[serde(default)]
        padding: usize,
    },
    /// The centred `size` crop (offsets rounded down), for evaluation.
    CentralCrop { size: Size },
    /// Mirrors left–right with probability `p` (default 0.5).
    FlipLr {
        #[serde(default = "half")]
        p: f64,
    },
    /// Bilinear resize to `size` (half-pixel centres, edges clamped, no antialiasing: TF2's
    /// `tf.image.resize(method="bilinear")` and PyTorch's `align_corners=False`).
    Resize { size: Size },
    /// Bilinear resize keeping the aspect ratio, the shorter side to `size` (big_vision
    /// `resize_small`), for evaluation before `central_crop`.
    ResizeSmall { size: usize },
    /// Maps `[in_min, in_max]` (default `[0, 255]`) linearly onto `[min, max]`, e.g. `min = -1,
    /// max = 1` gives ViT's inputs (big_vision `value_range(-1, 1)`). No clipping.
    ValueRange {
        min: f32,
        max: f32,
        #[serde(default)]
        in_min: f32,
        #[serde(default = "f255")]
        in_max: f32,
    },
    /// Per channel `(x - mean[c]) / std[c]` on the current values (one entry applies to every
    /// channel). On raw 0..=255 pixels ImageNet's are `mean = [123.675, 116.28, 103.53]`,
    /// `std = [58.395, 57.12, 57.375]`.
    Normalize { mean: Vec<f32>, std: Vec<f32> },
    /// Repeats the one channel of a grey image three times (an RGB image passes unchanged).
    #[serde(alias = "gray_to_rgb")]
    GreyToRgb,
    /// RandAugment as big_vision's `randaug(num_layers, magnitude)`: `num_layers` ops drawn
    /// uniformly from 16 (colour, contrast, rotate, shear, translate, cutout, ...; the table is
    /// in [`crate::randaug`]) at level `magnitude` (0–10; "Better plain ViT baselines" uses
    /// `randaug(2, 10)`). On 0..=255 values: put it before `value_range`. `translate` and
    /// `cutout` are the pixel sizes at level 10 (big_vision's 100 and 40 for 224-pixel images;
    /// scale them for small ones).
    #[serde(alias = "rand_augment", alias = "randaugment")]
    Randaug {
        #[serde(default = "two")]
        num_layers: usize,
        magnitude: f64,
        #[serde(default = "default_translate")]
        translate: f64,
        #[serde(default = "default_cutout")]
        cutout: f64,
    },
    /// Random erasing (Zhong et al. 2020, Alg. 1): with probability `p` (default 0.5) one box of
    /// area fraction uniform in `[area_min, area_max]` (default 0.02–0.4) and aspect ratio
    /// log-uniform in `[aspect_min, aspect_max]` (default 0.3–1/0.3) is filled, every value with
    /// `value` if given, otherwise with noise uniform in `noise` (default `[0, 255]`, the raw
    /// pixel scale: put it before `value_range`). No box after 10 tries leaves the image as it
    /// is. See [`crate::erasing`].
    #[serde(alias = "erase")]
    RandomErasing {
        #[serde(default = "half")]
        p: f64,
        #[serde(default = "default_erase_area_min")]
        area_min: f64,
        #[serde(default = "default_erase_area_max")]
        area_max: f64,
        #[serde(default = "default_erase_aspect_min")]
        aspect_min: f64,
        #[serde(default = "default_erase_aspect_max")]
        aspect_max: f64,
        #[serde(default)]
        value: Option<f32>,
        #[serde(default = "default_noise")]
        noise: [f32; 2],
    },
}

impl Transform {
    /// The op's config name.
    pub fn name(&self) -> &'static str {
        match self {
            Transform::InceptionCrop { .. } => "inception_crop",
            Transform::RandomCrop { .. } => "random_crop",
            Transform::CentralCrop { .. } => "central_crop",
            Transform::FlipLr { .. } => "flip_lr",
            Transform::Resize { .. } => "resize",
            Transform::ResizeSmall { .. } => "resize_small",
            Transform::ValueRange { .. } => "value_range",
            Transform::Normalize { .. } => "normalize",
            Transform::GreyToRgb => "grey_to_rgb",
            Transform::Randaug { .. } => "randaug",
            Transform::RandomErasing { .. } => "random_erasing",
        }
    }

    fn err(&self, msg: String) -> DataError {
        DataError::Transform { op: self.name(), msg }
    }

    /// Checks the settings that do not depend on the image (sizes ≥ 1, ranges ordered,
    /// probabilities in [0, 1], std > 0).
    pub fn validate(&self) -> Result<(), DataError> {
        let probability_ok = |p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(self.err(format!("probability p must be in [0, 1], got {p}")))
            }
        };
        // The ranges of `sample_box`, shared by the inception crop and random erasing.
        let box_ranges_ok = |(area_min, area_max): (f64, f64), (aspect_min, aspect_max): (f64, f64)| {
            if !(0.0 < area_min && area_min <= area_max && area_max <= 1.0) {
                return Err(self.err(format!("need 0 < area_min ≤ area_max ≤ 1, got {area_min} and {area_max}")));
            }
            if !(0.0 < aspect_min && aspect_min <= aspect_max && aspect_max.is_finite()) {
                return Err(self.err(format!("need 0 < aspect_min ≤ aspect_max, got {aspect_min} and {aspect_max}")));
            }
            Ok(())
        };
        let size_ok = |s: Size| {
            let (h, w) = s.hw();
            if h == 0 || w == 0 {
                Err(self.err(format!("size must be at least 1×1, got {h}×{w}")))
            } else {
                Ok(())
            }
        };
        match self {
            Transform::InceptionCrop { size, area_min, area_max, aspect_min, aspect_max } => {
                if let Some(s) = size {
                    size_ok(*s)?;
                }
                box_ranges_ok((*area_min, *area_max), (*aspect_min, *aspect_max))?;
            }
            Transform::RandomCrop { size, .. } | Transform::CentralCrop { size } | Transform::Resize { size } => {
                size_ok(*size)?
            }
            Transform::ResizeSmall { size } => size_ok(Size::Square(*size))?,
            Transform::FlipLr { p } => {
                probability_ok(*p)?;
            }
            Transform::ValueRange { min, max, in_min, in_max } => {
                let ok = in_min < in_max && min.is_finite() && max.is_finite();
                if !ok {
                    return Err(self.err(format!(
                        "need finite bounds and in_min < in_max, got [{in_min}, {in_max}] -> [{min}, {max}]"
                    )));
                }
            }
            Transform::Normalize { mean, std } => {
                if mean.is_empty() || mean.len() != std.len() {
                    return Err(self.err(format!(
                        "mean and std need the same non-zero length, got {} and {}",
                        mean.len(),
                        std.len()
                    )));
                }
                if let Some(s) = std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
                    return Err(self.err(format!("every std must be positive and finite, got {s}")));
                }
            }
            Transform::GreyToRgb => {}
            Transform::Randaug { magnitude, translate, cutout, .. } => {
                if !(0.0..=30.0).contains(magnitude) {
                    return Err(self.err(format!(
                        "magnitude must be a level in [0, 30] (10 is big_vision's strongest), got {magnitude}"
                    )));
                }
                if !(*translate >= 0.0 && translate.is_finite() && *cutout >= 0.0 && cutout.is_finite()) {
                    return Err(
                        self.err(format!("translate and cutout must be pixel sizes ≥ 0, got {translate} and {cutout}"))
                    );
                }
            }
            Transform::RandomErasing { p, area_min, area_max, aspect_min, aspect_max, value, noise } => {
                probability_ok(*p)?;
                box_ranges_ok((*area_min, *area_max), (*aspect_min, *aspect_max))?;
                if let Some(v) = value.filter(|v| !v.is_finite()) {
                    return Err(self.err(format!("value must be finite, got {v}")));
                }
                let [lo, hi] = *noise;
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err(
                        self.err(format!("noise must be a finite range [lo, hi] with lo ≤ hi, got [{lo}, {hi}]"))
                    );
                }
            }
        }
        Ok(())
    }

    /// Applies the op to `img` (HWC f32), drawing from `rng` if it is random.
    pub fn apply(&self, img: Image<f32>, rng: &mut Rng) -> Result<Image<f32>, DataError> {
        match self {
            Transform::InceptionCrop { size, area_min, area_max, aspect_min, aspect_max } => {
                let (top, left, h, w) =
                    sample_box(img.height, img.width, (*area_min, *area_max), (*aspect_min, *aspect_max), rng)
                        .unwrap_or((0, 0, img.height, img.width));
                let crop = crop(&img, top, left, h, w);
                Ok(match size {
                    Some(s) => {
                        let (oh, ow) = s.hw();
                        resize_bilinear(&crop, oh, ow)
                    }
                    None => crop,
                })
            }
            Transform::RandomCrop { size, padding } => {
                let (h, w) = size.hw();
                let (ph, pw) = (img.height + 2 * padding, img.width + 2 * padding);
                if h > ph || w > pw {
                    return Err(self.err(format!(
                        "crop {h}×{w} is larger than the {}×{} image padded by {padding} ({ph}×{pw})",
                        img.height, img.width
                    )));
                }
                let top = rng.below(ph - h + 1);
                let left = rng.below(pw - w + 1);
                Ok(padded_crop(&img, top as isize - *padding as isize, left as isize - *padding as isize, h, w))
            }
            Transform::CentralCrop { size } => {
                let (h, w) = size.hw();
                if h > img.height || w > img.width {
                    return Err(self.err(format!("crop {h}×{w} is larger than the {}×{} image", img.height, img.width)));
                }
                Ok(crop(&img, (img.height - h) / 2, (img.width - w) / 2, h, w))
            }
            Transform::FlipLr { p } => Ok(if rng.bernoulli(*p) { flip_lr(img) } else { img }),
            Transform::Resize { size } => {
                let (h, w) = size.hw();
                Ok(resize_bilinear(&img, h, w))
            }
            Transform::ResizeSmall { size } => {
                let ratio = *size as f64 / img.height.min(img.width) as f64;
                let h = ((img.height as f64 * ratio).round() as usize).max(1);
                let w = ((img.width as f64 * ratio).round() as usize).max(1);
                Ok(resize_bilinear(&img, h, w))
            }
            Transform::ValueRange { min, max, in_min, in_max } => {
                // As big_vision: (x - in_min) / (in_max - in_min) * (max - min) + min, so
                // in_min, the midpoint and in_max map exactly.
                let (span, out_span) = (in_max - in_min, max - min);
                let mut img = img;
                img.data.iter_mut().for_each(|v| *v = (*v - in_min) / span * out_span + min);
                Ok(img)
            }
            Transform::Normalize { mean, std } => {
                let c = img.channels;
                if mean.len() != 1 && mean.len() != c {
                    return Err(self.err(format!("{} mean/std values for an image of {c} channels", mean.len())));
                }
                let at = |v: &[f32], i: usize| if v.len() == 1 { v[0] } else { v[i] };
                let inv: Vec<f32> = (0..c).map(|i| 1.0 / at(std, i)).collect();
                let mu: Vec<f32> = (0..c).map(|i| at(mean, i)).collect();
                let mut img = img;
                for px in img.data.chunks_exact_mut(c) {
                    for ((v, m), s) in px.iter_mut().zip(&mu).zip(&inv) {
                        *v = (*v - m) * s;
                    }
                }
                Ok(img)
            }
            Transform::GreyToRgb => match img.channels {
                3 => Ok(img),
                1 => Ok(Image {
                    height: img.height,
                    width: img.width,
                    channels: 3,
                    data: img.data.iter().flat_map(|&v| [v, v, v]).collect(),
                }),
                c => Err(self.err(format!("expected a 1-channel (grey) or 3-channel image, got {c} channels"))),
            },
            Transform::Randaug { num_layers, magnitude, translate, cutout } => {
                let ra = crate::randaug::RandAugment {
                    num_layers: *num_layers,
                    magnitude: *magnitude,
                    translate: *translate,
                    cutout: *cutout,
                };
                Ok(ra.apply(img, rng))
            }
            Transform::RandomErasing { p, area_min, area_max, aspect_min, aspect_max, value, noise } => {
                let erasing = crate::erasing::RandomErasing {
                    p: *p,
                    area: (*area_min, *area_max),
                    aspect: (*aspect_min, *aspect_max),
                    fill: match value {
                        Some(v) => crate::erasing::Fill::Value(*v),
                        None => crate::erasing::Fill::Noise(noise[0], noise[1]),
                    },
                };
                Ok(erasing.apply(img, rng))
            }
        }
    }
}

/// A random box `(top, left, height, width)` inside an `h × w` image, as the inception crop
/// and random erasing draw it: up to 10 tries of an area fraction uniform in `[area_min,
/// area_max]` and an aspect ratio (width / height) log-uniform in `[aspect_min, aspect_max]`;
/// the first that fits goes to a uniform position. `None` if no try fits.
pub(crate) fn sample_box(
    h: usize,
    w: usize,
    (area_min, area_max): (f64, f64),
    (aspect_min, aspect_max): (f64, f64),
    rng: &mut Rng,
) -> Option<(usize, usize, usize, usize)> {
    let area = (h * w) as f64;
    let (lo, hi) = (aspect_min.ln(), aspect_max.ln());
    for _ in 0..10 {
        let target = area * rng.range(area_min, area_max);
        let ratio = rng.range(lo, hi).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if (1..=w).contains(&cw) && (1..=h).contains(&ch) {
            let top = rng.below(h - ch + 1);
            let left = rng.below(w - cw + 1);
            return Some((top, left, ch, cw));
        }
    }
    None
}

/// The `h × w` window at (`top`, `left`), which must lie inside the image.
pub fn crop(img: &Image<f32>, top: usize, left: usize, h: usize, w: usize) -> Image<f32> {
    let c = img.channels;
    let mut data = Vec::with_capacity(h * w * c);
    for y in top..top + h {
        let row = (y * img.width + left) * c;
        data.extend_from_slice(&img.data[row..row + w * c]);
    }
    Image { height: h, width: w, channels: c, data }
}

/// The `h × w` window at (`top`, `left`), which may stick out of the image: outside is 0.
pub fn padded_crop(img: &Image<f32>, top: isize, left: isize, h: usize, w: usize) -> Image<f32> {
    let c = img.channels;
    let mut data = vec![0.0; h * w * c];
    for (oy, out_row) in data.chunks_exact_mut(w * c).enumerate() {
        let y = top + oy as isize;
        if y < 0 || y >= img.height as isize {
            continue;
        }
        // Columns of the window that fall inside the image.
        let x0 = (-left).clamp(0, w as isize) as usize;
        let x1 = (img.width as isize - left).clamp(0, w as isize) as usize;
        if x0 < x1 {
            let src = (y as usize * img.width + (left + x0 as isize) as usize) * c;
            out_row[x0 * c..x1 * c].copy_from_slice(&img.data[src..src + (x1 - x0) * c]);
        }
    }
    Image { height: h, width: w, channels: c, data }
}

/// Mirror image: column `x` becomes column `width - 1 - x`.
pub fn flip_lr(mut img: Image<f32>) -> Image<f32> {
    let c = img.channels;
    for row in img.data.chunks_exact_mut(img.width * c) {
        // Reversing the row reverses the pixels and, within each, the channels: undo the latter.
        row.reverse();
        if c > 1 {
            row.chunks_exact_mut(c).for_each(<[f32]>::reverse);
        }
    }
    img
}

/// Source sample positions of a bilinear resize along one axis: for each output coordinate,
/// the two input indices and the weight of the second, with half-pixel centres.
fn taps(inp: usize, out: usize) -> Vec<(usize, usize, f32)> {
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|o| {
            let s = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, (inp - 1) as f64);
            let i0 = s.floor() as usize;
            let i1 = (i0 + 1).min(inp - 1);
            (i0, i1, (s - i0 as f64) as f32)
        })
        .collect()
}

/// Bilinear resize to `h × w` (half-pixel centres, clamped edges, no antialias). Weights sum
/// to one, so a constant image stays constant.
pub fn resize_bilinear(img: &Image<f32>, h: usize, w: usize) -> Image<f32> {
    if (h, w) == (img.height, img.width) {
        return img.clone();
    }
    let c = img.channels;
    let row_in = img.width * c;
    // Vertical pass first, over whole contiguous rows (vectorises), then the horizontal one.
    let mut rows = Vec::with_capacity(h * row_in);
    for (y0, y1, f) in taps(img.height, h) {
        let (r0, r1) = (&img.data[y0 * row_in..(y0 + 1) * row_in], &img.data[y1 * row_in..(y1 + 1) * row_in]);
        rows.extend(r0.iter().zip(r1).map(|(&a, &b)| a + (b - a) * f));
    }
    let tx: Vec<(usize, usize, f32)> = taps(img.width, w).into_iter().map(|(x0, x1, f)| (x0 * c, x1 * c, f)).collect();
    let mut data = vec![0.0f32; h * w * c];
    for (out, row) in data.chunks_exact_mut(w * c).zip(rows.chunks_exact(row_in)) {
        if c == 3 {
            for (o, &(o0, o1, f)) in out.chunks_exact_mut(3).zip(&tx) {
                let (a, b) = (&row[o0..o0 + 3], &row[o1..o1 + 3]);
                o[0] = a[0] + (b[0] - a[0]) * f;
                o[1] = a[1] + (b[1] - a[1]) * f;
                o[2] = a[2] + (b[2] - a[2]) * f;
            }
        } else {
            for (o, &(o0, o1, f)) in out.chunks_exact_mut(c).zip(&tx) {
                for (k, v) in o.iter_mut().enumerate() {
                    *v = row[o0 + k] + (row[o1 + k] - row[o0 + k]) * f;
                }
            }
        }
    }
    Image { height: h, width: w, channels: c, data }
}

/// A sequence of [`Transform`]s applied in order; (de)serialises as a plain list of op tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pipeline {
    pub ops: Vec<Transform>,
}

impl Pipeline {
    /// The pipeline of `ops`, in order.
    pub fn new(ops: Vec<Transform>) -> Self {
        Pipeline { ops }
    }

    /// Checks every op's settings ([`Transform::validate`]).
    pub fn validate(&self) -> Result<(), DataError> {
        self.ops.iter().try_for_each(Transform::validate)
    }

    /// Converts `image` (HWC u8) to f32 on the 0..=255 scale and applies the ops in order,
    /// drawing from `rng`.
    pub fn apply(&self, image: &Image<u8>, rng: &mut Rng) -> Result<Image<f32>, DataError> {
        self.ops.iter().try_fold(image.to_f32(), |img, op| op.apply(img, rng))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(h: usize, w: usize, c: usize, f: impl Fn(usize, usize, usize) -> f32) -> Image<f32> {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    data.push(f(y, x, k));
                }
            }
        }
        Image::new(h, w, c, data).unwrap()
    }

    fn run(op: Transform, im: Image<f32>, seed: u64) -> Image<f32> {
        op.validate().unwrap();
        op.apply(im, &mut Rng::new(seed)).unwrap()
    }

    #[test]
    fn rng_is_deterministic_and_spread() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::new(7);
        assert_eq!(a, (0..5).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(Rng::for_example(1, 0, 5), Rng::for_example(1, 1, 5));
        assert_ne!(Rng::for_example(1, 0, 5), Rng::for_example(1, 0, 6));
        assert_ne!(Rng::for_example(1, 0, 5), Rng::for_example(2, 0, 5));
        let mut r = Rng::new(3);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[r.below(4)] += 1;
        }
        assert!(counts.iter().all(|&c| (900..1100).contains(&c)), "{counts:?}");
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(v, s);
    }

    #[test]
    fn flip_of_a_2x3_image() {
        // Values 1..6 row-major, two channels (second = 10 × first).
        let im = img(2, 3, 2, |y, x, k| ((y * 3 + x + 1) * if k == 0 { 1 } else { 10 }) as f32);
        let f = run(Transform::FlipLr { p: 1.0 }, im.clone(), 0);
        assert_eq!(f.data, [3., 30., 2., 20., 1., 10., 6., 60., 5., 50., 4., 40.]);
        assert_eq!(run(Transform::FlipLr { p: 0.0 }, im.clone(), 0), im);
        // p = 0.5 flips some seeds and not others.
        let flips = (0..64).filter(|&s| run(Transform::FlipLr { p: 0.5 }, im.clone(), s) != im).count();
        assert!((16..48).contains(&flips), "{flips}");
    }

    #[test]
    fn random_crop_with_padding_offsets() {
        // 3×3 single channel 1..9, padding 1, crop 3×3: the offset (top, left) in the padded
        // 5×5 image comes from the rng; recompute it and check the window by hand.
        let im = img(3, 3, 1, |y, x, _| (y * 3 + x + 1) as f32);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200 {
            let out = run(Transform::RandomCrop { size: Size::Square(3), padding: 1 }, im.clone(), seed);
            let mut r = Rng::new(seed);
            let (top, left) = (r.below(3) as isize - 1, r.below(3) as isize - 1);
            seen.insert((top, left));
            for y in 0..3 {
                for x in 0..3 {
                    let (sy, sx) = (y as isize + top, x as isize + left);
                    let want =
                        if (0..3).contains(&sy) && (0..3).contains(&sx) { (sy * 3 + sx + 1) as f32 } else { 0.0 };
                    assert_eq!(out.pixel(y, x), &[want], "seed {seed} offset ({top}, {left})");
                }
            }
        }
        assert_eq!(seen.len(), 9, "all 9 offsets occur");
        // The two extreme offsets, spelled out.
        let tl = padded_crop(&im, -1, -1, 3, 3);
        assert_eq!(tl.data, [0., 0., 0., 0., 1., 2., 0., 4., 5.]);
        let br = padded_crop(&im, 1, 1, 3, 3);
        assert_eq!(br.data, [5., 6., 0., 8., 9., 0., 0., 0., 0.]);
        let e = Transform::RandomCrop { size: Size::Square(6), padding: 1 }.apply(im, &mut Rng::new(0));
        assert!(e.unwrap_err().to_string().contains("random_crop: crop 6×6 is larger than the 3×3 image padded by 1"));
    }

    #[test]
    fn central_crop_and_resize() {
        let im = img(4, 5, 1, |y, x, _| (y * 5 + x) as f32);
        let c = run(Transform::CentralCrop { size: Size::Hw([2, 3]) }, im.clone(), 0);
        assert_eq!(c.data, [6., 7., 8., 11., 12., 13.]);
        // A constant image stays constant under any resize.
        let k = img(7, 5, 3, |_, _, k| [12.5, 200.0, 3.0][k]);
        for (h, w) in [(3, 3), (16, 9), (1, 1), (7, 11)] {
            let r = run(Transform::Resize { size: Size::Hw([h, w]) }, k.clone(), 0);
            assert_eq!(r.dims(), [h, w, 3]);
            assert!(r.data.chunks(3).all(|p| p == [12.5, 200.0, 3.0]), "{h}×{w}");
        }
        // Upscaling a 1×2 ramp [0, 4] to 1×4: sources -0.25→0, 0.25, 0.75, 1.25→1.
        let ramp = img(1, 2, 1, |_, x, _| 4.0 * x as f32);
        assert_eq!(run(Transform::Resize { size: Size::Hw([1, 4]) }, ramp, 0).data, [0., 1., 3., 4.]);
        // 2× downscale of a 4×4 image samples the centres between pixel pairs.
        let sq = img(4, 4, 1, |y, x, _| (y * 4 + x) as f32);
        assert_eq!(run(Transform::Resize { size: Size::Square(2) }, sq, 0).data, [2.5, 4.5, 10.5, 12.5]);
        let rs = run(Transform::ResizeSmall { size: 8 }, img(4, 6, 1, |_, _, _| 1.0), 0);
        assert_eq!(rs.dims(), [8, 12, 1]);
    }

    #[test]
    fn inception_crop_boxes_respect_area_and_aspect() {
        let (h, w) = (60, 80);
        let mut full = 0;
        for seed in 0..300 {
            let (top, left, ch, cw) =
                sample_box(h, w, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut Rng::new(seed)).unwrap_or((0, 0, h, w));
            assert!(top + ch <= h && left + cw <= w);
            if (ch, cw) == (h, w) {
                full += 1;
                continue;
            }
            let frac = (ch * cw) as f64 / (h * w) as f64;
            let aspect = cw as f64 / ch as f64;
            // Rounding to whole pixels moves area and aspect slightly.
            assert!((0.07..=1.01).contains(&frac), "{frac}");
            assert!((0.70..=1.40).contains(&aspect), "{aspect}");
        }
        assert!(full < 10, "fell back to the whole image {full} times");
        // With size, the output is resized; a constant image stays constant.
        let k = img(h, w, 3, |_, _, k| k as f32);
        let op = Transform::InceptionCrop {
            size: Some(Size::Square(16)),
            area_min: 0.08,
            area_max: 1.0,
            aspect_min: 0.75,
            aspect_max: 4.0 / 3.0,
        };
        let out = run(op.clone(), k.clone(), 9);
        assert_eq!(out.dims(), [16, 16, 3]);
        assert!(out.data.chunks(3).all(|p| p == [0.0, 1.0, 2.0]));
        // A crop of a coordinate image equals the window at the drawn box.
        let coord = img(h, w, 1, |y, x, _| (y * 1000 + x) as f32);
        let (top, left, ch, cw) =
            sample_box(h, w, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut Rng::new(4)).expect("a box fits");
        let op = Transform::InceptionCrop {
            size: None,
            area_min: 0.08,
            area_max: 1.0,
            aspect_min: 0.75,
            aspect_max: 4.0 / 3.0,
        };
        let c = run(op, coord, 4);
        assert_eq!(c.dims(), [ch, cw, 1]);
        assert_eq!(c.pixel(0, 0), &[(top * 1000 + left) as f32]);
        assert_eq!(c.pixel(ch - 1, cw - 1), &[((top + ch - 1) * 1000 + left + cw - 1) as f32]);
    }

    #[test]
    fn value_range_normalize_and_grey_to_rgb() {
        let im = img(1, 3, 1, |_, x, _| [0.0, 127.5, 255.0][x]);
        let vr = Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 };
        assert_eq!(run(vr, im.clone(), 0).data, [-1.0, 0.0, 1.0]);
        let vr01 = Transform::ValueRange { min: 0.0, max: 1.0, in_min: 0.0, in_max: 255.0 };
        assert_eq!(run(vr01, im.clone(), 0).data, [0.0, 0.5, 1.0]);

        let rgb = img(1, 2, 3, |_, x, k| (10 * x + k) as f32);
        let n = Transform::Normalize { mean: vec![1.0, 2.0, 3.0], std: vec![2.0, 4.0, 0.5] };
        assert_eq!(run(n, rgb.clone(), 0).data, [-0.5, -0.25, -2.0, 4.5, 2.25, 18.0]);
        let n1 = Transform::Normalize { mean: vec![1.0], std: vec![2.0] };
        assert_eq!(run(n1, rgb.clone(), 0).data, [-0.5, 0.0, 0.5, 4.5, 5.0, 5.5]);
        let bad =
            Transform::Normalize { mean: vec![0.0, 0.0], std: vec![1.0, 1.0] }.apply(rgb.clone(), &mut Rng::new(0));
        assert!(bad.unwrap_err().to_string().contains("normalize: 2 mean/std values for an image of 3 channels"));

        let g = run(Transform::GreyToRgb, im.clone(), 0);
        assert_eq!(g.dims(), [1, 3, 3]);
        assert!(g.data.chunks(3).zip(&im.data).all(|(p, &v)| p == [v, v, v]));
        assert_eq!(run(Transform::GreyToRgb, rgb.clone(), 0), rgb);
        let two = img(1, 1, 2, |_, _, _| 0.0);
        assert!(Transform::GreyToRgb.apply(two, &mut Rng::new(0)).is_err());
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let cases = [
            (Transform::Resize { size: Size::Hw([0, 3]) }, "resize: size must be at least 1×1"),
            (Transform::FlipLr { p: 1.5 }, "flip_lr: probability p must be in [0, 1]"),
            (Transform::ValueRange { min: -1.0, max: 1.0, in_min: 1.0, in_max: 1.0 }, "in_min < in_max"),
            (Transform::Normalize { mean: vec![0.0], std: vec![0.0] }, "std must be positive"),
            (Transform::Normalize { mean: vec![0.0, 1.0], std: vec![1.0] }, "same non-zero length"),
        ];
        for (op, want) in cases {
            let e = op.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let ic =
            Transform::InceptionCrop { size: None, area_min: 0.5, area_max: 0.2, aspect_min: 0.75, aspect_max: 1.3 };
        assert!(Pipeline::new(vec![Transform::GreyToRgb, ic]).validate().unwrap_err().to_string().contains("area_min"));
    }

    #[test]
    fn pipelines_come_from_toml() {
        #[derive(Deserialize)]
        struct Cfg {
            pp: Pipeline,
        }
        let cfg: Cfg = toml::from_str(
            r#"pp = [
                { op = "inception_crop", size = 224 },
                { op = "random_crop", size = [32, 24], padding = 4 },
                { op = "flip_lr" },
                { op = "resize_small", size = 256 },
                { op = "gray_to_rgb" },
                { op = "normalize", mean = [0.5], std = [0.25] },
                { op = "value_range", min = -1, max = 1 },
            ]"#,
        )
        .unwrap();
        assert_eq!(
            cfg.pp.ops,
            [
                Transform::InceptionCrop {
                    size: Some(Size::Square(224)),
                    area_min: 0.08,
                    area_max: 1.0,
                    aspect_min: 0.75,
                    aspect_max: 4.0 / 3.0
                },
                Transform::RandomCrop { size: Size::Hw([32, 24]), padding: 4 },
                Transform::FlipLr { p: 0.5 },
                Transform::ResizeSmall { size: 256 },
                Transform::GreyToRgb,
                Transform::Normalize { mean: vec![0.5], std: vec![0.25] },
                Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 },
            ]
        );
        // Round trip through TOML.
        #[derive(Serialize, Deserialize)]
        struct Out {
            pp: Pipeline,
        }
        let text = toml::to_string(&Out { pp: cfg.pp.clone() }).unwrap();
        assert_eq!(toml::from_str::<Out>(&text).unwrap().pp, cfg.pp);
        // Unknown ops and misspelt fields are errors, not silently ignored.
        assert!(toml::from_str::<Cfg>(r#"pp = [{ op = "rotate" }]"#).is_err());
        assert!(toml::from_str::<Cfg>(r#"pp = [{ op = "flip_lr", prob = 0.5 }]"#).is_err());
    }

    #[test]
    fn pipeline_applies_in_order_deterministically() {
        let src = Image::new(8, 8, 1, (0..64).map(|i| (i * 4) as u8).collect()).unwrap();
        let pp = Pipeline::new(vec![
            Transform::GreyToRgb,
            Transform::RandomCrop { size: Size::Square(6), padding: 2 },
            Transform::FlipLr { p: 0.5 },
            Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 },
        ]);
        let a = pp.apply(&src, &mut Rng::for_example(5, 0, 3)).unwrap();
        let b = pp.apply(&src, &mut Rng::for_example(5, 0, 3)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.dims(), [6, 6, 3]);
        assert!(a.data.iter().all(|v| (-1.0..=1.0).contains(v)));
        let differ = (0..20).any(|s| pp.apply(&src, &mut Rng::for_example(s, 0, 3)).unwrap() != a);
        assert!(differ);
    }
}
