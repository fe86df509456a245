#!/usr/bin/env python3
"""The PyTorch baseline of `vit bench train` (issue 14 item 9): timm ViT training steps on
synthetic data, on the same GPU, printed in the same units (images/s, ms/step, model TFLOP/s,
MFU, peak memory).

    python3 benches/reference/timm_train.py --model vit_base_patch16_224 --batch 256 [--no-compile]

bf16 autocast, fused AdamW (lr 1e-3, wd 1e-4), gradient clipping at 1.0, softmax
cross-entropy, torch.compile by default. Model FLOPs per image use the same convention as
vitrs (`ModelConfig::train_flops_per_image`: 3 × the forward matmul and attention FLOPs,
elementwise work left out), computed from the timm model's shape.
"""
import argparse
import json
import statistics
import time

import timm
import torch

HOPPER_BF16_PEAK_TFLOPS = 989.4


def forward_flops_per_image(m):
    """Forward FLOPs of a timm VisionTransformer per image (class token and/or GAP head)."""
    d = m.embed_dim
    p = m.patch_embed.patch_size[0]
    grid = m.patch_embed.grid_size[0] * m.patch_embed.grid_size[1]
    n = grid + getattr(m, "num_prefix_tokens", 1)
    mlp = m.blocks[0].mlp.fc1.out_features
    chans = m.patch_embed.proj.in_channels
    embed = 2 * grid * chans * p * p * d
    block = 2 * n * d * (4 * d + 2 * mlp) + 4 * n * n * d
    head = 2 * d * m.num_classes
    return embed + len(m.blocks) * block + head


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = timm.create_model(a.model, pretrained=False).to(dev)
    flops = 3 * forward_flops_per_image(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    step_model = model if a.no_compile else torch.compile(model)
    x = torch.randn(a.batch, 3, 224, 224, device=dev)
    y = torch.randint(0, model.num_classes, (a.batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    rate = a.batch / s
    tflops = flops * rate / 1e12
    r = {
        "what": "train", "model": a.model, "compile": not a.no_compile, "batch": a.batch,
        "device": torch.cuda.get_device_name(), "step_ms": s * 1e3, "images_per_second": rate,
        "model_tflops": tflops, "mfu": tflops / HOPPER_BF16_PEAK_TFLOPS,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
    }
    if a.json:
        print(json.dumps(r))
    else:
        print(f"timm {a.model} (torch.compile={not a.no_compile}), batch {a.batch}, {r['device']} bf16 autocast")
        print(f"  {s*1e3:.1f} ms/step (median of {a.steps}), {rate:.1f} images/s, {tflops:.1f} model TFLOP/s, "
              f"MFU {100*r['mfu']:.1f}% of {HOPPER_BF16_PEAK_TFLOPS} TFLOP/s")
        print(f"  peak device memory {r['peak_memory_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
