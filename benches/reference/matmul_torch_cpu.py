#!/usr/bin/env python3
"""The PyTorch side of benches/matmul_cpu.rs: torch.matmul in f32 on the CPU at the same
`[m, k] x [k, n]` shapes, with the same thread count, printed as GFLOP/s per shape, so that
the GEMM speed behind `scripts/bench-vs-torch.sh`'s inference rows can be compared row by row
(issue 15).

    .venv-bench/bin/python benches/reference/matmul_torch_cpu.py [--threads N]

Timing: median of 15 samples of 3 back-to-back calls each, after one warm-up call, as
benches/common.rs's median_time.
"""

import argparse
import os
import statistics
import time

import torch

SHAPES = [
    ("square 256", 256, 256, 256),
    ("S/16 qkv, 4x197 tokens", 788, 1152, 384),
    ("Ti/16 fc1, 8x197 tokens", 1576, 768, 192),
    ("B/16 qkv, 8x197 tokens", 1576, 2304, 768),
    ("B/16 proj, 8x197 tokens", 1576, 768, 768),
    ("B/16 fc1, 8x197 tokens", 1576, 3072, 768),
    ("B/16 fc2, 8x197 tokens", 1576, 768, 3072),
]


def median_time(samples, iters, f):
    f()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(iters):
            f()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"matmul_torch_cpu: torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for name, m, n, k in SHAPES:
            a = torch.randn(m, k)
            b = torch.randn(k, n)
            t = median_time(15, 3, lambda: torch.matmul(a, b))
            print(f"  {name:<26} [{m}x{k}]x[{k}x{n}]  torch.matmul {2 * m * n * k / t / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
