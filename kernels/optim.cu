// optim.cu: fused optimizer steps (AdamW, SGD-momentum, factored Adam) over many parameters in one
// launch, the factored second-moment statistics of factored Adam, and the gradients' global sum
// of squares for clipping (reference §3; the CPU reference is crates/optim/src/optimizer.rs).
//
// Multi-tensor launches. Every kernel gets a table of per-tensor descriptors (raw device
// pointers, sizes, dtypes, per-tensor scalars; the structs below are mirrored field for field by
// the #[repr(C)] structs of crates/optim/src/cuda/tables.rs, sizes asserted on both sides) and `starts[count + 1]`, the prefix sum of the blocks each
// tensor gets; block b works on tensor t with starts[t] <= b < starts[t + 1] (binary search).
// One launch thus covers every parameter of a model, small biases included, with no per-tensor
// launch overhead. dtypes are per-tensor runtime codes (0 f32, 1 bf16, 2 f16), so one launch
// mixes f32 parameters with bf16 momentum; the branch is uniform over a block. Hence the kernel
// names carry no dtype suffix.
//
// Step kernels (one per optimizer; block 256 threads, STEP_ELEMS = 4096 elements per block, each
// thread handles 4 consecutive elements per iteration with one 16-byte (f32) or 8-byte (bf16,
// f16) load per stream when the tensor's pointers allow it (flag VEC), else scalar loads):
// The scalars shared by every tensor come by value in structs (StepScalars s, and the
// optimizer's coefficients c; mirrored in crates/optim/src/cuda/mod.rs):
//   adamw_step(descs, starts, count, s, AdamWCoefficients c)
//       m = c1·g + b1·m;  v = c2·(g·g) + b2·v;  d = (m / bc1) / (sqrt(v / bc2) + eps)
//   sgd_step(descs, starts, count, s, SgdCoefficients c)
//       d = m = g + mu·m  (with momentum; flag HAS_M), else d = g
//   factored_adam_step(descs, starts, count, s, FactoredAdamCoefficients c)
//       unfactored: v = beta2·v + one_minus_beta2·(g·g + eps);  u = g · (1 / sqrt(v))
//       factored:   u = (g · rf) · cf   (rf, cf from factored_rowmean / factored_finalize)
//       d = m = one_minus_mu·u + mu·m  (with momentum), else d = u
//   then, in all three:  θ = θ − schedule · (lr·d + wd·θ)   with g = clip_scale · g_stored,
//   lr = base lr · lr_mult and wd = weight decay · wd_mult per tensor (descriptor).
//   m is read in its dtype, d uses the unrounded f32 m, and m is stored rounded to its dtype
//   (round to nearest even); θ is stored in the parameter's dtype, v in f32.
//   Inputs and outputs may alias (each element is read, then written, by the same thread).
//
// Factored statistics (optax scale_by_factored_rms; crates/optim/src/factored.rs). A factored
// tensor with reduced axes d0 (largest) and d1 (second largest) is viewed as [P, A, Q, B, R],
// where a = min(d0, d1) has size A and b = max(d0, d1) size B; C = B·R. For each of the P·Q
// matrices (p, q), the elements (ia, ib, r) form rows ia of C contiguous columns (ib, r).
// With G2 = g² + eps: S_a = Σ over a of G2, layout [P, Q, B, R] (= dims without a), and
// S_b = Σ over b, layout [P, A, Q, R] (= dims without b). v_row (mean over d0) lives in S_a's
// layout if d0 == a (flag D0_IS_A) and S_b's otherwise; v_col the other one.
//   factored_stats(descs, starts, count, clip, eps)
//       Tile blocks: one block per (matrix, 256-row tile, 128-column tile); warp w handles rows
//       w, w+8, ... of the tile (two per iteration), lane l columns 4l..4l+3. Each thread keeps 4 column sums, each
//       row's sum is a warp reduction; the column sums of the 8 warps meet in shared memory
//       (8 KB). Partial sums go to part_a [tiles_a, |S_a|] and, when R == 1, part_b
//       [tiles_c, |S_b|] (f64). When R > 1 the rows split by r: extra "line" blocks compute S_b
//       directly, one thread per S_b entry looping over b (part_b has one tile then).
//   factored_finalize(descs, starts, count, beta2, c2)
//       One thread per entry of v_row and of v_col: folds the tile partials in order,
//       mean = (float)(sum / n) with n the reduced axis' size, v = beta2·v + c2·mean (stored),
//       and for v_col the column factor cf = 1 / sqrt(v).
//   factored_rowmean(descs, starts, count)
//       One block per slice (p, q, r) of v_row: rm = (float)(Σ v_row over the slice / n1) (the
//       mean of v_row over its d1 axis, per index of the other axes, as optax does), then the
//       row factor rf = 1 / sqrt(v_row / rm) for each entry of the slice.
//   The step kernel then finds, for element (p, ia, q, ib, r), its S_a index (p·Q + q)·C + ib·R + r
//   and S_b index ((p·A + ia)·Q + q)·R + r, in 32-bit arithmetic (a factored tensor has fewer
//   than 2^32 elements; the host checks).
//   Traffic per element of a factored f32 parameter with bf16 momentum: 20 bytes (θ r+w 8,
//   g read twice 8, m r+w 4); the row and column statistics and their partial sums add about 1%.
//
// Global norm: sum_squares(descs, starts, count, partial) sums g² of each 4096-element chunk
// into partial[block], sum_squares_finalize(partial, blocks, out) folds the partials in one block
// of up to 1024 threads in a fixed order (deterministic), and the host reads the single `out`.
// Squares are exact in f64 and every sum is f64 (like the CPU's `global_norm`), so the norm, and
// with it the clipping factor, agrees with the CPU's to ~1e-15: f64 adds are free here (the
// kernel is bound by reading the gradients; H100 and A100 run f64 at half the f32 rate).
//
// Device-side step status (no host round trip in a step; crates/optim/src/cuda/device_step.rs).
// A `StepStatus` (below) lives in device memory for a whole run. Per step:
//   loss_accumulate(x, st)                 st.loss_acc += (double)x[0] (one micro-batch's loss sum)
//   sum_squares_dev(descs, starts, count, partial, st)
//       sum_squares, and the first tensor (in table order) with a non-finite partial goes to
//       st.bad_tensor (atomicMin) while no earlier step was bad
//   step_status_finalize(partial, blocks, st, max_norm, clip_on, t)
//       the fold of sum_squares_finalize (same threads, same order: the same bits), then in
//       double precision, as the host does: norm = sqrt(Σ), clip_scale = clip_on && norm >
//       max_norm ? (float)(max_norm / norm) : 1; loss = loss_acc, loss_acc = 0; a non-finite
//       norm or loss marks step t as the first bad one (sticky), and `skip` is set from then on.
//   *_step_dev, factored_stats_dev, factored_finalize_dev: the step kernels with clip_scale read
//       from st (schedule still by value) that return at once when st.skip (parameters, moments
//       and statistics untouched); the step kernels also write the new parameter rounded to a
//       compute dtype when the parallel CopyDesc table gives a pointer (the bf16/f16 compute copy).
//
// Precision: all arithmetic of the update is exact IEEE f32 with the operation order of the CPU
// reference (__fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn, never contracted into FMA), so given the
// same inputs and scalars a step reproduces the CPU step bit for bit. The factored means
// accumulate in f64, like the CPU reference (there the sum runs in element order, here in tiles:
// the f32 means can differ in the last bit, rarely). Launch: block 256 threads everywhere except
// sum_squares_finalize; static shared memory only (at most 8 KB + 256 B); grids are the block
// totals of the tables (no grid-stride loops).
#include "common.cuh"

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

