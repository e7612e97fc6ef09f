#!/usr/bin/env bash
# The main job (`make run`): synthetic data -> ingest -> validate -> report.
# The pipeline issue extends this to the full ZenML training pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
export ZENML_ANALYTICS_OPT_IN=false
CONFIG="${CONFIG:-configs/local.yaml}"
.venv/bin/ecomcap prepare --config "$CONFIG"
echo
echo "Reports: .run/data/<split>/report.json, quarantined rows: .run/data/<split>/quarantine.parquet"
