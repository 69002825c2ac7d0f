#!/usr/bin/env bash
# GPU recipe (224 px, the product's real input size), for a session lent an H100/H200 through
# the device tool. Not yet run: no GPU was available when it was written.
#
# Here, first (the device machine reaches no network and ../shared does not travel):
#   bash benchmarks/fetch_wheels.sh                      # pydantic & co. for Python 3.12
#   mkdir -p .data && cp -r ../shared/data/chest_xray .data/ && echo /.data/ >> .git/info/exclude
# Then one device call, carry [".data", "benchmarks/wheels"], timeout 600:
#   bash training/recipes/gpu224.sh
# It trains VARIANTS one after the other (each ~1-3 min on an H100 in bf16) and leaves, under
# $OUT, each run's summary and metrics and the best run's model split in 15 MiB parts (the
# device tool returns files of at most 16 MiB). Rejoin here with
#   cat model.safetensors.part-* > weights/model.safetensors; cp model.json weights/
# and the service verifies the sha256 and golden outputs on load.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Dry run on a CPU machine with the project's venv first on PATH:
#   SKIP_WHEELS=1 DATA=/tmp/small DEVICE=cpu SIZE=32 EPOCHS=1 OUT=/tmp/out bash training/recipes/gpu224.sh
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site benchmarks/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RUNS=/tmp/runs
mkdir -p "$OUT" "$RUNS"
EPOCHS=${EPOCHS:-30}
common=(--data "${DATA:-.data/chest_xray}" --input-size "${SIZE:-224}" --init scratch --arch vgg16_bn
        --head compact --device "${DEVICE:-cuda}" --workers 16 --batch-size 64 --bootstrap 1000
        --export-dtype float16 --epochs "$EPOCHS" --patience 8)
# name | extra flags
VARIANTS=(
  "bn-lr1e-3|--lr 1e-3"
  "bn-lr5e-4|--lr 5e-4"
  "bn-lr1e-3-aug15|--lr 1e-3 --aug-strength 1.5"
)
BUDGET_S=${BUDGET_S:-400}   # a device command may run 600 s: start no variant after this
for variant in "${VARIANTS[@]}"; do
  if (( SECONDS > BUDGET_S )); then echo "time budget spent, skipping ${variant%%|*}"; continue; fi
  name=${variant%%|*}; read -r -a extra <<< "${variant#*|}"
  python3 -m training train "${common[@]}" "${extra[@]}" --out "$RUNS/$name" --version "1.1.0-gpu${SIZE:-224}-$name" \
    2>&1 | grep -v "it/s" | tail -n 5
  python3 - "$RUNS/$name" >> "$OUT/results.jsonl" <<'PY'
import json, sys
summary = json.load(open(f"{sys.argv[1]}/summary.json"))
print(json.dumps({"run": sys.argv[1], **{k: summary["validation"][k] for k in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")}}))
PY
done
# Select on validation ROC AUC only (never test data), then ship that run.
best=$(python3 -c "import json; rows=[json.loads(l) for l in open('$OUT/results.jsonl')]; print(max(rows, key=lambda r: r['roc_auc'])['run'])")
cp "$best/model.json" "$best/summary.json" "$OUT/"
split -b 15M "$best/model.safetensors" "$OUT/model.safetensors.part-"
cat "$OUT/results.jsonl"; echo "best: $best"