// Descriptor flags.
#define F_VEC 1      // every pointer of the tensor allows 4-element vector accesses
#define F_HAS_M 2    // momentum present
#define F_FACTORED 4 // factored second moment (rf, cf) instead of v
#define F_D0_IS_A 8  // factored: d0 is the lower of the two reduced axes

#define OPT_THREADS 256
#define STEP_ELEMS 4096  // elements per block of the step and sum-of-squares kernels
#define TILE_ROWS 256
#define TILE_COLS 128
#define STATS_WARPS (OPT_THREADS / 32)

#define MUL(a, b) __fmul_rn(a, b)
#define ADD(a, b) __fadd_rn(a, b)
#define SUB(a, b) __fsub_rn(a, b)
#define DIV(a, b) __fdiv_rn(a, b)
#define SQRT(a) __fsqrt_rn(a)

// One tensor of a step launch (136 bytes; mirrored in crates/optim/src/cuda/tables.rs).
struct StepDesc {
    const void* p;    // parameter
    const void* g;    // gradient
    const void* m;    // momentum (null without)
    const float* v;   // full second moment (AdamW; unfactored factored Adam), else null
    void* p_out;      // new parameter
    void* m_out;      // new momentum
    float* v_out;     // new full second moment
    const float* rf;  // factored: row factors, v_row's layout
    const float* cf;  // factored: column factors, v_col's layout
    long long n;      // elements
    long long A, Q, C, R;  // factored geometry (see above); unused otherwise
    float lr, wd;     // lr·lr_mult, wd·wd_mult
    int p_dt, g_dt, m_dt, flags;
};
static_assert(sizeof(StepDesc) == 136, "StepDesc is mirrored in crates/optim/src/cuda/tables.rs");

