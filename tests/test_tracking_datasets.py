"""Datasets recorded on MLflow runs (`mlflow.log_input`, digest = data fingerprint), on a real
SQLite tracking store: what fills the MLflow UI's Datasets column for both jobs."""
import mlflow
import pytest

from ecomcap.config import DataConfig, RunConfig
from ecomcap.data.shards import read_report
from ecomcap.registry import tracking
from ecomcap.workflow import validate_stage


def _inputs(run_id: str) -> dict[str, dict]:
    run = mlflow.get_run(run_id)
    out = {}
    for di in run.inputs.dataset_inputs:
        out[di.dataset.name] = {"digest": di.dataset.digest, "source": di.dataset.source,
                                "tags": {t.key: t.value for t in di.tags}}
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite store for the module (creating its tables takes seconds)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    yield
    mlflow.set_tracking_uri(None)


def test_validate_stage_records_each_split_as_dataset(small_data, store):
    cfg = RunConfig(data=DataConfig(work_dir=small_data["root"]))
    splits = {"train": small_data["train"], "valid": small_data["valid"]}
    with mlflow.start_run() as run:
        validate_stage(splits, cfg)
    got = _inputs(run.info.run_id)
    assert set(got) == {"captions-train", "captions-valid"}
    for split, context in (("train", "training"), ("valid", "validation")):
        rep = read_report(splits[split])
        ds = got[f"captions-{split}"]
        assert ds["digest"] == rep["fingerprint"][:36]
        assert ds["tags"]["fingerprint"] == rep["fingerprint"]
        assert ds["tags"]["mlflow.data.context"] == context
        assert ds["tags"]["rows_ok"] == str(rep["rows_ok"])
        assert str(splits[split]) in ds["source"]


def test_log_dataset_generic_source_and_no_run(store, tmp_path):
    tracking.log_dataset("x", "abc", tmp_path, "training")  # no active run: a no-op, no error
    with mlflow.start_run() as run:
        tracking.log_dataset("retrieval-gallery", "f" * 64, "synthetic", "gallery", tags={"items": 7})
        tracking.log_dataset("retrieval-gallery", "f" * 64, "synthetic", "gallery")  # logged once
        with pytest.raises(ValueError, match="empty fingerprint"):
            tracking.log_dataset("bad", "", tmp_path, "training")
    got = _inputs(run.info.run_id)
    assert list(got) == ["retrieval-gallery"]
    assert got["retrieval-gallery"]["digest"] == "f" * 36 and "synthetic" in got["retrieval-gallery"]["source"]
    assert got["retrieval-gallery"]["tags"]["items"] == "7"
    # what the UI's Datasets column reads: the run's inputs in a search over the experiment
    listed = mlflow.search_runs(output_format="list", filter_string=f"attributes.run_id = '{run.info.run_id}'")
    assert [d.dataset.digest for d in listed[0].inputs.dataset_inputs] == ["f" * 36]
