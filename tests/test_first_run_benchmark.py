"""benchmarks/first_run.py: the cheap parts (configs, smoke scaling, reading figures back from a
real MLflow store, the summary line); the two pipeline runs themselves are the benchmark."""
import json
import sys
from pathlib import Path

import pytest

from ecomcap.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import first_run
    finally:
        sys.path.pop(0)
    return first_run


def test_reference_is_the_previous_default_and_differs_from_the_new_one(bench):
    """The reference stays what `make run` ran before issue 13 §3 (600 SFT steps, long prompt)."""
    ref, new = load_run_config(bench.REFERENCE), load_run_config(bench.NEW)
    assert (ref.sft.max_steps, ref.sft.batch_size, ref.sft.lr, ref.scst.max_steps) == (600, 32, 1e-3, 60)
    assert ref.model.prompt == type(ref.model)().prompt  # the library's default instruction
    assert ref.sft.output_dir == new.sft.output_dir  # same relative paths: each side's own checkout
    assert new.model_dump() != ref.model_dump()


def test_smoke_scales_both_sides_alike_and_stays_valid(bench):
    full = bench.run_config(bench.NEW)["parameters"]["config"]
    smoke = bench.run_config(bench.NEW, smoke=True)["parameters"]["config"]
    ref_smoke = bench.run_config(bench.REFERENCE, smoke=True)["parameters"]["config"]
    for cfg in (smoke, ref_smoke):
        assert cfg["data"]["synth"]["train"] == 240 and cfg["sft"]["eval_every"] == 0
        assert 2 <= cfg["sft"]["max_steps"] <= 20 and cfg["scst"]["max_steps"] >= 2
    assert smoke["sft"]["max_steps"] == max(2, full["sft"]["max_steps"] // bench.SMOKE_STEP_DIVISOR)
    assert smoke["model"]["prompt"] == full["model"]["prompt"]  # only sizes change, not the recipe
    assert full["data"]["synth"]["train"] == 2000  # the shipped file is not touched


def test_figures_are_read_back_from_a_real_mlflow_store(bench, tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    try:
        exp = mlflow.create_experiment("training_pipeline", artifact_location=(tmp_path / "a").as_uri())
        with mlflow.start_run(experiment_id=exp):
            mlflow.log_metrics({"CIDEr-D": 2.5, "val.attr.mean": 0.8712, "val.attr.category": 0.9,
                                "val.attr.pattern": 0.75, "val.attr.colour": 1.0, "BLEU-4": 0.3})
    finally:
        mlflow.set_tracking_uri(None)
    assert bench.read_figures(db) == {"attr_mean": 0.8712, "attr_category": 0.9, "attr_pattern": 0.75,
                                      "attr_colour": 1.0, "CIDEr-D": 2.5}


def test_a_run_without_attribute_figures_is_an_error_not_a_zero(bench):
    with pytest.raises(SystemExit, match="val.attr.mean"):
        bench.figures({"CIDEr-D": 1.0})


def test_summary_ratios_and_target(bench, capsys):
    ref = {"wall_s": 400.0, "cpu_s": 700.0, "attr_mean": 0.64, "CIDEr-D": 1.5}
    new = {"wall_s": 380.0, "cpu_s": 650.0, "attr_mean": 0.88, "CIDEr-D": 2.6}
    out = bench.compare(ref, new, smoke=False, threads="unset")
    assert out["wall_ratio_new_vs_reference"] == 0.95 and out["cpu_ratio_new_vs_reference"] == 0.929
    assert out["target_met"] is True
    assert bench.compare(ref, {**new, "wall_s": 401.0}, False, "1")["target_met"] is False
    assert bench.compare(ref, {**new, "attr_mean": 0.84}, False, "1")["target_met"] is False
    json.dumps(out)  # the last line is one JSON object


def test_a_commit_reference_is_that_commits_code_and_config(bench, tmp_path):
    """--reference-commit: `git archive` of the commit (its code) and its configs/local.yaml; shown
    with HEAD, which every clone has (the issue's base, 50a983c, needs the full history)."""
    import subprocess

    assert bench.commit_config("HEAD") == bench.yaml.safe_load(
        subprocess.run(["git", "show", "HEAD:configs/local.yaml"], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout)
    repo = bench.commit_checkout("HEAD", tmp_path / "ref")
    tracked = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and ".venv" not in p.parts) \
        == sorted(tracked)
    assert (repo / ".venv").is_symlink()
