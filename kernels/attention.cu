// attention.cu: reference multi-head attention (non-causal), forward and backward.
//
// Layout: q, o, d_o, dq [BH, N, d]; k, v, dk, dv [BH, M, d] (BH = batch·heads, row-major,
// head_dim d ≤ 256); lse and delta [BH, N] f32.
// Algorithm: one warp per row, no shared memory. Lane l owns the columns c = l + 32·t
// (t < 8), so a row of d ≤ 256 values lives in 8 registers per lane, and a dot product of two
// rows is 8 multiply-adds per lane followed by a warp reduction (__shfl_xor_sync); every lane
// ends up with the full dot product.
//   attention_fwd_<dt>(q, k, v, o, lse, bh, n, m, d, scale)
//       warp per query row i: online softmax over the M keys, s_j = scale·q_i·k_j,
//       running max mx and sum l, acc = Σ_j exp(s_j − mx)·v_j rescaled as mx grows;
//       o_i = acc / l, lse_i = mx + log l.
//   attention_bwd_dq_<dt>(q, k, v, o, lse, d_o, dq, delta, bh, n, m, d, scale)
//       warp per query row i: D_i = d_o_i·o_i (stored to delta for the next kernel), then over
//       the keys p = exp(s_ij − lse_i), dp = d_o_i·v_j, ds = p·(dp − D_i), dq_i = scale·Σ_j ds·k_j.
//   attention_bwd_dkv_<dt>(q, k, v, lse, d_o, delta, dk, dv, bh, n, m, d, scale)
//       warp per key row j (same stream, after the dq kernel): over the queries i the same p
//       and ds, dv_j = Σ_i p·d_o_i, dk_j = scale·Σ_i ds·q_i.
//   Splitting the backward into a query-side and a key-side pass recomputes the scores once
//   more but needs no atomics and no f32 scratch, and is deterministic.
// Launch: blocks of 128 threads (4 rows each), grid-stride over rows; no shared memory.
// Precision: loads to f32; dots, softmax statistics and all accumulators in f32; one rounding
// on store.
#include "common.cuh"

#define ATT_COLS 8  // columns per lane: head_dim ≤ 32 · ATT_COLS = 256

__device__ __forceinline__ long long warp_id_global() { return global_thread() >> 5; }
__device__ __forceinline__ long long warps_in_grid() { return grid_threads() >> 5; }

// row[c] for the columns this lane owns (0 beyond d).
template <class T>
__device__ __forceinline__ void load_row(const T* row, int d, int lane, float (&r)[ATT_COLS]) {
#pragma unroll
    for (int t = 0; t < ATT_COLS; ++t) {
        const int c = lane + 32 * t;
        r[t] = c < d ? load(row, c) : 0.f;
    }
}

// Σ_c a[c]·row[c] over the whole row, returned to every lane.
template <class T>
__device__ __forceinline__ float row_dot(const float (&a)[ATT_COLS], const T* row, int d, int lane) {
    float s = 0.f;
#pragma unroll
    for (int t = 0; t < ATT_COLS; ++t) {
        const int c = lane + 32 * t;
        if (c < d) s += a[t] * load(row, c);
    }
    return warp_sum(s);
}

__device__ __forceinline__ float reg_dot(const float (&a)[ATT_COLS], const float (&b)[ATT_COLS]) {
    float s = 0.f;
#pragma unroll
    for (int t = 0; t < ATT_COLS; ++t) s += a[t] * b[t];
    return warp_sum(s);
}

template <class T>
__device__ __forceinline__ void store_row(T* row, int d, int lane, const float (&r)[ATT_COLS], float mul) {
#pragma unroll
    for (int t = 0; t < ATT_COLS; ++t) {
        const int c = lane + 32 * t;
        if (c < d) store(row, c, r[t] * mul);
    }
}

template <class T>
__device__ void attention_fwd_impl(const T* q, const T* k, const T* v, T* o, float* lse, long long bh, long long n,
                                   long long m, int d, float scale) {
    const int lane = threadIdx.x & 31;
    for (long long r = warp_id_global(); r < bh * n; r += warps_in_grid()) {
        const long long h = r / n;
        const T* kh = k + h * m * d;
        const T* vh = v + h * m * d;
        float qv[ATT_COLS], acc[ATT_COLS];
        load_row(q + r * d, d, lane, qv);
#pragma unroll
        for (int t = 0; t < ATT_COLS; ++t) acc[t] = 0.f;
        float mx = NEG_INF, l = 0.f;
        for (long long j = 0; j < m; ++j) {
            const float s = row_dot(qv, kh + j * d, d, lane) * scale;
            const float mnew = fmaxf(mx, s);
            const float alpha = expf(mx - mnew);
            const float p = expf(s - mnew);
            l = l * alpha + p;
            const T* vj = vh + j * d;
#pragma unroll
            for (int t = 0; t < ATT_COLS; ++t) {
                const int c = lane + 32 * t;
                acc[t] = acc[t] * alpha + (c < d ? p * load(vj, c) : 0.f);
            }
            mx = mnew;
        }
        store_row(o + r * d, d, lane, acc, l > 0.f ? 1.f / l : 0.f);
        if (lane == 0) lse[r] = mx + logf(l);
    }
}

