//! GEMM baseline on CUDA: cuBLASLt for bf16/f16 (f32 accumulation), cuBLAS sgemm for f32
//! (cuBLASLt's f32 path in cudarc computes in TF32, which would break f32 tolerances).
//!
//! Row-major `C = op(A) op(B)` is column-major `Cᵀ = op(B)ᵀ op(A)ᵀ`, so every call swaps the
//! operands: cuBLAS's "A" is our `b`, its "B" our `a`, and its (m, n) our (n, m).

use super::{backend_of, cuda_err, output, view, wrap};
use crate::{op_kinds::MatmulDims, DType, Error, Result, Shape, Tensor};
use cudarc::{
    cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig},
    cublaslt::{CudaBlasLT, Matmul, MatmulConfig},
    driver::CudaStream,
};
use half::{bf16, f16};
use std::sync::Arc;

/// The BLAS handles of one device, bound to its stream.
pub(crate) struct Handles {
    blas: CudaBlas,
    lt: CudaBlasLT,
}

impl Handles {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: is_culib_present only tries to dlopen the libraries.
        if !unsafe { cudarc::cublas::sys::is_culib_present() && cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "cuBLAS/cuBLASLt libraries (libcublas.so, libcublasLt.so) not found on LD_LIBRARY_PATH".into(),
            ));
        }
        Ok(Handles {
            blas: CudaBlas::new(stream.clone()).map_err(cuda_err)?,
            lt: CudaBlasLT::new(stream).map_err(cuda_err)?,
        })
    }
}

/// Column-major leading dimensions of the swapped problem: (lda for our b, ldb for our a).
fn leading_dims(d: &MatmulDims) -> (usize, usize) {
    let ld_b = if d.trans_b { d.k } else { d.n };
    let ld_a = if d.trans_a { d.m } else { d.k };
    (ld_b, ld_a)
}

/// `matmul_t` on CUDA; `dims` and `out_shape` come from `ops::matmul_dims`.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, d: MatmulDims, out_shape: Vec<usize>) -> Result<Tensor> {
    let backend = backend_of(a, "matmul")?;
    let handles = backend.blas()?;
    let shape = Shape::new(out_shape);
    let dtype = a.dtype();
    let mut out = output(&backend, &shape, dtype)?;
    if d.m == 0 || d.n == 0 || d.batch == 0 {
        return Ok(wrap(&backend, out, shape, dtype));
    }
    let (av, bv) = (view(a, "matmul")?, view(b, "matmul")?);
    let (lda, ldb) = leading_dims(&d);
    let stride_b_ours = if d.batch == 1 { 0 } else { d.k * d.n };
    let int = |x: usize| {
        i32::try_from(x).map_err(|_| Error::value("matmul", format!("dimension {x} exceeds cuBLAS's 32-bit limit")))
    };
    match dtype {
        DType::F32 => {
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
        }
        DType::BF16 | DType::F16 => {
            let cfg = MatmulConfig {
                transa: d.trans_b,
                transb: d.trans_a,
                transc: false,
                m: d.n as u64,
                n: d.m as u64,
                k: d.k as u64,
                alpha: 1.0,
                lda: lda as i64,
                ldb: ldb as i64,
                beta: 0.0,
                ldc: d.n as i64,
                stride_a: Some(stride_b_ours as i64),
                stride_b: Some((d.m * d.k) as i64),
                stride_c: Some((d.m * d.n) as i64),
                stride_bias: None,
                batch_size: Some(int(d.batch)?),
            };
            // SAFETY: as above, for 2-byte elements.
            unsafe {
                if dtype == DType::BF16 {
                    let (bh, ah) = (
                        bv.transmute::<bf16>(b.numel()).expect("size"),
                        av.transmute::<bf16>(a.numel()).expect("size"),
                    );
                    let mut oh = out.transmute_mut::<bf16>(shape.numel()).expect("size");
                    handles.lt.matmul(cfg, &bh, &ah, &mut oh, None, None)
                } else {
                    let (bh, ah) =
                        (bv.transmute::<f16>(b.numel()).expect("size"), av.transmute::<f16>(a.numel()).expect("size"));
                    let mut oh = out.transmute_mut::<f16>(shape.numel()).expect("size");
                    handles.lt.matmul(cfg, &bh, &ah, &mut oh, None, None)
                }
            }
            .map_err(cuda_err)?;
        }
        other => return Err(Error::DType { op: "matmul", expected: "f32, bf16 or f16".into(), got: other }),
    }
    Ok(wrap(&backend, out, shape, dtype))
}
