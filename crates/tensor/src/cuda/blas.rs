//! GEMM on CUDA: our cuBLASLt call path (`super::lt`: cached plans, one workspace) for bf16/f16
//! with f32 accumulation, cuBLAS sgemm for f32 (cuBLASLt's f32 path would compute in TF32, which
//! would break f32 tolerances).
//!
//! Row-major `C = op(A) op(B)` is column-major `Cᵀ = op(B)ᵀ op(A)ᵀ`, so every call swaps the
//! operands: cuBLAS's "A" is our `b`, its "B" our `a`, and its (m, n) our (n, m). A cuBLASLt bias
//! vector (length of cuBLAS's m) therefore runs along our output's columns: one value per output
//! feature, broadcast over rows, as a linear layer's bias.

use super::lt::{self, Epilogue, Lt, Pointers, Problem};
use super::{backend_of, cuda_err, kernel, output, view, wrap, CudaBackend};
use crate::{op_kinds::MatmulDims, DType, Error, Result, Shape, Tensor};
use cudarc::{
    cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig},
    driver::CudaStream,
};
use std::sync::Arc;

/// The BLAS handles of one device, bound to its stream.
pub(crate) struct Handles {
    blas: CudaBlas,
    lt: Lt,
}

impl Handles {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: is_culib_present only tries to dlopen the libraries.
        if !unsafe { cudarc::cublas::sys::is_culib_present() && cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "cuBLAS/cuBLASLt libraries (libcublas.so, libcublasLt.so) not found on LD_LIBRARY_PATH".into(),
            ));
        }
        Ok(Handles { blas: CudaBlas::new(stream.clone()).map_err(cuda_err)?, lt: Lt::new(stream)? })
    }

    /// The cuBLASLt handle, workspace and plan cache.
    pub(crate) fn lt(&self) -> &Lt {
        &self.lt
    }
}

/// Column-major leading dimensions of the swapped problem: (lda for our b, ldb for our a).
fn leading_dims(d: &MatmulDims) -> (usize, usize) {
    let ld_b = if d.trans_b { d.k } else { d.n };
    let ld_a = if d.trans_a { d.m } else { d.k };
    (ld_b, ld_a)
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::value("matmul", format!("dimension {x} exceeds cuBLAS's 32-bit limit")))
}

/// Our row-major problem `d` (`a` and `b` of dtype `ab`, output `cd`) as cuBLASLt's swapped
/// column-major one, with `epilogue` (`aux_ld`: leading dimension of its aux matrix, our output
/// row length) and the alignment of `ptrs`.
pub(crate) fn problem(
    d: &MatmulDims,
    ab: DType,
    cd: DType,
    epilogue: Epilogue,
    aux_ld: usize,
    ptrs: &Pointers,
) -> Result<Problem> {
    let (lda, ldb) = leading_dims(d);
    let stride_b_ours = if d.batch == 1 { 0 } else { d.k * d.n };
    // With a batch, every product's matrices start at a stride from the first: their addresses
    // are only as aligned as the byte strides.
    let mut addresses = vec![ptrs.a, ptrs.b, ptrs.c, ptrs.d];
    if d.batch > 1 {
        let (sa, sc) = (ab.size_in_bytes() as u64, cd.size_in_bytes() as u64);
        addresses.extend([stride_b_ours as u64 * sa, (d.m * d.k) as u64 * sa, (d.m * d.n) as u64 * sc]);
    }
    Ok(Problem {
        trans_a: d.trans_b,
        trans_b: d.trans_a,
        m: d.n as u64,
        n: d.m as u64,
        k: d.k as u64,
        lda: lda as i64,
        ldb: ldb as i64,
        ldc: d.n as i64,
        batch: int(d.batch)?,
        stride_a: stride_b_ours as i64,
        stride_b: (d.m * d.k) as i64,
        stride_c: (d.m * d.n) as i64,
        ab,
        cd,
        bias: cd,
        epilogue,
        aux_ld: aux_ld as i64,
        align: lt::alignment(&addresses),
    })
}

/// Device addresses for our row-major operands: cuBLAS's A is our `b`, its B our `a`.
pub(crate) fn pointers(a: u64, b: u64, c: u64, d: u64, bias: u64, aux: u64) -> Pointers {
    Pointers { a: b, b: a, c, d, bias, aux }
}

