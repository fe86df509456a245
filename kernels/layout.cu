// Layout copies: permute axes, and strided block copies (slice, concat, pad).
//
// Algorithm: one thread per output element in a grid-stride loop; the element's input index
// is computed from its output multi-index. No arithmetic, so kernels are instantiated by
// element width (b32 for f32/i32/u32, b16 for bf16/f16), not by dtype.
// Layout: contiguous row-major. permute: output dim i is input dim perm[i]; the caller passes
// the output dims and, for each output dim, the stride of its input dim (rank <= 6).
// copy_block: tensors viewed as [outer, n, inner]; copies rows src_off..src_off+len of each
// source block to rows dst_off.. of the destination block.
// Launch: 256 threads per block, grid capped (grid-stride loop); no shared memory.
// Precision: exact (bit copies).
//
// `permute_v32_*` and `copy_block_v32_*` (same arguments) are for tensors of fewer than 2^31
// elements (the host picks them; the plain kernels, 64-bit, serve larger ones): 32-bit index
// math (the div/mod chains are several times cheaper), and 16-byte accesses when the
// innermost run of contiguous elements allows it: for permute, the last dim kept in place
// (in_strides[rank-1] == 1) with a length that is a multiple of 16 bytes; for copy_block,
// inner a multiple of 16 bytes; both with 16-byte aligned pointers. The copy then moves
// 16-byte units (`vec16`) with the element counts divided accordingly.
#include "common.cuh"
#include "vec.cuh"

struct PermuteArgs {
    long long out_dims[6];
    long long in_strides[6];
    int rank;
};

template <class T>
__device__ void permute_u32(const T* __restrict__ x, T* __restrict__ y, const unsigned* dims, const unsigned* strides,
                            int rank, unsigned n) {
    for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < n; o += gridDim.x * blockDim.x) {
        unsigned rem = o, i = 0;
        for (int d = rank - 1; d >= 0; --d) {
            const unsigned c = rem % dims[d];
            rem /= dims[d];
            i += c * strides[d];
        }
        y[o] = x[i];
    }
}

// 32-bit permute of elements of `bytes` bytes, as 16-byte units where the last dim allows.
template <class T>
__device__ void permute_v32(const T* x, T* y, PermuteArgs a, unsigned n) {
    constexpr unsigned V = 16 / sizeof(T);
    unsigned dims[6], strides[6];
    const int last = a.rank - 1;
    const bool vec = a.rank > 0 && a.in_strides[last] == 1 && a.out_dims[last] % V == 0 && aligned16(x) && aligned16(y);
    for (int d = 0; d < a.rank; ++d) {
        dims[d] = (unsigned)a.out_dims[d];
        strides[d] = (unsigned)a.in_strides[d];
        if (vec) {  // every other input stride is a multiple of the kept last dim, hence of V
            if (d == last) dims[d] /= V;
            else strides[d] /= V;
        }
    }
    if (vec) permute_u32(reinterpret_cast<const vec16*>(x), reinterpret_cast<vec16*>(y), dims, strides, a.rank, n / V);
    else permute_u32(x, y, dims, strides, a.rank, n);
}

template <class T>
__device__ void copy_block_u32(const T* __restrict__ src, T* __restrict__ dst, unsigned outer, unsigned src_n,
                               unsigned src_off, unsigned dst_n, unsigned dst_off, unsigned len, unsigned inner) {
    const unsigned total = outer * len * inner;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        const unsigned c = e % inner, rest = e / inner;
        const unsigned r = rest % len, o = rest / len;
        dst[(o * dst_n + dst_off + r) * inner + c] = src[(o * src_n + src_off + r) * inner + c];
    }
}

template <class T>
__device__ void copy_block_v32(const T* src, T* dst, long long outer, long long src_n, long long src_off,
                               long long dst_n, long long dst_off, long long len, long long inner) {
    constexpr long long V = 16 / sizeof(T);
    const bool aligned = aligned16(src) && aligned16(dst);
    const auto* s16 = reinterpret_cast<const vec16*>(src);
    auto* d16 = reinterpret_cast<vec16*>(dst);
    if (aligned && inner % V == 0)  // rows of whole vectors
        copy_block_u32(s16, d16, (unsigned)outer, (unsigned)src_n, (unsigned)src_off, (unsigned)dst_n,
                       (unsigned)dst_off, (unsigned)len, (unsigned)(inner / V));
    else if (aligned && inner == 1 && src_n % V == 0 && src_off % V == 0 && dst_n % V == 0 && dst_off % V == 0 &&
             len % V == 0)  // a slice of the last dim at vector offsets (q, k, v of a qkv projection)
        copy_block_u32(s16, d16, (unsigned)outer, (unsigned)(src_n / V), (unsigned)(src_off / V), (unsigned)(dst_n / V),
                       (unsigned)(dst_off / V), (unsigned)(len / V), 1u);
    else
        copy_block_u32(src, dst, (unsigned)outer, (unsigned)src_n, (unsigned)src_off, (unsigned)dst_n,
                       (unsigned)dst_off, (unsigned)len, (unsigned)inner);
}

template <class T>
__device__ void permute(const T* __restrict__ x, T* __restrict__ y, PermuteArgs a, long long n) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n; o += (long long)gridDim.x * blockDim.x) {
        long long rem = o, i = 0;
        for (int d = a.rank - 1; d >= 0; --d) {
            long long c = rem % a.out_dims[d];
            rem /= a.out_dims[d];
            i += c * a.in_strides[d];
        }
        y[o] = x[i];
    }
}

template <class T>
__device__ void copy_block(const T* __restrict__ src, T* __restrict__ dst, long long outer, long long src_n,
                           long long src_off, long long dst_n, long long dst_off, long long len, long long inner) {
    long long total = outer * len * inner;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        long long c = e % inner;
        long long r = (e / inner) % len;
        long long o = e / (inner * len);
        dst[(o * dst_n + dst_off + r) * inner + c] = src[(o * src_n + src_off + r) * inner + c];
    }
}

#define LAYOUT(suffix, T)                                                                                          \
    extern "C" __global__ void permute_##suffix(const T* x, T* y, PermuteArgs a, long long n) { permute<T>(x, y, a, n); } \
    extern "C" __global__ void copy_block_##suffix(const T* src, T* dst, long long outer, long long src_n,            \
                                                   long long src_off, long long dst_n, long long dst_off,            \
                                                   long long len, long long inner) {                                 \
        copy_block<T>(src, dst, outer, src_n, src_off, dst_n, dst_off, len, inner);                                  \
    }                                                                                                                \
    extern "C" __global__ void permute_v32_##suffix(const T* x, T* y, PermuteArgs a, long long n) {                   \
        permute_v32<T>(x, y, a, (unsigned)n);                                                                        \
    }                                                                                                                \
    extern "C" __global__ void copy_block_v32_##suffix(const T* src, T* dst, long long outer, long long src_n,        \
                                                       long long src_off, long long dst_n, long long dst_off,        \
                                                       long long len, long long inner) {                             \
        copy_block_v32<T>(src, dst, outer, src_n, src_off, dst_n, dst_off, len, inner);                              \
    }

LAYOUT(b32, unsigned int)
LAYOUT(b16, unsigned short)
