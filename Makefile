# Two entry points on a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench train clean fuzz mutation

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision first and pinned: pip then finds them on local disk instead of downloading a CUDA build.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m app

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache bench-results fuzz-findings

# Serving benchmark (see benchmarks/README.md); results land in bench-results/.
# BENCH_ARGS="--precision bf16" measures the CPU fast path.
bench: $(STAMP)
	$(PY) -m benchmarks.serve_bench $(BENCH_ARGS)

# Decoder fuzzing, longer than the CI run (see README, Development); findings are written to fuzz-findings/.
FUZZ_MUTATIONS ?= 20000
FUZZ_SEED ?= 1
fuzz: $(STAMP)
	$(PY) -m tests.fuzz_decoders --mutations $(FUZZ_MUTATIONS) --seed $(FUZZ_SEED) --out fuzz-findings

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml; README, Development), then the
# per-module scores. Slow: outside CI. MUTANTS='app.core.decision*' reruns only those mutants (and,
# named, reruns them even where a result is stored); results stay in mutants/ between runs.
MUTATION_CHILDREN ?= 2
MUTANTS ?=
mutation: $(STAMP)
	nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(PY) -m benchmarks.mutation_report

# Default training recipe: DATA=path/to/chest_xray OUT=runs/NAME
DATA ?= ../shared/data/chest_xray
OUT ?= runs/default
train: $(STAMP)
	$(PY) -m training train --data $(DATA) --out $(OUT)

# Style and static checks (ruff); CI runs this before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
