#!/usr/bin/env bash
# The main job (`make run`): local ZenML stack with MLflow (SQLite) -> training pipeline on the
# synthetic data and the tiny Qwen2.5-VL -> metrics, gate decision, how to open the MLflow UI.
set -euo pipefail
source "$(dirname "$0")/zenml_env.sh"
cd "$ROOT"
CONFIG="${CONFIG:-configs/local.yaml}"
bash scripts/setup_stack.sh
zenml pipeline run pipelines.training.training_pipeline -c "$CONFIG"
echo
ecomcap summary --tracking-uri "$MLFLOW_TRACKING_URI"
