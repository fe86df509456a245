//! V-MoE dispatch and combine over the expert buffers, the reference of
//! `kernels/moe_dispatch.cu` (maps checked by the ops layer: they come from the routing op).

use super::zeroed;

/// `out [rows, d]`: row r is `x[slot_src[r] / k]`, or zeros where `slot_src[r] < 0`.
pub(crate) fn moe_dispatch(x: &[f32], slot_src: &[i32], d: usize, k: usize) -> Vec<f32> {
    let mut out = zeroed(slot_src.len() * d);
    for (row, &a) in out.chunks_mut(d.max(1)).zip(slot_src) {
        if a >= 0 {
            let t = a as usize / k;
            row.copy_from_slice(&x[t * d..(t + 1) * d]);
        }
    }
    out
}

/// `y [s, d]`: `y[t] = Σ_j w[t, j]·src[pos[t, j]]` over the kept assignments (j ascending, f32;
/// every weight 1 without `weight`).
pub(crate) fn moe_combine(src: &[f32], pos: &[i32], weight: Option<&[f32]>, d: usize, k: usize) -> Vec<f32> {
    let s = pos.len() / k.max(1);
    let mut y = zeroed(s * d);
    for (t, yr) in y.chunks_mut(d.max(1)).enumerate() {
        for j in 0..k {
            let p = pos[t * k + j];
            if p < 0 {
                continue;
            }
            let row = &src[p as usize * d..(p as usize + 1) * d];
            match weight {
                Some(w) => yr.iter_mut().zip(row).for_each(|(o, v)| *o += w[t * k + j] * v),
                None => yr.iter_mut().zip(row).for_each(|(o, v)| *o += v),
            }
        }
    }
    y
}

/// `dsrc [rows, d]`: row r is `w[a]·dy[a / k]` for `a = slot_src[r]`, zeros where empty.
pub(crate) fn moe_scale_rows(dy: &[f32], slot_src: &[i32], weight: &[f32], d: usize, k: usize) -> Vec<f32> {
    let mut out = zeroed(slot_src.len() * d);
    for (row, &a) in out.chunks_mut(d.max(1)).zip(slot_src) {
        if a >= 0 {
            let (t, w) = (a as usize / k, weight[a as usize]);
            row.iter_mut().zip(&dy[t * d..(t + 1) * d]).for_each(|(o, v)| *o = w * v);
        }
    }
    out
}

/// `dw [s, k]`: `⟨dy[t], src[pos[t, j]]⟩` (f64 sum rounded to f32), 0 where dropped.
pub(crate) fn moe_combine_dweight(dy: &[f32], src: &[f32], pos: &[i32], d: usize, k: usize) -> Vec<f32> {
    pos.iter()
        .enumerate()
        .map(|(a, &p)| {
            if p < 0 {
                return 0.0;
            }
            let t = a / k;
            let dyr = &dy[t * d..(t + 1) * d];
            let row = &src[p as usize * d..(p as usize + 1) * d];
            dyr.iter().zip(row).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() as f32
        })
        .collect()
}
