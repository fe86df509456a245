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
// Every kernel below is also built as tile variants (entry points at the end of the file): the
// numbers given here are those of the default kernels.
//   flash_fwd_<dt>_d<DP>(q, k, v, o, lse, L, scale_log2)
//       grid (⌈n/64⌉, B·H). A block owns 64 queries (16 per warp, their Q fragments in
//       registers) and walks the keys in blocks of 64: S = Q·Kᵀ (f32), masked tail, online
//       softmax in the exp2 domain (scale·log2 e folded into one FMA: p = 2^(s·c − m)), running
//       row max m and sum l per thread (the quad reduction of l is deferred to the end),
//       O = O·2^(m_old − m_new) + P·V. K of the next block and V of this one are fetched with
//       cp.async while the tensor cores work. o = O / l, lse = m·ln 2 + ln l (natural log, like
//       the reference op).
//   flash_bwd_delta_<dt>(o, d_o, delta, L, bh)
//       eight lanes per query row, 16-byte loads (grid-stride over B·H·n rows):
//       delta_i = Σ_c dO_ic·O_ic (f32).
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
#include "vec.cuh"

#define FA_THREADS 128
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

// 2^x for the softmax. FX = false: exp2f, which without fast math wraps MUFU.EX2 in a denormal
// fix-up (a compare and two predicated multiplies). FX = true (the `_m128e` kernels): one
// `ex2.approx.ftz` on sm_90 and later; every argument here is ≤ 0 (p ≤ 1), so the only results it
// changes are below 2^-126, which flush to 0 and vanish next to the row maximum's 1 in every sum.
// On sm_80 ptxas spills the m128 forward with it (24 bytes), so there FX keeps exp2f.
template <bool FX>
__device__ __forceinline__ float softmax_exp2(float x) {
#if __CUDA_ARCH__ >= 900
    if constexpr (FX) {
        float y;
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
        return y;
    }
#endif
    return exp2f(x);
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

// ---------------------------------------------------------------- shared pieces of the loops

template <int N>
__device__ __forceinline__ void zero_acc(float (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;
}

// The A fragment (16 rows × key columns 16·kk..16·kk+15) of a C-fragment tile row s[NT][4],
// rounded to the operand type: the P·V (and dS·K) trick, no trip through shared memory.
template <class T, int NT>
__device__ __forceinline__ void pack_a(unsigned (&a)[4], const float (&s)[NT][4], int kk) {
    a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Scores of keys ≥ m (columns j0 + ..., this thread's columns 2t, 2t+1 of each 8-column tile)
// become −inf.
template <int NT>
__device__ __forceinline__ void mask_key_tail(float (&s)[NT][4], long long j0, long long m, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const long long c = j0 + nt * 8 + 2 * (lane & 3);
        if (c >= m) s[nt][0] = s[nt][2] = NEG_INF;
        if (c + 1 >= m) s[nt][1] = s[nt][3] = NEG_INF;
    }
}

// One online-softmax step for this thread's rows g and g+8 of one m16 tile: the scores s
// become p = 2^(s·c − m_new), the running max m (log2 units), the running (per-thread partial)
// sum l and the output accumulator are rescaled by 2^(m_old − m_new).
template <bool FX, int NT, int DT>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], float (&acc)[DT][4], float (&mrow)[2], float (&lrow)[2],
                                             float scale_log2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        const float mnew = fmaxf(mrow[r], mx * scale_log2);
        const float alpha = softmax_exp2<FX>(mrow[r] - mnew);
        mrow[r] = mnew;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][2 * r] = softmax_exp2<FX>(fmaf(s[nt][2 * r], scale_log2, -mnew));
            s[nt][2 * r + 1] = softmax_exp2<FX>(fmaf(s[nt][2 * r + 1], scale_log2, -mnew));
            sum += s[nt][2 * r] + s[nt][2 * r + 1];
        }
        lrow[r] = lrow[r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            acc[dt][2 * r] *= alpha;
            acc[dt][2 * r + 1] *= alpha;
        }
    }
}

// ---------------------------------------------------------------- forward

