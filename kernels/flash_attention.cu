// flash_attention.cu: tensor-core flash attention (FlashAttention-2 structure), forward and
// deterministic backward, bf16 and f16 with f32 accumulation, sm_80+ (mma.sync, ldmatrix,
// cp.async; runs unchanged on Hopper).
//
// Layout: every tensor is addressed through a FlashLayout (passed by value): element (b, h, row,
// c) of tensor t is at ptr[s[t][0] + b·s[t][1] + h·s[t][2] + row·s[t][3] + c], so the same kernels
// read contiguous [B, H, N, d] tensors and q, k, v straight out of a packed qkv projection
// ([B, N, 3·W]: offsets 0, W, 2·W, strides (N·3W, d, 3W)), and write o as [B, N, W]. Head dims
// d ≤ DP with d % 8 == 0; DP ∈ {64, 80, 96, 112, 128} is the contraction padded to a multiple of
// 16 (88 → 96, 104 → 112): the columns d..DP are zero-filled in shared memory. Every row start
// must be 16-byte aligned (checked by the launcher). lse and delta are f32 [B·H, N] contiguous.
// n queries, m keys (any n, m ≥ 1): key tails are masked to −inf (forward) or have zero rows
// (backward), query tails are zero rows whose results are never stored.
//
// Tiles: 4 warps (128 threads); mma.sync.m16n8k16 (A 16×16 row-major, B 16×8, C 16×8 f32).
// Fragment ownership inside a warp (g = lane / 4, t = lane % 4): A holds rows g and g+8, columns
// 2t, 2t+1 and 2t+8, 2t+9; B holds k rows 2t, 2t+1, 2t+8, 2t+9 of column g; C holds rows g and
// g+8, columns 2t, 2t+1. A C fragment of two adjacent 8-column tiles packs straight into an A
// fragment (the P·V trick), so P and dS never leave registers.
// Shared-memory tiles are [rows][DP + 8] 16-bit elements: the 16-byte row padding puts the 8
// rows of an ldmatrix on distinct banks for every DP.
//
//   flash_fwd_<dt>_d<DP>(q, k, v, o, lse, L, scale_log2)
//       grid (⌈n/64⌉, B·H). A block owns 64 queries (16 per warp, their Q fragments in
//       registers) and walks the keys in blocks of 64: S = Q·Kᵀ (f32), masked tail, online
//       softmax in the exp2 domain (scale·log2 e folded into one FMA: p = 2^(s·c − m)), running
//       row max m and sum l per thread (the quad reduction of l is deferred to the end),
//       O = O·2^(m_old − m_new) + P·V. K of the next block and V of this one are fetched with
//       cp.async while the tensor cores work. o = O / l, lse = m·ln 2 + ln l (natural log, like
//       the reference op).
//   flash_bwd_delta_<dt>(o, d_o, delta, L, bh)
//       warp per query row (grid-stride over B·H·n rows): delta_i = Σ_c dO_ic·O_ic (f32).
//   flash_bwd_dq_<dt>_d<DP>(q, k, v, d_o, lse, delta, dq, L, scale, scale_log2)
//       grid (⌈n/64⌉, B·H), 64 queries per block (16 per warp); over key blocks of BK (64 for
//       DP ≤ 96, else 32; double-buffered K, V): S = Q·Kᵀ, P = 2^(S·c − lse·log2 e), dP = dO·Vᵀ,
//       dS = P∘(dP − delta), dQ += dS·K; dq = scale·dQ. One block owns its rows and sums the
//       key blocks in order: deterministic, no atomics.
//   flash_bwd_dkdv_<dt>_d<DP>(q, k, v, d_o, lse, delta, dkv, L, scale, scale_log2)
//       grid (⌈m/64⌉, B·H), 64 keys per block (16 per warp, K and V in shared memory); over
//       query blocks of BQ (64 for DP = 64, else 32; double-buffered Q, dO, lse, delta), in
//       transposed form: Sᵀ = K·Qᵀ, Pᵀ, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − delta),
//       dV += Pᵀ·dO, dK += dSᵀ·Q; dk = scale·dK. dk and dv are written through one pointer
//       (dkv) at the offsets of L.s[DK] and L.s[DV], so a packed dqkv buffer is filled in place.
// Precision: 16-bit operands, f32 accumulators and softmax statistics; P and dS are rounded to
// the operand type before their second GEMM (as in FlashAttention-2); one rounding on store.
#include "common.cuh"

