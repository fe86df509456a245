//! Image <-> patch layout changes.

/// Index of pixel `(b, c, y, x)` and of the same value in the patch layout.
fn positions(b: usize, c: usize, y: usize, x: usize, ch: usize, h: usize, w: usize, p: usize) -> (usize, usize) {
    let (gh, gw) = (h / p, w / p);
    let img = ((b * ch + c) * h + y) * w + x;
    let patch = (y / p) * gw + x / p;
    let feat = (c * p + y % p) * p + x % p;
    (img, (b * gh * gw + patch) * (ch * p * p) + feat)
}

pub(crate) fn patchify(img: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; img.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let (i, o) = positions(bi, ci, y, x, c, h, w, p);
                    out[o] = img[i];
                }
            }
        }
    }
    out
}

pub(crate) fn unpatchify(patches: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; patches.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let (i, o) = positions(bi, ci, y, x, c, h, w, p);
                    out[i] = patches[o];
                }
            }
        }
    }
    out
}