/// A CUDA tensor of `shape` whose elements a GEMM writes completely (no memset).
pub(crate) fn gemm_output(backend: &Arc<CudaBackend>, shape: &Shape, dtype: DType) -> Result<Tensor> {
    // SAFETY: the caller's GEMM writes every element before anything reads them.
    unsafe { kernel::empty(shape.clone(), dtype, crate::Device::Cuda(backend.ordinal)) }
}

/// `matmul_t` on CUDA; `dims` and `out_shape` come from `ops::matmul_dims`.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, d: MatmulDims, out_shape: Vec<usize>) -> Result<Tensor> {
    let backend = backend_of(a, "matmul")?;
    let handles = backend.blas()?;
    let shape = Shape::new(out_shape);
    let dtype = a.dtype();
    if d.m == 0 || d.n == 0 || d.batch == 0 || d.k == 0 {
        // An empty product is zeros (cuBLAS would be asked for k = 0).
        return Ok(wrap(&backend, output(&backend, &shape, dtype)?, shape, dtype));
    }
    match dtype {
        DType::F32 => {
            let mut out = output(&backend, &shape, dtype)?;
            let (av, bv) = (view(a, "matmul")?, view(b, "matmul")?);
            let (lda, ldb) = leading_dims(&d);
            let stride_b_ours = if d.batch == 1 { 0 } else { d.k * d.n };
            let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
            let cfg = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: op(d.trans_b),
                    transb: op(d.trans_a),
                    m: int(d.n)?,
                    n: int(d.m)?,
                    k: int(d.k)?,
                    alpha: 1.0f32,
                    lda: int(lda)?,
                    ldb: int(ldb)?,
                    beta: 0.0f32,
                    ldc: int(d.n)?,
                },
                batch_size: int(d.batch)?,
                stride_a: stride_b_ours as i64,
                stride_b: (d.m * d.k) as i64,
                stride_c: (d.m * d.n) as i64,
            };
            // SAFETY: views hold batch·m·k, k·n (·batch) and batch·m·n f32 elements, checked by ops::matmul_dims.
            unsafe {
                let (bf, af) =
                    (bv.transmute::<f32>(b.numel()).expect("size"), av.transmute::<f32>(a.numel()).expect("size"));
                let mut of = out.transmute_mut::<f32>(shape.numel()).expect("size");
                handles.blas.gemm_strided_batched(cfg, &bf, &af, &mut of)
            }
            .map_err(cuda_err)?;
            Ok(wrap(&backend, out, shape, dtype))
        }
        DType::BF16 | DType::F16 => {
            let out = gemm_output(&backend, &shape, dtype)?;
            let (pa, pb, po) = (kernel::device_ptr(a)?, kernel::device_ptr(b)?, kernel::device_ptr(&out)?);
            let ptrs = pointers(pa, pb, po, po, 0, 0);
            let p = problem(&d, dtype, dtype, Epilogue::None, 0, &ptrs)?;
            // SAFETY: a, b, out hold the elements `d` describes (checked by ops::matmul_dims);
            // out is fresh and written completely (beta 0, C not read).
            unsafe { handles.lt.matmul(&p, &ptrs, 1.0, 0.0) }?;
            Ok(out)
        }
        other => Err(Error::DType { op: "matmul", expected: "f32, bf16 or f16".into(), got: other }),
    }
}

