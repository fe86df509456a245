#!/usr/bin/env python3
"""The reference table for benches/gemm_cuda.rs: torch.matmul in bf16 at the same shapes on
the same GPU, printed in the same format, so the ratio ours / torch can be read row by row.

Shapes: qkv, out-proj, fc1, fc2 of B/16 and L/16 at 256 x 196 tokens and G/14 at 256 x 256
tokens, each as forward (x W^T), dgrad (dy W) and wgrad (dy^T x), then squares 4096 and 8192.
torch's wgrad writes bf16 (ours accumulates into f32 with beta = 1: the same GEMM with a wider
output). The fused rows: fc1 forward with bias + tanh GELU through torch._addmm_activation
(cuBLASLt's GELU epilogue, as ours), fc2's dgrad through the GELU with fc1's bias gradient as
torch composes it in eager mode (matmul, gelu_backward, sum).

Timing: CUDA events around a batch of back-to-back calls (about 30 ms), median of 5 batches,
operand sets rotated across one 1.4 GB buffer so L2 never serves the previous call's operands.

    python3 benches/reference/gemm_torch.py        # needs torch with CUDA
"""

import sys

try:
    import torch
except ImportError:
    print("gemm_torch: torch is not installed; nothing to compare")
    sys.exit(0)

PEAK = 989.4  # H100/H200 dense bf16 TFLOP/s
SOURCE_ELEMS = 11 << 26
ROTATE_BYTES = 256 << 20
MODELS = [("B/16", 768, 3072, 256 * 196), ("L/16", 1024, 4096, 256 * 196), ("G/14", 1664, 8192, 256 * 256)]


def rows():
    out = []
    for model, d, mlp, t in MODELS:
        for layer, inp, o in [("qkv", d, 3 * d), ("out-proj", d, d), ("fc1", d, mlp), ("fc2", mlp, d)]:
            out.append((f"{model} {layer} fwd", t, o, inp, False, True))
            out.append((f"{model} {layer} dgrad", t, inp, o, False, False))
            out.append((f"{model} {layer} wgrad", o, inp, t, True, False))
    for s in (4096, 8192):
        out.append((f"square {s}", s, s, s, False, False))
    return out


def operand_sets(source, a, b):
    rnd = lambda x: (x + 127) // 128 * 128
    na, nb = rnd(a[0] * a[1]), rnd(b[0] * b[1])
    need = na + nb
    sets = max(2, min(8, ROTATE_BYTES // (2 * need)))
    stride = min(need, (SOURCE_ELEMS - need) // (sets - 1)) // 128 * 128
    return [
        (source[i * stride : i * stride + a[0] * a[1]].view(*a), source[i * stride + na : i * stride + na + b[0] * b[1]].view(*b))
        for i in range(sets)
    ]


def time(flops, call):
    iters = max(3, min(500, int(0.03 / (flops / 500e12)) + 1))
    for i in range(2):
        call(i)
    torch.cuda.synchronize()
    samples = []
    n = 0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call(n)
            n += 1
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    samples.sort()
    return samples[len(samples) // 2]


def print_row(name, m, n, k, secs):
    tflops = 2.0 * m * n * k / secs / 1e12
    print(f"  {name:<26} {f'{m}x{n}x{k}':>22} {secs * 1e6:>9.1f} {tflops:>8.1f} {tflops / PEAK:>7.3f}")


def main():
    if not torch.cuda.is_available():
        print("gemm_torch: no CUDA device")
        return
    dev = torch.device("cuda:0")
    g = torch.Generator(device=dev).manual_seed(7)
    base = torch.randn(1 << 26, device=dev, dtype=torch.bfloat16, generator=g)
    source = base.repeat(SOURCE_ELEMS >> 26)
    del base
    print(f"gemm_torch: torch {torch.__version__} on {torch.cuda.get_device_name(0)}; torch.matmul bf16; ratio = TFLOP/s / {PEAK}")
    print(f"  {'gemm':<26} {'m x n x k':>22} {'us':>9} {'TFLOP/s':>8} {'ratio':>7}")
    for name, m, n, k, ta, tb in rows():
        a_dims = (k, m) if ta else (m, k)
        b_dims = (n, k) if tb else (k, n)
        sets = operand_sets(source, a_dims, b_dims)
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)

        def call(i, sets=sets, ta=ta, tb=tb, out=out):
            a, b = sets[i % len(sets)]
            torch.matmul(a.t() if ta else a, b.t() if tb else b, out=out)

        print_row(name, m, n, k, time(2.0 * m * n * k, call))
    print("  fused epilogues (fc1: torch._addmm_activation, cuBLASLt GELU; fc2 dgrad: eager composition):")
    for model, d, mlp, t in MODELS:
        sets = operand_sets(source, (t, d), (mlp, d))
        bias = torch.randn(mlp, device=dev, dtype=torch.bfloat16, generator=g) * 0.5

        def fused(i, sets=sets, bias=bias):
            x, w = sets[i % len(sets)]
            torch._addmm_activation(bias, x, w.t(), use_gelu=True)

        print_row(f"{model} fc1 fwd bias+gelu", t, mlp, d, time(2.0 * t * mlp * d, fused))
        sets = operand_sets(source, (t, d), (d, mlp))
        pre = source[SOURCE_ELEMS - t * mlp :].view(t, mlp)

        def dgelu(i, sets=sets, pre=pre):
            dy, w2 = sets[i % len(sets)]
            dpre = torch.ops.aten.gelu_backward(dy @ w2, pre, approximate="tanh")
            dpre.sum(0)

        print_row(f"{model} fc2 dgrad+dgelu+bgrad", t, mlp, d, time(2.0 * t * mlp * d, dgelu))


if __name__ == "__main__":
    main()
