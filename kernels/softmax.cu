// softmax.cu: softmax over the last dim (forward, backward) and the two classification losses.
//
// Layout: x, y, dy, logits [rows, n] row-major in T; targets [rows, n] f32 (the host widens
// bf16/f16 targets to f32 first, exactly); loss and dloss [rows] f32.
// Algorithm: one block per row (grid-stride over rows), block reductions with __shfl_xor_sync;
// each row is read a few times from global memory (L1/L2 resident) instead of being staged.
//   softmax_fwd_<dt>(x, y, rows, n)                  y = exp(x - max) / Σ exp(x - max)
//   softmax_bwd_<dt>(y, dy, dx, rows, n)             dx = y·(dy − Σ dy·y)
//   softmax_cross_entropy_fwd_<dt>(z, t, loss, rows, n)
//       loss = −Σ_j t_j·(z_j − lse), terms with t_j = 0 skipped (as the CPU reference does)
//   softmax_cross_entropy_bwd_<dt>(z, t, dloss, dz, rows, n)
//       dz = dloss·(softmax(z)·Σ t − t)
//   sigmoid_cross_entropy_fwd_<dt>(z, t, loss, rows, n)
//       loss = Σ_j max(z,0) − z·t + log1p(exp(−|z|))
//   sigmoid_cross_entropy_bwd_<dt>(z, t, dloss, dz, total, n)   (elementwise, 1-D grid-stride)
//       dz = dloss[row]·(1/(1+exp(−z)) − t)
//   softmax_cross_entropy_fused_<dt>(z, t, dloss, loss, dz, rows, n, per_warp)
//       both of the above in one kernel (fast path, self-checked before use): one row per warp
//       (per_warp, n <= 1024) or per block; passes over the row: max; Σ exp(z − max) and Σ t;
//       then dz and the loss terms together. 16-byte vector loads and stores of z, t and dz
//       when n is a multiple of the vector width and every pointer is 16-byte aligned
//       (checked in the kernel), scalar otherwise. Row offsets 64-bit, within a row 32-bit.
// Launch: row kernels use blocks of a multiple of 32 threads (≤ 1024), no dynamic shared
// memory; the elementwise kernel blocks of 256.
// Precision: loads to f32, all sums, max and exp in f32, one rounding on store.
#include "common.cuh"
#include "vec.cuh"

// Maximum and Σ exp(v − max) of a row, returned to every thread of the block.
template <class T>
__device__ __forceinline__ void row_max_sumexp(const T* r, long long n, float& mx, float& sum) {
    float m = NEG_INF;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, load(r, j));
    mx = block_max(m);
    float s = 0.f;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) s += expf(load(r, j) - mx);
    sum = block_sum(s);
}

template <class T>
__device__ void softmax_fwd_impl(const T* x, T* y, long long rows, long long n) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * n;
        T* yr = y + row * n;
        float mx, sum;
        row_max_sumexp(xr, n, mx, sum);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) store(yr, j, expf(load(xr, j) - mx) / sum);
    }
}

template <class T>
__device__ void softmax_bwd_impl(const T* y, const T* dy, T* dx, long long rows, long long n) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* yr = y + row * n;
        const T* dyr = dy + row * n;
        T* dxr = dx + row * n;
        float s = 0.f;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) s += load(yr, j) * load(dyr, j);
        const float dot = block_sum(s);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) store(dxr, j, load(yr, j) * (load(dyr, j) - dot));
    }
}

template <class T>
__device__ void softmax_xent_fwd_impl(const T* z, const float* t, float* loss, long long rows, long long n) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* zr = z + row * n;
        const float* tr = t + row * n;
        float mx, sum;
        row_max_sumexp(zr, n, mx, sum);
        const float lse = mx + logf(sum);
        float s = 0.f;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const float tv = tr[j];
            if (tv != 0.f) s += tv * (load(zr, j) - lse);
        }
        const float total = block_sum(s);
        if (threadIdx.x == 0) loss[row] = -total;
    }
}

template <class T>
__device__ void softmax_xent_bwd_impl(const T* z, const float* t, const float* dloss, T* dz, long long rows, long long n) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* zr = z + row * n;
        const float* tr = t + row * n;
        T* dzr = dz + row * n;
        float mx, sum;
        row_max_sumexp(zr, n, mx, sum);
        float ts = 0.f;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) ts += tr[j];
        const float tsum = block_sum(ts);
        const float g = dloss[row];
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const float p = expf(load(zr, j) - mx) / sum;
            store(dzr, j, g * (p * tsum - tr[j]));
        }
    }
}

template <class T>
__device__ void sigmoid_xent_fwd_impl(const T* z, const float* t, float* loss, long long rows, long long n) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* zr = z + row * n;
        const float* tr = t + row * n;
        float s = 0.f;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const float zv = load(zr, j);
            s += fmaxf(zv, 0.f) - zv * tr[j] + log1pf(expf(-fabsf(zv)));
        }
        const float total = block_sum(s);
        if (threadIdx.x == 0) loss[row] = total;
    }
}

