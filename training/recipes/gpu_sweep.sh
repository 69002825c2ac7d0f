#!/usr/bin/env bash
# GPU sweep: VGG16-BN variants (input size, augmentation, label smoothing, seeds; see SET below)
# trained side by side on one GPU (one process each: a single run at batch 64 leaves most of an
# H100/H200 idle, so running them together costs little more wall time than one). The run with the
# best validation ROC AUC is shipped; ties are broken by the lower validation ECE. The test split is
# only reported. The shipped 1.2.0-gpu-128-base came from SET=sizes (training/results/).
# How to run it on a GPU host without network access: training/README.md.
#
# Environment (defaults in brackets):
#   DATA        dataset root [.data/chest_xray]        DEVICE   --device [cuda]
#   SIZE        --input-size of variants without one [224]   EPOCHS --epochs [24]
#   OUT         where the results land [/tmp/out]      RUNS     the runs' directories [/tmp/runs]
#   RUN_LIMIT_S stop a variant still training after this many seconds (it is left out) [420]
#   WORKERS     decoding threads per variant [nproc / number of variants]
#   PART_MB     ship the model in parts of this many MiB, for copies that limit file size; 0 = whole [15]
#   PYTHON      the interpreter with torch [python3]
#   SKIP_WHEELS set when pydantic & co. are installed; else benchmarks/wheels/*.whl go to /tmp/site
#
# Under $OUT: results.jsonl (one line per finished variant: validation and test-half metrics), the best
# run's model.json and summary.json, its model.safetensors (or model.safetensors.part-* to rejoin with
# cat), and runs.tar.gz (every variant's log, summary, metrics per epoch and reports, no weights).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/runs}
mkdir -p "$OUT" "$RUNS"
# name | extra flags. All draw the validation split with seed 0 (--seed, or --split-seed where given), so they
# share one, except SET=128's -seedN replicates.
# SET=224: recipes at 224 px; SET=sizes: the base and the shift-fitted recipe at 64, 96 and 128 px;
# SET=128: seed replicates and variants of the 128-px base recipe, and 160 px.
# SET=ema: the weight average (--ema-epochs) against the raw weights, with and without aug strength 1.5,
# each on two seeds; --split-seed 0 keeps every run on the same validation split, so all of them compete.
# SET=zoom: zoom-in 0.3 alone at 128 px (E17/E18's 64-px lead), with and without aug strength 1.5, against
# the base recipe rerun on the current code, each on two seeds, all on validation split seed 0.
# SET=aspect: aspect jitter 0.25 (E20: the network reads a film's squash to a square as pneumonia) and CLAHE
# (clip 2, 8 tiles: E19 was stopped before it could tell), each against the base recipe on the current code,
# on two seeds, all on validation split seed 0.
# SET=finetune: the shipped model (weights/) fine-tuned with aspect jitter 0.25 for 3 and 6 epochs at lr 1e-4,
# and for 3 epochs at lr 3e-5, on two seeds, against the same fine-tune without the jitter (E25-E26 on the
# GPU); weights/ must hold the 128-px parent, whose validation split (fraction 0.15, seed 0) they all draw.
case ${SET:-224} in
  224) VARIANTS=(
    "224-base|--lr 1e-3"
    "224-ls01|--lr 1e-3 --label-smoothing 0.1"
    "224-eqzoom-ls01|--lr 1e-3 --equalize --zoom-in 0.3 --erase-corners 0.5 --label-smoothing 0.1"
    "224-aug15-ls01|--lr 1e-3 --aug-strength 1.5 --label-smoothing 0.1"
  ) ;;
  sizes) VARIANTS=(
    "128-base|--lr 1e-3 --input-size 128"
    "128-eqzoom-ls01|--lr 1e-3 --input-size 128 --equalize --zoom-in 0.3 --erase-corners 0.5 --label-smoothing 0.1"
    "96-base|--lr 1e-3 --input-size 96"
    "96-eqzoom-ls01|--lr 1e-3 --input-size 96 --equalize --zoom-in 0.3 --erase-corners 0.5 --label-smoothing 0.1"
    "64-base|--lr 1e-3 --input-size 64"
    "64-eqzoom-ls01|--lr 1e-3 --input-size 64 --equalize --zoom-in 0.3 --erase-corners 0.5 --label-smoothing 0.1"
  ) ;;
  128) VARIANTS=(
    "128-base-seed1|--lr 1e-3 --input-size 128 --seed 1"
    "128-base-seed2|--lr 1e-3 --input-size 128 --seed 2"
    "128-base-seed3|--lr 1e-3 --input-size 128 --seed 3"
    "128-ls01|--lr 1e-3 --input-size 128 --label-smoothing 0.1"
    "128-aug15|--lr 1e-3 --input-size 128 --aug-strength 1.5"
    "160-base|--lr 1e-3 --input-size 160"
  ) ;;
  ema) VARIANTS=(
    "128-base-s1|--lr 1e-3 --input-size 128 --seed 1 --split-seed 0"
    "128-ema2|--lr 1e-3 --input-size 128 --ema-epochs 2"
    "128-ema2-s1|--lr 1e-3 --input-size 128 --ema-epochs 2 --seed 1 --split-seed 0"
    "128-aug15-s1|--lr 1e-3 --input-size 128 --aug-strength 1.5 --seed 1 --split-seed 0"
    "128-aug15-ema2|--lr 1e-3 --input-size 128 --aug-strength 1.5 --ema-epochs 2"
    "128-aug15-ema2-s1|--lr 1e-3 --input-size 128 --aug-strength 1.5 --ema-epochs 2 --seed 1 --split-seed 0"
  ) ;;
  zoom) VARIANTS=(
    "128-base|--lr 1e-3 --input-size 128"
    "128-base-s1|--lr 1e-3 --input-size 128 --seed 1 --split-seed 0"
    "128-zoom03|--lr 1e-3 --input-size 128 --zoom-in 0.3"
    "128-zoom03-s1|--lr 1e-3 --input-size 128 --zoom-in 0.3 --seed 1 --split-seed 0"
    "128-zoom03-aug15|--lr 1e-3 --input-size 128 --zoom-in 0.3 --aug-strength 1.5"
    "128-zoom03-aug15-s1|--lr 1e-3 --input-size 128 --zoom-in 0.3 --aug-strength 1.5 --seed 1 --split-seed 0"
  ) ;;
  aspect) VARIANTS=(
    "128-base|--lr 1e-3 --input-size 128"
    "128-base-s1|--lr 1e-3 --input-size 128 --seed 1 --split-seed 0"
    "128-aspect025|--lr 1e-3 --input-size 128 --aspect-jitter 0.25"
    "128-aspect025-s1|--lr 1e-3 --input-size 128 --aspect-jitter 0.25 --seed 1 --split-seed 0"
    "128-clahe2|--lr 1e-3 --input-size 128 --clahe-clip 2 --clahe-tiles 8"
    "128-clahe2-s1|--lr 1e-3 --input-size 128 --clahe-clip 2 --clahe-tiles 8 --seed 1 --split-seed 0"
  ) ;;
  finetune)
    ft="--input-size 128 --init model --init-model weights --warmup-epochs 0.25 --patience 0"
    VARIANTS=(
    "128-ft-control|$ft --lr 1e-4 --epochs 3"
    "128-ft-aspect025|$ft --lr 1e-4 --epochs 3 --aspect-jitter 0.25"
    "128-ft-aspect025-s1|$ft --lr 1e-4 --epochs 3 --aspect-jitter 0.25 --seed 1 --split-seed 0"
    "128-ft-aspect025-6ep|$ft --lr 1e-4 --epochs 6 --aspect-jitter 0.25"
    "128-ft-aspect025-lr3e-5|$ft --lr 3e-5 --epochs 3 --aspect-jitter 0.25"
  ) ;;
  *) echo "SET must be 224, sizes, 128, ema, zoom, aspect or finetune" >&2; exit 2 ;;
