//! Matrix multiplication, plain and batched, with either operand transposed.

use super::{same_device, same_float_dtype};
use crate::op_kinds::MatmulDims;
use crate::{cpu, cuda, Device, Error, Result, Tensor};

/// `a [.., m, k] x b [k, n] -> [.., m, n]`; see [`matmul_t`].
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_t(a, b, false, false)
}

/// `op(a) x op(b)`, where `op` transposes the last two dims when asked.
///
/// - `b` of rank 2 (`[k, n]`, or `[n, k]` transposed): `a` is `[.., m, k]` and its leading dims
///   fold into `m` (a linear layer on `[batch, tokens, width]`); with `trans_a`, `a` must be `[k, m]`.
/// - `b` of rank r ≥ 3: `a` has rank r and the same leading r−2 dims; one product per batch index
///   (attention's `[batch, heads, tokens, head_dim]`).
///
/// The output has `a`'s dtype and leading dims, then `[m, n]`. Accumulation is f32.
pub fn matmul_t(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let device = same_device("matmul", &[a, b])?;
    let dtype = same_float_dtype("matmul", &[a, b])?;
    let (dims, out_shape) = matmul_dims(a, b, trans_a, trans_b)?;
    match device {
        Device::Cpu => {
            Ok(Tensor::cpu_like(cpu::matmul(&a.cpu_f32("matmul")?, &b.cpu_f32("matmul")?, dims), out_shape, dtype))
        }
        Device::Cuda(_) => cuda::blas::matmul(a, b, dims, out_shape),
    }
}

/// Gradients of `c = matmul_t(a, b, trans_a, trans_b)`: returns `(da, db)` with `a`'s and `b`'s shapes.
pub fn matmul_bwd(a: &Tensor, b: &Tensor, dc: &Tensor, trans_a: bool, trans_b: bool) -> Result<(Tensor, Tensor)> {
    let (dims, out_shape) = matmul_dims(a, b, trans_a, trans_b)?;
    if dc.dims() != out_shape.as_slice() {
        return Err(Error::shape("matmul_bwd", format!("expected dc of shape {out_shape:?}, got {}", dc.shape())));
    }
    // With a rank-2 `b`, fold `a` and `dc` to 2-D so db sums over every row.
    let (a2, dc2) = if b.rank() == 2 && !trans_a {
        (a.reshape([dims.m, dims.k])?, dc.reshape([dims.m, dims.n])?)
    } else {
        (a.clone(), dc.clone())
    };
    // C = op(A) op(B): d op(A) = dC op(B)^T and d op(B) = op(A)^T dC; transpose back when needed.
    let da = if trans_a { matmul_t(b, &dc2, trans_b, true)? } else { matmul_t(&dc2, b, false, !trans_b)? };
    let db = if trans_b { matmul_t(&dc2, &a2, true, trans_a)? } else { matmul_t(&a2, &dc2, !trans_a, false)? };
    Ok((da.reshape(a.shape().clone())?, db.reshape(b.shape().clone())?))
}

/// Validates a `matmul_t` call and returns its dims and output shape.
pub fn matmul_dims(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<(MatmulDims, Vec<usize>)> {
    let (ad, bd) = (a.dims(), b.dims());
    let bad = |msg: String| Err(Error::shape("matmul", msg));
    if ad.len() < 2 || bd.len() < 2 {
        return bad(format!("expected operands of rank >= 2, got {} x {}", a.shape(), b.shape()));
    }
    let (br, bc) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    let (k_b, n) = if trans_b { (bc, br) } else { (br, bc) };
    let (ar, ac) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (m_a, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    if k != k_b {
        return bad(format!(
            "inner dimensions differ: {} (trans_a={trans_a}) x {} (trans_b={trans_b}) contract {k} with {k_b}",
            a.shape(),
            b.shape()
        ));
    }
    let lead = &ad[..ad.len() - 2];
    let mut out: Vec<usize> = lead.to_vec();
    out.extend([m_a, n]);
    let dims = if bd.len() == 2 {
        if trans_a && ad.len() != 2 {
            return bad(format!("a transposed must be 2-D when b is 2-D, got {}", a.shape()));
        }
        MatmulDims { batch: 1, m: lead.iter().product::<usize>() * m_a, n, k, trans_a, trans_b }
    } else {
        if ad.len() != bd.len() || lead != &bd[..bd.len() - 2] {
            return bad(format!("batched operands need equal leading dims, got {} x {}", a.shape(), b.shape()));
        }
        MatmulDims { batch: lead.iter().product(), m: m_a, n, k, trans_a, trans_b }
    };
    Ok((dims, out))
}
