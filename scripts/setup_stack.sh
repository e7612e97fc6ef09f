#!/usr/bin/env bash
# Idempotent local stack: default orchestrator + artifact store, MLflow experiment tracker and
# model registry on a SQLite store inside this checkout (.mlflow/), ZenML state in .zen_config/.
# The work is scripts/setup_stack.py: one process, not one `zenml` command per component.
set -euo pipefail
source "$(dirname "$0")/zenml_env.sh"
cd "$ROOT"
mkdir -p "$(dirname "$MLFLOW_DB")" "$MLFLOW_ARTIFACTS"
python scripts/setup_stack.py
