//! RandAugment (Cubuk et al. 2019) as big_vision runs it (`randaug(num_layers, magnitude)`, the
//! `distort_image_with_randaugment` of TensorFlow's AutoAugment code): `num_layers` times, one
//! op drawn uniformly from the 16 below is applied at the fixed `magnitude` (level 0–10, 10 the
//! strongest; larger levels extrapolate). Geometric ops draw a random sign, fill with grey 128
//! and sample nearest-neighbour; the colour ops blend with a degenerate image by the factor
//! `magnitude / 10 · 1.8 + 0.1`.
//!
//! | op | at level L |
//! |---|---|
//! | `auto_contrast`, `equalize`, `invert` | (no level) |
//! | `rotate` | ±30·L/10 degrees about the centre |
//! | `posterize` | keep ⌊4·L/10⌋ bits |
//! | `solarize` | invert pixels ≥ ⌊256·L/10⌋ |
//! | `solarize_add` | add ⌊110·L/10⌋ to pixels < 128 |
//! | `color`, `contrast`, `brightness`, `sharpness` | blend factor L/10·1.8 + 0.1 |
//! | `shear_x`, `shear_y` | shear ±0.3·L/10 |
//! | `translate_x`, `translate_y` | ±`translate`·L/10 pixels (`translate` default 100) |
//! | `cutout` | a grey square of side 2·⌊`cutout`·L/10⌋ (`cutout` default 40) at a random centre |
//!
//! The pixel constants (`translate`, `cutout`) are big_vision's for 224-pixel images; scale
//! them down for small images. Values are on the 0..=255 scale of decoded pixels: put
//! `randaug` before `value_range`. Every op leaves whole numbers in [0, 255], as TensorFlow's
//! uint8 ops do.

use crate::{augment::Rng, Image};

/// The ops in big_vision's (TensorFlow's) order, the order `randaug` draws from.
pub const OPS: [&str; 16] = [
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "cutout",
    "solarize_add",
];

/// The grey that geometric ops and cutout fill with.
const FILL: f32 = 128.0;
const MAX_LEVEL: f64 = 10.0;

/// Settings of RandAugment: ops per image, level, and the pixel constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    pub num_layers: usize,
    pub magnitude: f64,
    /// Translation at level 10, in pixels.
    pub translate: f64,
    /// Cutout half-side at level 10, in pixels.
    pub cutout: f64,
}

impl RandAugment {
    /// Applies `num_layers` ops drawn from `rng` to `img` (HWC, values 0..=255).
    pub fn apply(&self, img: Image<f32>, rng: &mut Rng) -> Image<f32> {
        let mut img = quantise(img);
        for _ in 0..self.num_layers {
            let op = OPS[rng.below(OPS.len())];
            img = self.apply_op(op, img, rng);
        }
        img
    }

    /// Applies the op named `op` (one of [`OPS`]) at this magnitude; random signs and cutout
    /// centres come from `rng`. The input should hold whole numbers in [0, 255].
    pub fn apply_op(&self, op: &str, img: Image<f32>, rng: &mut Rng) -> Image<f32> {
        let level = self.magnitude / MAX_LEVEL;
        let enhance = level * 1.8 + 0.1;
        let mut signed = |v: f64| if rng.bernoulli(0.5) { -v } else { v };
        match op {
            "auto_contrast" => auto_contrast(img),
            "equalize" => equalize(img),
            "invert" => map(img, |v| 255.0 - v),
            "rotate" => {
                let deg = signed(level * 30.0);
                rotate(&img, deg)
            }
            "posterize" => {
                let bits = (level * 4.0) as u32;
                let shift = 8u32.saturating_sub(bits.min(8));
                map(img, |v| (((v as u32) >> shift) << shift) as f32)
            }
            "solarize" => {
                let t = (level * 256.0) as i64 as f32;
                map(img, |v| if v < t { v } else { 255.0 - v })
            }
            "solarize_add" => {
                let add = (level * 110.0) as i64 as f32;
                map(img, |v| if v < 128.0 { (v + add).clamp(0.0, 255.0) } else { v })
            }
            "color" => {
                let grey = grey_image(&img);
                blend(&grey, img, enhance)
            }
            "contrast" => {
                let grey = grey_image(&img);
                let mean = (grey.data.iter().map(|&v| v as f64).sum::<f64>() / grey.data.len().max(1) as f64) as f32;
                let flat = map(img.clone(), |_| mean.clamp(0.0, 255.0).trunc());
                blend(&flat, img, enhance)
            }
            "brightness" => {
                let black = map(img.clone(), |_| 0.0);
                blend(&black, img, enhance)
            }
            "sharpness" => {
                let smooth = smooth(&img);
                blend(&smooth, img, enhance)
            }
            "shear_x" => {
                let s = signed(level * 0.3);
                affine(&img, [1.0, s, 0.0, 0.0, 1.0, 0.0])
            }
            "shear_y" => {
                let s = signed(level * 0.3);
                affine(&img, [1.0, 0.0, 0.0, s, 1.0, 0.0])
            }
            "translate_x" => {
                let t = signed(level * self.translate);
                affine(&img, [1.0, 0.0, -t, 0.0, 1.0, 0.0])
            }
            "translate_y" => {
                let t = signed(level * self.translate);
                affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, -t])
            }
            "cutout" => {
                let pad = (level * self.cutout) as usize;
                let cy = rng.below(img.height);
                let cx = rng.below(img.width);
                cutout(img, cy, cx, pad)
            }
            other => unreachable!("not a RandAugment op: {other}"),
        }
    }
}

