//! Host implementations of the collectives: given every rank's validated call, compute one
//! rank's result. Reductions run in f32 in rank order (rank 0 first), so every rank computes
//! the same bits whatever the thread timing; data movement copies elements exactly.

use crate::{
    call::{Call, Op},
    Error, ReduceOp, Result,
};
use half::{bf16, f16};
use vit_tensor::{DType, Device, Element, Tensor};

/// The result for `rank` of the collective that `calls` (one per rank, already checked by
/// [`crate::call::validate`]) describe, placed on `device`. `None` for a barrier.
pub(crate) fn complete(calls: &[Call], rank: usize, device: Device) -> Result<Option<Tensor>> {
    let n = calls.len();
    let inputs: Vec<&Tensor> = calls.iter().filter_map(|c| c.tensor.as_ref()).collect();
    let (Some(first), Some(x)) = (calls.first(), inputs.first()) else {
        return Ok(None);
    };
    if inputs.len() != n {
        let op = first.op.name();
        return Err(Error::Mismatch { op, msg: format!("{} of {n} ranks passed a tensor", inputs.len()) });
    }
    let (dtype, shape) = (x.dtype(), x.dims().to_vec());
    let m = shape.first().copied().unwrap_or(0) / n; // rows per rank for the ops that split dim 0
    let out = match first.op {
        Op::Barrier | Op::Split => return Ok(None),
        Op::AllReduce(op) => {
            let parts = inputs.iter().map(|t| t.to_f32_vec().map_err(Error::from));
            Tensor::from_f32(reduce(parts, op, n)?, shape, dtype, device)?
        }
        Op::ReduceScatter(op) => {
            let parts = inputs.iter().map(|t| Ok(t.narrow(rank * m, m)?.to_f32_vec()?));
            Tensor::from_f32(reduce(parts, op, n)?, with_dim0(&shape, m), dtype, device)?
        }
        Op::AllGather => concat_rows(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>(), device)?,
        Op::AllToAll => {
            let chunks = inputs.iter().map(|t| t.narrow(rank * m, m)).collect::<vit_tensor::Result<Vec<_>>>()?;
            concat_rows(&chunks, device)?
        }
        Op::Broadcast { root } => {
            let src =
                inputs.get(root).ok_or(Error::Rank { op: "broadcast", what: "root", got: root, world_size: n })?;
            src.to_device(device)?
        }
    };
    Ok(Some(out))
}

/// `dims` with dim 0 replaced by `d0`.
pub(crate) fn with_dim0(dims: &[usize], d0: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    match out.first_mut() {
        Some(d) => *d = d0,
        None => out.push(d0),
    }
    out
}

/// Reduces equally long f32 vectors, given in rank order, with `op` over a world of `n`.
pub(crate) fn reduce(mut parts: impl Iterator<Item = Result<Vec<f32>>>, op: ReduceOp, n: usize) -> Result<Vec<f32>> {
    let mut acc = parts.next().transpose()?.unwrap_or_default();
    for part in parts {
        fold_into(&mut acc, &part?, op);
    }
    finish(&mut acc, op, n);
    Ok(acc)
}

/// `acc ⊕= part` element by element: the one fold every backend uses for the next rank's part
/// (a sum, or a max that keeps a NaN), so reductions give the same bits everywhere.
pub(crate) fn fold_into(acc: &mut [f32], part: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => acc.iter_mut().zip(part).for_each(|(a, b)| *a += b),
        ReduceOp::Max => acc.iter_mut().zip(part).for_each(|(a, &b)| {
            if b > *a || b.is_nan() {
                *a = b;
            }
        }),
    }
}

/// After the last part: a mean divides the sum by the world size `n`.
pub(crate) fn finish(acc: &mut [f32], op: ReduceOp, n: usize) {
    if op == ReduceOp::Mean {
        let n = n as f32;
        acc.iter_mut().for_each(|a| *a /= n);
    }
}

/// Concatenates tensors of one dtype and equal trailing dims along dim 0, on `device`,
/// copying elements exactly (no f32 round trip).
pub(crate) fn concat_rows(parts: &[Tensor], device: Device) -> Result<Tensor> {
    fn cat<T: Element>(parts: &[Tensor], device: Device) -> Result<Tensor> {
        let Some(first) = parts.first() else {
            return Err(Error::Shape { op: "concat_rows", msg: "expected at least one tensor".into() });
        };
        let rows = parts.iter().map(|t| t.dims().first().copied().unwrap_or(1)).sum();
        let shape = with_dim0(first.dims(), rows);
        let mut data = Vec::with_capacity(parts.iter().map(Tensor::numel).sum());
        for t in parts {
            data.extend(t.to_vec::<T>()?);
        }
        Ok(Tensor::from_vec(data, shape, device)?)
    }
    match parts.first().map(Tensor::dtype) {
        Some(DType::F32) | None => cat::<f32>(parts, device),
        Some(DType::BF16) => cat::<bf16>(parts, device),
        Some(DType::F16) => cat::<f16>(parts, device),
        Some(DType::I32) => cat::<i32>(parts, device),
        Some(DType::U32) => cat::<u32>(parts, device),
    }
}
