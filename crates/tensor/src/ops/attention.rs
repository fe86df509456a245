//! Multi-head attention, non-causal, `softmax(scale·QKᵀ)·V` per (batch, head), with the
//! log-sum-exp of each query saved so backward recomputes the scores instead of keeping the
//! `[tokens, tokens]` matrix. On the CPU: GEMMs per (batch, head) slab (`cpu/attention.rs`); on
//! CUDA: the tensor-core flash kernels of `kernels/flash_attention.cu` for bf16/f16 with head dims
//! that are multiples of 8 up to 128, once their self-check passed on the device, else the
//! row-wise reference kernels of `kernels/attention.cu`.

use super::{same_device, same_float_dtype, same_shape};
use crate::{cpu, cuda, DType, Device, Error, Result, Tensor};

/// What [`attention_fwd`] returns.
#[derive(Debug, Clone)]
pub struct AttentionOut {
    /// `[batch, heads, queries, head_dim]`, q's dtype.
    pub o: Tensor,
    /// Log-sum-exp of each query's scaled scores, `[batch, heads, queries]` f32 (saved for backward).
    pub lse: Tensor,
}

/// Gradients from [`attention_bwd`].
#[derive(Debug, Clone)]
pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

fn check(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Device> {
    let device = same_device(op, &[q, k, v])?;
    same_float_dtype(op, &[q, k, v])?;
    let (qd, kd) = (q.dims(), k.dims());
    if qd.len() != 4 || kd.len() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] {
        return Err(Error::shape(
            op,
            format!(
                "expected q [batch, heads, queries, head_dim] and k, v [batch, heads, keys, head_dim], got q {} k {}",
                q.shape(),
                k.shape()
            ),
        ));
    }
    same_shape(op, k, v)?;
    Ok(device)
}

/// `o = softmax(scale · q kᵀ) v` per batch and head; `scale` is usually `1/sqrt(head_dim)`.
pub fn attention_fwd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<AttentionOut> {
    const OP: &str = "attention_fwd";
    match check(OP, q, k, v)? {
        Device::Cpu => {
            let (b, h, n, d) = (q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]);
            let (o, lse) =
                cpu::attention_fwd(&q.cpu_f32(OP)?, &k.cpu_f32(OP)?, &v.cpu_f32(OP)?, b * h, n, k.dims()[2], d, scale);
            Ok(AttentionOut {
                o: Tensor::cpu_like(o, q.shape().clone(), q.dtype()),
                lse: Tensor::cpu_like(lse, [b, h, n], DType::F32),
            })
        }
        Device::Cuda(_) => {
            let (o, lse) = match cuda::flash_attention::try_fwd(q, k, v, scale)? {
                Some(flash) => flash,
                None => cuda::attention::attention_fwd(q, k, v, scale)?,
            };
            Ok(AttentionOut { o, lse })
        }
    }
}

/// Gradients of [`attention_fwd`] from its output `o`, saved `lse` and the output gradient `d_o`.
pub fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<AttentionGrads> {
    const OP: &str = "attention_bwd";
    let device = check(OP, q, k, v)?;
    same_device(OP, &[q, o, lse, d_o])?;
    same_shape(OP, q, o)?;
    same_shape(OP, q, d_o)?;
    same_float_dtype(OP, &[q, o, d_o])?;
    if lse.dims() != &q.dims()[..3] || lse.dtype() != DType::F32 {
        return Err(Error::shape(
            OP,
            format!("expected f32 lse of shape {:?}, got {:?} {}", &q.dims()[..3], lse.dtype(), lse.shape()),
        ));
    }
    match device {
        Device::Cpu => {
            let (b, h, n, d) = (q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]);
            let (dq, dk, dv) = cpu::attention_bwd(
                &q.cpu_f32(OP)?,
                &k.cpu_f32(OP)?,
                &v.cpu_f32(OP)?,
                &o.cpu_f32(OP)?,
                &lse.cpu_f32(OP)?,
                &d_o.cpu_f32(OP)?,
                b * h,
                n,
                k.dims()[2],
                d,
                scale,
            );
            Ok(AttentionGrads {
                dq: Tensor::cpu_like(dq, q.shape().clone(), q.dtype()),
                dk: Tensor::cpu_like(dk, k.shape().clone(), q.dtype()),
                dv: Tensor::cpu_like(dv, v.shape().clone(), q.dtype()),
            })
        }
        Device::Cuda(_) => {
            let (dq, dk, dv) = match cuda::flash_attention::try_bwd(q, k, v, o, lse, d_o, scale)? {
                Some(flash) => flash,
                None => cuda::attention::attention_bwd(q, k, v, o, lse, d_o, scale)?,
            };
            Ok(AttentionGrads { dq, dk, dv })
        }
    }
}
