//! Random erasing (Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data Augmentation", AAAI
//! 2020): with probability `p`, one random box of the image is overwritten, so the model
//! cannot lean on any one region. Config op `random_erasing` ([`crate::Transform`]).
//!
//! The paper's Algorithm 1 draws the box's area as a fraction of the image, uniform in
//! `[0.02, 0.4]`, and its aspect ratio in `[0.3, 1/0.3]`, and retries until the box fits; it
//! fills it with random values. As timm, this draws the aspect ratio log-uniformly (so tall
//! and wide boxes are equally likely) and gives up after 10 tries; the box sampler is the one
//! of the inception crop ([`crate::augment::Transform::InceptionCrop`]).

use crate::augment::{sample_box, Rng};
use crate::Image;

/// The paper's default smallest area fraction of the erased box.
pub const AREA_MIN: f64 = 0.02;
/// The paper's default largest area fraction of the erased box.
pub const AREA_MAX: f64 = 0.4;
/// The paper's default smallest aspect ratio (width / height); the largest is its inverse.
pub const ASPECT_MIN: f64 = 0.3;

/// What the erased box is filled with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// Every value of the box set to this one (e.g. 0, or the dataset mean).
    Value(f32),
    /// Every value (each channel of each pixel) drawn uniformly from `[lo, hi]`, as in the
    /// paper (`[0, 255]` on raw pixels).
    Noise(f32, f32),
}

/// The random-erasing op; settings are checked by [`crate::Transform::validate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomErasing {
    /// Probability that an image gets a box.
    pub p: f64,
    /// Range of the box's area as a fraction of the image's.
    pub area: (f64, f64),
    /// Range of the box's aspect ratio, width / height.
    pub aspect: (f64, f64),
    /// The box's new values.
    pub fill: Fill,
}

impl RandomErasing {
    /// The box `(top, left, height, width)` that this draw erases, or `None` for an image left
    /// as it is. Always draws the coin first, then (if it says erase) the box, then the fill.
    pub fn sample(&self, height: usize, width: usize, rng: &mut Rng) -> Option<(usize, usize, usize, usize)> {
        if !rng.bernoulli(self.p) {
            return None;
        }
        sample_box(height, width, self.area, self.aspect, rng)
    }

