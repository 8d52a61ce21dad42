#!/usr/bin/env bash
# One prepared GPU check (docs/cluster.md, "The GPU check"), within 8 minutes on one GPU:
#
#   1. scripts/bench_model.py for every task and region mode, the step near the hardware off
#      (plain) and on (the switches of configs/scaling/1-gpu.yaml);
#   2. scripts/bench_data.py --crop-size 224: the read path alone;
#   3. a 2-epoch Ray Train run (ray_jobs.train scaling=1-gpu model.region_mode=crops) on the
#      224-pixel progression shards of bench_data's 4x cohort;
#   4. features mode with 4x larger micro-batches at the same effective batch, per task;
#   5. torch.compile (default mode) on top of the switches, progression in both modes;
#
# then ONE table: samples/s and peak memory per case, the end-to-end rate of the run's last
# epoch (train/samples_per_s of epoch_metrics.jsonl) and its ratio to bench_model's rate with
# the run's switches. That epoch rate counts the read pipeline's start (its first batch), so
# the ratio is a lower bound of the steady-state one.
#
# The parts run in that order, each within its own limit and within what is left of the whole
# budget (GPU_CHECK_BUDGET_S, default 480 s on a GPU): a part that runs over is stopped, one
# without time left is skipped, and the table says which. Everything, the parts' logs
# included, is written under GPU_CHECK_DIR (default: a new temporary directory).
#
#   bash scripts/gpu_check.sh          # on a GPU machine
#   bash scripts/gpu_check.sh --cpu    # the same script as a dry run on the CPU, tiny sizes:
#                                      # resnet18, 32-pixel crops, batch 2, 2 timed
#                                      # micro-batches, progression only, aot_eager for compile
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac
OUT=${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
RESULTS="$OUT/bench_model.jsonl"
: > "$RESULTS"
: > "$OUT/parts.tsv"

if [[ $MODE == gpu ]]; then
  DEVICE=cuda; BACKBONE=resnet50; CROP=224; AMP=bf16; BACKEND=inductor
  TASKS=(disease_progression mortality length_of_stay); BATCH=(8 4 4)  # the presets' batch sizes
  SIZES=(--steps 16 --warmup 8)
  SCALING=(scaling=1-gpu); RUN_OPTIONS=on; PATIENTS=116; DATA_EPOCHS=1
  BUDGET=${GPU_CHECK_BUDGET_S:-480}; LIMIT_BENCH=100; LIMIT_DATA=150; LIMIT_RUN=150
  LIMIT_MICRO=40; LIMIT_COMPILE=240
else
  DEVICE=cpu; BACKBONE=resnet18; CROP=32; AMP=none; BACKEND=aot_eager
  TASKS=(disease_progression); BATCH=(2)
  SIZES=(--steps 2 --warmup 1 --batch-size 2 --num-cxr 2 --ehr-hours 8 --threads 1)
  SCALING=(scaling=cpu-laptop scaling.num_workers=1 optim.batch_size=2); RUN_OPTIONS=off
  PATIENTS=24
  DATA_EPOCHS=1
  BUDGET=${GPU_CHECK_BUDGET_S:-1200}; LIMIT_BENCH=300; LIMIT_DATA=300; LIMIT_RUN=300
  LIMIT_MICRO=300; LIMIT_COMPILE=300
fi
BENCH=("$PY" scripts/bench_model.py --device "$DEVICE" --backbone "$BACKBONE" --crop-size "$CROP"
       --amp "$AMP" --json "$RESULTS" "${SIZES[@]}")
ON=(--preset 1-gpu)
STARTED=$(date +%s)

# part NAME LIMIT_S COMMAND...: run one part (log: $OUT/NAME.log) within LIMIT_S and what is
# left of the budget; record its status and seconds in $OUT/parts.tsv.
part() {
  local name=$1 limit=$2 start rc=0 status=ok left
  shift 2
  start=$(date +%s)
  left=$(( BUDGET - (start - STARTED) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    printf '%s\t%s\t0\n' "$name" "skipped (budget spent)" >> "$OUT/parts.tsv"
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if (( rc != 0 )); then
    status=$( (( rc == 124 )) && echo "timed out" || echo "failed (exit $rc)")
    tail -5 "$OUT/$name.log"
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$OUT/parts.tsv"
  echo "   $status in $(( $(date +%s) - start ))s"
}

part bench-off "$LIMIT_BENCH" "${BENCH[@]}" --label off --tasks "${TASKS[@]}"
part bench-on "$LIMIT_BENCH" "${BENCH[@]}" "${ON[@]}" --label on --tasks "${TASKS[@]}"

DATA_ROOT="$OUT/bench_data"
part bench-data "$LIMIT_DATA" "$PY" scripts/bench_data.py --crop-size "$CROP" --root "$DATA_ROOT" \
  --patients "$PATIENTS" --epochs "$DATA_EPOCHS"
SHARDS="$DATA_ROOT/patients$(( PATIENTS * 4 ))-crop$CROP"   # bench_data's 4x cohort: longer epochs
if [[ -f $SHARDS/disease_progression/manifest.json ]]; then
  part ray-train "$LIMIT_RUN" "$PY" -m ray_jobs.train "${SCALING[@]}" model.region_mode=crops \
    model.backbone="$BACKBONE" data.root="$SHARDS" storage_path="$OUT/runs" run_name=gpu-check \
    train.max_epochs=2 train.patience=null train.evaluate_test=false train.deterministic=false \
    tracking.enabled=false log_dir="$OUT/logs" hydra.run.dir="$OUT/hydra"
else
  printf 'ray-train\tskipped (no 4x shards from bench-data)\t0\n' >> "$OUT/parts.tsv"
fi

for i in "${!TASKS[@]}"; do   # features mode: 4x the micro-batch, a quarter of the accumulation
  part "bench-micro-batch-${TASKS[$i]}" "$LIMIT_MICRO" "${BENCH[@]}" "${ON[@]}" \
    --label on+4x-micro-batch --tasks "${TASKS[$i]}" --modes features \
    --batch-size $(( BATCH[i] * 4 )) --accumulation 1
done
part bench-compile "$LIMIT_COMPILE" "${BENCH[@]}" "${ON[@]}" --label on+compile \
  --tasks disease_progression --compile default --compile-backend "$BACKEND"

$PY - "$OUT" "$RUN_OPTIONS" "$DEVICE" <<'EOF'
"""The one table of the check, from the parts' outputs."""
import json
import re
import sys
from pathlib import Path

out, run_options, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in (out / "bench_model.jsonl").read_text().splitlines()]
parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()]
memory = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
print(f"\n{'case':<24} {'task':<20} {'mode':<9} {'batch x acc':>11} {'samples/s':>10} "
      f"{memory:>12} {'x off':>6}")
off = {(r["task"], r["mode"]): r["samples_per_s"] for r in rows if r["case"] == "off"}
for r in rows:
    base = off.get((r["task"], r["mode"]))
    gain = f"{r['samples_per_s'] / base:.2f}" if base else "-"
    print(f"{r['case']:<24} {r['task']:<20} {r['mode']:<9} "
          f"{str(r['batch']) + ' x ' + str(r['accumulation']):>11} {r['samples_per_s']:>10.1f} "
          f"{r['peak_mib']:>12.0f} {gain:>6}")

log = out / "bench-data.log"
text = log.read_text() if log.exists() else ""
for line in text.splitlines():
    pairs = dict(re.findall(r"(\w+)=([\d.]+)", line))
    for reader in ("plain", "ray", "free"):
        if reader in pairs:
            print(f"{'bench_data ' + reader:<24} {'disease_progression':<20} {'crops':<9} "
                  f"{'-':>11} {float(pairs[reader]):>10.1f} {'-':>12} {'-':>6}")

epochs = sorted((out / "runs").glob("*/epoch_metrics.jsonl"))
if epochs:
    last = json.loads(epochs[0].read_text().splitlines()[-1])
    rate = last["train/samples_per_s"]
    ref = next((r["samples_per_s"] for r in rows if r["case"] == run_options
                and r["task"] == "disease_progression" and r["mode"] == "crops"), None)
    ratio = f"{rate / ref:.2f}" if ref else "-"
    rss = max(last.get("worker_max_rss_mb") or [float("nan")])
    print(f"{'ray_jobs.train epoch ' + str(last['epoch']):<24} {'disease_progression':<20} "
          f"{'crops':<9} {'-':>11} {rate:>10.1f} {'RSS ' + format(rss, '.0f'):>12} {'-':>6}")
    print(f"end-to-end / bench_model ({run_options}, progression crops): {ratio}")
else:
    print("ray_jobs.train: no epoch log")
print("parts: " + ", ".join(f"{name} {status} {seconds}s" for name, status, seconds in parts))
EOF
echo "outputs: $OUT"
