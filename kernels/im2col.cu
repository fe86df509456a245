// im2col.cu: the k×k windows of channels-last images as rows and back (a convolution is im2col
// followed by a matmul with the kernel [out, k, k, in] viewed as [out, k·k·in]).
//
// Layout: images [B, H, W, C] row-major; columns [B, OH·OW, k·k·C] with the output position
// row-major over the (OH, OW) grid and the feature index (ky·k + kx)·C + c. Window element
// (ky, kx) at output (oy, ox) reads pixel (oy·s + ky − pad, ox·s + kx − pad); outside the image
// it reads 0.
//   im2col_<dt>(images, cols, b, h, w, c, k, s, pad, oh, ow)   one thread per column element
//       (coalesced writes); padding elements are written as 0
//   col2im_<dt>(cols, images, b, h, w, c, k, s, pad, oh, ow)   one thread per image element: the
//       sum of the column elements that read it (the adjoint, hence im2col's backward), in the
//       order of their output positions, i.e. (ky, kx) descending: the order of the CPU's
//       scatter, so f32 results are bitwise equal. A gather, so no atomics.
// Algorithm: 1-D grid-stride loops with 64-bit indices. Launch: blocks of 256 threads; no shared memory.
// Precision: im2col copies values unchanged; col2im accumulates in f32 and rounds once.
#include "common.cuh"

template <class T>
__device__ void im2col_impl(const T* images, T* cols, long long b, long long h, long long w, long long c, long long k,
                            long long s, long long pad, long long oh, long long ow) {
    const long long feat = k * k * c, total = b * oh * ow * feat;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long f = e % feat, pos = (e / feat) % (oh * ow), bi = e / (feat * oh * ow);
        const long long ci = f % c, kx = (f / c) % k, ky = f / (c * k);
        const long long y = (pos / ow) * s + ky - pad, x = (pos % ow) * s + kx - pad;
        const bool inside = y >= 0 && y < h && x >= 0 && x < w;
        cols[e] = inside ? images[((bi * h + y) * w + x) * c + ci] : from_f32<T>(0.0f);
    }
}

template <class T>
__device__ void col2im_impl(const T* cols, T* images, long long b, long long h, long long w, long long c, long long k,
                            long long s, long long pad, long long oh, long long ow) {
    const long long feat = k * k * c, total = b * h * w * c;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long ci = e % c, x = (e / c) % w, y = (e / (c * w)) % h, bi = e / (c * w * h);
        float acc = 0.0f;
        for (long long ky = k - 1; ky >= 0; --ky) {
            const long long ty = y + pad - ky;
            if (ty < 0 || ty % s != 0 || ty / s >= oh) continue;
            for (long long kx = k - 1; kx >= 0; --kx) {
                const long long tx = x + pad - kx;
                if (tx < 0 || tx % s != 0 || tx / s >= ow) continue;
                const long long pos = (ty / s) * ow + tx / s;
                acc += load(cols, (bi * oh * ow + pos) * feat + (ky * k + kx) * c + ci);
            }
        }
        store(images, e, acc);
    }
}

#define IM2COL(name, T)                                                                                                \
    extern "C" __global__ void im2col_##name(const T* images, T* cols, long long b, long long h, long long w,         \
                                             long long c, long long k, long long s, long long pad, long long oh,      \
                                             long long ow) {                                                          \
        im2col_impl(images, cols, b, h, w, c, k, s, pad, oh, ow);                                                      \
    }                                                                                                                  \
    extern "C" __global__ void col2im_##name(const T* cols, T* images, long long b, long long h, long long w,         \
                                             long long c, long long k, long long s, long long pad, long long oh,      \
                                             long long ow) {                                                          \
        col2im_impl(cols, images, b, h, w, c, k, s, pad, oh, ow);                                                      \
    }
IM2COL(f32, float)
IM2COL(bf16, bf16)
IM2COL(f16, f16)
