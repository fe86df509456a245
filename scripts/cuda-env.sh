#!/usr/bin/env bash
# Source on a GPU host before running vitrs binaries:  . scripts/cuda-env.sh
# Finds the libraries cudarc opens at run time (driver, NVRTC, cuBLAS/cuBLASLt, NCCL) in the
# CUDA toolkit and in the Python environment's nvidia/*/lib folders, links them under the names
# cudarc tries (it wants libnccl.so; the wheels ship libnccl.so.2) in one folder, and puts that
# folder first on LD_LIBRARY_PATH. Prints what it found.
VITRS_CUDA_LIBS=${VITRS_CUDA_LIBS:-$(mktemp -d)}
dirs="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu"
if command -v python3 >/dev/null 2>&1; then
  for s in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    for d in "$s"/nvidia/*/lib "$s"/nvidia/cu13/lib; do [ -d "$d" ] && dirs="$dirs $d"; done
  done
fi
vitrs_find_lib() {  # first file named $1 in the candidate folders, else from the loader cache
  for d in $dirs; do [ -e "$d/$1" ] && { echo "$d/$1"; return; }; done
  ldconfig -p 2>/dev/null | awk -v n="$1" '$1 == n {print $NF; exit}'
}
# NVRTC dlopens its builtins by their full versioned name, which the wheels ship as
# libnvrtc-builtins.so.13.0 (not .so.13): link the file found under both names.
for pair in libcuda.so:libcuda.so.1 libnvrtc.so:libnvrtc.so.13 libnvrtc-builtins.so.13:libnvrtc-builtins.so.13.0 \
            libcublas.so:libcublas.so.13 libcublasLt.so:libcublasLt.so.13 libnccl.so:libnccl.so.2; do
  name=${pair%%:*}; want=${pair##*:}
  src=$(vitrs_find_lib "$want")
  if [ -n "$src" ]; then
    ln -sf "$src" "$VITRS_CUDA_LIBS/$name"; ln -sf "$src" "$VITRS_CUDA_LIBS/$want"
    echo "cuda-env: $want -> $src"
  else
    echo "cuda-env: $want NOT FOUND"
  fi
done
export LD_LIBRARY_PATH="$VITRS_CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
