//! Image <-> patch layout changes.

use super::zeroed;

/// `[batch, channels, height, width]` images cut into `p × p` patches.
struct Grid {
    c: usize,
    h: usize,
    w: usize,
    p: usize,
}

impl Grid {
    /// Index of pixel `(b, c, y, x)` in the image layout and of the same value in the patch layout.
    fn positions(&self, b: usize, c: usize, y: usize, x: usize) -> (usize, usize) {
        let Grid { c: ch, h, w, p } = *self;
        let (gh, gw) = (h / p, w / p);
        let img = ((b * ch + c) * h + y) * w + x;
        let patch = (y / p) * gw + x / p;
        let feat = (c * p + y % p) * p + x % p;
        (img, (b * gh * gw + patch) * (ch * p * p) + feat)
    }

    /// Calls `f(image index, patch index)` for every element of `b` images.
    fn for_each(&self, b: usize, mut f: impl FnMut(usize, usize)) {
        for bi in 0..b {
            for ci in 0..self.c {
                for y in 0..self.h {
                    for x in 0..self.w {
                        let (i, o) = self.positions(bi, ci, y, x);
                        f(i, o);
                    }
                }
            }
        }
    }
}

pub(crate) fn patchify(img: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let mut out = zeroed(img.len());
    Grid { c, h, w, p }.for_each(b, |i, o| out[o] = img[i]);
    out
}

pub(crate) fn unpatchify(patches: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let mut out = zeroed(patches.len());
    Grid { c, h, w, p }.for_each(b, |i, o| out[i] = patches[o]);
    out
}
