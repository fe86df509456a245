#!/usr/bin/env bash
# vitrs against PyTorch eager on this CPU (issue 15): for each row, `vit bench train|infer
# --device cpu --precision f32` and benches/reference/torch_train.py (timm's VisionTransformer,
# the same architecture, f32, AdamW, the same thread count) run alternating, R rounds, and one
# markdown table gives each round's images/s and the ratio of the medians (vitrs / torch).
#
#   scripts/bench-vs-torch.sh [--rows small,s16,b16] [--modes train,infer] [--rounds R]
#                             [--threads T] [--steps N] [--warmup N] [--quick]
#
# Rows (all by default):
#   small  28×28×1, patch 4, width 192, depth 6, MLP 768, 3 heads, 10 classes, GAP; batch 128
#   s16    S/16 at 224, class token, 1000 classes; batch 8
#   b16    B/16 at 224, class token, 1000 classes; batch 8
# each in the modes train (forward, backward, clipping, AdamW step) and infer (the forward of
# `vit predict` against `model.eval()` under `torch.inference_mode()`).
#
# --rounds R   runs per side and row (default 2); the order alternates (vitrs first in odd rounds)
# --threads T  RAYON_NUM_THREADS for vitrs and torch.set_num_threads for PyTorch (default: nproc)
# --steps N    timed steps per run (default 10; 2 with --quick), --warmup N untimed ones first
#              (default 2; 1 with --quick); images/s come from the median step
# --quick      a smoke test: fewer steps
#
# PyTorch and timm live in an ignored virtual environment, .venv-bench/ at the repository root,
# created with `pip install torch timm` from PyPI on first use (PyPI's torch is the CUDA build,
# ~5 GB; it runs on the CPU). VITRS_BENCH_VENV=/path uses an existing one instead. Each row checks
# that both sides count the same parameters and the same model FLOPs per image, and stops if not.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

rows=small,s16,b16
modes=train,infer
rounds=2
threads=$(nproc)
steps=
warmup=
quick=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --rows) rows=${2:?--rows needs a list such as small,s16}; shift 2 ;;
    --modes) modes=${2:?--modes needs a list such as train,infer}; shift 2 ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --steps) steps=${2:?--steps needs a number}; shift 2 ;;
    --warmup) warmup=${2:?--warmup needs a number}; shift 2 ;;
    --quick) quick=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-vs-torch.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
if [ "$quick" = 1 ]; then
  steps=${steps:-2}
  warmup=${warmup:-1}
fi
steps=${steps:-10}
warmup=${warmup:-2}
for pair in "rounds:$rounds" "threads:$threads" "steps:$steps"; do
  case ${pair#*:} in
    '' | *[!0-9]* | 0) echo "bench-vs-torch.sh: --${pair%%:*} '${pair#*:}': expected a positive integer" >&2; exit 2 ;;
  esac
done
case $warmup in
  '' | *[!0-9]*) echo "bench-vs-torch.sh: --warmup '$warmup': expected an integer >= 0" >&2; exit 2 ;;
esac
IFS=, read -r -a row_list <<<"$rows"
IFS=, read -r -a mode_list <<<"$modes"
for row in "${row_list[@]}"; do
  case $row in
    small | s16 | b16) ;;
    *) echo "bench-vs-torch.sh: --rows: unknown row '$row', expected small, s16 or b16" >&2; exit 2 ;;
  esac
done
for mode in "${mode_list[@]}"; do
  case $mode in
    train | infer) ;;
    *) echo "bench-vs-torch.sh: --modes: unknown mode '$mode', expected train or infer" >&2; exit 2 ;;
  esac
done

# PyTorch and timm. `has_torch PYTHON`: whether both are installed there.
has_torch() {
  "$1" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("torch") and u.find_spec("timm") else 1)'
}
if [ -n "${VITRS_BENCH_VENV:-}" ]; then
  venv=$VITRS_BENCH_VENV
  if ! has_torch "$venv/bin/python"; then
    echo "bench-vs-torch.sh: VITRS_BENCH_VENV=$venv: expected a virtual environment with torch and timm" >&2
    exit 1
  fi
else
  venv=$root/.venv-bench
  if [ ! -x "$venv/bin/python" ]; then
    echo "bench-vs-torch.sh: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if ! has_torch "$venv/bin/python"; then
    echo "bench-vs-torch.sh: installing torch and timm from PyPI into $venv (~5 GB)" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check torch timm
  fi
