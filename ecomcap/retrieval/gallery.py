"""The gallery artifact: what the embed step writes and the vector store, search CLI and page read.

A directory with ``vectors.npy`` (float32 [N, D], L2-normalised), ``items.jsonl`` ({"item_id",
"text"} per row, same order), ``images.parquet`` (item_id, image bytes) and ``index.json``
({"count", "dim", "item_embedding", "fusion_weight", "encoder_dir", "fingerprint"}). Reading
checks the parts agree, so a broken artifact fails with its reason instead of wrong results.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ecomcap.errors import EcomcapError

FILES = ("vectors.npy", "items.jsonl", "images.parquet", "index.json")
NORM_TOLERANCE = 1e-3


@dataclass
class Gallery:
    root: Path
    vectors: np.ndarray  # float32 [N, D], unit rows
    item_ids: list[str]
    texts: list[str]
    meta: dict

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])


def read_gallery(root: str | Path) -> Gallery:
    root = Path(root)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise EcomcapError(f"{root} is not a gallery artifact: missing {', '.join(missing)}")
    meta = json.loads((root / "index.json").read_text(encoding="utf-8"))
    absent = [k for k in ("count", "dim", "encoder_dir", "fingerprint") if k not in meta]
    if absent:
        raise EcomcapError(f"{root}/index.json lacks {', '.join(absent)}")
    vectors = np.load(root / "vectors.npy", mmap_mode="r")
    items = [json.loads(line) for line in (root / "items.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise EcomcapError(f"{root}/vectors.npy must be float32 [N, D], got {vectors.dtype} {vectors.shape}")
    if not (len(items) == vectors.shape[0] == int(meta["count"])) or vectors.shape[1] != int(meta["dim"]):
        raise EcomcapError(f"{root}: {vectors.shape[0]} vectors of dim {vectors.shape[1]}, {len(items)} items, "
                           f"index.json says {meta['count']} x {meta['dim']}")
    vectors = np.ascontiguousarray(vectors)
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.ones(0)
    if not np.all(np.abs(norms - 1) < NORM_TOLERANCE):
        bad = int(np.argmax(np.abs(norms - 1)))
        raise EcomcapError(f"{root}/vectors.npy rows must be L2-normalised (row {bad} has norm {norms[bad]:.4f})")
    ids = [str(it["item_id"]) for it in items]
    if len(set(ids)) != len(ids):
        raise EcomcapError(f"{root}/items.jsonl has duplicate item ids")
    return Gallery(root, vectors, ids, [str(it.get("text", "")) for it in items], meta)


def write_gallery(root: str | Path, vectors: np.ndarray, items: list[tuple[str, str]],
                  images: Iterable[tuple[str, bytes]], meta: dict) -> Path:
    """Write the four files (``meta`` adds item_embedding, fusion_weight, encoder_dir; count, dim
    and, unless given, a content fingerprint are filled in)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    np.save(root / "vectors.npy", vectors)
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for item_id, text in items:
            f.write(json.dumps({"item_id": item_id, "text": text}, ensure_ascii=False) + "\n")
    writer = None
    batch: list[tuple[str, bytes]] = []

    def flush() -> None:
        nonlocal writer
        table = pa.table({"item_id": [b[0] for b in batch], "image": [b[1] for b in batch]},
                         schema=pa.schema([("item_id", pa.string()), ("image", pa.binary())]))
        writer = writer or pq.ParquetWriter(root / "images.parquet", table.schema)
        writer.write_table(table, row_group_size=1024)
        batch.clear()

    for row in images:
        batch.append(row)
        if len(batch) >= 1024:
            flush()
    if batch or writer is None:
        flush()
    writer.close()
    h = hashlib.sha256(vectors.tobytes())
    h.update(json.dumps(items, ensure_ascii=False).encode())
    full = {"count": len(items), "dim": int(vectors.shape[1]), "fingerprint": h.hexdigest()[:16], **meta}
    (root / "index.json").write_text(json.dumps(full, ensure_ascii=False, indent=2), encoding="utf-8")
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
