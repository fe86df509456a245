// patch.cu: images to non-overlapping p×p patches and back (the ViT patch embedding is
// patchify followed by a matmul with the conv weight [D, C, p, p] viewed as [D, C·p·p]).
//
// Layout: images [B, C, H, W] row-major; patches [B, (H/p)·(W/p), C·p·p] with the patch index
// row-major over the (H/p, W/p) grid and the feature index (c·p + py)·p + px.
//   patchify_<dt>(images, patches, b, c, h, w, p)     one thread per patch element (coalesced writes)
//   unpatchify_<dt>(patches, images, b, c, h, w, p)   one thread per image element; the exact
//       inverse permutation, hence also patchify's backward
// Algorithm: a pure permutation, 1-D grid-stride loop with 64-bit indices.
// Launch: blocks of 256 threads; no shared memory.
// Precision: values are copied unchanged.
#include "common.cuh"

// Index into the image of the element at patch-layout position e.
__device__ __forceinline__ long long image_index(long long e, long long c, long long h, long long w, long long p) {
    const long long feat_n = c * p * p, gw = w / p, patches = (h / p) * gw;
    const long long feat = e % feat_n;
    const long long patch = (e / feat_n) % patches;
    const long long bi = e / (feat_n * patches);
    const long long ci = feat / (p * p), py = (feat / p) % p, px = feat % p;
    const long long y = (patch / gw) * p + py, x = (patch % gw) * p + px;
    return ((bi * c + ci) * h + y) * w + x;
}

// Index into the patch layout of image element e.
__device__ __forceinline__ long long patch_index(long long e, long long c, long long h, long long w, long long p) {
    const long long x = e % w, y = (e / w) % h, ci = (e / (w * h)) % c, bi = e / (w * h * c);
    const long long gw = w / p, patches = (h / p) * gw, feat_n = c * p * p;
    const long long patch = (y / p) * gw + x / p;
    const long long feat = (ci * p + y % p) * p + x % p;
    return (bi * patches + patch) * feat_n + feat;
}

template <class T>
__device__ void patchify_impl(const T* images, T* patches, long long b, long long c, long long h, long long w, long long p) {
    const long long total = b * c * h * w;
    for (long long e = global_thread(); e < total; e += grid_threads()) patches[e] = images[image_index(e, c, h, w, p)];
}

template <class T>
__device__ void unpatchify_impl(const T* patches, T* images, long long b, long long c, long long h, long long w, long long p) {
    const long long total = b * c * h * w;
    for (long long e = global_thread(); e < total; e += grid_threads()) images[e] = patches[patch_index(e, c, h, w, p)];
}

#define PATCH(name, T)                                                                                                 \
    extern "C" __global__ void patchify_##name(const T* images, T* patches, long long b, long long c, long long h,    \
                                               long long w, long long p) {                                            \
        patchify_impl(images, patches, b, c, h, w, p);                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void unpatchify_##name(const T* patches, T* images, long long b, long long c, long long h,  \
                                                 long long w, long long p) {                                          \
        unpatchify_impl(patches, images, b, c, h, w, p);                                                               \
    }
PATCH(f32, float)
PATCH(bf16, bf16)
PATCH(f16, f16)
