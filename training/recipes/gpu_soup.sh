#!/usr/bin/env bash
# The shipped model's aspect-jitter soup (EXPERIMENTS.md E25-E35) on one GPU, end to end, in one call:
#   1. SEEDS fine-tunes of weights/ side by side, each E25's recipe (3 epochs, lr 1e-4, batch 32, aspect
#      jitter 0.25, validation split of the parent);
#   2. `training mix` towards their mean: of FRACTIONS it keeps the largest whose validation AUC loss against
#      the parent is within one split's luck (training/mix_choice.py; nothing is exported when none is), and
#      calibrates, guards and exports it like a trained model, and scores it on the test half when DATA has
#      one (reported only, as in training: nothing above reads it).
# A CPU takes about an hour per fine-tune at 128 px (E35); a GPU takes seconds. How to run it on the lent
# machine, whose working tree limit forces the data over in a call of its own: training/README.md.
#
# Environment (defaults in brackets):
#   DATA      dataset root [.data/chest_xray]     DEVICE     --device [cuda]
#   OUT       what comes back [/tmp/out]          RUNS       the runs' directories [/tmp/runs]
#   SEEDS     the fine-tunes' seeds ["0 1 2"]     FRACTIONS  candidates for the rule [0.5,0.75,1]
#   VERSION   the export's version [1.3.0-gpu-soup-aspect]     RUN_LIMIT_S  stop a fine-tune after [420]
#   PART_MB   the export in parts of this many MiB, for copies that limit file size; 0 = whole [15]
#   PYTHON    the interpreter with torch [python3]
#   SKIP_WHEELS  set when pydantic & co. are installed; else benchmarks/wheels/*.whl go to /tmp/site
#
# Under $OUT: model.json, summary.json and model.safetensors (or model.safetensors.part-* to rejoin with cat)
# of the export (summary.json holds its test-half report), and runs.tar.gz: every log, model.json, summary and
# report of the fine-tunes and the mix (no weights).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
DATA=${DATA:-.data/chest_xray}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/runs}
VERSION=${VERSION:-1.3.0-gpu-soup-aspect}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
mkdir -p "$OUT" "$RUNS"
workers=$(( $(nproc) / ${#seeds[@]} > 0 ? $(nproc) / ${#seeds[@]} : 1 ))
pack() {  # whatever happened, the logs and reports come back
  tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.safetensors' --exclude=checkpoint --exclude=cache .
}
trap pack EXIT

tuned=()
pids=()
for seed in "${seeds[@]}"; do
  run="$RUNS/finetune-aspect-s$seed"
  tuned+=("$run")
  timeout --kill-after=10 "${RUN_LIMIT_S:-420}" "$PY" -m training train --data "$DATA" --out "$run" \
    --epochs 3 --input-size 128 --init model --init-model weights --arch vgg16_bn --head compact --lr 1e-4 \
    --warmup-epochs 0.25 --batch-size 32 --seed "$seed" --split-seed 0 --aspect-jitter 0.25 \
    --export-dtype float16 --patience 0 --bootstrap 1000 --device "$DEVICE" --workers "$workers" \
    --threads "$workers" --version "$VERSION-s$seed" > "$run.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  rc=0; wait "${pids[$i]}" || rc=$?
  echo "fine-tune seed ${seeds[$i]}: rc=$rc"
  if (( rc == 0 )); then tr '\r' '\n' < "${tuned[$i]}.log" | grep -a "INFO" | tail -n 3; else
    tail -n 15 "${tuned[$i]}.log"; failed=1; fi
done
if (( failed )); then echo "a fine-tune failed: no soup"; exit 1; fi

rc=0
"$PY" -m training mix --parent weights --tuned "${tuned[@]}" --fraction "${FRACTIONS:-0.5,0.75,1}" \
  --data "$DATA" --out "$RUNS/soup" --device "$DEVICE" --workers "$(nproc)" --threads "$(nproc)" \
  --version "$VERSION" > "$RUNS/mix.log" 2>&1 || rc=$?
tr '\r' '\n' < "$RUNS/mix.log" | grep -a "INFO\|error\|{" || true
if (( rc != 0 )); then echo "mix: rc=$rc, nothing exported"; exit 1; fi

cp "$RUNS/soup/model.json" "$RUNS/soup/summary.json" "$OUT/"
if (( ${PART_MB:-15} > 0 )); then
  split -b "${PART_MB:-15}M" "$RUNS/soup/model.safetensors" "$OUT/model.safetensors.part-"
else
  cp "$RUNS/soup/model.safetensors" "$OUT/"
fi
ls -l "$OUT"
