//! Row gather and scatter-add (indices already checked by the ops layer).

use super::zeroed;

pub(crate) fn gather_rows(src: &[f32], idx: &[i32], d: usize) -> Vec<f32> {
    let mut out = zeroed(idx.len() * d);
    for (row, &i) in out.chunks_mut(d.max(1)).zip(idx) {
        if i >= 0 {
            row.copy_from_slice(&src[i as usize * d..(i as usize + 1) * d]);
        }
    }
    out
}

pub(crate) fn scatter_add_rows(src: &[f32], idx: &[i32], n: usize, d: usize) -> Vec<f32> {
    let mut out = zeroed(n * d);
    for (row, &i) in src.chunks(d.max(1)).zip(idx) {
        if i >= 0 {
            out[i as usize * d..(i as usize + 1) * d].iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
    }
    out
}
