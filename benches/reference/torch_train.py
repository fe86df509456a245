#!/usr/bin/env python3
"""The PyTorch-eager baseline of `vit bench train|infer --device cpu --precision f32` (issue 15):
timm's `VisionTransformer` on the CPU, f32, on random tensors, printed in the same units and, with
`--json`, with the same field names as `vit bench`.

    python3 benches/reference/torch_train.py --preset S/16 --pool tok --batch 8 [--mode infer] [--json]
    python3 benches/reference/torch_train.py --image-size 28 --patch 4 --channels 1 --width 192 \\
        --depth 6 --mlp-dim 768 --heads 3 --classes 10 --pool gap --batch 128

The model is what `vit bench --model PRESET [--set key=value]...` builds: `--preset` takes the
vitrs presets (`Ti/16`, `S/16`, `S/32`, `B/16`, `B/32`, `L/16`, or `custom`, the Ti/16 shape) in
their Scaling-ViT layout (224×224×3, learned position embedding, MAP head, 1000 classes, QKV and
LayerNorm biases, tanh GELU), and each other model argument overrides one field, as `--set` does.

- train (default): `model.train()`, softmax cross-entropy, backward, `clip_grad_norm_(1.0)`,
  AdamW step, `zero_grad(set_to_none=True)`: the step `vit bench train` times. AdamW has lr 1e-3
  and vitrs's decoupled weight decay 1e-4 with the Scaling-ViT multipliers (`head.weight` × 100,
  other `.weight` kernels × 1, LayerNorm scales, biases, position embedding, class token and MAP
  probe × 0); PyTorch multiplies its `weight_decay` by the learning rate, so each group gets
  `1e-4 × mult / lr`. PyTorch's default AdamW implementation on the CPU (the per-tensor loop)
  unless `--adamw-impl foreach|fused`.
- infer: `model.eval()`, the forward under `torch.inference_mode()`: what `vit bench infer`
  (the forward of `vit predict`) times.

Threads: `torch.set_num_threads(--threads)`, by default every CPU this process may run on, which
is what vitrs's rayon pool uses (`RAYON_NUM_THREADS` unset).

Images/s come from the median step; model FLOPs per image use vitrs's convention
(`ModelConfig::forward_flops_per_image`: the matmuls and attention's two N×N products, elementwise
work left out; train = 3 × forward, infer = 1 × forward), computed from the timm model's shapes,
so `model_flops_per_image` must equal `vit bench`'s for the same architecture
(`scripts/bench-vs-torch.sh` checks it, and the parameter counts).

Differences from the vitrs model that remain (none changes the FLOPs or the parameter count):
- attention is PyTorch's `scaled_dot_product_attention` (its fused CPU kernel) in timm's
  `Attention`; dropout, drop-path and layer-scale are identities (rate 0, none), as in vitrs;
- GAP: timm `global_pool='avg'` with `fc_norm=False`, so the final LayerNorm runs on every token
  before the mean, as in vitrs (timm's default would normalise after pooling);
- MAP: timm's `AttentionPoolLatent` (the layer vitrs's MAP head mirrors, the same parameter
  names), GELU as `--gelu`;
- initialisation (timm's default against vitrs's Scaling-ViT init) and the labels (random here,
  a fixed pattern in vitrs) differ: neither affects the speed;
- vitrs also casts the f32 parameters to the compute dtype and allocates zeroed gradients in each
  step; PyTorch keeps its parameters and frees the gradients (`set_to_none`).
"""
import argparse
import json
import os
import re
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

# (width D, depth L, mlp_dim M, heads, patch) of vitrs's presets (crates/model/src/config.rs).
PRESETS = {
    "custom": (192, 12, 768, 3, 16),
    "Ti/16": (192, 12, 768, 3, 16),
    "S/16": (384, 12, 1536, 6, 16),
    "S/32": (384, 12, 1536, 6, 32),
    "B/16": (768, 12, 3072, 12, 16),
    "B/32": (768, 12, 3072, 12, 32),
    "L/16": (1024, 24, 4096, 16, 16),
}

