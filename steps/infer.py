"""Generation steps: caption a dataset; fetch the registry's champion; write caption_gen.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml import step

from ecomcap.config import RunConfig
from ecomcap.workflow import generate_share_stage, generate_stage, merge_generated_stage
from materializers import DatasetDir, ModelDir
from steps._tracker import TRACKER


@step(experiment_tracker=TRACKER)
def generate(config: RunConfig, model: ModelDir, data: DatasetDir, grounding: ModelDir | None = None,
             registered: bool = False) -> Annotated[dict, "caption_gen"]:
    """`registered`: a registry version (batch inference), captioned with its recorded settings."""
    return generate_stage(Path(model.path), Path(data.path), config,
                          grounding=Path(grounding.path) if grounding else None, registered=registered)


@step(enable_cache=False)  # its output lives in parts_dir, not in the artifact: finished chunks are skipped
def generate_share(config: RunConfig, model: ModelDir, data: DatasetDir, index: int) -> Annotated[int, "images"]:
    """Share `index` of `generate.chunks.fan_out` (one pod each on Kubernetes)."""
    return generate_share_stage(Path(model.path), Path(data.path), config, index)


@step(experiment_tracker=TRACKER)
def merge_generated(config: RunConfig, model: ModelDir, data: DatasetDir,
                    token: str | None = None) -> Annotated[dict, "caption_gen"]:
    """`token`: after `generate_pods`, whose inputs' copies on the shared volume go once merged."""
    preds = merge_generated_stage(Path(model.path), Path(data.path), config)
    if token is not None:
        from ecomcap.command_steps import clear_shared

        clear_shared(config, token)
    return preds


@step(enable_cache=False)
def champion_model(config: RunConfig) -> Annotated[ModelDir, "champion_model"]:
    """The model behind the registry's `champion` alias (never cached: the alias moves)."""
    from ecomcap.registry.promote import champion_model_dir

    return ModelDir(str(champion_model_dir(config)))


@step
def write_predictions(config: RunConfig, predictions: dict, output: str) -> Annotated[str, "caption_gen_path"]:
    from ecomcap.data.formats import write_predictions as write

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write(output, predictions.items())
    return str(Path(output).resolve())
