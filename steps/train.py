"""Training steps: SFT, then SCST and DPO (each handing on its input unchanged when off)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml import step

from ecomcap.config import DataConfig, GroundingConfig, RunConfig
from ecomcap.training.stages import dpo_stage, scst_stage, sft_stage
from materializers import DatasetDir, ModelDir
from steps._tracker import TRACKER, run_name


@step(experiment_tracker=TRACKER)
def sft(config: RunConfig, train: DatasetDir, valid: DatasetDir) -> Annotated[ModelDir, "sft_model"]:
    return ModelDir(str(sft_stage(Path(train.path), Path(valid.path), config, run_name())))


@step(experiment_tracker=TRACKER)
def scst(config: RunConfig, sft_model: ModelDir, train: DatasetDir, valid: DatasetDir,
         grounding: ModelDir | None = None) -> Annotated[ModelDir, "model"]:
    out = scst_stage(Path(sft_model.path), Path(train.path), Path(valid.path), config, run_name(),
                     Path(grounding.path) if grounding else None)
    return ModelDir(str(out))


@step(experiment_tracker=TRACKER)
def dpo(config: RunConfig, model: ModelDir, train: DatasetDir, valid: DatasetDir,
        grounding: ModelDir | None = None) -> Annotated[ModelDir, "dpo_model"]:
    out = dpo_stage(Path(model.path), Path(train.path), Path(valid.path), config, run_name(),
                    Path(grounding.path) if grounding else None)
    return ModelDir(str(out))


@step(experiment_tracker=TRACKER)
def grounding(config: GroundingConfig, data: DataConfig, train: DatasetDir,
              valid: DatasetDir) -> Annotated[ModelDir, "grounding"]:
    """The grounding scorer and the independent evaluator (cached like any step: trained once per
    train split, grounding settings and library version)."""
    from ecomcap.workflow import grounding_stage

    return ModelDir(str(grounding_stage(Path(train.path), Path(valid.path), config, data)))