#define FA_THREADS 128
#define FA_BM 64   // queries per block (forward, dq)
#define FA_BN 64   // keys per block
#define FA_PAD 8   // 16-bit elements of padding per shared-memory row
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// Tensor slots of FlashLayout::s.
#define FA_Q 0
#define FA_K 1
#define FA_V 2
#define FA_O 3
#define FA_DO 4
#define FA_DQ 5
#define FA_DK 6
#define FA_DV 7

// Must match `FlashLayout` in crates/tensor/src/cuda/flash_attention.rs (#[repr(C)]).
struct FlashLayout {
    long long heads, n, m, d;
    long long s[8][4];  // per tensor: element offset, batch stride, head stride, row stride
};

typedef unsigned short u16;

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously; `bytes` = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a·b on the tensor cores, and two f32 packed into one 16-bit pair (lo in the low half).
template <class T> struct Mma;
template <> struct Mma<bf16> {
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct Mma<f16> {
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

// ---------------------------------------------------------------- tiles

// Rows [0, ROWS) of a row-major matrix at `g` (row stride `sn` elements) into the shared tile
// `s` ([ROWS][DP + FA_PAD]) with cp.async; rows ≥ rows_left and columns ≥ d become zeros.
template <int ROWS, int DP>
__device__ __forceinline__ void load_tile(u16* s, const u16* g, long long sn, long long rows_left, int d) {
    constexpr int CH = DP / 8, LD = DP + FA_PAD;
    for (int i = threadIdx.x; i < ROWS * CH; i += FA_THREADS) {
        const int r = i / CH, c = (i % CH) * 8;
        const bool ok = r < rows_left && c < d;
        cp_async16(smem_addr(s + r * LD + c), ok ? (const void*)(g + r * sn + c) : (const void*)g, ok ? 16 : 0);
    }
}

// A fragment (rows r0..r0+15, columns c0..c0+15) of a row-major shared tile.
template <int LD>
__device__ __forceinline__ void frag_a(unsigned (&r)[4], const u16* s, int r0, int c0, int lane) {
    ldsm_x4(r, smem_addr(s + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8));
}
// B fragments of two 8-column tiles when B = Xᵀ with X row-major in shared memory (rows of X =
// columns of B): X rows r0..r0+15, X columns (the k dimension) c0..c0+15. r[0], r[1] are the B
// fragment of X rows r0..r0+7, r[2], r[3] of rows r0+8..r0+15.
template <int LD>
__device__ __forceinline__ void frag_bt(unsigned (&r)[4], const u16* s, int r0, int c0, int lane) {
    ldsm_x4(r, smem_addr(s + (r0 + (lane >> 4) * 8 + (lane & 7)) * LD + c0 + ((lane >> 3) & 1) * 8));
}
// B fragments of two 8-column tiles when B = X (row-major, rows = the k dimension): X rows
// k0..k0+15, columns c0..c0+15. r[0], r[1] cover columns c0..c0+7, r[2], r[3] columns c0+8..c0+15.
template <int LD>
__device__ __forceinline__ void frag_b(unsigned (&r)[4], const u16* s, int k0, int c0, int lane) {
    ldsm_x4_t(r, smem_addr(s + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + c0 + (lane >> 4) * 8));
}

// Base pointer of tensor slot t for (b, h).
template <class P>
__device__ __forceinline__ P* slot(P* base, const FlashLayout& L, int t, long long b, long long h) {
    return base + L.s[t][0] + b * L.s[t][1] + h * L.s[t][2];
}

// Stores rows g, g+8 (relative to row0) of a C-fragment accumulator [DP/8][4], times `mul`, to a
// row-major global matrix (row stride sn), guarding rows < rows and columns < d.
template <class T, int DP>
__device__ __forceinline__ void store_acc(u16* g, long long sn, const float (&acc)[DP / 8][4], const float (&mul)[2],
                                          int row0, long long rows, int d, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + (lane >> 2) + 8 * r;
        if (row >= rows) continue;
#pragma unroll
        for (int nt = 0; nt < DP / 8; ++nt) {
            const int c = nt * 8 + 2 * (lane & 3);
            if (c < d) {
                const unsigned v = Mma<T>::pack(acc[nt][2 * r] * mul[r], acc[nt][2 * r + 1] * mul[r]);
                *reinterpret_cast<unsigned*>(g + row * sn + c) = v;
            }
        }
    }
}

// ---------------------------------------------------------------- forward

template <class T, int DP>
__device__ __forceinline__ void flash_fwd_impl(const T* q_, const T* k_, const T* v_, T* o_, float* lse,
                                               const FlashLayout& L, float scale_log2) {
    constexpr int LD = DP + FA_PAD, KS = DP / 16, NT = FA_BN / 8, DT = DP / 8;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;               // [FA_BN][LD]
    u16* sV = sK + FA_BN * LD;    // [FA_BN][LD]; holds Q before the key loop
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y, b = bh / L.heads, h = bh % L.heads;
    const long long n = L.n, m = L.m;
    const int d = (int)L.d, q0 = blockIdx.x * FA_BM;
    const u16* gq = slot((const u16*)q_, L, FA_Q, b, h) + q0 * L.s[FA_Q][3];
    const u16* gk = slot((const u16*)k_, L, FA_K, b, h);
    const u16* gv = slot((const u16*)v_, L, FA_V, b, h);
    const long long skn = L.s[FA_K][3], svn = L.s[FA_V][3];

    load_tile<FA_BM, DP>(sV, gq, L.s[FA_Q][3], n - q0, d);
    cp_async_commit();
    load_tile<FA_BN, DP>(sK, gk, skn, m, d);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    unsigned qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) frag_a<LD>(qf[kk], sV, warp * 16, kk * 16, lane);
    __syncthreads();  // sV is overwritten by V next

    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};

    for (long long j0 = 0; j0 < m; j0 += FA_BN) {
        load_tile<FA_BN, DP>(sV, gv + j0 * svn, svn, m - j0, d);
        cp_async_commit();
        cp_async_wait<1>();  // K of this block
        __syncthreads();
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned kb[4];
                frag_bt<LD>(kb, sK, np * 16, kk * 16, lane);
                Mma<T>::mma(s[2 * np], qf[kk], kb[0], kb[1]);
                Mma<T>::mma(s[2 * np + 1], qf[kk], kb[2], kb[3]);
            }
        }
        __syncthreads();  // every warp is done with sK
        if (j0 + FA_BN < m) load_tile<FA_BN, DP>(sK, gk + (j0 + FA_BN) * skn, skn, m - j0 - FA_BN, d);
        cp_async_commit();

        if (j0 + FA_BN > m) {  // key tail
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const long long c = j0 + nt * 8 + 2 * (lane & 3);
                if (c >= m) s[nt][0] = s[nt][2] = NEG_INF;
                if (c + 1 >= m) s[nt][1] = s[nt][3] = NEG_INF;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float mnew = fmaxf(mrow[r], mx * scale_log2);
            const float alpha = exp2f(mrow[r] - mnew);
            mrow[r] = mnew;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][2 * r] = exp2f(fmaf(s[nt][2 * r], scale_log2, -mnew));
                s[nt][2 * r + 1] = exp2f(fmaf(s[nt][2 * r + 1], scale_log2, -mnew));
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            lrow[r] = lrow[r] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                acc[dt][2 * r] *= alpha;
                acc[dt][2 * r + 1] *= alpha;
            }
        }

        cp_async_wait<1>();  // V of this block
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; ++kk) {
            const unsigned a[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                                   Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < DP / 16; ++dp) {
                unsigned vb[4];
                frag_b<LD>(vb, sV, kk * 16, dp * 16, lane);
                Mma<T>::mma(acc[2 * dp], a, vb[0], vb[1]);
                Mma<T>::mma(acc[2 * dp + 1], a, vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with sV
    }
    cp_async_wait<0>();

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(FULL_MASK, l, 1);
        l += __shfl_xor_sync(FULL_MASK, l, 2);
        inv[r] = 1.f / l;
        const long long row = q0 + warp * 16 + (lane >> 2) + 8 * r;
        if ((lane & 3) == 0 && row < n) lse[bh * n + row] = mrow[r] * FA_LN2 + logf(l);
    }
    u16* go = slot((u16*)o_, L, FA_O, b, h) + q0 * L.s[FA_O][3];
    store_acc<T, DP>(go, L.s[FA_O][3], acc, inv, warp * 16, n - q0, d, lane);
}

