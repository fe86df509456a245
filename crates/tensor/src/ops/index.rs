//! Row gather and scatter-add by index: MoE dispatch (tokens -> expert slots) and combine.

use super::{reduce::check_index, same_device, same_float_dtype};
use crate::{cpu, cuda, Device, Error, Result, Tensor};

/// Checks `idx` (I32 `[m]`) against a table of `n` rows: every entry in `-1..n` (-1 = none).
/// On CUDA the indices are copied to the host for this check.
fn check_rows(op: &'static str, idx: &Tensor, n: usize) -> Result<()> {
    check_index(op, idx)?;
    if idx.rank() != 1 {
        return Err(Error::shape(op, format!("expected idx of shape [m], got {}", idx.shape())));
    }
    let v = idx.to_vec::<i32>()?;
    if let Some((i, &bad)) = v.iter().enumerate().find(|(_, &x)| x < -1 || x as i64 >= n as i64) {
        return Err(Error::value(op, format!("index {bad} at position {i} is outside -1..{n}")));
    }
    Ok(())
}

/// `out[i] = src[idx[i]]` for `src [n, d]`, `idx` I32 `[m]`; `idx[i] == -1` gives a zero row.
pub fn gather_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    same_device(OP, &[src, idx])?;
    same_float_dtype(OP, &[src])?;
    if src.rank() != 2 {
        return Err(Error::shape(OP, format!("expected src [rows, width], got {}", src.shape())));
    }
    check_rows(OP, idx, src.dims()[0])?;
    let (m, d) = (idx.numel(), src.dims()[1]);
    match src.device() {
        Device::Cpu => {
            Ok(Tensor::cpu_like(cpu::gather_rows(&src.cpu_f32(OP)?, idx.cpu_slice(OP)?, d), [m, d], src.dtype()))
        }
        Device::Cuda(_) => cuda::index::gather_rows(src, idx),
    }
}

/// `out [n, d]` with `out[idx[i]] += src[i]` for `src [m, d]`; entries with `idx[i] == -1` are
/// dropped. The backward of [`gather_rows`], and of this op it is [`gather_rows`].
pub fn scatter_add_rows(src: &Tensor, idx: &Tensor, n: usize) -> Result<Tensor> {
    const OP: &str = "scatter_add_rows";
    same_device(OP, &[src, idx])?;
    same_float_dtype(OP, &[src])?;
    if src.rank() != 2 || idx.dims() != [src.dims()[0]] {
        return Err(Error::shape(
            OP,
            format!("expected src [m, width] and idx [m], got {} and {}", src.shape(), idx.shape()),
        ));
    }
    check_rows(OP, idx, n)?;
    let d = src.dims()[1];
    match src.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::scatter_add_rows(&src.cpu_f32(OP)?, idx.cpu_slice(OP)?, n, d),
            [n, d],
            src.dtype(),
        )),
        Device::Cuda(_) => cuda::index::scatter_add_rows(src, idx, n),
    }
}
