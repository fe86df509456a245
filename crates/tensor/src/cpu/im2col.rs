//! im2col and col2im on channels-last images (`ops::im2col`; `kernels/im2col.cu` computes the
//! same values, and col2im's sums in the same order).

use super::zeroed;
use crate::ops::ConvWindow;
use rayon::prelude::*;

/// Calls `f(position, window element, pixel)` for every window element of every output
/// position of one image that reads a pixel (not the padding), positions in row-major order and
/// window elements `(ky, kx)` row-major within each: `position` indexes `[oh·ow]`, `element`
/// `[k·k]` and `pixel` `[h·w]`.
fn for_each_read(win: ConvWindow, [h, w]: [usize; 2], mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow, k) = (win.out_side(h).unwrap_or(0), win.out_side(w).unwrap_or(0), win.kernel);
    for oy in 0..oh {
        for ox in 0..ow {
            for ky in 0..k {
                let Some(y) = (oy * win.stride + ky).checked_sub(win.pad).filter(|&y| y < h) else { continue };
                for kx in 0..k {
                    if let Some(x) = (ox * win.stride + kx).checked_sub(win.pad).filter(|&x| x < w) {
                        f(oy * ow + ox, ky * k + kx, y * w + x);
                    }
                }
            }
        }
    }
}

/// `x [b, h, w, c]` to `[b, oh·ow, k·k·c]`; shapes checked by the caller.
pub(crate) fn im2col(x: &[f32], [b, h, w, c]: [usize; 4], win: ConvWindow) -> Vec<f32> {
    let positions = win.out_side(h).unwrap_or(0) * win.out_side(w).unwrap_or(0);
    let feat = win.kernel * win.kernel * c;
    let mut out = zeroed(b * positions * feat);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(positions * feat).zip(x.par_chunks(h * w * c)).for_each(|(cols, img)| {
        for_each_read(win, [h, w], |pos, e, pixel| {
            cols[pos * feat + e * c..][..c].copy_from_slice(&img[pixel * c..][..c]);
        });
    });
    out
}

/// `cols [b, oh·ow, k·k·c]` to `[b, h, w, c]`: each pixel sums the column elements that read
/// it in the order of their output positions (so `(ky, kx)` descending); shapes checked by the
/// caller.
pub(crate) fn col2im(cols: &[f32], [b, h, w, c]: [usize; 4], win: ConvWindow) -> Vec<f32> {
    let positions = win.out_side(h).unwrap_or(0) * win.out_side(w).unwrap_or(0);
    let feat = win.kernel * win.kernel * c;
    let mut out = zeroed(b * h * w * c);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(h * w * c).zip(cols.par_chunks(positions * feat)).for_each(|(img, col)| {
        for_each_read(win, [h, w], |pos, e, pixel| {
            for (d, s) in img[pixel * c..][..c].iter_mut().zip(&col[pos * feat + e * c..][..c]) {
                *d += s;
            }
        });
    });
    out
}
