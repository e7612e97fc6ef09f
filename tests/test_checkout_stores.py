"""`ecomcap` commands run from a checkout read that checkout's MLflow store, as `make` does, and say
so; an explicit URI wins (issue 21 §3). `ecomcap summary`, what `make run` ends with: attribute
accuracy, the gate in one line, where samples.html and the MLflow run are (issue 21 §4)."""
import logging
from pathlib import Path

import pytest

from ecomcap.cli import main
from ecomcap.registry.retrain import plan
from ecomcap.registry.summary import gate_line
from ecomcap.stores import find_checkout, tracking_uri, zenml_env

ATTR = {"category": 0.925, "colour": 0.995, "pattern": 0.85, "brand": 1.0, "mean": 0.9425, "n": 200}


def _bare_checkout(root: Path) -> Path:
    """What marks an ecomcap checkout (its make helper and its CLI)."""
    for marker in ("scripts/zenml_env.sh", "ecomcap/cli.py"):
        (root / marker).parent.mkdir(parents=True, exist_ok=True)
        (root / marker).write_text("", encoding="utf-8")
    (root / "docs").mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A checkout after `make run`: one training-pipeline run in .mlflow/mlflow.db."""
    from mlflow import MlflowClient

    root = _bare_checkout(tmp_path_factory.mktemp("checkout"))
    (root / ".mlflow").mkdir()
    uri = f"sqlite:///{root}/.mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("training_pipeline",
                                   artifact_location=f"file://{root}/.mlflow/artifacts/training_pipeline")
    run = client.create_run(exp, run_name="training_pipeline-2026_12_07")
    metrics = {"CIDEr-D": 2.78, "BLEU-4": 0.41, "ROUGE-L": 0.62, **{f"val.attr.{k}": v for k, v in ATTR.items()},
               "data.train.rows_in": 2000, "data.train.rows_ok": 1980, "data.train.rows_quarantined": 20,
               "data.valid.rows_in": 200, "data.valid.rows_ok": 200, "data.valid.rows_quarantined": 0,
               "gate.rel_gain": 0.042, "gate.rel_gain_low": 0.011, "gate.rel_gain_high": 0.075}
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    for k, v in {"gate.decision": "promoted", "gate.candidate_version": "3", "gate.champion_after": "3"}.items():
        client.set_tag(run.info.run_id, k, v)
    client.log_text(run.info.run_id, "<html></html>", "samples.html")
    client.log_text(run.info.run_id, "PROMOTED: version 3 vs champion 2\n", "gate_decision.txt")
    return {"root": root, "uri": uri, "run_id": run.info.run_id, "experiment_id": exp}


@pytest.fixture
def inside(checkout, monkeypatch):
    """Working in a folder of the checkout, no store named anywhere."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(checkout["root"] / "docs")
    return checkout


def test_search_reads_the_checkouts_store_and_says_so(inside, capsys, caplog):
    """The issue's failing example: the search asked MLflow's default store (<cwd>/mlflow.db)."""
    with caplog.at_level(logging.INFO, logger="ecomcap.stores"):
        assert main(["search", "红色 条纹 T恤"]) == 2
    err = capsys.readouterr().err
    assert f"no 'serving' or 'champion' version of registered model 'ecomcap-retriever' at {inside['uri']}" in err
    assert f"MLflow store: {inside['uri']} (this checkout's" in caplog.text
    assert not (inside["root"] / "docs" / "mlflow.db").exists() and not (inside["root"] / "mlflow.db").exists()


def test_an_explicit_uri_wins(inside, tmp_path, monkeypatch, capsys, caplog):
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    with caplog.at_level(logging.INFO, logger="ecomcap.stores"):
        assert main(["summary"]) == 2
    assert f"no runs in experiment 'training_pipeline' at {other}" in capsys.readouterr().err
    assert f"MLflow store: {other} (from MLFLOW_TRACKING_URI)" in caplog.text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", inside["uri"])  # the flag beats the environment
    assert main(["summary", "--tracking-uri", other]) == 2
    assert tracking_uri("flag://a", "config://b") == "flag://a" and tracking_uri(None, "config://b") == "config://b"


def test_a_checkout_without_a_store_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    root = _bare_checkout(tmp_path / "fresh")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    assert find_checkout() == root.resolve()
    assert main(["summary"]) == 2
    assert "no MLflow store in this checkout yet" in capsys.readouterr().err
    assert tracking_uri(must_exist=False) is None  # retrieval-table: nothing to log into
    assert find_checkout(tmp_path) is None
    (root / "run.yaml").write_text("registry: {floor: 0.1}\n", encoding="utf-8")
    assert plan(root / "run.yaml", if_changed=True).reason == "no MLflow store in this checkout yet"


def test_retrain_runs_zenml_on_the_checkouts_state_when_make_set_it_up(tmp_path, monkeypatch):
    root = _bare_checkout(tmp_path / "c")
    monkeypatch.delenv("ZENML_CONFIG_PATH", raising=False)
    monkeypatch.chdir(root)
    assert zenml_env() == {}  # no local stack here (CI: the client's own config, e.g. a server)
    (root / ".zen_config").mkdir()
    assert zenml_env() == {"ZENML_CONFIG_PATH": str(root.resolve() / ".zen_config")}
    monkeypatch.setenv("ZENML_CONFIG_PATH", str(tmp_path / "elsewhere"))
    assert zenml_env() == {}


def test_summary_attribute_accuracy_gate_line_samples_and_run(inside, capsys):
    assert main(["summary"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "run training_pipeline-2026_12_07: CIDEr-D 2.7800  BLEU-4 0.4100  ROUGE-L 0.6200"
    assert lines[1] == ("attribute accuracy: mean 94.2% (category 92.5%, colour 99.5%, pattern 85.0%, brand 100.0%) "
                        "on 200 images")
    assert lines[2].startswith("data train: rows_in 2000 = ok 1980 + quarantined 20")
    artifacts = inside["root"] / ".mlflow" / "artifacts" / "training_pipeline" / inside["run_id"] / "artifacts"
    gate = [ln for ln in lines if ln.startswith("gate:")]
    assert gate == [f"gate: promoted: candidate version 3 is champion now; relative gain +4.20%, interval "
                    f"[+1.10%, +7.50%] (reasons: {artifacts / 'gate_decision.txt'})"]
    assert f"samples: {artifacts / 'samples.html'}" in lines and (artifacts / "samples.html").is_file()
    assert (f"MLflow run: http://127.0.0.1:5000/#/experiments/{inside['experiment_id']}/runs/{inside['run_id']} "
            "(with the UI below)") in lines
    assert lines[-1] == f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {inside['uri']} --port 5000"


def test_gate_line_when_rejected_or_absent():
    tags = {"gate.decision": "rejected", "gate.candidate_version": "4", "gate.champion_after": "3"}
    assert gate_line(tags, {}, None) == ("gate: rejected: candidate version 4 not promoted, champion version 3 "
                                         "(reasons: gate_decision.txt in the run)")
    assert gate_line({**tags, "gate.champion_after": "None"}, {}, None).startswith(
        "gate: rejected: candidate version 4 not promoted, champion none yet")
    assert gate_line({}, {}, None) == "gate: n/a (this run registered no candidate)"
