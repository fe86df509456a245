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
//   act_bwd_colsum_<dt>(x, dy, dx, part, rows, cols, rows_per_chunk, kind)
//       The MLP's GELU backward fused with the bias gradient of the layer before it: dx as
//       act_bwd over x, dy [rows, cols], and part[c, j] = Σ dx[r, j] (f32, over the stored,
//       rounded dx) for r in chunk c (rows_per_chunk consecutive rows, in order). A thread owns
//       16 bytes of columns (VecN elements) and walks its chunk's rows, so a warp reads 512
//       contiguous bytes of each row; grid (ceil(cols / (VecN·blockDim)), chunks). The chunks
//       are folded in order by reduce.cu's reduce_finalize (deterministic). Requires
//       cols % VecN == 0, 16-byte aligned pointers and rows·cols < 2^31 (the launcher checks).
//       In bf16 the derivative uses the hardware tanh (tanh.approx.f32, relative error 2^-11,
//       under bf16's 2^-9 rounding of the output) and __expf (FastAct): the accurate tanhf made
//       act_bwd compute-bound at about half the memory bandwidth on an H200. f16 (2^-12
//       rounding) and f32 keep the accurate functions.
//
// Each also as `<op>_v32_...` (same arguments): 32-bit index math and 16-byte vector accesses
// (4 f32 or 8 bf16/f16 per access; a cast moves 8 elements when either side is 16-bit), for
// n < 2^31 (the host picks it; the plain kernels above, 64-bit, serve larger tensors). The
// vector loop runs when every pointer is 16-byte aligned (and, for bias_add, width is a
// multiple of the vector width, so each vector of bias is contiguous and aligned); otherwise,
// and for the last n mod V elements, a scalar loop with the same 32-bit indices.
#include "common.cuh"
#include "vec.cuh"

// ---------------------------------------------------------------- 32-bit vector loop

// Calls op.step<V>(i) for i = 0, V, 2V, ... (vectors, when `vec`) and then op.step<1>(i) for
// each remaining element, in a grid-stride loop over unsigned 32-bit indices (n < 2^31 and at
// most 2^28 threads, so i + stride never wraps). Each op is a struct with the kernel's pointers
// and a `template <int V> step(i)` handling elements i..i+V (NVRTC takes no device lambdas).
template <int V, class Op>
__device__ __forceinline__ void vec_loop(unsigned n, bool vec, const Op& op) {
    const unsigned tid = blockIdx.x * blockDim.x + threadIdx.x, nt = gridDim.x * blockDim.x;
    unsigned start = 0;
    if (vec) {
        const unsigned nv = n / V;
        for (unsigned c = tid; c < nv; c += nt) op.template step<V>(c * V);
        start = nv * V;
    }
    for (unsigned i = start + tid; i < n; i += nt) op.template step<1>(i);
}

// Elements per vector step for a kernel reading A and writing B: 16 bytes of the narrower type.
template <class A, class B> struct VecPair {
    static constexpr int n = VecN<A>::n > VecN<B>::n ? VecN<A>::n : VecN<B>::n;
};

template <class From, class To>
__device__ void cast_impl(const From* x, To* y, long long n) {
    for (long long i = global_thread(); i < n; i += grid_threads()) store(y, i, load(x, i));
}

template <class From, class To> struct CastOp {
    const From* x;
    To* y;
    template <int V> __device__ __forceinline__ void step(unsigned i) const {
        float a[V];
        load_v<From, V>(x, i, a);
        store_v<To, V>(y, i, a);
    }
};

template <class From, class To>
__device__ void cast_v32(const From* x, To* y, unsigned n) {
    vec_loop<VecPair<From, To>::n>(n, aligned16(x) && aligned16(y), CastOp<From, To>{x, y});
}

#define CAST(from_name, From, to_name, To)                                                                     \
    extern "C" __global__ void cast_##from_name##_##to_name(const From* x, To* y, long long n) { cast_impl(x, y, n); } \
    extern "C" __global__ void cast_v32_##from_name##_##to_name(const From* x, To* y, long long n) {            \
        cast_v32(x, y, (unsigned)n);                                                                            \
    }
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


