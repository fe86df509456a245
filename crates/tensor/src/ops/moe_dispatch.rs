//! V-MoE dispatch and combine over the expert buffers `[E·slots, D]`, with the maps of a
//! [`MoeRouting`]: index lists, never a one-hot einsum, and no atomics on CUDA (every output
//! row is gathered by its own threads, so the results are deterministic).
//!
//! - [`moe_dispatch`]: tokens `[S, D]` → buffers (row r holds its assignment's token, empty
//!   rows are zeros); its backward [`moe_dispatch_bwd`] is a combine with every weight 1.
//! - [`moe_combine`]: buffers → tokens, `y[t] = Σ_j w[t, j]·out[pos[t, j]]`; its backward
//!   [`moe_combine_bwd`] gives the buffers' gradient and the combine weights' gradient.

use super::{exact_shape, same_device, same_float_dtype, MoeRouting};
use crate::{cpu, cuda, DType, Device, Error, Result, Tensor};

/// Checks that `t` is a float `[rows, width]` on the routing's device; returns the width.
fn rows_of(op: &'static str, t: &Tensor, r: &MoeRouting, rows: usize, what: &str) -> Result<usize> {
    same_float_dtype(op, &[t])?;
    if t.device() != r.device() {
        return Err(Error::Device { op, expected: r.device(), got: t.device() });
    }
    if t.rank() != 2 || t.dims()[0] != rows {
        return Err(Error::shape(op, format!("expected {what} [{rows}, width], got {}", t.shape())));
    }
    Ok(t.dims()[1])
}

/// Buffer rows of the routing: E·slots.
fn buffer_rows(r: &MoeRouting) -> usize {
    r.experts() * r.slots()
}

/// `x [S, D]` → the expert buffers `[E·slots, D]` (reshape to `[E, slots, D]` for the experts'
/// batched matmul): row r holds the token of its assignment, empty rows are zeros. `x`'s dtype.
pub fn moe_dispatch(x: &Tensor, r: &MoeRouting) -> Result<Tensor> {
    const OP: &str = "moe_dispatch";
    let d = rows_of(OP, x, r, r.tokens(), "tokens")?;
    let rows = buffer_rows(r);
    match x.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::moe_dispatch(&x.cpu_f32(OP)?, r.slot_src().cpu_slice(OP)?, d, r.k()),
            [rows, d],
            x.dtype(),
        )),
        Device::Cuda(_) => cuda::moe_dispatch::dispatch(x, r),
    }
}

/// The backward of [`moe_dispatch`]: `dx [S, D]` with `dx[t] = Σ_j dbuf[pos[t, j]]` over the
/// token's kept assignments (a combine with every weight 1), from `dbuf [E·slots, D]`.
pub fn moe_dispatch_bwd(dbuf: &Tensor, r: &MoeRouting) -> Result<Tensor> {
    combine(dbuf, r, false, "moe_dispatch_bwd")
}

/// The expert buffers' outputs `out [E·slots, D]` → tokens `[S, D]`:
/// `y[t] = Σ_j weight[t, j]·out[pos[t, j]]` over the token's kept assignments, summed in f32
/// in the order of the choices and rounded once to `out`'s dtype. A token with every choice
/// dropped gets a zero row.
pub fn moe_combine(out: &Tensor, r: &MoeRouting) -> Result<Tensor> {
    combine(out, r, true, "moe_combine")
}

fn combine(src: &Tensor, r: &MoeRouting, weighted: bool, op: &'static str) -> Result<Tensor> {
    let d = rows_of(op, src, r, buffer_rows(r), "buffers")?;
    let s = r.tokens();
    match src.device() {
        Device::Cpu => {
            let w = if weighted { Some(r.weight().cpu_slice::<f32>(op)?) } else { None };
            Ok(Tensor::cpu_like(
                cpu::moe_combine(&src.cpu_f32(op)?, r.pos().cpu_slice(op)?, w, d, r.k()),
                [s, d],
                src.dtype(),
            ))
        }
        Device::Cuda(_) => cuda::moe_dispatch::combine(src, r, weighted),
    }
}

/// The backward of [`moe_combine`] given `dy [S, D]` and the forward's input `out [E·slots, D]`:
/// `(dout, dweight)` with `dout [E·slots, D]` (`out`'s dtype), row r = `weight[a]·dy[a / k]`
/// for its assignment `a` (zeros for an empty row), and `dweight` f32 `[S, k]`,
/// `⟨dy[t], out[pos[t, j]]⟩` (0 where dropped), the gradient of the combine weights.
pub fn moe_combine_bwd(out: &Tensor, dy: &Tensor, r: &MoeRouting) -> Result<(Tensor, Tensor)> {
    const OP: &str = "moe_combine_bwd";
    let d = rows_of(OP, out, r, buffer_rows(r), "buffers")?;
    same_device(OP, &[out, dy])?;
    same_float_dtype(OP, &[out, dy])?;
    exact_shape(OP, dy, &[r.tokens(), d], "dy")?;
    let (s, k) = (r.tokens(), r.k());
    match out.device() {
        Device::Cpu => {
            let (dyv, outv) = (dy.cpu_f32(OP)?, out.cpu_f32(OP)?);
            let dout = cpu::moe_scale_rows(&dyv, r.slot_src().cpu_slice(OP)?, r.weight().cpu_slice(OP)?, d, k);
            let dw = cpu::moe_combine_dweight(&dyv, &outv, r.pos().cpu_slice(OP)?, d, k);
            Ok((Tensor::cpu_like(dout, [buffer_rows(r), d], out.dtype()), Tensor::cpu_like(dw, [s, k], DType::F32)))
        }
        Device::Cuda(_) => cuda::moe_dispatch::combine_bwd(out, dy, r),
    }
}
