//! Layout ops that copy: permute axes, slice and concatenate along any dim, broadcast along
//! a new dim. Each one's backward is another layout op (noted per function).

use super::{same_device, same_float_dtype};
use crate::{cpu, cuda, storage::CpuStorage, Device, Error, Result, Shape, Tensor};

/// `x` with its axes reordered: output dim `i` is input dim `perm[i]` (at most 6 dims).
/// Backward: `permute(dy, inverse_permutation(perm))`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let r = x.rank();
    let mut seen = [false; 6];
    let valid = perm.len() == r && r <= 6 && perm.iter().all(|&p| p < r && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(Error::shape(
            "permute",
            format!("expected a permutation of 0..{r} (rank <= 6), got {perm:?} for {}", x.shape()),
        ));
    }
    let out: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
    match x.device() {
        Device::Cpu => {
            let mut dst = CpuStorage::zeroed(x.dtype(), x.numel());
            cpu::permute_bytes(x.cpu_bytes("permute")?, x.dtype().size_in_bytes(), x.dims(), perm, dst.bytes_mut());
            Ok(Tensor::from_cpu(dst, out.into()))
        }
        Device::Cuda(_) => cuda::layout::permute(x, perm, out),
    }
}

/// The inverse of a permutation: `permute(permute(x, p), inverse_permutation(p)) == x`.
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// How [`copy_blocks`] moves `[outer, extent, inner]` blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Blocks {
    /// Read `len` rows from `start` of the single input (slice).
    Take { start: usize, len: usize },
    /// Write each part at its offset into a zeroed output (concat, pad).
    Place,
}

/// Elements `start..start + len` along `dim` (a copy). Backward: [`pad_along`].
pub fn slice(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    if dim >= x.rank() || start + len > x.dims()[dim] {
        return Err(Error::shape(
            "slice",
            format!("{start}..{} along dim {dim} is out of range for {}", start + len, x.shape()),
        ));
    }
    let mut out = x.dims().to_vec();
    out[dim] = len;
    copy_blocks(&[(x, 0)], dim, out, Blocks::Take { start, len })
}

/// `dy` placed at `start` along `dim` of a zero tensor with `dims` (slice's backward).
pub fn pad_along(dy: &Tensor, dims: &[usize], dim: usize, start: usize) -> Result<Tensor> {
    let ok = dim < dims.len()
        && dy.rank() == dims.len()
        && start + dy.dims()[dim] <= dims[dim]
        && dy.dims().iter().zip(dims).enumerate().all(|(i, (a, b))| i == dim || a == b);
    if !ok {
        return Err(Error::shape(
            "pad_along",
            format!("cannot place {} at {start} along dim {dim} of {dims:?}", dy.shape()),
        ));
    }
    copy_blocks(&[(dy, start)], dim, dims.to_vec(), Blocks::Place)
}

/// Concatenation along `dim`; every other dim must agree. Backward: [`slice()`] per part.
pub fn concat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| Error::shape("concat", "expected at least one tensor"))?;
    same_device("concat", parts)?;
    let d = first.dims();
    for p in parts {
        let ok = p.dtype() == first.dtype()
            && p.rank() == d.len()
            && dim < d.len()
            && p.dims().iter().zip(d).enumerate().all(|(i, (a, b))| i == dim || a == b);
        if !ok {
            return Err(Error::shape(
                "concat",
                format!("cannot concatenate {} with {} along dim {dim}", first.shape(), p.shape()),
            ));
        }
    }
    let mut out = d.to_vec();
    out[dim] = parts.iter().map(|p| p.dims()[dim]).sum();
    let mut offset = 0;
    let placed: Vec<(&Tensor, usize)> = parts
        .iter()
        .map(|p| {
            offset += p.dims()[dim];
            (*p, offset - p.dims()[dim])
        })
        .collect();
    copy_blocks(&placed, dim, out, Blocks::Place)
}

/// Moves `[outer, extent, inner]` blocks (the tensors viewed around `dim`) into a new tensor of `out` dims.
fn copy_blocks(parts: &[(&Tensor, usize)], dim: usize, out: Vec<usize>, mode: Blocks) -> Result<Tensor> {
    let x = parts[0].0;
    let out_shape = Shape::new(out);
    let (outer, out_n, inner) = out_shape.split_at_dim(dim);
    match x.device() {
        Device::Cpu => {
            let es = x.dtype().size_in_bytes();
            let mut storage = CpuStorage::zeroed(x.dtype(), out_shape.numel());
            let dst = storage.bytes_mut();
            for &(t, offset) in parts {
                let src = t.cpu_bytes("copy_blocks")?;
                let (src_n, src_off, dst_off, len) = match mode {
                    Blocks::Take { start, len } => (t.dims()[dim], start, 0, len),
                    Blocks::Place => (t.dims()[dim], 0, offset, t.dims()[dim]),
                };
                cpu::copy_block(src, dst, outer, src_n, src_off, out_n, dst_off, len, inner * es);
            }
            Ok(Tensor::from_cpu(storage, out_shape))
        }
        Device::Cuda(_) => cuda::layout::copy_blocks(parts, dim, out_shape, mode),
    }
}

/// `x` repeated `n` times along a new axis `dim` (the output has rank + 1). Backward: `sum(dy, dim)`.
pub fn broadcast(x: &Tensor, dim: usize, n: usize) -> Result<Tensor> {
    same_float_dtype("broadcast", &[x])?;
    let mut out = x.dims().to_vec();
    if dim > out.len() {
        return Err(Error::shape("broadcast", format!("new dim {dim} out of range for {}", x.shape())));
    }
    out.insert(dim, n);
    super::sum_bwd(x, &out, dim)
}
