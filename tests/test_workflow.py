"""Pipeline stages as plain functions: what they log to MLflow, and the cache fingerprint."""

import mlflow

from ecomcap.config import DataConfig, RunConfig
from ecomcap.data.shards import read_references
from ecomcap.workflow import evaluate_stage, source_fingerprint


def test_evaluate_stage_logs_only_when_asked(small_data, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    refs = read_references(small_data["valid"])
    preds = {k: v[0] for k, v in refs.items()}
    cfg = RunConfig(data=DataConfig(work_dir=small_data["root"]))
    with mlflow.start_run() as run:
        metrics, fp, html = evaluate_stage(preds, small_data["valid"], cfg, log=False)
        assert metrics["CIDEr-D"] > 1.0 and fp and "<img" in html
    assert mlflow.get_run(run.info.run_id).data.metrics == {}  # re-evaluating a champion logs nothing
    with mlflow.start_run() as run:
        evaluate_stage(preds, small_data["valid"], cfg)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["CIDEr-D"] == metrics["CIDEr-D"] and "val.attr.mean" in logged
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "samples.html" in artifacts


def test_source_fingerprint_follows_files(tmp_path):
    (tmp_path / "IC_train.tsv").write_text("a\tAAAA\n")
    cfg = DataConfig(source="dir", src_dir=tmp_path)
    before = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == before
    (tmp_path / "IC_train.tsv").write_text("a\tAAAA\nb\tBBBB\n")
    assert source_fingerprint(cfg) != before
    assert source_fingerprint(DataConfig()) != source_fingerprint(DataConfig(synth={"seed": 1}))
