// index.cu: row gather and scatter-add by index (MoE dispatch and combine).
//
// Layout: src [n, d] or [m, d] row-major in T; idx [m] i32, −1 meaning "no row" (the ops layer
// has checked every other entry is in range).
//   gather_rows_<dt>(src, idx, out, m, d)        out[i, c] = idx[i] < 0 ? 0 : src[idx[i], c]
//   scatter_add_rows_<dt>(src, idx, acc, m, d)   acc[idx[i], c] += src[i, c] for idx[i] ≥ 0
//       acc is an f32 [n, d] buffer zeroed by the host (atomicAdd on float; the order of the
//       additions is not deterministic); the host then casts it to T with elementwise.cu's
//       cast_f32_<dt> (for f32 the buffer is the output).
// Algorithm: one thread per element of [m, d] in a 1-D grid-stride loop (64-bit indices), so
// consecutive threads touch consecutive columns of a row.
// Launch: blocks of 256 threads; no shared memory.
// Precision: gather copies the stored values unchanged; scatter-add accumulates in f32.
#include "common.cuh"

template <class T>
__device__ void gather_rows_impl(const T* src, const int* idx, T* out, long long m, long long d) {
    const long long total = m * d;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long i = e / d, c = e % d;
        const long long r = idx[i];
        out[e] = r < 0 ? from_f32<T>(0.f) : src[r * d + c];
    }
}

template <class T>
__device__ void scatter_add_rows_impl(const T* src, const int* idx, float* acc, long long m, long long d) {
    const long long total = m * d;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long i = e / d, c = e % d;
        const long long r = idx[i];
        if (r >= 0) atomicAdd(acc + r * d + c, load(src, e));
    }
}

#define INDEX(name, T)                                                                                                \
    extern "C" __global__ void gather_rows_##name(const T* src, const int* idx, T* out, long long m, long long d) {  \
        gather_rows_impl(src, idx, out, m, d);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void scatter_add_rows_##name(const T* src, const int* idx, float* acc, long long m,         \
                                                       long long d) {                                                 \
        scatter_add_rows_impl(src, idx, acc, m, d);                                                                   \
    }
INDEX(f32, float)
INDEX(bf16, bf16)
INDEX(f16, f16)
