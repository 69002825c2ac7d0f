#!/usr/bin/env bash
# The GPU acceptance run, in order of value and in at most ~8 minutes on one H100/H200:
#   1. the test suite's CUDA tests, then the real service (python -m app) on the GPU answering
#      /predict, /predict/batch and /health for the golden images and real X-rays with the CPU fp32
#      probabilities (benchmarks/gpu_service_check.py), for the shipped model and a 224-px model;
#   2. model-only throughput at 224 px, batch 1..256, with the bf16/fp16/channels_last/compile/CUDA
#      graph variants (benchmarks/model_only.py);
#   3. the end-to-end bench against the naive server at concurrency 1, 64 and 256.
# Every step has its own time budget and the run goes on after a failed step; everything lands in
# $OUT_DIR (default bench-results/gpu-check): a log per step, gpu-service-check*.json,
# gpu-model-only.json, gpu-serve.json and summary.txt (one line per step with its exit status).
#
# On a GPU host without a package index: first, on a machine with PyPI, `bash benchmarks/fetch_wheels.sh`
# (benchmarks/wheels/), and copy a few real X-rays into IMAGES (default .data/xrays). Then, from the
# repo root on the GPU host: `bash benchmarks/gpu_check.sh`. With this workplace's device tool, name
# benchmarks/wheels and the image folder in `carry`: tracked tree (~50 MB) + wheels (~11 MB, imagecodecs
# slimmed by fetch_wheels.sh) + images must stay under its 64 MiB limit, so bring a few MB of X-rays.
# On a machine without a GPU the CUDA steps fail at once with a clear "no CUDA GPU" line, and
# `DEVICE=cpu PRECISION=bf16 SIZE=32 SERVE_LEVELS="1 4" REQUESTS=16 bash benchmarks/gpu_check.sh` dry-runs
# the rest at a tiny size.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-bench-results/gpu-check}
IMAGES=${IMAGES:-.data/xrays}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-auto}
SIZE=${SIZE:-224}
SERVE_LEVELS=${SERVE_LEVELS:-1 64 256}
REQUESTS=${REQUESTS:-2048}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/summary.txt"

if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, multipart, imagecodecs, pydicom" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cxr-site \
    benchmarks/wheels/*.whl || echo "wheel install failed" >> "$OUT_DIR/summary.txt"
  export PYTHONPATH=/tmp/cxr-site:$PWD${PYTHONPATH:+:$PYTHONPATH}  # inherited by server subprocesses
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  > "$OUT_DIR/gpu.txt" 2>&1

step() {  # step NAME BUDGET_S COMMAND...: run with a time limit, log it, record its exit status
  local name=$1 budget=$2; shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 3 "$OUT_DIR/$name.log"
}

step cuda-tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_service_oracles.py \
  -k "cuda or reduced_precision or golden"
images=() real=()
[[ -d $IMAGES ]] && images=(--images "$IMAGES") real=(--real-dir "$IMAGES")
step service-shipped 90 "$PY" -m benchmarks.gpu_service_check --weights weights "${images[@]}" \
  --device "$DEVICE" --precision "$PRECISION" --out "$OUT_DIR/gpu-service-check.json"
"$PY" -c "import sys; from pathlib import Path; from benchmarks.serve_bench import export_random_model; \
export_random_model(Path(sys.argv[1]), int(sys.argv[2]))" "$OUT_DIR/weights-$SIZE" "$SIZE" > /dev/null 2>&1
step service-$SIZE 90 "$PY" -m benchmarks.gpu_service_check --weights "$OUT_DIR/weights-$SIZE" "${images[@]}" \
  --device "$DEVICE" --precision "$PRECISION" --out "$OUT_DIR/gpu-service-check-$SIZE.json"
step model-only 150 "$PY" -m benchmarks.model_only --weights "$OUT_DIR/weights-$SIZE" --device "$DEVICE" \
  --precision "$PRECISION" --batch-sizes 1 8 32 64 128 256 --min-seconds 1 --variants 128 \
  --out "$OUT_DIR/gpu-model-only.json"
step serve 200 "$PY" -m benchmarks.serve_bench --device "$DEVICE" --input-size "$SIZE" --max-batch-size 128 \
  --max-wait-ms 5 --decode-workers "$(nproc)" --batch-files 16 --concurrency $SERVE_LEVELS --requests "$REQUESTS" \
  --max-seconds 25 "${real[@]}" --out "$OUT_DIR/serve"
[[ -f $OUT_DIR/serve/serve.json ]] && cp "$OUT_DIR/serve/serve.json" "$OUT_DIR/gpu-serve.json"
cat "$OUT_DIR/summary.txt"
