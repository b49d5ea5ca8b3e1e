# ntkexp — the two set-up commands are `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/jacot_fig1.yaml
PRESET ?= cpu
PYTEST_FLAGS ?=
# JAX tests are compile-bound: two workers use both cores (one module per worker).
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

export PYTHONUNBUFFERED := 1

PHONY_GALLERY := gallery gallery-render
.PHONY: $(PHONY_GALLERY) setup run test test-x64 test-x32 test-slow test-slow-x64 ci test-all bench lint gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

## Main job: the default config on CPU; prints where its output is.
run: setup
	JAX_PLATFORMS=cpu $(VENV)/bin/ntkexp run $(CONFIG) --preset $(PRESET)

## The fast suite with x64 on: float64 cases and every dtype-free test (float32 configs
## included). The float32 cases of dtype-parametrized tests run with x64 off, in test-x32.
## Slow checks are marked and run by test-slow (.ci/run runs both).
test: test-x64

test-x64: setup
	JAX_ENABLE_X64=1 $(PY) -m pytest -m "not slow and not float32_case" $(XDIST) $(PYTEST_FLAGS)

## The fast suite with x64 off, the default a user has: float32 cases; float64 ones skip.
test-x32: setup
	JAX_ENABLE_X64=0 $(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_FLAGS)

## Slow checks (convergence rates over widths, property tests, larger presets; x64 on),
## then the fast suite again with x64 off (test-x32): with make test, every test in both modes.
test-slow: test-slow-x64 test-x32

test-slow-x64: setup
	JAX_ENABLE_X64=1 $(PY) -m pytest -m slow $(XDIST) $(PYTEST_FLAGS)

## Everything CI runs: make test, then make test-slow.
ci: test test-slow

test-all: setup
	JAX_ENABLE_X64=1 $(PY) -m pytest $(XDIST) $(PYTEST_FLAGS)

## Benchmarks in matmul units; JSON to benchmarks/results/.
bench: setup
	$(PY) -m benchmarks.run --out benchmarks/results

## For whoever has a GPU (pip install -e '.[cuda12]'): the Jacot figures' paper presets with
## device: gpu and the benchmarks; timings to runs/gpu-check/timings.json (docs/gpu.md).
## Without a GPU it stops at once with one line.
gpu-check: setup
	@$(VENV)/bin/ntkexp gpu-check --out runs/gpu-check

## Re-run every gallery preset the page templates name (experiments/*/README.template.md),
## one at a time and resumable, record each run, then regenerate experiments/*/README.md.
gallery: setup
	JAX_PLATFORMS=cpu $(VENV)/bin/ntkexp gallery run

## Regenerate the gallery pages from the committed records only (seconds).
gallery-render: setup
	$(VENV)/bin/ntkexp gallery render

## ruff (style, complexity) and the package-order contracts of pyproject.toml (import-linter).
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
