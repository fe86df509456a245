"""Makes the timm parity fixtures under crates/model/tests/fixtures/ (committed, so CI checks
parity without PyTorch). Run it wherever PyTorch and timm install:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch timm safetensors numpy
    /tmp/torchenv/bin/python tests/reference/make_timm_fixtures.py [KIND...] [--out DIR]

Every kind is built in order from one random stream (seed 0), so a kind's files do not depend
on which kinds are written: naming kinds writes only those and leaves the others' files alone
(new kinds go at the end of KINDS so the existing fixtures keep their bits). `--out` writes
elsewhere, e.g. to check that the committed fixtures are reproduced byte for byte.

For each kind it writes
  <kind>.timm.safetensors  the timm state dict (what `vit convert --from timm` reads)
  <kind>.io.safetensors    images [2, 3, 16, 16], r (the upstream gradient), logits, and the
                           gradients of sum(logits * r) w.r.t. the images and a few parameters
  <kind>.json              the vitrs model config overrides that describe the same model
All weights are random (not timm's init, whose zero head would hide the body's gradients).
"""
import argparse
import json
import os
from functools import partial

import torch
import timm
from safetensors.torch import save_file
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "model", "tests", "fixtures")
COMMON = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0)
# vitrs overrides shared by every kind: timm uses exact GELU and LayerNorm eps 1e-6.
VIT = dict(image_size=16, patch=4, channels=3, classes=5, width=32, depth=2, heads=4, mlp_dim=128,
           posemb="learn", gelu="erf", norm_bias=True, prelogits="none", remat=False)

KINDS = {
    # Class token with its own position embedding (timm and the original ViT).
    "vit_tok": (dict(class_token=True, global_pool="token", qkv_bias=True),
                dict(pool="tok", block="sequential", qk_norm=False, qkv_bias=True)),
    # Global average pooling with the final norm before pooling (big_vision's GAP: fc_norm off).
    "vit_gap": (dict(class_token=False, global_pool="avg", fc_norm=False, qkv_bias=True, qk_norm=True),
                dict(pool="gap", block="sequential", qk_norm=True, qkv_bias=True)),
    # MAP head: timm's AttentionPoolLatent.
    "vit_map": (dict(class_token=False, global_pool="map", qkv_bias=True),
                dict(pool="map", block="sequential", qk_norm=False, qkv_bias=True)),
    # ViT-22B-style parallel block with QK-norm and no QKV bias (separate mlp_bias).
    "parallel_qknorm": (dict(class_token=False, global_pool="avg", fc_norm=False, qkv_bias=False, qk_norm=True,
                             block_fn=ParallelScalingBlock),
                        dict(pool="gap", block="parallel", qk_norm=True, qkv_bias=False)),
    # The same blocks with a MAP head: the head's attention keeps its q/kv biases (timm's
    # AttentionPoolLatent, big_vision's MAPHead) although the blocks have qkv_bias=False.
    "parallel_qknorm_map": (dict(class_token=False, global_pool="map", qkv_bias=False, qk_norm=True,
                                 block_fn=ParallelScalingBlock),
                            dict(pool="map", block="parallel", qk_norm=True, qkv_bias=False)),
}

# Parameters whose gradients are stored, per kind (timm names). Not k_norm.bias: adding a constant
# to every key shifts each softmax row uniformly, so its true gradient is exactly zero.
GRADS = ["patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias",
         "blocks.0.in_proj.weight", "blocks.1.mlp_bias", "blocks.0.q_norm.weight", "blocks.1.attn.k_norm.weight",
         "attn_pool.latent", "attn_pool.kv.weight", "cls_token", "pos_embed", "head.weight", "norm.bias"]
# More gradients for some kinds (kept apart so the older kinds' files stay as committed). Not the
# MAP head's k half of kv.bias alone: like k_norm.bias its gradient is exactly zero, but the v half
# is not, so the whole kv.bias is checked.
EXTRA_GRADS = {
    "parallel_qknorm_map": ["attn_pool.q.bias", "attn_pool.kv.bias", "attn_pool.proj.bias", "attn_pool.q.weight",
                            "attn_pool.norm.weight", "attn_pool.mlp.fc1.weight"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", metavar="KIND", help=f"kinds to write (default: all of {list(KINDS)})")
    parser.add_argument("--out", default=OUT, help="output folder (default: the committed fixtures)")
    args = parser.parse_args()
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; expected some of {list(KINDS)}")
    write = set(args.kinds or KINDS)
    out = args.out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for kind, (timm_kwargs, vit_overrides) in KINDS.items():
        # Built (and its random numbers drawn) even when not written, to keep the stream.
        model = VisionTransformer(**COMMON, **timm_kwargs, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

        images = torch.randn(2, 3, 16, 16, requires_grad=True)
        logits = model(images)
        r = torch.randn_like(logits)
        (logits * r).sum().backward()
        io = {"images": images.detach(), "r": r, "logits": logits.detach(), "grad.images": images.grad}
        named = dict(model.named_parameters())
        for g in GRADS + EXTRA_GRADS.get(kind, []):
            if g in named:
                io[f"grad.{g}"] = named[g].grad.detach().clone()
        if kind not in write:
            continue
        save_file(state, os.path.join(out, f"{kind}.timm.safetensors"))
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, f"{kind}.io.safetensors"))
        with open(os.path.join(out, f"{kind}.json"), "w") as f:
            json.dump({**VIT, **vit_overrides}, f, indent=1, sort_keys=True)
        print(kind, "params", sum(p.numel() for p in model.parameters()), "grads", len(io) - 4)


if __name__ == "__main__":
    main()