// ---------------------------------------------------------------- backward: delta

template <class T>
__device__ __forceinline__ void flash_bwd_delta_impl(const T* o, const T* d_o, float* delta, const FlashLayout& L,
                                                     long long bh_count) {
    const int lane = threadIdx.x & 31;
    const long long rows = bh_count * L.n;
    for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
        const long long bh = r / L.n, i = r % L.n, b = bh / L.heads, h = bh % L.heads;
        const T* orow = slot(o, L, FA_O, b, h) + i * L.s[FA_O][3];
        const T* drow = slot(d_o, L, FA_DO, b, h) + i * L.s[FA_DO][3];
        float acc = 0.f;
        for (int c = lane; c < L.d; c += 32) acc += load(orow, c) * load(drow, c);
        acc = warp_sum(acc);
        if (lane == 0) delta[r] = acc;
    }
}

// ---------------------------------------------------------------- backward: dq

template <class T, int DP>
__device__ __forceinline__ void flash_bwd_dq_impl(const T* q_, const T* k_, const T* v_, const T* do_,
                                                  const float* lse, const float* delta, T* dq_, const FlashLayout& L,
                                                  float scale, float scale_log2) {
    constexpr int BK = DP <= 96 ? 64 : 32;  // keys per step (32 keeps DP > 96 free of spills)
    constexpr int LD = DP + FA_PAD, KS = DP / 16, NT = BK / 8, DT = DP / 8, TILE = BK * LD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;                 // [FA_BM][LD]
    u16* sDO = sQ + FA_BM * LD;     // [FA_BM][LD]
    u16* sKV = sDO + FA_BM * LD;    // two stages of K, V: [2][2][BK][LD]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y, b = bh / L.heads, h = bh % L.heads;
    const long long n = L.n, m = L.m;
    const int d = (int)L.d, q0 = blockIdx.x * FA_BM;
    const u16* gk = slot((const u16*)k_, L, FA_K, b, h);
    const u16* gv = slot((const u16*)v_, L, FA_V, b, h);
    const long long skn = L.s[FA_K][3], svn = L.s[FA_V][3];

    load_tile<FA_BM, DP>(sQ, slot((const u16*)q_, L, FA_Q, b, h) + q0 * L.s[FA_Q][3], L.s[FA_Q][3], n - q0, d);
    load_tile<FA_BM, DP>(sDO, slot((const u16*)do_, L, FA_DO, b, h) + q0 * L.s[FA_DO][3], L.s[FA_DO][3], n - q0, d);
    load_tile<BK, DP>(sKV, gk, skn, m, d);
    load_tile<BK, DP>(sKV + TILE, gv, svn, m, d);
    cp_async_commit();

    // Row statistics of this thread's rows g and g+8 (rows past n: lse = +inf gives P = 0).
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long row = q0 + warp * 16 + (lane >> 2) + 8 * r;
        lse2[r] = row < n ? lse[bh * n + row] * FA_LOG2E : -NEG_INF;
        dl[r] = row < n ? delta[bh * n + row] : 0.f;
    }
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    int stage = 0;
    for (long long j0 = 0; j0 < m; j0 += BK, stage ^= 1) {
        const u16* sK = sKV + stage * 2 * TILE;
        const u16* sV = sK + TILE;
        if (j0 + BK < m) {  // next stage
            u16* nK = sKV + (stage ^ 1) * 2 * TILE;
            load_tile<BK, DP>(nK, gk + (j0 + BK) * skn, skn, m - j0 - BK, d);
            load_tile<BK, DP>(nK + TILE, gv + (j0 + BK) * svn, svn, m - j0 - BK, d);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
        }
#pragma unroll 2  // fully unrolled, ptxas hoists every fragment load and spills at DP = 128
        for (int kk = 0; kk < KS; ++kk) {
            unsigned qa[4], da[4];
            frag_a<LD>(qa, sQ, warp * 16, kk * 16, lane);
            frag_a<LD>(da, sDO, warp * 16, kk * 16, lane);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned kb[4], vb[4];
                frag_bt<LD>(kb, sK, np * 16, kk * 16, lane);
                frag_bt<LD>(vb, sV, np * 16, kk * 16, lane);
                Mma<T>::mma(s[2 * np], qa, kb[0], kb[1]);
                Mma<T>::mma(s[2 * np + 1], qa, kb[2], kb[3]);
                Mma<T>::mma(dp[2 * np], da, vb[0], vb[1]);
                Mma<T>::mma(dp[2 * np + 1], da, vb[2], vb[3]);
            }
        }
        // dS = P∘(dP − delta), P = 0 on the key tail.
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const long long c = j0 + nt * 8 + 2 * (lane & 3);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const float p = (c + (e & 1)) < m ? exp2f(fmaf(s[nt][e], scale_log2, -lse2[r])) : 0.f;
                s[nt][e] = p * (dp[nt][e] - dl[r]);
            }
        }
        // dQ += dS·K
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            const unsigned a[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                                   Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dd = 0; dd < DP / 16; ++dd) {
                unsigned kb[4];
                frag_b<LD>(kb, sK, kk * 16, dd * 16, lane);
                Mma<T>::mma(acc[2 * dd], a, kb[0], kb[1]);
                Mma<T>::mma(acc[2 * dd + 1], a, kb[2], kb[3]);
            }
        }
        __syncthreads();  // this stage is free for the load two blocks ahead
    }
    cp_async_wait<0>();
    const float mul[2] = {scale, scale};
    u16* g = slot((u16*)dq_, L, FA_DQ, b, h) + q0 * L.s[FA_DQ][3];
    store_acc<T, DP>(g, L.s[FA_DQ][3], acc, mul, warp * 16, n - q0, d, lane);
}