// One factored tensor of the statistics launches (152 bytes; mirrored in tables.rs).
struct FactoredDesc {
    const void* g;
    const float* vr_in;  // v_row before the step
    const float* vc_in;  // v_col before the step
    float* vr_out;
    float* vc_out;
    float* rf;           // row factors (v_row's layout)
    float* cf;           // column factors (v_col's layout)
    double* part_a;      // [tiles_a, P·Q·C] partial sums over a
    double* part_b;      // [tiles_b, P·A·Q·R] partial sums over b (tiles_b = tiles_c if R == 1, else 1)
    long long P, A, Q, B, R;
    long long tiles_a, tiles_c;  // row tiles (TILE_ROWS) and column tiles (TILE_COLS) of one [A, C] matrix
    long long tile_blocks;       // P·Q·tiles_a·tiles_c; in factored_stats the S_b line blocks follow (R > 1)
    long long vr_blocks;         // ceil(|v_row| / 256): factored_finalize's v_row blocks, then v_col's
    int g_dt, flags;
};
static_assert(sizeof(FactoredDesc) == 152, "FactoredDesc is mirrored in crates/optim/src/cuda/tables.rs");

// One tensor of the sum of squares (24 bytes; mirrored in tables.rs).
struct SqDesc {
    const void* x;
    long long n;
    int dt, flags;
};
static_assert(sizeof(SqDesc) == 24, "SqDesc is mirrored in crates/optim/src/cuda/tables.rs");

// Scalars of a step launch, shared by every tensor (mirrored in crates/optim/src/cuda/mod.rs).
struct StepScalars {
    float schedule;    // the schedule's factor at this step
    float clip_scale;  // every gradient is multiplied by this first
};
static_assert(sizeof(StepScalars) == 8, "StepScalars is mirrored in crates/optim/src/cuda/mod.rs");

// The device-side status of a run's steps (80 bytes; mirrored in crates/optim/src/cuda/device_step.rs).
struct StepStatus {
    double loss_acc;      // Σ of the micro-batch loss sums of the step in progress
    double loss;          // the last finalized step's loss sum
    double sum_sq;        // the last finalized step's Σ g²
    double norm;          // sqrt(sum_sq)
    double bad_loss;      // loss sum and norm of the first bad step
    double bad_norm;
    long long steps;      // steps finalized (the optimizer count t + 1 of the last)
    long long first_bad;  // the first step t whose norm or loss was not finite, -1 for none
    float clip_scale;     // the last finalized step's clip factor (1 without clipping)
    int skip;             // 1 once a step was bad: every later step kernel returns at once
    int bad_tensor;       // the first bad step's first tensor (table order) with a non-finite value;
                          // INT_MAX (0x7fffffff) when none was found
    int pad;
};
static_assert(sizeof(StepStatus) == 80, "StepStatus is mirrored in crates/optim/src/cuda/device_step.rs");

// Where a step kernel also writes the new parameter, rounded to `dt` (16 bytes; `out` null for
// none; mirrored in device_step.rs). Entry t belongs to descriptor t.
struct CopyDesc {
    void* out;
    int dt, pad;
};
static_assert(sizeof(CopyDesc) == 16, "CopyDesc is mirrored in crates/optim/src/cuda/device_step.rs");

// AdamW: m = c1·g + b1·m, v = c2·(g·g) + b2·v, d = (m / bc1) / (sqrt(v / bc2) + eps).
struct AdamWCoefficients {
    float b1, c1, b2, c2, bc1, bc2, eps;
};
static_assert(sizeof(AdamWCoefficients) == 28, "AdamWCoefficients is mirrored in crates/optim/src/cuda/mod.rs");

// SGD: d = m = g + mu·m.
struct SgdCoefficients {
    float mu;
};
static_assert(sizeof(SgdCoefficients) == 4, "SgdCoefficients is mirrored in crates/optim/src/cuda/mod.rs");

// Factored Adam (see the header).
struct FactoredAdamCoefficients {
    float beta2, one_minus_beta2, eps, mu, one_minus_mu;
};
static_assert(sizeof(FactoredAdamCoefficients) == 20,
              "FactoredAdamCoefficients is mirrored in crates/optim/src/cuda/mod.rs");

// ---------------------------------------------------------------- helpers

