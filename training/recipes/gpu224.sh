#!/usr/bin/env bash
# GPU recipe: VGG16-BN at 224 px (the product's real input size), a sweep of VARIANTS trained one after
# the other (each ~1-3 min on an H100 in bf16); the run with the best validation ROC AUC is shipped.
# Not yet run on a GPU (dry-run on a CPU only). How to run it on a GPU host without network access:
# training/README.md.
#
# Environment (defaults in brackets):
#   DATA        dataset root [.data/chest_xray]        DEVICE   --device [cuda]
#   SIZE        --input-size [224]                     EPOCHS   --epochs [30]
#   OUT         where the results land [/tmp/out]      RUNS     the runs' directories [/tmp/runs]
#   BUDGET_S    start no variant after this many seconds, to end within a job's time limit [400]
#   PART_MB     ship the model in parts of this many MiB, for copies that limit file size; 0 = whole [15]
#   PYTHON      the interpreter with torch [python3]
#   SKIP_WHEELS set when pydantic & co. are installed; else benchmarks/wheels/*.whl go to /tmp/site
#
# Under $OUT: results.jsonl (one line per variant), the best run's model.json and summary.json, and its
# model.safetensors (or model.safetensors.part-* to rejoin with cat).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site benchmarks/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/runs}
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
BUDGET_S=${BUDGET_S:-400}
for variant in "${VARIANTS[@]}"; do
  if (( SECONDS > BUDGET_S )); then echo "time budget spent, skipping ${variant%%|*}"; continue; fi
  name=${variant%%|*}; read -r -a extra <<< "${variant#*|}"
  "$PY" -m training train "${common[@]}" "${extra[@]}" --out "$RUNS/$name" --version "1.1.0-gpu${SIZE:-224}-$name" \
    2>&1 | grep -v "it/s" | tail -n 5
  "$PY" - "$RUNS/$name" >> "$OUT/results.jsonl" <<'PY'
import json, sys
summary = json.load(open(f"{sys.argv[1]}/summary.json"))
keys = ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")
print(json.dumps({"run": sys.argv[1], **{k: summary["validation"][k] for k in keys}}))
PY
done
# Select on validation ROC AUC only (never test data), then ship that run.
best=$("$PY" - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(max(rows, key=lambda row: row["roc_auc"])["run"])
PY
)
cp "$best/model.json" "$best/summary.json" "$OUT/"
if (( ${PART_MB:-15} > 0 )); then
  split -b "${PART_MB:-15}M" "$best/model.safetensors" "$OUT/model.safetensors.part-"
else
  cp "$best/model.safetensors" "$OUT/"
fi
cat "$OUT/results.jsonl"; echo "best: $best"
