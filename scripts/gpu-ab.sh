#!/usr/bin/env bash
# A/B of kernel versions on one warm GPU (docs/perf.md, session 10): build each version here,
# carry the archives, then test and time them alternately in one device call, so that a
# difference is measured against a baseline from the same machine and minute.
#
# Here, once per version (the working tree as it is; commit or stash between versions):
#   scripts/gpu-ab.sh --build NAME     # packs .gpu-NAME.tar.xz: vit, the attention bench and
#                                      # the flash and model GPU tests (~9 MB)
# On the GPU host, with the archives carried (`carry: [".gpu-base.tar.xz", ".gpu-new.tar.xz"]`):
#   scripts/gpu-ab.sh --run base new   # each version's GPU tests (outputs poisoned to NaN), its
#                                      # attention bench, then `vit bench train` alternated
#                                      # (VITRS_AB_ROUNDS rounds, default 2; VITRS_AB_MODELS, default
#                                      # "B/16"), one table last
# Results: stdout and, when $OUT is set, $OUT/ab-*.log. The archives are ignored by git
# (.gitignore: /.gpu-*.tar.xz).
set -uo pipefail
cd "$(dirname "$0")/.."
tests="cuda_flash_attention cuda_model"
case "${1:-}" in
--build)
  set -e
  name=${2:?usage: scripts/gpu-ab.sh --build NAME}
  case "$name" in *[!A-Za-z0-9_-]*) echo "gpu-ab: version name '$name' must be letters, digits, '-' or '_'" >&2; exit 2 ;; esac
  dir=.gpu-$name
  rm -rf "$dir" && mkdir -p "$dir"
  export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true
  export CARGO_PROFILE_BENCH_DEBUG=false CARGO_PROFILE_BENCH_STRIP=true
  json=$(mktemp)
  cargo build --release -p vit-experiments
  cp target/release/vit "$dir/vit"
  cargo bench --bench attention_cuda --no-run --message-format=json >"$json"
  scripts/cargo-executables.py bench attention_cuda <"$json" | while read -r _ exe; do cp "$exe" "$dir/bench-attention_cuda"; done
  cargo test --release --workspace --no-run --message-format=json >"$json"
  scripts/cargo-executables.py test $tests <"$json" | while read -r name exe; do cp "$exe" "$dir/test-$name"; done
  rm -f "$json"
  for f in vit bench-attention_cuda $(printf 'test-%s ' $tests); do
    [ -x "$dir/$f" ] || { echo "gpu-ab --build: $f was not built" >&2; exit 1; }
  done
  tar -cJf "$dir.tar.xz" "$dir" && rm -rf "$dir"
  du -sh "$dir.tar.xz"
  ;;
--run)
  shift
  [ $# -ge 1 ] || { echo "usage: scripts/gpu-ab.sh --run NAME [NAME ...]" >&2; exit 2; }
  for v in "$@"; do
    [ -d ".gpu-$v" ] || tar -xJf ".gpu-$v.tar.xz" || { echo "gpu-ab: no .gpu-$v.tar.xz (build it with --build $v and carry it)" >&2; exit 2; }
  done
  . scripts/cuda-env.sh >/dev/null 2>&1
  export VITRS_KERNEL_CACHE=${VITRS_KERNEL_CACHE:-/tmp/vitrs-kernels}
  out=${OUT:-$(mktemp -d)}
  mkdir -p "$out"
  status=0
  for v in "$@"; do
    for t in $tests; do
      echo "== $v: $t"
      VITRS_CUDA_POISON=1 timeout 120 ".gpu-$v/test-$t" --ignored --test-threads=1 >"$out/ab-test-$v-$t.log" 2>&1 || status=1
      grep -E "test result|FAILED|panicked" "$out/ab-test-$v-$t.log"
    done
  done
  for v in "$@"; do
    echo "== $v: attention (TFLOP/s)"
    timeout 120 ".gpu-$v/bench-attention_cuda" --bench >"$out/ab-attention-$v.log" 2>&1 || status=1
    grep -E "^\| (shape|B/16|L/16|N=256)" "$out/ab-attention-$v.log" | grep -vE "\| (m64|n128) \|"
  done
  table=$(mktemp)
  for r in $(seq 1 "${VITRS_AB_ROUNDS:-2}"); do
    for m in ${VITRS_AB_MODELS:-B/16}; do
      for v in "$@"; do
        timeout 120 ".gpu-$v/vit" bench train --model "$m" --set pool=tok --batch 256 --steps 20 --warmup 3 --json \
          >"$out/ab-train.json" 2>>"$out/ab-train.err" || status=1
        python3 - "$out/ab-train.json" "$v" "$m" "$r" <<'PY' | tee -a "$table"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"| {sys.argv[3]} | {sys.argv[4]} | {sys.argv[2]} | {d['step_ms']:.2f} | {d['images_per_second']:.0f} | {100 * (d['mfu'] or 0):.1f}% |")
PY
      done
    done
  done
  echo "| model | round | version | ms/step | images/s | MFU |"
  echo "|---|---|---|---:|---:|---:|"
  cat "$table"
  rm -f "$table"
  exit $status
  ;;
*)
  echo "usage: scripts/gpu-ab.sh --build NAME | --run NAME [NAME ...]" >&2
  exit 2
  ;;
esac