// ---------------------------------------------------------------- backward: dk, dv

template <class T, int DP>
__device__ __forceinline__ void flash_bwd_dkdv_impl(const T* q_, const T* k_, const T* v_, const T* do_,
                                                    const float* lse, const float* delta, T* dkv_,
                                                    const FlashLayout& L, float scale, float scale_log2) {
    constexpr int BQ = DP <= 64 ? 64 : 32;
    constexpr int LD = DP + FA_PAD, KS = DP / 16, NT = BQ / 8, DT = DP / 8, QT = BQ * LD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;                    // [FA_BN][LD]
    u16* sV = sK + FA_BN * LD;         // [FA_BN][LD]
    u16* sQD = sV + FA_BN * LD;        // two stages of Q, dO: [2][2][BQ][LD]
    float* sStat = (float*)(sQD + 4 * QT);  // two stages of lse·log2 e and delta: [2][2][BQ]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y, b = bh / L.heads, h = bh % L.heads;
    const long long n = L.n, m = L.m;
    const int d = (int)L.d, k0 = blockIdx.x * FA_BN;
    const u16* gq = slot((const u16*)q_, L, FA_Q, b, h);
    const u16* gdo = slot((const u16*)do_, L, FA_DO, b, h);
    const long long sqn = L.s[FA_Q][3], sdn = L.s[FA_DO][3];

    load_tile<FA_BN, DP>(sK, slot((const u16*)k_, L, FA_K, b, h) + k0 * L.s[FA_K][3], L.s[FA_K][3], m - k0, d);
    load_tile<FA_BN, DP>(sV, slot((const u16*)v_, L, FA_V, b, h) + k0 * L.s[FA_V][3], L.s[FA_V][3], m - k0, d);
    load_tile<BQ, DP>(sQD, gq, sqn, n, d);
    load_tile<BQ, DP>(sQD + QT, gdo, sdn, n, d);
    cp_async_commit();
    if (threadIdx.x < BQ) {  // rows past n: lse = +inf gives P = 0, their dO rows are zeros
        const long long i = threadIdx.x;
        sStat[i] = i < n ? lse[bh * n + i] * FA_LOG2E : -NEG_INF;
        sStat[BQ + i] = i < n ? delta[bh * n + i] : 0.f;
    }

    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
    }

    int stage = 0;
    for (long long i0 = 0; i0 < n; i0 += BQ, stage ^= 1) {
        const u16* sQ = sQD + stage * 2 * QT;
        const u16* sDO = sQ + QT;
        const float* st = sStat + stage * 2 * BQ;
        if (i0 + BQ < n) {  // next stage
            u16* nQ = sQD + (stage ^ 1) * 2 * QT;
            load_tile<BQ, DP>(nQ, gq + (i0 + BQ) * sqn, sqn, n - i0 - BQ, d);
            load_tile<BQ, DP>(nQ + QT, gdo + (i0 + BQ) * sdn, sdn, n - i0 - BQ, d);
            if (threadIdx.x < BQ) {
                float* nst = sStat + (stage ^ 1) * 2 * BQ;
                const long long i = i0 + BQ + threadIdx.x;
                nst[threadIdx.x] = i < n ? lse[bh * n + i] * FA_LOG2E : -NEG_INF;
                nst[BQ + threadIdx.x] = i < n ? delta[bh * n + i] : 0.f;
            }
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys × BQ queries.
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            unsigned ka[4], va[4];
            frag_a<LD>(ka, sK, warp * 16, kk * 16, lane);
            frag_a<LD>(va, sV, warp * 16, kk * 16, lane);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned qb[4], db[4];
                frag_bt<LD>(qb, sQ, np * 16, kk * 16, lane);
                frag_bt<LD>(db, sDO, np * 16, kk * 16, lane);
                Mma<T>::mma(s[2 * np], ka, qb[0], qb[1]);
                Mma<T>::mma(s[2 * np + 1], ka, qb[2], qb[3]);
                Mma<T>::mma(dp[2 * np], va, db[0], db[1]);
                Mma<T>::mma(dp[2 * np + 1], va, db[2], db[3]);
            }
        }
        // Pᵀ (into s) and dSᵀ (into dp); columns are queries.
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nt * 8 + 2 * (lane & 3) + (e & 1);
                const float p = exp2f(fmaf(s[nt][e], scale_log2, -st[c]));
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - st[BQ + c]);
            }
        }
        // dV += Pᵀ·dO, dK += dSᵀ·Q
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            const unsigned pa[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                                    Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const unsigned sa[4] = {
                Mma<T>::pack(dp[2 * kk][0], dp[2 * kk][1]), Mma<T>::pack(dp[2 * kk][2], dp[2 * kk][3]),
                Mma<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), Mma<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int dd = 0; dd < DP / 16; ++dd) {
                unsigned db[4], qb[4];
                frag_b<LD>(db, sDO, kk * 16, dd * 16, lane);
                frag_b<LD>(qb, sQ, kk * 16, dd * 16, lane);
                Mma<T>::mma(dv[2 * dd], pa, db[0], db[1]);
                Mma<T>::mma(dv[2 * dd + 1], pa, db[2], db[3]);
                Mma<T>::mma(dk[2 * dd], sa, qb[0], qb[1]);
                Mma<T>::mma(dk[2 * dd + 1], sa, qb[2], qb[3]);
            }
        }
        __syncthreads();  // this stage is free for the load two blocks ahead
    }
    cp_async_wait<0>();
    const float ks[2] = {scale, scale}, one[2] = {1.f, 1.f};
    u16* gdk = slot((u16*)dkv_, L, FA_DK, b, h) + k0 * L.s[FA_DK][3];
    u16* gdv = slot((u16*)dkv_, L, FA_DV, b, h) + k0 * L.s[FA_DV][3];
    store_acc<T, DP>(gdk, L.s[FA_DK][3], dk, ks, warp * 16, m - k0, d, lane);
    store_acc<T, DP>(gdv, L.s[FA_DV][3], dv, one, warp * 16, m - k0, d, lane);
}

