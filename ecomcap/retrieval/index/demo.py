"""A synthetic product gallery any size, with a query encoder that needs no model: for the search
page's demo, its end-to-end test and the load benchmark (30,000 items like MUGE's pool).

`HashingTextEncoder` is the classic feature-hashing baseline (scikit-learn's HashingVectorizer
idea) over the distinct metric tokens and their bigrams, signed and L2-normalised: deterministic, and
queries sharing words with an item's text land near it. A gallery built with it says so in
index.json (``"encoder_dir": "hashing:<dim>"``); trained galleries name their encoder directory.
"""
from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ecomcap.data.synth_draw import image_for, random_attributes
from ecomcap.retrieval.index.gallery import write_gallery
from ecomcap.text import tokenize

HASHING_PREFIX = "hashing:"


class HashingTextEncoder:
    """Texts -> float32 [N, dim] unit vectors by signed feature hashing of tokens and bigrams."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.name = f"{HASHING_PREFIX}{dim}"

    def _features(self, text: str) -> set[str]:
        """Distinct tokens and bigrams (presence, not counts: "纯色" must not double "色")."""
        toks = tokenize(text)
        return set(toks) | {a + b for a, b in zip(toks, toks[1:])}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for feat in self._features(text):
                h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.where(norms > 0, norms, 1.0)
        out[norms[:, 0] == 0, 0] = 1.0  # no token at all: a fixed unit vector, still a valid query
        return out


def item_text(attrs: dict) -> str:
    return f"{attrs['brand'] + ' ' if attrs['brand'] else ''}{attrs['colour']}{attrs['pattern']}{attrs['category']}"


def product_images(products: list[tuple[str, dict]], seed: int, image_size: int) -> Iterator[tuple[str, bytes]]:
    """(item_id, JPEG) per (item_id, attributes): one drawing per distinct item text (at most
    2,240), shared by every item that shows the same product (many sellers), deterministic."""
    drawn: dict[str, bytes] = {}
    for item_id, attrs in products:
        text = item_text(attrs)
        if text not in drawn:
            buf = io.BytesIO()
            image_for(attrs, size=image_size, rng=random.Random(f"{seed}-{text}")).save(buf, "JPEG", quality=85)
            drawn[text] = buf.getvalue()
        yield item_id, drawn[text]


def demo_gallery(out: str | Path, n: int, dim: int = 256, seed: int = 0, image_size: int = 64) -> Path:
    """Write a gallery artifact of `n` drawn products (deterministic for a seed)."""
    rng = random.Random(seed)
    products = [(f"item_{i:06d}", random_attributes(rng)) for i in range(n)]
    items = [(item_id, item_text(a)) for item_id, a in products]
    encoder = HashingTextEncoder(dim)
    vectors = encoder.encode_texts([t for _, t in items])
    return write_gallery(out, vectors, items, product_images(products, seed, image_size),
                         {"item_embedding": "text", "fusion_weight": 0.0, "encoder_dir": encoder.name})
