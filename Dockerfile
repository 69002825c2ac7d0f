# syntax=docker/dockerfile:1
# Serving image for the cxr-pneumonia API.
#
# torch/torchvision come from the CUDA-enabled PyTorch base image (the same release that
# pyproject.toml pins, built for CUDA 13.0 like the PyPI wheels); the project and its other
# dependencies go into a venv that sees the base's packages, so no second torch is installed.
# Build:  docker build -t cxr-pneumonia:local .      (weights/ must hold model.safetensors + model.json)
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv --system-site-packages --without-pip /opt/venv
COPY pyproject.toml README.md ./
COPY app/ app/
COPY training/ training/
# Non-editable install: the runtime stage needs only /opt/venv, not the source tree.
RUN python -m pip --python /opt/venv/bin/python install . \
 && /opt/venv/bin/python -c "import torch; assert not torch.__file__.startswith('/opt/venv'), 'a second torch was installed into the venv'"
COPY weights/ /opt/weights/
# Refuse to build an image around weights that do not load (sha256, architecture, golden logits).
RUN /opt/venv/bin/python -c "from pathlib import Path; from app.core.artifacts import load_model; m = load_model(Path('/opt/weights')).metadata; print('weights ok:', m.name, m.version)"

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cxr
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/weights /srv/weights
# CXR_WEIGHTS points at the baked-in model; mount another model directory read-only over
# /srv/weights to replace it without rebuilding. The root filesystem is read-only in compose and
# Kubernetes and the user has no home: OpenVINO conversions (CXR_BACKEND=openvino) are cached
# under the writable /tmp (tmpfs / emptyDir), so they last as long as the container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CXR_HOST=0.0.0.0 \
    CXR_PORT=8000 \
    CXR_WEIGHTS=/srv/weights \
    CXR_CACHE_DIR=/tmp/cxr-cache
WORKDIR /srv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CXR_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
