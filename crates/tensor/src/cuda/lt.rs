//! Our own cuBLASLt call path: one handle and one 32 MiB workspace per device, and a plan cache
//! (matmul descriptor, the four matrix layouts and the heuristic's chosen algorithm) keyed by
//! everything that shapes the call, so a GEMM after the first of its shape costs two attribute
//! writes (the epilogue pointers) and one `cublasLtMatmul`, with no heuristic query.
//!
//! Everything here is in cuBLAS's column-major terms: `D [m, n] = alpha · op(A) op(B) + beta · C`
//! with an epilogue. `super::blas` maps our row-major problems onto it (swapping the operands).
//! Inputs are bf16 or f16, accumulation and scale f32, C and D bf16/f16 (A's dtype) or f32.

use super::cuda_err;
use crate::{DType, Error, Result};
use cudarc::cublaslt::{
    result as lt,
    sys::{
        self, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulDescAttributes_t as DescAttr,
        cublasLtMatmulPreferenceAttributes_t as PrefAttr, cublasLtMatrixLayoutAttribute_t as LayoutAttr,
        cudaDataType_t,
    },
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::{collections::HashMap, ffi::c_void, mem::size_of, sync::Arc, sync::Mutex};

/// Bytes of the workspace cuBLASLt may use (NVIDIA's recommendation for Hopper).
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

/// The epilogues we use, in cuBLASLt's terms (bias vectors run along D's rows `m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Epilogue {
    /// `D = alpha·AB + beta·C`.
    None,
    /// `D = alpha·AB + beta·C + bias[m]`.
    Bias,
    /// `aux = alpha·AB + beta·C + bias[m]`, `D = gelu_tanh(aux)`; aux has D's dtype and layout.
    GeluAuxBias,
    /// `D = (alpha·AB + beta·C) · gelu_tanh'(aux)`, `bias = Σ_n D[:, n]`.
    DGeluBGrad,
    /// `D = alpha·AB + beta·C`, `bias = Σ_k op(B)[k, :]`, length n.
    BGradB,
}

impl Epilogue {
    fn code(self) -> cublasLtEpilogue_t {
        match self {
            Epilogue::None => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluAuxBias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            Epilogue::DGeluBGrad => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DGELU_BGRAD,
            Epilogue::BGradB => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        }
    }

    /// Whether the epilogue reads or writes the bias pointer.
    pub(crate) fn uses_bias(self) -> bool {
        !matches!(self, Epilogue::None)
    }

    /// Whether the epilogue reads or writes the aux pointer.
    pub(crate) fn uses_aux(self) -> bool {
        matches!(self, Epilogue::GeluAuxBias | Epilogue::DGeluBGrad)
    }
}

/// One column-major problem: everything a plan depends on (the cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Problem {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    /// Products in the batch (1: no batch attributes).
    pub batch: i32,
    /// Element strides between batch entries (0 broadcasts an operand).
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    /// dtype of A and B (bf16 or f16).
    pub ab: DType,
    /// dtype of C and D (A's dtype or f32).
    pub cd: DType,
    /// dtype of the bias (or bias gradient) vector of the epilogue: D's by default.
    pub bias: DType,
    pub epilogue: Epilogue,
    /// Leading dimension of the aux matrix (0 without one).
    pub aux_ld: i64,
    /// The guaranteed alignment of the A, B, C, D pointers in bytes (a power of two ≤ 256):
    /// the heuristic only picks algorithms that work with it.
    pub align: u32,
}

/// Device addresses of one call (0 for an unused bias or aux).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pointers {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub bias: u64,
    pub aux: u64,
}

/// The largest power of two (≤ 256) dividing every address: the alignment to promise cuBLASLt.
pub(crate) fn alignment(ptrs: &[u64]) -> u32 {
    ptrs.iter().fold(256u32, |acc, &p| if p == 0 { acc } else { acc.min(1u32 << p.trailing_zeros().min(8)) })
}

fn lt_err(what: &str, e: lt::CublasError) -> Error {
    Error::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

fn data_type(d: DType) -> Result<cudaDataType_t> {
    Ok(match d {
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        other => return Err(Error::DType { op: "cuBLASLt matmul", expected: "bf16, f16 or f32".into(), got: other }),
    })
}

/// A cached plan: descriptors and the chosen algorithm. Owned raw cuBLASLt objects.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 4],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in Plan::new, destroyed once here; errors at teardown are ignored.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// Sets one attribute from a value of type `T` (the attribute's C type).
unsafe fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: DescAttr, v: &T) -> Result<()> {
    lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, size_of::<T>())
        .map_err(|e| lt_err(&format!("set {attr:?}"), e))
}

