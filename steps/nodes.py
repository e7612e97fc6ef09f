"""Multi-pod command steps and the regular steps around them (ecomcap/command_steps.py).

`<stage>_inputs` writes its artifacts for the pods (copied onto the shared volume when the
artifact store is remote); `<stage>_nodes` is ZenML's command step on `launch.nodes` pods
(`generate_pods`: `generate.chunks.pods`); the step after it (`sft`, `scst`, `dpo`, or
`merge_generated`) hands the result on as a typed artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from zenml import CommandStep, get_step_context, step

from ecomcap.command_steps import (
    clear_shared,
    pod_command,
    read_result,
    record_done,
    replay_curve,
    stage_handoff,
    write_handoff,
)
from ecomcap.config import RunConfig
from ecomcap.registry import tracking
from materializers import DatasetDir, ModelDir
from steps._tracker import TRACKER, run_name


def _remote_store() -> bool:
    """Whether this step's artifacts were loaded into temporary folders of its own pod."""
    from zenml.client import Client

    return not Client().active_stack.artifact_store.config.is_local


def _run_caches() -> bool:
    """False under the run's `enable_cache: false`: train again, reuse nothing."""
    return get_step_context().pipeline_run.config.enable_cache is not False


@step(enable_cache=False)
def stage_inputs(config: RunConfig, stage: str, token: str, train: DatasetDir, valid: DatasetDir,
                 model: ModelDir | None = None, grounding: ModelDir | None = None) -> Annotated[str, "handoff"]:
    """The inputs of a stage's pods: this run's datasets, the model to start from, the run name."""
    return str(stage_handoff(config, stage, token, Path(train.path), Path(valid.path), run_name(),
                             Path(model.path) if model else None, Path(grounding.path) if grounding else None,
                             share=_remote_store(), reuse=_run_caches()))


@step(enable_cache=False)
def generate_inputs(config: RunConfig, token: str, model: ModelDir, data: DatasetDir) -> Annotated[str, "handoff"]:
    return str(write_handoff(config, "generate", token, {"model": model.path, "data": data.path},
                             share=_remote_store()))


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
    res = read_result(config, stage, token, run_name())
    replay_curve(stage, res["model_dir"])
    return res


@step(experiment_tracker=TRACKER)
def sft_from_nodes(config: RunConfig, token: str, train: DatasetDir, valid: DatasetDir) -> Annotated[ModelDir, "sft_model"]:
    from ecomcap.training.stages import finish_sft

    tracking.log_config("model", config.model)
    tracking.log_config("finetune", config.finetune)
    out = finish_sft(_adopt("sft", config, token))
    record_done(config, "sft", token)
    clear_shared(config, token)
    return ModelDir(str(out))


def _tuned(stage: str, config: RunConfig, token: str, grounding: ModelDir | None) -> ModelDir:
    from ecomcap.training.stages import finish_tuning, reward_scorer

    scores = Path(grounding.path) if grounding else None
    reward_scorer(stage, config, scores)  # tags the scorer on this run, as the one-pod step does
    out = finish_tuning(stage, config, _adopt(stage, config, token), scores)
    record_done(config, stage, token)
    clear_shared(config, token)
    return ModelDir(str(out))


@step(experiment_tracker=TRACKER)
def scst_from_nodes(config: RunConfig, token: str, train: DatasetDir, valid: DatasetDir,
                    grounding: ModelDir | None = None) -> Annotated[ModelDir, "model"]:
    return _tuned("scst", config, token, grounding)


@step(experiment_tracker=TRACKER)
def dpo_from_nodes(config: RunConfig, token: str, train: DatasetDir, valid: DatasetDir,
                   grounding: ModelDir | None = None) -> Annotated[ModelDir, "dpo_model"]:
    return _tuned("dpo", config, token, grounding)
