#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention (bf16, CUDA) at the shapes of benches/attention_cuda.rs,
printing the same kind of table: TFLOP/s forward (4·B·H·N²·d) and backward (2.5× that; backward
time = median(forward+backward) − median(forward)), timed with CUDA events, median of 30 runs
after 5 warm-up runs. PyTorch picks its own backend (FlashAttention-2 or cuDNN on H100).

    python3 benches/reference/sdpa.py            # needs torch with CUDA
"""
import statistics
import sys

SHAPES = [  # (name, batch, heads, tokens, head_dim): keep in step with benches/attention_cuda.rs
    ("B/16", 256, 12, 197, 64),
    ("L/16", 256, 16, 197, 64),
    ("N=256", 256, 12, 256, 64),
    ("N=256 d=128", 256, 6, 256, 128),
]
WARMUP, RUNS = 5, 30


def median_ms(torch, fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("sdpa.py: torch is not installed; skipped")
        return 0
    if not torch.cuda.is_available():
        print("sdpa.py: no CUDA device; skipped")
        return 0
    print(f"sdpa.py: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16, "
          f"TFLOP/s (forward 4·B·H·N²·d, backward 2.5× that), median of {RUNS}")
    print("| shape | B | H | N | d | fwd SDPA | bwd SDPA | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b, h, n, d in SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        def fwd_bwd():
            o = F.scaled_dot_product_attention(q, k, v)
            o.backward(do)

        t_f = median_ms(torch, fwd)
        t_fb = median_ms(torch, fwd_bwd)
        flops = 4.0 * b * h * n * n * d
        t_b = max(t_fb - t_f, 1e-6)
        print(f"| {name} | {b} | {h} | {n} | {d} | {flops / t_f / 1e9:.1f} | {2.5 * flops / t_b / 1e9:.1f} | {t_fb:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
