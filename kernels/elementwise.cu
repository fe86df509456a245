// elementwise.cu: casts, add/sub/mul, scale, bias add, GELU forward and backward.
//
// Algorithm: one thread per element in a 1-D grid-stride loop (64-bit indices), so any size
// works with any grid (the host caps the grid). No shared memory.
// Layout: contiguous row-major; bias_add sees x as [rows, width] and adds bias[width] to each
// row. (bias_add's backward, a column sum, is the `reduce_lines`/`reduce_finalize` pair of
// reduce.cu.)
// Launch: block 256 threads, grid min(ceil(n / 256), cap) blocks.
// Precision: every value is loaded to f32, computed in f32 and rounded to the output dtype once
// (round to nearest even). GELU and tanh use the device's tanhf / erff / expf.
//
// Kernels (dtype in f32, bf16, f16):
//   cast_<from>_<to>(const From* x, To* y, i64 n)                       from != to
//   add_<dt>, sub_<dt>, mul_<dt>(const T* a, const T* b, T* y, i64 n)
//   scale_<dt>(const T* x, T* y, f32 s, i64 n)
//   bias_add_<dt>(const T* x, const T* bias, T* y, i64 n, i64 width)
//   act_fwd_<dt>(const T* x, T* y, i64 n, i32 kind)      kind 0 = GELU (tanh), 1 = GELU (erf), 2 = tanh
//   act_bwd_<dt>(const T* x, const T* dy, T* dx, i64 n, i32 kind)   dx = dy * act'(x)
#include "common.cuh"

template <class From, class To>
__device__ void cast_impl(const From* x, To* y, long long n) {
    for (long long i = global_thread(); i < n; i += grid_threads()) store(y, i, load(x, i));
}

#define CAST(from_name, From, to_name, To) \
    extern "C" __global__ void cast_##from_name##_##to_name(const From* x, To* y, long long n) { cast_impl(x, y, n); }
CAST(f32, float, bf16, bf16)
CAST(f32, float, f16, f16)
CAST(bf16, bf16, f32, float)
CAST(bf16, bf16, f16, f16)
CAST(f16, f16, f32, float)
CAST(f16, f16, bf16, bf16)

// op: 0 add, 1 sub, 2 mul.
template <int OP, class T>
__device__ void binary_impl(const T* a, const T* b, T* y, long long n) {
    for (long long i = global_thread(); i < n; i += grid_threads()) {
        const float u = load(a, i), v = load(b, i);
        store(y, i, OP == 0 ? u + v : OP == 1 ? u - v : u * v);
    }
}

template <class T>
__device__ void scale_impl(const T* x, T* y, float s, long long n) {
    for (long long i = global_thread(); i < n; i += grid_threads()) store(y, i, load(x, i) * s);
}

template <class T>
__device__ void bias_add_impl(const T* x, const T* bias, T* y, long long n, long long width) {
    for (long long i = global_thread(); i < n; i += grid_threads()) store(y, i, load(x, i) + load(bias, i % width));
}

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_C 0.044715f
#define FRAC_1_SQRT_2 0.70710678f
#define INV_SQRT_2PI 0.39894228f

__device__ __forceinline__ float act(float x, int kind) {
    if (kind == 2) return tanhf(x);
    if (kind == 0) return 0.5f * x * (1.f + tanhf(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)));
    return 0.5f * x * (1.f + erff(x * FRAC_1_SQRT_2));
}

__device__ __forceinline__ float act_grad(float x, int kind) {
    if (kind == 2) {
        const float t = tanhf(x);
        return 1.f - t * t;
    }
    if (kind == 0) {
        const float t = tanhf(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
        const float du = SQRT_2_OVER_PI * (1.f + 3.f * GELU_C * x * x);
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du;
    }
    const float cdf = 0.5f * (1.f + erff(x * FRAC_1_SQRT_2));
    const float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
    return cdf + x * pdf;
}

template <class T>
__device__ void act_fwd_impl(const T* x, T* y, long long n, int kind) {
    for (long long i = global_thread(); i < n; i += grid_threads()) store(y, i, act(load(x, i), kind));
}

template <class T>
__device__ void act_bwd_impl(const T* x, const T* dy, T* dx, long long n, int kind) {
    for (long long i = global_thread(); i < n; i += grid_threads()) store(dx, i, load(dy, i) * act_grad(load(x, i), kind));
}

#define ELEMENTWISE(name, T)                                                                                      \
    extern "C" __global__ void add_##name(const T* a, const T* b, T* y, long long n) { binary_impl<0>(a, b, y, n); } \
    extern "C" __global__ void sub_##name(const T* a, const T* b, T* y, long long n) { binary_impl<1>(a, b, y, n); } \
    extern "C" __global__ void mul_##name(const T* a, const T* b, T* y, long long n) { binary_impl<2>(a, b, y, n); } \
    extern "C" __global__ void scale_##name(const T* x, T* y, float s, long long n) { scale_impl(x, y, s, n); }      \
    extern "C" __global__ void bias_add_##name(const T* x, const T* bias, T* y, long long n, long long width) {     \
        bias_add_impl(x, bias, y, n, width);                                                                       \
    }                                                                                                              \
    extern "C" __global__ void act_fwd_##name(const T* x, T* y, long long n, int kind) { act_fwd_impl(x, y, n, kind); } \
    extern "C" __global__ void act_bwd_##name(const T* x, const T* dy, T* dx, long long n, int kind) {              \
        act_bwd_impl(x, dy, dx, n, kind);                                                                          \
    }
ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, bf16)
ELEMENTWISE(f16, f16)
