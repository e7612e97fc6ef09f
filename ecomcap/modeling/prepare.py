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