fi
python=$venv/bin/python

# vitrs.
cargo build --release -p vit-experiments
vit=${CARGO_TARGET_DIR:-$root/target}/release/vit

# `row_args ROW`: sets vitrs_args, torch_args, label and batch for ROW.
row_args() {
  case $1 in
    small)
      vitrs_args=(--model custom --set image_size=28 --set patch=4 --set channels=1 --set width=192
        --set depth=6 --set mlp_dim=768 --set heads=3 --set classes=10 --set pool=gap)
      torch_args=(--preset custom --image-size 28 --patch 4 --channels 1 --width 192 --depth 6
        --mlp-dim 768 --heads 3 --classes 10 --pool gap)
      label="D 192, depth 6, MLP 768, 3 heads, patch 4, 28×28×1, GAP"
      batch=128 ;;
    s16)
      vitrs_args=(--model S/16 --set pool=tok)
      torch_args=(--preset S/16 --pool tok)
      label="S/16 at 224, class token"
      batch=8 ;;
    b16)
      vitrs_args=(--model B/16 --set pool=tok)
      torch_args=(--preset B/16 --pool tok)
      label="B/16 at 224, class token"
      batch=8 ;;
  esac
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
results=$tmp/results.jsonl
run_vitrs() {
  echo "bench-vs-torch.sh: vitrs $row $mode, round $round" >&2
  local out
  out=$(RAYON_NUM_THREADS=$threads "$vit" bench "$mode" "${vitrs_args[@]}" --batch "$batch" \
    --steps "$steps" --warmup "$warmup" --device cpu --precision f32 --json)
  printf '{"row": "%s", "label": "%s", "mode": "%s", "side": "vitrs", "run": %s}\n' \
    "$row" "$label" "$mode" "$out" >>"$results"
}
run_torch() {
  echo "bench-vs-torch.sh: torch $row $mode, round $round" >&2
  local out
  out=$("$python" benches/reference/torch_train.py "${torch_args[@]}" --mode "$mode" --batch "$batch" \
    --steps "$steps" --warmup "$warmup" --threads "$threads" --json)
  printf '{"row": "%s", "label": "%s", "mode": "%s", "side": "torch", "run": %s}\n' \
    "$row" "$label" "$mode" "$out" >>"$results"
}
for row in "${row_list[@]}"; do
  row_args "$row"
  for mode in "${mode_list[@]}"; do
    for ((round = 1; round <= rounds; round++)); do
      if ((round % 2 == 1)); then
        run_vitrs
        run_torch
      else
        run_torch
        run_vitrs
      fi
    done
  done
done

"$python" - "$results" "$threads" "$steps" "$warmup" <<'EOF'
import json, statistics, sys
path, threads, steps, warmup = sys.argv[1:]
runs = [json.loads(line) for line in open(path)]
keys = list(dict.fromkeys((r["row"], r["mode"]) for r in runs))
torch_run = next(r["run"] for r in runs if r["side"] == "torch")
print(f"CPU f32, {threads} threads, {steps} timed steps after {warmup} warm-up steps per run; "
      f"torch {torch_run['torch']}, timm {torch_run['timm']} (eager)")
print()
print("| model | batch | mode | vitrs images/s | PyTorch eager images/s | ratio |")
print("|---|---|---|---|---|---|")
bad = []
for row, mode in keys:
    mine = [r for r in runs if (r["row"], r["mode"]) == (row, mode)]
    side = {s: [r["run"] for r in mine if r["side"] == s] for s in ("vitrs", "torch")}
    v, t = side["vitrs"][0], side["torch"][0]
    if v["params"] != t["params"]:
        bad.append(f"{row} {mode}: vitrs has {v['params']} parameters, timm {t['params']}")
    if abs(v["model_flops_per_image"] - t["model_flops_per_image"]) > 1e-9 * v["model_flops_per_image"]:
        bad.append(f"{row} {mode}: vitrs counts {v['model_flops_per_image']} model FLOPs per image, "
                   f"the timm model {t['model_flops_per_image']}")
    rates = {s: [r["images_per_second"] for r in side[s]] for s in side}
    ratio = statistics.median(rates["vitrs"]) / statistics.median(rates["torch"])
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
    print(f"| {mine[0]['label']} | {v['batch']} | {mode} | {fmt(rates['vitrs'])} | {fmt(rates['torch'])} "
          f"| {ratio:.2f} |")
if bad:
    print("\nbench-vs-torch.sh: the two models differ:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
