//! The algorithm of `kernels/flash_attention.cu` in plain Rust, in the kernel's tile order, so CI
//! can check it without a GPU: the block-wise online-softmax forward (exp2 domain with the scale
//! folded in, running max and sum rescaled block by block) and the FlashAttention-2 backward
//! recurrence (`delta_i = rowsum(dO∘O)`, `dS = P∘(dP − delta)`, dQ summed over key blocks in
//! order, dK/dV over query blocks in order). Tested against the reference `cpu::attention_*`.
//! Slabs are `[bh, tokens, head_dim]` f32 like the reference; f32 arithmetic throughout (the
//! kernel rounds P and dS to its 16-bit operand type, which this mirror does not model).

/// Queries per block of the forward and dq kernels.
const FLASH_BLOCK_Q: usize = 64;
/// Keys per block of the forward and dk/dv kernels.
const FLASH_BLOCK_K: usize = 64;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

/// Keys per step of the dq kernel for head dim `d` (its contraction padded to 16).
fn dq_block_k(d: usize) -> usize {
    if d.div_ceil(16) * 16 <= 96 {
        64
    } else {
        32
    }
}

/// Queries per step of the dk/dv kernel for head dim `d`.
fn dkdv_block_q(d: usize) -> usize {
    if d.div_ceil(16) * 16 <= 64 {
        64
    } else {
        32
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Forward: returns `(o [bh, n, d], lse [bh, n])` (natural-log lse, like the reference) for
/// `q [bh, n, d]`, `k, v [bh, m, d]`, `m ≥ 1`.
#[allow(clippy::too_many_arguments)]
fn flash_attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let c = scale * LOG2E;
    let mut o = vec![0.0f32; bh * n * d];
    let mut lse = vec![0.0f32; bh * n];
    for h in 0..bh {
        let (qh, kh, vh) = (&q[h * n * d..], &k[h * m * d..], &v[h * m * d..]);
        for q0 in (0..n).step_by(FLASH_BLOCK_Q) {
            let rows = FLASH_BLOCK_Q.min(n - q0);
            // Per row: running max (log2 units, scale folded in), running sum, accumulator.
            let mut mx = vec![f32::NEG_INFINITY; rows];
            let mut l = vec![0.0f32; rows];
            let mut acc = vec![0.0f32; rows * d];
            for j0 in (0..m).step_by(FLASH_BLOCK_K) {
                let cols = FLASH_BLOCK_K.min(m - j0);
                for r in 0..rows {
                    let qi = &qh[(q0 + r) * d..(q0 + r + 1) * d];
                    let s: Vec<f32> = (0..cols).map(|j| dot(qi, &kh[(j0 + j) * d..(j0 + j + 1) * d])).collect();
                    let block_max = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let mnew = mx[r].max(block_max * c);
                    let alpha = (mx[r] - mnew).exp2();
                    mx[r] = mnew;
                    let ar = &mut acc[r * d..(r + 1) * d];
                    ar.iter_mut().for_each(|x| *x *= alpha);
                    let mut sum = 0.0f32;
                    for (j, &sj) in s.iter().enumerate() {
                        let p = (sj * c - mnew).exp2();
                        sum += p;
                        for (a, &vv) in ar.iter_mut().zip(&vh[(j0 + j) * d..(j0 + j + 1) * d]) {
                            *a += p * vv;
                        }
                    }
                    l[r] = l[r] * alpha + sum;
                }
            }
            for r in 0..rows {
                let i = h * n + q0 + r;
                o[i * d..(i + 1) * d].iter_mut().zip(&acc[r * d..(r + 1) * d]).for_each(|(o, a)| *o = a / l[r]);
                lse[i] = mx[r] * LN2 + l[r].ln();
            }
        }
    }
    (o, lse)
}

/// Backward: returns `(dq, dk, dv)` from the forward's `o`, `lse` and the output gradient `d_o`,
/// with the kernels' three passes: delta, dq (per query block, key blocks in order), dk/dv (per
/// key block, query blocks in order). Deterministic by construction.
#[allow(clippy::too_many_arguments)]
fn flash_attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = scale * LOG2E;
    let mut dq = vec![0.0f32; bh * n * d];
    let mut dk = vec![0.0f32; bh * m * d];
    let mut dv = vec![0.0f32; bh * m * d];
    // delta_i = dO_i · O_i
    let delta: Vec<f32> = (0..bh * n).map(|i| dot(&d_o[i * d..(i + 1) * d], &o[i * d..(i + 1) * d])).collect();
    let row = |i: usize| i * d..(i + 1) * d;
    for h in 0..bh {
        let (qh, kh, vh, doh) = (&q[h * n * d..], &k[h * m * d..], &v[h * m * d..], &d_o[h * n * d..]);
        let (lh, dh) = (&lse[h * n..(h + 1) * n], &delta[h * n..(h + 1) * n]);
        // P_ij and dS_ij as the kernels recompute them.
        let p_ds = |i: usize, j: usize| {
            let s = dot(&qh[row(i)], &kh[row(j)]);
            let p = (s * c - lh[i] * LOG2E).exp2();
            let dp = dot(&doh[row(i)], &vh[row(j)]);
            (p, p * (dp - dh[i]))
        };
        // dq kernel: per query block, key blocks in order.
        let bk = dq_block_k(d);
        for q0 in (0..n).step_by(FLASH_BLOCK_Q) {
            for j0 in (0..m).step_by(bk) {
                for i in q0..(q0 + FLASH_BLOCK_Q).min(n) {
                    let out = &mut dq[(h * n + i) * d..(h * n + i + 1) * d];
                    for j in j0..(j0 + bk).min(m) {
                        let (_, ds) = p_ds(i, j);
                        out.iter_mut().zip(&kh[row(j)]).for_each(|(a, &kk)| *a += ds * kk);
                    }
                }
            }
            for i in q0..(q0 + FLASH_BLOCK_Q).min(n) {
                dq[(h * n + i) * d..(h * n + i + 1) * d].iter_mut().for_each(|x| *x *= scale);
            }
        }
        // dk/dv kernel: per key block, query blocks in order.
        let bq = dkdv_block_q(d);
        for k0 in (0..m).step_by(FLASH_BLOCK_K) {
            for i0 in (0..n).step_by(bq) {
                for j in k0..(k0 + FLASH_BLOCK_K).min(m) {
                    for i in i0..(i0 + bq).min(n) {
                        let (p, ds) = p_ds(i, j);
                        let (qi, doi) = (&qh[row(i)], &doh[row(i)]);
                        let base = (h * m + j) * d;
                        dv[base..base + d].iter_mut().zip(doi).for_each(|(a, &x)| *a += p * x);
                        dk[base..base + d].iter_mut().zip(qi).for_each(|(a, &x)| *a += ds * x);
                    }
                }
            }
            for j in k0..(k0 + FLASH_BLOCK_K).min(m) {
                dk[(h * m + j) * d..(h * m + j + 1) * d].iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cpu, DType, Device, Tensor};

    fn randn(len: usize, seed: u64) -> Vec<f32> {
        Tensor::randn([len], 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap().to_vec::<f32>().unwrap()
    }

    /// Max |a − b| / (1 + |b|) over the elements.
    fn worst(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
    }

    /// The mirror against the reference attention, forward and backward, on fresh random inputs
    /// at token counts with full blocks, a key tail (197, 257) and a single token, at head dims
    /// padded (88, 104) and not, with more queries than keys and fewer.
    #[test]
    fn flash_mirror_matches_the_reference_attention() {
        let cases = [(2, 1, 1, 64), (3, 197, 197, 64), (2, 257, 257, 88), (1, 130, 65, 104), (2, 70, 200, 128)];
        for (seed, &(bh, n, m, d)) in cases.iter().enumerate() {
            let s = 100 * seed as u64;
            let (q, k, v, d_o) = (
                randn(bh * n * d, s + 1),
                randn(bh * m * d, s + 2),
                randn(bh * m * d, s + 3),
                randn(bh * n * d, s + 4),
            );
            let scale = (d as f32).powf(-0.5) * 2.0; // sharper than usual: exercises the rescaling
            let (o_ref, lse_ref) = cpu::attention_fwd(&q, &k, &v, bh, n, m, d, scale);
            let (o, lse) = flash_attention_fwd(&q, &k, &v, bh, n, m, d, scale);
            let what = format!("bh {bh} n {n} m {m} d {d}");
            assert!(worst(&o, &o_ref) < 1e-5, "{what}: o off by {}", worst(&o, &o_ref));
            assert!(worst(&lse, &lse_ref) < 1e-5, "{what}: lse off by {}", worst(&lse, &lse_ref));
            let (dq_ref, dk_ref, dv_ref) = cpu::attention_bwd(&q, &k, &v, &o_ref, &lse_ref, &d_o, bh, n, m, d, scale);
            let (dq, dk, dv) = flash_attention_bwd(&q, &k, &v, &o, &lse, &d_o, bh, n, m, d, scale);
            for (name, got, want) in [("dq", &dq, &dq_ref), ("dk", &dk, &dk_ref), ("dv", &dv, &dv_ref)] {
                let e = worst(got, want);
                assert!(e < 1e-4, "{what}: {name} off by {e}");
                // (with one key, softmax is constant: dq and dk are exactly zero)
                let trivial = m == 1 && name != "dv";
                assert!(trivial || want.iter().any(|x| x.abs() > 1e-3), "{what}: {name} is trivially zero");
            }
        }
    }

    /// A wrong recurrence is caught: dropping the delta term changes dq visibly.
    #[test]
    fn the_mirror_test_can_fail() {
        let (bh, n, m, d) = (1, 70, 70, 64);
        let (q, k, v, d_o) = (randn(n * d, 7), randn(m * d, 8), randn(m * d, 9), randn(n * d, 10));
        let scale = 0.125;
        let (o, lse) = flash_attention_fwd(&q, &k, &v, bh, n, m, d, scale);
        let zero_o = vec![0.0f32; o.len()]; // delta = 0
        let (dq_bad, _, _) = flash_attention_bwd(&q, &k, &v, &zero_o, &lse, &d_o, bh, n, m, d, scale);
        let (dq_ref, _, _) = cpu::attention_bwd(&q, &k, &v, &o, &lse, &d_o, bh, n, m, d, scale);
        assert!(worst(&dq_bad, &dq_ref) > 1e-2);
    }
}
