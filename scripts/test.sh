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
cargo test --workspace --all-targets "$@"

# The MPI backend's semantic suite, one rank per process under mpirun (2 and 3 ranks; 3 on a
# 2-core machine needs --oversubscribe). Needs an MPI installation (.ci/run installs Open MPI:
# libopenmpi-dev openmpi-bin libclang-dev); VITRS_REQUIRE_MPI=1 makes its absence an error.
if command -v mpirun >/dev/null 2>&1; then
  # What a failure below needs to be read: the MPI installation and the disk it builds on.
  mpi_diagnostics() {
    echo "test.sh: the MPI step failed; mpirun: $(mpirun --version 2>&1 | head -1)" >&2
    echo "test.sh: mpicc -show: $(mpicc -show 2>&1)" >&2
    df -h . >&2 || true
  }
  trap mpi_diagnostics ERR
  # Build first with the compiler's messages shown, then ask cargo (a no-op build) for the path.
  cargo test -p vit-collective --features mpi --test mpi_suite --no-run
  exe=$(cargo test -p vit-collective --features mpi --test mpi_suite --no-run --message-format=json |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "mpi_suite":
        print(m["executable"])')
  if [ ! -x "$exe" ]; then
    echo "test.sh: no mpi_suite executable in cargo's build messages (got '$exe')" >&2
    exit 1
  fi
  for np in 2 3; do
    echo "mpirun -np $np $(basename "$exe")"
    mpirun --allow-run-as-root --oversubscribe -np "$np" "$exe"
  done
  # `mpirun -np 2 vit train` against one process (a vit built with the mpi feature).
  cargo test -p vit-experiments --features mpi --test mpi_train "$@"
  trap - ERR
elif [ "${VITRS_REQUIRE_MPI:-0}" = 1 ]; then
  echo "test.sh: mpirun not found, but VITRS_REQUIRE_MPI=1" >&2
  exit 1
else
  echo "test.sh: mpirun not found: the MPI suite did not run (install libopenmpi-dev openmpi-bin libclang-dev)"
fi
