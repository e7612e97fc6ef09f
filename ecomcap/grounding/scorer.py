"""Scores of (image, caption) pairs with one image–text encoder.

- CLIP-S = w * max(cos(image, caption), 0), w = 2.5 (Hessel et al. 2021).
- distinctiveness = log-softmax of a caption's similarity to its own image against the other
  images given with it (at the encoder's own logit scale): a generic caption that fits every
  product scores low even when its CLIP-S is high.

Embeddings come from `ecomcap.retrieval.model.encoder` (float32, L2-normalised), so these are plain
numpy on top; images are embedded once per batch and reused for every caption of that image.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

QUALITY_FILE = "grounding.json"


def clip_s(image_emb: np.ndarray, text_emb: np.ndarray, w: float = 2.5) -> np.ndarray:
    """Row-wise w * max(cos, 0) of matching rows (both L2-normalised)."""
    return w * np.maximum((image_emb * text_emb).sum(-1), 0.0)


def distinctiveness(image_emb: np.ndarray, text_emb: np.ndarray, owner: Sequence[int], scale: float) -> np.ndarray:
    """log softmax over the images of scale * cos(caption, image), at each caption's own image."""
    logits = scale * text_emb @ image_emb.T  # [captions, images]
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logp[np.arange(len(owner)), np.asarray(owner)]


def weights_fingerprint(model_dir: str | Path) -> str:
    """Hash of an encoder directory's weight files: the scorer's version, recorded by every run using it."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class GroundingScorer:
    """One encoder directory as a caption scorer (the SCST reward, reranking, the evaluator)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, w: float | None = None):
        from ecomcap.retrieval.model.encoder import load_encoder

        self.dir = Path(model_dir)
        self.encoder = load_encoder(self.dir, device=device)
        t, _ = self.encoder.dual.scale_bias()
        self.scale = float(t.detach().exp())
        quality = self.dir / QUALITY_FILE
        self.quality = json.loads(quality.read_text(encoding="utf-8")) if quality.is_file() else {}
        self.w = w if w is not None else float(self.quality.get("clip_w", 2.5))
        self.fingerprint = self.quality.get("fingerprint") or weights_fingerprint(self.dir)
        self.blind: list[str] = []  # attributes the scorer does not see: their words are left out of its input
        self.swapper = None
        if self.quality.get("role") == "scorer":  # the evaluator reports as it is; a scorer keeps to its probe
            _, weak = self.trusted_fields(float(self.quality.get("min_pairwise_acc", 0.0)))
            if weak:
                self.blind_to(weak, self.quality.get("vocab") or {})

    def blind_to(self, fields: Sequence[str], vocab) -> None:
        """Score captions with the words of `fields` removed, so a scorer at chance on an attribute
        neither rewards nor penalises what a caption says about it."""
        from ecomcap.retrieval.data.swaps import AttributeSwapper

        if not vocab:
            from ecomcap.retrieval.data.swaps import synthetic_vocab

            vocab = synthetic_vocab()
        self.blind, self.swapper = list(fields), AttributeSwapper(vocab) if fields else None

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encoder.encode_images(images)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.blind:
            texts = [self.swapper.strip(t, self.blind) for t in texts]
        return self.encoder.encode_texts(texts)

    def clip_s(self, image_emb: np.ndarray, captions: Sequence[str], owner: Sequence[int]) -> np.ndarray:
        """CLIP-S of each caption with its image (`owner[i]`: the row of `image_emb`)."""
        return clip_s(image_emb[np.asarray(owner)], self.texts(captions), self.w)

    def trusted_fields(self, threshold: float) -> tuple[list[str], list[str]]:
        """(attributes whose probe accuracy reaches `threshold`, those that do not)."""
        probe = self.quality.get("probe", {})
        ok = [f for f, v in probe.items() if v["accuracy"] >= threshold]
        return ok, [f for f in probe if f not in ok]
