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
//
// The kernels above are the reference path. The fast path (used after its self-check,
// crates/tensor/src/cuda/norm.rs) is:
//
// ln_fwd_fast_<dt>(x, r, h, w, b, y, mean, rstd, rows, d, eps, rms, has_r, has_w, has_b, per_warp)
//   One row per warp (per_warp = 1: blockDim.x/32 rows per block) or per block (wide rows),
//   grid-stride over rows. With has_r, h = x + r is formed first (rounded to T, stored) and
//   normalised: the fused residual add of a pre-LN block. Three passes over the row (sum,
//   centred sum of squares, output; the second and third hit L1), like the reference.
// ln_bwd_fast_<dt>(x, w, mean, rstd, dy, dres, dx, dw_part, db_part, rows, d, rms, has_w,
//                  has_res, want_params, per_warp)
//   dx as the reference (+ dres when has_res: the residual stream's gradient, added before
//   the one rounding), and in the same pass dγ = Σ dy·xhat, dβ = Σ dy: each thread owns the
//   same columns in every row of its group, so it accumulates them in its group's slice of
//   dynamic shared memory ([groups][2][d] f32, column c·V+k at k·(d/V)+c) without atomics; at the end the block folds
//   its groups in order into dw_part[block, :], db_part[block, :] (f32 [gridDim.x, d]), which
//   the host reduces over blocks in order (reduce.cu's reduce_finalize): deterministic for a
//   given shape (the grid depends only on rows and d).
// Vector loads: 16 bytes (4 f32, 8 bf16/f16) when d is a multiple of the vector width and
// every pointer is 16-byte aligned (checked in the kernel), scalar accesses otherwise.
// Index math: row offsets in 64 bits, within a row 32 bits (d < 2^31).
#include "common.cuh"
#include "vec.cuh"

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

// ---------------------------------------------------------------- fast path

// The rows a thread works on: its warp's (per_warp) or its block's, and its lane in that group.
struct RowGroup {
    int lane, size;
    long long first, stride;
};

__device__ __forceinline__ RowGroup row_group(int per_warp) {
    RowGroup g;
    if (per_warp) {
        const int warps = blockDim.x >> 5;
        g.lane = threadIdx.x & 31;
        g.size = 32;
        g.first = (long long)blockIdx.x * warps + (threadIdx.x >> 5);
        g.stride = (long long)gridDim.x * warps;
    } else {
        g.lane = threadIdx.x;
        g.size = blockDim.x;
        g.first = blockIdx.x;
        g.stride = gridDim.x;
    }
    return g;
}

// A sum over the group, returned to each of its threads (per_warp is uniform over the block).
__device__ __forceinline__ float group_sum(float v, int per_warp) { return per_warp ? warp_sum(v) : block_sum(v); }