// The tensor of block b: the largest t < count with starts[t] <= b (tensors without blocks are
// skipped because the next tensor has the same start).
__device__ __forceinline__ int find_tensor(const long long* starts, int count, long long b) {
    int lo = 0, hi = count;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (starts[mid] <= b) lo = mid;
        else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ float load_dt(const void* p, long long i, int dt) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_BF16) return to_f32(((const bf16*)p)[i]);
    return to_f32(((const f16*)p)[i]);
}

__device__ __forceinline__ void store_dt(void* p, long long i, int dt, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else if (dt == DT_BF16) ((bf16*)p)[i] = from_f32<bf16>(v);
    else ((f16*)p)[i] = from_f32<f16>(v);
}

__device__ __forceinline__ float half_bits_to_f32(unsigned int h, int dt) {
    if (dt == DT_BF16) {
        bf16 b;
        b.bits = (unsigned short)h;
        return to_f32(b);
    }
    f16 f;
    f.bits = (unsigned short)h;
    return to_f32(f);
}

__device__ __forceinline__ unsigned int f32_to_half_bits(float v, int dt) {
    return dt == DT_BF16 ? (unsigned int)from_f32<bf16>(v).bits : (unsigned int)from_f32<f16>(v).bits;
}

// Elements i..i+3 (i a multiple of 4, the pointer aligned to 4 elements).
__device__ __forceinline__ void load4(const void* p, long long i, int dt, float* x) {
    if (dt == DT_F32) {
        const float4 v = ((const float4*)p)[i >> 2];
        x[0] = v.x;
        x[1] = v.y;
        x[2] = v.z;
        x[3] = v.w;
    } else {
        const uint2 v = ((const uint2*)p)[i >> 2];
        x[0] = half_bits_to_f32(v.x & 0xffffu, dt);
        x[1] = half_bits_to_f32(v.x >> 16, dt);
        x[2] = half_bits_to_f32(v.y & 0xffffu, dt);
        x[3] = half_bits_to_f32(v.y >> 16, dt);
    }
}

__device__ __forceinline__ void store4(void* p, long long i, int dt, const float* x) {
    if (dt == DT_F32) {
        float4 v;
        v.x = x[0];
        v.y = x[1];
        v.z = x[2];
        v.w = x[3];
        ((float4*)p)[i >> 2] = v;
    } else {
        uint2 v;
        v.x = f32_to_half_bits(x[0], dt) | (f32_to_half_bits(x[1], dt) << 16);
        v.y = f32_to_half_bits(x[2], dt) | (f32_to_half_bits(x[3], dt) << 16);
        ((uint2*)p)[i >> 2] = v;
    }
}

// Up to 4 elements from i (cnt of them; vector access when vec).
__device__ __forceinline__ void load_group(const void* p, long long i, int dt, int cnt, bool vec, float* x) {
    if (vec) {
        load4(p, i, dt, x);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j] = j < cnt ? load_dt(p, i + j, dt) : 0.f;
    }
}

__device__ __forceinline__ void store_group(void* p, long long i, int dt, int cnt, bool vec, const float* x) {
    if (vec) {
        store4(p, i, dt, x);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (j < cnt) store_dt(p, i + j, dt, x[j]);
    }
}

// ---------------------------------------------------------------- the step kernels

#define KIND_ADAMW 0
#define KIND_SGD 1
#define KIND_FACTORED 2

// Row and column factor indices of element i of a factored tensor: rf in v_row's layout, cf in
// v_col's (S_a index (p·Q + q)·C + col, S_b index row·R + col % R with row = i / C). 32-bit
// arithmetic (the host refuses factored tensors of 2^32 elements or more): it keeps the
// factored step at 48 registers instead of 72.
__device__ __forceinline__ void factor_index(const StepDesc& d, long long i, long long& ri, long long& ci) {
    const unsigned int C = (unsigned int)d.C, Q = (unsigned int)d.Q, R = (unsigned int)d.R;
    const unsigned int aq = (unsigned int)(d.A * d.Q);
    const unsigned int row = (unsigned int)i / C, col = (unsigned int)i - row * C;
    const unsigned int p = row < aq ? 0u : row / aq;
    const unsigned int q = Q == 1 ? 0u : row % Q;
    const unsigned int sa = (p * Q + q) * C + col;
    const unsigned int sb = row * R + (R == 1 ? 0u : col % R);
    if (d.flags & F_D0_IS_A) {
        ri = sa;
        ci = sb;
    } else {
        ri = sb;
        ci = sa;
    }
}