fn layout(dtype: DType, rows: u64, cols: u64, ld: i64, batch: i32, stride: i64) -> Result<sys::cublasLtMatrixLayout_t> {
    let l = lt::create_matrix_layout(data_type(dtype)?, rows, cols, ld).map_err(|e| lt_err("matrix layout", e))?;
    if batch > 1 {
        // SAFETY: l is a live layout; the values have the attributes' C types (int32, int64).
        unsafe {
            let set = |attr: LayoutAttr, p: *const c_void, n: usize| {
                lt::set_matrix_layout_attribute(l, attr, p, n).map_err(|e| lt_err("batch layout", e))
            };
            let r = set(LayoutAttr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch as *const i32 as _, 4).and_then(|()| {
                set(LayoutAttr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride as *const i64 as _, 8)
            });
            if let Err(e) = r {
                let _ = lt::destroy_matrix_layout(l);
                return Err(e);
            }
        }
    }
    Ok(l)
}

impl Plan {
    fn new(handle: sys::cublasLtHandle_t, p: &Problem) -> Result<Plan> {
        let desc = lt::create_matmul_desc(cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType_t::CUDA_R_32F)
            .map_err(|e| lt_err("matmul descriptor", e))?;
        let mut plan =
            Plan { desc, layouts: [std::ptr::null_mut(); 4], algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] } };
        let (a_rows, a_cols) = if p.trans_a { (p.k, p.m) } else { (p.m, p.k) };
        let (b_rows, b_cols) = if p.trans_b { (p.n, p.k) } else { (p.k, p.n) };
        plan.layouts[0] = layout(p.ab, a_rows, a_cols, p.lda, p.batch, p.stride_a)?;
        plan.layouts[1] = layout(p.ab, b_rows, b_cols, p.ldb, p.batch, p.stride_b)?;
        plan.layouts[2] = layout(p.cd, p.m, p.n, p.ldc, p.batch, p.stride_c)?;
        plan.layouts[3] = layout(p.cd, p.m, p.n, p.ldc, p.batch, p.stride_c)?;
        // SAFETY: live descriptor; values of the attributes' C types (int32 ops, uint32 epilogue, int64 ld).
        unsafe {
            let op = |t: bool| if t { 1i32 } else { 0i32 }; // CUBLAS_OP_T / CUBLAS_OP_N
            set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &op(p.trans_a))?;
            set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &op(p.trans_b))?;
            set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &(p.epilogue.code() as u32))?;
            if p.epilogue.uses_aux() {
                set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &p.aux_ld)?;
            }
            if p.epilogue.uses_bias() {
                // The bias (or bias gradient) dtype, said explicitly (cudaDataType, int32).
                set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(data_type(p.bias)? as i32))?;
                // The heuristic sees the epilogue's pointers set (to a placeholder aligned like
                // ours); each call sets the real ones.
                let placeholder: u64 = 256;
                set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &placeholder)?;
                if p.epilogue.uses_aux() {
                    set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &placeholder)?;
                }
            }
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let heuristic = (|| {
            // SAFETY: live preference; uint64 workspace bytes and uint32 alignments.
            unsafe {
                let set = |attr: PrefAttr, p: *const c_void, n: usize| {
                    lt::set_matmul_pref_attribute(pref, attr, p, n).map_err(|e| lt_err("preference", e))
                };
                let ws = WORKSPACE_BYTES as u64;
                set(PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as _, 8)?;
                for attr in [
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    set(attr, &p.align as *const u32 as _, 4)?;
                }
                let l = &plan.layouts;
                lt::get_matmul_algo_heuristic(handle, desc, l[0], l[1], l[2], l[3], pref)
                    .map_err(|e| lt_err(&format!("heuristic (no algorithm for {p:?})"), e))
            }
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        let h = heuristic?;
        if h.workspaceSize > WORKSPACE_BYTES {
            return Err(Error::Cuda(format!(
                "cuBLASLt heuristic chose an algorithm needing {} bytes of workspace, over the {WORKSPACE_BYTES} given",
                h.workspaceSize
            )));
        }
        plan.algo = h.algo;
        Ok(plan)
    }
}

/// A device's cuBLASLt handle, workspace and plan cache, bound to its stream.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// `Err(message)` caches a problem cuBLASLt has no algorithm for, so it is asked only once.
    plans: Mutex<HashMap<Problem, std::result::Result<Plan, String>>>,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle and the plans' descriptors are used only under the `plans` lock (a call
