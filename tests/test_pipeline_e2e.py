"""End to end on the real local stack (ZenML + MLflow on SQLite), from a clean copy of the repo:
run, rerun (cached, gate decision shown), a worse config never moves `champion`, retrain
--if-changed, batch inference with the champion, and the MLflow UI in headless Chromium."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.first_run import fresh_checkout

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

E2E = {
    "data": {"work_dir": ".run/data", "splits": ["train", "valid", "test"], "dev_images": 24,
             "synth": {"train": 240, "valid": 24, "test": 8, "seed": 11}},
    "model": {"name_or_path": ".run/models/tiny", "device": "cpu",
              "tiny": {"text_hidden": 96, "text_layers": 2, "text_heads": 2, "text_kv_heads": 1,
                       "text_intermediate": 192, "vision_depth": 2, "vision_hidden": 32, "vision_heads": 2}},
    "finetune": {"strategy": "full"},
    "sft": {"output_dir": ".run/sft", "max_steps": 150, "batch_size": 16, "lr": 3.0e-3, "eval_every": 75,
            "eval_images": 24, "save_every": 0},
    "scst": {"output_dir": ".run/scst", "max_steps": 4, "batch_size": 4, "samples": 3, "lr": 1.0e-4,
             "eval_every": 0, "save_every": 0, "max_new_tokens": 24},
    "generate": {"num_beams": 2, "max_new_tokens": 24, "batch_size": 8},
    "registry": {"min_rel_gain": 0.05, "floor": 0.05},
}


def _write_config(repo: Path, name: str, **changes) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(E2E))
    for section, update in changes.items():
        cfg.setdefault(section, {}).update(update)
    path = repo / "configs" / name
    path.write_text(yaml.safe_dump({"parameters": {"config": cfg}}, allow_unicode=True), encoding="utf-8")
    return f"configs/{name}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A clean copy of the tracked files (as CI's clone), sharing this checkout's .venv."""
    return fresh_checkout(tmp_path_factory.mktemp("clone") / "ecomcap")


