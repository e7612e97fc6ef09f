"""Config mistakes through `zenml pipeline run -c` on a real local stack (issue 21 §2): the last line
the user sees is the one-line message, not ZenML's "Only JSON serializable inputs are allowed"
under a rich traceback. The same cases through the `ecomcap` CLI: tests/test_config_errors.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.first_run import fresh_checkout

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A clean copy of the checkout with its local stack set up, as `make run` leaves it."""
    root = fresh_checkout(tmp_path_factory.mktemp("clone") / "ecomcap")
    assert _zenml(root, "bash scripts/setup_stack.sh").returncode == 0
    return root


def _zenml(repo: Path, cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(["bash", "-c", f"source scripts/zenml_env.sh && {cmd}"], cwd=repo, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    print(proc.stdout[-3000:])
    return proc


def _run(repo: Path, pipeline: str, settings: dict) -> tuple[int, str, str]:
    """(exit code, whole output, last line) of `zenml pipeline run <pipeline> -c <yaml>`."""
    path = repo / "configs" / "mistake.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"config": settings}}), encoding="utf-8")
    proc = _zenml(repo, f"zenml pipeline run {pipeline} -c configs/mistake.yaml")
    return proc.returncode, proc.stdout, proc.stdout.strip().splitlines()[-1]


def test_unknown_key(repo):
    rc, out, last = _run(repo, "pipelines.training.training_pipeline", {"registry": {"flor": 0.3}})
    assert rc != 0 and "Traceback" not in out
    assert last == ("Error: invalid config in configs/mistake.yaml (parameters.config): "
                    "unknown key registry.flor: did you mean registry.floor?")


def test_wrong_type(repo):
    """The retrieval pipeline's run model takes the same checks."""
    rc, out, last = _run(repo, "pipelines.retrieval.retrieval_pipeline", {"train": {"max_steps": "many"}})
    assert rc != 0 and "Traceback" not in out
    assert last == ("Error: invalid config in configs/mistake.yaml (parameters.config): "
                    "train.max_steps: expected an integer, got 'many'")


def test_renamed_key(repo):
    """The old name is accepted with a warning naming the new one: the pipeline then compiles up to
    the next check (reranking without a scorer, refused before any step runs)."""
    rc, out, last = _run(repo, "pipelines.training.training_pipeline",
                         {"registry": {"cider_floor": 0.3}, "generate": {"rerank": {"candidates": 2}}})
    assert "registry.cider_floor is renamed registry.floor" in out and "invalid config" not in out
    assert rc != 0 and "Traceback" not in out
    assert last.startswith("Error: generate.rerank.candidates is set but there is no grounding scorer")
