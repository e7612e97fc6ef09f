"""The dual encoder as one torch module: a transformers CLIP-family model plus its logit scale/bias.

Embeddings are L2-normalised. The sigmoid loss needs a bias; SigLIP has one, CLIP and
Chinese-CLIP do not, so the module carries its own (saved next to the weights in
``retrieval.json``). Everything trainable lives under this one module, so the shared
checkpoint code (trainable tensors by name) resumes it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.model.tiny import MODEL_CLASSES

SETTINGS = "retrieval.json"
_MODEL_TYPES = {"chinese_clip": "chinese_clip", "clip": "clip", "siglip": "siglip"}


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object (projected pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class DualEncoder(nn.Module):
    """Text and image towers of one CLIP-family model, normalised, with logit scale and bias."""

    def __init__(self, model: nn.Module, arch: str, bias: float = -10.0):
        super().__init__()
        self.model, self.arch = model, arch
        if not hasattr(model, "logit_bias"):
            self.logit_bias = nn.Parameter(torch.tensor([float(bias)]))

    def embed_text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(_features(self.model.get_text_features(**inputs)).float(), dim=-1)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)

    def logit_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The real (log scale, bias) Parameters: set requires_grad here, not on scale_bias()'s
        reshaped views (a flag on a view leaves the Parameter frozen)."""
        bias = self.model.logit_bias if hasattr(self.model, "logit_bias") else self.logit_bias
        return self.model.logit_scale, bias

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log scale t', bias b): logits = exp(t') * cos + b."""
        scale, bias = self.logit_parameters()
        return scale.reshape(()), bias.reshape(())

    def init_siglip_logits(self) -> None:
        """SigLIP's from-scratch initialisation t' = log 10, b = -10 (transformers sets 0, 0)."""
        t, b = self.scale_bias()
        with torch.no_grad():
            t.fill_(math.log(10.0))
            b.fill_(-10.0)

    def settings(self) -> dict[str, Any]:
        _, b = self.scale_bias()
        return {"arch": self.arch, "logit_bias": float(b.detach())}


def detect_arch(path: str | Path, trust_remote_code: bool = False) -> str:
    """The CLIP family of a model directory or hub id (from ``retrieval.json`` or config.json)."""
    settings = Path(path) / SETTINGS
    if settings.is_file():
        return json.loads(settings.read_text(encoding="utf-8"))["arch"]
    model_type = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code).model_type
    if model_type not in _MODEL_TYPES:
        raise EcomcapError(f"{path}: model type '{model_type}' is not a supported dual encoder "
                           f"({', '.join(_MODEL_TYPES)})")
    return _MODEL_TYPES[model_type]


def load_dual_encoder(path: str | Path, arch: str | None = None) -> DualEncoder:
    """Load weights with the real class for `arch` (checked against the directory's own type)."""
    found = detect_arch(path)
    if arch is not None and arch != found:
        raise EcomcapError(f"{path} holds a '{found}' model but the config asks for arch '{arch}'")
    model = MODEL_CLASSES[found].from_pretrained(str(path))
    settings = Path(path) / SETTINGS
    bias = json.loads(settings.read_text(encoding="utf-8")).get("logit_bias", -10.0) if settings.is_file() else -10.0
    return DualEncoder(model, found, bias)
