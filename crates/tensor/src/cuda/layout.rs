//! CUDA launches of `kernels/layout.cu`: permute and block copies, by element width.

use super::v32::kernel_name;
use super::{backend_of, cuda_err, output, output_zeroed, view, wrap};
use crate::{ops::Blocks, Result, Shape, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// Mirrors `struct PermuteArgs` in `kernels/layout.cu` (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct PermuteArgs {
    out_dims: [i64; 6],
    in_strides: [i64; 6],
    rank: i32,
}
// SAFETY: plain-old-data with the same layout as the C struct.
unsafe impl DeviceRepr for PermuteArgs {}

fn width(t: &Tensor) -> &'static str {
    if t.dtype().size_in_bytes() == 4 {
        "b32"
    } else {
        "b16"
    }
}

/// A grid-stride launch over `n` elements.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn permute(x: &Tensor, perm: &[usize], out: Vec<usize>) -> Result<Tensor> {
    let backend = backend_of(x, "permute")?;
    let shape = Shape::new(out);
    let mut y = output(&backend, &shape, x.dtype())?;
    let r = x.rank();
    let mut in_strides = vec![1i64; r];
    for i in (0..r.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * x.dims()[i + 1] as i64;
    }
    let mut args = PermuteArgs { out_dims: [1; 6], in_strides: [0; 6], rank: r as i32 };
    for (i, &p) in perm.iter().enumerate() {
        args.out_dims[i] = shape.dims()[i] as i64;
        args.in_strides[i] = in_strides[p];
    }
    let n = shape.numel() as i64;
    if n > 0 {
        let f =
            backend.function("layout.cu", &format!("{}_{}", kernel_name(&backend, "permute", n as usize), width(x)))?;
        let xv = view(x, "permute")?;
        let mut b = backend.stream.launch_builder(&f);
        b.arg(&xv).arg(&mut y).arg(&args).arg(&n);
        // SAFETY: argument list matches permute_<width>(const T*, T*, PermuteArgs, long long).
        unsafe { b.launch(grid(n as usize)) }.map_err(cuda_err)?;
    }
    Ok(wrap(&backend, y, shape, x.dtype()))
}

pub(crate) fn copy_blocks(parts: &[(&Tensor, usize)], dim: usize, out: Shape, mode: Blocks) -> Result<Tensor> {
    let x = parts[0].0;
    let backend = backend_of(x, "copy_blocks")?;
    let (outer, out_n, inner) = out.split_at_dim(dim);
    // Placed parts that leave rows uncovered (slice's backward) need a zeroed output.
    let covered = match mode {
        Blocks::Take { len, .. } => len,
        Blocks::Place => parts.iter().map(|(t, _)| t.dims()[dim]).sum(),
    };
    let mut y =
        if covered == out_n { output(&backend, &out, x.dtype())? } else { output_zeroed(&backend, &out, x.dtype())? };
    // Every index stays below the largest tensor involved.
    let largest = parts.iter().map(|(t, _)| t.numel()).fold(out.numel(), usize::max);
    let f = backend.function("layout.cu", &format!("{}_{}", kernel_name(&backend, "copy_block", largest), width(x)))?;
    for &(t, offset) in parts {
        let (src_n, src_off, dst_off, len) = match mode {
            Blocks::Take { start, len } => (t.dims()[dim], start, 0, len),
            Blocks::Place => (t.dims()[dim], 0, offset, t.dims()[dim]),
        };
        let total = outer * len * inner;
        if total == 0 {
            continue;
        }
        let tv = view(t, "copy_blocks")?;
        let a = [outer, src_n, src_off, out_n, dst_off, len, inner].map(|v| v as i64);
        let mut b = backend.stream.launch_builder(&f);
        b.arg(&tv).arg(&mut y);
        for v in &a {
            b.arg(v);
        }
        // SAFETY: argument list matches copy_block_<width>(const T*, T*, 7 x long long).
        unsafe { b.launch(grid(total)) }.map_err(cuda_err)?;
    }
    Ok(wrap(&backend, y, out, x.dtype()))
}