template <class T, int V>
__device__ void ln_fwd_fast_impl(const T* x, const T* r, T* h, const T* w, const T* b, T* y, float* mean, float* rstd,
                                 long long rows, int d, float eps, int rms, int has_r, int has_w, int has_b,
                                 int per_warp) {
    const RowGroup grp = row_group(per_warp);
    const int chunks = d / V;
    for (long long row = grp.first; row < rows; row += grp.stride) {
        const long long off = row * d;
        const T* src = has_r ? h + off : x + off;
        float mu = 0.f;
        if (has_r || !rms) {
            float s = 0.f;
            for (int c = grp.lane; c < chunks; c += grp.size) {
                float a[V];
                load_v<T, V>(x + off, (long long)c * V, a);
                if (has_r) {
                    float q[V];
                    load_v<T, V>(r + off, (long long)c * V, q);
#pragma unroll
                    for (int k = 0; k < V; ++k) a[k] = to_f32(from_f32<T>(a[k] + q[k]));  // h as stored
                    store_v<T, V>(h + off, (long long)c * V, a);
                }
#pragma unroll
                for (int k = 0; k < V; ++k) s += a[k];
            }
            if (!rms) mu = group_sum(s, per_warp) / (float)d;
        }
        float v = 0.f;
        for (int c = grp.lane; c < chunks; c += grp.size) {
            float a[V];
            load_v<T, V>(src, (long long)c * V, a);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float t = a[k] - mu;
                v += t * t;
            }
        }
        const float rs = 1.f / sqrtf(group_sum(v, per_warp) / (float)d + eps);
        for (int c = grp.lane; c < chunks; c += grp.size) {
            float a[V], o[V], wv[V], bv[V];
            load_v<T, V>(src, (long long)c * V, a);
            if (has_w) load_v<T, V>(w, (long long)c * V, wv);
            if (has_b) load_v<T, V>(b, (long long)c * V, bv);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                o[k] = (a[k] - mu) * rs;
                if (has_w) o[k] *= wv[k];
                if (has_b) o[k] += bv[k];
            }
            store_v<T, V>(y + off, (long long)c * V, o);
        }
        if (grp.lane == 0) {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

template <class T, int V>
__device__ void ln_bwd_fast_impl(const T* x, const T* w, const float* mean, const float* rstd, const T* dy,
                                 const T* dres, T* dx, float* dw_part, float* db_part, long long rows, int d, int rms,
                                 int has_w, int has_res, int want_params, int per_warp) {
    extern __shared__ float acc[];  // [groups][2][d]: dγ then dβ partials of each group
    const RowGroup grp = row_group(per_warp);
    const int chunks = d / V;
    const int group = per_warp ? (threadIdx.x >> 5) : 0;
    const int groups = per_warp ? (blockDim.x >> 5) : 1;
    float* acc_w = acc + (long long)group * 2 * d;
    float* acc_b = acc_w + d;
    if (want_params) {
        for (int j = threadIdx.x; j < groups * 2 * d; j += blockDim.x) acc[j] = 0.f;
        __syncthreads();
    }
    for (long long row = grp.first; row < rows; row += grp.stride) {
        const long long off = row * d;
        const float mu = mean[row], rs = rstd[row];
        float gs = 0.f, gxs = 0.f;
        for (int c = grp.lane; c < chunks; c += grp.size) {
            float a[V], g[V], wv[V];
            load_v<T, V>(x + off, (long long)c * V, a);
            load_v<T, V>(dy + off, (long long)c * V, g);
            if (has_w) load_v<T, V>(w, (long long)c * V, wv);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float gk = has_w ? g[k] * wv[k] : g[k];
                gs += gk;
                gxs += gk * ((a[k] - mu) * rs);
            }
        }
        const float g_mean = rms ? 0.f : group_sum(gs, per_warp) / (float)d;
        const float gx_mean = group_sum(gxs, per_warp) / (float)d;
        for (int c = grp.lane; c < chunks; c += grp.size) {
            const int j = c * V;
            float a[V], g[V], wv[V], o[V], q[V];
            load_v<T, V>(x + off, j, a);
            load_v<T, V>(dy + off, j, g);
            if (has_w) load_v<T, V>(w, j, wv);
            if (has_res) load_v<T, V>(dres + off, j, q);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float xhat = (a[k] - mu) * rs;
                const float gk = has_w ? g[k] * wv[k] : g[k];
                o[k] = rs * (gk - g_mean - xhat * gx_mean);
                if (has_res) o[k] += q[k];
                if (want_params) {  // column j + k lives at [k][c]: a warp's lanes hit distinct banks
                    acc_w[k * chunks + c] += g[k] * xhat;
                    acc_b[k * chunks + c] += g[k];
                }
            }
            store_v<T, V>(dx + off, j, o);
        }
    }
    if (want_params) {
        __syncthreads();
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float sw = 0.f, sb = 0.f;
            const int at = (j % V) * chunks + j / V;
            for (int q = 0; q < groups; ++q) {
                sw += acc[(long long)q * 2 * d + at];
                sb += acc[(long long)q * 2 * d + d + at];
            }
            dw_part[(long long)blockIdx.x * d + j] = sw;
            db_part[(long long)blockIdx.x * d + j] = sb;
        }
    }
}

// Whether the 16-byte path applies: every pointer aligned (absent ones stand in as x) and
// rows of whole vectors.
template <class T>
__device__ __forceinline__ bool vector_ok(int d, const void* a, const void* b, const void* c, const void* e,
                                          const void* f, const void* g) {
    return d % VecN<T>::n == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(e) && aligned16(f) &&
           aligned16(g);
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
    }                                                                                                                  \
    extern "C" __global__ void ln_fwd_fast_##name(const T* x, const T* r, T* h, const T* w, const T* b, T* y,           \
                                                  float* mean, float* rstd, long long rows, int d, float eps, int rms,  \
                                                  int has_r, int has_w, int has_b, int per_warp) {                     \
        if (vector_ok<T>(d, x, r, h, w, b, y))                                                                         \
            ln_fwd_fast_impl<T, VecN<T>::n>(x, r, h, w, b, y, mean, rstd, rows, d, eps, rms, has_r, has_w, has_b,      \
                                            per_warp);                                                                 \
        else                                                                                                           \
            ln_fwd_fast_impl<T, 1>(x, r, h, w, b, y, mean, rstd, rows, d, eps, rms, has_r, has_w, has_b, per_warp);    \
    }                                                                                                                  \
    extern "C" __global__ void ln_bwd_fast_##name(const T* x, const T* w, const float* mean, const float* rstd,        \
                                                  const T* dy, const T* dres, T* dx, float* dw_part, float* db_part,    \
                                                  long long rows, int d, int rms, int has_w, int has_res,               \
                                                  int want_params, int per_warp) {                                     \
        if (vector_ok<T>(d, x, w, dy, dres, dx, dx))                                                                   \
            ln_bwd_fast_impl<T, VecN<T>::n>(x, w, mean, rstd, dy, dres, dx, dw_part, db_part, rows, d, rms, has_w,     \
                                            has_res, want_params, per_warp);                                           \
        else                                                                                                           \
            ln_bwd_fast_impl<T, 1>(x, w, mean, rstd, dy, dres, dx, dw_part, db_part, rows, d, rms, has_w, has_res,     \
                                   want_params, per_warp);                                                             \
    }
NORM(f32, float)
NORM(bf16, bf16)
NORM(f16, f16)
