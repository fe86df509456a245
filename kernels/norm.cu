// norm.cu: LayerNorm and RMSNorm over the last dim, forward and backward.
//
// Layout: x, y, dy, dx are [rows, d] row-major; weight and bias [d] (x's dtype); mean and rstd
// [rows] f32. Absent weight/bias are flagged by has_w/has_b (the pointer is then a dummy).
//
// layer_norm_fwd_<dt>(x, w, b, y, mean, rstd, rows, d, eps, rms, has_w, has_b)
//   One block per row (grid-stride over rows), block reductions with __shfl_xor_sync.
//   LayerNorm: mean = Σx/d, var = Σ(x-mean)²/d (two passes over the row, like the CPU
//   reference), rstd = 1/sqrt(var+eps). RMS: mean = 0, rstd = 1/sqrt(Σx²/d + eps).
//   y = (x-mean)·rstd·w + b.
// layer_norm_bwd_<dt>(x, w, mean, rstd, dy, dx, rows, d, rms, has_w)
//   One block per row: g = dy·w, xhat = (x-mean)·rstd,
//   dx = rstd·(g − mean(g) − xhat·mean(g·xhat)) (mean(g) dropped for RMS).
// layer_norm_bwd_params_<dt>(x, mean, rstd, dy, dw_part, db_part, rows, d, rows_per_chunk)
//   Partial column sums for the parameter gradients: grid (ceil(d/blockDim), chunks); thread
//   (column j, chunk c) sums dy·xhat and dy over rows [c·rows_per_chunk, (c+1)·rows_per_chunk)
//   into dw_part[c, j], db_part[c, j] (f32 [chunks, d]). The host then sums the chunks in
//   order with reduce.cu's reduce_finalize_<dt> (deterministic, no atomics).
// Launch: row kernels use blocks of a multiple of 32 threads (≤ 1024), no dynamic shared
// memory (the block reductions use 32 floats of static shared memory).
// Precision: loads to f32, all sums in f32, one rounding on store.
#include "common.cuh"

template <class T>
__device__ void layer_norm_fwd_impl(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, long long rows,
                                    long long d, float eps, int rms, int has_w, int has_b) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * d;
        T* yr = y + row * d;
        float mu = 0.f;
        if (!rms) {
            float s = 0.f;
            for (long long j = threadIdx.x; j < d; j += blockDim.x) s += load(xr, j);
            mu = block_sum(s) / (float)d;
        }
        float v = 0.f;
        for (long long j = threadIdx.x; j < d; j += blockDim.x) {
            const float t = load(xr, j) - mu;
            v += t * t;
        }
        const float var = block_sum(v) / (float)d;
        const float rs = 1.f / sqrtf(var + eps);
        for (long long j = threadIdx.x; j < d; j += blockDim.x) {
            float o = (load(xr, j) - mu) * rs;
            if (has_w) o *= load(w, j);
            if (has_b) o += load(b, j);
            store(yr, j, o);
        }
        if (threadIdx.x == 0) {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

template <class T>
__device__ void layer_norm_bwd_impl(const T* x, const T* w, const float* mean, const float* rstd, const T* dy, T* dx,
                                    long long rows, long long d, int rms, int has_w) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * d;
        const T* dyr = dy + row * d;
        T* dxr = dx + row * d;
        const float mu = mean[row], rs = rstd[row];
        float gs = 0.f, gxs = 0.f;
        for (long long j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = has_w ? load(dyr, j) * load(w, j) : load(dyr, j);
            gs += g;
            gxs += g * ((load(xr, j) - mu) * rs);
        }
        const float g_mean = rms ? 0.f : block_sum(gs) / (float)d;
        const float gx_mean = block_sum(gxs) / (float)d;
        for (long long j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = has_w ? load(dyr, j) * load(w, j) : load(dyr, j);
            const float xhat = (load(xr, j) - mu) * rs;
            store(dxr, j, rs * (g - g_mean - xhat * gx_mean));
        }
    }
}

template <class T>
__device__ void layer_norm_bwd_params_impl(const T* x, const float* mean, const float* rstd, const T* dy, float* dw_part,
                                           float* db_part, long long rows, long long d, long long rows_per_chunk) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const long long chunk = blockIdx.y;
    const long long r0 = chunk * rows_per_chunk;
    const long long r1 = min(rows, r0 + rows_per_chunk);
    float dw = 0.f, db = 0.f;
    for (long long r = r0; r < r1; ++r) {
        const float g = load(dy, r * d + j);
        dw += g * ((load(x, r * d + j) - mean[r]) * rstd[r]);
        db += g;
    }
    dw_part[chunk * d + j] = dw;
    db_part[chunk * d + j] = db;
}

#define NORM(name, T)                                                                                                  \
    extern "C" __global__ void layer_norm_fwd_##name(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, \
                                                     long long rows, long long d, float eps, int rms, int has_w,        \
                                                     int has_b) {                                                      \
        layer_norm_fwd_impl(x, w, b, y, mean, rstd, rows, d, eps, rms, has_w, has_b);                                  \
    }                                                                                                                  \
    extern "C" __global__ void layer_norm_bwd_##name(const T* x, const T* w, const float* mean, const float* rstd,      \
                                                     const T* dy, T* dx, long long rows, long long d, int rms,          \
                                                     int has_w) {                                                      \
        layer_norm_bwd_impl(x, w, mean, rstd, dy, dx, rows, d, rms, has_w);                                            \
    }                                                                                                                  \
    extern "C" __global__ void layer_norm_bwd_params_##name(const T* x, const float* mean, const float* rstd,           \
                                                            const T* dy, float* dw_part, float* db_part, long long rows, \
                                                            long long d, long long rows_per_chunk) {                   \
        layer_norm_bwd_params_impl(x, mean, rstd, dy, dw_part, db_part, rows, d, rows_per_chunk);                      \
    }
NORM(f32, float)
NORM(bf16, bf16)
NORM(f16, f16)