// MT m16 row tiles per warp (BM = 64·MT queries per block), BN keys per block; QR: the Q
// fragments live in registers for the whole key loop (else they are re-read from shared memory
// at every key block, which frees 4·MT·DP/16 registers). With MT = 2 every K and V fragment a
// warp loads feeds two row tiles: half the ldmatrix traffic per MMA. FX: see softmax_exp2.
template <class T, int DP, int MT, int BN, bool QR, bool FX>
__device__ __forceinline__ void flash_fwd_impl(const T* q_, const T* k_, const T* v_, T* o_, float* lse,
                                               const FlashLayout& L, float scale_log2) {
    constexpr int BM = 64 * MT, WM = 16 * MT;  // queries per block, per warp
    constexpr int LD = DP + FA_PAD, KS = DP / 16, NT = BN / 8, DT = DP / 8;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;                                       // [BN][LD]
    u16* sV = sK + BN * LD;                               // [BN][LD]
    u16* sQ = (QR && BM <= BN) ? sV : sV + BN * LD;       // [BM][LD]; aliases sV when it fits
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y, b = bh / L.heads, h = bh % L.heads;
    const long long n = L.n, m = L.m;
    const int d = (int)L.d, q0 = blockIdx.x * BM;
    const u16* gq = slot((const u16*)q_, L, FA_Q, b, h) + q0 * L.s[FA_Q][3];
    const u16* gk = slot((const u16*)k_, L, FA_K, b, h);
    const u16* gv = slot((const u16*)v_, L, FA_V, b, h);
    const long long skn = L.s[FA_K][3], svn = L.s[FA_V][3];

    load_tile<BM, DP>(sQ, gq, L.s[FA_Q][3], n - q0, d);
    cp_async_commit();
    load_tile<BN, DP>(sK, gk, skn, m, d);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    unsigned qf[MT][QR ? KS : 1][4];  // without QR: the fragments of one k step at a time
    if constexpr (QR) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) frag_a<LD>(qf[mt][kk], sQ, warp * WM + mt * 16, kk * 16, lane);
        __syncthreads();  // sQ may be sV, overwritten by V next
    }

    float acc[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc(acc[mt]);
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mrow[mt][0] = mrow[mt][1] = NEG_INF, lrow[mt][0] = lrow[mt][1] = 0.f;

    for (long long j0 = 0; j0 < m; j0 += BN) {
        load_tile<BN, DP>(sV, gv + j0 * svn, svn, m - j0, d);
        cp_async_commit();
        cp_async_wait<1>();  // K of this block
        __syncthreads();
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) zero_acc(s[mt]);
#pragma unroll(QR ? KS : 2)  // without QR, full unrolling hoists every Q fragment load again
        for (int kk = 0; kk < KS; ++kk) {
            if constexpr (!QR) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) frag_a<LD>(qf[mt][0], sQ, warp * WM + mt * 16, kk * 16, lane);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned kb[4];
                frag_bt<LD>(kb, sK, np * 16, kk * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(s[mt][2 * np], qf[mt][QR ? kk : 0], kb[0], kb[1]);
                    Mma<T>::mma(s[mt][2 * np + 1], qf[mt][QR ? kk : 0], kb[2], kb[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with sK
        if (j0 + BN < m) load_tile<BN, DP>(sK, gk + (j0 + BN) * skn, skn, m - j0 - BN, d);
        cp_async_commit();

        if (j0 + BN > m) {  // key tail
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mask_key_tail(s[mt], j0, m, lane);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) softmax_step<FX>(s[mt], acc[mt], mrow[mt], lrow[mt], scale_log2);

        cp_async_wait<1>();  // V of this block
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) pack_a<T>(a[mt], s[mt], kk);
#pragma unroll
            for (int dp = 0; dp < DP / 16; ++dp) {
                unsigned vb[4];
                frag_b<LD>(vb, sV, kk * 16, dp * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(acc[mt][2 * dp], a[mt], vb[0], vb[1]);
                    Mma<T>::mma(acc[mt][2 * dp + 1], a[mt], vb[2], vb[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with sV
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = lrow[mt][r];
            l += __shfl_xor_sync(FULL_MASK, l, 1);
            l += __shfl_xor_sync(FULL_MASK, l, 2);
            inv[r] = 1.f / l;
            const long long row = q0 + warp * WM + mt * 16 + (lane >> 2) + 8 * r;
            if ((lane & 3) == 0 && row < n) lse[bh * n + row] = mrow[mt][r] * FA_LN2 + logf(l);
        }
        u16* go = slot((u16*)o_, L, FA_O, b, h) + q0 * L.s[FA_O][3];
        store_acc<T, DP>(go, L.s[FA_O][3], acc[mt], inv, warp * WM + mt * 16, n - q0, d, lane);
    }
}

// ---------------------------------------------------------------- backward: delta

// Eight lanes per row (four rows per warp), each lane 16 bytes (8 elements) per step: a row of
// d = 64 is one 128-byte load per tensor for the eight lanes. (A warp per row with 2-byte loads
// ran at ~0.9 TB/s on an H100, 2.9% of a B/16 step.) d % 8 == 0 and 16-byte-aligned row starts
// are the launcher's preconditions. Lane sums fold in a fixed order: deterministic.
template <class T>
__device__ __forceinline__ void flash_bwd_delta_impl(const T* o, const T* d_o, float* delta, const FlashLayout& L,
                                                     long long bh_count) {
    const int sub = threadIdx.x & 7;  // lane within the row's group of eight
    const long long rows = bh_count * L.n;
    const int d = (int)L.d;
    for (long long r0 = global_thread() >> 3; r0 - (threadIdx.x & 31) / 8 < rows; r0 += grid_threads() >> 3) {
        const bool live = r0 < rows;
        const long long r = live ? r0 : rows - 1;  // dead groups compute a live row, store nothing
        const long long bh = r / L.n, i = r % L.n, b = bh / L.heads, h = bh % L.heads;
        const T* orow = slot(o, L, FA_O, b, h) + i * L.s[FA_O][3];
        const T* drow = slot(d_o, L, FA_DO, b, h) + i * L.s[FA_DO][3];
        float acc = 0.f;
        for (int c = sub * 8; c < d; c += 64) {
            float a[8], g[8];
            load16<T>(orow, c, a);
            load16<T>(drow, c, g);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc += a[k] * g[k];
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        if (live && sub == 0) delta[r] = acc;
    }
}

// ---------------------------------------------------------------- backward: dq

// MT m16 query tiles per warp (64·MT queries per block), BK keys per step. With MT = 2 every
// K and V fragment feeds two query tiles. FX: see softmax_exp2.
template <class T, int DP, int MT, int BK, bool FX>
__device__ __forceinline__ void flash_bwd_dq_impl(const T* q_, const T* k_, const T* v_, const T* do_,
                                                  const float* lse, const float* delta, T* dq_, const FlashLayout& L,
                                                  float scale, float scale_log2) {
    constexpr int BM = 64 * MT, WM = 16 * MT;
    constexpr int LD = DP + FA_PAD, KS = DP / 16, NT = BK / 8, DT = DP / 8, TILE = BK * LD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;              // [BM][LD]
    u16* sDO = sQ + BM * LD;     // [BM][LD]
    u16* sKV = sDO + BM * LD;    // two stages of K, V: [2][2][BK][LD]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y, b = bh / L.heads, h = bh % L.heads;
    const long long n = L.n, m = L.m;
    const int d = (int)L.d, q0 = blockIdx.x * BM;
    const u16* gk = slot((const u16*)k_, L, FA_K, b, h);
    const u16* gv = slot((const u16*)v_, L, FA_V, b, h);
    const long long skn = L.s[FA_K][3], svn = L.s[FA_V][3];

    load_tile<BM, DP>(sQ, slot((const u16*)q_, L, FA_Q, b, h) + q0 * L.s[FA_Q][3], L.s[FA_Q][3], n - q0, d);
    load_tile<BM, DP>(sDO, slot((const u16*)do_, L, FA_DO, b, h) + q0 * L.s[FA_DO][3], L.s[FA_DO][3], n - q0, d);
    load_tile<BK, DP>(sKV, gk, skn, m, d);
    load_tile<BK, DP>(sKV + TILE, gv, svn, m, d);
    cp_async_commit();

    // Row statistics of this thread's rows g and g+8 of each tile (rows past n: lse = +inf
    // gives P = 0).
    float lse2[MT][2], dl[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long long row = q0 + warp * WM + mt * 16 + (lane >> 2) + 8 * r;
            lse2[mt][r] = row < n ? lse[bh * n + row] * FA_LOG2E : -NEG_INF;
            dl[mt][r] = row < n ? delta[bh * n + row] : 0.f;
        }
    float acc[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc(acc[mt]);

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
        float s[MT][NT][4], dp[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) zero_acc(s[mt]), zero_acc(dp[mt]);
#pragma unroll 2  // fully unrolled, ptxas hoists every fragment load and spills at DP = 128
        for (int kk = 0; kk < KS; ++kk) {
            unsigned qa[MT][4], da[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                frag_a<LD>(qa[mt], sQ, warp * WM + mt * 16, kk * 16, lane);
                frag_a<LD>(da[mt], sDO, warp * WM + mt * 16, kk * 16, lane);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned kb[4], vb[4];
                frag_bt<LD>(kb, sK, np * 16, kk * 16, lane);
                frag_bt<LD>(vb, sV, np * 16, kk * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(s[mt][2 * np], qa[mt], kb[0], kb[1]);
                    Mma<T>::mma(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
                    Mma<T>::mma(dp[mt][2 * np], da[mt], vb[0], vb[1]);
                    Mma<T>::mma(dp[mt][2 * np + 1], da[mt], vb[2], vb[3]);
                }
            }
        }
        // dS = P∘(dP − delta), P = 0 on the key tail.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const long long c = j0 + nt * 8 + 2 * (lane & 3);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    const float p =
                        (c + (e & 1)) < m ? softmax_exp2<FX>(fmaf(s[mt][nt][e], scale_log2, -lse2[mt][r])) : 0.f;
                    s[mt][nt][e] = p * (dp[mt][nt][e] - dl[mt][r]);
                }
            }
        // dQ += dS·K
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) pack_a<T>(a[mt], s[mt], kk);
#pragma unroll
            for (int dd = 0; dd < DP / 16; ++dd) {
                unsigned kb[4];
                frag_b<LD>(kb, sK, kk * 16, dd * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(acc[mt][2 * dd], a[mt], kb[0], kb[1]);
                    Mma<T>::mma(acc[mt][2 * dd + 1], a[mt], kb[2], kb[3]);
                }
            }
        }
        __syncthreads();  // this stage is free for the load two blocks ahead
    }
    cp_async_wait<0>();
    const float mul[2] = {scale, scale};
    u16* g = slot((u16*)dq_, L, FA_DQ, b, h) + q0 * L.s[FA_DQ][3];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_acc<T, DP>(g, L.s[FA_DQ][3], acc[mt], mul, warp * WM + mt * 16, n - q0, d, lane);
}

// ---------------------------------------------------------------- backward: dk, dv

// MT m16 key tiles per warp (64·MT keys per block), BQ queries per step. With MT = 2 every Q
// and dO fragment feeds two key tiles. FX: see softmax_exp2.
template <class T, int DP, int MT, int BQ, bool FX>
__device__ __forceinline__ void flash_bwd_dkdv_impl(const T* q_, const T* k_, const T* v_, const T* do_,
                                                    const float* lse, const float* delta, T* dkv_,
                                                    const FlashLayout& L, float scale, float scale_log2) {
    constexpr int BKEYS = 64 * MT, WK = 16 * MT;  // keys per block, per warp
    constexpr int LD = DP + FA_PAD, KS = DP / 16, NT = BQ / 8, DT = DP / 8, QT = BQ * LD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;                    // [BKEYS][LD]
    u16* sV = sK + BKEYS * LD;         // [BKEYS][LD]
    u16* sQD = sV + BKEYS * LD;        // two stages of Q, dO: [2][2][BQ][LD]
    float* sStat = (float*)(sQD + 4 * QT);  // two stages of lse·log2 e and delta: [2][2][BQ]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y, b = bh / L.heads, h = bh % L.heads;
    const long long n = L.n, m = L.m;
    const int d = (int)L.d, k0 = blockIdx.x * BKEYS;
    const u16* gq = slot((const u16*)q_, L, FA_Q, b, h);
    const u16* gdo = slot((const u16*)do_, L, FA_DO, b, h);
    const long long sqn = L.s[FA_Q][3], sdn = L.s[FA_DO][3];

    load_tile<BKEYS, DP>(sK, slot((const u16*)k_, L, FA_K, b, h) + k0 * L.s[FA_K][3], L.s[FA_K][3], m - k0, d);
    load_tile<BKEYS, DP>(sV, slot((const u16*)v_, L, FA_V, b, h) + k0 * L.s[FA_V][3], L.s[FA_V][3], m - k0, d);
    load_tile<BQ, DP>(sQD, gq, sqn, n, d);
    load_tile<BQ, DP>(sQD + QT, gdo, sdn, n, d);
    cp_async_commit();
    if (threadIdx.x < BQ) {  // rows past n: lse = +inf gives P = 0, their dO rows are zeros
        const long long i = threadIdx.x;
        sStat[i] = i < n ? lse[bh * n + i] * FA_LOG2E : -NEG_INF;
        sStat[BQ + i] = i < n ? delta[bh * n + i] : 0.f;
    }

    float dk[MT][DT][4], dv[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc(dk[mt]), zero_acc(dv[mt]);

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
        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16·MT keys × BQ queries.
        float s[MT][NT][4], dp[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) zero_acc(s[mt]), zero_acc(dp[mt]);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            unsigned ka[MT][4], va[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                frag_a<LD>(ka[mt], sK, warp * WK + mt * 16, kk * 16, lane);
                frag_a<LD>(va[mt], sV, warp * WK + mt * 16, kk * 16, lane);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned qb[4], db[4];
                frag_bt<LD>(qb, sQ, np * 16, kk * 16, lane);
                frag_bt<LD>(db, sDO, np * 16, kk * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(s[mt][2 * np], ka[mt], qb[0], qb[1]);
                    Mma<T>::mma(s[mt][2 * np + 1], ka[mt], qb[2], qb[3]);
                    Mma<T>::mma(dp[mt][2 * np], va[mt], db[0], db[1]);
                    Mma<T>::mma(dp[mt][2 * np + 1], va[mt], db[2], db[3]);
                }
            }
        }
        // Pᵀ (into s) and dSᵀ (into dp); columns are queries.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = nt * 8 + 2 * (lane & 3) + (e & 1);
                    const float p = softmax_exp2<FX>(fmaf(s[mt][nt][e], scale_log2, -st[c]));
                    s[mt][nt][e] = p;
                    dp[mt][nt][e] = p * (dp[mt][nt][e] - st[BQ + c]);
                }
            }
        // dV += Pᵀ·dO, dK += dSᵀ·Q
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            unsigned pa[MT][4], sa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) pack_a<T>(pa[mt], s[mt], kk), pack_a<T>(sa[mt], dp[mt], kk);
#pragma unroll
            for (int dd = 0; dd < DP / 16; ++dd) {
                unsigned db[4], qb[4];
                frag_b<LD>(db, sDO, kk * 16, dd * 16, lane);
                frag_b<LD>(qb, sQ, kk * 16, dd * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(dv[mt][2 * dd], pa[mt], db[0], db[1]);
                    Mma<T>::mma(dv[mt][2 * dd + 1], pa[mt], db[2], db[3]);
                    Mma<T>::mma(dk[mt][2 * dd], sa[mt], qb[0], qb[1]);
                    Mma<T>::mma(dk[mt][2 * dd + 1], sa[mt], qb[2], qb[3]);
                }
            }
        }
        __syncthreads();  // this stage is free for the load two blocks ahead
    }
    cp_async_wait<0>();
    const float ks[2] = {scale, scale}, one[2] = {1.f, 1.f};
    u16* gdk = slot((u16*)dkv_, L, FA_DK, b, h) + k0 * L.s[FA_DK][3];
    u16* gdv = slot((u16*)dkv_, L, FA_DV, b, h) + k0 * L.s[FA_DV][3];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        store_acc<T, DP>(gdk, L.s[FA_DK][3], dk[mt], ks, warp * WK + mt * 16, m - k0, d, lane);
        store_acc<T, DP>(gdv, L.s[FA_DV][3], dv[mt], one, warp * WK + mt * 16, m - k0, d, lane);
    }
}