    /// `img` (HWC) with at most one box overwritten.
    pub fn apply(&self, mut img: Image<f32>, rng: &mut Rng) -> Image<f32> {
        let Some((top, left, h, w)) = self.sample(img.height, img.width, rng) else {
            return img;
        };
        let c = img.channels;
        for y in top..top + h {
            let row = (y * img.width + left) * c;
            for v in &mut img.data[row..row + w * c] {
                *v = match self.fill {
                    Fill::Value(x) => x,
                    Fill::Noise(lo, hi) => rng.range(f64::from(lo), f64::from(hi)) as f32,
                };
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Transform;

    /// A 20 × 30 image of 2 channels whose every value is distinct and above 1,000, so no fill
    /// value in the tests can equal an original one.
    fn image() -> Image<f32> {
        let (h, w, c) = (20, 30, 2);
        Image::new(h, w, c, (0..h * w * c).map(|i| 1_000.0 + i as f32).collect()).unwrap()
    }

    fn paper(fill: Fill, p: f64) -> RandomErasing {
        RandomErasing { p, area: (AREA_MIN, AREA_MAX), aspect: (ASPECT_MIN, 1.0 / ASPECT_MIN), fill }
    }

    /// The bounding box `(top, left, height, width)` of the pixels that differ, checking that
    /// they fill it: erasing changes exactly one rectangle, every channel of it.
    fn changed_box(before: &Image<f32>, after: &Image<f32>) -> Option<(usize, usize, usize, usize)> {
        let c = before.channels;
        let changed: Vec<(usize, usize)> = (0..before.height)
            .flat_map(|y| (0..before.width).map(move |x| (y, x)))
            .filter(|&(y, x)| {
                let i = (y * before.width + x) * c;
                let diff: Vec<bool> = (0..c).map(|k| before.data[i + k] != after.data[i + k]).collect();
                assert!(diff.iter().all(|d| *d == diff[0]), "pixel ({y}, {x}) changed in some channels only");
                diff[0]
            })
            .collect();
        let (y0, y1) = (changed.iter().map(|p| p.0).min()?, changed.iter().map(|p| p.0).max()?);
        let (x0, x1) = (changed.iter().map(|p| p.1).min()?, changed.iter().map(|p| p.1).max()?);
        let (h, w) = (y1 - y0 + 1, x1 - x0 + 1);
        assert_eq!(changed.len(), h * w, "the changed pixels are not one filled rectangle");
        Some((y0, x0, h, w))
    }

    #[test]
    fn erases_one_box_of_the_drawn_size_and_nothing_else() {
        let op = paper(Fill::Noise(0.0, 255.0), 1.0);
        let original = image();
        let mut erased = 0;
        for seed in 0..300 {
            // The box the op reports is the box that changed.
            let expected = op.sample(20, 30, &mut Rng::new(seed));
            let out = op.apply(original.clone(), &mut Rng::new(seed));
            assert_eq!((out.height, out.width, out.channels), (20, 30, 2));
            let got = changed_box(&original, &out);
            assert_eq!(got, expected, "seed {seed}");
            let Some((top, left, h, w)) = got else { continue };
            erased += 1;
            // Area within the range up to the rounding of each side to whole pixels.
            let frac = (h * w) as f64 / 600.0;
            let (lo, hi) = (AREA_MIN * 0.5, AREA_MAX * 1.25);
            assert!((lo..=hi).contains(&frac), "seed {seed}: area fraction {frac}");
            assert!(top + h <= 20 && left + w <= 30);
            // The noise is in range.
            for y in top..top + h {
                for v in &out.data[(y * 30 + left) * 2..(y * 30 + left + w) * 2] {
                    assert!((0.0..=255.0).contains(v), "seed {seed}: fill {v}");
                }
            }
        }
        // With p = 1 almost every draw fits in 10 tries on a 20 × 30 image.
        assert!(erased >= 290, "only {erased} of 300 images erased");
    }

    #[test]
    fn probability_and_constant_fill() {
        let original = image();
        // p = 0: untouched, and the coin is the only draw.
        let mut rng = Rng::new(5);
        assert_eq!(paper(Fill::Value(0.0), 0.0).apply(original.clone(), &mut rng), original);
        let mut one_draw = Rng::new(5);
        one_draw.next_u64();
        assert_eq!(rng, one_draw);
        // p = 0.5: about half of the images (1,000 draws, ±5 standard deviations).
        let op = paper(Fill::Value(-3.5), 0.5);
        let n = (0..1000).filter(|&s| op.apply(original.clone(), &mut Rng::new(s)) != original).count();
        assert!((420..=580).contains(&n), "{n} of 1,000 images erased at p = 0.5");
        // A constant fill writes exactly that value over the box.
        let op = paper(Fill::Value(-3.5), 1.0);
        let out = op.apply(original.clone(), &mut Rng::new(11));
        let (top, left, h, w) = changed_box(&original, &out).expect("p = 1 erased nothing");
        for y in top..top + h {
            assert!(out.data[(y * 30 + left) * 2..(y * 30 + left + w) * 2].iter().all(|&v| v == -3.5));
        }
    }

    #[test]
    fn aspect_ratios_cover_the_range_and_stay_inside_it() {
        // Large boxes on a big image: sides round to whole pixels with little error.
        let op = RandomErasing { p: 1.0, area: (0.1, 0.2), aspect: (0.5, 2.0), fill: Fill::Value(0.0) };
        let (mut tall, mut wide) = (0, 0);
        for seed in 0..500 {
            let (_, _, h, w) = op.sample(200, 200, &mut Rng::new(seed)).expect("fits");
            let ratio = w as f64 / h as f64;
            assert!((0.48..=2.08).contains(&ratio), "seed {seed}: aspect {ratio}");
            let frac = (h * w) as f64 / 40_000.0;
            assert!((0.095..=0.205).contains(&frac), "seed {seed}: area {frac}");
            tall += usize::from(ratio < 0.8);
            wide += usize::from(ratio > 1.25);
        }
        // Log-uniform: as many tall boxes as wide ones, each about a third of the draws.
        assert!(tall > 120 && wide > 120, "{tall} tall and {wide} wide boxes of 500");
    }

    #[test]
    fn config_op_defaults_determinism_and_errors() {
        #[derive(serde::Deserialize)]
        struct Cfg {
            pp: crate::Pipeline,
        }
        let cfg: Cfg =
            toml::from_str(r#"pp = [{ op = "random_erasing" }, { op = "erase", p = 1, value = 0 }]"#).unwrap();
        assert_eq!(
            cfg.pp.ops[0],
            Transform::RandomErasing {
                p: 0.5,
                area_min: AREA_MIN,
                area_max: AREA_MAX,
                aspect_min: ASPECT_MIN,
                aspect_max: 1.0 / ASPECT_MIN,
                value: None,
                noise: [0.0, 255.0],
            }
        );
        cfg.pp.validate().unwrap();
        assert_eq!(cfg.pp.ops[0].name(), "random_erasing");
        // The same generator gives the same bits; the op draws from it.
        let u8_image = Image::new(28, 28, 1, (0..784).map(|i| (i % 251) as u8).collect()).unwrap();
        let a = cfg.pp.apply(&u8_image, &mut Rng::new(3)).unwrap();
        assert_eq!(a, cfg.pp.apply(&u8_image, &mut Rng::new(3)).unwrap());
        assert_ne!(a, u8_image.to_f32(), "p = 1 in the second op erases a box");

        for (toml, needle) in [
            (r#"pp = [{ op = "random_erasing", p = 1.5 }]"#, "p must be in [0, 1], got 1.5"),
            (r#"pp = [{ op = "random_erasing", area_min = 0.5, area_max = 0.2 }]"#, "got 0.5 and 0.2"),
            (r#"pp = [{ op = "random_erasing", area_max = 1.5 }]"#, "area_max ≤ 1, got 0.02 and 1.5"),
            (r#"pp = [{ op = "random_erasing", aspect_min = 0 }]"#, "0 < aspect_min"),
            (r#"pp = [{ op = "random_erasing", noise = [1, 0] }]"#, "lo ≤ hi, got [1, 0]"),
            (r#"pp = [{ op = "random_erasing", value = nan }]"#, "value must be finite, got NaN"),
        ] {
            let cfg: Cfg = toml::from_str(toml).unwrap();
            let err = cfg.pp.validate().unwrap_err().to_string();
            assert!(err.contains("random_erasing") && err.contains(needle), "{toml}: {err}");
        }
        assert!(toml::from_str::<Cfg>(r#"pp = [{ op = "random_erasing", prob = 0.5 }]"#).is_err());
    }
}