/// Rounds and clamps to whole numbers in [0, 255] (what a uint8 image holds).
fn quantise(img: Image<f32>) -> Image<f32> {
    map(img, |v| v.round().clamp(0.0, 255.0))
}

fn map(mut img: Image<f32>, f: impl Fn(f32) -> f32) -> Image<f32> {
    img.data.iter_mut().for_each(|v| *v = f(*v));
    img
}

/// `degenerate + factor · (img − degenerate)`, clamped to [0, 255] and truncated (TF `blend`).
fn blend(degenerate: &Image<f32>, img: Image<f32>, factor: f64) -> Image<f32> {
    let f = factor as f32;
    let mut out = img;
    for (o, &d) in out.data.iter_mut().zip(&degenerate.data) {
        *o = (d + f * (*o - d)).clamp(0.0, 255.0).trunc();
    }
    out
}

/// The greyscale of `img` (ITU-R 601 weights, as `tf.image.rgb_to_grayscale`), truncated to
/// whole numbers and repeated over the channels; a grey image is itself.
fn grey_image(img: &Image<f32>) -> Image<f32> {
    if img.channels != 3 {
        return img.clone();
    }
    let mut out = img.clone();
    for px in out.data.chunks_exact_mut(3) {
        let g = (0.2989 * px[0] + 0.587 * px[1] + 0.114 * px[2]).trunc();
        px.fill(g);
    }
    out
}

/// Per channel, stretches [min, max] onto [0, 255] (unchanged where max = min).
fn auto_contrast(mut img: Image<f32>) -> Image<f32> {
    let c = img.channels;
    for ch in 0..c {
        let vals = img.data.iter().skip(ch).step_by(c);
        let (lo, hi) = vals.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        if hi > lo {
            let scale = 255.0 / (hi - lo);
            for v in img.data.iter_mut().skip(ch).step_by(c) {
                *v = ((*v - lo) * scale).clamp(0.0, 255.0).trunc();
            }
        }
    }
    img
}

/// Per channel histogram equalisation, as PIL's `ImageOps.equalize` (and TF's port of it).
fn equalize(mut img: Image<f32>) -> Image<f32> {
    let c = img.channels;
    for ch in 0..c {
        let mut hist = [0usize; 256];
        for &v in img.data.iter().skip(ch).step_by(c) {
            hist[v.clamp(0.0, 255.0) as usize] += 1;
        }
        let nonzero: Vec<usize> = hist.iter().copied().filter(|&h| h > 0).collect();
        let step = (nonzero.iter().sum::<usize>() - nonzero.last().copied().unwrap_or(0)) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0f32; 256];
        let mut acc = step / 2;
        for (i, h) in hist.iter().enumerate() {
            lut[i] = (acc / step).min(255) as f32;
            acc += h;
        }
        for v in img.data.iter_mut().skip(ch).step_by(c) {
            *v = lut[v.clamp(0.0, 255.0) as usize];
        }
    }
    img
}