// ---------------------------------------------------------------- entry points
//
// Variants (tile configurations, see docs/kernels.md and FlashVariant in flash_attention.rs,
// whose tables must match these template arguments):
//   (no suffix)  fwd: 16 queries per warp, 64-key blocks, Q in registers; dq: 16 queries per
//                warp, 64 keys per step (32 for DP > 96); dkdv: 16 keys per warp, 64 queries
//                per step (32 for DP > 64).
//   _m128        fwd (DP 64, 80): 32 queries per warp (BM = 128), 64-key blocks, Q in
//                registers at DP = 64, re-read from shared memory above; dq (DP 64): 32
//                queries per warp, 32 keys per step; dkdv (DP 64): 32 keys per warp (128 per
//                block), 32 queries per step.
//   _n128        fwd only (DP 64, 80, 96): 16 queries per warp, 128-key blocks (half the
//                barriers and softmax rescales per key).
//   _m128e       DP 64, forward and backward: _m128's tiles with one MUFU.EX2 per exponential
//                on sm_90+ (softmax_exp2); the same code as _m128 on sm_80.

#define FLASH_FWD(name, T, DP, SUFFIX, MT, BN, QR, FX)                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_fwd_##name##_d##DP##SUFFIX(const T* q, const T* k, const T* v, T* o, float* lse, FlashLayout L,        \
                                         float scale_log2) {                                                           \
        flash_fwd_impl<T, DP, MT, BN, QR, FX>(q, k, v, o, lse, L, scale_log2);                                         \
    }
