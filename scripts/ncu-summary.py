#!/usr/bin/env python3
"""Per-kernel GPU time from an Nsight Compute CSV log, largest first.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        --log-file ncu.csv .gpu-bin/vit bench train --batch 64 --steps 1 --warmup 0
    python3 scripts/ncu-summary.py ncu.csv [top]
"""
import collections
import csv
import sys

rows = []
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
total = sum(t for _, t in rows)
by = collections.defaultdict(lambda: [0, 0.0])
for name, t in rows:
    short = name.split("(")[0][:60]
    by[short][0] += 1
    by[short][1] += t
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
print(f"{len(rows)} kernels, {total / 1e6:.2f} ms of GPU time")
print(f"{'kernel':<60} {'calls':>6} {'ms':>9} {'share':>6}")
for k, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"{k:<60} {n:>6} {t / 1e6:>9.3f} {100 * t / total:>5.1f}%")
