#!/usr/bin/env bash
# The recipe of the shipped model weights/ 1.0.0-cpu64 (see weights/README.md for its results):
# VGG16-BN, compact head, 64 px, from scratch, 12 epochs on a 2-core CPU (~60 min), fp16 export.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/chest_xray}
OUT=${OUT:-runs/cpu64}
.venv/bin/python -m training train --data "$DATA" --out "$OUT" --epochs 12 --input-size 64 \
  --init scratch --arch vgg16_bn --head compact --lr 1e-3 --batch-size 32 --threads 2 --seed 0
# Re-export the best checkpoint in fp16 (validation AUC identical to fp32: 0.99921 both).
.venv/bin/python -m training train --resume "$OUT" --export-dtype float16 --version 1.0.0-cpu64
cp "$OUT/model.safetensors" "$OUT/model.json" weights/