// sets the epilogue pointers and enqueues the matmul while holding it).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in Lt::new, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Lt {
    /// A handle and a 32 MiB workspace on `stream`'s device.
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        stream.context().bind_to_thread().map_err(cuda_err)?;
        let handle = lt::create_handle().map_err(|e| lt_err("create handle", e))?;
        // SAFETY: scratch memory; cuBLASLt never reads what it did not write.
        let workspace = match unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) } {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above.
                unsafe {
                    let _ = lt::destroy_handle(handle);
                }
                return Err(cuda_err(e));
            }
        };
        Ok(Lt { handle, workspace, plans: Mutex::new(HashMap::new()), stream })
    }

    /// Number of cached plans (for tests and benches).
    pub(crate) fn cached_plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Whether cuBLASLt has an algorithm for `p` (plans it on first ask).
    pub(crate) fn supports(&self, p: &Problem) -> bool {
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        plans.entry(*p).or_insert_with(|| Plan::new(self.handle, p).map_err(|e| e.to_string())).is_ok()
    }

    /// Enqueues `D = epilogue(alpha · op(A) op(B) + beta · C)` on the stream, planning `p` on
    /// first use. With `beta = 0`, C is not read (pass D's address).
    ///
    /// # Safety
    /// The pointers address device memory of this stream's device holding the matrices `p`
    /// describes (batch included), bias and aux of the epilogue's sizes; D (and a written bias
    /// or aux) must not be read by anyone else until the stream gets there. C may equal D
    /// (in-place accumulation, same layout).
    pub(crate) unsafe fn matmul(&self, p: &Problem, ptrs: &Pointers, alpha: f32, beta: f32) -> Result<()> {
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        let plan = plans.entry(*p).or_insert_with(|| Plan::new(self.handle, p).map_err(|e| e.to_string()));
        let plan = plan.as_ref().map_err(|e| Error::Cuda(e.clone()))?;
        if p.epilogue.uses_bias() {
            set_desc(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptrs.bias)?;
        }
        if p.epilogue.uses_aux() {
            set_desc(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &ptrs.aux)?;
        }
        let (ws, _ws_guard) = self.workspace.device_ptr(&self.stream);
        let l = &plan.layouts;
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            ptrs.a as *const c_void,
            l[0],
            ptrs.b as *const c_void,
            l[1],
            ptrs.c as *const c_void,
            l[2],
            ptrs.d as *mut c_void,
            l[3],
            &plan.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| lt_err("matmul", e))
    }
}

/// A host model of one `cublasLtMatmul` call as cuBLASLt documents it (column-major, batch,
/// transposes, leading dimensions, beta, and our epilogues), over host buffers named by their
/// "addresses": what the CPU tests of the row-major mapping (`blas::problem`, `blas::pointers`)
/// and of the fused linear calls run, since no GPU checks them in CI.
#[cfg(test)]
pub(crate) fn emulate(
    p: &Problem,
    ptrs: &Pointers,
    alpha: f32,
    beta: f32,
    buffers: &mut HashMap<u64, Vec<f32>>,
    gelu: impl Fn(f64) -> f64,
    gelu_grad: impl Fn(f64) -> f64,
) {
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    let (lda, ldb, ldc, aux_ld) = (p.lda as usize, p.ldb as usize, p.ldc as usize, p.aux_ld as usize);
    let get = |b: &HashMap<u64, Vec<f32>>, ptr: u64, i: usize| b[&ptr][i] as f64;
    let mut d = buffers.get(&ptrs.d).cloned().unwrap_or_default();
    let mut bias_out = vec![0.0f64; if p.epilogue == Epilogue::BGradB { n } else { m }];
    let mut aux_out = if p.epilogue == Epilogue::GeluAuxBias { buffers[&ptrs.aux].clone() } else { Vec::new() };
    for q in 0..p.batch as usize {
        let (oa, ob, oc) = (q * p.stride_a as usize, q * p.stride_b as usize, q * p.stride_c as usize);
        let op_a = |i: usize, l: usize| get(buffers, ptrs.a, oa + if p.trans_a { l + i * lda } else { i + l * lda });
        let op_b = |l: usize, j: usize| get(buffers, ptrs.b, ob + if p.trans_b { j + l * ldb } else { l + j * ldb });
        for j in 0..n {
            for i in 0..m {
                let mut acc = alpha as f64 * (0..k).map(|l| op_a(i, l) * op_b(l, j)).sum::<f64>();
                if beta != 0.0 {
                    acc += beta as f64 * get(buffers, ptrs.c, oc + i + j * ldc);
                }
                let v = match p.epilogue {
                    Epilogue::None | Epilogue::BGradB => acc,
                    Epilogue::Bias => acc + get(buffers, ptrs.bias, i),
                    Epilogue::GeluAuxBias => {
                        let t = acc + get(buffers, ptrs.bias, i);
                        aux_out[i + j * aux_ld] = t as f32;
                        gelu(t)
                    }
                    Epilogue::DGeluBGrad => {
                        let v = acc * gelu_grad(get(buffers, ptrs.aux, i + j * aux_ld));
                        bias_out[i] += v;
                        v
                    }
                };
                d[oc + i + j * ldc] = v as f32;
            }
        }
        if p.epilogue == Epilogue::BGradB {
            for (j, b) in bias_out.iter_mut().enumerate() {
                *b += (0..k).map(|l| op_b(l, j)).sum::<f64>();
            }
        }
    }
    buffers.insert(ptrs.d, d);
    if p.epilogue == Epilogue::GeluAuxBias {
        buffers.insert(ptrs.aux, aux_out);
    }
    if matches!(p.epilogue, Epilogue::DGeluBGrad | Epilogue::BGradB) {
        buffers.insert(ptrs.bias, bias_out.into_iter().map(|v| v as f32).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_common_power_of_two_up_to_256() {
        assert_eq!(alignment(&[0x1000, 0x2000]), 256);
        assert_eq!(alignment(&[0x1000, 0x1010]), 16);
        assert_eq!(alignment(&[0x1000, 0x1002, 0]), 2);
        assert_eq!(alignment(&[]), 256);
    }
}
