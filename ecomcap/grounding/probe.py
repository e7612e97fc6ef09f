"""Does an encoder see an attribute? The pairwise probe that qualifies a grounding scorer.

For each probed image and attribute, one of its references that names the attribute is scored
against the same reference with that one word swapped (`AttributeSwapper`, never to the image's
true value when ground truth is known). The probe accuracy is the share of images whose right
caption scores strictly higher. Chance is 50%: an encoder at chance cannot reward that attribute.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping

import numpy as np

from ecomcap.grounding.scorer import GroundingScorer
from ecomcap.retrieval.data.swaps import AttributeSwapper
from ecomcap.training.data import ShardImages


def probe_pairs(refs: list[list[str]], swapper: AttributeSwapper, truth: list[dict | None],
                seed: int = 0) -> list[tuple[int, str, str, str]]:
    """(image row, field, right caption, swapped caption) for every image and field it names."""
    out = []
    for row, texts in enumerate(refs):
        rng = random.Random(f"probe:{seed}:{row}")
        for field in swapper.vocab:
            text = next((t for t in texts if field in swapper.found(t)), None)
            if text is None:
                continue
            avoid = (truth[row] or {}).get(field)
            swapped = swapper.swap(text, field, rng, avoid=avoid if isinstance(avoid, str) else None)
            if swapped is not None:
                out.append((row, field, text, swapped))
    return out


def probe(scorer: GroundingScorer, split_dir: str | Path, swapper: AttributeSwapper, n_images: int,
          attributes: Mapping[str, dict] | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """{field: {"accuracy", "n"}} on the first `n_images` images of a split (storage order)."""
    data = ShardImages(split_dir)
    rows = list(range(min(n_images, len(data))))
    truth = [(attributes or {}).get(data.ids[r]) for r in rows]
    pairs = probe_pairs([data.texts[r] for r in rows], swapper, truth, seed)
    if not pairs:
        return {}
    images = scorer.images([data.image(r) for r in rows])
    right = scorer.texts([p[2] for p in pairs])
    wrong = scorer.texts([p[3] for p in pairs])
    owner = np.array([p[0] for p in pairs])
    wins = (images[owner] * right).sum(-1) > (images[owner] * wrong).sum(-1)
    out = {}
    for field in swapper.vocab:
        mask = np.array([p[1] == field for p in pairs])
        if mask.any():
            out[field] = {"accuracy": float(wins[mask].mean()), "n": int(mask.sum())}
    return out
