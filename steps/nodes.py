"""Multi-pod command steps and the regular steps around them (ecomcap/command_steps.py).

`<stage>_inputs` writes the paths of its artifacts for the pods; `<stage>_nodes` is ZenML's
command step on `launch.nodes` pods (`generate_pods`: `generate.chunks.pods`); the step after it
(`sft`, `scst`, `dpo`, or `merge_generated`) hands the result on as a typed artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from zenml import CommandStep, step

from ecomcap.command_steps import pod_command, read_result, replay_curve, write_handoff
from ecomcap.config import RunConfig
from ecomcap.registry import tracking
from materializers import DatasetDir, ModelDir
from steps._tracker import TRACKER, run_name

START = {"scst": "sft_model", "dpo": "start_model"}  # the argument each tuning stage starts from


@step(enable_cache=False)
def stage_inputs(config: RunConfig, stage: str, token: str, train: DatasetDir, valid: DatasetDir,
                 model: ModelDir | None = None, grounding: ModelDir | None = None) -> Annotated[str, "handoff"]:
    """The inputs of a stage's pods: this run's datasets, the model to start from, the run name."""
    from ecomcap.modeling.prepare import ensure_model
    from ecomcap.training.stages import check_strategy_fits_launch, reward_scorer

    check_strategy_fits_launch(config, stage)  # refused here, before N pods start
    inputs: dict[str, Any] = {"train": train.path, "valid": valid.path, "run_name": run_name()}
    if stage == "sft":
        ensure_model(config.model, train.path)  # the tiny model, built once before the pods start
    else:
        scorer = reward_scorer(stage, config, Path(grounding.path) if grounding else None)
        inputs.update({START[stage]: model.path, "scorer_dir": str(scorer) if scorer else None})
    return str(write_handoff(config, stage, token, inputs))


@step(enable_cache=False)
def generate_inputs(config: RunConfig, token: str, model: ModelDir, data: DatasetDir) -> Annotated[str, "handoff"]:
    return str(write_handoff(config, "generate", token, {"model": model.path, "data": data.path}))


def on_nodes(stage: str, config: RunConfig, pods: int, after: str, token: str) -> str:
    """Add the stage's command step (`<stage>_nodes`, `generate_pods`) on `pods` pods; its id."""
    name = "generate_pods" if stage == "generate" else f"{stage}_nodes"
    command = CommandStep(command=pod_command(stage, config, token), name=name).configure(
        step_operator=True, settings={"step_operator.kubernetes": {"pod_count": pods}})
    command(id=name, after=after)
    return name


def _adopt(stage: str, config: RunConfig, token: str) -> dict[str, Any]:
    """Pod 0's result, logged to this step's MLflow run as a one-pod stage logs it, plus the curve
    the pods could not log (they had no step run)."""
    tracking.log_config(stage, getattr(config, stage))
    tracking.log_config("launch", config.launch)
    res = read_result(config, stage, token)
    replay_curve(stage, res["model_dir"])
    return res


@step(experiment_tracker=TRACKER)
def sft_from_nodes(config: RunConfig, token: str, train: DatasetDir, valid: DatasetDir) -> Annotated[ModelDir, "sft_model"]:
    from ecomcap.training.stages import finish_sft

    tracking.log_config("model", config.model)
    tracking.log_config("finetune", config.finetune)
    return ModelDir(str(finish_sft(_adopt("sft", config, token))))


@step(experiment_tracker=TRACKER)
def tuned_from_nodes(config: RunConfig, stage: str, token: str, train: DatasetDir, valid: DatasetDir,
                     grounding: ModelDir | None = None) -> Annotated[ModelDir, "model"]:
    from ecomcap.training.stages import finish_tuning

    res = _adopt(stage, config, token)
    return ModelDir(str(finish_tuning(stage, config, res, Path(grounding.path) if grounding else None)))
