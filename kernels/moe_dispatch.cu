// moe_dispatch.cu: V-MoE dispatch (tokens → expert buffers) and combine (expert buffers →
// tokens, weighted), forward and backward, from the maps of routing.cu. No atomics: every
// output element is computed by one thread (or one warp) in a fixed order, so results are
// deterministic and equal the CPU reference (`crates/tensor/src/cpu/moe_dispatch.rs`).
//
// Layout: x, y, dy [S, D]; buffers src, out, dsrc [R, D] (R = E·slots) row-major in T;
// pos [S, k] i32 (buffer row of each assignment, −1 dropped); slot_src [R] i32 (assignment
// t·k + j of each row, −1 empty); weight [S, k] f32 or null (every weight 1). Indices outside
// their range are treated as −1 (the maps come from routing.cu and are in range).
//   moe_dispatch_<dt>(x, slot_src, out, rows, d, k, s)        out[r] = x[slot_src[r] / k] or 0
//   moe_combine_<dt>(src, pos, weight, y, s, d, k, rows)      y[t] = Σ_j weight[t,j]·src[pos[t,j]]
//       (j ascending, f32, no FMA: the host's order and rounding); with weight null, the
//       backward of dispatch.
//   moe_scale_rows_<dt>(dy, slot_src, weight, dsrc, rows, d, k, s)
//       dsrc[r] = weight[a]·dy[a / k] for a = slot_src[r], 0 for an empty row: combine's
//       backward for its buffer.
//   moe_combine_dweight_<dt>(dy, src, pos, dw, s, d, k, rows)
//       dw[t, j] = ⟨dy[t], src[pos[t, j]]⟩ (0 where dropped), one warp per assignment, f32.
// Launch: 1-D grid-stride loops of 256 threads; the dweight kernel 8 warps per block.
#include "common.cuh"

__device__ __forceinline__ bool in_range(long long i, long long n) { return i >= 0 && i < n; }

template <class T>
__device__ void moe_dispatch_impl(const T* x, const int* slot_src, T* out, long long rows, long long d, long long k,
                                  long long s) {
    const long long total = rows * d;
    for (long long i = global_thread(); i < total; i += grid_threads()) {
        const long long r = i / d, c = i % d;
        const long long a = slot_src[r];
        const long long t = a >= 0 ? a / k : -1;
        out[i] = in_range(t, s) ? x[t * d + c] : from_f32<T>(0.f);
    }
}

template <class T>
__device__ void moe_combine_impl(const T* src, const int* pos, const float* weight, T* y, long long s, long long d,
                                 long long k, long long rows) {
    const long long total = s * d;
    for (long long i = global_thread(); i < total; i += grid_threads()) {
        const long long t = i / d, c = i % d;
        float acc = 0.f;
        for (long long j = 0; j < k; ++j) {
            const long long p = pos[t * k + j];
            if (!in_range(p, rows)) continue;
            const float v = load(src, p * d + c);
            acc = __fadd_rn(acc, weight ? __fmul_rn(weight[t * k + j], v) : v);
        }
        store(y, i, acc);
    }
}

template <class T>
__device__ void moe_scale_rows_impl(const T* dy, const int* slot_src, const float* weight, T* dsrc, long long rows,
                                    long long d, long long k, long long s) {
    const long long total = rows * d;
    for (long long i = global_thread(); i < total; i += grid_threads()) {
        const long long r = i / d, c = i % d;
        const long long a = slot_src[r];
        const long long t = a >= 0 ? a / k : -1;
        store(dsrc, i, in_range(t, s) ? __fmul_rn(weight[a], load(dy, t * d + c)) : 0.f);
    }
}

template <class T>
__device__ void moe_combine_dweight_impl(const T* dy, const T* src, const int* pos, float* dw, long long s,
                                         long long d, long long k, long long rows) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long a = global_thread() >> 5; a < s * k; a += warps) {
        const long long p = pos[a], t = a / k;
        float acc = 0.f;
        if (in_range(p, rows)) {
            for (long long c = lane; c < d; c += 32) acc += load(dy, t * d + c) * load(src, p * d + c);
        }
        acc = warp_sum(acc);
        if (lane == 0) dw[a] = acc;
    }
}

#define MOE_DISPATCH(name, T)                                                                                        \
    extern "C" __global__ void moe_dispatch_##name(const T* x, const int* slot_src, T* out, long long rows,         \
                                                   long long d, long long k, long long s) {                         \
        moe_dispatch_impl(x, slot_src, out, rows, d, k, s);                                                          \
    }                                                                                                                \
    extern "C" __global__ void moe_combine_##name(const T* src, const int* pos, const float* weight, T* y,          \
                                                  long long s, long long d, long long k, long long rows) {          \
        moe_combine_impl(src, pos, weight, y, s, d, k, rows);                                                        \
    }                                                                                                                \
    extern "C" __global__ void moe_scale_rows_##name(const T* dy, const int* slot_src, const float* weight,         \
                                                     T* dsrc, long long rows, long long d, long long k,             \
                                                     long long s) {                                                 \
        moe_scale_rows_impl(dy, slot_src, weight, dsrc, rows, d, k, s);                                              \
    }                                                                                                                \
    extern "C" __global__ void moe_combine_dweight_##name(const T* dy, const T* src, const int* pos, float* dw,     \
                                                          long long s, long long d, long long k, long long rows) {  \
        moe_combine_dweight_impl(dy, src, pos, dw, s, d, k, rows);                                                   \
    }
MOE_DISPATCH(f32, float)
MOE_DISPATCH(bf16, bf16)
MOE_DISPATCH(f16, f16)