// KIND's coefficients: AdamWCoefficients, SgdCoefficients or FactoredAdamCoefficients.
template <int KIND, bool COPY, class Coefficients>
__device__ __forceinline__ void step_group(const StepDesc& d, long long i0, const StepScalars& s,
                                           const Coefficients& c, const CopyDesc* copy) {
    const int cnt = (int)min(4ll, d.n - i0);
    const bool vec = (d.flags & F_VEC) && cnt == 4;
    const bool has_m = (d.flags & F_HAS_M) != 0;
    const bool factored = KIND == KIND_FACTORED && (d.flags & F_FACTORED);
    const bool has_v = KIND == KIND_ADAMW || (KIND == KIND_FACTORED && !factored);
    float th[4], g[4], m[4], v[4], rf[4], cf[4];
    load_group(d.p, i0, d.p_dt, cnt, vec, th);
    load_group(d.g, i0, d.g_dt, cnt, vec, g);
    if (has_m) load_group(d.m, i0, d.m_dt, cnt, vec, m);
    if (has_v) load_group(d.v, i0, DT_F32, cnt, vec, v);
    if (factored) {
        if (cnt == 4 && d.R == 1 && (d.C & 3) == 0) {
            // The 4 elements are consecutive columns of one row: the S_a index steps by 1, the
            // S_b index (the row) stays.
            long long ri, ci;
            factor_index(d, i0, ri, ci);
            const int rstep = (d.flags & F_D0_IS_A) ? 1 : 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                rf[j] = d.rf[ri + j * rstep];
                cf[j] = d.cf[ci + j * (1 - rstep)];
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (j < cnt) {
                    long long ri, ci;
                    factor_index(d, i0 + j, ri, ci);
                    rf[j] = d.rf[ri];
                    cf[j] = d.cf[ci];
                } else {
                    rf[j] = cf[j] = 0.f;
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float gj = MUL(g[j], s.clip_scale);
        float dir;
        if constexpr (KIND == KIND_ADAMW) {
            const float mm = ADD(MUL(c.c1, gj), MUL(c.b1, m[j]));
            const float vv = ADD(MUL(c.c2, MUL(gj, gj)), MUL(c.b2, v[j]));
            dir = DIV(DIV(mm, c.bc1), ADD(SQRT(DIV(vv, c.bc2)), c.eps));
            m[j] = mm;
            v[j] = vv;
        } else if constexpr (KIND == KIND_SGD) {
            dir = gj;
            if (has_m) {
                m[j] = ADD(gj, MUL(c.mu, m[j]));
                dir = m[j];
            }
        } else {
            float u;
            if (factored) {
                u = MUL(MUL(gj, rf[j]), cf[j]);
            } else {
                v[j] = ADD(MUL(c.beta2, v[j]), MUL(c.one_minus_beta2, ADD(MUL(gj, gj), c.eps)));
                u = MUL(gj, DIV(1.f, SQRT(v[j])));
            }
            dir = u;
            if (has_m) {
                m[j] = ADD(MUL(c.one_minus_mu, u), MUL(c.mu, m[j]));
                dir = m[j];
            }
        }
        th[j] = SUB(th[j], MUL(s.schedule, ADD(MUL(d.lr, dir), MUL(d.wd, th[j]))));
    }
    store_group(d.p_out, i0, d.p_dt, cnt, vec, th);
    // The compute copy: its own alignment (8 bytes for 4 bf16/f16 elements) is checked here.
    if (COPY && copy->out != nullptr)
        store_group(copy->out, i0, copy->dt, cnt, cnt == 4 && ((unsigned long long)copy->out & 15) == 0, th);
    if (has_m) store_group(d.m_out, i0, d.m_dt, cnt, vec, m);
    if (has_v) store_group(d.v_out, i0, DT_F32, cnt, vec, v);
}

template <int KIND, bool COPY = false, class Coefficients>
__device__ void step_impl(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                          const StepScalars& s, const Coefficients& c, const CopyDesc* copies = nullptr) {
    const int t = find_tensor(starts, count, blockIdx.x);
    const StepDesc& d = descs[t];
    const CopyDesc* copy = COPY ? copies + t : nullptr;
    const long long base = ((long long)blockIdx.x - starts[t]) * STEP_ELEMS;
#pragma unroll 1
    for (int it = 0; it < STEP_ELEMS / (4 * OPT_THREADS); ++it) {
        const long long i0 = base + (long long)(it * OPT_THREADS + threadIdx.x) * 4;
        if (i0 >= d.n) break;
        step_group<KIND, COPY>(d, i0, s, c, copy);
    }
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    adamw_step(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count, StepScalars s,
               AdamWCoefficients c) {
    step_impl<KIND_ADAMW>(descs, starts, count, s, c);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    sgd_step(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count, StepScalars s,
             SgdCoefficients c) {
    step_impl<KIND_SGD>(descs, starts, count, s, c);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_adam_step(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                       StepScalars s, FactoredAdamCoefficients c) {
    step_impl<KIND_FACTORED>(descs, starts, count, s, c);
}

// The device-status variants: clip_scale from st, nothing written once st->skip.
__device__ __forceinline__ StepScalars status_scalars(float schedule, const StepStatus* st) {
    StepScalars s;
    s.schedule = schedule;
    s.clip_scale = st->clip_scale;
    return s;
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    adamw_step_dev(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                   const CopyDesc* __restrict__ copies, const StepStatus* __restrict__ st, float schedule,
                   AdamWCoefficients c) {
    if (st->skip) return;
    step_impl<KIND_ADAMW, true>(descs, starts, count, status_scalars(schedule, st), c, copies);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    sgd_step_dev(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                 const CopyDesc* __restrict__ copies, const StepStatus* __restrict__ st, float schedule,
                 SgdCoefficients c) {
    if (st->skip) return;
    step_impl<KIND_SGD, true>(descs, starts, count, status_scalars(schedule, st), c, copies);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_adam_step_dev(const StepDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                           const CopyDesc* __restrict__ copies, const StepStatus* __restrict__ st, float schedule,
                           FactoredAdamCoefficients c) {
    if (st->skip) return;
    step_impl<KIND_FACTORED, true>(descs, starts, count, status_scalars(schedule, st), c, copies);
}

// ---------------------------------------------------------------- factored statistics

__device__ __forceinline__ double g2_of(float x, float clip, float eps) {
    const float g = MUL(x, clip);
    return (double)ADD(MUL(g, g), eps);
}

// One [TILE_ROWS, TILE_COLS] tile of matrix pq: column partials into part_a and (R == 1) row
// partials into part_b.
__device__ void stats_tile(const FactoredDesc& d, long long lb, float clip, float eps) {
    __shared__ double cols[STATS_WARPS][TILE_COLS];
    const long long C = d.B * d.R;
    const long long na = d.P * d.Q * C, nb = d.P * d.A * d.Q * d.R;
    const long long tc = lb % d.tiles_c, t2 = lb / d.tiles_c;
    const long long ta = t2 % d.tiles_a, pq = t2 / d.tiles_a;
    const long long p = pq / d.Q, q = pq % d.Q;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long c0 = tc * TILE_COLS + lane * 4;
    const int cnt = (int)max(0ll, min(4ll, C - c0));
    const bool vec = (d.flags & F_VEC) && cnt == 4 && (C & 3) == 0;
    double col[4] = {0.0, 0.0, 0.0, 0.0};
    // Two rows per iteration (rows ia and ia + 8 of this warp), so two loads are in flight.
#pragma unroll 1
    for (int k = 0; k < TILE_ROWS / STATS_WARPS; k += 2) {
        const long long ia = ta * TILE_ROWS + warp + k * STATS_WARPS;
        if (ia >= d.A) break;  // uniform over the warp
        const bool two = ia + STATS_WARPS < d.A;
        const long long row0 = (p * d.A + ia) * d.Q + q, row1 = row0 + STATS_WARPS * d.Q;
        float x[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        if (cnt > 0) {
            load_group(d.g, row0 * C + c0, d.g_dt, cnt, vec, x[0]);
            if (two) load_group(d.g, row1 * C + c0, d.g_dt, cnt, vec, x[1]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (h == 1 && !two) break;
            double rs = 0.0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (j < cnt) {
                    const double g2 = g2_of(x[h][j], clip, eps);
                    col[j] += g2;
                    rs += g2;
                }
            }
            if (d.R == 1) {
                rs = warp_sum(rs);
                if (lane == 0) d.part_b[tc * nb + (h == 0 ? row0 : row1)] = rs;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) cols[warp][lane * 4 + j] = col[j];
    __syncthreads();
    if (threadIdx.x < TILE_COLS) {
        const long long c = tc * TILE_COLS + threadIdx.x;
        if (c < C) {
            double s = 0.0;
#pragma unroll
            for (int w = 0; w < STATS_WARPS; ++w) s += cols[w][threadIdx.x];
            d.part_a[ta * na + pq * C + c] = s;
        }
    }
}

// R > 1: S_b entry l = row·R + r, summed over b directly (one tile).
__device__ void stats_line(const FactoredDesc& d, long long l, float clip, float eps) {
    const long long C = d.B * d.R;
    const long long row = l / d.R, r = l % d.R;
    const long long base = row * C + r;
    double s = 0.0;
    for (long long ib = 0; ib < d.B; ++ib) s += g2_of(load_dt(d.g, base + ib * d.R, d.g_dt), clip, eps);
    d.part_b[l] = s;
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_stats(const FactoredDesc* __restrict__ descs, const long long* __restrict__ starts, int count, float clip,
                   float eps) {
    const int t = find_tensor(starts, count, blockIdx.x);
    const FactoredDesc& d = descs[t];
    const long long lb = (long long)blockIdx.x - starts[t];
    if (lb < d.tile_blocks) {
        stats_tile(d, lb, clip, eps);
    } else {
        const long long l = (lb - d.tile_blocks) * OPT_THREADS + threadIdx.x;
        if (l < d.P * d.A * d.Q * d.R) stats_line(d, l, clip, eps);
    }
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_stats_dev(const FactoredDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                       const StepStatus* __restrict__ st, float eps) {
    if (st->skip) return;
    const float clip = st->clip_scale;
    const int t = find_tensor(starts, count, blockIdx.x);
    const FactoredDesc& d = descs[t];
    const long long lb = (long long)blockIdx.x - starts[t];
    if (lb < d.tile_blocks) {
        stats_tile(d, lb, clip, eps);
    } else {
        const long long l = (lb - d.tile_blocks) * OPT_THREADS + threadIdx.x;
        if (l < d.P * d.A * d.Q * d.R) stats_line(d, l, clip, eps);
    }
}

// Sum over the tiles of entry e of S_a (a_side) or S_b.
__device__ __forceinline__ double fold_partials(const FactoredDesc& d, bool a_side, long long e) {
    const long long C = d.B * d.R;
    const double* part = a_side ? d.part_a : d.part_b;
    const long long stride = a_side ? d.P * d.Q * C : d.P * d.A * d.Q * d.R;
    const long long tiles = a_side ? d.tiles_a : (d.R == 1 ? d.tiles_c : 1);
    double s = 0.0;
    for (long long t = 0; t < tiles; ++t) s += part[t * stride + e];
    return s;
}

__device__ __forceinline__ void factored_finalize_impl(const FactoredDesc* __restrict__ descs,
                                                       const long long* __restrict__ starts, int count, float beta2,
                                                       float c2) {
    const int t = find_tensor(starts, count, blockIdx.x);
    const FactoredDesc& d = descs[t];
    const long long lb = (long long)blockIdx.x - starts[t];
    const bool d0_is_a = (d.flags & F_D0_IS_A) != 0;
    const long long na = d.P * d.Q * d.B * d.R, nb = d.P * d.A * d.Q * d.R;
    const bool row_side = lb < d.vr_blocks;
    // v_row is the mean over d0: S_a's side when d0 == a. v_col the other side.
    const bool a_side = row_side ? d0_is_a : !d0_is_a;
    const long long e = (row_side ? lb : lb - d.vr_blocks) * OPT_THREADS + threadIdx.x;
    if (e >= (a_side ? na : nb)) return;
    const double n = (double)(a_side ? d.A : d.B);
    const float mean = (float)(fold_partials(d, a_side, e) / n);
    const float* in = row_side ? d.vr_in : d.vc_in;
    const float v = ADD(MUL(beta2, in[e]), MUL(c2, mean));
    if (row_side) {
        d.vr_out[e] = v;
    } else {
        d.vc_out[e] = v;
        d.cf[e] = DIV(1.f, SQRT(v));
    }
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_finalize(const FactoredDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                      float beta2, float c2) {
    factored_finalize_impl(descs, starts, count, beta2, c2);
}

// The in-place statistics are written here: skipped once st->skip (factored_rowmean writes
// scratch factors only and needs no variant).
extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_finalize_dev(const FactoredDesc* __restrict__ descs, const long long* __restrict__ starts, int count,
                          const StepStatus* __restrict__ st, float beta2, float c2) {
    if (st->skip) return;
    factored_finalize_impl(descs, starts, count, beta2, c2);
}

// Block s = slice (p, q, r) of v_row: entry k of the slice (k < n1, n1 the size of d1) is
// pq·C + k·R + r when d0 == a (v_row = [P, Q, B, R]), else ((p·A + k)·Q + q)·R + r
// (v_row = [P, A, Q, R]).
__device__ __forceinline__ long long slice_entry(const FactoredDesc& d, long long pq, long long r, long long k) {
    if (d.flags & F_D0_IS_A) return pq * d.B * d.R + k * d.R + r;
    const long long p = pq / d.Q, q = pq % d.Q;
    return ((p * d.A + k) * d.Q + q) * d.R + r;
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    factored_rowmean(const FactoredDesc* __restrict__ descs, const long long* __restrict__ starts, int count) {
    const int t = find_tensor(starts, count, blockIdx.x);
    const FactoredDesc& d = descs[t];
    const long long s = (long long)blockIdx.x - starts[t];
    const long long pq = s / d.R, r = s % d.R;
    const long long n1 = (d.flags & F_D0_IS_A) ? d.B : d.A;
    double sum = 0.0;
    for (long long k = threadIdx.x; k < n1; k += blockDim.x) sum += (double)d.vr_out[slice_entry(d, pq, r, k)];
    const float rm = (float)(block_sum(sum) / (double)n1);
    for (long long k = threadIdx.x; k < n1; k += blockDim.x) {
        const long long e = slice_entry(d, pq, r, k);
        d.rf[e] = DIV(1.f, SQRT(DIV(d.vr_out[e], rm)));
    }
}

// ---------------------------------------------------------------- global sum of squares

// Block b's Σ x² (every thread gets it).
__device__ __forceinline__ double sum_squares_block(const SqDesc* __restrict__ descs,
                                                    const long long* __restrict__ starts, int count, int& t) {
    t = find_tensor(starts, count, blockIdx.x);
    const SqDesc& d = descs[t];
    const long long base = ((long long)blockIdx.x - starts[t]) * STEP_ELEMS;
    double acc = 0.0;
#pragma unroll 1
    for (int it = 0; it < STEP_ELEMS / (4 * OPT_THREADS); ++it) {
        const long long i0 = base + (long long)(it * OPT_THREADS + threadIdx.x) * 4;
        if (i0 >= d.n) break;
        const int cnt = (int)min(4ll, d.n - i0);
        float x[4];
        load_group(d.x, i0, d.dt, cnt, (d.flags & F_VEC) && cnt == 4, x);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc += (double)x[j] * (double)x[j];  // exact squares; x[j] = 0 beyond cnt
    }
    return block_sum(acc);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    sum_squares(const SqDesc* __restrict__ descs, const long long* __restrict__ starts, int count, double* partial) {
    int t;
    const double acc = sum_squares_block(descs, starts, count, t);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// sum_squares, and (while no earlier step was bad) the first tensor with a non-finite partial
// into st->bad_tensor.
extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    sum_squares_dev(const SqDesc* __restrict__ descs, const long long* __restrict__ starts, int count, double* partial,
                    StepStatus* st) {
    int t;
    const double acc = sum_squares_block(descs, starts, count, t);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = acc;
        if (!isfinite(acc) && st->first_bad < 0) atomicMin(&st->bad_tensor, t);
    }
}

// The fold of the partials: blockDim.x threads, a fixed order (deterministic).
__device__ __forceinline__ double fold_sum_partials(const double* partial, long long blocks) {
    double acc = 0.0;
    for (long long i = threadIdx.x; i < blocks; i += blockDim.x) acc += partial[i];
    return block_sum(acc);
}

extern "C" __global__ void __launch_bounds__(1024)
    sum_squares_finalize(const double* partial, long long blocks, double* out) {
    const double acc = fold_sum_partials(partial, blocks);
    if (threadIdx.x == 0) out[0] = acc;
}

// See the header: the norm and clip factor of step t, and the loss, kept on the device. Launched
// like sum_squares_finalize (one block of FINALIZE_THREADS), so the sum has the same bits.
extern "C" __global__ void __launch_bounds__(1024)
    step_status_finalize(const double* partial, long long blocks, StepStatus* st, double max_norm, int clip_on,
                         long long t) {
    const double sq = fold_sum_partials(partial, blocks);
    if (threadIdx.x != 0) return;
    const double norm = __dsqrt_rn(sq);
    const double loss = st->loss_acc;
    st->loss = loss;
    st->loss_acc = 0.0;
    st->sum_sq = sq;
    st->norm = norm;
    st->steps = t + 1;
    if ((!isfinite(norm) || !isfinite(loss)) && st->first_bad < 0) {
        st->first_bad = t;
        st->bad_loss = loss;
        st->bad_norm = norm;
    }
    st->skip = st->first_bad >= 0 ? 1 : 0;
    st->clip_scale = (clip_on && norm > max_norm) ? __double2float_rn(__ddiv_rn(max_norm, norm)) : 1.f;
}

// st->loss_acc += x[0] (a micro-batch's loss sum, f32), in f64 like the host's sum.
extern "C" __global__ void loss_accumulate(const float* x, StepStatus* st) {
    if (threadIdx.x == 0 && blockIdx.x == 0) st->loss_acc += (double)x[0];
}