#define FLASH_DQ(name, T, DP, SUFFIX, MT, BK, FX)                                                                     \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_bwd_dq_##name##_d##DP##SUFFIX(const T* q, const T* k, const T* v, const T* d_o, const float* lse,      \
                                            const float* delta, T* dq, FlashLayout L, float scale,                     \
                                            float scale_log2) {                                                        \
        flash_bwd_dq_impl<T, DP, MT, BK, FX>(q, k, v, d_o, lse, delta, dq, L, scale, scale_log2);                      \
    }
#define FLASH_DKDV(name, T, DP, SUFFIX, MT, BQ, FX)                                                                   \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_bwd_dkdv_##name##_d##DP##SUFFIX(const T* q, const T* k, const T* v, const T* d_o, const float* lse,    \
                                              const float* delta, T* dkv, FlashLayout L, float scale,                  \
                                              float scale_log2) {                                                      \
        flash_bwd_dkdv_impl<T, DP, MT, BQ, FX>(q, k, v, d_o, lse, delta, dkv, L, scale, scale_log2);                   \
    }

// The default kernels of head dim DP.
#define FLASH_DP(name, T, DP)                                                                                         \
    FLASH_FWD(name, T, DP, , 1, 64, true, false)                                                                       \
    FLASH_DQ(name, T, DP, , 1, (DP <= 96 ? 64 : 32), false)                                                            \
    FLASH_DKDV(name, T, DP, , 1, (DP <= 64 ? 64 : 32), false)

