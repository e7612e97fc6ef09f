"""Gallery artifacts for tests, built from random unit vectors and tiny images (the contract the
embed step writes: vectors.npy, items.jsonl, images.parquet, index.json)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ecomcap.retrieval.index.gallery import write_gallery
from tests.conftest import make_image

COLOURS = ["red", "blue", "green", "orange"]


def random_gallery(root: Path, n: int = 600, dim: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    items = [(f"it{seed}_{i:05d}", f"商品 {i}") for i in range(n)]
    images = ((item_id, make_image(COLOURS[i % len(COLOURS)], (16, 16))) for i, (item_id, _) in enumerate(items))
    return write_gallery(root, v, items, images, {"item_embedding": "image", "fusion_weight": 0.5,
                                                  "encoder_dir": "encoder"})
