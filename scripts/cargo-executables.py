#!/usr/bin/env python3
"""Executables in cargo's `--message-format=json` stream on stdin, one `NAME PATH` line each.

    cargo test --no-run --message-format=json | scripts/cargo-executables.py test [NAME ...]

KIND is the target kind (`test`, `bench`, `bin`); with NAMEs, only those targets are printed.
Used by scripts/gpu-check.sh and scripts/gpu-ab.sh to find the binaries they carry.
"""
import json
import sys

kind, names = sys.argv[1], set(sys.argv[2:])
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    target = m["target"]
    if kind in target["kind"] and (not names or target["name"] in names):
        print(target["name"], m["executable"])
