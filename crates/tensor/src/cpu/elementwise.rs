//! Elementwise ops and the activations (GELU through the vectorised `vector_math`).

use super::multiversion::multiversion;
use super::vector_math as vm;
use super::{blocked_column_sums, uninit_vec, PAR_MIN_ELEMS};
use crate::op_kinds::{Activation, BinaryOp, Gelu};
use rayon::prelude::*;
use std::mem::MaybeUninit;

pub(crate) fn binary(a: &[f32], b: &[f32], op: BinaryOp) -> Vec<f32> {
    let f = match op {
        BinaryOp::Add => |x: f32, y: f32| x + y,
        BinaryOp::Sub => |x: f32, y: f32| x - y,
        BinaryOp::Mul => |x: f32, y: f32| x * y,
    };
    if a.len() >= PAR_MIN_ELEMS {
        return a.par_iter().zip(b).with_min_len(PAR_MIN_ELEMS / 4).map(|(&x, &y)| f(x, y)).collect();
    }
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

pub(crate) fn scale(x: &[f32], s: f32) -> Vec<f32> {
    if x.len() >= PAR_MIN_ELEMS {
        return x.par_iter().with_min_len(PAR_MIN_ELEMS / 4).map(|&v| v * s).collect();
    }
    x.iter().map(|&v| v * s).collect()
}

pub(crate) fn bias_add(x: &[f32], bias: &[f32]) -> Vec<f32> {
    let n = bias.len();
    let mut y = Vec::with_capacity(x.len());
    if x.len() >= PAR_MIN_ELEMS {
        y.par_extend(x.par_iter().copied());
    } else {
        y.extend_from_slice(x);
    }
    if n > 0 {
        y.par_chunks_mut(n)
            .with_min_len((PAR_MIN_ELEMS / n).max(1))
            .for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
    }
    y
}

/// Sums of the columns of `x [rows, n]` -> `[n]`, the same bits on any thread count.
pub(crate) fn column_sums(x: &[f32], n: usize) -> Vec<f32> {
    blocked_column_sums(x.len() / n.max(1), n, |i, acc| {
        acc.iter_mut().zip(&x[i * n..(i + 1) * n]).for_each(|(a, v)| *a += v)
    })
}

/// erfc(|x|) by Numerical Recipes' `erfcc` (a Chebyshev fit, |relative error| < 1.2e-7).
fn erfc_of_abs(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * poly.exp()
}

/// The complementary error function in f64, |relative error| < 1.2e-7: GELU's exact form and
/// V-MoE's load loss (a normal CDF) use it.
pub fn erfc(x: f64) -> f64 {
    let r = erfc_of_abs(x);
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Elements per rayon task in the activation kernels: big enough to amortise the fan-out,
/// small enough that both cores get several.
const ACT_BLOCK: usize = 1 << 14;

multiversion! {
    /// `y = act(x)` elementwise (SIMD for the GELUs), into memory not yet written.
    fn activation_kernel(x: &[f32], y: &mut [MaybeUninit<f32>], kind: Activation) {
        let y = y.iter_mut().zip(x);
        match kind {
            Activation::Gelu(Gelu::Tanh) => y.for_each(|(o, &v)| _ = o.write(vm::gelu_tanh(v))),
            Activation::Gelu(Gelu::Erf) => y.for_each(|(o, &v)| _ = o.write(vm::gelu_erf(v))),
            Activation::Tanh => y.for_each(|(o, &v)| _ = o.write(v.tanh())),
        }
    }
}

multiversion! {
    /// `dx = dy · act'(x)` elementwise, into memory not yet written.
    fn activation_grad_kernel(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], kind: Activation) {
        let dx = dx.iter_mut().zip(x).zip(dy);
        match kind {
            Activation::Gelu(Gelu::Tanh) => dx.for_each(|((o, &v), &g)| _ = o.write(g * vm::gelu_tanh_grad(v))),
            Activation::Gelu(Gelu::Erf) => dx.for_each(|((o, &v), &g)| _ = o.write(g * vm::gelu_erf_grad(v))),
            Activation::Tanh => dx.for_each(|((o, &v), &g)| _ = o.write(g * (1.0 - v.tanh() * v.tanh()))),
        }
    }
}

multiversion! {
    /// `dy *= act'(x)` elementwise, in place (the same bits as [`activation_grad_kernel`]).
    fn activation_grad_in_place_kernel(x: &[f32], dy: &mut [f32], kind: Activation) {
        let dy = dy.iter_mut().zip(x);
        match kind {
            Activation::Gelu(Gelu::Tanh) => dy.for_each(|(g, &v)| *g *= vm::gelu_tanh_grad(v)),
            Activation::Gelu(Gelu::Erf) => dy.for_each(|(g, &v)| *g *= vm::gelu_erf_grad(v)),
            Activation::Tanh => dy.for_each(|(g, &v)| *g *= 1.0 - v.tanh() * v.tanh()),
        }
    }
}

/// The activation of every element.
pub(crate) fn activation_fwd(x: &[f32], kind: Activation) -> Vec<f32> {
    // SAFETY: the chunks cover the output and the kernel writes every element of its chunk.
    unsafe {
        uninit_vec(x.len(), |y| {
            y.par_chunks_mut(ACT_BLOCK)
                .zip(x.par_chunks(ACT_BLOCK))
                .for_each(|(yc, xc)| activation_kernel(xc, yc, kind))
        })
    }
}

/// `dx = dy · act'(x)`.
pub(crate) fn activation_bwd(x: &[f32], dy: &[f32], kind: Activation) -> Vec<f32> {
    // SAFETY: as in `activation_fwd`.
    unsafe {
        uninit_vec(x.len(), |dx| {
            dx.par_chunks_mut(ACT_BLOCK)
                .zip(x.par_chunks(ACT_BLOCK).zip(dy.par_chunks(ACT_BLOCK)))
                .for_each(|(d, (xc, g))| activation_grad_kernel(xc, g, d, kind))
        })
    }
}

/// The activation's backward in place, `dy [rows, n] *= act'(x)`, fused with the column sums
/// of the result (`[n]`: the gradient of the bias that fed the activation). One pass over the
/// rows instead of three; the sums have the bits of `column_sums` of the product (same row
/// blocks, same order), so they do not depend on the thread count.
pub(crate) fn activation_bwd_in_place_column_sums(x: &[f32], dy: &mut [f32], n: usize, kind: Activation) -> Vec<f32> {
    let mut sums = vec![0.0f32; n];
    if n == 0 {
        return sums;
    }
    let block = (PAR_MIN_ELEMS / n).max(1) * n;
    let partials: Vec<Vec<f32>> = dy
        .par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .map(|(d, xc)| {
            activation_grad_in_place_kernel(xc, d, kind);
            let mut acc = vec![0.0f32; n];
            d.chunks_exact(n).for_each(|row| acc.iter_mut().zip(row).for_each(|(a, v)| *a += v));
            acc
        })
        .collect();
    for p in &partials {
        sums.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Philox::new(seed);
        (0..len).map(|_| rng.uniform_f32() * 12.0 - 6.0).collect()
    }

    /// The dispatched SIMD kernels (AVX-512 or AVX2 here) give the bits of the plain scalar
    /// formulas: no fused multiply-adds crept in, so results do not depend on the CPU.
    #[test]
    fn simd_kernels_equal_the_scalar_formulas_bit_for_bit() {
        let x = random(100_003, 1);
        let dy = random(x.len(), 2);
        for (kind, f, df) in [
            (Gelu::Tanh, vm::gelu_tanh as fn(f32) -> f32, vm::gelu_tanh_grad as fn(f32) -> f32),
            (Gelu::Erf, vm::gelu_erf, vm::gelu_erf_grad),
        ] {
            let kind = Activation::Gelu(kind);
            let y = activation_fwd(&x, kind);
            let dx = activation_bwd(&x, &dy, kind);
            for i in 0..x.len() {
                // black_box keeps the reference scalar (not vectorised with the kernels' features).
                let xi = std::hint::black_box(x[i]);
                assert_eq!(y[i].to_bits(), f(xi).to_bits(), "{kind:?} at x = {xi}");
                assert_eq!(dx[i].to_bits(), (dy[i] * df(xi)).to_bits(), "{kind:?}' at x = {xi}");
            }
            let n = 61;
            let rows = x.len() / n;
            let mut fused = dy[..rows * n].to_vec();
            let sums = activation_bwd_in_place_column_sums(&x[..rows * n], &mut fused, n, kind);
            let unfused = activation_bwd(&x[..rows * n], &dy[..rows * n], kind);
            assert_eq!(fused, unfused);
            assert_eq!(sums, column_sums(&unfused, n), "bias gradient of the fused pass");
        }
    }
}