template <class T>
__device__ void sigmoid_xent_bwd_impl(const T* z, const float* t, const float* dloss, T* dz, long long total, long long n) {
    for (long long i = global_thread(); i < total; i += grid_threads()) {
        const float sig = 1.f / (1.f + expf(-load(z, i)));
        store(dz, i, dloss[i / n] * (sig - t[i]));
    }
}

__device__ __forceinline__ float xent_sum(float v, int per_warp) { return per_warp ? warp_sum(v) : block_sum(v); }
__device__ __forceinline__ float xent_max(float v, int per_warp) { return per_warp ? warp_max(v) : block_max(v); }

template <class T, int V>
__device__ void softmax_xent_fused_impl(const T* z, const float* t, const float* dloss, float* loss, T* dz,
                                        long long rows, int n, int per_warp) {
    const int lane = per_warp ? (threadIdx.x & 31) : threadIdx.x;
    const int size = per_warp ? 32 : blockDim.x;
    const long long first = per_warp ? (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5) : blockIdx.x;
    const long long stride = per_warp ? (long long)gridDim.x * (blockDim.x >> 5) : gridDim.x;
    const int chunks = n / V;
    for (long long row = first; row < rows; row += stride) {
        const long long off = row * n;
        float m = NEG_INF;
        for (int c = lane; c < chunks; c += size) {
            float a[V];
            load_v<T, V>(z + off, (long long)c * V, a);
#pragma unroll
            for (int k = 0; k < V; ++k) m = fmaxf(m, a[k]);
        }
        const float mx = xent_max(m, per_warp);
        float se = 0.f, ts = 0.f;
        for (int c = lane; c < chunks; c += size) {
            float a[V], tv[V];
            load_v<T, V>(z + off, (long long)c * V, a);
            load_v<float, V>(t + off, (long long)c * V, tv);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                se += expf(a[k] - mx);
                ts += tv[k];
            }
        }
        const float sum = xent_sum(se, per_warp), tsum = xent_sum(ts, per_warp);
        const float lse = mx + logf(sum), g = dloss[row];
        float l = 0.f;
        for (int c = lane; c < chunks; c += size) {
            float a[V], tv[V], o[V];
            load_v<T, V>(z + off, (long long)c * V, a);
            load_v<float, V>(t + off, (long long)c * V, tv);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                o[k] = g * (expf(a[k] - mx) / sum * tsum - tv[k]);
                if (tv[k] != 0.f) l += tv[k] * (a[k] - lse);
            }
            store_v<T, V>(dz + off, (long long)c * V, o);
        }
        const float total = xent_sum(l, per_warp);
        if (lane == 0) loss[row] = -total;
    }
}

#define SOFTMAX(name, T)                                                                                              \
    extern "C" __global__ void softmax_fwd_##name(const T* x, T* y, long long rows, long long n) {                   \
        softmax_fwd_impl(x, y, rows, n);                                                                              \
    }                                                                                                                 \
    extern "C" __global__ void softmax_bwd_##name(const T* y, const T* dy, T* dx, long long rows, long long n) {     \
        softmax_bwd_impl(y, dy, dx, rows, n);                                                                         \
    }                                                                                                                 \
    extern "C" __global__ void softmax_cross_entropy_fwd_##name(const T* z, const float* t, float* loss, long long rows, \
                                                                long long n) {                                        \
        softmax_xent_fwd_impl(z, t, loss, rows, n);                                                                   \
    }                                                                                                                 \
    extern "C" __global__ void softmax_cross_entropy_bwd_##name(const T* z, const float* t, const float* dloss, T* dz,  \
                                                                long long rows, long long n) {                        \
        softmax_xent_bwd_impl(z, t, dloss, dz, rows, n);                                                              \
    }                                                                                                                 \
    extern "C" __global__ void sigmoid_cross_entropy_fwd_##name(const T* z, const float* t, float* loss, long long rows, \
                                                                long long n) {                                        \
        sigmoid_xent_fwd_impl(z, t, loss, rows, n);                                                                   \
    }                                                                                                                 \
    extern "C" __global__ void sigmoid_cross_entropy_bwd_##name(const T* z, const float* t, const float* dloss, T* dz,  \
                                                                long long total, long long n) {                       \
        sigmoid_xent_bwd_impl(z, t, dloss, dz, total, n);                                                             \
    }                                                                                                                 \
    extern "C" __global__ void softmax_cross_entropy_fused_##name(const T* z, const float* t, const float* dloss,     \
                                                                  float* loss, T* dz, long long rows, int n,          \
                                                                  int per_warp) {                                     \
        if (n % VecN<T>::n == 0 && aligned16(z) && aligned16(t) && aligned16(dz))                                     \
            softmax_xent_fused_impl<T, VecN<T>::n>(z, t, dloss, loss, dz, rows, n, per_warp);                         \
        else                                                                                                          \
            softmax_xent_fused_impl<T, 1>(z, t, dloss, loss, dz, rows, n, per_warp);                                  \
    }
SOFTMAX(f32, float)
SOFTMAX(bf16, bf16)
SOFTMAX(f16, f16)
