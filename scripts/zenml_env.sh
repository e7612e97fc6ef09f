# Sourced by scripts: per-checkout ZenML and MLflow state, analytics off.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ZENML_CONFIG_PATH="$ROOT/.zen_config"
export ZENML_ANALYTICS_OPT_IN=false
export ZENML_LOGGING_VERBOSITY="${ZENML_LOGGING_VERBOSITY:-INFO}"
export AUTO_OPEN_DASHBOARD=false
export MLFLOW_DB="$ROOT/.mlflow/mlflow.db"
export MLFLOW_TRACKING_URI="sqlite:///$MLFLOW_DB"
export MLFLOW_ARTIFACTS="$ROOT/.mlflow/artifacts"
export PATH="$ROOT/.venv/bin:$PATH"
