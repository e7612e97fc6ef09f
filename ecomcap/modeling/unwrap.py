"""The transformers model under the wrappers training and serving put around it."""
from __future__ import annotations


def generative_model(model):
    """The `GenerationMixin` model under PEFT/accelerate wrappers (the one holding `rope_deltas`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "module", inner)
