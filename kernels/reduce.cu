// reduce.cu: reductions along one axis (sum, mean, max, argmax), their backward, and top-k.
//
// Layout: x viewed as [outer, n, inner] (outer = product of the dims before the reduced one,
// inner = after); a "line" is the n values x[o, :, i], and the outputs are [outer, inner]
// (lines, in order l = o·inner + i). op: 0 sum, 1 mean, 2 max.
//
// Rows (inner == 1): one block per row (grid-stride over rows), block reductions.
//   reduce_rows_<dt>(x, y, rows, n, op)
//   argmax_rows_<dt>(x, idx, rows, n)      first index of the max, in two block reductions:
//       the max m (fmaxf, which skips NaN, like the CPU's `>` scan), then the lowest j with
//       x[j] == m; a NaN at j = 0 gives 0, exactly like the CPU's sequential scan.
// Lines (inner > 1): threads over lines, so neighbouring threads read neighbouring addresses.
//   reduce_lines_<dt>(x, part, outer, n, inner, n_per_chunk, op)
//       grid (ceil(lines/blockDim), chunks): thread (l, c) folds x[o, j, i] for j in chunk c
//       (n_per_chunk consecutive j) into part[c, l] (f32). Splitting n over chunks keeps the
//       GPU busy when there are few lines (bias gradients: outer 1, n = rows).
//   reduce_finalize_<dt>(part, y, lines, chunks, n, op)
//       32×32-thread blocks per 32 lines: 32 threads per line fold strided chunks in order,
//       then one folds their 32 partials in order (deterministic), divides by n for mean and
//       stores in T. Also used for column sums of f32 partials by other files' ops
//       (layer_norm_bwd's dweight/dbias).
//   argmax_lines_<dt>(x, idx, outer, n, inner)   thread per line, sequential scan.
// Backward:
//   broadcast_along_<dt>(dy, dx, outer, n, inner, scale)   dx[o, j, i] = dy[o, i]·scale
//   max_bwd_<dt>(idx, dy, dx, lines, n, inner)             dx[o, idx[l], i] = dy[l] (dx zeroed)
// Top-k (rows [rows, n], block per row):
//   topk_<dt>(x, values, indices, rows, n, k)
//       Each element gets a unique 64-bit key (total_order_key(v) << 32 | ~j): larger value
//       first (ordered like Rust's f32::total_cmp), lower index first on ties. Small k:
//       k rounds of a block max over the keys below the previous round's key. Large k
//       (k·(n + 64·blockDim) > n²): each element's rank is the number of larger keys, and the
//       element is written at its rank if that is below k.
// Launch: blocks of a multiple of 32 threads (≤ 1024; reduce_finalize: 32×32); no dynamic
// shared memory.
// Precision: sums and comparisons in f32; values are stored in T once. Indices are u32.
#include "common.cuh"

__device__ __forceinline__ float fold(float acc, float v, int op) { return op == 2 ? fmaxf(acc, v) : acc + v; }
__device__ __forceinline__ float fold_init(int op) { return op == 2 ? NEG_INF : 0.f; }

template <class T>
__device__ void reduce_rows_impl(const T* x, T* y, long long rows, long long n, int op) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * n;
        float acc = fold_init(op);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) acc = fold(acc, load(xr, j), op);
        float r = op == 2 ? block_max(acc) : block_sum(acc);
        if (op == 1) r = r / (float)n;
        if (threadIdx.x == 0) store(y, row, r);
    }
}

template <class T>
__device__ void reduce_lines_impl(const T* x, float* part, long long outer, long long n, long long inner,
                                  long long n_per_chunk, int op) {
    const long long lines = outer * inner;
    const long long chunk = blockIdx.y;
    const long long j0 = chunk * n_per_chunk;
    const long long j1 = min(n, j0 + n_per_chunk);
    for (long long l = global_thread(); l < lines; l += grid_threads()) {
        const long long o = l / inner, i = l % inner;
        const T* base = x + o * n * inner + i;
        float acc = fold_init(op);
        for (long long j = j0; j < j1; ++j) acc = fold(acc, load(base, j * inner), op);
        part[chunk * lines + l] = acc;
    }
}

// Blocks of FIN_LINES × FIN_SLICES threads, one block per FIN_LINES consecutive lines (grid-
// stride). Thread (tx, ty) folds chunks ty, ty + FIN_SLICES, ... of line tx in order, then thread
// (tx, 0) folds the FIN_SLICES partials in order: a fixed order, so results repeat bit for bit,
// with FIN_SLICES times the parallelism of one thread per line (whose serial loads over ~1000
// chunks made a 768-column finalize take ~0.4 ms).
#define FIN_LINES 32
#define FIN_SLICES 32
template <class T>
__device__ void reduce_finalize_impl(const float* part, T* y, long long lines, long long chunks, long long n, int op) {
    __shared__ float partial[FIN_SLICES][FIN_LINES + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (long long base = (long long)blockIdx.x * FIN_LINES; base < lines; base += (long long)gridDim.x * FIN_LINES) {
        const long long l = base + tx;
        float acc = fold_init(op);
        if (l < lines)
            for (long long c = ty; c < chunks; c += FIN_SLICES) acc = fold(acc, part[c * lines + l], op);
        partial[ty][tx] = acc;
        __syncthreads();
        if (ty == 0 && l < lines) {
            float r = fold_init(op);
            for (int q = 0; q < FIN_SLICES; ++q) r = fold(r, partial[q][tx], op);
            if (op == 1) r = r / (float)n;
            store(y, l, r);
        }
        __syncthreads();
    }
}

template <class T>
__device__ void argmax_rows_impl(const T* x, unsigned int* idx, long long rows, long long n) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * n;
        float m = NEG_INF;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, load(xr, j));
        m = block_max(m);
        long long first = 0x7fffffffffffffffll;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            if (load(xr, j) == m) {
                first = j;
                break;  // j only grows in this thread's stride
            }
        }
        first = block_min_i64(first);
        if (threadIdx.x == 0) {
            const bool first_is_nan = n > 0 && isnan(load(xr, 0));
            idx[row] = (first_is_nan || first == 0x7fffffffffffffffll) ? 0u : (unsigned int)first;
        }
    }
}

