# Two commands do everything: `make run` (the main job) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
MAX_ADS ?= 3000

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup run test lint bench bench-loop ui clean openclipart

setup: $(STAMP)

# Reinstall only when the project metadata changed. torch first, with pip: the CPU wheel of
# $(TORCH_VERSION) lies on this machine's disk (pip's find-links), which uv does not read. Then uv
# installs the rest (about 1 min instead of pip's 2.5) and keeps that torch, as the project's
# range allows it. --compile-bytecode does what pip does by default: with
# PYTHONDONTWRITEBYTECODE set (as here) every import would otherwise compile from source.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) show torch 2>/dev/null | grep -q "^Version: $(TORCH_VERSION)" || $(PIP) install -q "torch==$(TORCH_VERSION)"
	@test -x $(UV) || $(PIP) install -q uv
	$(UV) pip install -q --compile-bytecode --python $(PY) -e ".[dev]"
	@touch $(STAMP)

# The clip art the default dataset is built from (Debian package).
openclipart:
	@bash infra/ensure_openclipart.sh

run: setup openclipart
	$(VENV)/bin/alignsearch run

test: setup
	@bash infra/ensure_chromium.sh
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup --durations=15

lint: setup
	$(VENV)/bin/ruff check components flows infra tests

# The benchmark searches params benchmark.lr_grid for every trained system; the flow trains
# at match.lr_grid, the rate that won for ours.
bench: setup openclipart
	$(VENV)/bin/alignsearch benchmark --data data/openclipart --out reports/benchmark

# Each system learns from simulated clicks round by round (about 50 min on 2 cores, docs/benchmark.md).
bench-loop: setup openclipart
	$(VENV)/bin/alignsearch benchmark-loop --data data/openclipart --out reports/benchmark-loop

ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts

clean:
	rm -rf $(VENV) .pytest_cache
