// vec.cuh: 16-byte vector loads and stores (4 f32 or 8 bf16/f16 per access), for the
// bandwidth-bound kernels (norm.cu's fast LayerNorm, softmax.cu's fused cross-entropy,
// elementwise.cu and layout.cu). Included after common.cuh.
//
// - `VecN<T>::n`: elements per 16 bytes (4 for float, 8 for bf16/f16).
// - `load_v<T, V>(p, i, out)` / `store_v<T, V>(p, i, v)`: elements i..i+V of p as f32, and back
//   (rounded to nearest even). V is 1 (a scalar access, any alignment) or a multiple of
//   VecN<T>::n (V / VecN<T>::n 16-byte accesses: p + i must be 16-byte aligned).
// - `aligned16(p)`: whether a pointer is 16-byte aligned. A kernel takes its vector path only
//   when every pointer it accesses is aligned and the row width is a multiple of the vector
//   width (so every row start stays aligned); otherwise its scalar path (V = 1), so any view
//   offset and any width are correct.
#pragma once

struct __align__(16) vec16 {
    unsigned int w[4];
};

template <class T> struct VecN {
    static constexpr int n = 16 / (int)sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

// The 16-bit element types as raw bits and back.
template <class T> __device__ __forceinline__ float half_bits_to_f32(unsigned int bits) {
    T t;
    t.bits = (unsigned short)bits;
    return to_f32(t);
}
template <class T> __device__ __forceinline__ unsigned int f32_to_half_bits(float v) { return from_f32<T>(v).bits; }

// One 16-byte access: N = VecN<T>::n elements at p + i (16-byte aligned) as f32, and back.
template <class T>
__device__ __forceinline__ void load16(const T* p, long long i, float* out) {
    const vec16 r = *reinterpret_cast<const vec16*>(p + i);
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = __uint_as_float(r.w[k]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            out[2 * k] = half_bits_to_f32<T>(r.w[k] & 0xffffu);
            out[2 * k + 1] = half_bits_to_f32<T>(r.w[k] >> 16);
        }
    }
}

template <class T>
__device__ __forceinline__ void store16(T* p, long long i, const float* v) {
    vec16 r;
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int k = 0; k < 4; ++k) r.w[k] = __float_as_uint(v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) r.w[k] = f32_to_half_bits<T>(v[2 * k]) | (f32_to_half_bits<T>(v[2 * k + 1]) << 16);
    }
    *reinterpret_cast<vec16*>(p + i) = r;
}

template <class T, int V>
__device__ __forceinline__ void load_v(const T* p, long long i, float (&out)[V]) {
    if constexpr (V == 1) {
        out[0] = to_f32(p[i]);
    } else {
        static_assert(V % VecN<T>::n == 0, "vector width must be a multiple of 16 bytes");
#pragma unroll
        for (int q = 0; q < V; q += VecN<T>::n) load16(p, i + q, out + q);
    }
}

template <class T, int V>
__device__ __forceinline__ void store_v(T* p, long long i, const float (&v)[V]) {
    if constexpr (V == 1) {
        p[i] = from_f32<T>(v[0]);
    } else {
        static_assert(V % VecN<T>::n == 0, "vector width must be a multiple of 16 bytes");
#pragma unroll
        for (int q = 0; q < V; q += VecN<T>::n) store16(p, i + q, v + q);
    }
}
