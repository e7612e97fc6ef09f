"""Make sure the configured base model exists: build the tiny local model when asked."""
from __future__ import annotations

from pathlib import Path

from ecomcap.config import ModelConfig


def ensure_model(cfg: ModelConfig, train_dir: str | Path | None) -> None:
    """With `model.tiny` set, build the tiny model at `name_or_path` from the training captions."""
    if cfg.tiny is None:
        return
    from ecomcap.data.shards import read_references
    from ecomcap.modeling.tiny import ensure_tiny_model

    texts = [cfg.prompt]
    if train_dir is not None:
        texts += [t for refs in read_references(train_dir).values() for t in refs]
    ensure_tiny_model(cfg.name_or_path, texts, cfg.tiny)


def prefetch_model(cfg: ModelConfig) -> None:
    """A hub model downloaded once into the shared cache (HF_HOME on the volume) before N pods'
    ranks start loading it at once; a directory or the tiny model needs nothing."""
    if cfg.tiny is not None or Path(cfg.name_or_path).exists():
        return
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(cfg.name_or_path)
    except HFValidationError:  # a local path that is not there: the loader says so
        return
    snapshot_download(cfg.name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja",
                                                        "*.tiktoken"])
