#!/usr/bin/env bash
# The shipped model, 1.2.0-gpu-128-base: the `128-base` variant of `gpu_sweep.sh SET=sizes`, trained
# on one NVIDIA H200 (bf16 autocast; 29 epochs, early stop, best epoch 21; about 2 minutes while five
# other runs shared the GPU). On a CPU it runs too, at about 6 img/s on 2 cores (roughly 6 hours).
# Results of the sweep it came from: training/results/gpu-sweep-2026-11-27/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/chest_xray}
OUT=${OUT:-runs/gpu128}
"$PY" -m training train --data "$DATA" --out "$OUT" --input-size 128 --init scratch --arch vgg16_bn \
  --head compact --device "${DEVICE:-auto}" --workers 2 --threads 2 --batch-size 64 --bootstrap 1000 \
  --export-dtype float16 --epochs 30 --patience 8 --seed 0 --lr 1e-3 --version 1.2.0-gpu-128-base
cp "$OUT/model.safetensors" "$OUT/model.json" weights/
