# Sourced by the GPU recipes: from the repository root, with the interpreter in PY and the web stack's
# wheels (benchmarks/wheels, fetched where PyPI is reachable) installed for an image that has torch only.
#   PYTHON [python3]; SKIP_WHEELS: set when pydantic & co. are already installed
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site benchmarks/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
