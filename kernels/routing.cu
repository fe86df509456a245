// routing.cu: V-MoE token routing on the device (top-k of the router softmax, Batch Priority
// Routing order, k-major slot assignment with capacity), exactly as the host routing of
// vit-model's `layers/routing.rs` and the CPU reference `crates/tensor/src/cpu/routing.rs`.
//
// Layout: logits [S, E] row-major in T; noise [S, E] f32 or null; groups [G, 4] i64 rows
// (first token, tokens, capacity, first slot): routing groups of consecutive tokens, each with
// its capacity per expert; an expert's buffer holds `slots` = Σ capacity rows, group 0's slots
// first. Outputs: gates [S, E] f32, choice [S, k] i32, order [S] i32 (global token indices,
// group by group), pos [S, k] i32 (the row x·slots + first slot + slot of each assignment in
// the buffers [E·slots], −1 dropped), slot_src [E·slots] i32 (the assignment t·k + j in each
// row, −1 empty), weight [S, k] f32 (the gate of each kept assignment, 0 dropped).
//
//   route_gates_<dt>(logits, noise, sigma, gates, s, e)
//       one thread per token: z̃ = z + σ·n rounded as the host does (no FMA), softmax over E
//       (max, exp(z̃ − max) rounded to f32, the row sum in f64, gate = (f32)(exp / sum)). exp is
//       computed in double and rounded to f32 (correctly rounded but for vanishingly rare
//       inputs); the host's libm expf may differ from it by one ulp now and then, so the
//       self-check compares gates with a tolerance and the decisions taken from them exactly.
//   route_topk(gates, choice, s, e, k)
//       one thread per token: the k largest gates, ties to the lower expert.
//   route_order(gates, choice, groups, order, e, k, bpr)
//       grid (G, blocks): each token's rank in its group: by position (vanilla) or by
//       descending top-1 gate, ties by position (BPR; the host's stable sort). O(n²) per group.
//   route_slots(gates, choice, order, groups, pos, slot_src, weight, e, k, slots)
//       one block of 256 threads per group, thread x owns expert x (E ≤ 256): it walks the
//       group's assignments in claim order (all first choices in `order`, then all second ...)
//       through shared-memory tiles and gives each of its own the next free slot while any is
//       left; then marks its remaining slots empty. Sequential per expert, so exactly the host's.
// Ordering of floats: `total_order_key`, Rust's f32::total_cmp.
// Precision: gates f32 as the host computes them; all decisions exact.
#include "common.cuh"

// A key that orders (value descending, index ascending) as one u64, larger first.
__device__ __forceinline__ unsigned long long rank_key(float v, unsigned int index) {
    return ((unsigned long long)total_order_key(v) << 32) | (unsigned long long)(0xffffffffu - index);
}

template <class T>
__device__ void route_gates_impl(const T* logits, const float* noise, float sigma, float* gates, long long s,
                                 long long e) {
    for (long long t = global_thread(); t < s; t += grid_threads()) {
        const T* z = logits + t * e;
        const float* n = noise ? noise + t * e : nullptr;
        float* g = gates + t * e;
        float m = -__int_as_float(0x7f800000);
        for (long long x = 0; x < e; ++x) {
            float v = load(z, x);
            if (n) v = __fadd_rn(v, __fmul_rn(sigma, n[x]));
            g[x] = v;  // the noisy logit, overwritten by its gate below
            m = fmaxf(m, v);
        }
        double sum = 0.0;
        for (long long x = 0; x < e; ++x) sum += (double)(float)exp((double)__fsub_rn(g[x], m));
        for (long long x = 0; x < e; ++x) g[x] = (float)((double)(float)exp((double)__fsub_rn(g[x], m)) / sum);
    }
}

#define ROUTE_GATES(name, T)                                                                                         \
    extern "C" __global__ void route_gates_##name(const T* logits, const float* noise, float sigma, float* gates,   \
                                                  long long s, long long e) {                                       \
        route_gates_impl(logits, noise, sigma, gates, s, e);                                                         \
    }
ROUTE_GATES(f32, float)
ROUTE_GATES(bf16, bf16)
ROUTE_GATES(f16, f16)

extern "C" __global__ void route_topk(const float* gates, int* choice, long long s, long long e, long long k) {
    for (long long t = global_thread(); t < s; t += grid_threads()) {
        const float* g = gates + t * e;
        // The j-th choice is the largest key below the (j−1)-th: no mask needed.
        unsigned long long prev = 0;
        for (long long j = 0; j < k; ++j) {
            unsigned long long best = 0;
            int arg = 0;
            for (long long x = 0; x < e; ++x) {
                const unsigned long long key = rank_key(g[x], (unsigned int)x);
                if ((j == 0 || key < prev) && key >= best) {
                    best = key;
                    arg = (int)x;
                }
            }
            choice[t * k + j] = arg;
            prev = best;
        }
    }
}

extern "C" __global__ void route_order(const float* gates, const int* choice, const long long* groups, int* order,
                                       long long e, long long k, int bpr) {
    const long long* grp = groups + 4 * (long long)blockIdx.x;
    const long long start = grp[0], n = grp[1];
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.y * blockDim.x) {
        long long rank = i;
        if (bpr) {
            const long long t = start + i;
            const unsigned long long mine = rank_key(gates[t * e + choice[t * k]], (unsigned int)i);
            rank = 0;
            for (long long u = 0; u < n; ++u) {
                const long long tu = start + u;
                rank += rank_key(gates[tu * e + choice[tu * k]], (unsigned int)u) > mine;
            }
        }
        order[start + rank] = (int)(start + i);
    }
}

#define SLOT_TILE 256

extern "C" __global__ void route_slots(const float* gates, const int* choice, const int* order,
                                       const long long* groups, int* pos, int* slot_src, float* weight, long long e,
                                       long long k, long long slots) {
    __shared__ int tile_expert[SLOT_TILE];
    __shared__ int tile_assignment[SLOT_TILE];
    const long long* grp = groups + 4 * (long long)blockIdx.x;
    const long long start = grp[0], n = grp[1], cap = grp[2], first = grp[3];
    const int x = threadIdx.x;
    long long used = 0;
    const long long total = n * k;
    for (long long base = 0; base < total; base += SLOT_TILE) {
        __syncthreads();  // the previous tile's readers are done
        const long long a = base + threadIdx.x;
        if (a < total) {
            const long long j = a / n, t = order[start + a % n];
            tile_assignment[threadIdx.x] = (int)(t * k + j);
            tile_expert[threadIdx.x] = choice[t * k + j];
        }
        __syncthreads();
        const long long len = total - base < SLOT_TILE ? total - base : SLOT_TILE;
        if (x < e) {
            for (long long i = 0; i < len; ++i) {
                if (tile_expert[i] != x) continue;
                const long long as = tile_assignment[i];
                if (used < cap) {
                    const long long row = (long long)x * slots + first + used;
                    pos[as] = (int)row;
                    slot_src[row] = (int)as;
                    weight[as] = gates[(as / k) * e + x];
                    ++used;
                } else {
                    pos[as] = -1;
                    weight[as] = 0.f;
                }
            }
        }
    }
    if (x < e) {
        for (long long sl = used; sl < cap; ++sl) slot_src[(long long)x * slots + first + sl] = -1;
    }
}
