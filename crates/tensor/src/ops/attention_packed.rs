//! Self-attention straight from a packed qkv projection, without split, permute or concat
//! copies: `qkv [batch, tokens, channels]` holds, from channel `offset` on, the queries, keys and
//! values as three blocks of `width = heads·head_dim` channels (each head-major, as timm's qkv
//! Linear and the parallel block's fused in-projection `[mlp, q, k, v]` lay them out). The output
//! has its heads merged, `[batch, tokens, width]`, and the backward writes one packed
//! `[batch, tokens, 3·width]` gradient.
//!
//! On CUDA with bf16/f16 and a head dim the flash kernels take (multiples of 8 up to 128,
//! 16-byte-aligned channels) the kernels read and write these layouts through strides, and on
//! the CPU strided GEMMs do (`cpu::attention_packed`); elsewhere on CUDA (f32, other head dims, a
//! failed self-check) the reference path splits the heads into copies, runs
//! [`attention_fwd`]/[`attention_bwd`] and merges them back.

use super::{attention_bwd, attention_fwd, concat, permute, same_device, same_float_dtype, slice, AttentionOut};
use crate::{cpu, cuda, DType, Device, Error, Result, Tensor};

/// `(batch, tokens, head_dim)` after checking `qkv` against `offset`, `width` and `heads`.
fn check_packed(
    op: &'static str,
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
) -> Result<(usize, usize, usize)> {
    same_float_dtype(op, &[qkv])?;
    let d = qkv.dims();
    if d.len() != 3 || heads == 0 || width == 0 || !width.is_multiple_of(heads) || offset + 3 * width > d[2] {
        return Err(Error::shape(
            op,
            format!(
                "expected qkv [batch, tokens, channels] with channels >= offset + 3·width and width a multiple of heads, \
                 got qkv {} with offset {offset}, width {width}, heads {heads}",
                qkv.shape()
            ),
        ));
    }
    Ok((d[0], d[1], width / heads))
}

/// The packed layout of a checked `qkv` for the CPU kernels.
fn packed(qkv: &Tensor, offset: usize, width: usize, heads: usize) -> cpu::PackedHeads {
    let d = qkv.dims();
    cpu::PackedHeads { batch: d[0], tokens: d[1], channels: d[2], offset, width, heads }
}

/// Block `i` (0 = q, 1 = k, 2 = v) of the packed projection as `[batch, heads, tokens, head_dim]` copies.
fn split(qkv: &Tensor, offset: usize, width: usize, heads: usize, i: usize) -> Result<Tensor> {
    let (b, n) = (qkv.dims()[0], qkv.dims()[1]);
    let x = slice(qkv, 2, offset + i * width, width)?;
    permute(&x.reshape([b, n, heads, width / heads])?, &[0, 2, 1, 3])
}

/// `[batch, heads, tokens, head_dim] -> [batch, tokens, heads·head_dim]`.
fn merge(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, dh) = (x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]);
    permute(x, &[0, 2, 1, 3])?.reshape([b, n, h * dh])
}

/// Self-attention `softmax(scale·q kᵀ) v` per batch and head, q, k, v read from the packed
/// projection `qkv [batch, tokens, channels]` at channels `offset..offset + 3·width`. Returns
/// `o [batch, tokens, width]` (heads merged) and the log-sum-exp `[batch, heads, tokens]` f32.
pub fn attention_fwd_packed(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    scale: f32,
) -> Result<AttentionOut> {
    const OP: &str = "attention_fwd_packed";
    check_packed(OP, qkv, offset, width, heads)?;
    if let Device::Cuda(_) = qkv.device() {
        if let Some((o, lse)) = cuda::flash_attention::try_fwd_packed(qkv, offset, width, heads, scale)? {
            return Ok(AttentionOut { o, lse });
        }
    }
    if qkv.device() == Device::Cpu {
        let (o, lse) = cpu::attention_fwd_packed(&qkv.cpu_f32(OP)?, packed(qkv, offset, width, heads), scale);
        let (b, n) = (qkv.dims()[0], qkv.dims()[1]);
        return Ok(AttentionOut {
            o: Tensor::cpu_like(o, [b, n, width], qkv.dtype()),
            lse: Tensor::cpu_like(lse, [b, heads, n], DType::F32),
        });
    }
    let [q, k, v] = [0, 1, 2].map(|i| split(qkv, offset, width, heads, i));
    let out = attention_fwd(&q?, &k?, &v?, scale)?;
    Ok(AttentionOut { o: merge(&out.o)?, lse: out.lse })
}

/// Gradient of [`attention_fwd_packed`] with respect to its q, k, v channels, from the saved
/// `o [batch, tokens, width]`, `lse [batch, heads, tokens]` and the output gradient `d_o`
/// (like `o`): one packed `[batch, tokens, 3·width]` tensor (dq, dk, dv blocks).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_packed(
    qkv: &Tensor,
    offset: usize,
    width: usize,
    heads: usize,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "attention_bwd_packed";
    let (b, n, _) = check_packed(OP, qkv, offset, width, heads)?;
    same_device(OP, &[qkv, o, lse, d_o])?;
    same_float_dtype(OP, &[qkv, o, d_o])?;
    if o.dims() != [b, n, width] || d_o.dims() != [b, n, width] {
        return Err(Error::shape(
            OP,
            format!("expected o and d_o [{b}, {n}, {width}], got o {} and d_o {}", o.shape(), d_o.shape()),
        ));
    }
    if lse.dims() != [b, heads, n] || lse.dtype() != DType::F32 {
        return Err(Error::shape(
            OP,
            format!("expected f32 lse of shape [{b}, {heads}, {n}], got {:?} {}", lse.dtype(), lse.shape()),
        ));
    }
    if let Device::Cuda(_) = qkv.device() {
        if let Some(dqkv) = cuda::flash_attention::try_bwd_packed(qkv, offset, width, heads, o, lse, d_o, scale)? {
            return Ok(dqkv);
        }
    }
    if qkv.device() == Device::Cpu {
        let g = cpu::attention_bwd_packed(
            &qkv.cpu_f32(OP)?,
            &o.cpu_f32(OP)?,
            &lse.cpu_f32(OP)?,
            &d_o.cpu_f32(OP)?,
            packed(qkv, offset, width, heads),
            scale,
        );
        return Ok(Tensor::cpu_like(g, [b, n, 3 * width], qkv.dtype()));
    }
    let [q, k, v] = [0, 1, 2].map(|i| split(qkv, offset, width, heads, i));
    let split_heads = |x: &Tensor| permute(&x.reshape([b, n, heads, width / heads])?, &[0, 2, 1, 3]);
    let g = attention_bwd(&q?, &k?, &v?, &split_heads(o)?, lse, &split_heads(d_o)?, scale)?;
    concat(&[&merge(&g.dq)?, &merge(&g.dk)?, &merge(&g.dv)?], 2)
}
