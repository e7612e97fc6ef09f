"""scripts/setup_stack.sh (what `make run` and the e2e tests start with): in a fresh checkout it
makes the ecomcap_local stack (MLflow tracker on the checkout's SQLite store, MLflow registry,
default orchestrator and artifact store) active, and a second run changes nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.first_run import fresh_checkout

DESCRIBE = """
from zenml.client import Client
import mlflow, json
s = Client().active_stack_model
print(json.dumps({"stack": s.name, "id": str(s.id),
                  "components": {str(k.value): [c.name for c in v] for k, v in s.components.items()},
                  "tracking_uri": Client().get_stack_component("experiment_tracker", "mlflow_local").configuration["tracking_uri"],
                  "experiments": sorted(e.name for e in mlflow.search_experiments())}))
"""


def _sh(repo: Path, cmd: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZENML_", "MLFLOW_"))}
    proc = subprocess.run(["bash", "-c", 'source scripts/zenml_env.sh && "$@"', "sh", *cmd], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.e2e  # a real ZenML stack set up twice: 80 s, end to end (make e2e)
def test_setup_stack_makes_the_local_stack_active_and_is_idempotent(tmp_path):
    repo = fresh_checkout(tmp_path / "ecomcap")
    assert "stack ecomcap_local ready" in _sh(repo, ["bash", "scripts/setup_stack.sh"])
    first = json.loads(_sh(repo, [sys.executable, "-c", DESCRIBE]).splitlines()[-1])
    assert first["stack"] == "ecomcap_local"
    assert first["components"] == {"orchestrator": ["default"], "artifact_store": ["default"],
                                   "experiment_tracker": ["mlflow_local"], "model_registry": ["mlflow_registry"]}
    assert first["tracking_uri"] == f"sqlite:///{repo.resolve()}/.mlflow/mlflow.db"
    assert {"training_pipeline", "batch_inference_pipeline", "retrieval_pipeline"} <= set(first["experiments"])
    assert (repo / ".zen").is_dir()
    _sh(repo, ["bash", "scripts/setup_stack.sh"])
    assert json.loads(_sh(repo, [sys.executable, "-c", DESCRIBE]).splitlines()[-1]) == first
    # a tracker left pointing elsewhere (a moved checkout) is pointed back at this one's store
    _sh(repo, [sys.executable, "-c", MOVE])
    assert json.loads(_sh(repo, [sys.executable, "-c", DESCRIBE]).splitlines()[-1])["tracking_uri"] \
        == "sqlite:////elsewhere/mlflow.db"
    _sh(repo, ["bash", "scripts/setup_stack.sh"])
    assert json.loads(_sh(repo, [sys.executable, "-c", DESCRIBE]).splitlines()[-1]) == first


MOVE = """
from zenml.client import Client
Client().update_stack_component("mlflow_local", "experiment_tracker",
                                configuration={"tracking_uri": "sqlite:////elsewhere/mlflow.db"})
"""
