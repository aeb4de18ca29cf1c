# Two commands a newcomer needs: `make dev` (start the whole pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
MRI_HOME ?= $(CURDIR)/.mri
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: install dev test lint bench bench-quick clean

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
	MRI_HOME=$(MRI_HOME) $(BIN)/mri-assets seed-landing
	DAGSTER_HOME=$(DAGSTER_HOME) MRI_HOME=$(MRI_HOME) \
		$(BIN)/dagster dev -h $(HOST) -p $(PORT) -w workspace.yaml

test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint:
	$(BIN)/ruff check mri_assets mri_assets_tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf .mri .dagster_home test-artifacts