template <class T>
__device__ void attention_bwd_dq_impl(const T* q, const T* k, const T* v, const T* o, const float* lse, const T* d_o,
                                      T* dq, float* delta, long long bh, long long n, long long m, int d, float scale) {
    const int lane = threadIdx.x & 31;
    for (long long r = warp_id_global(); r < bh * n; r += warps_in_grid()) {
        const long long h = r / n;
        const T* kh = k + h * m * d;
        const T* vh = v + h * m * d;
        float qv[ATT_COLS], dov[ATT_COLS], acc[ATT_COLS];
        load_row(q + r * d, d, lane, qv);
        load_row(d_o + r * d, d, lane, dov);
#pragma unroll
        for (int t = 0; t < ATT_COLS; ++t) acc[t] = 0.f;
        const float D = row_dot(dov, o + r * d, d, lane);
        if (lane == 0) delta[r] = D;
        const float L = lse[r];
        for (long long j = 0; j < m; ++j) {
            const T* kj = kh + j * d;
            float kv[ATT_COLS];
            load_row(kj, d, lane, kv);
            const float s = reg_dot(qv, kv) * scale;
            const float dp = row_dot(dov, vh + j * d, d, lane);
            const float ds = expf(s - L) * (dp - D);
#pragma unroll
            for (int t = 0; t < ATT_COLS; ++t) acc[t] += ds * kv[t];
        }
        store_row(dq + r * d, d, lane, acc, scale);
    }
}

template <class T>
__device__ void attention_bwd_dkv_impl(const T* q, const T* k, const T* v, const float* lse, const T* d_o,
                                       const float* delta, T* dk, T* dv, long long bh, long long n, long long m, int d,
                                       float scale) {
    const int lane = threadIdx.x & 31;
    for (long long r = warp_id_global(); r < bh * m; r += warps_in_grid()) {
        const long long h = r / m;
        const T* qh = q + h * n * d;
        const T* doh = d_o + h * n * d;
        float kv[ATT_COLS], vv[ATT_COLS], dk_acc[ATT_COLS], dv_acc[ATT_COLS];
        load_row(k + r * d, d, lane, kv);
        load_row(v + r * d, d, lane, vv);
#pragma unroll
        for (int t = 0; t < ATT_COLS; ++t) dk_acc[t] = dv_acc[t] = 0.f;
        for (long long i = 0; i < n; ++i) {
            float qi[ATT_COLS], doi[ATT_COLS];
            load_row(qh + i * d, d, lane, qi);
            load_row(doh + i * d, d, lane, doi);
            const float s = reg_dot(qi, kv) * scale;
            const float dp = reg_dot(doi, vv);
            const float p = expf(s - lse[h * n + i]);
            const float ds = p * (dp - delta[h * n + i]);
#pragma unroll
            for (int t = 0; t < ATT_COLS; ++t) {
                dv_acc[t] += p * doi[t];
                dk_acc[t] += ds * qi[t];
            }
        }
        store_row(dk + r * d, d, lane, dk_acc, scale);
        store_row(dv + r * d, d, lane, dv_acc, 1.f);
    }
}

#define ATTENTION(name, T)                                                                                             \
    extern "C" __global__ void attention_fwd_##name(const T* q, const T* k, const T* v, T* o, float* lse, long long bh, \
                                                    long long n, long long m, int d, float scale) {                    \
        attention_fwd_impl(q, k, v, o, lse, bh, n, m, d, scale);                                                       \
    }                                                                                                                  \
    extern "C" __global__ void attention_bwd_dq_##name(const T* q, const T* k, const T* v, const T* o, const float* lse, \
                                                       const T* d_o, T* dq, float* delta, long long bh, long long n,    \
                                                       long long m, int d, float scale) {                              \
        attention_bwd_dq_impl(q, k, v, o, lse, d_o, dq, delta, bh, n, m, d, scale);                                    \
    }                                                                                                                  \
    extern "C" __global__ void attention_bwd_dkv_##name(const T* q, const T* k, const T* v, const float* lse,           \
                                                        const T* d_o, const float* delta, T* dk, T* dv, long long bh,  \
                                                        long long n, long long m, int d, float scale) {                \
        attention_bwd_dkv_impl(q, k, v, lse, d_o, delta, dk, dv, bh, n, m, d, scale);                                  \
    }
ATTENTION(f32, float)
ATTENTION(bf16, bf16)
ATTENTION(f16, f16)