/// The 3×3 smoothing of PIL's sharpness filter (`[[1,1,1],[1,5,1],[1,1,1]] / 13`) on interior
/// pixels, rounded; border pixels keep their values.
fn smooth(img: &Image<f32>) -> Image<f32> {
    let (h, w, c) = (img.height, img.width, img.channels);
    let mut out = img.clone();
    if h < 3 || w < 3 {
        return out;
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for k in 0..c {
                let mut s = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let wgt = if dy == 1 && dx == 1 { 5.0 } else { 1.0 };
                        s += wgt * img.data[((y + dy - 1) * w + x + dx - 1) * c + k];
                    }
                }
                out.data[(y * w + x) * c + k] = (s / 13.0).round().clamp(0.0, 255.0);
            }
        }
    }
    out
}

/// Output pixel `(x, y)` takes the input pixel nearest to `(a0·x + a1·y + a2, b0·x + b1·y + b2)`
/// (TF `contrib.image.transform`'s convention), grey outside.
fn affine(img: &Image<f32>, [a0, a1, a2, b0, b1, b2]: [f64; 6]) -> Image<f32> {
    let (h, w, c) = (img.height, img.width, img.channels);
    let mut out = Image { height: h, width: w, channels: c, data: vec![FILL; h * w * c] };
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let sx = (a0 * xf + a1 * yf + a2).round();
            let sy = (b0 * xf + b1 * yf + b2).round();
            if sx >= 0.0 && sy >= 0.0 && (sx as usize) < w && (sy as usize) < h {
                let (src, dst) = (((sy as usize) * w + sx as usize) * c, (y * w + x) * c);
                out.data[dst..dst + c].copy_from_slice(&img.data[src..src + c]);
            }
        }
    }
    out
}

/// Rotation by `degrees` about the image centre (RandAugment draws the sign).
fn rotate(img: &Image<f32>, degrees: f64) -> Image<f32> {
    let r = degrees.to_radians();
    let (cos, sin) = (r.cos(), r.sin());
    let (cx, cy) = ((img.width as f64 - 1.0) / 2.0, (img.height as f64 - 1.0) / 2.0);
    // Inverse map: input = R(-θ)·(output − centre) + centre, with y pointing down.
    affine(img, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])
}