// tanh on the special-function unit (sm_75+): one instruction, relative error about 2^-11.
__device__ __forceinline__ float tanh_fast(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Whether act_bwd_colsum takes act_grad<true> (the fast tanh and exp) for T: bf16 only.
template <class T> struct FastAct {
    static constexpr bool on = false;
};
template <> struct FastAct<bf16> {
    static constexpr bool on = true;
};

// act'(x); FAST (for outputs stored in bf16) takes the hardware tanh and __expf.
template <bool FAST = false>
__device__ __forceinline__ float act_grad(float x, int kind) {
    if (kind == 2) {
        const float t = FAST ? tanh_fast(x) : tanhf(x);
        return 1.f - t * t;
    }
    if (kind == 0) {
        const float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
        const float t = FAST ? tanh_fast(u) : tanhf(u);
        const float du = SQRT_2_OVER_PI * (1.f + 3.f * GELU_C * x * x);
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du;
    }
    const float cdf = 0.5f * (1.f + erff(x * FRAC_1_SQRT_2));
    const float pdf = (FAST ? __expf(-0.5f * x * x) : expf(-0.5f * x * x)) * INV_SQRT_2PI;
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

// ---------------------------------------------------------------- 32-bit vector variants

template <int OP, class T> struct BinaryOp {
    const T *a, *b;
    T* y;
    template <int V> __device__ __forceinline__ void step(unsigned i) const {
        float u[V], v[V];
        load_v<T, V>(a, i, u);
        load_v<T, V>(b, i, v);
#pragma unroll
        for (int k = 0; k < V; ++k) u[k] = OP == 0 ? u[k] + v[k] : OP == 1 ? u[k] - v[k] : u[k] * v[k];
        store_v<T, V>(y, i, u);
    }
};

template <int OP, class T>
__device__ void binary_v32(const T* a, const T* b, T* y, unsigned n) {
    vec_loop<VecN<T>::n>(n, aligned16(a) && aligned16(b) && aligned16(y), BinaryOp<OP, T>{a, b, y});
}

template <class T> struct ScaleOp {
    const T* x;
    T* y;
    float s;
    template <int V> __device__ __forceinline__ void step(unsigned i) const {
        float u[V];
        load_v<T, V>(x, i, u);
#pragma unroll
        for (int k = 0; k < V; ++k) u[k] *= s;
        store_v<T, V>(y, i, u);
    }
};

template <class T>
__device__ void scale_v32(const T* x, T* y, float s, unsigned n) {
    vec_loop<VecN<T>::n>(n, aligned16(x) && aligned16(y), ScaleOp<T>{x, y, s});
}

template <class T> struct BiasAddOp {
    const T *x, *bias;
    T* y;
    unsigned width;
    template <int V> __device__ __forceinline__ void step(unsigned i) const {
        float u[V], b[V];
        load_v<T, V>(x, i, u);
        load_v<T, V>(bias, i % width, b);
#pragma unroll
        for (int k = 0; k < V; ++k) u[k] += b[k];
        store_v<T, V>(y, i, u);
    }
};

template <class T>
__device__ void bias_add_v32(const T* x, const T* bias, T* y, unsigned n, unsigned width) {
    constexpr int N = VecN<T>::n;
    const bool vec = width % N == 0 && aligned16(x) && aligned16(bias) && aligned16(y);
    vec_loop<N>(n, vec, BiasAddOp<T>{x, bias, y, width});
}

template <class T> struct ActFwdOp {
    const T* x;
    T* y;
    int kind;
    template <int V> __device__ __forceinline__ void step(unsigned i) const {
        float u[V];
        load_v<T, V>(x, i, u);
#pragma unroll
        for (int k = 0; k < V; ++k) u[k] = act(u[k], kind);
        store_v<T, V>(y, i, u);
    }
};

template <class T>
__device__ void act_fwd_v32(const T* x, T* y, unsigned n, int kind) {
    vec_loop<VecN<T>::n>(n, aligned16(x) && aligned16(y), ActFwdOp<T>{x, y, kind});
}

template <class T> struct ActBwdOp {
    const T *x, *dy;
    T* dx;
    int kind;
    template <int V> __device__ __forceinline__ void step(unsigned i) const {
        float u[V], g[V];
        load_v<T, V>(x, i, u);
        load_v<T, V>(dy, i, g);
#pragma unroll
        for (int k = 0; k < V; ++k) u[k] = g[k] * act_grad(u[k], kind);
        store_v<T, V>(dx, i, u);
    }
};

template <class T>
__device__ void act_bwd_v32(const T* x, const T* dy, T* dx, unsigned n, int kind) {
    vec_loop<VecN<T>::n>(n, aligned16(x) && aligned16(dy) && aligned16(dx), ActBwdOp<T>{x, dy, dx, kind});
}

template <class T>
__device__ void act_bwd_colsum(const T* x, const T* dy, T* dx, float* part, unsigned rows, unsigned cols,
                               unsigned rows_per_chunk, int kind) {
    constexpr int V = VecN<T>::n;
    const unsigned c = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c >= cols) return;
    const unsigned r0 = blockIdx.y * rows_per_chunk;
    const unsigned r1 = min(rows, r0 + rows_per_chunk);
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.f;
#pragma unroll 4
    for (unsigned r = r0; r < r1; ++r) {
        const unsigned i = r * cols + c;
        float u[V], g[V];
        load_v<T, V>(x, i, u);
        load_v<T, V>(dy, i, g);
#pragma unroll
        for (int k = 0; k < V; ++k) u[k] = g[k] * act_grad<FastAct<T>::on>(u[k], kind);
        store_v<T, V>(dx, i, u);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += to_f32(from_f32<T>(u[k]));  // the stored value
    }
    float* out = part + (unsigned long long)blockIdx.y * cols + c;
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = acc[k];
}

#define ELEMENTWISE_V32(name, T)                                                                                   \
    extern "C" __global__ void add_v32_##name(const T* a, const T* b, T* y, long long n) {                         \
        binary_v32<0>(a, b, y, (unsigned)n);                                                                       \
    }                                                                                                              \
    extern "C" __global__ void sub_v32_##name(const T* a, const T* b, T* y, long long n) {                         \
        binary_v32<1>(a, b, y, (unsigned)n);                                                                       \
    }                                                                                                              \
    extern "C" __global__ void mul_v32_##name(const T* a, const T* b, T* y, long long n) {                         \
        binary_v32<2>(a, b, y, (unsigned)n);                                                                       \
    }                                                                                                              \
    extern "C" __global__ void scale_v32_##name(const T* x, T* y, float s, long long n) {                          \
        scale_v32(x, y, s, (unsigned)n);                                                                           \
    }                                                                                                              \
    extern "C" __global__ void bias_add_v32_##name(const T* x, const T* bias, T* y, long long n, long long width) { \
        bias_add_v32(x, bias, y, (unsigned)n, (unsigned)width);                                                    \
    }                                                                                                              \
    extern "C" __global__ void act_fwd_v32_##name(const T* x, T* y, long long n, int kind) {                       \
        act_fwd_v32(x, y, (unsigned)n, kind);                                                                      \
    }                                                                                                              \
    extern "C" __global__ void act_bwd_v32_##name(const T* x, const T* dy, T* dx, long long n, int kind) {         \
        act_bwd_v32(x, dy, dx, (unsigned)n, kind);                                                                 \
    }                                                                                                              \
    extern "C" __global__ void act_bwd_colsum_##name(const T* x, const T* dy, T* dx, float* part, long long rows,   \
                                                     long long cols, long long rows_per_chunk, int kind) {         \
        act_bwd_colsum(x, dy, dx, part, (unsigned)rows, (unsigned)cols, (unsigned)rows_per_chunk, kind);           \
    }
ELEMENTWISE_V32(f32, float)
ELEMENTWISE_V32(bf16, bf16)
ELEMENTWISE_V32(f16, f16)

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
