#!/usr/bin/env bash
# Idempotent local stack: default orchestrator + artifact store, MLflow experiment tracker and
# model registry on a SQLite store inside this checkout (.mlflow/), ZenML state in .zen_config/.
set -euo pipefail
source "$(dirname "$0")/zenml_env.sh"
cd "$ROOT"
mkdir -p "$(dirname "$MLFLOW_DB")" "$MLFLOW_ARTIFACTS"
[ -d .zen ] || zenml init >/dev/null
# Experiments get their artifact root under .mlflow/ (not ./mlruns of whatever directory).
python - <<PY
import mlflow
mlflow.set_tracking_uri("$MLFLOW_TRACKING_URI")
for name in ("training_pipeline", "batch_inference_pipeline", "retrieval_pipeline", "ecomcap"):
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location="file://$MLFLOW_ARTIFACTS/" + name)
PY
has() { zenml "$1" list 2>/dev/null | grep -q " $2 "; }
has experiment-tracker mlflow_local || \
  zenml experiment-tracker register mlflow_local --flavor=mlflow --tracking_uri="$MLFLOW_TRACKING_URI" >/dev/null
has model-registry mlflow_registry || zenml model-registry register mlflow_registry --flavor=mlflow >/dev/null
has stack ecomcap_local || \
  zenml stack register ecomcap_local -o default -a default -e mlflow_local -r mlflow_registry >/dev/null
zenml stack set ecomcap_local >/dev/null
echo "stack ecomcap_local ready (MLflow: $MLFLOW_TRACKING_URI)"