/// Fills the square of half-side `pad` around `(cy, cx)` (clipped to the image) with grey.
fn cutout(mut img: Image<f32>, cy: usize, cx: usize, pad: usize) -> Image<f32> {
    let (w, c) = (img.width, img.channels);
    let (y0, y1) = (cy.saturating_sub(pad), (cy + pad).min(img.height));
    let (x0, x1) = (cx.saturating_sub(pad), (cx + pad).min(w));
    for y in y0..y1 {
        img.data[(y * w + x0) * c..(y * w + x1) * c].fill(FILL);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(magnitude: f64) -> RandAugment {
        RandAugment { num_layers: 2, magnitude, translate: 100.0, cutout: 40.0 }
    }

    /// A 4×5 grey image with values 0, 10, 20, ... row by row.
    fn ramp() -> Image<f32> {
        Image { height: 4, width: 5, channels: 1, data: (0..20).map(|i| (i * 10) as f32).collect() }
    }

    fn random_rgb(h: usize, w: usize, seed: u64) -> Image<f32> {
        let mut r = Rng::new(seed);
        Image { height: h, width: w, channels: 3, data: (0..h * w * 3).map(|_| r.below(256) as f32).collect() }
    }

    fn op(name: &str, magnitude: f64, img: Image<f32>) -> Image<f32> {
        ra(magnitude).apply_op(name, img, &mut Rng::new(0))
    }

    #[test]
    fn pixel_ops_follow_their_definitions() {
        let img = ramp();
        assert_eq!(op("invert", 10.0, img.clone()).data, img.data.iter().map(|v| 255.0 - v).collect::<Vec<_>>());
        // Level 5: solarize from 128 on; posterize keeps 2 bits (multiples of 64); solarize_add
        // adds 55 below 128.
        let s = op("solarize", 5.0, img.clone());
        assert_eq!((s.data[12], s.data[13]), (120.0, 255.0 - 130.0));
        let p = op("posterize", 5.0, img.clone());
        assert!(p.data.iter().zip(&img.data).all(|(&q, &v)| q == ((v as u32) & 0xc0) as f32), "{:?}", p.data);
        let a = op("solarize_add", 5.0, img.clone());
        assert_eq!((a.data[0], a.data[12], a.data[13]), (55.0, 175.0, 130.0));
        // Brightness at level 0 blends 0.1 of the image onto black.
        let b = op("brightness", 0.0, img.clone());
        assert_eq!(b.data[19], (190.0f32 * 0.1).trunc());
        // Auto-contrast stretches [0, 190] to [0, 255].
        let ac = op("auto_contrast", 10.0, img.clone());
        assert_eq!((ac.data[0], ac.data[19]), (0.0, 255.0));
        // Equalize: too few pixels for PIL's step (20 / 255 = 0) leave the image as it is; 64
        // values 16 times each spread over the whole range, in the same order.
        assert_eq!(op("equalize", 10.0, img.clone()).data, img.data);
        let many = Image { height: 32, width: 32, channels: 1, data: (0..1024).map(|i| (i % 64) as f32).collect() };
        let eq = op("equalize", 10.0, many.clone());
        assert_eq!(eq.data[0], 0.0);
        assert_eq!(eq.data[1], ((3 / 2 + 16) / 3) as f32, "lut[1] = (step/2 + 16) / step with step 3");
        assert_eq!(eq.data[63], 255.0);
        assert!(eq.data[..64].windows(2).all(|w| w[0] <= w[1]), "{:?}", &eq.data[..64]);
        // Colour on a grey image changes nothing but the factor's clamp.
        let g = op("color", 10.0, img.clone());
        assert_eq!(g.data, img.data.iter().map(|v| v.min(255.0)).collect::<Vec<_>>());
    }

    #[test]
    fn geometric_ops_move_pixels_and_fill_with_grey() {
        let img = ramp();
        // Translate by ±5 pixels (translate = 10 at level 5): the image leaves a 5-wide grey band.
        let t = RandAugment { translate: 10.0, ..ra(5.0) };
        let out = t.apply_op("translate_x", img.clone(), &mut Rng::new(1));
        assert!(out.data.iter().all(|&v| v == FILL), "a 5-wide shift of a 5-wide image is all grey");
        let t = RandAugment { translate: 2.0, ..ra(5.0) };
        for seed in 0..4 {
            let out = t.apply_op("translate_y", img.clone(), &mut Rng::new(seed));
            // One row moved up or down; the other rows are the neighbours' values.
            let up = out.data[..5] == img.data[5..10] && out.data[15..].iter().all(|&v| v == FILL);
            let down = out.data[5..10] == img.data[..5] && out.data[..5].iter().all(|&v| v == FILL);
            assert!(up || down, "seed {seed}: {:?}", out.data);
        }
        // Shear x keeps row 0 (y = 0) and rotation by level 0 is the identity.
        let sh = op("shear_x", 10.0, img.clone());
        assert_eq!(sh.data[..5], img.data[..5]);
        assert_eq!(op("rotate", 0.0, img.clone()).data, img.data);
        // Rotating a square by 30° keeps its centre pixel and greys a corner.
        let sq = Image { height: 5, width: 5, channels: 1, data: (0..25).map(|i| i as f32).collect() };
        let r = op("rotate", 10.0, sq.clone());
        assert_eq!(r.data[12], 12.0);
        assert!([r.data[0], r.data[4], r.data[20], r.data[24]].contains(&FILL), "{:?}", r.data);
        // Cutout: a grey square of side 2·pad around a random centre, clipped.
        let big = random_rgb(16, 16, 3);
        let c = RandAugment { cutout: 4.0, ..ra(10.0) }.apply_op("cutout", big.clone(), &mut Rng::new(2));
        let grey = c.data.chunks(3).zip(big.data.chunks(3)).filter(|(o, i)| o != i).count();
        assert!(grey > 0 && grey <= 64 && c.data.chunks(3).filter(|p| p == &[FILL; 3]).count() >= grey, "{grey}");
    }

    #[test]
    fn randaug_draws_every_op_keeps_the_shape_and_whole_pixels_and_is_deterministic() {
        let img = random_rgb(12, 12, 0);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..400 {
            let mut r = Rng::new(seed);
            seen.insert(OPS[r.below(OPS.len())]);
            let a = ra(10.0).apply(img.clone(), &mut Rng::new(seed));
            assert_eq!((a.height, a.width, a.channels, a.data.len()), (12, 12, 3, img.data.len()));
            assert!(a.data.iter().all(|&v| (0.0..=255.0).contains(&v) && v.fract() == 0.0), "seed {seed}");
            assert_eq!(a, ra(10.0).apply(img.clone(), &mut Rng::new(seed)), "seed {seed}");
        }
        assert_eq!(seen.len(), OPS.len());
        // Every op by name, both signs: shape kept, values whole and in range.
        for name in OPS {
            for seed in 0..2 {
                let out = ra(7.0).apply_op(name, img.clone(), &mut Rng::new(seed));
                assert_eq!(out.data.len(), img.data.len(), "{name}");
                assert!(out.data.iter().all(|&v| (0.0..=255.0).contains(&v) && v.fract() == 0.0), "{name}");
            }
        }
        // Zero layers: only the rounding to whole pixels.
        let none = RandAugment { num_layers: 0, ..ra(10.0) }.apply(map(img.clone(), |v| v + 0.4), &mut Rng::new(0));
        assert_eq!(none.data, img.data);
        // The level matters: geometric ops, cutout and solarize_add change more at level 10
        // than at level 2; the blend ops are the identity at level 5 (factor 1.0).
        // A smooth image, so that a small shift changes little.
        let smooth_img = Image {
            height: 12,
            width: 12,
            channels: 3,
            data: (0..432).map(|i| ((i / 3) % 12 * 10 + (i / 36) * 5 + i % 3) as f32).collect(),
        };
        let diff_on = |img: &Image<f32>, name: &str, m: f64| -> f64 {
            (0..20)
                .map(|s| {
                    let o = ra(m).apply_op(name, img.clone(), &mut Rng::new(s));
                    o.data.iter().zip(&img.data).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
                })
                .sum()
        };
        let diff = |name: &str, m: f64| diff_on(&smooth_img, name, m);
        let big = RandAugment { translate: 10.0, cutout: 5.0, ..ra(0.0) };
        let diff_t = |name: &str, m: f64| -> f64 {
            (0..20)
                .map(|s| {
                    let o = RandAugment { magnitude: m, ..big }.apply_op(name, smooth_img.clone(), &mut Rng::new(s));
                    o.data.iter().zip(&smooth_img.data).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
                })
                .sum()
        };
        for name in ["rotate", "shear_x", "shear_y", "solarize_add"] {
            assert!(diff(name, 10.0) > diff(name, 2.0), "{name}: {} vs {}", diff(name, 10.0), diff(name, 2.0));
        }
        for name in ["translate_x", "translate_y", "cutout"] {
            assert!(diff_t(name, 10.0) > diff_t(name, 2.0), "{name}");
        }
        for name in ["color", "contrast", "brightness", "sharpness"] {
            assert_eq!(diff_on(&img, name, 5.0), 0.0, "{name}");
            assert!(diff_on(&img, name, 10.0) > 0.0, "{name}");
        }
    }

    #[test]
    fn a_config_lists_randaug_as_an_op_and_bad_settings_are_errors() {
        use crate::{Pipeline, Transform};
        #[derive(serde::Deserialize)]
        struct Cfg {
            pp: Pipeline,
        }
        let cfg: Cfg = toml::from_str(
            r#"pp = [{ op = "randaug", num_layers = 2, magnitude = 10 }, { op = "value_range", min = -1, max = 1 }]"#,
        )
        .unwrap();
        cfg.pp.validate().unwrap();
        let img = Image { height: 8, width: 8, channels: 1, data: (0..64u8).map(|i| i * 3).collect() };
        let out = cfg.pp.apply(&img, &mut Rng::new(4)).unwrap();
        assert!(out.data.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(out, cfg.pp.apply(&img, &mut Rng::new(4)).unwrap());
        let t: Transform = toml::from_str("op = \"randaug\"\nmagnitude = 9").unwrap();
        assert_eq!(t, Transform::Randaug { num_layers: 2, magnitude: 9.0, translate: 100.0, cutout: 40.0 });
        for (text, needle) in [
            ("op = \"randaug\"\nmagnitude = 40", "magnitude"),
            ("op = \"randaug\"\nmagnitude = 5\ncutout = -1", "cutout"),
        ] {
            let t: Transform = toml::from_str(text).unwrap();
            let e = t.validate().unwrap_err().to_string();
            assert!(e.contains("randaug") && e.contains(needle), "{e}");
        }
        assert!(toml::from_str::<Transform>("op = \"randaug\"").is_err(), "magnitude is required");
    }
}