// ---------------------------------------------------------------- entry points

#define FLASH_DP(name, T, DP)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_fwd_##name##_d##DP(const T* q, const T* k, const T* v, T* o, float* lse, FlashLayout L,                \
                                 float scale_log2) {                                                                   \
        flash_fwd_impl<T, DP>(q, k, v, o, lse, L, scale_log2);                                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_bwd_dq_##name##_d##DP(const T* q, const T* k, const T* v, const T* d_o, const float* lse,              \
                                    const float* delta, T* dq, FlashLayout L, float scale, float scale_log2) {         \
        flash_bwd_dq_impl<T, DP>(q, k, v, d_o, lse, delta, dq, L, scale, scale_log2);                                  \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_bwd_dkdv_##name##_d##DP(const T* q, const T* k, const T* v, const T* d_o, const float* lse,            \
                                      const float* delta, T* dkv, FlashLayout L, float scale, float scale_log2) {      \
        flash_bwd_dkdv_impl<T, DP>(q, k, v, d_o, lse, delta, dkv, L, scale, scale_log2);                               \
    }

#define FLASH(name, T)                                                                                                 \
    extern "C" __global__ void flash_bwd_delta_##name(const T* o, const T* d_o, float* delta, FlashLayout L,         \
                                                      long long bh) {                                                  \
        flash_bwd_delta_impl<T>(o, d_o, delta, L, bh);                                                                     \
    }                                                                                                                  \
    FLASH_DP(name, T, 64)                                                                                              \
    FLASH_DP(name, T, 80)                                                                                              \
    FLASH_DP(name, T, 96)                                                                                              \
    FLASH_DP(name, T, 112)                                                                                             \
    FLASH_DP(name, T, 128)

FLASH(bf16, bf16)
FLASH(f16, f16)
