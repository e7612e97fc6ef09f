"""Serving parity (issue 21 §6): the registered champion posted images through MLflow's scoring app
(what `mlflow models serve` runs) captions them exactly as batch inference does, because both use
the prompt, decoding, pixel bounds and dtype the version records, whatever the run config asks for.
The fast test calls the batch-inference stages; the e2e one runs `make infer`'s pipeline."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from ecomcap.config import GenerateConfig, RunConfig
from ecomcap.registry.pyfunc import export_merged, log_pyfunc

NAME = "ecomcap-captioner"
# what the run config asks for: another decoding, another instruction and a pixel bound that
# keeps 112 px images whole, where the version records 56 x 56 (4 image tokens instead of 16)
ASKED = {"model": {"device": "cpu", "max_pixels": 112 * 112, "prompt": "写一句话。"},
         "generate": {"num_beams": 1, "max_new_tokens": 12, "batch_size": 4}}


def export_champion(model_cfg, out: Path) -> Path:
    return export_merged(model_cfg.name_or_path, out, model_cfg.model_copy(update={"max_pixels": 56 * 56}),
                         GenerateConfig(num_beams=2, max_new_tokens=6))


@contextlib.contextmanager
def tracking(uri: str):
    """MLflow's global URI pointed at `uri` for the fluent API, then put back as it was."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def register_champion(merged: Path, uri: str, experiment: str = "ecomcap") -> None:
    """`merged` as version N of the captioner with alias champion; runs in `experiment` (made with
    its artifacts beside a SQLite store when missing; no global active experiment is left set)."""
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=f"file://{Path(uri.removeprefix('sqlite:///')).parent}/artifacts")
    with tracking(uri), mlflow.start_run(experiment_id=exp_id, run_name="parity"):
        version = mlflow.register_model(log_pyfunc(merged).model_uri, NAME).version
    client.set_registered_model_alias(NAME, "champion", version)


def served(uri: str, raw_tsv: Path) -> dict[str, str]:
    """Captions of the champion for every image of a MUGE TSV, posted as `mlflow models serve` takes them."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    rows = [line.split("\t") for line in raw_tsv.read_text(encoding="utf-8").splitlines() if line]
    with tracking(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    resp = TestClient(scoring_server.init(model)).post(
        "/invocations", json={"dataframe_split": {"columns": ["image_id", "image"], "data": rows}})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert all(p["error"] == "" for p in preds), preds
    return {p["image_id"]: p["caption"] for p in preds}


def test_served_captions_equal_batch_inference(tiny_model_cfg, small_data, tmp_path):
    from ecomcap.registry.promote import champion_model_dir
    from ecomcap.workflow import generate_stage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    register_champion(export_champion(tiny_model_cfg, tmp_path / "merged"), uri)
    cfg = RunConfig.model_validate({**ASKED, "registry": {"tracking_uri": uri},
                                    "data": {"work_dir": str(tmp_path / "data")}})
    model_dir = champion_model_dir(cfg)
    batch = generate_stage(model_dir, small_data["test"], cfg, log=False, registered=True)
    serve = served(uri, small_data["raw"] / "IC_test.tsv")
    assert batch == serve and len(batch) == 6
    # the check has teeth: the config's own settings caption otherwise
    assert generate_stage(model_dir, small_data["test"], cfg, log=False) != serve


@pytest.mark.e2e
def test_make_infer_output_equals_served_captions(tiny_model_cfg, tmp_path):
    """`make infer` (the batch-inference pipeline with the registry's champion, on a real local
    stack from a clean copy) and the served champion write the same caption for every test image."""
    from benchmarks.first_run import fresh_checkout

    repo = fresh_checkout(tmp_path / "ecomcap")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", f"source scripts/zenml_env.sh && {cmd}"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=1200)
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return proc

    assert sh("bash scripts/setup_stack.sh").returncode == 0
    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    register_champion(export_champion(tiny_model_cfg, tmp_path / "merged"), uri)
    settings = {**ASKED, "data": {"work_dir": ".run/data", "splits": ["train", "valid", "test"],
                                  "synth": {"train": 24, "valid": 8, "test": 8, "seed": 3}}}
    (repo / "configs" / "infer.yaml").write_text(yaml.safe_dump({"parameters": {"config": settings}},
                                                                allow_unicode=True), encoding="utf-8")
    proc = sh("CONFIG=configs/infer.yaml make -s -o .venv/.installed infer")  # (never reinstall the shared venv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (repo / ".run" / "caption_gen.jsonl").read_text(encoding="utf-8").splitlines()
    batch = {r["image_id"]: r["text"] for r in map(json.loads, lines)}
    assert len(batch) == 8 and batch == served(uri, repo / ".run" / "data" / "raw" / "IC_test.tsv")
