"""Retrieval pipeline end to end on the real local stack (ZenML + MLflow on SQLite), from a clean
copy of the repo: run, rerun (cached), MLflow run with Recall@K, the comparison table, the
top-5 picture and the input data sets, and a loadable gallery artifact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline_e2e import _plain, repo, sh  # noqa: F401  (the clean-clone fixture)

pytestmark = pytest.mark.e2e
SMALL = {
    "data": {"work_dir": ".run/retrieval/data", "synth": {"train_products": 60, "valid_products": 40, "seed": 3}},
    "encoder": {"arch": "chinese_clip", "name_or_path": ".run/retrieval/models/tiny", "item_embedding": "fused",
                "device": "cpu", "tiny": {"hidden": 32, "layers": 1, "heads": 2, "projection_dim": 32,
                                          "image_size": 32, "patch_size": 16}},
    "train": {"output_dir": ".run/retrieval/train", "max_steps": 20, "batch_size": 16, "lr": 2.0e-3,
              "eval_every": 10, "save_every": 10, "mixed_precision": "no",
              "hard_negatives": {"enabled": True, "start_step": 10, "per_query": 5}},
}


def _config(repo_dir: Path) -> str:
    base = yaml.safe_load((repo_dir / "configs" / "retrieval_local.yaml").read_text(encoding="utf-8"))
    cfg = base["parameters"]["config"]
    for section, update in SMALL.items():
        for k, v in update.items():
            cfg[section][k] = {**cfg[section][k], **v} if isinstance(v, dict) and isinstance(cfg[section].get(k), dict) else v
    (repo_dir / "configs" / "retrieval_e2e.yaml").write_text(yaml.safe_dump(base, allow_unicode=True), "utf-8")
    return "configs/retrieval_e2e.yaml"


def test_retrieval_pipeline_runs_then_caches(repo):  # noqa: F811
    cfg = _config(repo)
    cmd = f"bash scripts/setup_stack.sh && zenml pipeline run pipelines.retrieval.retrieval_pipeline -c {cfg}"
    first = sh(repo, cmd, OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = sh(repo, f"zenml pipeline run pipelines.retrieval.retrieval_pipeline -c {cfg}", OMP_NUM_THREADS="1")
    assert second.returncode == 0, second.stderr[-3000:]
    out = _plain(second.stdout + second.stderr)
    for name in ("retrieval_ingest", "retrieval_validate", "retrieval_train", "embed_gallery", "retrieval_evaluate"):
        assert f"Using cached version of step {name}" in out, name

    from mlflow import MlflowClient

    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("retrieval_pipeline")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])[0]
    assert {"R1", "R5", "R10", "MeanRecall", "chance.MeanRecall", "match_F1.fine-tuned",
            "index_recall10"} <= set(run.data.metrics)
    assert any(k.startswith("retrieval.in_batch_acc") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison_table.md", "query_top5.png", "query_results.html"} <= names
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    reports = {s: json.loads(p.read_text("utf-8")) for s in ("train", "valid")
               for p in (repo / ".run/retrieval/scratch").glob(f"ingest-{s}-*/report.json")}
    assert digests == {f"retrieval-{s}": r["fingerprint"][:36] for s, r in reports.items()}

    # registered with the shared gate: the first candidate becomes champion, the cached rerun
    # registers nothing new; the champion serves searches over its own gallery
    from mlflow import MlflowClient as Registry

    reg = Registry(tracking_uri=uri, registry_uri=uri)
    champion = reg.get_model_version_by_alias("ecomcap-retriever", "champion")
    assert len(reg.search_model_versions("name='ecomcap-retriever'")) == 1
    import mlflow.pyfunc

    mlflow.set_tracking_uri(uri)
    hits = mlflow.pyfunc.load_model(f"models:/ecomcap-retriever/{champion.version}").predict(["红色 T恤"])
    assert len(hits["item_ids"][0]) == 10
    # what a user types: the champion's index in the embedded vector store
    searched = sh(repo, 'ecomcap search "红色 T恤" --top 5 --json', OMP_NUM_THREADS="1")
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert len(json.loads(searched.stdout.strip().splitlines()[-1])["results"]) == 5

    # the catalogue index job: the champion's encoder over a catalogue, aliased serving; the page
    # and `ecomcap search` then serve it, the champion stays where the gate put it
    index_cfg = yaml.safe_load((repo / "configs" / "retrieval_index.yaml").read_text(encoding="utf-8"))
    index_cfg["parameters"]["config"]["catalogue"]["synthetic_items"] = 300
    (repo / "configs" / "index_e2e.yaml").write_text(yaml.safe_dump(index_cfg, allow_unicode=True), "utf-8")
    indexed = sh(repo, "zenml pipeline run pipelines.index.index_pipeline -c configs/index_e2e.yaml",
                 OMP_NUM_THREADS="1")
    assert indexed.returncode == 0, indexed.stderr[-3000:]
    serving = reg.get_model_version_by_alias("ecomcap-retriever", "serving")
    assert serving.version != champion.version and serving.tags["encoder_version"] == str(champion.version)
    assert reg.get_model_version_by_alias("ecomcap-retriever", "champion").version == champion.version
    served = sh(repo, 'ecomcap search "红色 T恤" --top 3 --json', OMP_NUM_THREADS="1")
    assert served.returncode == 0 and all(r["item_id"].startswith("cat_") for r in
                                          json.loads(served.stdout.strip().splitlines()[-1])["results"])

    from ecomcap.retrieval.index.gallery import load_gallery

    gallery = next((repo / ".run/retrieval/scratch").glob("gallery-*/gallery"))
    gal = load_gallery(gallery)
    assert gal.vectors.shape[0] == reports["valid"]["items"]["rows_ok"]
    assert gal.encoder(device="cpu").encode_texts(["红色 T恤"]).shape == (1, gal.index["dim"])


def test_comparison_table_command(tmp_path, monkeypatch):
    """`ecomcap retrieval-table`: every row, the chance level, logged as one MLflow run."""
    from ecomcap.cli import main

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "retrieval_local.yaml").read_text("utf-8"))
    cfg = base["parameters"]["config"]
    cfg["data"].update(work_dir=str(tmp_path / "data"), synth={"train_products": 30, "valid_products": 20})
    cfg["encoder"].update(name_or_path=str(tmp_path / "tiny"), tiny=SMALL["encoder"]["tiny"])
    cfg["train"].update(max_steps=6, batch_size=8, eval_every=3, save_every=0,
                        hard_negatives={"enabled": True, "start_step": 3, "per_query": 5})
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(base, allow_unicode=True), "utf-8")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["retrieval-table", "--config", str(path), "--out", str(tmp_path / "table")]) == 0
    result = json.loads((tmp_path / "table" / "table.json").read_text("utf-8"))
    assert [r["name"] for r in result["rows"]] == ["zero-shot (random init)", "InfoNCE", "sigmoid",
                                                   "InfoNCE + hard negatives", "InfoNCE + hard negatives, fused items"]
    assert 0 < result["chance"]["MeanRecall"] < 100 and all("match_F1" in r for r in result["rows"])
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("retrieval_comparison").experiment_id])[0]
    assert "row4.MeanRecall" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"table.md", "table.json"}