template <class T>
__device__ void argmax_lines_impl(const T* x, unsigned int* idx, long long outer, long long n, long long inner) {
    const long long lines = outer * inner;
    for (long long l = global_thread(); l < lines; l += grid_threads()) {
        const long long o = l / inner, i = l % inner;
        const T* base = x + o * n * inner + i;
        long long best = 0;
        float bv = n > 0 ? load(base, 0) : 0.f;
        for (long long j = 1; j < n; ++j) {
            const float v = load(base, j * inner);
            if (v > bv) {
                bv = v;
                best = j;
            }
        }
        idx[l] = (unsigned int)best;
    }
}

template <class T>
__device__ void broadcast_along_impl(const T* dy, T* dx, long long outer, long long n, long long inner, float scale) {
    const long long total = outer * n * inner;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long o = e / (n * inner), i = e % inner;
        store(dx, e, load(dy, o * inner + i) * scale);
    }
}

template <class T>
__device__ void max_bwd_impl(const unsigned int* idx, const T* dy, T* dx, long long lines, long long n, long long inner) {
    for (long long l = global_thread(); l < lines; l += grid_threads()) {
        const long long o = l / inner, i = l % inner;
        dx[(o * n + (long long)idx[l]) * inner + i] = dy[l];
    }
}

__device__ __forceinline__ unsigned long long topk_key(float v, long long j) {
    return ((unsigned long long)total_order_key(v) << 32) | (unsigned long long)(0xffffffffu - (unsigned int)j);
}

template <class T>
__device__ void topk_impl(const T* x, T* values, unsigned int* indices, long long rows, long long n, long long k) {
    const bool by_rank = (double)k * (double)(n + 64 * (long long)blockDim.x) > (double)n * (double)n;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * n;
        T* vr = values + row * k;
        unsigned int* ir = indices + row * k;
        if (by_rank) {
            for (long long j = threadIdx.x; j < n; j += blockDim.x) {
                const unsigned long long key = topk_key(load(xr, j), j);
                long long rank = 0;
                for (long long i = 0; i < n && rank < k; ++i) rank += topk_key(load(xr, i), i) > key;
                if (rank < k) {
                    vr[rank] = xr[j];
                    ir[rank] = (unsigned int)j;
                }
            }
        } else {
            unsigned long long prev = 0;
            for (long long r = 0; r < k; ++r) {
                unsigned long long best = 0;
                bool found = false;
                for (long long j = threadIdx.x; j < n; j += blockDim.x) {
                    const unsigned long long key = topk_key(load(xr, j), j);
                    if ((r == 0 || key < prev) && (!found || key > best)) {
                        best = key;
                        found = true;
                    }
                }
                // Keys are unique; a thread without a candidate offers 0, which is below every
                // real key (key 0 would need a NaN with all bits set at index 2^32 - 1).
                best = block_max_u64(found ? best : 0ull);
                const long long j = (long long)(0xffffffffu - (unsigned int)(best & 0xffffffffull));
                if (threadIdx.x == 0) {
                    vr[r] = xr[j];
                    ir[r] = (unsigned int)j;
                }
                prev = best;
            }
        }
    }
}

#define REDUCE(name, T)                                                                                                \
    extern "C" __global__ void reduce_rows_##name(const T* x, T* y, long long rows, long long n, int op) {            \
        reduce_rows_impl(x, y, rows, n, op);                                                                           \
    }                                                                                                                  \
    extern "C" __global__ void reduce_lines_##name(const T* x, float* part, long long outer, long long n,             \
                                                   long long inner, long long n_per_chunk, int op) {                  \
        reduce_lines_impl(x, part, outer, n, inner, n_per_chunk, op);                                                  \
    }                                                                                                                  \
    extern "C" __global__ void reduce_finalize_##name(const float* part, T* y, long long lines, long long chunks,      \
                                                      long long n, int op) {                                           \
        reduce_finalize_impl(part, y, lines, chunks, n, op);                                                           \
    }                                                                                                                  \
    extern "C" __global__ void argmax_rows_##name(const T* x, unsigned int* idx, long long rows, long long n) {        \
        argmax_rows_impl(x, idx, rows, n);                                                                             \
    }                                                                                                                  \
    extern "C" __global__ void argmax_lines_##name(const T* x, unsigned int* idx, long long outer, long long n,        \
                                                   long long inner) {                                                  \
        argmax_lines_impl(x, idx, outer, n, inner);                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void broadcast_along_##name(const T* dy, T* dx, long long outer, long long n, long long inner, \
                                                      float scale) {                                                   \
        broadcast_along_impl(dy, dx, outer, n, inner, scale);                                                          \
    }                                                                                                                  \
    extern "C" __global__ void max_bwd_##name(const unsigned int* idx, const T* dy, T* dx, long long lines, long long n, \
                                              long long inner) {                                                       \
        max_bwd_impl(idx, dy, dx, lines, n, inner);                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void topk_##name(const T* x, T* values, unsigned int* indices, long long rows, long long n,   \
                                           long long k) {                                                              \
        topk_impl(x, values, indices, rows, n, k);                                                                     \
    }
REDUCE(f32, float)
REDUCE(bf16, bf16)
REDUCE(f16, f16)