# vitrs's `SCALING_VIT_WD_MULTS` (crates/optim/src/groups.rs): first full match wins.
WD_MULTS = [
    (r"head\.weight", 100.0),
    (r"(.*\.)?[a-z_]*norm[0-9]*\.weight", 0.0),
    (r".*\.weight", 1.0),
    (r".*", 0.0),
]

LR = 1e-3
WEIGHT_DECAY = 1e-4  # vitrs's absolute (decoupled, not multiplied by lr) coefficient


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="custom", help="vitrs preset: " + ", ".join(PRESETS))
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--patch", type=int)
    ap.add_argument("--channels", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--mlp-dim", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--classes", type=int)
    ap.add_argument("--pool", choices=["tok", "gap", "map"])
    ap.add_argument("--gelu", choices=["tanh", "erf"], default="tanh",
                    help="tanh: timm act_layer 'gelu_tanh' (vitrs's default); erf: nn.GELU")
    ap.add_argument("--batch", type=int, default=256, help="images per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads; default every CPU this process may use")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--adamw-impl", choices=["default", "foreach", "fused"], default="default",
                    help="PyTorch's AdamW implementation (default: its choice for CPU tensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    a = ap.parse_args()
    preset = next((k for k in PRESETS if k.lower() == a.preset.removeprefix("ViT-").lower()), None)
    if preset is None:
        ap.error(f"--preset {a.preset!r}: expected one of {', '.join(PRESETS)}")
    width, depth, mlp_dim, heads, patch = PRESETS[preset]
    cfg = dict(image_size=224, patch=patch, channels=3, width=width, depth=depth, mlp_dim=mlp_dim,
               heads=heads, classes=1000, pool="map")
    for key in cfg:
        value = getattr(a, key)
        if value is not None:
            cfg[key] = value
    for key in ("batch", "steps", "threads", "image_size", "patch", "channels", "width", "depth",
                "mlp_dim", "heads"):
        value = cfg[key] if key in cfg else getattr(a, key)
        if value < 1:
            ap.error(f"--{key.replace('_', '-')} {value}: expected at least 1")
    if a.warmup < 0 or cfg["classes"] < 1:
        ap.error(f"--warmup {a.warmup} / --classes {cfg['classes']}: expected >= 0 / >= 1")
    if cfg["image_size"] % cfg["patch"]:
        ap.error(f"--image-size {cfg['image_size']}: expected a multiple of --patch {cfg['patch']}")
    if cfg["width"] % cfg["heads"]:
        ap.error(f"--width {cfg['width']}: expected a multiple of --heads {cfg['heads']}")
    return a, preset, cfg


