#!/usr/bin/env bash
# Device call companion of gpu-check.sh: bf16 training against the CPU, and the whole-step
# benches (vit bench train) for docs/perf.md. Run after gpu-check.sh in the same call.
#   scripts/device-extra.sh           # bf16 check, B/16 and L/16 train benches, e/14 memory
#   scripts/device-extra.sh --quick   # bf16 check, B/16 train bench and timm eager at batch 256
#                                     # (VITRS_AB_KERNELS="k1 k2": B/16 again with each turned off)
#   scripts/device-extra.sh --profile # where a B/16 step's GPU time goes: ncu over one warm-up
#                                     # and one timed step at batch 64, per kernel, largest first
#                                     # (the self-checks' kernels are included; docs/perf.md)
#   scripts/device-extra.sh --recipe  # the Fashion-MNIST recipe's model (PatchDropout 0.75 for
#                                     # 80% of the steps, 8x8 windows, 6-view TTA) for 20 f32
#                                     # steps on cuda:0 and on the CPU, losses and accuracy
#                                     # compared; then B/16 with PatchDropout 0.75 (host reads
#                                     # per step, same-run ratio to every token)
#   scripts/device-extra.sh --stalls  # ncu's occupancy, scheduler and warp-stall sections for
#                                     # one launch each of the flash forward, dq and dk/dv
#                                     # kernels inside a B/16 step (to $OUT/ncu-flash.txt), for
#                                     # each variant in $VITRS_AB_VARIANTS (default "m128 m128e")
#   scripts/device-extra.sh --variants # B/16 steps alternated over the flash variants in
#                                     # $VITRS_AB_VARIANTS (VITRS_FLASH_VARIANT), two rounds
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda-env.sh >/dev/null 2>&1
export VITRS_KERNEL_CACHE=${VITRS_KERNEL_CACHE:-/tmp/vitrs-kernels}
bin=.gpu-bin
[ -d "$bin" ] || { [ -f "$bin.tar.xz" ] && tar -xJf "$bin.tar.xz"; }
if [ "${1:-}" = "--profile" ]; then
  csv=${OUT:-/tmp}/ncu.csv
  timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file "$csv" \
    "$bin/vit" bench train --model B/16 --set pool=tok --batch 64 --steps 1 --warmup 1 >/dev/null 2>&1 ||
    { echo "device-extra: ncu failed (is it on PATH?)"; exit 1; }
  python3 scripts/ncu-summary.py "$csv" 25
  exit 0
fi
if [ "${1:-}" = "--stalls" ]; then
  txt=${OUT:-/tmp}/ncu-flash.txt
  : >"$txt"
  # Skip the self-checks' launches and the warm-up step's first layers: one launch each from
  # the middle of a step.
  for k in $(for v in ${VITRS_AB_VARIANTS:-m128 m128e}; do echo flash_{fwd,bwd_dq,bwd_dkdv}_bf16_d64_$v; done); do
    VITRS_FLASH_VARIANT=${k##*_} timeout 120 ncu --clock-control none --kernel-name "$k" --launch-skip 5 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
      --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      "$bin/vit" bench train --model B/16 --set pool=tok --batch 64 --steps 1 --warmup 1 >>"$txt" 2>&1 ||
      echo "device-extra: ncu failed on $k" | tee -a "$txt"
  done
  grep -E "^  flash_|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Warp|No Eligible|Warp Cycles Per Issued|Stall|One or More" "$txt" | head -80
  exit 0
fi
if [ "${1:-}" = "--variants" ]; then
  for round in 1 2; do
    for v in ${VITRS_AB_VARIANTS:-m128 m128e}; do
      echo "round $round, VITRS_FLASH_VARIANT=$v"
      VITRS_FLASH_VARIANT=$v timeout 120 "$bin/vit" bench train --model B/16 --set pool=tok --batch 256 --steps 20 --warmup 3 --json | tee -a "${OUT:-/tmp}/bench-variants.jsonl"
    done
  done
  exit 0
fi
runs=$(mktemp -d)
if [ "${1:-}" = "--recipe" ]; then
  # Everything the recipe of docs/reproduce.md runs, on the bundled subset: patch dropout's
  # gather and scatter (RowIndex), the overlapping-window im2col, GAP, and the TTA evaluation.
  recipe=(--config configs/fashion-mnist-vit.toml --set data.path=bundled:fashion-mnist-small
    --set train.steps=20 --set schedule.warmup_steps=5 --set train.log_every=1 --set train.eval_every=20
    --set train.checkpoint_every=20 --set train.patch_dropout=0.75 --set train.patch_dropout_until=0.8
    --set model.patch_kernel=8 --set train.label_smoothing=0.0
    --set 'evals=[{ kind = "classification", name = "test_tta", tta = ["flip_lr", "shift"], every = 0 }]')
  "$bin/vit" train "${recipe[@]}" --device cpu --out "$runs/cpu" >"$runs/cpu.txt" 2>&1 || cat "$runs/cpu.txt"
  "$bin/vit" train "${recipe[@]}" --device cuda:0 --out "$runs/cuda" >"$runs/cuda.txt" 2>&1 || cat "$runs/cuda.txt"
  python3 scripts/compare-runs.py "recipe, f32" "$runs/cpu" "$runs/cuda" 1e-2 20
  timeout 120 "$bin/vit" bench train --model B/16 --set pool=tok --batch 256 --steps 10 --warmup 3 --patch-dropout 0.75 --json | tee -a "${OUT:-/tmp}/bench-train.jsonl"
  exit 0
fi
quick="--set train.steps=20 --set schedule.warmup_steps=5 --set train.log_every=1"
"$bin/vit" train $quick --device cpu --out "$runs/cpu" >/dev/null 2>&1
"$bin/vit" train $quick --set train.precision=bf16 --device cuda:0 --out "$runs/bf16" >"$runs/bf16.txt" 2>&1 || cat "$runs/bf16.txt"
python3 scripts/compare-runs.py "bf16 on cuda vs f32 on cpu" "$runs/cpu" "$runs/bf16" 5e-2 20
if [ "${1:-}" = "--quick" ]; then
  # B/16 steps alternated with each kernel named in $VITRS_AB_KERNELS turned off alone (A/B of
  # one fast kernel on the same warm GPU), then timm eager.
  for round in 1 2; do
    for off in "" ${VITRS_AB_KERNELS:-}; do
      echo "round $round, fast kernels off: ${off:-none}"
      VITRS_FAST_KERNELS_OFF=$off timeout 120 "$bin/vit" bench train --model B/16 --set pool=tok --batch 256 --steps 10 --warmup 3 --json | tee -a "${OUT:-/tmp}/bench-train.jsonl"
    done
  done
  PYTHONUNBUFFERED=1 timeout 120 python3 benches/reference/timm_train.py --batch 256 --no-compile 2>&1 | tail -n 4
  exit 0
fi
for m in "B/16 --set pool=tok" "L/16 --set pool=tok"; do
  timeout 120 "$bin/vit" bench train --model $m --batch 256 --steps 10 --warmup 3 --json | tee -a "${OUT:-/tmp}/bench-train.jsonl"
done
# ViT-e/14 (3.9B parameters) at batch 8 with remat and factored Adam: the peak device memory of
# one step (issue 14's target: it fits one 80 GB GPU).
timeout 240 "$bin/vit" bench memory --model e/14 --batch 8 --optimizer factored-adam --set remat=true --json | tee -a "${OUT:-/tmp}/bench-train.jsonl"
