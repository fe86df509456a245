#!/usr/bin/env bash
# The test command: installs NVRTC (needed by the kernel compile test, no GPU needed) into
# .nvrtc/ on first use, puts it on LD_LIBRARY_PATH, and runs every test of the workspace.
# GPU tests are #[ignore = "needs a CUDA device"]; on a GPU host add: -- --include-ignored
set -euo pipefail
cd "$(dirname "$0")/.."
nvrtc_dir=${VITRS_NVRTC_DIR:-$PWD/.nvrtc}
lib="$nvrtc_dir/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  echo "test.sh: installing NVRTC 13.0 into $nvrtc_dir"
  # Keep NVRTC at the GPU hosts' driver version (CUDA 13.0): newer PTX is refused by older drivers.
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$nvrtc_dir" \
    nvidia-cuda-nvrtc==13.0.88
fi
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Kernel CUBINs are cached by source hash, arch and NVRTC version; keep CI's cache in the tree.
export VITRS_KERNEL_CACHE=${VITRS_KERNEL_CACHE:-$PWD/target/kernel-cache}
exec cargo test --workspace --all-targets "$@"
