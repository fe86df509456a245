#!/usr/bin/env bash
# On a GPU host without Rust (design §8). Build here first:
#   scripts/gpu-check.sh --build      # cargo builds the test and bench binaries into .gpu-bin/
# then on the GPU host, from the repo root, with .gpu-bin carried along:
#   scripts/gpu-check.sh              # runs every CUDA test and bench, prints one report
# Results go to stdout and, when $OUT is set, to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.gpu-bin
if [ "${1:-}" = "--build" ]; then
  rm -rf "$bin" && mkdir -p "$bin"
  cargo test --release --workspace --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" "$bin/test-$(basename "$exe" | sed "s/-[0-9a-f]*$//")"; done
  cargo bench --workspace --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" "$bin/bench-$(basename "$exe" | sed "s/-[0-9a-f]*$//")"; done
  ls -la "$bin"; exit 0
fi
log=${OUT:+$OUT/gpu-check.log}; log=${log:-/dev/null}
. scripts/cuda-env.sh | tee -a "$log"
export VITRS_KERNEL_CACHE=${VITRS_KERNEL_CACHE:-/tmp/vitrs-kernels}
status=0
for t in "$bin"/test-*; do
  echo "== $t --include-ignored" | tee -a "$log"
  "$t" --include-ignored --test-threads=1 2>&1 | tee -a "$log" | grep -E "^test |test result|panicked" || status=1
done
for b in "$bin"/bench-*; do
  echo "== $b --bench" | tee -a "$log"
  "$b" --bench 2>&1 | tee -a "$log" | grep -vE "^(Benchmarking|Warning)" || status=1
done
exit $status