// The variants, at the head dims where ptxas (sm_80 and sm_90a) finds registers for them without
// spills: _m128 forward at DP 64 (Q in registers) and 80 (Q re-read from shared memory; 96
// spills either way), _n128 forward at DP 64, 80, 96, _m128 backward at DP 64 (its dk/dv
// kernel spills at 80).
#define FLASH_FWD_M128(name, T, DP, QR) FLASH_FWD(name, T, DP, _m128, 2, 64, QR, false)
#define FLASH_FWD_N128(name, T, DP) FLASH_FWD(name, T, DP, _n128, 1, 128, true, false)
#define FLASH_BWD_M128(name, T, DP)                                                                                   \
    FLASH_DQ(name, T, DP, _m128, 2, 32, false)                                                                         \
    FLASH_DKDV(name, T, DP, _m128, 2, 32, false)
// _m128e: _m128 at DP 64 with one MUFU.EX2 per exponential (softmax_exp2); measured against
// _m128 before it may become a default (docs/kernels.md).
#define FLASH_M128E(name, T)                                                                                          \
    FLASH_FWD(name, T, 64, _m128e, 2, 64, true, true)                                                                  \
    FLASH_DQ(name, T, 64, _m128e, 2, 32, true)                                                                         \
    FLASH_DKDV(name, T, 64, _m128e, 2, 32, true)

#define FLASH(name, T)                                                                                                 \
    extern "C" __global__ void flash_bwd_delta_##name(const T* o, const T* d_o, float* delta, FlashLayout L,         \
                                                      long long bh) {                                                  \
        flash_bwd_delta_impl<T>(o, d_o, delta, L, bh);                                                                 \
    }                                                                                                                  \
    FLASH_DP(name, T, 64)                                                                                              \
    FLASH_DP(name, T, 80)                                                                                              \
    FLASH_DP(name, T, 96)                                                                                              \
    FLASH_DP(name, T, 112)                                                                                             \
    FLASH_DP(name, T, 128)                                                                                             \
    FLASH_FWD_M128(name, T, 64, true)                                                                                  \
    FLASH_FWD_M128(name, T, 80, false)                                                                                 \
    FLASH_FWD_N128(name, T, 64)                                                                                        \
    FLASH_FWD_N128(name, T, 80)                                                                                        \
    FLASH_FWD_N128(name, T, 96)                                                                                        \
    FLASH_BWD_M128(name, T, 64)                                                                                        \
    FLASH_M128E(name, T)

FLASH(bf16, bf16)
FLASH(f16, f16)
