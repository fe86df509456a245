#!/usr/bin/env python3
"""Compares two `vit train` runs of the same config step by step (the device scripts' CPU-vs-GPU
checks): the losses' worst relative difference against a tolerance, and the last evaluation of
each run side by side.

    scripts/compare-runs.py LABEL RUN_A RUN_B TOLERANCE [STEPS]

Exits 1 when the runs logged different numbers of losses (or not STEPS), or when the worst
relative difference is not below TOLERANCE.
"""
import json
import os
import sys


label, run_a, run_b, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
steps = int(sys.argv[5]) if len(sys.argv) > 5 else None


def read(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        print(f"{label}: no {path} (did the run fail?)")
        sys.exit(1)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/") and k.endswith("/accuracy")} for r in rows]
    return losses, [e for e in evals if e]


(a, ea), (b, eb) = read(run_a), read(run_b)
name_a, name_b = os.path.basename(run_a.rstrip("/")), os.path.basename(run_b.rstrip("/"))
if len(a) != len(b) or not a or (steps is not None and len(a) != steps):
    print(f"{label}: {name_a} logged {len(a)} losses, {name_b} {len(b)} (expected {steps or 'the same number'})")
    sys.exit(1)
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(
    f"{label}: {name_a} {a[0]:.5f} -> {a[-1]:.5f}, {name_b} {b[0]:.5f} -> {b[-1]:.5f} over {len(a)} steps; "
    f"max relative difference {worst:.2e} (< {tol:g} expected)"
)
if ea or eb:
    print(f"{label}: last evaluation {name_a} {json.dumps(ea[-1:])}, {name_b} {json.dumps(eb[-1:])}")
sys.exit(0 if worst < tol else 1)
