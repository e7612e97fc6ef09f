"""End-to-end: a real MLflow server's web UI, rendered by headless Chromium, shows our runs.

Needs Debian's chromium (``apt-get install -y chromium``). Run with ``pytest -m e2e``. Screenshots
land in tmp_path and, when ECOMCAP_SCREENSHOTS is set, are copied into that directory.
"""
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.mlflow_ui import check_runs_visible, ensure_chromium, mlflow_server

METRIC = "val.CIDEr-D"
VALUES = [1.234567, 2.345678]


def _build_store(root: Path) -> tuple[str, str, list[str]]:
    """A real SQLite tracking store: experiment "training_pipeline" with two finished runs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("training_pipeline",
                                      artifact_location=(root / "artifacts").as_uri())
    run_ids = []
    for i, (stage, value) in enumerate(zip(["sft", "scst"], VALUES)):
        run = client.create_run(exp_id, run_name=f"{stage}-run", start_time=int(time.time() * 1000))
        rid = run.info.run_id
        for key, val in {"stage": stage, "learning_rate": f"{2e-4 / (i + 1):g}",
                         "model": "tiny-qwen", "seed": str(7 + i)}.items():
            client.log_param(rid, key, val)
        client.log_metric(rid, METRIC, value, step=1)
        client.log_metric(rid, "train.loss", 3.0 - i, step=1)
        client.set_terminated(rid, "FINISHED")
        run_ids.append(rid)
    return uri, exp_id, run_ids


@pytest.mark.e2e
def test_mlflow_ui_shows_runs(tmp_path):
    ensure_chromium()  # a clear RuntimeError with the apt-get line when chromium is missing
    uri, exp_id, run_ids = _build_store(tmp_path)

    shots = tmp_path / "screenshots"
    with mlflow_server(uri, str(tmp_path / "artifacts")) as base:
        result = check_runs_visible(base, exp_id, run_ids, METRIC, VALUES, shots)

    assert set(result["found"]) == set(VALUES)
    for key in ("experiment_png", "compare_png"):
        png = Path(result[key])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    dest = os.environ.get("ECOMCAP_SCREENSHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        for png in (result["experiment_png"], result["compare_png"]):
            shutil.copy2(png, Path(dest) / Path(png).name)
