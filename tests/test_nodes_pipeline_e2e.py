"""`launch.nodes: 2` through the real ZenML pipeline (make e2e): `zenml pipeline run` compiles
sft_inputs -> sft_nodes -> sft -> scst_inputs -> scst_nodes -> scst -> generate -> evaluate ->
promote; the command steps run on two local "pods" (tests/local_pods_operator.py: ZenML's
command, pod count and multi-pod environment, process trees instead of an Indexed Job, the one
stand-in); the regular steps after them hand the models on, so the step's MLflow run holds the
curves, the world size 2 and the node count 2, and the model is generated with, evaluated and
gated. A rerun reuses what the first run trained: the pods exit at once."""
from __future__ import annotations

import pytest

from tests.test_multiprocess_e2e import SMALL, _history, _last_run
from tests.test_pipeline_e2e import _write_config, repo, sh  # noqa: F401  (repo: the clean-copy fixture)

pytestmark = pytest.mark.e2e
STACK = ("bash scripts/setup_stack.sh && "
         "zenml step-operator flavor register tests.local_pods_operator.LocalPodsStepOperatorFlavor && "
         "zenml step-operator register local-pods -f local_pods && "
         "zenml stack copy ecomcap_local ecomcap_pods && zenml stack update ecomcap_pods -s local-pods && "
         "zenml stack set ecomcap_pods")


def test_two_node_pipeline_trains_hands_on_and_gates(repo):  # noqa: F811
    cfg = _write_config(repo, "e2e_nodes.yaml", launch={"nodes": 2, "num_processes": 1},
                        sft={**SMALL["sft"], "output_dir": ".run/nodes-sft"},
                        scst={**SMALL["scst"], "output_dir": ".run/nodes-scst"}, data=SMALL["data"])
    setup = sh(repo, STACK)
    assert setup.returncode == 0, setup.stderr[-3000:]
    run = f"zenml pipeline run pipelines.training.training_pipeline -c {cfg}"
    first = sh(repo, run)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    for stage in ("sft", "scst"):
        assert f"{stage}: node 1 of 2" in out and "world size 2 over 2 nodes" in out, stage
    client, mlrun = _last_run(repo)
    m = mlrun.data.metrics
    assert m["sft.world_size"] == m["scst.world_size"] == 2 and m["sft.nodes"] == m["scst.nodes"] == 2
    assert len(_history(client, mlrun, "sft.loss")) == SMALL["sft"]["max_steps"]  # the pods' curve, replayed
    assert "CIDEr-D" in m and "gate:" in out

    again = sh(repo, run)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert out.count("these inputs were trained by an earlier run") >= 2  # pods of sft_nodes, scst_nodes
    assert "world size 2 over 2 nodes" not in out