/// `out = op(a) op(b)`, or `out += op(a) op(b)` with `accumulate` (`beta = 1`), written into the
/// existing CUDA tensor `out` through the cached cuBLASLt plan: no allocation, no memset, no
/// heuristic query after the first call of a shape (what `benches/gemm_cuda.rs` times, and how a
/// trainer accumulates weight gradients). Shapes as [`crate::ops::matmul_t`]; `a`, `b` bf16 or
/// f16, `out` of their dtype or f32.
///
/// # Safety
/// `out` is written in place: no other tensor may share its elements and expect the old values
/// (a tensor made with [`kernel::empty`] or `Tensor::zeros` and not shared, for example).
pub unsafe fn matmul_into(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "matmul_into";
    let (d, out_shape) = crate::ops::matmul_dims(a, b, trans_a, trans_b)?;
    if out.dims() != out_shape.as_slice() {
        return Err(Error::shape(OP, format!("expected out of shape {out_shape:?}, got {}", out.shape())));
    }
    let ab = a.dtype();
    if !matches!(ab, DType::BF16 | DType::F16) || b.dtype() != ab {
        return Err(Error::DType { op: OP, expected: "bf16 or f16 operands of one dtype".into(), got: b.dtype() });
    }
    if out.dtype() != ab && out.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, expected: format!("out of dtype {ab} or f32"), got: out.dtype() });
    }
    for t in [b, out] {
        if t.device() != a.device() {
            return Err(Error::Device { op: OP, expected: a.device(), got: t.device() });
        }
    }
    let backend = backend_of(a, OP)?;
    if d.m == 0 || d.n == 0 || d.batch == 0 || d.k == 0 {
        return if accumulate || out.numel() == 0 {
            Ok(())
        } else {
            Err(Error::value(OP, "an empty inner dimension (k = 0) without accumulate: use ops::matmul_t"))
        };
    }
    let (pa, pb, po) = (kernel::device_ptr(a)?, kernel::device_ptr(b)?, kernel::device_ptr(out)?);
    let ptrs = pointers(pa, pb, po, po, 0, 0);
    let p = problem(&d, ab, out.dtype(), Epilogue::None, 0, &ptrs)?;
    // SAFETY: shapes checked above; out is owned alone (the caller's contract), C = D.
    unsafe { backend.blas()?.lt.matmul(&p, &ptrs, 1.0, if accumulate { 1.0 } else { 0.0 }) }
}

/// Number of cuBLASLt plans cached on device `ordinal` (one per distinct problem: shape,
/// transposes, dtypes, epilogue, alignment).
pub fn cached_gemm_plans(ordinal: usize) -> Result<usize> {
    Ok(super::backend(ordinal)?.blas()?.lt.cached_plans())
}

/// The row-major to column-major mapping of plain (batched, transposed) matmuls through the host
/// model of cuBLASLt (`lt::emulate`) against naive row-major loops.
#[cfg(test)]
mod tests {
    use super::{pointers, problem};
    use crate::cuda::lt::{emulate, Epilogue};
    use crate::{op_kinds::MatmulDims, DType};
    use std::collections::HashMap;

    #[test]
    fn problem_and_pointers_compute_the_row_major_product_for_every_transpose_and_batch() {
        let (m, n, k) = (5, 7, 4);
        for batch in [1, 3] {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    let a = crate::Tensor::randn([batch * m * k], 0.0, 1.0, 1, DType::F32, crate::Device::Cpu)
                        .unwrap()
                        .to_f32_vec()
                        .unwrap();
                    let b = crate::Tensor::randn([batch * k * n], 0.0, 1.0, 2, DType::F32, crate::Device::Cpu)
                        .unwrap()
                        .to_f32_vec()
                        .unwrap();
                    // Row-major storage: a [batch, m, k] or [batch, k, m]; b likewise.
                    let op_a = |q: usize, i: usize, l: usize| {
                        a[q * m * k + if trans_a { l * m + i } else { i * k + l }] as f64
                    };
                    let op_b = |q: usize, l: usize, j: usize| {
                        b[q * k * n + if trans_b { j * k + l } else { l * n + j }] as f64
                    };
                    let d = MatmulDims { batch, m, n, k, trans_a, trans_b };
                    let ptrs = pointers(0x100, 0x200, 0x300, 0x300, 0, 0);
                    let p = problem(&d, DType::BF16, DType::BF16, Epilogue::None, 0, &ptrs).unwrap();
                    let mut bufs =
                        HashMap::from([(0x100, a.clone()), (0x200, b.clone()), (0x300, vec![0.0; batch * m * n])]);
                    emulate(&p, &ptrs, 1.0, 0.0, &mut bufs, |x| x, |_| 1.0);
                    for q in 0..batch {
                        for i in 0..m {
                            for j in 0..n {
                                let want: f64 = (0..k).map(|l| op_a(q, i, l) * op_b(q, l, j)).sum();
                                let got = bufs[&0x300][q * m * n + i * n + j] as f64;
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "batch {batch} trans ({trans_a}, {trans_b}) [{q}, {i}, {j}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
