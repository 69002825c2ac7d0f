#!/usr/bin/env bash
# The GPU benchmark, for a GPU host (e.g. one H100) whose Python has torch/torchvision/httpx/pillow
# but not the service's web stack and no package index. Before it, on a machine with PyPI:
# `bash benchmarks/fetch_wheels.sh` (fills the gitignored benchmarks/wheels/), then copy the
# checkout including benchmarks/wheels/ to the GPU host. There, from the repo root, one step at a
# time (each stays under 10 minutes):
#   bash benchmarks/gpu_bench.sh decode     # Pillow draft decode vs batched nvJPEG (~1 min)
#   bash benchmarks/gpu_bench.sh model      # engine at batch 1..256 + dtype/layout/compile sweep (~5 min)
#   bash benchmarks/gpu_bench.sh serve      # service vs naive at concurrency 1/16/64/256 (~8 min)
#   bash benchmarks/gpu_bench.sh all        # the three in a row
# QUICK=1 shrinks every step to a smoke run. Results land in $OUT_DIR (default bench-results/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-bench-results}
STEP=${1:-all}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, multipart" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cxr-site benchmarks/wheels/*.whl
  export PYTHONPATH=/tmp/cxr-site${PYTHONPATH:+:$PYTHONPATH}  # inherited by the server subprocesses
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p "$OUT_DIR"
if [[ -n "${QUICK:-}" ]]; then
  BATCHES=(1 32 128); SERVE=(--quick --concurrency 16 64); MIN_S=1
else
  BATCHES=(1 32 64 128 256); SERVE=(--concurrency 1 16 64 256 --requests 4096 --max-seconds 45); MIN_S=3
fi
# Callers with a time budget (benchmarks/gpu_check.sh) override the sweep: space-separated lists.
[[ -n "${BENCH_BATCHES:-}" ]] && read -r -a BATCHES <<< "$BENCH_BATCHES"
[[ -n "${BENCH_SERVE:-}" ]] && read -r -a SERVE <<< "$BENCH_SERVE"
MIN_S=${BENCH_MIN_S:-$MIN_S}

if [[ $STEP == decode || $STEP == all ]]; then
  "$PY" -m benchmarks.decode_gpu --device cuda --batch 64 --out "$OUT_DIR/decode_gpu.json"
fi
if [[ $STEP == model || $STEP == all ]]; then
  "$PY" -c "import sys; from pathlib import Path; from benchmarks.serve_bench import export_random_model; export_random_model(Path(sys.argv[1]), 224)" "$OUT_DIR/gpu-weights"
  "$PY" -m benchmarks.model_only --weights "$OUT_DIR/gpu-weights" --device cuda --precision auto \
    --batch-sizes "${BATCHES[@]}" --min-seconds "$MIN_S" --variants 128 --out "$OUT_DIR/model_only_gpu.json"
fi
if [[ $STEP == serve || $STEP == all ]]; then
  "$PY" -m benchmarks.serve_bench --device cuda --max-batch-size 128 --max-wait-ms 5 \
    --decode-workers "$(nproc)" --batch-files 16 "${SERVE[@]}" --out "$OUT_DIR"
fi
