#!/usr/bin/env bash
# On a GPU host without Rust (design §8). Build here first:
#   scripts/gpu-check.sh --build      # cargo builds the test and bench binaries into .gpu-bin/
#                                     # and packs them into .gpu-bin.tar.xz (~14 MB of ~63)
# then on the GPU host, from the repo root, with .gpu-bin.tar.xz (or .gpu-bin) carried along
# (the archive is unpacked into .gpu-bin/ when that is missing):
#   scripts/gpu-check.sh              # runs every CUDA test and bench, prints one report
#   scripts/gpu-check.sh --tests      # only the tests and the CPU-vs-GPU training run (a short call)
#   scripts/gpu-check.sh --benches    # only the benches and their PyTorch references
# Results go to stdout and, when $OUT is set, to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.gpu-bin
# The test and bench binaries that exercise the GPU (the rest run in CI); stripped, they fit
# the device tool's 64 MiB carry limit. Only their ignored tests ("needs a CUDA device") run
# here: the others are CI's, and the compile checks in them need CI's pinned NVRTC wheel (the
# CUDA 13.0 toolkit's libnvrtc on the GPU host gives no ptxas report for sm_90a).
gpu_tests="cuda_ops cuda_layout cuda_linear cuda_model cuda_optim cuda_device_step device_steps cuda_kernel checkpoint cuda_flash_attention cuda_fused cuda_moe_routing moe_device nccl_suite nccl_train"
# allreduce_cpu is a CPU bench: it runs here because the GPU host's spare cores are what its
# overlap measurement (issue 12) needs; the 2-core CI machine cannot settle it.
gpu_benches="gemm_cuda optim_cuda attention_cuda norm_cuda allreduce_nccl allreduce_cpu"
references="gemm_torch sdpa"
if [ "${1:-}" = "--build" ]; then
  set -e  # a failed build must stop here, with cargo's errors on the terminal
  rm -rf "$bin" && mkdir -p "$bin"
  export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true
  export CARGO_PROFILE_BENCH_DEBUG=false CARGO_PROFILE_BENCH_STRIP=true
  # cargo's JSON goes to a file (its errors stay on stderr), so a failed build is not hidden
  # behind a pipe.
  json=$(mktemp)
  cargo test --release --workspace --no-run --message-format=json >"$json"
  scripts/cargo-executables.py test <"$json" | while read -r name exe; do
    case " $gpu_tests " in *" $name "*) cp "$exe" "$bin/test-$name" ;; esac
  done
  cargo bench --workspace --no-run --message-format=json >"$json"
  scripts/cargo-executables.py bench <"$json" | while read -r name exe; do
    case " $gpu_benches " in *" $name "*) cp "$exe" "$bin/bench-$name" ;; esac
  done
  rm -f "$json"
  cargo build --release -p vit-experiments && cp target/release/vit "$bin/vit"
  missing=""
  for t in $gpu_tests; do [ -x "$bin/test-$t" ] || missing="$missing test-$t"; done
  for b in $gpu_benches; do [ -x "$bin/bench-$b" ] || missing="$missing bench-$b"; done
  [ -z "$missing" ] || { echo "gpu-check --build: not built:$missing" >&2; exit 1; }
  ls -la "$bin"; du -sh "$bin"
  # The device tool carries at most 64 MiB with the working tree: the binaries go packed.
  tar -cJf "$bin.tar.xz" "$bin"
  du -sh "$bin.tar.xz"
  exit 0
fi
if [ ! -d "$bin" ] && [ -f "$bin.tar.xz" ]; then
  tar -xJf "$bin.tar.xz"
fi
mode=${1:-all}
case "$mode" in all|--tests|--benches) ;; *) echo "gpu-check: unknown mode '$mode' (expected --build, --tests, --benches or nothing)" >&2; exit 2 ;; esac
run_tests=1; run_benches=1
[ "$mode" = "--tests" ] && run_benches=0
[ "$mode" = "--benches" ] && run_tests=0
log=${OUT:+$OUT/gpu-check.log}; log=${log:-/dev/null}
# Sourced in this shell (not in a pipeline, whose subshell would lose LD_LIBRARY_PATH).
envlog=$(mktemp)
. scripts/cuda-env.sh >"$envlog" 2>&1
tee -a "$log" <"$envlog"; rm -f "$envlog"
# One kernel cache for every binary below (vit devices compiles and self-checks the fast kernels).
export VITRS_KERNEL_CACHE=${VITRS_KERNEL_CACHE:-/tmp/vitrs-kernels}
# The tests that run `vit` (nccl_train) take this one, not the build machine's cargo path.
export VITRS_VIT="$PWD/$bin/vit"
"$bin/vit" devices | tee -a "$log"
status=0
for t in "$bin"/test-*; do
  [ $run_tests = 1 ] || break
  echo "== $t --ignored" | tee -a "$log"
  # Outputs the kernels should overwrite completely start as NaN in the tests (cuda::output).
  VITRS_CUDA_POISON=1 "$t" --ignored --test-threads=1 2>&1 | tee -a "$log" | grep -E "^test |test result|panicked" || status=1
done
for b in "$bin"/bench-*; do
  [ $run_benches = 1 ] || break
  echo "== $b --bench" | tee -a "$log"
  "$b" --bench 2>&1 | tee -a "$log" | grep -vE "^(Benchmarking|Warning)" || status=1
done
# The PyTorch references (benches/reference/NAME.py; each prints its bench's table, or a note
# and exit 0 where torch is missing).
for r in $references; do
  [ $run_benches = 1 ] || break
  echo "== benches/reference/$r.py" | tee -a "$log"
  python3 "benches/reference/$r.py" 2>&1 | tee -a "$log" || status=1
done
# The first real run: the bundled quickstart for 20 steps on the GPU and on the CPU (f32 both),
# losses compared step by step.
[ $run_tests = 1 ] || exit $status
echo "== vit train: 20 steps on cuda:0 against the CPU" | tee -a "$log"
runs=$(mktemp -d)
quick="--set train.steps=20 --set schedule.warmup_steps=5 --set train.log_every=1"
"$bin/vit" train $quick --device cpu --out "$runs/cpu" >"$runs/cpu.txt" 2>&1 || { cat "$runs/cpu.txt"; status=1; }
"$bin/vit" train $quick --device cuda:0 --out "$runs/cuda" >"$runs/cuda.txt" 2>&1 || status=1
tail -n 3 "$runs/cuda.txt" | tee -a "$log"
python3 scripts/compare-runs.py "vit train, f32" "$runs/cpu" "$runs/cuda" 1e-2 20 2>&1 | tee -a "$log" || status=1
exit $status
