#!/usr/bin/env bash
# On a GPU host without Rust (design §8). Build here first:
#   scripts/gpu-check.sh --build      # cargo builds the test and bench binaries into .gpu-bin/
# then on the GPU host, from the repo root, with .gpu-bin carried along:
#   scripts/gpu-check.sh              # runs every CUDA test and bench, prints one report
# Results go to stdout and, when $OUT is set, to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.gpu-bin
# The test and bench binaries that exercise the GPU (the rest run in CI); stripped, they fit
# the device tool's 64 MiB carry limit.
gpu_tests="cuda_ops cuda_layout cuda_model cuda_optim checkpoint nvrtc_compile"
gpu_benches="gemm_cuda optim_cuda"
if [ "${1:-}" = "--build" ]; then
  rm -rf "$bin" && mkdir -p "$bin"
  export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true
  export CARGO_PROFILE_BENCH_DEBUG=false CARGO_PROFILE_BENCH_STRIP=true
  artifacts() {  # executables of the given cargo JSON stream whose target kind matches $1
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and sys.argv[1] in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' "$1"
  }
  cargo test --release --workspace --no-run --message-format=json 2>/dev/null | artifacts test | while read -r name exe; do
    case " $gpu_tests " in *" $name "*) cp "$exe" "$bin/test-$name" ;; esac
  done
  cargo bench --workspace --no-run --message-format=json 2>/dev/null | artifacts bench | while read -r name exe; do
    case " $gpu_benches " in *" $name "*) cp "$exe" "$bin/bench-$name" ;; esac
  done
  cargo build --release -p vit-experiments && cp target/release/vit "$bin/vit"
  ls -la "$bin"; du -sh "$bin"; exit 0
fi
log=${OUT:+$OUT/gpu-check.log}; log=${log:-/dev/null}
. scripts/cuda-env.sh | tee -a "$log"
"$bin/vit" devices | tee -a "$log"
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
