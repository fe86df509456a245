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

struct PermuteArgs {
    long long out_dims[6];
    long long in_strides[6];
    int rank;
};

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
    }

LAYOUT(b32, unsigned int)
LAYOUT(b16, unsigned short)
