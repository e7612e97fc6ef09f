"""Gallery artifacts beyond what training writes (ecomcap.retrieval.gallery): a strict opener
for serving, a writer for synthetic galleries, and image lookup by item id for the search page.

`open_gallery` checks what `load_gallery` leaves to the caller (files present, L2-normalised
rows, unique item ids, the index keys the store needs), so a broken artifact fails with its reason
instead of a traceback or wrong results.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow.parquet as pq

from ecomcap.data.shards import RowWriter
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.gallery import IMAGES_SCHEMA, INDEX, Gallery, GalleryDigest, load_gallery

FILES = ("vectors.npy", "items.jsonl", "images.parquet", INDEX)
NORM_TOLERANCE = 1e-3


def open_gallery(root: str | Path) -> Gallery:
    root = Path(root)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise EcomcapError(f"{root} is not a gallery artifact: missing {', '.join(missing)}")
    meta = json.loads((root / INDEX).read_text(encoding="utf-8"))
    absent = [k for k in ("count", "dim", "encoder_dir", "fingerprint") if k not in meta]
    if absent:
        raise EcomcapError(f"{root}/{INDEX} lacks {', '.join(absent)}")
    gallery = load_gallery(root)
    if gallery.vectors.ndim != 2 or gallery.vectors.dtype != np.float32:
        raise EcomcapError(f"{root}/vectors.npy must be float32 [N, D], got {gallery.vectors.dtype}")
    for start in range(0, len(gallery.vectors), 65536):  # memory-mapped: check in chunks
        norms = np.linalg.norm(gallery.vectors[start:start + 65536], axis=1)
        if not np.all(np.abs(norms - 1) < NORM_TOLERANCE):
            bad = int(np.argmax(np.abs(norms - 1)))
            raise EcomcapError(f"{root}/vectors.npy rows must be L2-normalised "
                               f"(row {start + bad} has norm {norms[bad]:.4f})")
    if len(set(gallery.item_ids)) != len(gallery.item_ids):
        raise EcomcapError(f"{root}/items.jsonl has duplicate item ids")
    return gallery


def write_gallery(root: str | Path, vectors: np.ndarray, items: list[tuple[str, str]],
                  images: Iterable[tuple[str, bytes]], meta: dict) -> Path:
    """Write the four files (``meta`` adds item_embedding, fusion_weight, encoder_dir; count, dim
    and, unless given, the fingerprint are filled in) with embed_gallery's image writer and
    fingerprint, so both kinds of gallery are identified the same way."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    np.save(root / "vectors.npy", vectors)
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for item_id, text in items:
            f.write(json.dumps({"item_id": item_id, "text": text}, ensure_ascii=False) + "\n")
    writer = RowWriter(root, IMAGES_SCHEMA, rows_per_group=1000, single_name="images.parquet")
    for item_id, blob in images:
        writer.add({"item_id": item_id, "image": blob})
    writer.close()
    digest = GalleryDigest(meta.get("item_embedding", "image"), meta.get("fusion_weight", 0.5))
    digest.update([i for i, _ in items], [t for _, t in items], vectors)
    full = {"count": len(items), "dim": int(vectors.shape[1]), "fingerprint": digest.hexdigest(), **meta}
    (root / INDEX).write_text(json.dumps(full, ensure_ascii=False, indent=2), encoding="utf-8")
    return root


class ImageLookup:
    """Item images from ``images.parquet`` without loading them all: an id -> (row group, row)
    map, and the last few row groups decoded in a small LRU cache."""

    def __init__(self, path: str | Path, cached_groups: int = 8) -> None:
        self._file = pq.ParquetFile(path)
        self._where: dict[str, tuple[int, int]] = {}
        for g in range(self._file.num_row_groups):
            ids = self._file.read_row_group(g, columns=["item_id"]).column(0).to_pylist()
            self._where.update({item_id: (g, i) for i, item_id in enumerate(ids)})
        self._cache: OrderedDict[int, list[bytes]] = OrderedDict()
        self._cached_groups = cached_groups
        self._lock = threading.Lock()  # the search page serves images from several threads

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._where

    def get(self, item_id: str) -> bytes | None:
        where = self._where.get(item_id)
        if where is None:
            return None
        group, row = where
        with self._lock:
            if group not in self._cache:
                self._cache[group] = self._file.read_row_group(group, columns=["image"]).column(0).to_pylist()
                if len(self._cache) > self._cached_groups:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(group)
            return self._cache[group][row]
