"""`launch.num_processes: 2` through the real ZenML pipeline and the CLI (2 CPU processes, gloo):
SFT and SCST complete, both ranks walk the same data order and end with the same weights, the
cosine schedule ends at 0, and the model that comes out is evaluated and gated."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.test_pipeline_e2e import _write_config, repo, sh  # noqa: F401  (repo: the clean-copy fixture)

pytestmark = pytest.mark.e2e
SMALL = {"sft": {"max_steps": 12, "batch_size": 4, "eval_every": 6, "eval_images": 8, "save_every": 6},
         "scst": {"max_steps": 2, "batch_size": 2, "samples": 2, "eval_every": 0, "save_every": 0},
         "data": {"dev_images": 8, "synth": {"train": 64, "valid": 8, "test": 4, "seed": 11}}}


def _last_run(repo):  # noqa: F811
    uri = f"sqlite:///{repo}/.mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("training_pipeline")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    return client, run


def _history(client, run, key: str) -> list[float]:
    return [h.value for h in sorted(client.get_metric_history(run.info.run_id, key), key=lambda h: h.step)]


def test_two_process_pipeline_ddp_zero2_zero3_train_the_same(repo):  # noqa: F811
    """The same run three ways (DDP, then the shipped ZeRO-2 and ZeRO-3 accelerate configs, which
    `launch.num_processes` and the run config override): the same loss curve, LR ending at 0."""
    curves = {}
    for mode, launch in (("ddp", {"num_processes": 2}),
                         ("zero2", {"num_processes": 2, "config_file": "configs/accelerate/deepspeed_zero2.yaml"}),
                         ("zero3", {"num_processes": 2, "config_file": "configs/accelerate/deepspeed_zero3.yaml"})):
        cfg = _write_config(repo, f"e2e_{mode}.yaml", launch=launch, **SMALL)
        proc = sh(repo, f"bash scripts/setup_stack.sh && zenml pipeline run pipelines.training.training_pipeline -c {cfg}")
        assert proc.returncode == 0, f"{mode}: {proc.stderr[-3000:]}"
        client, run = _last_run(repo)
        m, tags = run.data.metrics, run.data.tags
        assert m["sft.world_size"] == m["scst.world_size"] == 2, mode
        assert tags["sft.weights_digest"] and tags["scst.weights_digest"], mode  # equal on both ranks
        lrs = _history(client, run, "sft.lr")
        assert len(lrs) == SMALL["sft"]["max_steps"] and lrs[-1] == pytest.approx(0.0, abs=1e-12), mode
        assert "CIDEr-D" in m and "gate:" in proc.stdout + proc.stderr, mode  # exported, generated, gated
        curves[mode] = {k: _history(client, run, k) for k in ("sft.loss", "scst.loss")}
    for mode in ("zero2", "zero3"):
        for key, ddp in curves["ddp"].items():
            assert curves[mode][key] == pytest.approx(ddp, rel=1e-4, abs=1e-5), (mode, key)


def test_cli_train_launches_the_same_processes(repo):  # noqa: F811
    cfg = _write_config(repo, "e2e_cli_ddp.yaml", launch={"num_processes": 2},
                        sft={**SMALL["sft"], "max_steps": 4, "output_dir": ".run/cli-sft"},
                        data={**SMALL["data"], "work_dir": ".run/cli-data"})
    proc = sh(repo, f"ecomcap train --stage sft --config {cfg}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 4 and len(out["ranks"]) == 2
    assert out["ranks"][0] == out["ranks"][1]
