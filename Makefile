# Two commands a newcomer needs: `make dev` (start the whole pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
MRI_HOME ?= $(CURDIR)/.mri
HOST ?= 127.0.0.1
PORT ?= 3000
# Generated data set `make dev` lands: default, or hard (`make dev PHANTOMS=hard`).
PHANTOMS ?= default

.PHONY: install dev test test-fast lint format bench bench-quick gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch is installed first and pinned: a bare `torch` would pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

dev: install $(DAGSTER_HOME)/dagster.yaml
	MRI_HOME=$(MRI_HOME) $(BIN)/mri-assets seed-landing --variation $(PHANTOMS)
	DAGSTER_HOME=$(DAGSTER_HOME) MRI_HOME=$(MRI_HOME) \
		$(BIN)/dagster dev -h $(HOST) -p $(PORT) -w workspace.yaml

# Lint first: a formatting or lint finding fails the run in a second, before the slow tests.
test: install lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# The suite without the tests that start `dagster dev` or a browser: for the edit-test loop.
test-fast: install lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not e2e and not browser"

lint:
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

# GPU check: runs $(PYTHON) as it is (no install, no network); needs torch, transformers, numpy,
# Pillow, pandas and scikit-learn. With no GPU it says so and exits 0.
GPU_CHECK_OUT ?= gpu-check-report
gpu-check:
	PYTHONPATH=. $(PYTHON) -m mri_assets.gpu_check $(GPU_CHECK_OUT)

clean:
	rm -rf .mri .dagster_home test-artifacts