def sh(repo: Path, cmd: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": str(repo)}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(["bash", "-c", f"source scripts/zenml_env.sh && {cmd}"], cwd=repo, env=full_env,
                          capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def champion(repo: Path) -> tuple[str, dict]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    v = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("ecomcap-captioner", "champion")
    return str(v.version), v.tags


def test_run_rerun_worse_retrain_infer_and_ui(repo, tmp_path):
    good = _write_config(repo, "e2e.yaml")
    first = sh(repo, "bash scripts/run.sh", CONFIG=good)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "gate: promoted" in out and "MLflow UI:" in out
    v1, tags = champion(repo)
    assert float(tags["CIDEr-D"]) >= 0.05
    _check_pyfunc_serves_captions(repo)

    second = sh(repo, "bash scripts/run.sh", CONFIG=good)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0
    for step in ("ingest", "validate", "sft", "scst"):
        assert f"Using cached version of step {step}" in _plain(out2), step
    assert "gate:" in out2

    worse = _write_config(repo, "e2e_worse.yaml", sft={"max_steps": 0}, scst={"enabled": False})
    third = sh(repo, f"zenml pipeline run pipelines.training.training_pipeline -c {worse}")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "NOT PROMOTED" in _plain(third.stdout + third.stderr)
    assert champion(repo)[0] == v1  # the worse model never became champion

    # a trained candidate that is worse than the trained champion: refused on the comparison
    trained_worse = _write_config(repo, "e2e_trained_worse.yaml", sft={"max_steps": 40}, scst={"enabled": False})
    fourth = sh(repo, f"zenml pipeline run pipelines.training.training_pipeline -c {trained_worse}")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    gate = _last_gate(repo)
    assert gate["decision"] == "rejected" and champion(repo)[0] == v1
    assert gate["CIDEr-D"] >= E2E["registry"]["floor"], gate  # trained: it passed the floor
    assert gate["rel_gain_high"] < 0 and "lower bound <" in gate["text"], gate  # worse beyond the noise

    # the same recipe with another seed: a trained candidate indistinguishable from the champion
    # on this eval set (its gain's interval spans 0), refused by the interval, not by the floor
    reseeded = _write_config(repo, "e2e_reseeded.yaml", sft={"seed": 7})
    fifth = sh(repo, f"zenml pipeline run pipelines.training.training_pipeline -c {reseeded}")
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    gate = _last_gate(repo)
    print("reseeded candidate:", {k: gate[k] for k in ("rel_gain", "rel_gain_low", "rel_gain_high", "decision")})
    assert gate["CIDEr-D"] >= E2E["registry"]["floor"] and gate["rel_gain_low"] < 0 < gate["rel_gain_high"]
    assert gate["decision"] == "rejected" and "lower bound <" in gate["text"] and champion(repo)[0] == v1

    again = sh(repo, f"ecomcap retrain --config {good} --if-changed")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    variant = _write_config(repo, "e2e_variant.yaml", generate={"num_beams": 1})
    once = sh(repo, f"ecomcap retrain --config {variant} --if-changed")
    assert once.returncode == 0 and "config changed" in once.stdout and "pipeline run" in once.stdout
    twice = sh(repo, f"ecomcap retrain --config {variant} --if-changed")
    assert twice.returncode == 0 and "nothing to do" in twice.stdout and "pipeline run" not in twice.stdout

    infer = sh(repo, f"zenml pipeline run pipelines.inference.batch_inference_pipeline -c {good}")
    assert infer.returncode == 0, infer.stderr[-3000:]
    lines = (repo / ".run" / "caption_gen.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == E2E["data"]["synth"]["test"]

    _check_mlflow_ui(repo, tmp_path)


def _check_pyfunc_serves_captions(repo: Path) -> None:
    """The registered champion is a pyfunc: base64 images in, captions out (what `mlflow models serve` runs)."""
    import mlflow
    import pandas as pd

    raw = repo / ".run" / "data" / "raw" / "IC_valid.tsv"
    rows = [line.split("\t") for line in raw.read_text(encoding="utf-8").splitlines()[:3]]
    mlflow.set_tracking_uri(f"sqlite:///{repo}/.mlflow/mlflow.db")
    model = mlflow.pyfunc.load_model("models:/ecomcap-captioner@champion")
    out = model.predict(pd.DataFrame({"image_id": [r[0] for r in rows], "image": [r[1] for r in rows]}))
    assert list(out["image_id"]) == [r[0] for r in rows]
    assert all(isinstance(c, str) for c in out["caption"]) and any(out["caption"])


def _last_gate(repo: Path) -> dict:
    """The newest pipeline run's gate figures (tags, interval metrics, gate_decision.txt)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("training_pipeline")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    m = run.data.metrics
    text = Path(client.download_artifacts(run.info.run_id, "gate_decision.txt")).read_text(encoding="utf-8")
    return {"decision": run.data.tags["gate.decision"], "CIDEr-D": m["CIDEr-D"], "text": text,
            **{k: m.get(f"gate.{k}") for k in ("rel_gain", "rel_gain_low", "rel_gain_high")}}


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _check_mlflow_ui(repo: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tests.mlflow_ui import check_runs_visible, ensure_chromium, mlflow_server

    ensure_chromium()
    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("training_pipeline")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
            if "CIDEr-D" in r.data.metrics][:2]
    assert len(runs) == 2
    shots = Path(os.environ.get("ECOMCAP_SCREENSHOTS", tmp_path))
    with mlflow_server(uri, str(repo / ".mlflow" / "artifacts")) as base:
        check_runs_visible(base, exp.experiment_id, [r.info.run_id for r in runs], "CIDEr-D",
                           [r.data.metrics["CIDEr-D"] for r in runs], shots, compare_height=9000)
