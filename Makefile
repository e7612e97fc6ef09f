# Two commands for users: `make run` (the main job) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export ZENML_ANALYTICS_OPT_IN := false

.PHONY: setup run test e2e infer bench clean retrieval index dashboard dashboard-stop

$(STAMP): pyproject.toml docker/requirements-gpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (from pip's find-links), so nothing pulls CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	# the GPU image's pins as constraints: the suite tests the versions the image ships
	sed 's/\[[^]]*\]//' docker/requirements-gpu.txt > $(VENV)/constraints.txt
	$(BIN)/pip install -q -e ".[dev]" -c $(VENV)/constraints.txt
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	bash scripts/run.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

# End-to-end (real ZenML + MLflow stack, headless Chromium): slower, run by CI after `make test`.
e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m e2e

# Batch inference with the registry's champion -> .run/caption_gen.jsonl
infer: $(STAMP)
	bash -c 'source scripts/zenml_env.sh && zenml pipeline run pipelines.inference.batch_inference_pipeline -c $${CONFIG:-configs/local.yaml}'

# The second job: product retrieval (ingest -> validate -> train -> embed gallery -> evaluate -> promote)
retrieval: $(STAMP)
	bash -c 'source scripts/zenml_env.sh && bash scripts/setup_stack.sh && OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} zenml pipeline run pipelines.retrieval.retrieval_pipeline -c $${CONFIG:-configs/retrieval_local.yaml}'

# The catalogue index job: the champion's encoder over a catalogue -> ecomcap-retriever@serving
index: $(STAMP)
	bash -c 'source scripts/zenml_env.sh && bash scripts/setup_stack.sh && OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} zenml pipeline run pipelines.index.index_pipeline -c $${CONFIG:-configs/retrieval_index.yaml}'

# ZenML dashboard (run DAGs, the evaluation report) on http://127.0.0.1:$${ZENML_DASHBOARD_PORT:-8237},
# offline, no login (local server, "default" user); prints each pipeline's newest run page.
dashboard: $(STAMP)
	bash scripts/dashboard.sh

dashboard-stop: $(STAMP)
	bash -c 'source scripts/zenml_env.sh && zenml logout --local'

bench: $(STAMP)
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/learning.py --stage sft --steps 1500
	$(BIN)/python benchmarks/learning.py --stage scst
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/batch_inference.py
	$(BIN)/python benchmarks/gpu_sft.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/retrieval_topk.py

clean:
	rm -rf .run .zen_config .mlflow .zen