def build(cfg, gelu):
    """timm's VisionTransformer in the layout of the vitrs model with this config."""
    pool = cfg["pool"]
    model = VisionTransformer(
        img_size=cfg["image_size"],
        patch_size=cfg["patch"],
        in_chans=cfg["channels"],
        num_classes=cfg["classes"],
        global_pool={"tok": "token", "gap": "avg", "map": "map"}[pool],
        class_token=pool == "tok",
        fc_norm=False,  # the final LayerNorm before pooling, as vitrs (also for GAP)
        embed_dim=cfg["width"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        mlp_ratio=cfg["mlp_dim"] / cfg["width"],
        qkv_bias=True,
        act_layer="gelu_tanh" if gelu == "tanh" else "gelu",
    )
    hidden = model.blocks[0].mlp.fc1.out_features
    if hidden != cfg["mlp_dim"]:
        raise SystemExit(f"--mlp-dim {cfg['mlp_dim']}: timm built an MLP of {hidden} "
                         f"(mlp_ratio {cfg['mlp_dim'] / cfg['width']} × width {cfg['width']})")
    return model


def forward_flops_per_image(m):
    """vitrs's `ModelConfig::forward_flops_per_image` from the timm model's shapes: patch
    embedding, every block (`2·N·D·(4D + 2M) + 4·N²·D`), the MAP head, the classifier."""
    d = m.embed_dim
    patch_in = m.patch_embed.proj.in_channels * m.patch_embed.patch_size[0] * m.patch_embed.patch_size[1]
    grid = m.patch_embed.grid_size[0] * m.patch_embed.grid_size[1]
    n = grid + m.num_prefix_tokens
    embed = 2 * grid * patch_in * d
    blocks = 0
    for b in m.blocks:
        mlp = b.mlp.fc1.out_features
        blocks += 2 * n * d * (4 * d + 2 * mlp) + 4 * n * n * d
    head_in = 0
    if m.attn_pool is not None:
        ap = m.attn_pool
        # One probe query: q and output projections on 1 token, k and v on N, attention 1 × N,
        # then the MLP on 1 token.
        head_in = (2 * ap.q.in_features * ap.q.out_features + 2 * ap.proj.in_features * ap.proj.out_features
                   + 2 * n * ap.kv.in_features * ap.kv.out_features + 4 * n * d
                   + 2 * ap.mlp.fc1.in_features * ap.mlp.fc1.out_features
                   + 2 * ap.mlp.fc2.in_features * ap.mlp.fc2.out_features)
    classifier = 2 * m.head.in_features * m.head.out_features
    return float(embed + blocks + head_in + classifier)


def adamw(model, impl):
    groups = {}
    for name, p in model.named_parameters():
        mult = next(mult for pattern, mult in WD_MULTS if re.fullmatch(pattern, name))
        groups.setdefault(mult, []).append(p)
    params = [{"params": ps, "weight_decay": WEIGHT_DECAY * mult / LR} for mult, ps in groups.items()]
    kw = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    return torch.optim.AdamW(params, lr=LR, **kw)


def main():
    a, preset, cfg = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = build(cfg, a.gelu)
    fwd = forward_flops_per_image(model)
    x = torch.randn(a.batch, cfg["channels"], cfg["image_size"], cfg["image_size"])
    y = torch.randint(0, cfg["classes"], (a.batch,))
    if a.mode == "train":
        model.train()
        opt = adamw(model, a.adamw_impl)
        flops = 3 * fwd

        def step():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        model.eval()
        flops = fwd

        def step():
            with torch.inference_mode():
                return model(x)

    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    if not torch.isfinite(out).all():
        raise SystemExit(f"the {'loss' if a.mode == 'train' else 'logits'} became non-finite: {out}")
    s = statistics.median(times)
    rate = a.batch / s
    r = {
        "what": a.mode, "model": preset, "params": sum(p.numel() for p in model.parameters()),
        "batch": a.batch, "device": "cpu", "precision": "f32",
        "optimizer": "adamw" if a.mode == "train" else "none", "timed_steps": len(times),
        "step_ms": s * 1e3, "images_per_second": rate, "model_flops_per_image": flops,
        "model_tflops": flops * rate / 1e12, "model_gflops": flops * rate / 1e9,
        "threads": a.threads, "adamw_impl": a.adamw_impl, "gelu": a.gelu, "config": cfg,
        "torch": torch.__version__, "timm": timm.__version__,
    }
    if a.json:
        print(json.dumps(r))
    else:
        print(f"torch {a.mode} {preset} {cfg} ({r['params'] / 1e6:.1f}M parameters), batch {a.batch}, "
              f"cpu f32, {a.threads} threads, torch {torch.__version__}, timm {timm.__version__}")
        print(f"  {s * 1e3:.1f} ms/step (median of {len(times)}), {rate:.1f} images/s, "
              f"{r['model_gflops']:.1f} model GFLOP/s")


if __name__ == "__main__":
    main()
