"""The instruction a model is captioned with: the one it learnt, when its directory records one.

Captions depend on the instruction a model was trained with; captioning it under another (a run
config whose `model.prompt` changed since, e.g. configs/local.yaml's short one) silently writes
worse captions. Exported (registered) models record theirs in `inference.json`, SFT/SCST outputs
in `training_config.json` (the model config they trained under); a hub checkpoint records none
and gets the config's. Every batch-captioning path and the export ask `prompt_for`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ecomcap.config import ModelConfig
from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)
INFERENCE_FILE = "inference.json"  # an exported model's inference settings (ecomcap.registry.pyfunc)
TRAINING_CONFIG = "training_config.json"  # the configs an SFT/SCST output trained under


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise EcomcapError(f"{path} is corrupt (not JSON)") from None
    return data if isinstance(data, dict) else {}


def recorded_prompt(model_dir: str | Path) -> str | None:
    """The prompt `model_dir` records (inference.json first, then training_config.json), or None
    (a hub id, a plain checkpoint, another kind of output)."""
    path = Path(model_dir)
    if (path / INFERENCE_FILE).is_file():
        prompt = _read(path / INFERENCE_FILE).get("prompt")
        if isinstance(prompt, str) and prompt:
            return prompt
    if (path / TRAINING_CONFIG).is_file():
        model = _read(path / TRAINING_CONFIG).get("model")
        prompt = model.get("prompt") if isinstance(model, dict) else None
        if isinstance(prompt, str) and prompt:
            return prompt
    return None


def prompt_for(model_dir: str | Path, model_cfg: ModelConfig) -> str:
    """The recorded prompt (warning when the config's differs: the model learnt the recorded
    one), else the config's."""
    recorded = recorded_prompt(model_dir)
    if recorded is None:
        return model_cfg.prompt
    if recorded != model_cfg.prompt:
        log.warning("%s was trained with the prompt %r: using it, not the config's model.prompt %r "
                    "(an instruction the model never saw gives worse captions)",
                    model_dir, recorded, model_cfg.prompt)
    return recorded


def with_model_prompt(model_dir: str | Path, model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` carrying `prompt_for`'s prompt, for the workers, part keys and builders."""
    return model_cfg.model_copy(update={"prompt": prompt_for(model_dir, model_cfg)})