esac
WORKERS=${WORKERS:-$(( $(nproc) / ${#VARIANTS[@]} > 0 ? $(nproc) / ${#VARIANTS[@]} : 1 ))}
common=(--data "${DATA:-.data/chest_xray}" --input-size "${SIZE:-224}" --init scratch --arch vgg16_bn
        --head compact --device "${DEVICE:-cuda}" --workers "$WORKERS" --threads "$WORKERS" --batch-size 64
        --bootstrap 1000 --export-dtype float16 --epochs "${EPOCHS:-24}" --patience 8 --seed 0)
pids=()
for variant in "${VARIANTS[@]}"; do
  name=${variant%%|*}; read -r -a extra <<< "${variant#*|}"
  timeout --kill-after=10 "${RUN_LIMIT_S:-420}" "$PY" -m training train "${common[@]}" "${extra[@]}" \
    --out "$RUNS/$name" --version "1.2.0-gpu-$name" > "$RUNS/$name.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  rc=0; wait "${pids[$i]}" || rc=$?
  log="$RUNS/${VARIANTS[$i]%%|*}.log"; echo "${VARIANTS[$i]%%|*} rc=$rc"
  if (( rc == 0 )); then tr '\r' '\n' < "$log" | grep -a "INFO" | tail -n 4; else tail -n 15 "$log"; fi
done
# One line per finished variant; the test half is reported, never used below.
"$PY" - "$RUNS" > "$OUT/results.jsonl" <<'PY'
import json, sys
from pathlib import Path
keys = ("roc_auc", "accuracy", "sensitivity", "specificity", "ece", "brier", "threshold")
for path in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    summary = json.loads(path.read_text())
    row = {"run": str(path.parent), "version": summary["version"], "temperature": summary["temperature"]}
    row["validation"] = {k: summary["validation"][k] for k in keys}
    if "test" in summary:
        row["test"] = {k: summary["test"][k] for k in keys} | {"ci95": summary["test"]["ci95"]}
    print(json.dumps(row))
PY
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.safetensors' --exclude=checkpoint --exclude=cache .
if [[ ! -s $OUT/results.jsonl ]]; then echo "no variant finished"; exit 1; fi
# Select on validation only: highest ROC AUC, then lowest ECE.
best=$("$PY" - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
# Seed replicates (-seedN) measure run-to-run spread: their validation split differs, so they don't compete.
rows = [r for r in rows if "-seed" not in r["run"]]
print(max(rows, key=lambda r: (r["validation"]["roc_auc"], -r["validation"]["ece"]))["run"])
PY
)
cp "$best/model.json" "$best/summary.json" "$OUT/"
if (( ${PART_MB:-15} > 0 )); then
  split -b "${PART_MB:-15}M" "$best/model.safetensors" "$OUT/model.safetensors.part-"
else
  cp "$best/model.safetensors" "$OUT/"
fi
cat "$OUT/results.jsonl"; echo "best: $best"
