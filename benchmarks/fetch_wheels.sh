#!/usr/bin/env bash
# Run on a machine with PyPI access, before gpu_bench.sh on a GPU host without one: downloads the
# service's web stack as Python 3.12 x86-64 wheels into benchmarks/wheels/ (gitignored).
# Versions are the ones pinned in pyproject.toml; torch, numpy, pillow, httpx, uvloop,
# prometheus-client, anyio, h11 and click are already on the GPU image. The decoders (imagecodecs,
# simplejpeg, pydicom) are not: the service refuses to start without them.
# Size: the device tool carries at most 64 MiB of working tree in all, and the tracked tree is ~50 MB
# (47 MB of it the shipped weights), so the wheels must stay under ~14 MB: the 26 MB imagecodecs wheel
# is repacked with only the codecs we use (benchmarks/slim_imagecodecs.py, 4 MB) and the total is printed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 \
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  typing-inspection==0.4.5 annotated-types==0.8.0 annotated-doc==0.0.7 typing_extensions==4.16.0 \
  python-multipart==0.0.34 imagecodecs==2026.3.6 simplejpeg==1.9.0 pydicom==3.0.2
"$PY" slim_imagecodecs.py wheels/imagecodecs-*.whl
ls -l wheels
du -sh wheels
