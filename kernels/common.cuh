// common.cuh: what every kernel file shares (included textually by the Rust side, which expands
// `#include "common.cuh"`; NVRTC runs with no include paths, so no CUDA header is used).
//
// - Storage types `bf16` and `f16`: 16-bit wrappers around `unsigned short`, converted to and
//   from f32 with inline PTX (cvt.f32.bf16 / cvt.rn.bf16.f32, cvt.f32.f16 / cvt.rn.f16.f32;
//   sm_80+). Narrowing rounds to nearest even, like the CPU side (`half::bf16::from_f32`).
// - `to_f32(x)` / `from_f32<T>(v)` for T in {float, bf16, f16}: every kernel loads its inputs
//   to f32, computes and accumulates in f32, and rounds once when it stores.
// - Warp reductions (`warp_sum`, `warp_max`, `warp_max_u64`) with __shfl_xor_sync, and block
//   reductions built on them. Block reductions need blockDim.x to be a multiple of 32 (at most
//   1024), must be reached by every thread of the block, and return the result to every thread.
// - `total_order_key(v)`: an unsigned key whose order is Rust's `f32::total_cmp` (used by top-k).
// - Grid-stride loops with 64-bit indices (`global_thread()`, `grid_threads()`).
#pragma once

// ---------------------------------------------------------------- storage types and conversions

struct __align__(2) bf16 { unsigned short bits; };
struct __align__(2) f16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }

__device__ __forceinline__ float to_f32(bf16 v) {
    float f;
    asm("cvt.f32.bf16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <class T> __device__ __forceinline__ T from_f32(float v);

template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

// Element `i` of `p` as f32, and `v` stored to element `i` (rounded to nearest even).
template <class T> __device__ __forceinline__ float load(const T* p, long long i) { return to_f32(p[i]); }
template <class T> __device__ __forceinline__ void store(T* p, long long i, float v) { p[i] = from_f32<T>(v); }

// ---------------------------------------------------------------- reductions

#define FULL_MASK 0xffffffffu

// Sums over a warp in T (float for the op kernels, double for the optimizer's statistics).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// fmaxf ignores a NaN operand, like Rust's f32::max.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other > v ? other : v;
    }
    return v;
}

__device__ __forceinline__ long long warp_min_i64(long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        long long other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other < v ? other : v;
    }
    return v;
}

// Block reductions: each warp reduces, lane 0 of each warp posts to shared memory, then every
// warp reduces the posted partials, so all threads get the result without a broadcast step.
// The leading __syncthreads protects the shared slots from the previous call's readers.
template <class T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T part[32];
    const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    return warp_sum(lane < warps ? part[lane] : T(0));
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    return warp_max(lane < warps ? part[lane] : -__int_as_float(0x7f800000));
}

__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v) {
    __shared__ unsigned long long part[32];
    const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    v = warp_max_u64(v);
    __syncthreads();
    if (lane == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    return warp_max_u64(lane < warps ? part[lane] : 0ull);
}

__device__ __forceinline__ long long block_min_i64(long long v) {
    __shared__ long long part[32];
    const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    v = warp_min_i64(v);
    __syncthreads();
    if (lane == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    return warp_min_i64(lane < warps ? part[lane] : 0x7fffffffffffffffll);
}

// ---------------------------------------------------------------- ordering and constants

#define NEG_INF (-__int_as_float(0x7f800000))

// An unsigned key ordered like Rust's f32::total_cmp: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
__device__ __forceinline__ unsigned int total_order_key(float v) {
    unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ---------------------------------------------------------------- 64-bit grid-stride loops

// Flat index of this thread and the stride of a 1-D grid-stride loop over up to 2^63 elements.
__device__ __forceinline__ long long global_thread() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_threads() { return (long long)gridDim.x * blockDim.x; }
