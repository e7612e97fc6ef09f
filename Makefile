# Two commands for users: `make run` (the main job) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export ZENML_ANALYTICS_OPT_IN := false
export ZENML_CONFIG_PATH := $(CURDIR)/.zen_config
export AUTO_OPEN_DASHBOARD := false

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (from pip's find-links), so nothing pulls CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	bash scripts/run.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf .run .zen_config .mlflow
