"""The grounded training pipeline end to end on the real local stack (ZenML + MLflow on SQLite),
from a clean copy: the grounding step trains the scorer and the evaluator from the train split,
SCST rewards CLIP-S + distinctiveness, DPO tunes on pairs of its own samples, generation reranks with the scorer, evaluation reports
caption->image R@1 with the evaluator, the gate guards attribute accuracy and R@1, and the
registered champion ships its scorer and serves reranked captions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_pipeline_e2e import E2E, _plain, _write_config, champion, sh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from benchmarks.first_run import fresh_checkout

    return fresh_checkout(tmp_path_factory.mktemp("clone") / "ecomcap")


def test_grounded_pipeline(repo):
    grounding = {"enabled": True, "probe_images": 24,
                 "encoder": {"name_or_path": "unused", "device": "cpu",
                             "tiny": {"hidden": 32, "layers": 1, "heads": 2, "projection_dim": 16,
                                      "image_size": 32, "patch_size": 16}},
                 "train": {"max_steps": 20, "batch_size": 16}}
    cfg = _write_config(
        repo, "e2e_grounded.yaml", grounding=grounding,
        scst={**E2E["scst"], "reward": {"cider": 1.0, "clip": 1.0, "distinct": 0.5, "repeat": 1.0}},
        generate={**E2E["generate"], "rerank": {"candidates": 2, "weight": 1.0}},
        dpo={"enabled": True, "max_steps": 2, "batch_size": 2, "samples": 2, "pair_images": 6, "max_new_tokens": 6,
             "eval_every": 0, "save_every": 0, "lr": 1.0e-3, "reward": {"cider": 1.0, "clip": 1.0}},
        registry={**E2E["registry"], "guard_metrics": ["BLEU-4", "attr_mean", "cap2img_R1"],
                  "tolerances": {"attr_mean": 0.02, "cap2img_R1": 0.05}})
    run = sh(repo, f"bash scripts/setup_stack.sh && zenml pipeline run pipelines.training.training_pipeline -c {cfg}")
    assert run.returncode == 0, run.stderr[-3000:]
    out = _plain(run.stdout + run.stderr)
    assert "Step grounding has finished" in out and "Step dpo has finished" in out

    from mlflow import MlflowClient

    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("training_pipeline")
    r = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    m, tags = r.data.metrics, r.data.tags
    for key in ("val.cap2img_R1", "val.cap2img_R5", "val.clip_s_eval", "val.top_opener_share",
                "grounding.scorer.probe.colour", "grounding.evaluator.probe.colour", "scst.reward_clip_s",
                "scst.reward_distinct", "scst.reward_cider", "scst.reward_s", "grounding_scorer.swap_acc",
                "dpo.pairs", "dpo.loss", "dpo.reward_margin"):
        assert key in m, key
    assert tags["grounding.scorer"] != tags["grounding.evaluator"]  # two encoders, both recorded
    samples = Path(client.download_artifacts(r.info.run_id, "samples.html")).read_text(encoding="utf-8")
    assert "wrong attributes" in samples or m["val.attr.mean"] == 1.0

    version, vtags = champion(repo)
    assert "attr_mean" in vtags and "cap2img_R1" in vtags  # the gate's guards, recorded on the version
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/ecomcap-captioner/{version}"))
    model_dir = next(local.rglob("inference.json")).parent
    info = json.loads((model_dir / "inference.json").read_text(encoding="utf-8"))
    assert info["generate"]["rerank"] == {"candidates": 2, "weight": 1.0, "scorer_dir": "grounding_scorer"}
    assert (model_dir / "grounding_scorer" / "grounding.json").is_file()  # the served model ships its scorer
    raw = repo / ".run" / "data" / "raw" / "IC_valid.tsv"
    rows = [line.split("\t") for line in raw.read_text(encoding="utf-8").splitlines()[:2]]
    served = mlflow.pyfunc.load_model(f"models:/ecomcap-captioner/{version}")
    pred = served.predict(pd.DataFrame({"image_id": [x[0] for x in rows], "image": [x[1] for x in rows]}))
    assert list(pred["error"]) == ["", ""] and any(pred["caption"])

    # batch inference with the champion: its shipped scorer reranks (the inference pipeline has no grounding step)
    infer = sh(repo, f"zenml pipeline run pipelines.inference.batch_inference_pipeline -c {cfg}")
    assert infer.returncode == 0, infer.stderr[-3000:]
    lines = (repo / ".run" / "caption_gen.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == E2E["data"]["synth"]["test"]

    # a change outside the grounding settings reuses the trained encoders (ZenML cache)
    again = _write_config(repo, "e2e_grounded_lr.yaml", grounding=grounding,
                          scst={**E2E["scst"], "lr": 2.0e-4, "reward": {"cider": 1.0, "clip": 1.0}},
                          generate={**E2E["generate"], "rerank": {"candidates": 2, "weight": 1.0}})
    rerun = sh(repo, f"zenml pipeline run pipelines.training.training_pipeline -c {again}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Using cached version of step grounding" in _plain(rerun.stdout + rerun.stderr)
